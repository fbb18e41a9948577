"""``--compile`` (``operator_diffusion.compilation``): a compiled call gives the eager call's numbers (to float
round-off), a compiler that fails falls back to the eager call with one warning, an error of the function itself
is not mistaken for a compiler failure, and `opdiff collect` / `opdiff sample` run their networks through it."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion import collection_store, compilation
from operator_diffusion.compilation import Compiled, compiled

runner = CliRunner()
TINY = ["--backbone", "opdiff-unet", "--backbone-config", "preset=tiny"]


def failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler here\nand a second line")


class Counting(torch.nn.Module):
    """A small network that counts its Python-level calls (a compiled graph does not re-enter ``forward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.nn.functional.silu(self.conv(x)).mean(dim=1)


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="inductor needs a C++ compiler on the CPU"
)
def test_inductor_gives_the_eager_numbers():
    torch.manual_seed(0)
    net = Counting().double()  # the eager float64 call is the reference
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    reference = net(x)
    fn = Compiled(net, "a test network")
    with torch.inference_mode():
        out = fn(x)
    assert fn.fallback is None, fn.fallback
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)


def test_a_failing_compiler_falls_back_to_the_eager_call_with_one_warning():
    torch.manual_seed(0)
    net = Counting()
    x = torch.randn(2, 2, 5, 5)
    fn = Compiled(net, "the teacher network", backend=failing_backend)
    with pytest.warns(UserWarning, match=r"compiling the teacher network failed \(.*no C\+\+ compiler here\)"):
        out = fn(x)
    assert fn.fallback is not None and "second line" not in fn.fallback
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    calls = net.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: later calls run eagerly straight away
        torch.testing.assert_close(fn(x), net(x), rtol=0, atol=0)
    assert net.calls == calls + 2


def test_an_error_of_the_function_itself_propagates_unchanged():
    def bad(x):
        raise ValueError("wrong shape: expected (B, 1, 8, 8)")

    fn = Compiled(bad, "DSNO", backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="wrong shape"):
            fn(torch.zeros(1))
    assert fn.fallback is None


def test_disabled_is_the_function_itself():
    f = lambda x: x  # noqa: E731
    assert compiled(f, False, "f") is f and isinstance(compiled(f, True, "f"), Compiled)


@pytest.fixture
def aot_eager(monkeypatch):
    """The CLI paths through dynamo and AOTAutograd without a C++ build (inductor is tested above)."""
    monkeypatch.setattr(compilation, "BACKEND", "aot_eager")


def test_collect_compile_writes_the_same_collection(tmp_path, aot_eager):
    run = [*TINY, "--steps", "10", "--num", "4", "--shard-size", "4", "--batch-size", "4"]
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        res = runner.invoke(app, ["collect", *run, *flags, "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    eager, comp = ([s["trajectory"] for s in collection_store.iter_shards(tmp_path / n)] for n in ("eager", "compiled"))
    info = {n: collection_store.read_info(tmp_path / n)["collection"] for n in ("eager", "compiled")}
    assert info["eager"] == info["compiled"]  # compiling is not part of the identity
    a, b = (np.concatenate(t).astype(np.float32) for t in (eager, comp))
    np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3)  # float16 storage: about one ulp
    for name, expected in (("eager", False), ("compiled", True)):
        (shard,) = (tmp_path / name / "data").glob("*.parquet")
        provenance = json.loads(pq.read_schema(shard).metadata[b"opdiff"])
        assert provenance["compiled"] is expected


def test_sample_compile_gives_the_eager_samples(tiny_run, tmp_path, aot_eager):
    args = ["sample", str(tiny_run["run"]), "--seeds", "100-105", "--format", "npz"]
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        res = runner.invoke(app, [*args, *flags, "--out", str(tmp_path / name)])
        assert res.exit_code == 0 and "--compile:" not in res.output, res.output  # compiled, no fallback
    a, b = (np.load(tmp_path / n / "samples.npz")["images"].astype(int) for n in ("eager", "compiled"))
    assert np.abs(a - b).max() <= 1  # uint8 images: round-off may move a pixel across a level
