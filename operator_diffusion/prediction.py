"""Conversions between a network's prediction types and the ε contract every solver uses.

With x_t = α_t x_0 + σ_t ε:  x̂_0 = (x_t − σ_t ε̂)/α_t,  ε̂ = (x_t − α_t x̂_0)/σ_t,  and the
v-prediction of Salimans & Ho (2022) v = α_t ε − σ_t x_0, so ε̂ = σ_t x_t + α_t v̂ (this last one
assumes a variance-preserving schedule, α_t² + σ_t² = 1, which is where v-prediction is defined).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping

import torch
from torch import Tensor

from .schedules import DiffusionProcess, Schedule, per_item

PREDICTION_TYPES: tuple[str, ...] = ("eps", "x0", "v")
Prediction = Literal["eps", "x0", "v"]


def eps_from_prediction(pred: Tensor, x: Tensor, t: Tensor, schedule: Schedule, kind: Prediction) -> Tensor:
    """ε̂ from a network output ``pred`` of type ``kind`` at state ``x`` and times ``t`` (shape (B,))."""
    if kind == "eps":
        return pred
    if kind in PREDICTION_TYPES and kind not in schedule.predictions:
        raise ValueError(f"{schedule.predictions_why or f'the {schedule.name} schedule does not take {kind!r}'}")
    a, s = per_item(schedule.alpha(t), x), per_item(schedule.sigma(t), x)
    if kind == "x0":
        return (x - a * pred) / s
    if kind == "v":
        return s * x + a * pred
    raise ValueError(f"unknown prediction type {kind!r}; valid: {', '.join(PREDICTION_TYPES)}")


def denoised_from_eps(eps: Tensor, x: Tensor, t: Tensor, schedule: DiffusionProcess) -> Tensor:
    """Tweedie / DDIM data prediction x̂_0 = (x_t − σ_t ε̂)/α_t; for a PSLD state (B, 2C, ...) ``PSLD.denoise``'s
    x̂_0 = (x_t − L₀₀ε̂_x)/Φ₀₀ (C channels)."""
    return schedule.denoise(x, eps, t)


def eps_fn_from_model(
    model: Callable[..., Tensor], schedule: Schedule, kind: Prediction = "eps"
) -> Callable[..., Tensor]:
    """Wrap ``model(x, t, **kw)`` predicting ``kind`` into the solvers' ``eps_fn(x, t, **kw)`` contract."""
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {kind!r}; valid: {', '.join(PREDICTION_TYPES)}")

    def eps_fn(x: Tensor, t: Tensor, **kwargs) -> Tensor:
        return eps_from_prediction(model(x, t, **kwargs), x, t, schedule, kind)

    return eps_fn


def autocast_eps(
    eps_fn: Callable[..., Tensor], device_type: str, dtype: torch.dtype = torch.bfloat16
) -> Callable[..., Tensor]:
    """Run the network under ``torch.autocast(device_type, dtype)`` and hand ε̂ back in the state's dtype,
    so that a solver's own arithmetic stays in full precision (bf16 teachers: about 2× the throughput on
    CPUs with AVX-512 BF16 and on GPUs, for an error well below the solver's; docs/collect.md)."""

    def eps_lowp(x: Tensor, t: Tensor, **kwargs) -> Tensor:
        with torch.autocast(device_type, dtype=dtype):
            eps = eps_fn(x, t, **kwargs)
        return eps.to(x.dtype)

    return eps_lowp


def classifier_free_guidance(
    eps_fn: Callable[..., Tensor],
    scale: float,
    null_label: int | None = None,
    null_inputs: Mapping[str, Tensor] | None = None,
) -> Callable[..., Tensor]:
    """ε̃ = ε(x, ∅) + s·(ε(x, c) − ε(x, ∅)) (Ho & Salimans 2022), both branches in one batched call of 2B items.

    The wrapped function takes ``labels`` and any other conditioning as keywords. Every per-item input is
    doubled (``double_inputs``): x, t, the labels (null branch: ``null_label``, the class index the network was
    trained to treat as "no label") and every tensor keyword whose first dimension is the batch (null branch:
    its entry of ``null_inputs``, one item's tensor or a (B, ...) batch, e.g. a negative prompt's embedding;
    the input itself when it has none, as for inputs both branches share). Other keywords pass unchanged.
    ``scale = 1`` is plain conditional sampling."""
    if null_label is None and not null_inputs:
        raise ValueError("classifier-free guidance needs a null label or null conditioning inputs (the ∅ branch)")
    null_inputs = dict(null_inputs or {})

    def guided(x: Tensor, t: Tensor, labels: Tensor | None = None, **kwargs) -> Tensor:
        if missing := sorted(set(null_inputs) - set(kwargs)):
            raise ValueError(f"classifier-free guidance has null inputs for {', '.join(missing)} but none was given")
        inputs = double_inputs(x.shape[0], kwargs, null_inputs)
        if labels is not None:
            null = labels if null_label is None else torch.full_like(labels, null_label)
            inputs["labels"] = torch.cat([labels, null])
        elif null_label is not None:
            raise ValueError("classifier-free guidance with a null label needs labels")
        eps = eps_fn(torch.cat([x, x]), torch.cat([t, t]), **inputs)
        eps_c, eps_u = eps.chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return guided


def double_inputs(batch: int, inputs: Mapping[str, Any], nulls: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword inputs for the 2B items [conditional; null] of a guided call: a tensor whose first dimension is
    ``batch`` becomes cat([v, null]) with its ``nulls`` entry (one item's tensor, broadcast to the batch, or a
    batch of them) or cat([v, v]) without one; a dict (e.g. diffusers' ``added_cond_kwargs``) is doubled entry by
    entry; anything else is passed as it is."""
    out: dict[str, Any] = {}
    for name, v in inputs.items():
        null = nulls.get(name)
        if isinstance(v, Mapping):
            out[name] = double_inputs(batch, v, null or {})
        elif isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch:
            n = v if null is None else torch.as_tensor(null).to(device=v.device, dtype=v.dtype).expand_as(v)
            out[name] = torch.cat([v, n])
        else:
            out[name] = v
    return out
