"""The ``diffusers-unet2d`` backbone plugin (offline: random weights, local directories only).

References are independent of the code under test: the UNet called directly with the timestep t·N − 1
computed here, ᾱ from diffusers' own ``DDPMScheduler`` or from betas written out here, the entry-point
metadata for the registry, shapes seen by forward hooks for the injection points.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

from opdiff_diffusers.backbone import (
    DiffusersUNet2DBackbone,
    alphas_cumprod_from_scheduler_config,
    discover_injection_points,
    injection_point_channels,
)
from operator_diffusion.backbones import (
    ENTRY_POINT_GROUP,
    available_backbones,
    backbone_class,
    backbone_from_checkpoint,
    load_backbone,
)

from diffusers_doubles import DDPM_CIFAR10_CFG, TINY_CFG, TINY_POINTS, one_thread, tiny_unet  # noqa: F401 (an autouse fixture)

N_STEPS = 1000
DDPM_CIFAR10_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}


def inputs(batch: int = 2, seed: int = 1, shape=(3, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g)
    t = torch.rand(batch, generator=g, dtype=torch.float64) * 0.98 + 0.01
    return x, t


def reference_timestep(t: torch.Tensor) -> torch.Tensor:
    """DPM-Solver's discrete-time convention, written out: t_n = (n+1)/N  ⇔  n = t·N − 1."""
    return (t * N_STEPS - 1).to(torch.float32)


def linear_alphas_cumprod(beta_start=1e-4, beta_end=0.02, n=N_STEPS) -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, n, dtype=torch.float64), 0)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------
def test_entry_point_is_installed_and_loads():
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert eps["diffusers-unet2d"].value == "opdiff_diffusers.backbone:DiffusersUNet2DBackbone"
    assert "diffusers-unet2d" in available_backbones()
    assert backbone_class("diffusers-unet2d") is DiffusersUNet2DBackbone
    bb = load_backbone("diffusers-unet2d", config=TINY_CFG)
    assert isinstance(bb, DiffusersUNet2DBackbone)
    assert bb.image_shape == (3, 16, 16) and bb.num_classes == 0 and bb.null_label is None
    assert bb.prediction == "eps" and bb.schedule.num_steps == N_STEPS
    x, t = inputs()
    with torch.no_grad():
        assert bb(x, t).shape == x.shape


