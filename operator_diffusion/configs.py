"""The frozen configs of the pipeline's stages, in a module that imports no torch: the CLI reads its flags'
defaults from their fields (``field_default``) without paying torch's import at start-up. Each stage's module
does the work from its config: ``training.train`` (``TrainConfig``), ``sampling.plan_sample`` / ``run_sample``
(``SampleConfig``), ``bench.plan_bench`` / ``run_bench`` (``BenchConfig``) and ``fid.evaluate_fid``
(``FIDConfig``). The sample, bench and FID configs check their plain values in ``__post_init__`` (one-line
ValueErrors naming the flag and what to do); what needs the run, the teacher or the files is checked when the
stage plans."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, Union

__all__ = [
    "TrainConfig",
    "SampleConfig",
    "BenchConfig",
    "FIDConfig",
    "parse_int_list",
    "parse_time_list",
    "parse_key_values",
    "split_items",
    "parse_solver_grids",
    "parse_solver_options",
    "field_default",
    "INIT_SCRATCH",
    "WEIGHTINGS",
    "LOSSES",
    "RESUMABLE_FIELDS",
    "LATER_FIELDS",
    "OUTPUT_SKIPS",
    "TRAINABLE_KEYWORDS",
    "trainable_selectors",
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


# --------------------------------------------------------------------------------------------------
# Shared checkers (pure Python: every config's __post_init__ and the stages use them)
# --------------------------------------------------------------------------------------------------
SEED_MAX = 2**63 - 1  # seeds seed torch generators and are stored as int64 (a collection's seed column)
LR_DECAYS = ("constant", "cosine", "linear")
MIXED_PRECISIONS = ("bf16", "fp16", "no")  # Accelerate's mixed_precision


def check_seed(seed: int, count: int = 1, flag: str = "--seed") -> None:
    """Refuse a first seed ``seed`` of ``count`` consecutive ones (seed, seed + 1, …) outside 0..2^63 − 1."""
    top = SEED_MAX - max(count - 1, 0)
    if not 0 <= seed <= top:
        more = f" for {count} consecutive seeds" if count > 1 else ""
        raise ValueError(f"{flag} {seed} is out of range: it must be an integer from 0 to {top}{more}, e.g. {flag} 0")


def check_decay(decay: str, warmup: int, max_steps: int | None) -> None:
    """Refuse an unknown decay, or a decaying one without decay steps (max_steps must exceed warmup)."""
    if decay not in LR_DECAYS:
        raise ValueError(f"unknown learning-rate decay {decay!r}; valid: {', '.join(LR_DECAYS)}")
    if decay != "constant" and (max_steps is None or max_steps <= warmup):
        raise ValueError(
            f"a {decay} learning-rate decay needs max_steps > warmup ({warmup}), got {max_steps}; "
            "raise --max-steps or lower --warmup"
        )


RUN_COUNTS = ("batch_size", "grad_accum", "max_steps", "save_every", "log_every", "keep_checkpoints")


def check_run_numbers(config) -> None:
    """The settings every trainer's config shares: the counts in ``RUN_COUNTS`` are integers >= 1, ``warmup`` an
    integer >= 0 with a valid ``lr_decay``, ``lr`` finite and > 0, ``ema`` in [0, 1), ``seed`` a torch seed in
    0..2^63 − 1. ValueError names the flag."""
    for name in RUN_COUNTS:
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not isinstance(config.warmup, int) or isinstance(config.warmup, bool) or config.warmup < 0:
        raise ValueError(f"warmup (--warmup) must be an integer >= 0, got {config.warmup!r}")
    check_decay(config.lr_decay, config.warmup, config.max_steps)
    lr = config.lr
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number (--lr, finite and > 0), got {lr!r}")
    if not 0 <= config.ema < 1:
        raise ValueError(f"ema must lie in [0, 1), got {config.ema}")
    check_seed(config.seed)


def check_positive(name: str, value: float | None) -> None:
    """Refuse an optional setting that is given but is not a finite number > 0 (None passes)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if value is not None and not ok:
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{name} ({flag}) must be a finite number > 0, got {value!r}; omit it for the default")


