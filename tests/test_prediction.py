"""Tests for operator_diffusion.prediction.

The reference is the forward process itself: x_t = α_t x_0 + σ_t ε is built from known x_0 and ε, so the
true ε, x_0 and v = α_t ε − σ_t x_0 are all known exactly; and classifier-free guidance is checked
against two separate calls of the unguided function.
"""

import pytest
import torch

from operator_diffusion.prediction import (
    PREDICTION_TYPES,
    classifier_free_guidance,
    denoised_from_eps,
    eps_fn_from_model,
    eps_from_prediction,
)
from operator_diffusion.schedules import EDM, DiscreteVP, VPCosine, VPLinear

F64 = torch.float64

VP_SCHEDULES = {
    "vp-linear": VPLinear(),
    "vp-cosine": VPCosine(),
    "discrete": DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64)),
}
ALL_SCHEDULES = {**VP_SCHEDULES, "edm": EDM()}


def _col(c, x):
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


def _problem(s, shape=(3, 2), b=6, seed=0):
    """Known x0, ε at times spanning [t_min, t_max], and x_t = α x0 + σ ε (all float64)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *shape, dtype=F64, generator=g)
    eps = torch.randn(b, *shape, dtype=F64, generator=g)
    t = torch.linspace(s.t_min, s.t_max, b, dtype=F64)
    a, sg = _col(s.alpha(t), x0), _col(s.sigma(t), x0)
    return x0, eps, t, a * x0 + sg * eps, a, sg


@pytest.mark.parametrize("name", list(VP_SCHEDULES))
@pytest.mark.parametrize("shape", [(3,), (1, 2, 2)], ids=str)
def test_eps_from_prediction_recovers_true_eps(name, shape):
    s = VP_SCHEDULES[name]
    x0, eps, t, x, a, sg = _problem(s, shape)
    v = a * eps - sg * x0
    assert eps_from_prediction(eps, x, t, s, "eps") is eps
    torch.testing.assert_close(eps_from_prediction(x0, x, t, s, "x0"), eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_from_prediction(v, x, t, s, "v"), eps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(ALL_SCHEDULES))
def test_x0_prediction_any_schedule(name):
    # the x0 conversion needs no variance preservation: it must hold for EDM too
    s = ALL_SCHEDULES[name]
    x0, eps, t, x, _, _ = _problem(s)
    torch.testing.assert_close(eps_from_prediction(x0, x, t, s, "x0"), eps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(ALL_SCHEDULES))
def test_denoised_from_eps_inverts(name):
    s = ALL_SCHEDULES[name]
    x0, eps, t, x, _, _ = _problem(s)
    torch.testing.assert_close(denoised_from_eps(eps, x, t, s), x0, rtol=1e-12, atol=1e-12)
    # round trip through the x0 parameterisation
    back = eps_from_prediction(denoised_from_eps(eps, x, t, s), x, t, s, "x0")
    torch.testing.assert_close(back, eps, rtol=1e-11, atol=1e-11)


def test_float32_and_scalar_time():
    s = VPLinear()
    x0, eps, t, x, a, sg = _problem(s)
    out = eps_from_prediction(x0.float(), x.float(), t.float(), s, "x0")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, eps.float(), rtol=1e-3, atol=1e-3)
    # a 0-d time broadcasts over the batch
    t0 = torch.tensor(0.5, dtype=F64)
    x_mid = s.alpha(t0) * x0 + s.sigma(t0) * eps
    torch.testing.assert_close(eps_from_prediction(x0, x_mid, t0, s, "x0"), eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(denoised_from_eps(eps, x_mid, t0, s), x0, rtol=1e-12, atol=1e-12)


def test_unknown_prediction_kind():
    s = VPLinear()
    x0, eps, t, x, _, _ = _problem(s)
    for call in [
        lambda: eps_from_prediction(x0, x, t, s, "score"),  # type: ignore[arg-type]
        lambda: eps_fn_from_model(lambda x, t: x, s, "score"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(ValueError, match="unknown prediction type") as info:
            call()
        for k in ("eps", "x0", "v"):
            assert k in str(info.value)
    assert set(PREDICTION_TYPES) == {"eps", "x0", "v"}


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_eps_fn_from_model(kind):
    s = VPCosine()
    x0, eps, t, x, a, sg = _problem(s)
    true = {"eps": eps, "x0": x0, "v": a * eps - sg * x0}[kind]
    seen = {}

    def model(x_in, t_in, **kw):  # an "oracle network" that knows the answer
        seen.update(kw)
        assert x_in is x and t_in is t
        return true

    fn = eps_fn_from_model(model, s, kind)
    torch.testing.assert_close(fn(x, t, labels=7, extra="y"), eps, rtol=1e-12, atol=1e-12)
    assert seen == {"labels": 7, "extra": "y"}
    # default kind is eps
    assert eps_fn_from_model(lambda x_in, t_in: x_in * 2, s)(x, t).equal(x * 2)


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------
class CountingEps:
    """Toy ε that depends on the labels: x·label + t (+ an optional keyword offset)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, labels, offset=0.0, **kwargs):
        self.calls.append((x.shape[0], t.shape[0], labels.clone(), offset, kwargs))
        return x * _col(labels.to(x.dtype), x) + _col(t, x) + offset


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, 7.5, -1.0])
@pytest.mark.parametrize("shape", [(3,), (1, 2, 2)], ids=str)
def test_cfg_matches_two_separate_calls(scale, shape):
    b, null = 4, 10
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, *shape, dtype=F64, generator=g)
    t = torch.rand(b, dtype=F64, generator=g)
    labels = torch.tensor([0, 3, 5, 9])
    ref_fn = CountingEps()
    eps_c = ref_fn(x, t, labels=labels)
    eps_u = ref_fn(x, t, labels=torch.full_like(labels, null))
    expected = eps_u + scale * (eps_c - eps_u)

    fn = CountingEps()
    out = classifier_free_guidance(fn, scale, null_label=null)(x, t, labels=labels)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
    assert out.shape == x.shape
    # exactly one batched call with 2B items: conditional labels first, then the null label
    assert len(fn.calls) == 1
    n_x, n_t, lab, _, _ = fn.calls[0]
    assert (n_x, n_t) == (2 * b, 2 * b)
    assert lab.tolist() == labels.tolist() + [null] * b
    if scale == 1.0:
        torch.testing.assert_close(out, eps_c, rtol=1e-13, atol=1e-13)
    if scale == 0.0:
        torch.testing.assert_close(out, eps_u, rtol=1e-13, atol=1e-13)


