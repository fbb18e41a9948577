"""The DSNO model: a backbone U-Net with Fourier temporal layers injected after chosen blocks (paper Sec. 3).

``DSNO(backbone, times)`` maps x_T to the trajectory {x(t_1), …, x(t_M)} in one forward pass:

* the backbone runs once on B·M items — item ``b*M + i`` is x_T of example b with the time embedding of
  t_i (labels and every other conditioning input, e.g. a prompt embedding, repeated likewise: each frame of an
  example gets the example's conditioning), so every ResBlock, GroupNorm and attention layer works per frame;
* after each injection point a ``TemporalBlock`` (u + LeakyReLU(K u), K a spectral convolution over the M
  frames) mixes the copies of one example. The blocks are attached with forward hooks that are active only
  inside ``DSNO.forward``: the backbone's modules, names and ``state_dict`` keys are untouched, so teacher
  weights load unchanged and ``backbone.eps_fn`` is still the plain teacher;
* channel counts are found by tracing one forward pass, so a new U-Net needs no table;
* frame pruning: after the last temporal layer the M frames of an example no longer interact, so a sample
  (frame t_M only) runs the rest of the network on B items instead of B·M. The backbone says where it can
  drop items (``Backbone.item_cut_points``, ``keep_items``); DSNO cuts at the first such point after its last
  temporal layer. Placements that end early (``through-mid``) leave the whole decoder to one frame.

Output parameterisation: the network's raw output on item (b, i) is taken as the prediction of the training
target at t_i (the teacher's denoised x̂_0 or the state x(t_i), chosen when collecting data), as in the
reference implementation whose teacher predicted x directly. The teacher's own output head (ε, x_0 or v
at state x_{t_i}) cannot be converted — DSNO never sees x_{t_i}, only x_T — so the head is a warm start
that training re-targets.

``output_skip`` (optional, issue 14's warm-start lever) reparameterises the output per frame as EDM does
(Karras et al. 2022, eq. 7), G_i = c_skip,i·x_T + c_out,i·F_i with F the network's raw output. Here the
coefficients are fitted to the collection (``fit_output_skip``): c_skip,i is the least-squares slope of the target
at t_i on the noise x_T (x_T explains about a third of a digits target's variance) and c_out,i the RMS of what is
left, so the network's own target has unit RMS, like the teacher's ε.

PSLD teachers: DSNO maps the phase-space noise z_T (B, 2C, H, W) (the PSLD prior, ``seeds.example_inputs``)
to the data's trajectory. The network's output on item (b, i) has 2C channels (a PSLD network predicts the HSM ε
of x and m); its x half (the first C channels) is the prediction of the target at t_i, and the m half is
dropped — the collected targets (x̂_0, or the x half of the states) have C channels.

``baseline=True`` gives the one-step knowledge-distillation baseline (Luhman & Luhman, 2021): the same
backbone, no temporal layers, one output at the last time.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .backbones import Backbone, load_backbone

FORMAT_VERSION = 1
CONFIG_KEY = "opdiff.dsno"  # safetensors metadata key holding DSNO.config()


@dataclass(frozen=True)
class InjectionPoint:
    """A module after which a temporal layer goes: its name in ``backbone.network`` and output channels."""

    name: str
    channels: int
    resolution: tuple[int, int]


def check_times(times: Sequence[float] | Tensor, backbone: Backbone, minimum: int = 2) -> Tensor:
    """Output times as a float64 (M,) tensor: strictly decreasing and inside the teacher's schedule range."""
    t = torch.as_tensor(times, dtype=torch.float64).flatten().cpu()
    if len(t) < minimum:
        raise ValueError(
            f"DSNO needs at least {minimum} output times, got {len(t)}; pass the M times of the training grid "
            "(e.g. the dataset's output times)"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"output times must be finite, got {t.tolist()}")
    if len(t) > 1 and not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"output times must be strictly decreasing (t_1 > … > t_M), got {t.tolist()}")
    backbone.schedule.check_times(t, "DSNO output time")
    return t


