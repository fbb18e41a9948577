"""The seed rules every stage shares: an example is a function of its seed alone.

* the noise rule: seed s draws x_T from the teacher process's prior with ``torch.Generator().manual_seed(s)``
  on CPU in float32 (``example_inputs``; ``DiffusionProcess.noise_rule`` states it), then its label;
* labels: unconditional, ``"random"`` (drawn after the noise), one class, or a list cycled over the seeds;
* held-out seeds: reported numbers never use a training seed, and tuning never sees a reported one;
* parsing seed lists (``"0-9,100-109"``) and label specifications.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .configs import SEED_MAX, check_seed  # the seed range every stage shares (torch-free)
from .schedules import DiffusionProcess, VPLinear

__all__ = [
    "example_inputs",
    "label_mode",
    "parse_seeds",
    "parse_label_spec",
    "parse_labels",
    "training_seeds",
    "check_held_out",
    "check_tune_seeds",
    "default_tune_seeds",
    "held_out_seeds",
    "resolve_seeds",
    "TUNE_NUM",
    "SEED_MAX",
    "check_seed",
]

TUNE_NUM = 128  # tuning seeds of `opdiff bench --tune` (disjoint from the reported ones)
SEEDS_MAX = 10_000_000  # seeds in one list: a typo such as 0-10000000000 is refused, not enumerated


def example_inputs(
    seeds: Sequence[int],
    shape: Sequence[int],
    labels=None,
    num_classes: int = 0,
    schedule: DiffusionProcess | None = None,
) -> tuple[Tensor, Tensor | None]:
    """x_T (B, *state shape) on CPU float32 and labels (B,) or None, from per-example generators (the process's
    ``noise_rule``): example seed s draws its prior noise first (``schedule.prior`` for data of ``shape`` (C, ...);
    no schedule: N(0, I)) and then, for labels="random", its label in [0, num_classes); a fixed label list gives
    seed s the label list[s mod len]. An example depends on its seed alone. A ``PSLD`` prior draw is the
    phase-space z_T (B, 2C, ...)."""
    process = VPLinear() if schedule is None else schedule
    xs, ys = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        xs.append(process.prior((1, *shape), generator=g, dtype=torch.float32)[0])
        if labels == "random":
            ys.append(int(torch.randint(num_classes, (), generator=g)))
    x = torch.stack(xs)
    if labels is None:
        return x, None
    if labels != "random":
        values = [labels] if isinstance(labels, int) else list(labels)
        ys = [values[int(s) % len(values)] for s in seeds]
    return x, torch.tensor(ys, dtype=torch.long)


def label_mode(labels, num_classes: int, guidance: float | None, null_label: int | None):
    """Normalise the label option: None (unconditional), "random", a class index, or a list of them."""
    if not num_classes:
        if labels is not None or guidance is not None:
            raise ValueError("labels and guidance need a class-conditional backbone; this one is unconditional")
        return None
    if guidance is not None and null_label is None:
        raise ValueError("classifier-free guidance needs a backbone with a null label; this one has none")
    labels = "random" if labels is None else labels
    if labels == "random":
        return "random"
    values = [labels] if isinstance(labels, int) else list(labels)
    if not values or any(not isinstance(v, int) or not 0 <= v < num_classes for v in values):
        raise ValueError(f"labels must be 'random' or class indices in 0..{num_classes - 1}, got {labels!r}")
    return values[0] if isinstance(labels, int) else values


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """``"0-49999"``, ``"0,5,9"``, ``"0-9,100-109"`` (inclusive ranges) or a list → distinct non-negative seeds."""
    if isinstance(spec, int):
        seeds = [spec]
    elif isinstance(spec, str):
        seeds = []
        for part in spec.replace(" ", "").split(","):
            lo, sep, hi = part.partition("-")
            try:
                a, b = int(lo), int(hi) if sep else int(lo)
            except ValueError:
                raise ValueError(f"bad seed list {spec!r}: {part!r} is not N or A-B (e.g. 0-49999 or 0,5,9)") from None
            if b < a:
                raise ValueError(f"bad seed range {part!r} in {spec!r}: the end is below the start")
            if b - a + 1 + len(seeds) > SEEDS_MAX:
                raise ValueError(f"the seed list {spec!r} holds more than {SEEDS_MAX:,} seeds; give fewer")
            seeds.extend(range(a, b + 1))
    else:
        seeds = [int(s) for s in spec]
    if not seeds:
        raise ValueError("no seeds given")
    if min(seeds) < 0 or max(seeds) > SEED_MAX:
        bad = min(seeds) if min(seeds) < 0 else max(seeds)
        raise ValueError(f"seeds must be integers from 0 to {SEED_MAX} (2^63 − 1), got {bad}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the seed list {spec!r} repeats seeds; every sample needs its own seed")
    return seeds


def parse_labels(spec: str | int | Sequence[int] | None, num_classes: int) -> str | int | tuple[int, ...] | None:
    """Label mode of a sample request: None (unconditional model), ``"random"`` (drawn per seed), one class,
    or a list (seed s gets list[s mod len]); the default for a class-conditional model is random."""
    if num_classes == 0:
        if spec not in (None, "", "none"):
            raise ValueError("this model is unconditional; drop --labels")
        return None
    if spec in (None, "", "random"):
        return "random"
    if isinstance(spec, str):
        spec = parse_label_spec(spec)
    values = [int(spec)] if isinstance(spec, int) else [int(v) for v in spec]
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are outside [0, {num_classes}) of this model")
    return values[0] if len(values) == 1 else tuple(values)


def training_seeds(info: dict) -> range:
    """The seeds a run's trajectories were collected from (its training seeds), from its ``info``."""
    coll = info.get("collection", {})
    start = int(coll.get("seed", 0))
    return range(start, start + int(coll.get("num", 0)))