def test_cfg_passes_extra_kwargs():
    b, null = 3, 0
    x = torch.randn(b, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    t = torch.full((b,), 0.25, dtype=F64)
    labels = torch.tensor([1, 2, 3])
    fn = CountingEps()
    out = classifier_free_guidance(fn, 3.0, null_label=null)(x, t, labels=labels, offset=0.5, flag="on")
    assert len(fn.calls) == 1
    _, _, _, offset, kwargs = fn.calls[0]
    assert offset == 0.5 and kwargs == {"flag": "on"}
    ref = CountingEps()
    eps_c = ref(x, t, labels=labels, offset=0.5)
    eps_u = ref(x, t, labels=torch.full_like(labels, null), offset=0.5)
    torch.testing.assert_close(out, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-13, atol=1e-13)


def test_cfg_doubles_every_per_item_conditioning_input():
    """Per-item keyword tensors (a prompt embedding, a nested dict of added inputs) are doubled too: the null branch
    gets their null counterparts, or the input itself where there is none; the result equals two separate calls."""
    b = 3
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(b, 2, dtype=F64, generator=g), torch.rand(b, dtype=F64, generator=g)
    emb, null_emb = torch.randn(b, 4, 2, dtype=F64, generator=g), torch.randn(4, 2, dtype=F64, generator=g)
    time_ids = torch.randn(b, 2, dtype=F64, generator=g)  # shared by both branches (no null given)
    pooled, null_pooled = torch.randn(b, 2, dtype=F64, generator=g), torch.randn(2, dtype=F64, generator=g)
    calls = []

    def fn(x, t, emb, added, scale=1.0):
        calls.append(x.shape[0])
        assert emb.shape[0] == added["time_ids"].shape[0] == added["pooled"].shape[0] == x.shape[0]
        return scale * (x * emb.sum(1) + t[:, None]) + added["time_ids"] * added["pooled"]

    guided = classifier_free_guidance(fn, 4.0, null_inputs={"emb": null_emb, "added": {"pooled": null_pooled}})
    out = guided(x, t, emb=emb, added={"time_ids": time_ids, "pooled": pooled}, scale=0.5)
    assert calls == [2 * b]
    eps_c = fn(x, t, emb, {"time_ids": time_ids, "pooled": pooled}, 0.5)
    eps_u = fn(x, t, null_emb.expand(b, 4, 2), {"time_ids": time_ids, "pooled": null_pooled.expand(b, 2)}, 0.5)
    torch.testing.assert_close(out, eps_u + 4.0 * (eps_c - eps_u), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="null inputs for emb but none was given"):
        guided(x, t, added={"time_ids": time_ids, "pooled": pooled})
    with pytest.raises(ValueError, match="needs a null label or null conditioning inputs"):
        classifier_free_guidance(fn, 2.0)


@pytest.mark.parametrize("name", ["edm", "ve"])
def test_v_prediction_is_refused_on_a_non_variance_preserving_schedule(name):
    """ε̂ = σx + αv̂ holds only where α² + σ² = 1: an EDM/VE backbone or conversion with kind v is refused."""
    from operator_diffusion.backbones import load_backbone
    from operator_diffusion.schedules import schedule_from_config

    s = schedule_from_config({"name": name})
    x, t = torch.zeros(2, 1, 4, 4), torch.full((2,), 1.0)
    with pytest.raises(ValueError, match="v-prediction needs a variance-preserving schedule"):
        eps_from_prediction(x, x, t, s, "v")
    with pytest.raises(ValueError, match="v-prediction needs a variance-preserving schedule"):
        load_backbone("opdiff-unet", preset="tiny", schedule=name, prediction="v")
    torch.testing.assert_close(eps_from_prediction(x, x, t, s, "x0"), x)  # x0 still converts
