"""The diffusers-text2image backbone on a tiny random-weight pipeline folder (text2image_doubles): loading through
from_pretrained, schedule and prediction from the scheduler config, the latent state, prompt conditioning, DSNO
on the conditional UNet, and the errors for bad input."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from text2image_doubles import IMAGE_SIDE, SD_SCHEDULER, TEXT_LENGTH, TINY_POINTS, register, write_tiny_pipeline

from operator_diffusion.adapter import DSNO
from operator_diffusion.backbones import backbone_from_checkpoint, load_backbone

F64 = torch.float64
TIMES = [0.9, 0.6, 0.3, 0.02]
PROMPTS = ["a cat", "a dog", "do a cat"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    register()
    return write_tiny_pipeline(tmp_path_factory.mktemp("t2i") / "pipe")


@pytest.fixture(scope="module")
def bb(pipeline):
    return load_backbone("diffusers-text2image", pretrained=str(pipeline)).eval()


def with_scheduler(pipeline, tmp_path, config: dict):
    """A copy of the pipeline folder with another scheduler config."""
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def scaled_linear_alphas_cumprod(b0: float, b1: float, n: int) -> torch.Tensor:
    betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=F64) ** 2
    return torch.cumprod(1 - betas, 0)


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), Algorithm 1: shift √ᾱ so its last value is 0 and scale it so its first is unchanged."""
    s = alphas_cumprod.sqrt()
    s0, sn = s[0].clone(), s[-1].clone()
    return ((s - sn) * s0 / (s0 - sn)) ** 2


# ---------------------------------------------------------------- loading, schedule, prediction


