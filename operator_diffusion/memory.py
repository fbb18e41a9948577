"""Measuring what a training step costs without running it at scale: the activation memory and the FLOPs of a forward
and backward pass, measured on the ``meta`` device (shapes and dtypes, no data), so that an 860M-parameter U-Net on
B·M latent frames costs seconds of CPU and no memory. ``benchmarks/memory.py`` turns these measurements into the
expected peak memory and step time of SD 1.5 training on one GPU.

* ``saved_tensor_bytes``: the bytes autograd saves for the backward pass (``saved_tensors_hooks``), each storage
  counted once, the parameters' own storages excluded (they are the weights, counted apart);
* ``LiveBytes``: a dispatch mode that follows every storage the ops create until it is freed, and keeps the peak: it
  also sees what ``saved_tensor_bytes`` cannot (temporaries, the inputs a checkpointed block keeps for its
  recomputation, the gradients flowing back);
* ``fused_attention``: ``scaled_dot_product_attention`` as a GPU runs it (flash attention for bf16/fp16, memory-
  efficient attention for fp32: q, k, v, the output and the log-sum-exp are saved, never the L×L matrix), where the
  CPU/meta fallback would save the attention matrix;
* ``emulated_autocast``: CUDA bf16 autocast's casts (convolutions and linear layers in bf16, norms in fp32) on a
  float32 network on the meta device, where autocast itself does not run;
* ``step_cost``: peak live bytes and FLOPs (``torch.utils.flop_counter.FlopCounterMode``) of one step.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["saved_tensor_bytes", "LiveBytes", "fused_attention", "emulated_autocast", "StepCost", "step_cost"]


def _storage_key(t: Tensor) -> int:
    return id(t.untyped_storage())  # torch keeps one Python object per storage: views share it


def saved_tensor_bytes(
    fn: Callable[[], object], exclude: Iterable[Tensor] = (), blocks: dict[str, nn.Module] | None = None
) -> dict[str, int]:
    """Bytes of the tensors autograd saves for the backward pass while ``fn()`` runs, each storage once, not counting
    the storages of ``exclude`` (the parameters): ``{"total": …}``, and with ``blocks`` (name → module) also each
    block's share, a tensor going to the innermost block running when it was saved (``"other"``: outside them)."""
    skip = {_storage_key(t) for t in exclude}
    seen: dict[int, int] = {}
    owner: dict[int, str] = {}
    keep: list[object] = []  # holds the storages, so that no id is reused while counting
    stack = ["other"]

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if id(s) not in skip and id(s) not in seen:
            seen[id(s)], owner[id(s)] = s.nbytes(), stack[-1]
            keep.append(s)
        return t

    handles = []
    for name, module in (blocks or {}).items():
        handles.append(module.register_forward_pre_hook(lambda *_, n=name: stack.append(n)))
        handles.append(module.register_forward_hook(lambda *_: stack.pop() and None))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for h in handles:
            h.remove()
    out = {"total": sum(seen.values())}
    for key, n in seen.items():
        out[owner[key]] = out.get(owner[key], 0) + n
    return out


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by the ops that run under it and not yet freed (``live``) and their maximum
    (``peak``); storages that existed before (``exclude``: parameters, inputs) are not counted."""

    def __init__(self, exclude: Iterable[Tensor] = ()):
        super().__init__()
        self.skip = {_storage_key(t) for t in exclude}
        self.alive: dict[int, int] = {}
        self.live = self.peak = 0

    def _free(self, key: int) -> None:
        self.live -= self.alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                s = t.untyped_storage()
                key = id(s)
                if key in self.skip or key in self.alive:
                    continue
                self.alive[key] = s.nbytes()
                self.live += self.alive[key]
                self.peak = max(self.peak, self.live)
                weakref.finalize(s, self._free, key)
        return out


def _fused_sdpa(original):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or kwargs or query.dim() != 4:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        if query.dtype in (torch.float16, torch.bfloat16):
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, scale=scale
            )[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, True, dropout_p, is_causal, scale=scale
        )[0]

    return sdpa


@contextlib.contextmanager
def fused_attention():
    """Inside, ``F.scaled_dot_product_attention`` without a mask runs the fused kernels a GPU picks (flash attention
    for bf16/fp16, memory-efficient attention for fp32), which save O(L) per row rather than the L×L attention
    matrix; their meta kernels give the shapes on the meta device."""
    f = torch.nn.functional
    original = f.scaled_dot_product_attention
    f.scaled_dot_product_attention = _fused_sdpa(original)
    try:
        yield
    finally:
        f.scaled_dot_product_attention = original


def _cast_forward(module: nn.Module, dtype: torch.dtype):
    """The module's computation with its input and weights cast to ``dtype``, as autocast runs a convolution or a
    linear layer (the cast weights are copies, alive while the backward pass needs them)."""

    def forward(x: Tensor) -> Tensor:
        w = module.weight.to(dtype)
        b = None if module.bias is None else module.bias.to(dtype)
        if isinstance(module, nn.Linear):
            return torch.nn.functional.linear(x.to(dtype), w, b)
        return module._conv_forward(x.to(dtype), w, b)

    return forward


@contextlib.contextmanager
def emulated_autocast(network: nn.Module, dtype: torch.dtype = torch.bfloat16):
    """CUDA autocast's policy where it matters for memory, on a float32 network on any device (autocast itself needs
    a GPU): convolutions and linear layers take ``dtype`` copies of their input and weights and return ``dtype``;
    normalisation layers (GroupNorm, LayerNorm) run in float32, as autocast's float32 list has them; every other op
    follows type promotion, as under autocast."""
    patched = []
    for m in network.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and "forward" not in vars(m):
            m.forward = _cast_forward(m, dtype)
            patched.append(m)
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: tuple(a.float() if isinstance(a, Tensor) else a for a in args))
        for m in network.modules()
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm))
    ]
    try:
        yield
    finally:
        for m in patched:
            del m.forward
        for h in hooks:
            h.remove()


@dataclass(frozen=True)
class StepCost:
    """One forward and backward pass: the peak of the bytes alive beyond the weights and inputs (activations,
    temporaries, the gradients in flight; each parameter's gradient is dropped as soon as it is complete, so the
    gradients are counted apart) and the FLOPs, recomputation included."""

    peak_bytes: int
    flops: int


def step_cost(model: nn.Module, loss: Callable[[], Tensor], inputs: Iterable[Tensor] = ()) -> StepCost:
    """Run ``loss().backward()`` under ``LiveBytes`` and ``FlopCounterMode`` with fused attention (on the meta
    device it costs no memory). The parameters' gradients are released when complete
    (``register_post_accumulate_grad_hook``), so ``peak_bytes`` excludes them."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in model.parameters()]
    hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in params if p.requires_grad]
    live = LiveBytes(exclude=[*params, *model.buffers(), *inputs])
    counter = FlopCounterMode(display=False)
    try:
        with fused_attention(), counter, live:
            loss().backward()
    finally:
        for h in hooks:
            h.remove()
    return StepCost(live.peak, int(counter.get_total_flops()))


def _drop_grad(p: Tensor) -> None:
    p.grad = None
