"""The DSNO adapter: temporal layers injected into a backbone by hooks.

References: the plain backbone evaluated item by item (zero-init DSNO is exactly the teacher network),
an independent re-implementation of one temporal layer written here with an explicit DFT matrix,
batch independence and permutation equivariance (the temporal layers only mix the M frames of one example),
and safetensors round trips.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from operator_diffusion.adapter import DSNO, check_times
from operator_diffusion.backbones.unet import ResBlock

from conftest import tiny

TIMES = [0.75, 0.5, 0.25, 1e-3]


def per_time_reference(bb, x, times, labels=None):
    """(B, M, C, H, W) from M separate backbone calls: the teacher network at (x_T, t_i)."""
    b = x.shape[0]
    return torch.stack([bb(x, torch.full((b,), float(t)), labels) for t in times], dim=1)


def small_dsno(bb, **kw) -> DSNO:
    model = DSNO(bb, TIMES, modes=2, init="small", **kw)
    with torch.no_grad():  # weights large enough that every layer visibly changes the output
        for p in model.temporal.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return model


@torch.no_grad()
def test_zero_init_is_the_teacher_network_item_by_item():
    bb = tiny()
    model = DSNO(bb, TIMES, modes=2, init="zero")
    x = torch.randn(3, *bb.image_shape)
    out = model(x)
    assert out.shape == (3, 4, *bb.image_shape)
    torch.testing.assert_close(out, per_time_reference(bb, x, TIMES), rtol=1e-5, atol=1e-5)
    # query times other than the training grid: still the teacher network at those times
    q = [0.9, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 1e-3]
    torch.testing.assert_close(model(x, times=q), per_time_reference(bb, x, q), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_hooks_are_inert_outside_forward_and_state_dict_keys_are_the_teachers(tmp_path):
    bb = tiny()
    x, t = torch.randn(2, *bb.image_shape), torch.full((2,), 0.3)
    before = bb(x, t)
    model = small_dsno(bb)
    torch.testing.assert_close(bb(x, t), before, rtol=0, atol=0)  # the teacher is unchanged by the injection
    net_keys = {k[len("network.") :] for k in model.state_dict() if k.startswith("network.")}
    assert net_keys == set(bb.network.state_dict())
    assert {k.split(".")[0] for k in model.state_dict()} == {"network", "temporal"}
    # a teacher checkpoint loads into the DSNO backbone with no missing or unexpected keys
    teacher = tiny(seed=5)
    teacher.save_weights(tmp_path / "teacher.safetensors")
    bb.load_weights(tmp_path / "teacher.safetensors", strict=True)
    torch.testing.assert_close(model.network.state_dict(), teacher.network.state_dict(), rtol=0, atol=0)


def dft_temporal_layer(u: torch.Tensor, weight: torch.Tensor, n_modes: int, slope: float) -> torch.Tensor:
    """Independent T u = u + LeakyReLU(K u) on (B, M, C, H, W) in float64 with an explicit DFT matrix:
    û_j = (1/M) Σ_k u_k e^{-2πijk/M} for j < J; (K u)_k = Re Σ_j c_j e^{2πijk/M} (R_j^T û_j),
    c_0 = 1, c_j = 2 for the other kept modes (they stand for ±j; none is the Nyquist mode here)."""
    m = u.shape[1]
    k = torch.arange(m, dtype=torch.float64)
    j = torch.arange(n_modes, dtype=torch.float64)
    fwd = torch.exp(-2j * math.pi * j[:, None] * k[None, :] / m) / m  # (J, M)
    u_hat = torch.einsum("jk,bkchw->bjchw", fwd, u.double().to(torch.complex128))
    r = torch.view_as_complex(weight.double().contiguous())[:n_modes]  # (J, Cin, Cout)
    y_hat = torch.einsum("bjchw,jcd->bjdhw", u_hat, r)
    coef = torch.where(j == 0, 1.0, 2.0).to(torch.complex128)
    inv = coef[None, :] * torch.exp(2j * math.pi * k[:, None] * j[None, :] / m)  # (M, J)
    ku = torch.einsum("kj,bjdhw->bkdhw", inv, y_hat).real
    return u.double() + torch.nn.functional.leaky_relu(ku, slope)


@torch.no_grad()
def test_injected_layer_matches_an_independent_implementation():
    bb = tiny()
    point = "down.1.res.0"
    model = small_dsno(bb, placement=[point])
    x = torch.randn(2, *bb.image_shape)
    module = dict(bb.network.named_modules())[point]
    weight = model.temporal["down__1__res__0"].conv.weight

    def replace(mod, args, output):  # the same position, the reference layer instead of the adapter's
        n, c, h, w = output.shape
        return dft_temporal_layer(output.reshape(n // 4, 4, c, h, w), weight, 2, 0.01).float().reshape(n, c, h, w)

    expected = None
    model_out = model(x)
    handle = module.register_forward_hook(replace)
    try:
        m = len(TIMES)
        expected = bb(x.repeat_interleave(m, 0), torch.tensor(TIMES).repeat(2)).reshape(2, m, *bb.image_shape)
    finally:
        handle.remove()
    torch.testing.assert_close(model_out, expected, rtol=1e-4, atol=1e-5)
    assert (model_out - per_time_reference(bb, x, TIMES)).abs().max() > 1e-2  # the layer does something


@torch.no_grad()
def test_examples_do_not_mix_and_labels_follow_their_example():
    bb = tiny(num_classes=3)
    model = small_dsno(bb)
    x, labels = torch.randn(4, *bb.image_shape), torch.tensor([0, 2, 1, 3])  # 3 = null label
    out = model(x, labels)
    for b in range(4):  # batch independence
        torch.testing.assert_close(out[b], model(x[b : b + 1], labels[b : b + 1])[0], rtol=1e-5, atol=1e-5)
    perm = torch.tensor([2, 0, 3, 1])  # permutation equivariance
    torch.testing.assert_close(model(x[perm], labels[perm]), out[perm], rtol=1e-5, atol=1e-5)
    # frames of one example are mixed: changing the labels changes every frame, not only one
    other = model(x, torch.tensor([1, 2, 1, 3]))
    assert ((other[0] - out[0]).flatten(1).abs().amax(1) > 0).all()


@torch.no_grad()
def test_query_times_and_training_times_agree():
    bb = tiny()
    model = small_dsno(bb)
    x = torch.randn(2, *bb.image_shape)
    torch.testing.assert_close(model(x, times=TIMES), model(x), rtol=0, atol=0)
    q = torch.linspace(0.9, 1e-3, 8)
    assert model(x, times=q).shape == (2, 8, *bb.image_shape)
    torch.testing.assert_close(model.sample(x), model(x)[:, -1], rtol=0, atol=0)


def test_one_step_baseline_has_no_temporal_layers():
    bb = tiny()
    model = DSNO(bb, TIMES, baseline=True)
    assert len(model.temporal) == 0 and model.parameter_report()["temporal_parameters"] == 0
    x = torch.randn(2, *bb.image_shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 1, *bb.image_shape)
    torch.testing.assert_close(out[:, 0], bb(x, torch.full((2,), TIMES[-1])), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="single output time"):
        model(x, times=[0.5, 0.1])


def test_parameter_overhead_is_4C2_per_layer_for_two_modes():
    bb = tiny()
    model = DSNO(bb, TIMES, modes=2)
    report = model.parameter_report()
    channels = {name: mod.conv0.out_channels for name, mod in bb.network.named_modules() if isinstance(mod, ResBlock)}
    channels["mid"] = channels["mid.res.1"]
    expected = sum(4 * channels[n] ** 2 for n in bb.default_injection_points)  # J=2 complex C×C = 4C² reals
    assert report["temporal_parameters"] == expected
    assert [r["name"] for r in report["injection_points"]] == bb.default_injection_points
    assert report["backbone_parameters"] == bb.num_parameters()
    assert report["overhead"] == pytest.approx(expected / bb.num_parameters())


def forward_order(bb, names):
    """Names in the order a forward pass calls them (recorded by plain hooks)."""
    calls, modules = [], dict(bb.network.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: calls.append(n)) for n in names]
    with torch.no_grad():
        bb(torch.zeros(1, *bb.image_shape), torch.full((1,), 0.5))
    for h in handles:
        h.remove()
    return calls


def test_placement_by_type_and_pattern_in_forward_order():
    bb = tiny()
    resblocks = [n for n, m in bb.network.named_modules() if isinstance(m, ResBlock)]
    by_type = DSNO(bb, TIMES, placement=[ResBlock])
    assert [p.name for p in by_type.injection_points] == forward_order(bb, resblocks)
    by_glob = DSNO(bb, TIMES, placement=["up.*.res.*"])
    ups = [n for n in resblocks if n.startswith("up.")]
    assert [p.name for p in by_glob.injection_points] == forward_order(bb, ups)
    assert forward_order(bb, ups) != ups  # up levels run in reverse order of their names: the order is real


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(times=[0.5]), "at least 2 output times"),
        (dict(times=[0.25, 0.5, 0.75]), "strictly decreasing"),
        (dict(times=[2.0, 0.5]), "outside"),
        (dict(times=TIMES, modes=4), r"1 <= modes <= 3"),
        (dict(times=TIMES, modes=0), r"1 <= modes <= 3"),
        (dict(times=TIMES, placement=["down.0.rez.0"]), "matches no module.*down.0.res.0"),
        (dict(times=TIMES, placement=["down.*.attn"]), "matches no module"),
        (dict(times=TIMES, placement=["down.0", "down.0.res.0"]), "inside other injection points"),
        (dict(times=TIMES, placement=["down.0.res"]), "never called"),
    ],
)
def test_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSNO(tiny(), **kwargs)


class _PairOut(torch.nn.Module):
    """Returns (h, h), like a diffusers down block returning (h, skips)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, emb):
        h = self.block(x, emb)
        return h, h