def _segment_glob(pattern: str) -> re.Pattern:
    """A dotted-name glob: ``*`` matches one name segment (``up.*.res.*`` matches ``up.1.res.0``, not its
    submodules), ``?`` one character of a segment."""
    body = re.escape(pattern).replace(r"\*", r"[^.]+").replace(r"\?", r"[^.]")
    return re.compile(body + r"\Z")


def resolve_placement(
    network: nn.Module,
    placement: str | Sequence[str | type] | None,
    default: Sequence[str],
    presets: dict[str, list[str]] | None = None,
) -> list[str]:
    """Module names for ``placement``: a preset name of ``presets`` (``"through-mid"``), or exact names, dotted
    globs (``"up.*.res.*"``) or ``nn.Module`` types. A selector that matches nothing raises ValueError with close
    names. Order is fixed later by tracing."""
    names = [n for n, _ in network.named_modules() if n]
    modules = dict(network.named_modules())
    presets = presets or {}
    if placement is None:
        placement = list(default)
    if isinstance(placement, (str, type)):
        placement = [placement]
    placement = [n for sel in placement for n in (presets[sel] if isinstance(sel, str) and sel in presets else [sel])]
    chosen: set[str] = set()
    for sel in placement:
        if isinstance(sel, type):
            hits = [n for n in names if isinstance(modules[n], sel)]
            what = f"module type {sel.__name__}"
        elif any(ch in sel for ch in "*?["):
            rx = _segment_glob(sel)
            hits = [n for n in names if rx.match(n)]
            what = f"pattern {sel!r}"
        else:
            hits = [sel] if sel in modules and sel else []
            what = f"module name {sel!r}"
        if not hits:
            close = difflib.get_close_matches(str(sel), [*presets, *names], n=4) or names[:4]
            known = f"; placement presets: {', '.join(presets)}" if presets else ""
            raise ValueError(
                f"injection point {what} matches no module of the backbone network; close names: "
                f"{', '.join(close)} (list them with `opdiff inspect --all-modules`){known}"
            )
        chosen.update(hits)
    nested = sorted(a for a in chosen for b in chosen if a != b and a.startswith(b + "."))
    if nested:
        raise ValueError(
            f"injection points {nested} lie inside other injection points; choose either the block or its parts"
        )
    return [n for n in names if n in chosen]


def trace_outputs(backbone: Backbone, names: Sequence[str]) -> dict[str, tuple[int, ...] | str]:
    """Run the backbone once (eval mode, no grad) on one zero image at t_max and record what each named module
    returns on its first call: the output shape (of the one tensor, or of the tensor in a 1-tuple), or the
    output's type name otherwise. Keys come
    in the order the forward pass reaches the modules; modules never called are absent."""
    modules = dict(backbone.network.named_modules())
    shapes: dict[str, tuple[int, ...] | str] = {}

    def recorder(name: str):
        def hook(module, args, output) -> None:  # returns None: the output is left as it is
            if isinstance(output, tuple) and len(output) == 1 and isinstance(output[0], Tensor):
                output = output[0]  # (features,): the temporal hook replaces the one element
            shapes.setdefault(name, tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__)

        return hook

    handles = [modules[n].register_forward_hook(recorder(n)) for n in names]
    x = torch.zeros(1, *backbone.state_shape, device=backbone.device, dtype=backbone.dtype)
    t = torch.full((1,), backbone.schedule.t_max, device=backbone.device)
    labels = None
    if backbone.num_classes:
        labels = torch.full((1,), backbone.null_label if backbone.null_label is not None else 0, device=backbone.device)
    cond = {k: torch.zeros(1, *s, device=backbone.device) for k, s in backbone.conditioning_shapes.items()}
    was_training = backbone.network.training
    try:
        backbone.network.eval()
        with torch.no_grad():
            backbone.forward(x, t, labels, **cond)
    finally:
        backbone.network.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def trace_injection_points(names: Sequence[str], shapes: dict[str, tuple[int, ...] | str]) -> list[InjectionPoint]:
    """Each named module's output channels and resolution from one traced forward pass (``shapes``, what
    ``trace_outputs`` returns); the points come back in the order the forward pass reaches them."""
    points = []
    for n in sorted(names, key=lambda n: list(shapes).index(n) if n in shapes else -1):
        shape = shapes.get(n)
        if shape is None:
            raise ValueError(
                f"injection point {n!r} is never called in the backbone's forward pass; choose another module"
            )
        if not isinstance(shape, tuple) or len(shape) != 4:
            raise ValueError(
                f"injection point {n!r} returns {shape}, not one (N, C, H, W) tensor (or a 1-tuple of one); choose a "
                "module that does (e.g. a ResBlock rather than a block returning (h, skips))"
            )
        points.append(InjectionPoint(n, int(shape[1]), (int(shape[2]), int(shape[3]))))
    return points