def test_config_round_trip_and_checkpoint(tmp_path):
    bb = DiffusersUNet2DBackbone(
        tiny_unet(), scheduler_config={**DDPM_CIFAR10_SCHEDULER, "prediction_type": "v_prediction"}
    )
    cfg = json.loads(json.dumps(bb.config()))  # JSON-serialisable
    assert cfg["name"] == "diffusers-unet2d" and cfg["prediction"] == "v"
    assert cfg["scheduler_config"]["beta_schedule"] == "linear"
    rebuilt = load_backbone(**cfg)
    assert rebuilt.config() == cfg
    own, other = bb.network.state_dict(), rebuilt.network.state_dict()
    assert own.keys() == other.keys() and all(own[k].shape == other[k].shape for k in own)
    assert rebuilt.schedule.config() == bb.schedule.config()
    path = tmp_path / "bb.safetensors"
    bb.save_weights(path)
    loaded = backbone_from_checkpoint(path).eval()
    also = load_backbone(**cfg, checkpoint=path).eval()
    x, t = inputs()
    with torch.no_grad():
        ref = bb(x, t)
        torch.testing.assert_close(loaded(x, t), ref, rtol=0, atol=0)
        torch.testing.assert_close(also(x, t), ref, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Loading from directories
# --------------------------------------------------------------------------------------------------
def test_pipeline_directory_matches_in_memory_model(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    DDPMScheduler.from_config(DDPM_CIFAR10_SCHEDULER).save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )

    bb = load_backbone("diffusers-unet2d", pretrained=str(tmp_path)).eval()
    assert bb.prediction == "eps" and bb.scheduler_config["variance_type"] == "fixed_small"
    x, t = inputs(batch=3)
    with torch.no_grad():
        ref = unet(x, reference_timestep(t)).sample  # the UNet called directly
        torch.testing.assert_close(bb(x, t), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bb.eps_fn(x, t), ref, rtol=1e-5, atol=1e-6)
        # a scalar time is broadcast over the batch
        torch.testing.assert_close(bb(x, 0.5), unet(x, torch.full((3,), 499.0)).sample, rtol=1e-5, atol=1e-6)
        # explicit subfolder, and the in-memory model itself
        torch.testing.assert_close(
            DiffusersUNet2DBackbone(tmp_path, subfolder="unet").eval()(x, t), ref, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(DiffusersUNet2DBackbone(unet)(x, t), ref, rtol=1e-5, atol=1e-6)


def test_bare_model_directory(tmp_path):
    unet = tiny_unet(seed=3)
    unet.save_pretrained(tmp_path / "bare")
    with pytest.warns(UserWarning, match="no scheduler config"):
        bb = DiffusersUNet2DBackbone(tmp_path / "bare").eval()
    assert bb.prediction == "eps"  # DDPM default: linear 1e-4..0.02, 1000 steps
    torch.testing.assert_close(
        torch.exp(2 * torch.tensor(bb.schedule.log_alphas, dtype=torch.float64)),
        linear_alphas_cumprod(),
        rtol=1e-12,
        atol=0,
    )
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(bb(x, t), unet(x, reference_timestep(t)).sample, rtol=1e-5, atol=1e-6)
    # flat google/ddpm-* layout: scheduler_config.json beside config.json is picked up
    DDPMScheduler.from_config({**DDPM_CIFAR10_SCHEDULER, "prediction_type": "sample"}).save_config(tmp_path / "bare")
    assert DiffusersUNet2DBackbone(tmp_path / "bare").prediction == "x0"
    # an explicit scheduler_config (a file here) wins; prediction= wins over both
    assert (
        DiffusersUNet2DBackbone(
            tmp_path / "bare", scheduler_config=tmp_path / "bare" / "scheduler_config.json", prediction="v"
        ).prediction
        == "v"
    )


# --------------------------------------------------------------------------------------------------
# Schedule and prediction type
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "beta_schedule, beta_start, beta_end",
    [
        ("linear", 1e-4, 0.02),
        ("scaled_linear", 0.00085, 0.012),
        ("squaredcos_cap_v2", 1e-4, 0.02),
        ("sigmoid", 1e-4, 0.02),
    ],
)
def test_schedule_matches_diffusers_alphas_cumprod(beta_schedule, beta_start, beta_end):
    sched = {
        "num_train_timesteps": N_STEPS,
        "beta_schedule": beta_schedule,
        "beta_start": beta_start,
        "beta_end": beta_end,
    }
    bb = DiffusersUNet2DBackbone(config=TINY_CFG, scheduler_config=sched)
    reference = DDPMScheduler.from_config(sched).alphas_cumprod.to(torch.float64)  # float32 in diffusers
    n = torch.arange(N_STEPS, dtype=torch.float64)
    alpha2 = bb.schedule.alpha((n + 1) / N_STEPS) ** 2  # step n sits at t_n = (n+1)/N
    torch.testing.assert_close(alpha2, reference, rtol=2e-5, atol=1e-9)
    torch.testing.assert_close(alpha2 + bb.schedule.sigma((n + 1) / N_STEPS) ** 2, torch.ones_like(n))


def test_trained_betas_and_zero_terminal_snr():
    betas = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64)
    ac = alphas_cumprod_from_scheduler_config({"trained_betas": betas.tolist(), "num_train_timesteps": 50})
    torch.testing.assert_close(ac, torch.cumprod(1 - betas, 0), rtol=1e-14, atol=0)
    zero = {
        "num_train_timesteps": 100,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "rescale_betas_zero_snr": True,
    }
    ac = alphas_cumprod_from_scheduler_config(zero)
    assert 0 < float(ac[-1]) <= 2**-24 and bool((ac[1:] < ac[:-1]).all())
    DiffusersUNet2DBackbone(config=TINY_CFG, scheduler_config=zero)  # a valid DiscreteVP