def check_held_out(seeds: Sequence[int], training: Sequence[range], what: str = "the bench seeds") -> None:
    """Refuse ``seeds`` that a run was trained on (ValueError naming the overlap): reported numbers are held out."""
    for r in training:
        hits = [s for s in seeds if s in r]
        if hits:
            raise ValueError(
                f"{what} overlap the training seeds {r.start}-{r.stop - 1} ({_seed_list(hits)}); "
                f"numbers are reported on held-out seeds only: choose seeds outside that range"
            )


def check_tune_seeds(tune: Sequence[int], reported: Sequence[int], training: Sequence[range] = ()) -> None:
    """Tuning must never see a reported seed (nor a training seed): raise ValueError naming the overlap."""
    overlap = sorted(set(tune) & set(reported))
    if overlap:
        raise ValueError(
            f"the tuning seeds overlap the reported seeds ({_seed_list(overlap)}); tuning on the "
            "seeds it is reported on does not count: choose disjoint --tune-seeds"
        )
    check_held_out(tune, training, "the tuning seeds")


def _seed_list(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds[:5])) + (f" … ({len(seeds)} seeds)" if len(seeds) > 5 else "")


def default_tune_seeds(reported: Sequence[int], num: int = TUNE_NUM) -> list[int]:
    """The tuning seeds of ``--tune`` when none are given: the ``num`` seeds right after the reported ones."""
    start = max(reported) + 1
    return list(range(start, start + num))


def held_out_seeds(num: int, runs: Sequence[dict]) -> list[int]:
    """``num`` seeds held out from every run in ``runs`` (their ``info``): the first ``num`` after all their
    training seeds."""
    start = max(training_seeds(i).stop for i in runs)
    return list(range(start, start + num))


def parse_label_spec(text: str | None) -> str | int | tuple[int, ...] | None:
    """A ``--labels`` text as given: None, ``"random"``, one class index, or a tuple of them (validated later,
    against the model, by ``label_mode`` or ``parse_labels``)."""
    if text is None or text == "random":
        return text
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--labels takes 'random', a class index or a comma list of them, got {text!r}") from None
    return values[0] if len(values) == 1 and "," not in text else tuple(values)


def resolve_seeds(seeds, num: int | None, default_num: int, info: dict, held_out_of: Sequence[dict] = ()) -> list[int]:
    """The seeds a stage reports on: explicit ``seeds`` (``parse_seeds``; ``num``, when given, must count them), else
    ``num`` (default ``default_num``) seeds held out from training, right after the training seeds of ``info`` and
    of every run in ``held_out_of``. Explicit seeds that a run in ``held_out_of`` (those whose numbers are
    reported) was trained on are refused. ValueError names the flag."""
    if num is not None and num < 1:
        raise ValueError(f"--num must be at least 1 (got {num})")
    if seeds is None:
        return held_out_seeds(num or default_num, (info, *held_out_of))
    out = parse_seeds(seeds)
    if num is not None and num != len(out):
        raise ValueError(f"--num {num} but --seeds lists {len(out)} seeds; give one of them or make them agree")
    check_held_out(out, [training_seeds(i) for i in held_out_of], "--seeds")
    return out


def seeds_text(spec, seeds: Sequence[int]) -> str:
    """How a report names its seeds: the spec as given, else their first and last (``"1000-1999"``)."""
    return spec if isinstance(spec, str) else f"{seeds[0]}-{seeds[-1]}"
