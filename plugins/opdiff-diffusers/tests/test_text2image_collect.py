"""Collecting guided latent trajectories from prompts (`opdiff collect --prompts`) with the tiny text-to-image
pipeline: the embedding table is stored once per distinct prompt, each trajectory refers to its row and records W,
and the stored trajectories equal a guided solve written out here on the per-seed noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from text2image_doubles import register, write_tiny_pipeline
from typer.testing import CliRunner

from operator_diffusion.backbones import load_backbone
from operator_diffusion.collection import collect
from operator_diffusion.collection_plan import CollectConfig, plan_collection
from operator_diffusion.collection_store import iter_shards, read_info
from operator_diffusion.prompts import PROMPTS_FILE, PromptTable
from operator_diffusion.schedules import time_grid
from operator_diffusion.solvers import solve

PROMPTS = ("a cat", "a dog", "a cat", "do a cat")  # a repeated line: three distinct prompts
NEGATIVE = "a dog"
W = 3.0
COLLECT = dict(num=6, steps=6, times=3, shard_size=4, batch_size=3, dtype="float32", seed=10)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    register()
    folder = write_tiny_pipeline(tmp_path_factory.mktemp("t2i") / "pipe")
    return load_backbone("diffusers-text2image", pretrained=str(folder)).eval()


@pytest.fixture(scope="module")
def collected(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("collect") / "data"
    cfg = CollectConfig(**COLLECT, prompts=PROMPTS, negative_prompt=NEGATIVE, guidance=W)
    collect(teacher, out, cfg, process_index=0, num_processes=1, device="cpu")
    return out


def fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def test_the_embedding_table_holds_each_distinct_prompt_once(teacher, collected):
    from diffusers import StableDiffusionPipeline

    table = PromptTable.load(collected / PROMPTS_FILE, read_info(collected)["collection"]["prompts"]["sha256"])
    assert table.prompts == ("a cat", "a dog", "do a cat")
    ((name, emb),) = table.embeddings.items()
    assert name == "encoder_hidden_states" and emb.dtype == torch.float16 and emb.shape[0] == 3
    pipe = StableDiffusionPipeline.from_pretrained(
        str(teacher.config()["pretrained"]), safety_checker=None, requires_safety_checker=False
    )
    for row, prompt in enumerate(table.prompts):
        ref, neg = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=NEGATIVE)
        assert torch.equal(emb[row], ref[0].to(torch.float16))
        assert torch.equal(table.null["encoder_hidden_states"], neg[0].to(torch.float16))
    rows = np.concatenate([s["prompt"] for s in iter_shards(collected)])
    line_of = [PROMPTS[k % len(PROMPTS)] for k in range(COLLECT["num"])]  # example k: line k mod L
    assert [table.prompts[r] for r in rows] == line_of
    shard = next(iter_shards(collected))
    assert set(shard) == {"trajectory", "seed", "prompt", "guidance"}  # no embedding per trajectory
    assert np.all(np.concatenate([s["guidance"] for s in iter_shards(collected)]) == np.float32(W))
    info = read_info(collected)["collection"]
    assert info["guidance"] == W and info["prompts"]["negative_prompt"] == NEGATIVE


def test_stored_latent_trajectories_equal_a_direct_guided_solve(teacher, collected):
    ident = read_info(collected)["collection"]
    table = PromptTable.load(collected / PROMPTS_FILE)
    n = 1000
    unet = teacher.network
    null = table.null["encoder_hidden_states"].float()

    def guided_eps(x, t, emb):  # ε̃ = ε_∅ + W (ε_c − ε_∅), two separate UNet calls at DDPM step tN − 1
        steps = (t * n - 1).float()
        e_c = unet(x, steps, encoder_hidden_states=emb).sample
        e_u = unet(x, steps, encoder_hidden_states=null.expand_as(emb)).sample
        return e_u + W * (e_c - e_u)

    ts = time_grid(teacher.schedule, ident["steps"], ident["grid"])
    stored = np.concatenate([s["trajectory"] for s in iter_shards(collected)])
    seeds = np.concatenate([s["seed"] for s in iter_shards(collected)])
    for k in range(COLLECT["num"]):
        seed = COLLECT["seed"] + k
        assert seeds[k] == seed
        x_T = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(seed))[None]  # the noise rule
        emb = table.embeddings["encoder_hidden_states"][[table.prompts.index(PROMPTS[k % len(PROMPTS)])]].float()
        with torch.no_grad():
            ref = solve(
                lambda x, t: guided_eps(x, t, emb),
                x_T,
                teacher.schedule,
                ts,
                ident["solver"],
                record=ident["output_indices"],
                record_denoised=True,
                **ident["solver_options"],
            ).denoised[0]
        torch.testing.assert_close(torch.from_numpy(stored[k]), ref, rtol=1e-4, atol=1e-5)


def test_a_different_prompt_list_is_another_collection(teacher, collected):
    from operator_diffusion.collection_store import CollectionMismatchError, check_output_dir

    plan = plan_collection(teacher, CollectConfig(**COLLECT, prompts=PROMPTS[:2], negative_prompt=NEGATIVE, guidance=W))
    with pytest.raises(CollectionMismatchError, match="prompts"):
        check_output_dir(collected, plan)


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(guidance=-1.0, prompts=("a cat",)), "guidance -1.0 is below 0"),
        (dict(), "is text-conditioned: pass the prompts"),
        (dict(prompts=("a cat",), labels=2), "not class labels: drop --labels"),
    ],
)
def test_bad_prompt_collections_are_refused(teacher, extra, message):
    with pytest.raises(ValueError, match=message):
        plan_collection(teacher, CollectConfig(**COLLECT, **extra))


def test_prompts_on_a_teacher_without_text_encoder_are_refused():
    teacher = load_backbone("opdiff-unet", preset="tiny", in_channels=1)
    with pytest.raises(ValueError, match="takes no text prompts"):
        plan_collection(teacher, CollectConfig(**COLLECT, prompts=("a cat",)))


def test_cli_collect_with_a_prompt_file(teacher, tmp_path):
    from opdiff_cli.main import app

    pipe = teacher.config()["pretrained"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    base = ["collect", "--backbone", "diffusers-text2image", "-o", f"pretrained={pipe}", "--num", "2", "--steps", "4"]
    base += ["--times", "2", "--device", "cpu"]
    runner = CliRunner()
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--prompts", str(empty)])
    assert r.exit_code == 2 and "holds no prompts" in r.output and not (tmp_path / "bad").exists()
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "neg"), "--prompts", str(prompts), "--guidance", "-2"])
    assert r.exit_code == 2 and "below 0" in r.output and not (tmp_path / "neg").exists()
    r = runner.invoke(
        app,
        [*base, "--out", str(tmp_path / "ok"), "--prompts", str(prompts), "--guidance", "2", "--negative-prompt", "x"],
    )
    assert r.exit_code == 0, r.output
    ident = json.loads((tmp_path / "ok" / "opdiff_collection.json").read_text())["collection"]
    assert ident["prompts"]["num_distinct"] == 2 and ident["prompts"]["negative_prompt"] == "x"
    r = runner.invoke(app, ["data", "info", str(tmp_path / "ok")])
    assert r.exit_code == 0 and "2 distinct of 2 lines" in r.output
