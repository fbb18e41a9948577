"""diffusers' DDIMPipeline against opdiff's DDIM (issue 16, item 8): the correspondence the plugin README states,
and the one warning line naming the scheduler settings opdiff ignores.

References: ``DDIMPipeline`` itself, run on the same x_T (a generator per seed draws what opdiff's per-seed noise
rule draws), and the network calls counted by a forward hook. An x0-predicting UNet keeps a random network's
samples in the pipeline's [-1, 1] range, where its final clamp to [0, 1] pixels loses nothing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from opdiff_diffusers.backbone import DiffusersUNet2DBackbone, SchedulerSettingsIgnored, ignored_settings
from operator_diffusion.sampling import TeacherSolver, teacher_batches
from operator_diffusion.teacher_solve import record_trajectories

from diffusers_doubles import one_thread, tiny_unet  # noqa: F401 (an autouse fixture)

N, SEEDS = 1000, [3, 7]


def counted(unet):
    calls = []
    unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


def pipeline(spacing: str, n: int):
    """DDIMPipeline's images (B, C, H, W) in [0, 1] for SEEDS, and its network calls."""
    unet = tiny_unet(seed=5)
    scheduler = DDIMScheduler(
        num_train_timesteps=N, prediction_type="sample", clip_sample=False, timestep_spacing=spacing
    )
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    calls = counted(unet)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    with torch.no_grad():
        images = pipe(batch_size=len(SEEDS), generator=generators, eta=0.0, num_inference_steps=n, output_type="pt")
    return images.images, len(calls), unet, pipe.scheduler  # the scheduler the pipeline stepped


def pixels(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 2 + 0.5).clamp(0, 1)  # what the pipeline returns


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_opdiffs_ddim_on_the_pipelines_timesteps_is_ddim_pipeline(spacing):
    """The same DDIM step and the same final x̂₀: n NFE, the pipeline's images to float32 round-off."""
    n = 10
    images, nfe, unet, scheduler = pipeline(spacing, n)
    assert nfe == n and len(scheduler.timesteps) == n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SchedulerSettingsIgnored)  # timestep_spacing: tested below
        bb = DiffusersUNet2DBackbone(unet, scheduler_config=dict(scheduler.config))
    ts = (scheduler.timesteps.to(torch.float64) + 1) / N  # step n sits at t = (n + 1)/N
    solver = TeacherSolver("ddim", n - 1, "uniform", float(ts[-1]))  # for its NFE count: the same n − 1 steps
    from operator_diffusion.seeds import example_inputs

    x, _ = example_inputs(SEEDS, bb.image_shape, None, 0, bb.schedule)
    calls = counted(unet)
    with torch.no_grad():
        out = record_trajectories(bb.eps_fn, x, bb.schedule, ts, [n - 1], "ddim", "denoised")[:, -1]
    assert len(calls) == n == solver.nfe(bb.schedule)
    torch.testing.assert_close(pixels(out), images, rtol=0, atol=2e-5)


# the n-NFE DDIM solves opdiff's commands run (N = 1000, n = 10, t_end = 1/N): `bench ... ddim:to_zero=true` at NFE n,
# `sample --teacher --solver ddim --steps n-1 --grid uniform`, and bench's default ddim row at NFE n
COMMANDS = {
    "bench to_zero": TeacherSolver("ddim", 10, "uniform", 1 / N, "state", to_zero=True),
    "sample --steps n-1": TeacherSolver("ddim", 9, "uniform", 1 / N, "denoised"),
    "bench default": TeacherSolver("ddim", 10, "uniform", 1 / N, "state"),
}


@pytest.mark.parametrize("spacing, nearest", [("trailing", "bench to_zero"), ("leading", "sample --steps n-1")])
def test_the_readmes_nearest_command_for_each_spacing(spacing, nearest):
    """Each opdiff command spends the pipeline's n NFE; the one the README names for a spacing is the nearest to
    the pipeline's images (trailing: its grid is the pipeline's to within 1/N in t)."""
    n = 10
    images, _, unet, scheduler = pipeline(spacing, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SchedulerSettingsIgnored)
        bb = DiffusersUNet2DBackbone(unet, scheduler_config=dict(scheduler.config))
    rmse = {}
    for name, solver in COMMANDS.items():
        assert solver.nfe(bb.schedule) == n, name
        with torch.no_grad():
            out = next(teacher_batches(bb, SEEDS, solver)).outputs[:, -1]
        rmse[name] = float((pixels(out) - images).pow(2).mean().sqrt())
    assert min(rmse, key=rmse.get) == nearest, rmse
    if spacing == "trailing":
        trailing = (scheduler.timesteps.to(torch.float64) + 1) / N
        assert float((COMMANDS[nearest].grid_times(bb.schedule) - trailing).abs().max()) <= 1 / N


def test_the_ignored_scheduler_settings_are_named_in_one_warning():
    config = dict(DDIMScheduler().config)  # diffusers' defaults: clip_sample=True, timestep_spacing='leading'
    assert ignored_settings(config) == ["clip_sample=True", "timestep_spacing='leading'"]
    assert ignored_settings({**config, "clip_sample": False, "steps_offset": 1, "set_alpha_to_one": False}) == [
        "timestep_spacing='leading'",
        "steps_offset=1",
        "set_alpha_to_one=False",
    ]
    with pytest.warns(SchedulerSettingsIgnored, match=r"clip_sample=True, timestep_spacing='leading' shape") as seen:
        DiffusersUNet2DBackbone(tiny_unet(), scheduler_config=config)
    assert len(seen) == 1 and "\n" not in str(seen[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DDPM's betas alone: nothing to warn about
        DiffusersUNet2DBackbone(tiny_unet(), scheduler_config={"beta_schedule": "linear", "clip_sample": False})