TRAINABLE_KEYWORDS = ("all", "temporal", "norms")  # --trainable's keywords (``finetune.select_trainable``)


def trainable_selectors(spec: str) -> list[str]:
    """The selectors of a ``--trainable`` spec (``"temporal+norms"`` → ``["temporal", "norms"]``; ``,`` or ``+``
    joins them), ValueError when it has none."""
    selectors = [s.strip() for s in re.split(r"[,+]", spec) if s.strip()]
    if not selectors:
        raise ValueError(
            f"trainable (--trainable) {spec!r} names no parameters; give all, temporal, norms, globs over parameter "
            "names, or a combination such as temporal+norms"
        )
    return selectors


WEIGHTINGS = ("sqrt-snr", "snr", "uniform")
LOSSES = ("l1", "l2", "pseudo-huber")
HUBER_C_PER_SQRT_DIM = 0.00054  # iCT (Song & Dhariwal, 2023): c = 0.00054·√D, D = C·H·W
# Fields that may change between a run and its resumption (they do not change what is trained).
# gradient_checkpointing trades compute for memory and gives the same gradients (tests/test_memory.py): a run may resume
# with or without it (on a smaller GPU, say).
RESUMABLE_FIELDS = ("max_steps", "save_every", "log_every", "keep_checkpoints", "trackers", "gradient_checkpointing")
# Fields added after runs were made: left out of the identity while None (their old behaviour), so those runs resume.
LATER_FIELDS = ("huber_c", "final_weight", "placement", "output_skip", "trainable", "lora_rank", "lora_targets")
OUTPUT_SKIPS = ("fit",)  # TrainConfig.output_skip: per-frame c_skip·x_T + c_out·F fitted to the data (adapter)
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
    # per-frame output preconditioning G_i = c_skip,i·x_T + c_out,i·F_i: "fit" (to the data); None: the raw output
    output_skip: Literal["fit"] | None = None
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
    # memory at scale: recompute the backbone's blocks in the backward pass instead of keeping their activations
    gradient_checkpointing: bool = False
    # the parameters that train (``finetune.select_trainable``): "all", "temporal", "norms", globs over parameter
    # names, joined by "," or "+" (e.g. "temporal+norms"); the others stay the teacher's; None: all
    trainable: str | None = None
    # LoRA adapters of this rank on the backbone's Linear/Conv2d layers (``finetune.add_lora``), merged at export;
    # with it the teacher's weights stay frozen and, unless ``trainable`` says otherwise, the adapters and the
    # temporal layers train. ``lora_targets``: globs over those layers' names (None: all of them)
    lora_rank: int | None = None
    lora_targets: str | None = None

    def __post_init__(self) -> None:
        """The checks that need neither torch nor the data (``training.plan_run`` does the rest); one-line
        ValueErrors naming the flag."""
        check_run_numbers(self)
        check_positive("weight_min", self.weight_min)
        check_positive("weight_max", self.weight_max)
        if self.weight_min > self.weight_max:
            raise ValueError(
                f"weight_min ({self.weight_min}) is above weight_max ({self.weight_max}): the clamp would invert; "
                "swap them"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        check_positive("huber_c", self.huber_c)
        if self.huber_c is not None and self.loss != "pseudo-huber":
            raise ValueError(
                f"huber_c (--huber-c) applies to the pseudo-huber loss only, not {self.loss!r}; "
                "drop it or pass --loss pseudo-huber"
            )
        check_positive("final_weight", self.final_weight)
        if self.output_skip not in (*OUTPUT_SKIPS, None):
            raise ValueError(
                f"unknown output skip {self.output_skip!r}; valid: {', '.join(OUTPUT_SKIPS)} (or none: the raw output)"
            )
        if self.baseline and self.placement is not None:
            raise ValueError(
                "placement (--placement) places temporal layers, which the one-step baseline has none of; drop it"
            )
        if self.placement is not None and not self.placement_selectors:
            raise ValueError(
                f"placement (--placement) {self.placement!r} names no module; omit it for the full placement"
            )
        if self.trainable is not None:
            trainable_selectors(self.trainable)
        if self.lora_rank is not None and (
            isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1
        ):
            raise ValueError(f"lora_rank (--lora-rank) must be an integer >= 1, got {self.lora_rank!r}")
        if self.lora_targets is not None:
            if self.lora_rank is None:
                raise ValueError("lora_targets (--lora-targets) chooses LoRA's layers; pass --lora-rank too")
            trainable_selectors(self.lora_targets)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}")
        if self.mixed_precision not in (*MIXED_PRECISIONS, None):
            raise ValueError(f"unknown mixed precision {self.mixed_precision!r}; valid: {', '.join(MIXED_PRECISIONS)}")

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