def test_eps_fn_of_v_prediction():
    unet = tiny_unet(seed=5)
    bb = DiffusersUNet2DBackbone(unet, scheduler_config={**DDPM_CIFAR10_SCHEDULER, "prediction_type": "v_prediction"})
    assert bb.prediction == "v"
    ac = linear_alphas_cumprod()
    n = torch.tensor([0, 99, 499, 998], dtype=torch.float64)
    t = torch.cat([(n + 1) / N_STEPS, torch.tensor([0.2505], dtype=torch.float64)])  # grid points and one between
    # log α is piecewise linear in t between grid points (DPM-Solver's discrete-time interpolation)
    log_alpha_grid = 0.5 * torch.log(ac)
    log_alpha_mid = 0.5 * (log_alpha_grid[249] + log_alpha_grid[250])  # t = 0.2505 halfway between t_249, t_250
    alpha = torch.exp(torch.cat([log_alpha_grid[n.long()], log_alpha_mid[None]]))
    sigma = torch.sqrt(1 - alpha**2)
    x, _ = inputs(batch=5)
    with torch.no_grad():
        v = unet(x, reference_timestep(t)).sample
        expected = sigma.float()[:, None, None, None] * x + alpha.float()[:, None, None, None] * v
        torch.testing.assert_close(bb.eps_fn(x, t), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, ours", [("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v")])
def test_prediction_type_mapping(kind, ours):
    assert DiffusersUNet2DBackbone(config=TINY_CFG, scheduler_config={"prediction_type": kind}).prediction == ours


# --------------------------------------------------------------------------------------------------
# Conditioning, dtypes, output channels
# --------------------------------------------------------------------------------------------------
def test_class_conditional_unet_receives_labels():
    unet = tiny_unet(seed=7, num_class_embeds=10)
    bb = DiffusersUNet2DBackbone(unet)
    assert bb.num_classes == 10 and bb.null_label is None
    x, t = inputs(batch=3)
    labels = torch.tensor([0, 4, 9])
    with torch.no_grad():
        out = bb(x, t, labels)
        torch.testing.assert_close(
            out, unet(x, reference_timestep(t), class_labels=labels).sample, rtol=1e-5, atol=1e-6
        )
        assert not torch.allclose(out, bb(x, t, torch.tensor([1, 5, 8])))
        with pytest.raises(ValueError, match="labels are required"):
            bb(x, t)
        with pytest.raises(ValueError, match="out of range"):
            bb(x, t, torch.tensor([0, 1, 10]))
        guided = DiffusersUNet2DBackbone(unet, null_label=9)  # a CFG-trained UNet's "no class" row
        torch.testing.assert_close(guided(x, t), guided(x, t, torch.full((3,), 9)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unconditional"):
        DiffusersUNet2DBackbone(config=TINY_CFG)(x, t, labels)


def test_dtype_round_trip_and_learned_variance():
    unet = tiny_unet(seed=2, out_channels=6)
    with pytest.raises(ValueError, match="outputs 6 channels"):
        DiffusersUNet2DBackbone(unet)
    bb = DiffusersUNet2DBackbone(unet, scheduler_config={**DDPM_CIFAR10_SCHEDULER, "variance_type": "learned_range"})
    x, t = inputs()
    with torch.no_grad():
        out = bb(x.double(), t)
        assert out.dtype == torch.float64 and out.shape == x.shape
        torch.testing.assert_close(out.float(), unet(x, reference_timestep(t)).sample[:, :3], rtol=1e-5, atol=1e-6)
        bf16 = DiffusersUNet2DBackbone(tiny_unet()).to(torch.bfloat16)
        assert bf16(x, t).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# Injection points
# --------------------------------------------------------------------------------------------------
def ramp(h: torch.Tensor) -> torch.Tensor:
    """A spatially varying perturbation. (A constant would not do at the last point: the output GroupNorm
    ``conv_norm_out`` removes a per-group constant shift exactly.)"""
    H, W = h.shape[-2:]
    return torch.linspace(-1.0, 1.0, H * W, dtype=h.dtype).reshape(H, W)


def run_with_hooks(bb, points, x, t, labels=None, add: dict[str, float] | None = None):
    """Forward with a hook on each point recording (order, output type/shape), optionally adding
    ``add[name]`` times a spatial ramp to that point's output."""
    modules = dict(bb.network.named_modules())
    seen, handles = [], []
    for name in points:

        def hook(module, args, output, name=name):
            seen.append((name, type(output), tuple(output.shape) if torch.is_tensor(output) else None))
            if add and name in add:
                return output + add[name] * ramp(output)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = bb(x, t, labels)
    finally:
        for h in handles:
            h.remove()
    return out, seen


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_class_embeds": 4},
        {
            "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "AttnUpBlock2D"),
            "layers_per_block": 2,
        },
    ],
)
def test_default_injection_points(overrides):
    bb = DiffusersUNet2DBackbone(tiny_unet(**overrides))
    points = bb.default_injection_points
    if not overrides:
        assert points == TINY_POINTS
    modules = dict(bb.network.named_modules())
    assert all(p in modules for p in points)
    for p in points:
        assert "downsamplers" not in p and "upsamplers" not in p
        assert not isinstance(modules[p], (Downsample2D, Upsample2D))
        assert isinstance(modules[p], (ResnetBlock2D, Attention)) or p == "mid_block"
    # where a block has attentions, the attention after each resnet is the point
    for name, module in modules.items():
        if isinstance(module, Attention) and ("down_blocks" in name or "up_blocks" in name):
            assert name in points and name.replace("attentions", "resnets") not in points
    labels = torch.arange(3) % 4 if "num_class_embeds" in overrides else None
    x, t = inputs(batch=3)
    ref, seen = run_with_hooks(bb, points, x, t, labels)
    channels = bb.injection_point_channels()
    assert [s[0] for s in seen] == points  # each fires once, in forward order
    for name, kind, shape in seen:  # one (N, C, H, W) tensor
        assert kind is torch.Tensor and len(shape) == 4 and shape[0] == 3 and shape[1] == channels[name]
    for p in points:  # a perturbation at each point reaches the output
        out, _ = run_with_hooks(bb, points, x, t, labels, add={p: 0.5})
        assert (out - ref).abs().max() > 1e-4, p


def test_hook_replacement_reaches_the_skip_connections():
    """Down blocks append each resnet / attention output to their skip tuple: the replaced output must be
    what the matching up-block resnet receives (concatenated last, after the running features)."""
    bb = DiffusersUNet2DBackbone(tiny_unet())
    modules = dict(bb.network.named_modules())
    replaced, received, handles = {}, {}, []

    def replace(name):
        def hook(module, args, output):
            replaced[name] = output * 0 + 3.0
            return replaced[name]

        return hook

    def capture(name):
        def pre_hook(module, args):
            received[name] = args[0]

        return pre_hook

    # skips: conv_in, down0.resnets0, down0.downsampler, down1.attentions0 are popped from the end by the up blocks
    pairs = {"down_blocks.1.attentions.0": "up_blocks.0.resnets.0", "down_blocks.0.resnets.0": "up_blocks.1.resnets.0"}
    for src, dst in pairs.items():
        handles.append(modules[src].register_forward_hook(replace(src)))
        handles.append(modules[dst].register_forward_pre_hook(capture(dst)))
    x, t = inputs()
    with torch.no_grad():
        bb(x, t)
    for h in handles:
        h.remove()
    for src, dst in pairs.items():
        c = replaced[src].shape[1]
        assert torch.equal(received[dst][:, -c:], replaced[src]), (src, dst)


def test_ddpm_cifar10_architecture(capsys):
    """google/ddpm-cifar10-32's architecture (random weights): 35.7M parameters, 21 injection points."""
    bb = DiffusersUNet2DBackbone(config=DDPM_CIFAR10_CFG, scheduler_config=DDPM_CIFAR10_SCHEDULER)
    params = bb.num_parameters()
    assert 35_000_000 <= params <= 36_500_000
    assert bb.image_shape == (3, 32, 32) and bb.prediction == "eps"
    points = bb.default_injection_points
    channels = bb.injection_point_channels()
    modules = dict(bb.network.named_modules())
    assert all(p in modules for p in points) and list(channels) == points
    assert [p for p in points if "attentions" in p] == [
        "down_blocks.1.attentions.0",
        "down_blocks.1.attentions.1",
        "up_blocks.2.attentions.0",
        "up_blocks.2.attentions.1",
        "up_blocks.2.attentions.2",
    ]
    assert len(points) == 2 * 4 + 1 + 3 * 4  # layers_per_block per down level, mid, layers_per_block + 1 per up level
    # discovery works on the meta device too (no weights allocated), with the same result
    with torch.device("meta"):
        meta = UNet2DModel(**{k: v for k, v in DDPM_CIFAR10_CFG.items() if not k.startswith("_")})
    assert discover_injection_points(meta) == points and injection_point_channels(meta) == channels
    # one real forward: each point's output is (1, C, H, W)
    x, t = inputs(batch=1, shape=(3, 32, 32))
    _, seen = run_with_hooks(bb, points, x, t)
    assert [s[0] for s in seen] == points
    assert all(kind is torch.Tensor and len(shape) == 4 and shape[:2] == (1, channels[n]) for n, kind, shape in seen)
    total_c = sum(channels.values())
    sum_c2 = sum(c * c for c in channels.values())
    with capsys.disabled():
        print(
            f"\nddpm-cifar10-32: {params:,} params; {len(points)} injection points, total channels {total_c}, "
            f"sum C^2 = {sum_c2:,} (DSNO: 2*n_modes*sum C^2 = {2 * sum_c2:,} real params per Fourier mode)"
        )
        for n, kind, shape in seen:
            print(f"  {n:28s} C={channels[n]:4d} HxW={shape[2]}x{shape[3]}")


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_bad_input(tmp_path):
    (tmp_path / "scheduler").mkdir()
    DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    with pytest.raises(FileNotFoundError, match="no UNet found"):
        DiffusersUNet2DBackbone(tmp_path)
    with pytest.raises(FileNotFoundError, match="no UNet found"):
        DiffusersUNet2DBackbone(tmp_path, subfolder="unet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiffusersUNet2DBackbone(str(tmp_path / "missing"))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="not a UNet2DModel"):
        DiffusersUNet2DBackbone(tmp_path / "vae")
    with pytest.raises(ValueError, match="needs pretrained"):
        DiffusersUNet2DBackbone()
    with pytest.raises(ValueError, match="not both"):
        DiffusersUNet2DBackbone(str(tmp_path), config=TINY_CFG)
    with pytest.raises(ValueError, match="unknown UNet2DModel config keys: channels"):
        DiffusersUNet2DBackbone(config=TINY_CFG, channels=3)
    with pytest.raises(ValueError, match="PSLD included, are not supported"):
        DiffusersUNet2DBackbone(config=TINY_CFG, schedule="psld")
    with pytest.raises(ValueError, match="Fourier"):
        DiffusersUNet2DBackbone(config={**TINY_CFG, "time_embedding_type": "fourier"})
    with pytest.raises(ValueError, match="prediction_type 'flow_prediction'"):
        DiffusersUNet2DBackbone(config=TINY_CFG, scheduler_config={"prediction_type": "flow_prediction"})
    with pytest.raises(ValueError, match="unsupported beta_schedule"):
        DiffusersUNet2DBackbone(config=TINY_CFG, scheduler_config={"beta_schedule": "nonsense"})
    bb = DiffusersUNet2DBackbone(config=TINY_CFG)
    x, t = inputs()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 16, 16\)"):
        bb(torch.randn(2, 3, 32, 32), t)
    with pytest.raises(ValueError, match=r"x must have shape"):
        bb(torch.randn(3, 16, 16), t[:1])
    with pytest.raises(ValueError, match="times must have shape"):
        bb(x, t[:1].expand(3))


@pytest.mark.parametrize("layout", ["flat", "pipeline"])
def test_hub_id_layouts_without_network(tmp_path, monkeypatch, layout):
    """The Hub branch (no network here): ``from_pretrained`` / ``load_config`` are redirected to local
    directories laid out like a flat google/ddpm-* repository or a pipeline repository."""
    unet = tiny_unet(seed=11)
    if layout == "flat":
        unet.save_pretrained(tmp_path)
        DDPMScheduler.from_config({**DDPM_CIFAR10_SCHEDULER, "prediction_type": "sample"}).save_config(tmp_path)
    else:
        unet.save_pretrained(tmp_path / "unet")
        DDPMScheduler.from_config({**DDPM_CIFAR10_SCHEDULER, "prediction_type": "sample"}).save_pretrained(
            tmp_path / "scheduler"
        )
    real_unet, real_config = UNet2DModel.from_pretrained.__func__, DDPMScheduler.load_config.__func__

    def local(name, subfolder):
        path = tmp_path / (subfolder or "")
        if name != "someone/ddpm-tiny" or not path.is_dir():
            raise OSError(f"{name} does not appear to have a file in {subfolder!r}")
        return str(tmp_path), subfolder

    def fake_from_pretrained(cls, name, subfolder=None, **kw):
        root, sub = local(name, subfolder)
        if not (tmp_path / (sub or "") / "config.json").is_file():
            raise OSError(f"{name} does not appear to have a file named config.json.")
        return real_unet(cls, root, subfolder=sub, **kw)

    def fake_load_config(cls, name, subfolder=None, **kw):
        root, sub = local(name, subfolder)
        if not (tmp_path / (sub or "") / "scheduler_config.json").is_file():
            raise OSError(f"{name} does not appear to have a file named scheduler_config.json.")
        return real_config(cls, root, subfolder=sub, **kw)

    monkeypatch.setattr(UNet2DModel, "from_pretrained", classmethod(fake_from_pretrained))
    monkeypatch.setattr(DDPMScheduler, "load_config", classmethod(fake_load_config))
    bb = load_backbone("diffusers-unet2d", pretrained="someone/ddpm-tiny").eval()
    assert bb.prediction == "x0"
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(bb(x, t), unet(x, reference_timestep(t)).sample, rtol=1e-5, atol=1e-6)
    # what a collection records to rebuild this teacher with its weights: the Hub id and the subfolder found
    source = bb.source()
    assert source["pretrained"] == "someone/ddpm-tiny" and source["subfolder"] == (None if layout == "flat" else "unet")
    rebuilt = load_backbone(**json.loads(json.dumps(source))).eval()
    assert rebuilt.config() == bb.config()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t), unet(x, reference_timestep(t)).sample, rtol=1e-5, atol=1e-6)
    assert DiffusersUNet2DBackbone(config=TINY_CFG).source() is None  # random weights come from nowhere
    with pytest.raises(OSError, match="tried its root and unet/"):
        DiffusersUNet2DBackbone("someone/no-such-model")


