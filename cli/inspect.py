"""`opdiff inspect`: where DSNO's temporal layers go in a backbone, their channels and parameter overhead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ._common import console, fail, parse_options, print_rows


def inspect(
    checkpoint: Optional[Path] = typer.Argument(
        None, help="A DSNO checkpoint (.safetensors saved by opdiff) to describe."
    ),
    backbone: str = typer.Option("opdiff-unet", "--backbone", "-b", help="Backbone name (see `opdiff backbones`)."),
    backbone_option: list[str] = typer.Option(
        [], "--backbone-option", "-o", help="Backbone option KEY=VALUE (repeatable), e.g. preset=cifar10."
    ),
    times: int = typer.Option(4, "--times", "-m", help="Number M of output times."),
    modes: int = typer.Option(2, "--modes", help="Fourier modes kept per temporal layer (<= M//2+1)."),
    placement: list[str] = typer.Option(
        [],
        "--placement",
        "-p",
        help="Injection point: a placement preset (full, through-mid, through-up1 for opdiff-unet), a module name "
        "or a dotted glob (repeatable; default: the backbone's full placement).",
    ),
    all_modules: bool = typer.Option(
        False, "--all-modules", help="List every module with its output shape (to choose --placement)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show the injection points of DSNO's temporal layers, their channels and the parameter overhead."""
    import torch

    from operator_diffusion.adapter import DSNO
    from operator_diffusion.backbones import load_backbone

    try:
        if checkpoint is not None:
            model = DSNO.load(checkpoint)
        else:
            bb = load_backbone(backbone, **parse_options(backbone_option))
            s = bb.schedule
            grid = torch.linspace(s.t_max, s.t_min, times + 1, dtype=torch.float64)[1:]  # M times; only M matters here
            model = DSNO(bb, grid, modes=modes, placement=placement or None)
    except (ValueError, OSError, TypeError) as e:  # OSError: a missing path, a Hub id that cannot load
        fail(str(e))
    if all_modules:
        rows = _module_rows(model.backbone)
        print_rows(
            rows,
            {"name": "module", "type": "type", "output": "output shape (batch 1)"},
            "modules of the backbone network",
            as_json,
        )
        return
    report = model.parameter_report()
    if as_json:
        typer.echo(json.dumps({**report, "config": model.config()}, indent=2))
        return
    print_rows(
        report["injection_points"],
        {"name": "injection point", "channels": "channels", "resolution": "H × W", "parameters": "parameters"},
        f"DSNO temporal layers ({model.modes} modes, M = {len(model.train_times)})",
        False,
    )
    console.print(
        f"backbone {report['backbone_parameters']:,} parameters; temporal layers {report['temporal_parameters']:,} "
        f"(+{100 * report['overhead']:.2f}%) at {len(report['injection_points'])} injection points"
    )
    cut = report["frame_cut_point"]
    console.print(
        f"frame pruning: a sample runs the network after {cut!r} on its last frame only"
        if cut
        else "frame pruning: none (the backbone declares no item cut points); a sample runs every frame to the end"
    )
    presets = model.backbone.placement_presets
    console.print(f"placement presets (--placement): {', '.join(presets)}")


def _module_rows(bb) -> list[dict]:
    """Every module of the network with the shape of its output on one image (or its output type)."""
    from operator_diffusion.adapter import trace_outputs

    names = [n for n, _ in bb.network.named_modules() if n]
    seen = trace_outputs(bb, names)
    modules = dict(bb.network.named_modules())
    return [{"name": n, "type": type(modules[n]).__name__, "output": str(seen.get(n, "not called"))} for n in names]