# --------------------------------------------------------------------------------------------------
# Parsers of the flags' text (torch-free; ValueError names the flag)
# --------------------------------------------------------------------------------------------------
def _parse_list(spec: str, flag: str, kind: type, what: str, example: str, empty: str) -> tuple:
    try:
        values = tuple(kind(v) for v in spec.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"bad {flag} {spec!r}: give comma-separated {what}, e.g. {example}") from None
    if not values:
        raise ValueError(empty)
    return values


def parse_int_list(spec: str, flag: str) -> tuple[int, ...]:
    """``"1,2,5"`` → ``(1, 2, 5)``; text that is not a non-empty list of integers is a ValueError."""
    return _parse_list(spec, flag, int, "integers", "1,2,3,5,10,20", f"{flag} needs positive integers, got {spec!r}")


def parse_time_list(spec: str, flag: str) -> tuple[float, ...]:
    """``"0.5,0.25"`` → ``(0.5, 0.25)``; text that is not a non-empty list of numbers is a ValueError."""
    return _parse_list(spec, flag, float, "times", "0.5,0.25,0.001", f"{flag} is empty")


def split_items(items: Sequence[str]) -> tuple[str, ...]:
    """Repeatable, comma-separated flag values as one tuple: ``["png,npz", "grid"]`` → ``("png", "npz", "grid")``."""
    return tuple(f.strip() for item in items for f in item.split(",") if f.strip())


def parse_key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``["preset=tiny", "num_classes=10"]`` → ``{"preset": "tiny", "num_classes": 10}`` (values parsed as JSON
    when they are JSON, else kept as strings); a malformed item is a ValueError."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r} is not KEY=VALUE (e.g. {flag} preset=tiny)")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def parse_solver_grids(items: Sequence[str]) -> dict[str, str]:
    """``["unipc=logsnr"]`` → ``{"unipc": "logsnr"}`` (which solvers and grids exist is the bench plan's check)."""
    out = {}
    for item in items:
        name, sep, grid = item.partition("=")
        if not sep or not name.strip() or not grid.strip():
            raise ValueError(f"bad --solver-grid {item!r}: give SOLVER=GRID, e.g. unipc=logsnr")
        out[name.strip()] = grid.strip()
    return out


def parse_solver_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["unipc:order=2,variant=bh1"]`` → ``{"unipc": {"order": 2, "variant": "bh1"}}`` (values parsed as JSON)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"bad --solver-options {item!r}: give SOLVER:KEY=VALUE[,KEY=VALUE], e.g. unipc:order=2")
        out.setdefault(name.strip(), {}).update(parse_key_values(rest.split(","), "--solver-options"))
    return out


