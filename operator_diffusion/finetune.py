"""Which of a DSNO's parameters train (``opdiff train --trainable``): freezing the teacher's weights except chosen
ones, so that the optimizer holds state for those only and no gradients are kept for the rest.

A selector is ``all``, ``temporal`` (DSNO's temporal layers), ``norms`` (the affine weights of the backbone's
normalisation layers: GroupNorm, LayerNorm and the like) or a glob over DSNO's parameter names (``fnmatch``: ``*``
matches across dots, e.g. ``network.mid_block.*``). A spec joins selectors with ``,`` or ``+``:
``temporal+norms`` trains the temporal layers and the norms, the rest of the U-Net stays the teacher's.

LoRA (``opdiff train --lora-rank R``, Hu et al. 2021) through peft: the backbone's chosen ``Linear`` and ``Conv2d``
layers get rank-R adapters W + (α/R)·B·A (B zero at the start, so DSNO still starts as the teacher), the teacher's
weights stay frozen, and the adapters train together with the temporal layers. The export merges them
(``merge_lora``), so a trained run's ``model.safetensors`` has the plain DSNO layout."""

from __future__ import annotations

import fnmatch

from torch import nn

from .configs import TRAINABLE_KEYWORDS, trainable_selectors

__all__ = [
    "TRAINABLE_KEYWORDS",
    "trainable_selectors",
    "select_trainable",
    "freeze",
    "add_lora",
    "merge_lora",
    "lora_targets",
]

LORA_TYPES = (nn.Linear, nn.Conv2d)  # the layer types peft's LoRA adapts here

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

    def hits(sel: str) -> list[str]:
        if sel == "all":
            return names
        if sel == "temporal":
            return [n for n in names if n.startswith("temporal.")]
        if sel == "norms":
            return [n for n in names if n in norms]
        return fnmatch.filter(names, sel)

    def refusal(sel: str) -> str:
        what = "no temporal layers (the one-step baseline?)" if sel == "temporal" else "no parameter it matches"
        return (
            f"--trainable {sel!r} selects nothing: the model has {what}; parameter names look like "
            f"{', '.join(names[:2])} (keywords: {', '.join(TRAINABLE_KEYWORDS)})"
        )

    return _select(names, spec, hits, refusal)


def _select(names: list[str], spec: str, hits, refusal) -> list[str]:
    """The ``names`` that the selectors of ``spec`` (``trainable_selectors``) pick, in their order: the union of
    ``hits(selector)``; ValueError ``refusal(selector)`` for a selector that picks none."""
    chosen: set[str] = set()
    for sel in trainable_selectors(spec):
        found = hits(sel)
        if not found:
            raise ValueError(refusal(sel))
        chosen.update(found)
    return [n for n in names if n in chosen]


def freeze(model: nn.Module, spec: str | None, lora: bool = False) -> int:
    """Freeze every parameter of ``model`` that ``spec`` does not select (``requires_grad=False``: no gradient is
    computed or kept for it) and return the number of trainable values; None or ``all`` trains everything.
    ``lora``: the model carries LoRA adapters (``add_lora``), which always train; then None means the adapters
    and the temporal layers (the baseline: the adapters alone)."""
    if lora and spec is None:
        keep = {n for n, _ in model.named_parameters() if n.startswith("temporal.")}
    else:
        keep = set(select_trainable(model, spec or "all"))
    if lora:
        keep |= {n for n, _ in model.named_parameters() if ".lora_" in n}
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_targets(network: nn.Module, spec: str | None) -> list[str]:
    """The ``Linear`` and ``Conv2d`` modules of ``network`` that get LoRA adapters: all of them (None), or those
    whose names match the globs of ``spec`` (joined by ``,`` or ``+``, e.g. ``*attn*``); ValueError naming a glob
    that matches none."""
    names = [n for n, m in network.named_modules() if isinstance(m, LORA_TYPES)]
    if spec is None:
        return names
    return _select(
        names,
        spec,
        lambda sel: fnmatch.filter(names, sel),
        lambda sel: (
            f"--lora-targets {sel!r} matches no Linear or Conv2d module of the backbone; their names look "
            f"like {', '.join(names[:3])}"
        ),
    )


def add_lora(model, rank: int, targets: str | None = None) -> list[str]:
    """Inject rank-``rank`` LoRA adapters (α = rank: scale 1; B = 0, so the output is unchanged) into the
    ``lora_targets`` of ``model.network`` with peft, in place; returns the adapted module names."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError(
            "--lora-rank needs peft, which is not installed: pip install peft (or 'operator-diffusion[lora]')"
        ) from None
    names = lora_targets(model.network, targets)
    config = LoraConfig(r=int(rank), lora_alpha=int(rank), target_modules=names, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, model.network)
    return names


def merge_lora(network: nn.Module) -> int:
    """Fold every LoRA adapter of ``network`` into its base layer (W ← W + (α/R)·B·A) and put the base layer back
    in its place, so the state dict has the plain layout again; returns the number of layers merged."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: nothing can have been injected
        return 0
    merged = 0
    for name, module in list(network.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(network.get_submodule(parent) if parent else network, child, module.get_base_layer())
            merged += 1
    return merged
