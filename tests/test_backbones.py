"""Backbone protocol, entry-point registry and the built-in ``opdiff-unet``.

References are independent of the code under test: closed-form schedule coefficients written out here,
item-by-item evaluation for batch independence, the entry-point metadata for the registry.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import EntryPoint, entry_points

import pytest
import torch
from torch import nn

import operator_diffusion.backbones as backbones
from operator_diffusion.backbones import (
    Backbone,
    available_backbones,
    backbone_class,
    backbone_from_checkpoint,
    load_backbone,
    register_backbone,
)
from operator_diffusion.backbones.unet import UNET_PRESETS, OpdiffUNet, OpdiffUNetBackbone, Resample
from operator_diffusion.schedules import EDM, PSLD, DiscreteVP, VPLinear

from conftest import tiny, vp_linear_alpha_sigma

C, S = 3, 8  # tiny preset image shape (C, S, S)


@pytest.fixture
def clean_registry(monkeypatch):
    """Programmatic registrations made by a test do not leak into the others."""
    monkeypatch.setattr(backbones, "_registered", dict(backbones._registered))


class DummyBackbone(Backbone):
    """The smallest plugin: a 1×1 conv predicting ε."""

    name = "dummy-test"

    def __init__(self, channels: int = 2, size: int = 4):
        self.channels, self.size = channels, size
        super().__init__(nn.Conv2d(channels, channels, 1), VPLinear(), "eps", (channels, size, size))

    def forward(self, x, t, labels=None):
        self.check_inputs(x, labels)
        return self.network(x)

    def config(self):
        return {"name": self.name, "channels": self.channels, "size": self.size}

    @property
    def default_injection_points(self):
        return [""]


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
def test_builtin_is_registered_through_entry_points():
    eps = {ep.name: ep.value for ep in entry_points(group="opdiff.backbones")}
    assert eps.get("opdiff-unet") == "operator_diffusion.backbones.unet:OpdiffUNetBackbone"
    assert "opdiff-unet" in available_backbones()
    assert backbone_class("opdiff-unet") is OpdiffUNetBackbone


def test_unknown_backbone_lists_available():
    with pytest.raises(ValueError, match=r"unknown backbone 'nope'.*opdiff-unet"):
        load_backbone("nope")


def test_register_backbone(clean_registry):
    register_backbone("dummy-test", DummyBackbone)
    assert "dummy-test" in available_backbones()
    bb = load_backbone("dummy-test", channels=3)
    assert isinstance(bb, DummyBackbone) and bb.image_shape == (3, 4, 4)
    assert isinstance(load_backbone(**bb.config()), DummyBackbone)
    register_backbone("dummy-test", DummyBackbone)  # the same class again is fine (re-run notebook cell)

    class Other(DummyBackbone):
        pass

    with pytest.raises(ValueError, match="overwrite=True"):
        register_backbone("dummy-test", Other)
    register_backbone("dummy-test", Other, overwrite=True)
    assert backbone_class("dummy-test") is Other
    with pytest.raises(ValueError, match="already exists"):  # shadowing an installed plugin needs overwrite
        register_backbone("opdiff-unet", type("Shadow", (DummyBackbone,), {"name": "opdiff-unet"}))
    with pytest.raises(ValueError, match="declares name 'dummy-test'"):
        register_backbone("other-name", DummyBackbone)
    with pytest.raises(TypeError, match="not a subclass"):
        register_backbone("dummy-test", nn.Linear, overwrite=True)


def test_register_backbone_as_decorator(clean_registry):
    @register_backbone("dummy-deco")
    class Deco(DummyBackbone):
        name = "dummy-deco"

    assert backbone_class("dummy-deco") is Deco


def test_registry_is_lazy_and_broken_plugin_error_names_plugin(monkeypatch):
    broken = EntryPoint(name="broken-plugin", value="opdiff_no_such_module_xyz:Thing", group="opdiff.backbones")
    monkeypatch.setattr(backbones, "_entry_points", lambda: {"broken-plugin": broken})
    assert "broken-plugin" in available_backbones()  # listing does not import the plugin module
    assert "opdiff_no_such_module_xyz" not in sys.modules
    pattern = r"backbone plugin 'broken-plugin'.*opdiff_no_such_module_xyz.*failed to import.*ModuleNotFoundError"
    with pytest.raises(ImportError, match=pattern):
        load_backbone("broken-plugin")


def test_plugin_that_is_not_a_backbone(monkeypatch):
    wrong = EntryPoint(name="wrong-plugin", value="operator_diffusion.schedules:VPLinear", group="opdiff.backbones")
    monkeypatch.setattr(backbones, "_entry_points", lambda: {"wrong-plugin": wrong})
    with pytest.raises(TypeError, match="'wrong-plugin'.*not a subclass of operator_diffusion.backbones.Backbone"):
        backbone_class("wrong-plugin")


def test_load_backbone_name_must_agree_with_config():
    cfg = tiny().config()
    with pytest.raises(ValueError, match="config of backbone 'opdiff-unet'"):
        load_backbone("dummy-test", **cfg)
    with pytest.raises(ValueError, match="needs a backbone name"):
        load_backbone()


# --------------------------------------------------------------------------------------------------
# Forward contract
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("batch", [1, 5])
def test_output_shape(num_classes, batch):
    bb = tiny(num_classes=num_classes)
    x, t = torch.randn(batch, C, S, S), torch.rand(batch) * 0.9 + 0.05
    labels = torch.randint(0, 10, (batch,)) if num_classes else None
    out = bb(x, t, labels)
    assert out.shape == (batch, C, S, S) and out.dtype == x.dtype and torch.isfinite(out).all()
    assert bb.eps_fn(x, t, labels=labels).shape == (batch, C, S, S)
    assert bb.image_shape == (C, S, S) and bb.num_classes == num_classes
    assert bb.null_label == (num_classes if num_classes else None)


def test_labels_select_the_class_and_none_means_null_label():
    bb = tiny(num_classes=10)
    x, t = torch.randn(4, C, S, S), torch.full((4,), 0.5)
    with torch.no_grad():
        a, b = bb(x, t, torch.zeros(4, dtype=torch.long)), bb(x, t, torch.full((4,), 3))
        null = bb(x, t, torch.full((4,), 10))
        assert not torch.allclose(a, b)
        torch.testing.assert_close(bb(x, t), null)  # labels=None is the unconditional (null-label) branch


@pytest.mark.parametrize("kind", ["x0", "v"])
def test_eps_fn_converts_prediction_vp(kind):
    bb = tiny(prediction=kind)
    x = torch.randn(6, C, S, S, dtype=torch.float64)
    t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    with torch.no_grad():
        pred, eps = bb(x, t), bb.eps_fn(x, t)
    a, s = (c.view(-1, 1, 1, 1) for c in vp_linear_alpha_sigma(t))
    ref = (x - a * pred) / s if kind == "x0" else s * x + a * pred  # v = α ε − σ x0
    torch.testing.assert_close(eps, ref, rtol=1e-10, atol=1e-10)


def test_eps_fn_converts_x0_prediction_edm():
    bb = tiny(prediction="x0", schedule=EDM())
    x = torch.randn(3, C, S, S, dtype=torch.float64) * 10
    t = torch.tensor([0.01, 1.0, 40.0], dtype=torch.float64)  # t = σ, α = 1
    with torch.no_grad():
        torch.testing.assert_close(bb.eps_fn(x, t), (x - bb(x, t)) / t.view(-1, 1, 1, 1), rtol=1e-10, atol=1e-10)


def _network_inputs(bb, x, t):
    """What the network's stem and time embedding receive during bb(x, t)."""
    seen = {}
    h1 = bb.network.stem.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
    h2 = bb.network.time_embed.register_forward_pre_hook(lambda m, a: seen.__setitem__("c", a[0].detach().clone()))
    with torch.no_grad():
        bb(x, t)
    h1.remove(), h2.remove()
    return seen["x"], seen["c"]