def _refuse(checks: Sequence[tuple[bool, str]]) -> None:
    """Raise ValueError with the message of the first check that fails (``__post_init__``'s shared checker)."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _at_least(value: int | None, low: int, flag: str, why: str = "") -> tuple[bool, str]:
    return (value is None or value >= low, f"{flag} must be at least {low}{why} (got {value})")


# --------------------------------------------------------------------------------------------------
# sample, bench, fid
# --------------------------------------------------------------------------------------------------
SAMPLE_FORMATS = ("png", "npz", "grid")  # a sample folder's parts (``sampling.SampleWriter``)
SAMPLE_NUM = 64  # samples when neither num nor seeds is given
BENCH_NUM = 1000  # held-out seeds of a bench when neither num nor seeds is given
FID_RUN_NUM = 10_000  # samples drawn from a run SOURCE when num is not given
DEFAULT_NFES = (1, 2, 3, 5, 10, 20)  # the bench's solver budgets
CLEANFID_PREFIX = "cleanfid:"  # clean-fid's published statistics as an FID reference
Seeds = Union[str, int, Sequence[int], None]  # a seed list as ``seeds.parse_seeds`` takes it; None: held out


@dataclass(frozen=True)
class SampleConfig:
    """What `opdiff sample` draws (``sampling.plan_sample`` checks it against the run, ``run_sample`` writes)."""

    run: str  # an `opdiff train` run folder, or a DSNO .safetensors checkpoint
    out: str  # the sample folder
    num: int | None = None  # None: SAMPLE_NUM, or the number of seeds
    seeds: Seeds = None  # None: num seeds right after the training seeds
    formats: tuple[str, ...] = ("png", "grid")  # among SAMPLE_FORMATS
    times: str = "final"  # the outputs kept: "final" (the sample), "all", or comma-separated output times
    query_times: tuple[float, ...] | None = None  # evaluate the operator at these times (App. A.3)
    labels: str | None = None  # class-conditional models: "random" (None), one class or a comma list
    prompts: tuple[str, ...] = ()  # text-conditioned models: seed s takes prompt s mod len
    batch_size: int = 256  # does not change the images
    device: str = "auto"
    compile: bool = False  # DSNO (and the teacher) under torch.compile (``compilation``): float round-off only
    teacher: bool = False  # also sample the teacher into out/teacher
    teacher_checkpoint: str | None = None  # the teacher's weights (default: found from the run)
    solver: str | None = None  # teacher solver, steps and grid (default: the collection's)
    steps: int | None = None
    grid: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(dict.fromkeys(self.formats)))
        bad = [f for f in self.formats if f not in SAMPLE_FORMATS]
        teacher_only = self.teacher_checkpoint or self.solver or self.steps or self.grid
        _refuse(
            [
                (
                    not bad and bool(self.formats),
                    f"unknown --format {', '.join(bad) or '(empty)'}; valid: {', '.join(SAMPLE_FORMATS)} "
                    "(repeatable or comma-separated)",
                ),
                _at_least(self.batch_size, 1, "--batch-size"),
                (
                    self.teacher or not teacher_only,
                    "--teacher-checkpoint/--solver/--steps/--grid only apply with --teacher",
                ),
                (
                    not (self.teacher and self.query_times),
                    "--teacher samples the final time only; drop --query-times (or run twice)",
                ),
                _at_least(self.steps, 1, "--steps"),
                _at_least(self.num, 1, "--num"),
            ]
        )
        if self.times not in ("final", "all"):
            parse_time_list(self.times, "--times")


@dataclass(frozen=True)
class BenchConfig:
    """What `opdiff bench` compares (``bench.plan_bench`` resolves it into a ``BenchSetup``, ``run_bench`` runs
    it): DSNO at 1 NFE, the baseline and the solvers at ``nfes`` against the teacher's reference solution."""

    run: str  # the DSNO run folder
    baseline: str | None = None  # a one-step baseline run on the same data
    num: int | None = None  # held-out seeds (None: BENCH_NUM, or the number of seeds)
    seeds: Seeds = None  # None: num seeds right after every run's training seeds
    solvers: tuple[str, ...] | None = None  # None: the teacher process's bench_solvers
    nfes: tuple[int, ...] = DEFAULT_NFES  # the solvers' budgets (sorted, each once)
    grid: str | None = None  # one time grid for every solver (None: each solver's own)
    solver_grids: dict[str, str] = field(default_factory=dict)  # a solver's grid
    solver_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # a solver's options
    tune: bool = False  # pick each solver's grid and options per NFE on tuning seeds
    tune_seeds: Seeds = None  # None: TUNE_NUM seeds after the reported ones
    reference_solver: str | None = None  # the reference solution (default: the collection's solver and steps)
    reference_steps: int | None = None
    reference_grid: str | None = None  # default: the collection's grid
    reference_options: dict[str, Any] | None = None  # default: the collection's options for its own solver
    teacher_checkpoint: str | None = None  # the teacher's weights (default: found from the run)
    labels: str | None = None  # class-conditional teachers: "random" (None), one class or a comma list
    prompts: tuple[str, ...] = ()  # text-conditioned teachers: seed s takes prompt s mod len
    ref: str | None = None  # FID reference (fid.reference_stats); None: no FID column
    feature_extractor: str = "inception"
    inception_path: str | None = None
    ref_num: int | None = None
    cache_dir: str | None = None
    offline: bool = False  # no Inception download, a Hub run from the Hub cache only (False: HF_HUB_OFFLINE decides)
    batch_size: int = 256  # does not change the results
    device: str = "auto"
    out: str | None = None  # folder of bench.md and bench.json
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "nfes", tuple(sorted(set(self.nfes))))
        if self.solvers is not None:
            object.__setattr__(self, "solvers", tuple(self.solvers))
        _refuse(
            [
                (
                    all(k >= 1 for k in self.nfes),
                    f"--nfe needs positive integers, got {','.join(map(str, self.nfes))!r}",
                ),
                _at_least(self.batch_size, 1, "--batch-size"),
                _at_least(self.reference_steps, 1, "--reference-steps"),
                (
                    self.ref is not None
                    or (self.ref_num is None and self.inception_path is None and self.cache_dir is None),
                    "--ref-num/--inception-path/--cache-dir only apply with --ref",
                ),
                (self.tune or self.tune_seeds is None, "--tune-seeds only applies with --tune"),
                _at_least(self.num, 1, "--num"),
            ]
        )


