"""Which of a DSNO's parameters train (``opdiff train --trainable``): freezing the teacher's weights except chosen
ones, so that the optimizer holds state for those only and no gradients are kept for the rest.

A selector is ``all``, ``temporal`` (DSNO's temporal layers), ``norms`` (the affine weights of the backbone's
normalisation layers: GroupNorm, LayerNorm and the like) or a glob over DSNO's parameter names (``fnmatch``: ``*``
matches across dots, e.g. ``network.mid_block.*``). A spec joins selectors with ``,`` or ``+``:
``temporal+norms`` trains the temporal layers and the norms, the rest of the U-Net stays the teacher's."""

from __future__ import annotations

import fnmatch

from torch import nn

from .configs import TRAINABLE_KEYWORDS, trainable_selectors

__all__ = ["TRAINABLE_KEYWORDS", "trainable_selectors", "select_trainable", "freeze"]

_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's, or a library's whose class name says so (diffusers' AdaGroupNorm, RMSNorm)."""
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def select_trainable(model: nn.Module, spec: str) -> list[str]:
    """Names of the parameters of ``model`` (a DSNO: ``network.*``, ``temporal.*``) that ``spec`` selects, in the
    model's order; ValueError naming the selector that selects nothing."""
    names = [n for n, _ in model.named_parameters()]
    norms = {
        f"{prefix}.{p}" if prefix else p
        for prefix, m in model.named_modules()
        if prefix.split(".")[0] == "network" and _is_norm(m)
        for p, _ in m.named_parameters(recurse=False)
    }
    chosen: set[str] = set()
    for sel in trainable_selectors(spec):
        if sel == "all":
            hits = names
        elif sel == "temporal":
            hits = [n for n in names if n.startswith("temporal.")]
        elif sel == "norms":
            hits = [n for n in names if n in norms]
        else:
            hits = fnmatch.filter(names, sel)
        if not hits:
            what = "no temporal layers (the one-step baseline?)" if sel == "temporal" else "no parameter it matches"
            raise ValueError(
                f"--trainable {sel!r} selects nothing: the model has {what}; parameter names look like "
                f"{', '.join(names[:2])} (keywords: {', '.join(TRAINABLE_KEYWORDS)})"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


def freeze(model: nn.Module, spec: str | None) -> int:
    """Freeze every parameter of ``model`` that ``spec`` does not select (``requires_grad=False``: no gradient is
    computed or kept for it) and return the number of trainable values; None or ``all`` trains everything."""
    keep = set(select_trainable(model, spec or "all"))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