def frame_cut_point(order: Sequence[str], last: str, cuts: Sequence[str]) -> str | None:
    """The earliest of the backbone's item cut points ``cuts`` that completes no earlier than the last temporal
    layer's module ``last``, in the completion order ``order`` of one traced forward pass; None if there is
    none. After it the frames of an example no longer interact, so dropping frames there is exact."""
    rank = {n: i for i, n in enumerate(order)}
    after = [c for c in cuts if c in rank and rank[c] >= rank[last]]
    return min(after, key=rank.__getitem__) if after else None


def fit_output_skip(x_T: Tensor, targets: Tensor) -> Tensor:
    """Per-frame output preconditioning (c_skip,i, c_out,i), (M, 2) float64, fitted to training pairs:
    noise x_T (N, C, H, W) and targets (N, M, C, H, W). G_i = c_skip,i·x_T + c_out,i·F_i as EDM's eq. 7 (Karras
    et al. 2022), but with c_skip,i the ordinary least-squares slope of y_i on x_T over all elements (with an
    intercept) instead of EDM's σ_data²/(σ² + σ_data²), and c_out,i = RMS(y_i − c_skip,i·x_T), which makes the
    network's own target (y_i − c_skip,i·x_T)/c_out,i unit-RMS."""
    if x_T.ndim + 1 != targets.ndim or x_T.shape[0] != targets.shape[0] or x_T.shape[1:] != targets.shape[2:]:
        raise ValueError(
            f"fit_output_skip needs x_T (N, C, H, W) and targets (N, M, C, H, W), got {tuple(x_T.shape)} and "
            f"{tuple(targets.shape)}"
        )
    x = x_T.double().flatten(1)  # (N, D)
    y = targets.double().transpose(0, 1).flatten(2)  # (M, N, D)
    xc = x - x.mean()
    yc = y - y.mean(dim=(1, 2), keepdim=True)
    c_skip = (xc * yc).sum(dim=(1, 2)) / xc.square().sum()
    c_out = (y - c_skip[:, None, None] * x).square().mean(dim=(1, 2)).sqrt()
    return torch.stack([c_skip, c_out], dim=1)


def output_skip_at(table: Tensor, log_snr: Tensor, query_log_snr: Tensor) -> Tensor:
    """The (c_skip, c_out) rows of ``table`` (fitted at times of log-SNR ``log_snr``) at other times: piecewise
    linear in log-SNR, constant beyond the first and last fitted time. (M, 2), (M,), (K,) → (K, 2)."""
    order = torch.argsort(log_snr)
    xs, tab, q = log_snr[order].double(), table[order].double(), query_log_snr.double()
    if len(xs) == 1:
        return tab.expand(len(q), 2).clone()
    q = q.clamp(xs[0], xs[-1])
    j = torch.searchsorted(xs, q).clamp(1, len(xs) - 1)
    w = ((q - xs[j - 1]) / (xs[j] - xs[j - 1]))[:, None]
    return (1 - w) * tab[j - 1] + w * tab[j]


