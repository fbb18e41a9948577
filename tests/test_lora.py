"""LoRA through peft (``opdiff train --lora-rank``): adapters that start as the identity, merge into W + B·A by
the textbook formula (written out here), and a trained run whose weights differ from the teacher's only by
rank-R updates of the adapted layers, with everything else bitwise the teacher's; exact resume."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion.adapter import DSNO
from operator_diffusion.finetune import add_lora, lora_targets, merge_lora
from operator_diffusion.training import TrainConfig, load_run, plan_run, reset_accelerate_state, train

from conftest import tiny

pytest.importorskip("peft")

TIMES = [0.75, 0.5, 0.25, 1e-3]


@pytest.fixture(autouse=True)
def reset_accelerate():
    yield
    reset_accelerate_state()


def lora_delta(module) -> torch.Tensor:
    """(α/R)·B·A of one peft LoRA layer in the base weight's shape, from the adapter weights alone: a Linear's
    B (out, R) @ A (R, in); a Conv2d's 1×1 B (out, R) applied to A's (R, in, k, k) kernel."""
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    scale = module.scaling["default"]
    if a.ndim == 2:
        return scale * b @ a
    return scale * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)


@torch.no_grad()
def test_lora_starts_as_the_plain_model_and_merges_to_w_plus_ba():
    bb = tiny(num_classes=2)
    bb.network.double()
    model = DSNO(bb, TIMES, modes=2, init="small").double().eval()
    for p in model.temporal.parameters():
        p.copy_(0.3 * torch.randn_like(p))
    plain = copy.deepcopy(model)
    x, y = torch.randn(3, *bb.image_shape, dtype=torch.float64), torch.tensor([0, 1, 1])
    names = add_lora(model, rank=2, targets="*attn*,*conv0")
    assert names == lora_targets(plain.network, "*attn*,*conv0") and any("attn" in n for n in names)
    torch.testing.assert_close(model(x, y), plain(x, y), rtol=0, atol=0)  # B = 0: the teacher's DSNO
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.copy_(0.1 * torch.randn_like(p))
    unmerged = model(x, y)
    assert not torch.allclose(unmerged, plain(x, y))
    layers = dict(model.network.named_modules())
    want = {f"network.{n}.weight": layers[n].get_base_layer().weight + lora_delta(layers[n]) for n in names}
    assert merge_lora(model.network) == len(names)
    state = model.state_dict()
    assert state.keys() == plain.state_dict().keys()  # the plain layout again
    for k, w in want.items():
        torch.testing.assert_close(state[k], w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x, y), unmerged, rtol=1e-10, atol=1e-10)


def lora_config(tiny_run, out, **kw) -> TrainConfig:
    base = dict(data=str(tiny_run["data"]), out=str(out), batch_size=8, max_steps=4, save_every=2, warmup=1)
    return TrainConfig(**{**base, "lr": 1e-2, "lora_rank": 1, "backbone_options": {"dropout": 0.0}, **kw})


def test_a_lora_run_changes_the_teacher_by_rank_r_updates_only(tiny_run, tmp_path):
    """Every adapted weight of the export minus the teacher's has rank ≤ R (its second singular value vanishes);
    every other backbone tensor (biases, norms, unadapted layers) is bitwise the teacher's; the temporal layers
    train; the export loads as a plain DSNO."""
    out = tmp_path / "run"
    plan = plan_run(lora_config(tiny_run, out, lora_targets="*conv*,*emb_proj"))
    adapted = {f"network.{n}.weight" for n in lora_targets(load_run(tiny_run["run"])[0].network, "*conv*,*emb_proj")}
    train(plan.config, plan=plan)
    teacher = load_file(tiny_run["teacher"])
    state = load_file(out / "model.safetensors")
    assert {k for k in state if k.startswith("network.")} == {f"network.{k}" for k in teacher}
    checked = 0
    for k, w in teacher.items():
        key = f"network.{k}"
        if key in adapted:
            s = torch.linalg.svdvals((state[key] - w).double().flatten(1))
            assert s[0] > 1e-6, key  # the adapter trained
            if len(s) > 1:  # (a 1-channel output layer is rank 1 whatever happens)
                assert s[1] <= 1e-6 * s[0], (key, s[:3])
                checked += 1
        else:
            assert torch.equal(state[key], w), key
    assert checked >= len(adapted) - 1
    temporal = [k for k in state if k.startswith("temporal.")]
    assert temporal and any(state[k].abs().max() > 0 for k in temporal)  # zero-initialised, then trained
    model, info = load_run(out)
    assert info["train"]["lora_rank"] == 1 and isinstance(model, DSNO)
    trainable = sum(p.numel() for n, p in plan.model.named_parameters() if ".lora_" in n or n.startswith("temporal."))
    assert info["parameters"]["trainable_parameters"] == trainable


def test_a_lora_run_resumes_exactly(tiny_run, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(lora_config(tiny_run, whole))
    train(lora_config(tiny_run, cut, max_steps=2))
    reset_accelerate_state()
    train(lora_config(tiny_run, cut))
    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_settings_are_checked(tiny_run, tmp_path, monkeypatch):
    for kw, match in [
        (dict(lora_rank=0), r"lora_rank \(--lora-rank\) must be an integer >= 1"),
        (dict(lora_rank=True), "must be an integer"),
        (dict(lora_targets="*attn*"), "pass --lora-rank too"),
    ]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(data="d", out="o", **kw)
    with pytest.raises(ValueError, match="'nothing.here' matches no Linear or Conv2d"):
        plan_run(lora_config(tiny_run, tmp_path / "a", lora_targets="*attn*,nothing.here"))
    args = [
        "train",
        "--data",
        str(tiny_run["data"]),
        "--out",
        str(tmp_path / "b"),
        "--lora-rank",
        "2",
        "--batch-size",
        "8",
        "--dry-run",
    ]
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--lora-rank needs peft" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_lora_targets_are_the_linear_and_conv_layers():
    net = tiny().network
    names = lora_targets(net, None)
    assert names == [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
