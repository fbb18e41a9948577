"""Training DSNO on a prompt collection's latents and sampling it with prompts (`opdiff sample RUN --prompt`):
the written images are the VAE decode (scaling_factor applied) of the DSNO latents, computed here directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from text2image_doubles import register, write_tiny_pipeline
from typer.testing import CliRunner

from operator_diffusion.adapter import DSNO
from operator_diffusion.backbones import load_backbone
from operator_diffusion.collection import collect
from operator_diffusion.collection_plan import CollectConfig
from operator_diffusion.images import read_image
from operator_diffusion.training import TrainConfig, load_run, train

PROMPTS = ("a cat", "a dog", "do a cat")
SEEDS = [100, 101, 102]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from operator_diffusion.training import reset_accelerate_state

    register()
    root = tmp_path_factory.mktemp("t2i_run")
    teacher = load_backbone("diffusers-text2image", pretrained=str(write_tiny_pipeline(root / "pipe"))).eval()
    cfg = CollectConfig(num=6, steps=6, times=3, shard_size=6, batch_size=3, prompts=PROMPTS, guidance=2.0)
    collect(teacher, root / "data", cfg, process_index=0, num_processes=1, device="cpu")
    reset_accelerate_state()
    train(
        TrainConfig(
            data=str(root / "data"),
            out=str(root / "run"),
            batch_size=3,
            max_steps=2,
            warmup=1,
            save_every=100,
            log_every=1,
            mixed_precision="no",
        )
    )
    reset_accelerate_state()
    return root


def test_training_on_prompt_latents_writes_a_conditional_dsno(run):
    model, info = load_run(run / "run")
    assert info["collection"]["prompts"]["num_distinct"] == 3
    assert model.backbone.name == "diffusers-text2image"
    metrics = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
    keys = {k for k in model.state_dict() if k.startswith("temporal.")}
    assert keys  # the temporal layers travel with the UNet weights


def test_sampled_images_are_the_vae_decode_of_the_dsno_latents(run, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from opdiff_cli.main import app

    out = tmp_path / "samples"
    args = ["sample", str(run / "run"), "--out", str(out), "--seeds", ",".join(map(str, SEEDS)), "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, "--prompt", "a cat", "--prompt", "a dog", "--format", "png,npz"])
    assert r.exit_code == 0, r.output
    model = DSNO.load(run / "run" / "model.safetensors").eval()
    pipe_dir = str(run / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None, requires_safety_checker=False)
    vae = AutoencoderKL.from_pretrained(pipe_dir, subfolder="vae").eval()
    prompt_of = {s: ["a cat", "a dog"][s % 2] for s in SEEDS}  # seed s: prompt s mod 2
    for seed in SEEDS:
        emb, _ = pipe.encode_prompt(prompt_of[seed], "cpu", 1, False)
        x_T = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(seed))[None]
        with torch.no_grad():
            latent = model(x_T, encoder_hidden_states=emb.to(torch.float16).float())[:, -1]
            image = vae.decode(latent / vae.config.scaling_factor).sample[0]
        expected = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        got = read_image(out / "images" / f"{seed:06d}.png")
        assert got.shape == (32, 32, 3)
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    meta = json.loads((out / "opdiff_samples.json").read_text())
    assert meta["prompts"] == ["a cat", "a dog"]


def test_teacher_samples_with_prompts_and_bad_sample_input(run, tmp_path):
    from opdiff_cli.main import app

    runner = CliRunner()
    base = ["sample", str(run / "run"), "--seeds", "100,101", "--device", "cpu"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "none")])
    assert r.exit_code == 2 and "text-conditioned: pass --prompt" in r.output
    assert not (tmp_path / "none").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "empty"), "--prompts", str(empty)])
    assert r.exit_code == 2 and "holds no prompts" in r.output
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "t"), "--prompt", "a cat", "--teacher", "--steps", "3"])
    assert r.exit_code == 0, r.output
    assert read_image(tmp_path / "t" / "teacher" / "images" / "000100.png").shape == (32, 32, 3)
    assert (tmp_path / "t" / "side_by_side.png").is_file()
    meta = json.loads((tmp_path / "t" / "teacher" / "opdiff_samples.json").read_text())
    assert meta["guidance"] == 2.0 and meta["negative_prompt"] == ""


def test_bench_on_latents_reports_latent_rmse_and_decoded_psnr(run):
    from opdiff_cli.main import app
    from operator_diffusion.bench import latent_rmse

    assert latent_rmse(torch.full((1, 4, 2, 2), 3.0), torch.zeros(1, 4, 2, 2)) == 3.0  # latents are not clipped
    args = ["bench", str(run / "run"), "--num", "2", "--solvers", "ddim", "--nfe", "2", "--device", "cpu", "--json"]
    r = CliRunner().invoke(app, [*args, "--prompt", "a cat"])
    assert r.exit_code == 0, r.output
    rows = {row["method"]: row for row in json.loads(r.stdout[r.stdout.index("{") :])["rows"]}
    assert rows["teacher reference"]["rmse"] == 0 and rows["teacher reference"]["psnr"] == float("inf")
    assert rows["DSNO"]["rmse"] > 0 and np.isfinite(rows["DSNO"]["psnr"])
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "text-conditioned: pass --prompt" in r.output