def frame_items(batch: int, num_frames: int, frames: Sequence[int]) -> Tensor:
    """Items b·M + i of the kept frames i (in the order given) of every example b: (B·K,) long, example-major."""
    f = torch.as_tensor(list(frames), dtype=torch.long)
    return (torch.arange(batch)[:, None] * num_frames + f[None, :]).flatten()


def _block_key(name: str) -> str:
    """ModuleDict key for an injection point (keys may not contain '.')."""
    return name.replace(".", "__")


class _TemporalHook:
    """Forward hook applying one temporal block while its DSNO is inside ``forward``.

    An object rather than a closure so that ``copy.deepcopy(dsno)`` (EMA copies) re-binds the copy's hooks to
    the copied model and its own temporal blocks."""

    def __init__(self, dsno: "DSNO", key: str):
        self.dsno, self.key = dsno, key

    def __call__(self, module: nn.Module, args, output: Tensor | tuple[Tensor]) -> Tensor | tuple[Tensor] | None:
        m = self.dsno._num_frames
        if m is None:  # outside DSNO.forward: the backbone behaves as the plain teacher
            return None
        if isinstance(output, tuple):  # a module returning (features,), e.g. diffusers' Transformer2DModel
            return (self(module, args, output[0]),)
        n, c, h, w = output.shape
        u = output.reshape(n // m, m, c, h, w)  # (B*M, C, H, W) -> (B, M, C, H, W), item b*M+i
        return self.dsno.temporal[self.key](u).reshape(n, c, h, w)


class _FrameCheckpoint:
    """``checkpoint(block, *args)`` for a backbone's gradient checkpointing: ``torch.utils.checkpoint`` (non-
    reentrant, RNG state preserved) of the block's call with DSNO's frame count of the forward pass, so that the
    temporal layers hooked inside the block act when the backward pass recomputes it too (outside
    ``DSNO.forward``, where they are otherwise inert). An object bound to its DSNO, as ``_TemporalHook``, so that
    ``copy.deepcopy`` re-binds it to the copy."""

    def __init__(self, dsno: "DSNO"):
        self.dsno = dsno

    def __call__(self, block, *args):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self._run, self.dsno._num_frames, block, *args, use_reentrant=False)

    def _run(self, frames: int | None, block, *args):
        with self.dsno._frames(frames):
            return block(*args)