def test_a_missing_relative_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """``models/nonexist`` beside a ``models`` folder is a path that does not exist: a one-line error at once,
    no Hub request (the probe spent 57 s in retries)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(UNet2DModel, "from_pretrained", classmethod(no_hub))
    with pytest.raises(FileNotFoundError, match=r"pretrained directory 'models/nonexist' does not exist"):
        load_backbone("diffusers-unet2d", pretrained="models/nonexist")


def test_offline_hub_ids_load_only_from_the_local_cache(monkeypatch):
    """With HF_HUB_OFFLINE set, a Hub id is tried with local_files_only=True: no network retries."""
    seen = []

    def record(cls, name, subfolder=None, **kwargs):
        seen.append(kwargs.get("local_files_only"))
        raise OSError(f"{name} is not in the local cache")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(UNet2DModel, "from_pretrained", classmethod(record))
    with pytest.raises(OSError, match="could not load a UNet2DModel from the Hub id 'someone/ddpm-tiny'"):
        load_backbone("diffusers-unet2d", pretrained="someone/ddpm-tiny")
    assert seen and all(seen)


@pytest.mark.parametrize(
    "config",
    [
        {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5},
        {"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 2000, "sigma_min": 0.01, "sigma_max": 1348.0},
        {"sigma_min": 0.002, "sigma_max": 80.0},  # no class name, no betas
    ],
)
def test_scheduler_configs_outside_the_ddpm_family_are_refused(config):
    """An EDM or VE scheduler config beside a UNet2DModel was silently read as linear-β DDPM; now one line."""
    with pytest.raises(ValueError, match="describes a σ-parameterised .* not DDPM betas"):
        load_backbone("diffusers-unet2d", config=dict(TINY_CFG), scheduler_config=config)
    assert float(alphas_cumprod_from_scheduler_config({"_class_name": "DDIMScheduler"})[0]) == pytest.approx(1 - 1e-4)


def test_an_unknown_option_suggests_pretrained_for_path():
    with pytest.raises(ValueError, match=r"unknown UNet2DModel config keys: path; path: did you mean 'pretrained'\?"):
        load_backbone("diffusers-unet2d", path="models/unet")


def test_a_folder_with_only_pickled_weights_is_refused_with_the_conversion(tmp_path):
    """A `.bin`-only model folder (issue 16, item 5) gave diffusers' "no file named ….safetensors" and a log line:
    a pickle is never loaded silently; the one-line error names the file and the command that converts it, which
    works; diffusers' own use_safetensors=False stays the explicit opt-in."""
    import re

    from typer.testing import CliRunner

    from opdiff_cli.main import app

    unet = tiny_unet(seed=6)
    unet.save_pretrained(tmp_path / "bin" / "unet", safe_serialization=False)
    DDPMScheduler().save_pretrained(tmp_path / "bin" / "scheduler")
    assert sorted(p.name for p in (tmp_path / "bin" / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.bin",
    ]
    with pytest.raises(ValueError, match=r"holds only pickled weights \(diffusion_pytorch_model.bin\)") as caught:
        load_backbone("diffusers-unet2d", pretrained=str(tmp_path / "bin"))
    message = str(caught.value)
    assert "\n" not in message and "safe_serialization=True" in message
    result = CliRunner().invoke(app, ["inspect", "-b", "diffusers-unet2d", "-o", f"pretrained={tmp_path / 'bin'}"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1 and "holds only pickled weights" in " ".join(result.stderr.split())
    x, t = inputs()
    with torch.no_grad():
        ref = unet(x, reference_timestep(t)).sample
        opted_in = load_backbone("diffusers-unet2d", pretrained=str(tmp_path / "bin"), use_safetensors=False).eval()
        torch.testing.assert_close(opted_in(x, t), ref, rtol=1e-5, atol=1e-6)
        exec(re.search(r'python -c "(.*)"$', message).group(1))  # the conversion the message gives
        converted = load_backbone("diffusers-unet2d", pretrained=str(tmp_path / "bin")).eval()
        torch.testing.assert_close(converted(x, t), ref, rtol=1e-5, atol=1e-6)