class _FirstOfPair(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.pair = _PairOut(block)

    def forward(self, x, emb):
        return self.pair(x, emb)[0]


def test_modules_not_returning_one_feature_map_are_refused():
    bb = tiny()
    bb.network.mid = _FirstOfPair(bb.network.mid)
    with pytest.raises(ValueError, match=r"mid.pair.*returns tuple, not one \(N, C, H, W\) tensor"):
        DSNO(bb, TIMES, placement=["mid.pair"])
    with pytest.raises(ValueError, match=r"time_mlp.*returns \(1, \d+\)"):
        DSNO(bb, TIMES, placement=["time_mlp"])
    assert [p.name for p in DSNO(bb, TIMES, placement=["mid.pair.block"]).injection_points] == ["mid.pair.block"]


def test_query_with_too_few_times_is_refused():
    model = DSNO(tiny(), TIMES, modes=3)
    with pytest.raises(ValueError, match="query at least 4 times"):
        model(torch.randn(1, 3, 8, 8), times=[0.5, 0.1])


def test_save_load_round_trip(tmp_path):
    bb = tiny(num_classes=2)
    model = small_dsno(bb).eval()
    model.save(tmp_path / "dsno.safetensors")
    loaded = DSNO.load(tmp_path / "dsno.safetensors").eval()
    assert loaded.config() == model.config()
    x, y = torch.randn(2, *bb.image_shape), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y), model(x, y), rtol=0, atol=0)
    bb.save_weights(tmp_path / "teacher.safetensors")
    with pytest.raises(ValueError, match="not a DSNO checkpoint"):
        DSNO.load(tmp_path / "teacher.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="safetensors"):
        DSNO.load(tmp_path / "junk.safetensors")


def test_deepcopy_binds_the_copy_to_its_own_temporal_layers():
    model = small_dsno(tiny())
    ema = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(ema(x), ref, rtol=0, atol=0)
        for p in ema.temporal.parameters():
            p.zero_()
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # the original is untouched
        torch.testing.assert_close(ema(x), per_time_reference(ema.backbone, x, TIMES), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_forward_and_backward():
    model = small_dsno(tiny()).train()
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == x.dtype  # the backbone returns its input's dtype
    out.float().square().mean().backward()
    grads = [p.grad for p in model.temporal.parameters()] + [model.network.stem.weight.grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():  # bf16 agrees with float32 to bf16 precision
        ref = model(x)
    err = (out.detach() - ref).abs().max()
    assert 0 < err < 0.05 * ref.abs().max()  # bf16 ran (not bit-equal) and agrees to bf16 precision


def test_check_times_accepts_the_schedule_range():
    bb = tiny()
    t = check_times([bb.schedule.t_max, bb.schedule.t_min], bb)
    assert t.dtype == torch.float64 and t.tolist() == [bb.schedule.t_max, bb.schedule.t_min]


# --------------------------------------------------------------------------------------------------
# Frame pruning: after the last temporal layer a sample needs only its requested frames
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def items_seen(*modules: torch.nn.Module):
    """Yields one list per module: the batch sizes it is called on inside the block (forward pre-hooks)."""
    seen: list[list[int]] = [[] for _ in modules]
    handles = [
        m.register_forward_pre_hook(lambda m, args, s=s: s.append(args[0].shape[0])) for m, s in zip(modules, seen)
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("placement", [None, "through-mid", "through-up1", ["down.1.res.0.attn"]])
@pytest.mark.parametrize("frames", [[-1], [0, 2], [3, 1]])
@torch.no_grad()
def test_frame_pruning_gives_the_full_forward_frames_in_float64(placement, frames):
    """The reference is the unpruned forward pass (every frame to the end), in float64 so that the only possible
    difference is arithmetic order; the network after the cut really runs on B·K items."""
    bb = tiny(num_classes=3)
    bb.network.double()
    model = small_dsno(bb, placement=placement).double().eval()
    x = torch.randn(5, *bb.image_shape, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1])  # 3 is the null label
    full = model(x, labels)
    with items_seen(bb.network.out_conv) as (out_conv,):
        pruned = model(x, labels, frames=frames)
    assert pruned.shape == (5, len(frames), *bb.image_shape)
    torch.testing.assert_close(pruned, full[:, frames], rtol=1e-12, atol=1e-12)
    assert out_conv == [5 * len(frames)]
    assert model.cut_point is not None


def test_placement_presets_end_the_temporal_layers_where_they_say():
    """tiny: two levels of one ResBlock (two on the way up), attention at 4×4. ``through-mid`` is the encoder and
    the mid block, ``through-up1`` adds the 4×4 up level; the cut follows the last temporal layer."""
    bb = tiny()
    encoder = ["down.0.res.0", "down.1.res.0", "mid"]
    expected = {
        None: (encoder + ["up.1.res.0", "up.1.res.1", "up.0.res.0", "up.0.res.1"], "up.0.res.1"),
        "full": (encoder + ["up.1.res.0", "up.1.res.1", "up.0.res.0", "up.0.res.1"], "up.0.res.1"),
        "through-mid": (encoder, "mid"),
        "through-up1": (encoder + ["up.1.res.0", "up.1.res.1"], "up.1.res.1"),
        # inside a block: the cut is after the block that contains it
        ("down.1.res.0.attn",): (["down.1.res.0.attn"], "down.1.res.0"),
    }
    for placement, (names, cut) in expected.items():
        model = DSNO(bb, TIMES, placement=list(placement) if isinstance(placement, tuple) else placement)
        assert [p.name for p in model.injection_points] == names
        assert model.cut_point == cut
        assert model.parameter_report()["frame_cut_point"] == cut
    # the config records the names, so a saved model rebuilds the same placement
    assert DSNO(bb, TIMES, placement="through-mid").config()["placement"] == encoder


@torch.no_grad()
def test_through_mid_runs_the_whole_decoder_on_the_sample_frame_only():
    bb = tiny()
    model = small_dsno(bb, placement="through-mid").eval()
    x = torch.randn(3, *bb.image_shape)
    with items_seen(bb.network.mid, bb.network.up[1].res[0]) as (mid, up):
        sample = model.sample(x)
    assert mid == [3 * 4] and up == [3]
    torch.testing.assert_close(sample, model(x)[:, -1], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_a_backbone_without_cut_points_selects_the_frames_after_a_full_pass():
    from operator_diffusion.backbones.unet import OpdiffUNetBackbone

    class NoCuts(OpdiffUNetBackbone):
        item_cut_points = []  # what a plugin that declares none gets from the base class

    torch.manual_seed(0)
    bb = NoCuts(preset="tiny")
    for p in bb.network.parameters():
        p.add_(0.05 * torch.randn_like(p))
    model = small_dsno(bb).eval()
    assert model.cut_point is None
    x = torch.randn(2, *bb.image_shape)
    with items_seen(bb.network.out_conv) as (out_conv,):
        torch.testing.assert_close(model(x, frames=[1, 3]), model(x)[:, [1, 3]], rtol=0, atol=0)
    assert out_conv == [8, 8]  # every frame ran to the end both times


@pytest.mark.parametrize(
    "frames, error, match",
    [
        ([4], ValueError, "frame index 4 is out of range for 4 output times"),
        ([-5], ValueError, "out of range"),
        ([], ValueError, "frames is empty"),
        ([1, -3], ValueError, "repeat an output time"),
        ([0.5], TypeError, "integer indices"),
        ([True], TypeError, "integer indices"),
    ],
)
def test_bad_frames_are_refused(frames, error, match):
    model = DSNO(tiny(), TIMES)
    with pytest.raises(error, match=match):
        model(torch.randn(1, *model.backbone.image_shape), frames=frames)


def test_an_unknown_preset_names_the_presets():
    with pytest.raises(ValueError, match="placement presets: full, through-mid, through-up1"):
        DSNO(tiny(), TIMES, placement="through-middle")


# ------------------------------------------------------------------------------------------------------
# Per-frame output preconditioning (output_skip, issue 14's warm-start lever)
# ------------------------------------------------------------------------------------------------------
def test_fit_output_skip_is_least_squares_with_an_intercept():
    """Reference: numpy's polyfit of each frame's targets on the noise, element by element, and the RMS of the
    residual without the intercept (which the network has to produce)."""
    import numpy as np

    from operator_diffusion.adapter import fit_output_skip

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64)
    slopes, offsets = [0.1, 0.3, -0.5], [0.2, -0.7, 0.0]
    y = torch.stack(
        [a * x + b + 0.4 * torch.randn(x.shape, generator=g, dtype=torch.float64) for a, b in zip(slopes, offsets)],
        dim=1,
    )
    table = fit_output_skip(x, y)
    assert table.shape == (3, 2) and table.dtype == torch.float64
    for i in range(3):
        slope, _ = np.polyfit(x.numpy().ravel(), y[:, i].numpy().ravel(), 1)
        rms = np.sqrt(np.mean((y[:, i].numpy() - slope * x.numpy()) ** 2))
        assert table[i, 0].item() == pytest.approx(slope, rel=1e-10)
        assert table[i, 1].item() == pytest.approx(rms, rel=1e-10)
    with pytest.raises(ValueError, match=r"\(N, M, C, H, W\)"):
        fit_output_skip(x, y[:, 0])


def test_output_skip_at_interpolates_in_log_snr_and_holds_beyond_the_ends():
    from operator_diffusion.adapter import output_skip_at

    table = torch.tensor([[0.1, 1.0], [0.3, 0.5], [0.2, 0.4]], dtype=torch.float64)
    snr = torch.tensor([-2.0, 1.0, 4.0], dtype=torch.float64)  # any order: sorted inside
    q = torch.tensor([1.0, -0.5, 2.5, -9.0, 9.0, 4.0], dtype=torch.float64)
    want = torch.tensor(
        [[0.3, 0.5], [0.2, 0.75], [0.25, 0.45], [0.1, 1.0], [0.2, 0.4], [0.2, 0.4]], dtype=torch.float64
    )
    torch.testing.assert_close(output_skip_at(table, snr, q), want, rtol=1e-12, atol=1e-12)
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(output_skip_at(table[perm], snr[perm], q), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("placement", [None, "through-mid"])
@torch.no_grad()
def test_output_skip_is_c_skip_x_T_plus_c_out_times_the_raw_output(placement, tmp_path):
    """Reference: the same network without the skip (its raw output F), combined by hand in float64; pruned frames,
    the training times given as query times, and a safetensors round trip give the same numbers."""
    bb = tiny(num_classes=3)
    bb.network.double()
    raw = small_dsno(bb, placement=placement).double().eval()
    table = [[0.1, 0.9], [0.2, 0.7], [0.25, 0.6], [0.3, 0.5]]
    model = copy.deepcopy(raw)
    model.output_skip = DSNO.check_output_skip(table, 4)
    x = torch.randn(3, *bb.image_shape, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    c = torch.tensor(table, dtype=torch.float64)
    want = c[None, :, 0, None, None, None] * x[:, None] + c[None, :, 1, None, None, None] * raw(x, labels)
    torch.testing.assert_close(model(x, labels), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x, labels, frames=[3, 1]), want[:, [3, 1]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.sample(x, labels), want[:, -1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x, labels, times=TIMES), want, rtol=1e-12, atol=1e-12)
    model.float().save(tmp_path / "skip.safetensors")
    loaded = DSNO.load(tmp_path / "skip.safetensors").eval()
    assert loaded.config()["output_skip"] == table
    assert "output_skip" not in raw.config()  # models without the option keep their config
    xf = x.float()
    torch.testing.assert_close(loaded(xf, labels), model(xf, labels), rtol=0, atol=0)


@pytest.mark.parametrize(
    "table, match",
    [
        ([[0.1, 1.0]] * 3, r"shape \(4, 2\)"),
        ([[0.1, 1.0]] * 3 + [[0.2, 0.0]], "c_out > 0"),
        ([[float("nan"), 1]] * 4, "finite"),
    ],
)
def test_bad_output_skip_is_refused(table, match):
    with pytest.raises(ValueError, match=match):
        DSNO(tiny(), TIMES, output_skip=table)