def test_time_and_input_scaling_per_schedule():
    x = torch.randn(3, C, S, S)
    t = torch.tensor([0.02, 0.5, 1.0], dtype=torch.float64)
    # continuous VP: c_noise = 1000 t, no input scaling
    xin, c = _network_inputs(tiny(schedule=VPLinear()), x, t)
    torch.testing.assert_close(c.double(), 1000 * t)
    torch.testing.assert_close(xin, x, rtol=0, atol=0)
    # discrete DDPM schedule with N steps: c_noise = the step index tN − 1
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    _, c = _network_inputs(tiny(schedule=DiscreteVP.from_betas(betas)), x, t)
    torch.testing.assert_close(c.double(), t * 1000 - 1)
    # EDM (t = σ): c_noise = ¼ ln σ, c_in = 1/√(σ² + σ_data²), σ_data = 0.5
    te = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    xin, c = _network_inputs(tiny(schedule=EDM()), x, te)
    torch.testing.assert_close(c.double(), 0.25 * torch.log(te))
    torch.testing.assert_close(xin, x / torch.sqrt(te**2 + 0.25).float().view(-1, 1, 1, 1))


def test_psld_backbone_takes_the_phase_space_state(tmp_path):
    """A PSLD opdiff-unet: 2C channels in and out (x then m), the data's C in image_shape and config()."""
    bb = tiny(schedule="psld")
    assert bb.image_shape == (C, S, S) and bb.state_shape == (2 * C, S, S) and bb.schedule == PSLD()
    assert bb.network.stem.in_channels == 2 * C and bb.network.out_conv.out_channels == 2 * C
    z, t = torch.randn(3, 2 * C, S, S), torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    xin, c = _network_inputs(bb, z, t)  # c_noise = 1000 t as for the continuous VP, no input scaling
    torch.testing.assert_close(c.double(), 1000 * t)
    torch.testing.assert_close(xin, z, rtol=0, atol=0)
    with torch.no_grad():
        out = bb(z, t)
        assert out.shape == z.shape
        torch.testing.assert_close(bb.eps_fn(z, t), out, rtol=0, atol=0)  # the HSM ε̂ as it is
        cfg = json.loads(json.dumps(bb.config()))
        assert cfg["in_channels"] == C and cfg["schedule"]["name"] == "psld"
        assert load_backbone(**cfg).config() == cfg and load_backbone(**cfg).state_shape == (2 * C, S, S)
        bb.save_weights(tmp_path / "psld.safetensors")
        again = backbone_from_checkpoint(tmp_path / "psld.safetensors").eval()
        torch.testing.assert_close(again(z, t), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 6, 8, 8\) \(a PSLD state: x then m\)"):
        bb(torch.randn(3, C, S, S), t)
    for kind in ("x0", "v"):
        with pytest.raises(ValueError, match=f"PSLD backbone predicts the HSM ε .*must be 'eps', got '{kind}'"):
            load_backbone("opdiff-unet", preset="tiny", schedule="psld", prediction=kind)


