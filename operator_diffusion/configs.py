"""The frozen configs of the pipeline's stages, in a module that imports no torch: the CLI reads its flags'
defaults from their fields (``field_default``) without paying torch's import at start-up. Each stage's module
(``training`` for ``TrainConfig``) re-exports its config and does the work."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "TrainConfig",
    "field_default",
    "INIT_SCRATCH",
    "WEIGHTINGS",
    "LOSSES",
    "RESUMABLE_FIELDS",
    "LATER_FIELDS",
    "HUBER_C_PER_SQRT_DIM",
]


def field_default(config: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``config`` (what a CLI flag defaults to)."""
    f = {f.name: f for f in dataclasses.fields(config)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{config.__name__}.{name} has no default")


WEIGHTINGS = ("sqrt-snr", "snr", "uniform")
LOSSES = ("l1", "l2", "pseudo-huber")
HUBER_C_PER_SQRT_DIM = 0.00054  # iCT (Song & Dhariwal, 2023): c = 0.00054·√D, D = C·H·W
# Fields that may change between a run and its resumption (they do not change what is trained).
RESUMABLE_FIELDS = ("max_steps", "save_every", "log_every", "keep_checkpoints", "trackers")
# Fields added after runs were made: left out of the identity while None (their old behaviour), so those runs resume.
LATER_FIELDS = ("huber_c", "final_weight", "placement")
INIT_SCRATCH = "scratch"  # init_from: the backbone's own initialisation (runs made before the teacher default had None)


@dataclass(frozen=True)
class TrainConfig:
    """What to train; everything except ``RESUMABLE_FIELDS`` is the run's identity."""

    data: str  # collection directory or Hub id (``opdiff collect``)
    out: str  # run directory
    init_from: str | None = None  # weights to start from (.safetensors); None: the collection's teacher; "scratch"
    backbone: str | None = None  # default: the backbone recorded in the collection
    backbone_options: dict[str, Any] = field(default_factory=dict)
    modes: int = 2
    # where the temporal layers go: a backbone placement preset ("full", "through-mid", "through-up1" for
    # opdiff-unet) or comma-separated module names/globs; None: the backbone's default (full)
    placement: str | None = None
    weighting: Literal["sqrt-snr", "snr", "uniform"] = "sqrt-snr"
    weight_min: float = 1.0
    weight_max: float = 1e4
    loss: Literal["l1", "l2", "pseudo-huber"] = "l1"
    huber_c: float | None = None  # pseudo-Huber c; None: iCT's 0.00054·√(C·H·W)
    final_weight: float | None = None  # replaces w(t_M), the last output's loss weight; None: w(t_M)
    batch_size: int = 64  # per process and micro-step
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 1000  # linear LR warm-up from lr·1e-3 (reference: 10k)
    lr_decay: Literal["constant", "cosine", "linear"] = (
        "constant"  # after warm-up (reference: constant); to 0 at max_steps
    )
    ema: float = 0.9999
    mixed_precision: Literal["bf16", "fp16", "no"] | None = None  # None: bf16 on GPU, no on CPU
    max_steps: int = 10_000  # optimizer steps
    baseline: bool = False  # one-step distillation baseline
    init: Literal["zero", "small"] = "zero"  # temporal layer init ("zero": starts as the teacher)
    seed: int = 0
    save_every: int = 1000
    log_every: int = 10
    keep_checkpoints: int = 2
    trackers: tuple[str, ...] = ()  # accelerate trackers, e.g. ("tensorboard",) or ("wandb",)

    @property
    def placement_selectors(self) -> list[str] | None:
        """``placement`` as DSNO's selectors (None: the backbone's default)."""
        if self.placement is None:
            return None
        return [p.strip() for p in self.placement.split(",") if p.strip()]

    def identity(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in RESUMABLE_FIELDS + ("out",):
            d.pop(k)
        for k in LATER_FIELDS:
            if d[k] is None:
                d.pop(k)
        if d["init_from"] == INIT_SCRATCH:  # what None meant before the teacher became the default: those resume
            d["init_from"] = None
        return json.loads(json.dumps(d))