def test_loads_the_pipeline_folder_with_a_latent_state(bb, pipeline):
    from diffusers import UNet2DConditionModel

    assert bb.image_shape == (4, IMAGE_SIDE // 8, IMAGE_SIDE // 8)  # (4, H/8, W/8)
    assert bb.decoded_shape == (3, IMAGE_SIDE, IMAGE_SIDE)
    assert bb.conditioning_shapes == {"encoder_hidden_states": (TEXT_LENGTH, 16)}
    assert bb.takes_prompts and bb.num_classes == 0
    direct = UNet2DConditionModel.from_pretrained(str(pipeline), subfolder="unet")
    own = bb.network.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in direct.state_dict().items())
    wide = load_backbone("diffusers-text2image", pretrained=str(pipeline), resolution=2 * IMAGE_SIDE)
    assert wide.image_shape == (4, IMAGE_SIDE // 4, IMAGE_SIDE // 4)


def test_schedule_and_prediction_come_from_the_sd_scheduler_config(bb):
    n = SD_SCHEDULER["num_train_timesteps"]
    ref = scaled_linear_alphas_cumprod(SD_SCHEDULER["beta_start"], SD_SCHEDULER["beta_end"], n)
    steps = torch.arange(n, dtype=F64)
    torch.testing.assert_close(bb.schedule.alpha((steps + 1) / n) ** 2, ref, rtol=1e-10, atol=1e-12)
    assert bb.prediction == "eps"


@pytest.mark.parametrize("zero_snr", [False, True], ids=["v", "v-zero-terminal-snr"])
def test_v_prediction_and_zero_terminal_snr_configs(pipeline, tmp_path, zero_snr):
    cfg = {**SD_SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": zero_snr}
    bb = load_backbone("diffusers-text2image", pretrained=str(with_scheduler(pipeline, tmp_path, cfg))).eval()
    assert bb.prediction == "v"
    n = cfg["num_train_timesteps"]
    ref = scaled_linear_alphas_cumprod(cfg["beta_start"], cfg["beta_end"], n)
    if zero_snr:
        ref = zero_terminal_snr(ref)
        assert ref[-1] == 0
    got = bb.schedule.alpha((torch.arange(n, dtype=F64) + 1) / n) ** 2
    # diffusers rescales in float32; the zero last value is floored at 2^-24 (a DiscreteVP needs ᾱ > 0)
    torch.testing.assert_close(got[:-1], ref[:-1], rtol=2e-6, atol=1e-9)
    assert float(got[-1]) == pytest.approx(2.0**-24 if zero_snr else float(ref[-1]), rel=1e-6)
    # ε̂ from a v-prediction: ε = σ x + α v, with α, σ from the reference ᾱ
    e = bb.encode_prompts(PROMPTS[:2])
    x, k = torch.randn(2, *bb.image_shape, dtype=F64), torch.tensor([199, 700])
    t = (k + 1).to(F64) / n
    v = bb.network(x.float(), k.float(), encoder_hidden_states=e["encoder_hidden_states"]).sample.to(F64)
    a = ref[k].sqrt().view(-1, 1, 1, 1)
    expected = (1 - a**2).sqrt() * x + a * v
    torch.testing.assert_close(bb.eps_fn(x, t, **e), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- conditioning


def test_prompt_embeddings_equal_the_diffusers_pipeline_encoder(bb, pipeline):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline), safety_checker=None, requires_safety_checker=False)
    for prompt in PROMPTS:
        ref, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        torch.testing.assert_close(bb.encode_prompts([prompt])["encoder_hidden_states"], ref, rtol=0, atol=0)


def test_forward_is_the_unet_at_step_tN_minus_1_with_the_prompt_embedding(bb):
    e = bb.encode_prompts(PROMPTS[:2])["encoder_hidden_states"]
    x, t = torch.randn(2, *bb.image_shape), torch.tensor([0.25, 0.9], dtype=F64)
    steps = (t * 1000 - 1).float()  # DDPM step n = tN − 1, written out
    ref = bb.network(x, steps, encoder_hidden_states=e).sample
    torch.testing.assert_close(bb(x, t, encoder_hidden_states=e), ref, rtol=0, atol=0)
    torch.testing.assert_close(bb.eps_fn(x, t, encoder_hidden_states=e), ref, rtol=0, atol=0)  # ε-prediction
    other = bb(x, t, encoder_hidden_states=e.flip(0))
    assert (other - ref).abs().max() > 1e-4  # the prompt matters


def test_an_over_long_prompt_is_truncated_with_a_warning(bb):
    long = " ".join(["cat"] * 40)
    with pytest.warns(UserWarning, match="truncated"):
        got = bb.encode_prompts([long])["encoder_hidden_states"]
    ids = bb.tokenizer(long).input_ids
    assert len(ids) > TEXT_LENGTH
    kept = torch.tensor([ids[: TEXT_LENGTH - 1] + [bb.tokenizer.eos_token_id]])  # BOS + first tokens + EOS
    with torch.no_grad():
        ref = bb.text_encoder(kept)[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb.encode_prompts(["a cat"])  # a short one warns about nothing


def test_missing_or_misshaped_conditioning_is_refused(bb):
    x, t = torch.randn(2, *bb.image_shape), torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="needs the conditioning input encoder_hidden_states"):
        bb(x, t)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must have shape \(2, 16, 16\)"):
        bb(x, t, encoder_hidden_states=torch.zeros(1, TEXT_LENGTH, 16))
    with pytest.raises(ValueError, match="takes no conditioning input pooled"):
        bb(x, t, encoder_hidden_states=torch.zeros(2, TEXT_LENGTH, 16), pooled=torch.zeros(2, 3))


# ---------------------------------------------------------------- DSNO on the conditional UNet


def test_injection_points_are_discovered_in_the_conditional_unet(bb):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    assert bb.default_injection_points == TINY_POINTS
    modules = dict(bb.network.named_modules())
    cross = [p for p in TINY_POINTS if isinstance(modules[p], Transformer2DModel)]
    assert cross == ["down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
    seen = []

    def record(p):
        def hook(module, args, out):
            if p in cross:  # called with return_dict=False inside the blocks: a 1-tuple of the features
                assert isinstance(out, tuple) and len(out) == 1, (p, type(out))
                out = out[0]
            seen.append((p, tuple(out.shape)))

        return hook

    hooks = [modules[p].register_forward_hook(record(p)) for p in TINY_POINTS]
    try:
        e = bb.encode_prompts(["a cat"])
        bb(torch.randn(1, *bb.image_shape), torch.tensor([0.5]), **e)
    finally:
        for h in hooks:
            h.remove()
    assert [p for p, _ in seen] == TINY_POINTS  # each once, in forward order
    assert all(len(s) == 4 for _, s in seen)
    assert [s[1] for _, s in seen] == list(bb.injection_point_channels().values())


@torch.no_grad()
def test_the_temporal_layers_after_cross_attention_act_on_its_features(bb):
    """Each temporal layer runs once per DSNO pass, those at the Transformer2DModel points (1-tuples) too, and the
    one after the first cross-attention changes the output: the reference is the same model with that layer zero."""
    model = DSNO(bb, TIMES, modes=2, init="small")
    e = bb.encode_prompts(PROMPTS)["encoder_hidden_states"]
    x = torch.randn(3, *bb.image_shape)
    calls = {k: 0 for k in model.temporal}
    for k, block in model.temporal.items():
        block.register_forward_pre_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
    out = model(x, encoder_hidden_states=e)
    assert calls == {k: 1 for k in model.temporal}
    model.temporal["down_blocks__0__attentions__0"].conv.weight.zero_()  # that layer becomes the identity
    assert not torch.allclose(model(x, encoder_hidden_states=e), out, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_zero_init_dsno_equals_the_teacher_frame_by_frame_with_conditioning(bb):
    model = DSNO(bb, TIMES, modes=2)
    assert [p.name for p in model.injection_points] == TINY_POINTS
    e = bb.encode_prompts(PROMPTS)["encoder_hidden_states"]  # one prompt per example
    x = torch.randn(3, *bb.image_shape)
    out = model(x, encoder_hidden_states=e)
    ref = torch.stack([bb(x, torch.full((3,), t), encoder_hidden_states=e) for t in TIMES], dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    keys = {k[len("network.") :] for k in model.state_dict() if k.startswith("network.")}
    assert keys == set(bb.network.state_dict())
    for p in model.temporal.parameters():
        p.copy_(0.2 * torch.randn_like(p))
    mixed = model(x, encoder_hidden_states=e)
    assert (mixed - ref).abs().max() > 1e-4
    torch.testing.assert_close(mixed[1:], model(x[1:], encoder_hidden_states=e[1:]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.sample(x, encoder_hidden_states=e), mixed[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs the conditioning input"):
        model(x)


def test_config_round_trip_and_unet_checkpoint(bb, tmp_path):
    cfg = bb.config()
    assert json.loads(json.dumps(cfg)) == cfg
    again = load_backbone(**cfg)
    assert again.config() == cfg
    assert {k: v.shape for k, v in again.network.state_dict().items()} == {
        k: v.shape for k, v in bb.network.state_dict().items()
    }
    with torch.no_grad():
        for p in again.network.parameters():
            p.add_(0.01)
    again.save_weights(tmp_path / "unet.safetensors")
    loaded = backbone_from_checkpoint(tmp_path / "unet.safetensors").eval()
    e = bb.encode_prompts(["a cat"])
    x, t = torch.randn(1, *bb.image_shape), torch.tensor([0.7])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, **e), again.eval()(x, t, **e))


def test_sd15_unet_config_overhead_from_the_class_defaults():
    """SD 1.5's UNet (diffusers' class defaults + cross_attention_dim 768, sample_size 64) on the meta device: its
    published size and, with 2 modes, 4C² temporal parameters per point against a channel table written here."""
    from diffusers import UNet2DConditionModel

    from opdiff_diffusers.text2image import SD15_UNET_CONFIG, injection_point_channels

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    channels = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, *[1280] * 6, *[640] * 3, *[320] * 3]
    assert list(injection_point_channels(unet).values()) == channels
    register()
    from operator_diffusion.operators import TemporalBlock

    assert sum(p.numel() for p in TemporalBlock(320, 2, 4).parameters()) == 4 * 320 * 320


# ---------------------------------------------------------------- bad input


def test_a_missing_component_is_named(pipeline, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline, folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(FileNotFoundError, match=r"lacks the component\(s\) vae"):
        load_backbone("diffusers-text2image", pretrained=str(folder))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_backbone("diffusers-text2image", pretrained=str(folder / "unet"))


def test_sdxl_is_refused_in_one_line(pipeline, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "X"]}))
    with pytest.raises(ValueError, match="SDXL-style pipelines .* are not supported") as e:
        load_backbone("diffusers-text2image", pretrained=str(folder))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*SDXL"):
        load_backbone("diffusers-text2image", unet_config={"addition_embed_type": "text_time"})


def test_unet_config_alone_serves_inspect_but_not_prompts():
    register()
    bb = load_backbone("diffusers-text2image", unet_config={"sample_size": 4, **_tiny_unet_config()})
    assert bb.image_shape == (4, 4, 4)
    assert load_backbone(**bb.config()).config() == bb.config()
    with pytest.raises(ValueError, match="built from a UNet config alone"):
        bb.encode_prompts(["a cat"])
    with pytest.raises(ValueError, match="needs pretrained=<pipeline folder or Hub id>"):
        load_backbone("diffusers-text2image")


def _tiny_unet_config() -> dict:
    from text2image_doubles import TINY_UNET

    return {k: v for k, v in TINY_UNET.items() if k != "sample_size"}


@pytest.mark.parametrize("placement", ["full", "through-mid"])
@torch.no_grad()
def test_frame_pruning_on_the_conditional_unet_gives_the_full_forward_frames(bb, placement):
    """UNet2DConditionModel hands the prompt embedding to its mid and up blocks as an argument: the hook-based cut
    narrows it with the features and skips. Reference: the unpruned pass, in float64."""
    bb.network.double()
    try:
        model = DSNO(bb, TIMES, modes=2, init="small", placement=placement).double().eval()
        for p in model.temporal.parameters():
            p.copy_(0.2 * torch.randn_like(p))
        assert model.cut_point == (
            "mid_block" if placement == "through-mid" else f"up_blocks.{len(bb.network.up_blocks) - 1}"
        )
        e = bb.encode_prompts(PROMPTS)["encoder_hidden_states"].double()
        x = torch.randn(3, *bb.image_shape, dtype=torch.float64)
        full = model(x, encoder_hidden_states=e)
        seen: list[int] = []
        handle = bb.network.conv_out.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
        try:
            pruned = model(x, frames=[-1], encoder_hidden_states=e)
        finally:
            handle.remove()
        assert seen == [3]
        torch.testing.assert_close(pruned, full[:, [-1]], rtol=1e-12, atol=1e-12)
    finally:
        bb.network.float()