def test_scalar_time_broadcasts_and_float64_inputs():
    bb = tiny()
    x = torch.randn(4, C, S, S)
    with torch.no_grad():
        torch.testing.assert_close(bb(x, 0.5), bb(x, torch.full((4,), 0.5)))
        out64 = bb(x.double(), torch.full((4,), 0.5, dtype=torch.float64))
        assert out64.dtype == torch.float64
        torch.testing.assert_close(out64.float(), bb(x, torch.full((4,), 0.5)), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors():
    bb, cond = tiny(), tiny(num_classes=10)
    x, t = torch.randn(2, C, S, S), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 8, 8\)"):
        bb(torch.randn(2, 1, S, S), t)
    with pytest.raises(ValueError, match="unconditional"):
        bb(x, t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="label 11 out of range"):
        cond(x, t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="integer class indices"):
        cond(x, t, torch.zeros(2))
    with pytest.raises(ValueError, match=r"times must have shape \(B,\)"):
        bb(x, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="unknown prediction type 'eps2'.*eps, x0, v"):
        load_backbone("opdiff-unet", preset="tiny", prediction="eps2")
    with pytest.raises(ValueError, match="unknown opdiff-unet preset 'huge'.*tiny, digits, cifar10"):
        load_backbone("opdiff-unet", preset="huge")
    with pytest.raises(ValueError, match=r"attn_resolutions \[5\] are not resolutions"):
        load_backbone("opdiff-unet", preset="tiny", attn_resolutions=(5,))
    with pytest.raises(ValueError, match="not divisible"):
        load_backbone("opdiff-unet", preset="tiny", image_size=6, channel_mult=(1, 2, 2))