@dataclass(frozen=True)
class FIDConfig:
    """What `opdiff fid` compares (``fid.evaluate_fid``): SOURCE's features against REF's."""

    source: str  # a run or its Hub id (sampled), digits, an image folder, an .npz, statistics, a dataset
    ref: str  # the same kinds, or cleanfid:NAME/RES/SPLIT
    num: int | None = None  # the first num images of SOURCE (a run draws FID_RUN_NUM)
    seeds: Seeds = None  # a run SOURCE: the seeds to sample (None: held out)
    ref_num: int | None = None
    feature_extractor: str = "inception"  # inception | digits | path of a FeatureNet .safetensors
    inception_path: str | None = None
    split: str = "train"  # of a datasets source
    column: str | None = None  # image column of a datasets source
    device: str = "auto"
    batch_size: int = 64
    cache_dir: str | None = None  # reference statistics cache
    save_stats: str | None = None  # write SOURCE's statistics here
    overwrite: bool = False  # replace an existing save_stats file
    offline: bool = False  # no Inception download, a Hub run from the Hub cache only (False: HF_HUB_OFFLINE decides)

    def __post_init__(self) -> None:
        cover = " (a covariance needs 2 images)"
        _refuse(
            [
                (self.num is None or self.num >= 2, f"--num must be at least 2{cover}, got {self.num}"),
                (
                    self.ref_num is None or self.ref_num >= 2,
                    f"--ref-num must be at least 2{cover}, got {self.ref_num}",
                ),
                (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
                (
                    not self.source.startswith(CLEANFID_PREFIX),
                    f"SOURCE {self.source!r}: clean-fid's published statistics can only be the --ref",
                ),
                (
                    not (self.ref.startswith(CLEANFID_PREFIX) and self.ref_num is not None),
                    "--ref-num does not apply to precomputed cleanfid: statistics",
                ),
                (
                    not self.ref.startswith(CLEANFID_PREFIX) or len(self.ref[len(CLEANFID_PREFIX) :].split("/")) == 3,
                    f"bad --ref {self.ref!r}: use cleanfid:NAME/RES/SPLIT, e.g. cleanfid:cifar10/32/train",
                ),
            ]
        )
