"""``DSNOPipeline``: a trained class-conditional DSNO (a tiny diffusers UNet teacher, collected and trained by the
CLI) sampled through diffusers' pipeline interface. References: `opdiff sample`'s PNGs on the same seeds (equal
pixels), the DSNO called directly on noise drawn here from the generator, and the run's own weight file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, ImagePipelineOutput
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from opdiff_cli.main import app
from opdiff_diffusers.pipeline import DSNOPipeline
from operator_diffusion.runs import reset_accelerate_state
from operator_diffusion.training import load_run

from diffusers_doubles import tiny_unet

runner = CliRunner()
SEEDS = [0, 3, 17, 40, 41, 1000]


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    reset_accelerate_state()
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run distilled from a tiny class-conditional (3 classes) 1×8×8 UNet2DModel in the DDPMPipeline
    layout: 8 trajectories, 3 training steps at a large learning rate (the temporal layers leave zero)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dsno_pipeline")
    tiny_unet(seed=5, sample_size=8, in_channels=1, out_channels=1, num_class_embeds=3).save_pretrained(
        root / "model" / "unet"
    )
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "model" / "scheduler")
    r = cli(
        "collect", "--backbone", "diffusers-unet2d", "-o", f"pretrained={root / 'model'}", "--steps", "8",
        "--times", "2", "--num", "8", "--batch-size", "8", "--out", root / "data",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = cli(
        "train", "--data", root / "data", "--out", root / "run", "--batch-size", "4", "--max-steps", "3",
        "--save-every", "3", "--warmup", "0", "--lr", "1e-2",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return root / "run"


def sample_pngs(run, out, *extra) -> list[np.ndarray]:
    r = cli("sample", run, "--out", out, "--seeds", ",".join(map(str, SEEDS)), "--format", "png", *extra)
    assert r.exit_code == 0, r.output
    return [np.asarray(Image.open(out / "images" / f"{s:06d}.png")) for s in SEEDS]


def test_the_pipeline_makes_opdiff_samples_images_on_the_same_seeds(run, tmp_path):
    model, _ = load_run(run)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("temporal"))  # trained
    pipe = DSNOPipeline.from_pretrained(run)
    out = pipe(seeds=SEEDS)
    assert isinstance(out, ImagePipelineOutput) and len(out.images) == len(SEEDS)
    want = sample_pngs(run, tmp_path / "random")  # --labels random: each seed draws its class after its noise
    assert all(np.array_equal(np.asarray(img), w) for img, w in zip(out.images, want))
    want = sample_pngs(run, tmp_path / "two", "--labels", "2")
    got = pipe(seeds=SEEDS, class_labels=2).images
    assert all(np.array_equal(np.asarray(img), w) for img, w in zip(got, want))
    # one generator per image, seeded with the seeds, is the same rule
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    assert torch.equal(pipe(generator=gens, output_type="pt").images, pipe(seeds=SEEDS, output_type="pt").images)


def test_a_generator_draws_the_batch_noise_then_its_classes(run):
    model, _ = load_run(run)
    pipe = DSNOPipeline.from_pretrained(run)
    got = pipe(batch_size=4, generator=torch.Generator().manual_seed(7), output_type="pt").images
    g = torch.Generator().manual_seed(7)
    x = torch.randn((4, 1, 8, 8), generator=g)  # a VP teacher's prior is N(0, I)
    y = torch.randint(3, (4,), generator=g)
    with torch.no_grad():
        direct = ((model(x, y)[:, -1] + 1) / 2).clamp(0, 1)
    assert got.shape == (4, 1, 8, 8) and torch.allclose(got, direct, atol=1e-6)
    labels = [0, 2, 1, 2]
    got = pipe(batch_size=4, generator=torch.Generator().manual_seed(7), class_labels=labels, output_type="np")
    with torch.no_grad():
        x = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(7))
        direct = ((model(x, torch.tensor(labels))[:, -1] + 1) / 2).clamp(0, 1)
    assert got.images.shape == (4, 8, 8, 1) and got.images.dtype == np.float32
    assert np.allclose(got.images, direct.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    (images,) = pipe(seeds=[1], output_type="np", return_dict=False)
    assert images.shape == (1, 8, 8, 1) and 0 <= images.min() and images.max() <= 1


def test_save_and_load_are_safetensors_and_the_folder_is_a_run(run, tmp_path):
    pipe = DSNOPipeline.from_pretrained(run)
    pipe.save_pretrained(tmp_path / "pipe")
    names = sorted(p.name for p in (tmp_path / "pipe").iterdir())
    assert names == ["config.json", "model.safetensors", "model_index.json"]
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "DSNOPipeline" and index["dsno"] == ["operator_diffusion.adapter", "DSNO"]
    a, b = load_file(tmp_path / "pipe" / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "pipe" / "config.json").read_text()) == json.loads((run / "config.json").read_text())
    again = DSNOPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(again(seeds=SEEDS, output_type="pt").images, pipe(seeds=SEEDS, output_type="pt").images)
    want = sample_pngs(run, tmp_path / "a")
    assert all(np.array_equal(x, y) for x, y in zip(sample_pngs(tmp_path / "pipe", tmp_path / "b"), want))
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(ValueError, match="safetensors only"):
        DSNOPipeline.from_pretrained(run, use_safetensors=False)
    assert not (tmp_path / "pickled").exists()


def test_bad_calls_are_one_clear_error(run):
    pipe = DSNOPipeline.from_pretrained(run)
    cases = [
        (dict(seeds=[1, 2], generator=torch.Generator()), "not both"),
        (dict(seeds=[1, 2], batch_size=3), "batch_size 3 but 2 seeds"),
        (dict(seeds=[-1]), "seed"),
        (dict(batch_size=0), "at least 1"),
        (dict(batch_size=2, generator=[torch.Generator()]), "1 generators for batch_size 2"),
        (dict(batch_size=2, class_labels=[0, 3]), "each in 0..2"),
        (dict(batch_size=2, class_labels=[0]), "one class or 2 classes"),
        (dict(output_type="latent"), "output_type must be one of pil, np, pt"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(**kwargs)
    with pytest.raises(FileNotFoundError, match="neither"):
        DSNOPipeline.from_pretrained("/no/such/run")