@pytest.mark.parametrize("num_classes", [0, 10])
def test_batch_independence(num_classes):
    """Each item's output depends on that item only (the DSNO adapter runs B·M items in one batch)."""
    bb = tiny(num_classes=num_classes)
    n = 5
    x, t = torch.randn(n, C, S, S), torch.linspace(0.05, 0.95, n)
    labels = torch.tensor([0, 3, 10, 7, 3]) if num_classes else None
    with torch.no_grad():
        batched = bb(x, t, labels)
        single = torch.cat(
            [bb(x[i : i + 1], t[i : i + 1], None if labels is None else labels[i : i + 1]) for i in range(n)]
        )
        assert batched.abs().mean() > 1e-2  # a non-trivial output
        torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
        # changing one item leaves the others unchanged
        x2 = x.clone()
        x2[2] = torch.randn(C, S, S)
        other = bb(x2, t, labels)
        torch.testing.assert_close(other[[0, 1, 3, 4]], batched[[0, 1, 3, 4]], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(other[2], batched[2])


# --------------------------------------------------------------------------------------------------
# Injection points
# --------------------------------------------------------------------------------------------------
def _expected_points(num_levels: int, num_res_blocks: int) -> list[str]:
    down = [f"down.{l}.res.{j}" for l in range(num_levels) for j in range(num_res_blocks)]
    up = [f"up.{l}.res.{j}" for l in reversed(range(num_levels)) for j in range(num_res_blocks + 1)]
    return [*down, "mid", *up]


@pytest.mark.parametrize("preset", ["tiny", "cifar10"])
def test_default_injection_points_follow_dsno_placement(preset):
    kw = UNET_PRESETS[preset]
    with torch.device("meta"):  # cifar10 without allocating or initialising 58M parameters
        bb = OpdiffUNetBackbone(preset)
    modules = dict(bb.network.named_modules())
    points = bb.default_injection_points
    assert points == _expected_points(len(kw["channel_mult"]), kw["num_res_blocks"])
    for name in points:
        assert name in modules and not isinstance(modules[name], Resample)
    # "after its attention": every attention module lives inside an injection-point block or the mid block
    attn = [n for n in modules if n.endswith(".attn")]
    assert attn and all(n.rsplit(".attn", 1)[0] in points or n.startswith("mid.") for n in attn)
    # no resample module is an injection point, and there are resample modules to avoid
    assert any(isinstance(m, Resample) for m in modules.values())


def test_injection_points_are_on_the_forward_path():
    """A forward hook at every point sees one (N, C, H, W) tensor per item, and changing it changes the output."""
    bb = tiny()
    x, t = torch.randn(4, C, S, S), torch.full((4,), 0.3)
    with torch.no_grad():
        base = bb(x, t)
    for name in bb.default_injection_points:
        module = bb.network.get_submodule(name)
        seen = []

        def hook(m, args, out):
            seen.append(out)
            return out + 1.0

        handle = module.register_forward_hook(hook)
        with torch.no_grad():
            changed = bb(x, t)
        handle.remove()
        assert len(seen) == 1 and isinstance(seen[0], torch.Tensor) and seen[0].dim() == 4 and seen[0].shape[0] == 4, (
            name
        )
        assert not torch.allclose(changed, base), name
    # the hooks leave the network's state_dict keys alone
    assert list(bb.network.state_dict()) == list(tiny().network.state_dict())


# --------------------------------------------------------------------------------------------------
# Sizes and configs
# --------------------------------------------------------------------------------------------------
def _count(preset: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in OpdiffUNet(**UNET_PRESETS[preset]).parameters())


def test_preset_sizes():
    assert 35e6 <= _count("cifar10") <= 60e6
    assert 2e5 <= _count("digits") <= 2e6
    assert _count("tiny") < 2e5


@pytest.mark.parametrize(
    "schedule, kind",  # v-prediction is defined on variance-preserving schedules only: EDM round-trips x0
    [(VPLinear(beta_max=15.0), "v"), (EDM(), "x0"), (DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 50)), "v")],
)
def test_config_round_trip(schedule, kind):
    bb = load_backbone("opdiff-unet", preset="tiny", num_classes=4, schedule=schedule, prediction=kind, dropout=0.1)
    cfg = json.loads(json.dumps(bb.config()))  # JSON-serialisable
    assert cfg["name"] == "opdiff-unet" and cfg["prediction"] == kind and cfg["num_classes"] == 4
    for again in (load_backbone("opdiff-unet", **cfg), load_backbone(**cfg)):
        assert again.schedule == schedule and again.prediction == kind and again.num_classes == 4
        ref = {k: v.shape for k, v in bb.network.state_dict().items()}
        assert {k: v.shape for k, v in again.network.state_dict().items()} == ref
        assert again.config() == cfg