class DSNO(nn.Module):
    """Operator-learning one-step sampler built on a backbone (paper Sec. 3, Fig. 1).

    Args:
        backbone: the teacher's ``Backbone`` (its weights are the initialisation).
        times: the M output times t_1 > … > t_M of the training grid (schedule time, e.g. the dataset's).
        modes: Fourier modes J kept by every temporal layer (1 ≤ J ≤ M//2 + 1; the paper uses 2 for M = 4).
        placement: injection points: a preset of ``backbone.placement_presets`` (``"full"``, and for opdiff-unet
            ``"through-mid"`` and ``"through-up1"``, which end the temporal layers early), or names, glob patterns
            or module types; default ``backbone.default_injection_points`` (after every ResBlock and the mid block).
        init: ``"zero"`` (exact identity: DSNO starts as the teacher network) or ``"small"`` (reference init).
        negative_slope: LeakyReLU slope of the temporal layers (0.01 in the paper).
        baseline: the one-step distillation baseline (no temporal layers, one output at t_M).
        output_skip: None (the raw network output is the prediction) or (c_skip, c_out) per output time, (M, 2)
            (the baseline: (1, 2)), from ``fit_output_skip``: the prediction at t_i is c_skip,i·x_T + c_out,i·F_i.

    ``forward(x_T, labels=None, times=None, frames=None)`` → (B, M, C, H, W). ``times`` evaluates the operator on
    other query times (App. A.3): the temporal layers treat the times as equispaced samples in index, as in
    training. ``frames`` keeps only those output frames and, where the backbone can drop items
    (``item_cut_points``), runs everything after the last temporal layer on them alone (``cut_point``).
    With a PSLD backbone x_T is the state z_T (B, 2C, H, W) and the output the x half, still (B, M, C, H, W).
    """

    def __init__(
        self,
        backbone: Backbone,
        times: Sequence[float] | Tensor,
        modes: int = 2,
        placement: Sequence[str | type] | None = None,
        init: str = "zero",
        negative_slope: float = 0.01,
        baseline: bool = False,
        output_skip: Sequence[Sequence[float]] | Tensor | None = None,
    ):
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone must be an operator_diffusion Backbone, got {type(backbone).__name__}")
        self.backbone = backbone
        self.network = backbone.network  # registered here so DSNO.state_dict() holds network.* keys
        self.baseline = bool(baseline)
        self.modes = int(modes)
        self.init = init
        self.negative_slope = float(negative_slope)
        all_times = check_times(times, backbone, minimum=1 if baseline else 2)
        # The baseline has one output, at the end of the trajectory; DSNO keeps all M.
        self.register_buffer("times", all_times[-1:] if baseline else all_times, persistent=False)
        self.train_times = all_times
        self.output_skip = None if output_skip is None else self.check_output_skip(output_skip, len(self.times))
        self.temporal = nn.ModuleDict()
        self.injection_points: list[InjectionPoint] = []
        # the baseline has no temporal layer: its one frame is the whole output
        self.cut_point: str | None = None
        self._num_frames: int | None = None  # set only inside forward: hooks are inert otherwise
        if self.baseline:
            return
        m = len(all_times)
        if not 1 <= self.modes <= m // 2 + 1:
            raise ValueError(
                f"modes={self.modes} is out of range for M={m} output times: use 1 <= modes <= {m // 2 + 1} (M//2+1)"
            )
        names = resolve_placement(
            backbone.network, placement, backbone.default_injection_points, backbone.placement_presets
        )
        cuts = backbone.item_cut_points
        shapes = trace_outputs(backbone, [*names, *(c for c in cuts if c not in names)])
        self.injection_points = trace_injection_points(names, shapes)
        # frame pruning: where the forward pass may continue on the requested frames only (None: never)
        self.cut_point = frame_cut_point(list(shapes), self.injection_points[-1].name, cuts)
        from .operators import TemporalBlock  # lazy: neuralop is a heavy import

        modules = dict(backbone.network.named_modules())
        ref = next(iter(backbone.network.parameters()))
        for p in self.injection_points:
            block = TemporalBlock(p.channels, self.modes, m, init=init, negative_slope=self.negative_slope)
            self.temporal[_block_key(p.name)] = block.to(device=ref.device)
            modules[p.name].register_forward_hook(_TemporalHook(self, _block_key(p.name)))

    # ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _frames(self, m: int | None):
        previous, self._num_frames = self._num_frames, m
        try:
            yield
        finally:
            self._num_frames = previous

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory in training: the backbone's blocks are recomputed in the backward pass
        (``Backbone.enable_gradient_checkpointing``) instead of keeping their activations. The gradients are the
        same: a recomputed block sees the same temporal layers (``_FrameCheckpoint``), the same RNG state (dropout)
        and the same autocast state as in the forward pass."""
        self.backbone.enable_gradient_checkpointing(_FrameCheckpoint(self))

    @property
    def num_times(self) -> int:
        return len(self.times)

    def forward(
        self,
        x_T: Tensor,
        labels: Tensor | None = None,
        times: Sequence[float] | Tensor | None = None,
        frames: Sequence[int] | None = None,
        **cond: Tensor,
    ) -> Tensor:
        """Predicted trajectory (B, M, C, H, W) at ``times`` (default: the training times) from noise x_T
        (B, *backbone.state_shape); ``cond``: the backbone's conditioning inputs beyond labels
        (``Backbone.conditioning_shapes``, e.g. ``encoder_hidden_states``), one per example, given to all its frames.

        ``frames`` (indices into the times, e.g. ``[-1]`` for the sample at t_M) returns only those frames,
        (B, K, C, H, W), and runs every block after the last temporal layer on them alone (frame pruning, at
        ``cut_point``): the same numbers as the full output's frames, for less compute."""
        bb = self.backbone
        labels = bb.check_inputs(x_T, labels)
        cond = bb.check_conditioning(x_T, cond)
        t = self.times if times is None else self.query_times(times)
        b, m = x_T.shape[0], len(t)
        keep = None if frames is None else self.check_frames(frames, m)
        x = x_T.repeat_interleave(m, dim=0)  # (B, C, H, W) -> (B*M, C, H, W), item b*M+i = x_T[b]
        t_items = t.to(x_T.device).repeat(b)  # item b*M+i has time t_i
        lab = None if labels is None else labels.repeat_interleave(m)
        cond_items = {k: v.repeat_interleave(m, dim=0) for k, v in cond.items()}  # every frame: its example's input
        prune = keep is not None and self.cut_point is not None and len(keep) < m
        with self._frames(m), contextlib.ExitStack() as stack:
            if prune:
                stack.enter_context(bb.keep_items(self.cut_point, frame_items(b, m, keep).to(x_T.device)))
            out = bb.forward(x, t_items, lab, **cond_items)
        out = bb.schedule.data_part(out)  # PSLD: (B*M, 2C, H, W) -> the x half (B*M, C, H, W)
        if not prune:
            out = out.reshape(b, m, *out.shape[1:])
            out = out if keep is None else out[:, keep]
        else:
            out = out.reshape(b, len(keep), *out.shape[1:])
        if self.output_skip is not None:
            skip = self._skip_rows(t if times is not None else None)
            skip = skip if keep is None else skip[keep]
            c = skip.to(device=out.device, dtype=out.dtype)[None, :, :, None, None, None]  # (1, K, 2, 1, 1, 1)
            out = c[:, :, 0] * bb.schedule.data_part(x_T)[:, None] + c[:, :, 1] * out
        return out

    def _skip_rows(self, query: Tensor | None) -> Tensor:
        """(c_skip, c_out) of each output time: the fitted rows, or interpolated at query times (App. A.3)."""
        if query is None:
            return self.output_skip
        snr = self.backbone.schedule.data_log_snr
        return output_skip_at(self.output_skip, snr(self.times.double().cpu()), snr(query.double().cpu()))

    @staticmethod
    def check_output_skip(table: Sequence[Sequence[float]] | Tensor, num_times: int) -> Tensor:
        """``output_skip`` as a float64 (M, 2) tensor: one finite (c_skip, c_out) row per output time, c_out > 0."""
        t = torch.as_tensor(table, dtype=torch.float64).cpu()
        if t.shape != (num_times, 2):
            raise ValueError(
                f"output_skip must hold one (c_skip, c_out) row per output time, shape ({num_times}, 2); "
                f"got {tuple(t.shape)}"
            )
        if not torch.isfinite(t).all() or not (t[:, 1] > 0).all():
            raise ValueError(f"output_skip needs finite rows with c_out > 0, got {t.tolist()}")
        return t

    @staticmethod
    def check_frames(frames: Sequence[int], num_frames: int) -> list[int]:
        """Frame indices in [0, M) (negative ones count from the end, as in Python), in the order given."""
        out = []
        for f in frames:
            try:
                if isinstance(f, bool):
                    raise TypeError
                i = operator.index(f)
            except TypeError:
                raise TypeError(f"frames must be integer indices into the output times, got {f!r}") from None
            if not -num_frames <= i < num_frames:
                raise ValueError(f"frame index {i} is out of range for {num_frames} output times")
            out.append(i % num_frames)
        if not out:
            raise ValueError("frames is empty: ask for at least one output frame (e.g. [-1], the sample)")
        if len(set(out)) != len(out):
            raise ValueError(f"frames {list(frames)} repeat an output time")
        return out

    def query_times(self, times: Sequence[float] | Tensor) -> Tensor:
        """Validated query times (App. A.3) as a float64 tensor on the model's device: strictly decreasing, inside
        the schedule, and enough of them for the temporal layers' Fourier modes (ValueError otherwise)."""
        if self.baseline:
            raise ValueError("the one-step baseline has a single output time; it cannot be queried at other times")
        t = check_times(times, self.backbone, minimum=1).to(self.times.device)
        if len(t) // 2 + 1 < self.modes:
            raise ValueError(
                f"{len(t)} query times carry only {len(t) // 2 + 1} Fourier modes but the temporal layers use "
                f"{self.modes}; query at least {2 * (self.modes - 1)} times"
            )
        return t

    @torch.no_grad()
    def sample(self, x_T: Tensor, labels: Tensor | None = None, **cond: Tensor) -> Tensor:
        """One-NFE sample: the output at the last time t_M, (B, C, H, W) (PSLD: the x half), frame-pruned."""
        return self.forward(x_T, labels, frames=[-1], **cond)[:, 0]

    # ----------------------------------------------------------------------------------------------
    def parameter_report(self) -> dict[str, Any]:
        """Parameter counts: backbone, temporal layers (per injection point) and the overhead fraction."""
        backbone = sum(p.numel() for p in self.network.parameters())
        rows = [
            {
                "name": p.name,
                "channels": p.channels,
                "resolution": list(p.resolution),
                "parameters": sum(q.numel() for q in self.temporal[_block_key(p.name)].parameters()),
            }
            for p in self.injection_points
        ]
        temporal = sum(r["parameters"] for r in rows)
        return {
            "backbone_parameters": backbone,
            "temporal_parameters": temporal,
            "overhead": temporal / backbone,
            "injection_points": rows,
            "frame_cut_point": self.cut_point,
        }

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description: ``DSNO.from_config`` rebuilds the architecture (weights excluded)."""
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone.config(),
            "times": self.train_times.tolist(),
            "modes": self.modes,
            "placement": [p.name for p in self.injection_points],
            "init": self.init,
            "negative_slope": self.negative_slope,
            "baseline": self.baseline,
            **({} if self.output_skip is None else {"output_skip": self.output_skip.tolist()}),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DSNO":
        version = config.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"DSNO config has format_version {version!r}; this opdiff reads version {FORMAT_VERSION} "
                "(re-export the model with a matching opdiff version)"
            )
        backbone = load_backbone(**config["backbone"])
        return cls(
            backbone,
            config["times"],
            modes=config["modes"],
            placement=config["placement"] or None,
            init=config["init"],
            negative_slope=config["negative_slope"],
            baseline=config["baseline"],
            output_skip=config.get("output_skip"),  # absent in models saved before the option
        )

    def save(self, path: str | Path) -> None:
        """Write all weights (``network.*`` and ``temporal.*``) to .safetensors with ``config()`` in the metadata."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        save_file(
            tensors,
            str(path),
            metadata={CONFIG_KEY: json.dumps(self.config()), "format": f"opdiff-dsno/{FORMAT_VERSION}"},
        )

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "DSNO":
        """Rebuild a DSNO saved with ``save`` (safetensors only; never unpickles)."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"DSNO checkpoint {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path), device=str(map_location))
        except SafetensorError as e:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({e})") from None
        if CONFIG_KEY not in meta:
            raise ValueError(
                f"{str(path)!r} has no DSNO config in its metadata: it is not a DSNO checkpoint saved by opdiff "
                "(a teacher checkpoint goes to the backbone's `checkpoint=` option instead)"
            )
        model = cls.from_config(json.loads(meta[CONFIG_KEY])).to(map_location)
        model.load_state_dict(state)
        return model

    def extra_repr(self) -> str:
        kind = (
            "baseline (one-step distillation)"
            if self.baseline
            else f"modes={self.modes}, points={len(self.injection_points)}"
        )
        skip = "" if self.output_skip is None else ", output_skip=fit"
        return f"backbone={self.backbone.name!r}, times={[round(float(t), 6) for t in self.train_times]}, {kind}{skip}"