def test_explicit_kwargs_override_preset():
    bb = load_backbone("opdiff-unet", preset="tiny", num_res_blocks=2, in_channels=1)
    assert bb.image_shape == (1, 8, 8) and "down.0.res.1" in bb.default_injection_points


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    path = tmp_path / "w.safetensors"
    a, b = tiny(seed=0, num_classes=3), tiny(seed=1, num_classes=3)
    x, t, y = torch.randn(3, C, S, S), torch.full((3,), 0.4), torch.tensor([0, 2, 3])
    with torch.no_grad():
        assert not torch.allclose(a(x, t, y), b(x, t, y))
        a.save_weights(path)
        b.load_weights(path)
        torch.testing.assert_close(b(x, t, y), a(x, t, y), rtol=0, atol=0)
        c = load_backbone("opdiff-unet", preset="tiny", num_classes=3, checkpoint=str(path)).eval()
        torch.testing.assert_close(c(x, t, y), a(x, t, y), rtol=0, atol=0)
        d = backbone_from_checkpoint(path).eval()  # architecture from the checkpoint's own metadata
        assert d.config() == a.config()
        torch.testing.assert_close(d(x, t, y), a(x, t, y), rtol=0, atol=0)


def test_checkpoint_of_another_config_is_rejected(tmp_path):
    path = tmp_path / "two_blocks.safetensors"
    tiny(num_res_blocks=2).save_weights(path)
    with pytest.raises(ValueError) as err:
        tiny().load_weights(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "unexpected keys" in msg and "down.0.res.1" in msg and "another backbone or configuration" in msg
    with pytest.raises(ValueError, match=r"missing keys: .*down\.0\.res\.2"):
        tiny(num_res_blocks=3).load_weights(path)
    wide = tmp_path / "wide.safetensors"
    tiny(model_channels=32).save_weights(wide)  # time MLP: (4·32, 32) instead of (4·16, 16)
    with pytest.raises(ValueError, match=r"shape mismatches .*time_mlp\.0\.weight \(128, 32\) vs \(64, 16\)"):
        tiny().load_weights(wide)


def test_non_safetensors_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        tiny().load_weights(path)
    with pytest.raises(FileNotFoundError):
        tiny().load_weights(tmp_path / "missing.safetensors")


def test_an_unknown_backbone_option_gets_a_did_you_mean():
    """`-o presett=tiny` names the option and the close one, instead of Python's keyword-argument message."""
    with pytest.raises(
        TypeError, match=r"unknown backbone option 'presett' for 'opdiff-unet'; did you mean 'preset'\?"
    ):
        load_backbone("opdiff-unet", presett="tiny")
    with pytest.raises(TypeError, match=r"unknown backbone option 'drop_out' .*did you mean 'dropout'\?"):
        load_backbone("opdiff-unet", preset="tiny", drop_out=0.1)
