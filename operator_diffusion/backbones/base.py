"""The ``Backbone`` protocol: how a pretrained diffusion network enters opdiff.

A backbone wraps one ``torch.nn.Module`` (``network``) together with everything needed to call it as a
denoiser of a given noise schedule: the schedule, the network's prediction type, the image shape and the
class conditioning. With a ``PSLD`` schedule the network works on the phase-space state z = (x, m): it takes
and returns ``state_shape`` = (2C, H, W) tensors (the HSM ε̂ of all 2C channels; only ``prediction="eps"``),
while ``image_shape`` stays the data's (C, H, W) — a sample is the x half of a state. Solvers see it through
``eps_fn(x, t)``; the DSNO adapter additionally needs
``network`` (to attach temporal layers by forward hooks after ``default_injection_points``, leaving the
network's own ``state_dict`` keys untouched) and runs it on batches of B·M items.

Plugin authors subclass ``Backbone``, set the class attribute ``name``, call ``super().__init__`` with the
network and its metadata, and implement ``forward``, ``config`` and ``default_injection_points``; the class
is then registered under ``name`` in the ``opdiff.backbones`` entry-point group of their distribution::

    [project.entry-points."opdiff.backbones"]
    my-unet = "my_package.backbone:MyUNetBackbone"
"""

from __future__ import annotations

import abc
import contextlib
import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..prediction import PREDICTION_TYPES, Prediction, eps_from_prediction
from ..schedules import DiffusionProcess

__all__ = ["Backbone", "CHECKPOINT_CONFIG_KEY", "keep_items_by_hooks"]

CHECKPOINT_CONFIG_KEY = "opdiff.backbone"  # safetensors metadata entry holding the backbone's JSON config
_SHOW = 3  # how many offending keys a mismatch error names


class Backbone(abc.ABC):
    """A pretrained (or trainable) diffusion network in opdiff's conventions.

    Attributes set by ``__init__``: ``network`` (the ``nn.Module``), ``schedule`` (an α/σ ``Schedule`` or a
    ``PSLD``), ``prediction`` (one of ``"eps"``, ``"x0"``, ``"v"``; ``"eps"`` only with PSLD), ``image_shape``
    (C, H, W) of the data (``state_shape``: what the network takes), ``num_classes`` (0 = unconditional;
    otherwise labels are ints in ``[0, num_classes)``) and ``null_label`` (the label meaning "no class" for
    classifier-free guidance, or ``None`` if the network has none).

    Subclasses implement:
      * ``name`` (class attribute): the registry name;
      * ``forward(x, t, labels=None, **cond)``: the raw network output in its prediction type, for states ``x``
        of shape (B, *state_shape) and continuous schedule times ``t`` of shape (B,) (the backbone maps them to
        what the network embeds); ``cond`` holds the per-item conditioning inputs beyond class labels that the
        backbone declares in ``conditioning_shapes`` (e.g. a text encoder's ``encoder_hidden_states``);
      * ``config()``: a JSON-serialisable dict with ``name`` from which ``load_backbone(**config)``
        rebuilds the same architecture (weights excluded);
      * ``default_injection_points``: names of modules of ``network`` after whose output a temporal layer
        goes (DSNO: after every ResBlock, after its attention where there is one, and after the mid block;
        never after a resample block). Each module's output must be one (N, C, H, W) tensor per item.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        network: nn.Module,
        schedule: DiffusionProcess,
        prediction: Prediction,
        image_shape: tuple[int, int, int],
        num_classes: int = 0,
        null_label: int | None = None,
    ):
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        if not isinstance(schedule, DiffusionProcess):
            raise TypeError(
                f"schedule must be an operator_diffusion.schedules Schedule or PSLD, got {type(schedule).__name__}"
            )
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTION_TYPES)}")
        if prediction not in schedule.predictions:
            why = (
                schedule.predictions_why
                or f"a network on the {schedule.name} schedule predicts {' or '.join(schedule.predictions)}"
            )
            allowed = " or ".join(repr(k) for k in schedule.predictions)
            raise ValueError(f"{why}: prediction must be {allowed}, got {prediction!r}")
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        if null_label is not None and not num_classes:
            raise ValueError("null_label only makes sense for a class-conditional backbone (num_classes > 0)")
        self.network = network
        self.schedule = schedule
        self.prediction: Prediction = prediction
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        self.null_label = null_label
        self.weights_file: str | None = None  # the .safetensors file ``load_weights`` last read (absolute)

    # ----------------------------------------------------------------------------------------------
    # The contract
    # ----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None, **cond: Tensor) -> Tensor:
        """Raw network output (in ``self.prediction``) at states ``x`` (B, *state_shape) and times ``t`` (B,);
        ``cond``: the per-item conditioning inputs of ``conditioning_shapes`` (none by default)."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description with key ``name``; ``load_backbone(**config)`` rebuilds it."""

    @property
    @abc.abstractmethod
    def default_injection_points(self) -> list[str]:
        """Module names of ``network`` after which DSNO's temporal layers go, in forward order."""

    @property
    def placement_presets(self) -> dict[str, list[str]]:
        """Named DSNO placements (``DSNO(placement="NAME")``): module names of ``network`` in forward order.
        Always holds ``"full"`` (``default_injection_points``); a backbone may add placements whose temporal
        layers end early, so that frame pruning (``item_cut_points``) leaves more of the network to one frame."""
        return {"full": self.default_injection_points}

    @property
    def item_cut_points(self) -> list[str]:
        """Modules of ``network`` after which ``keep_items`` can continue the forward pass on a subset of the
        batch's items, in forward order. Default: none (DSNO then runs every frame to the end and selects)."""
        return []

    @contextlib.contextmanager
    def keep_items(self, after: str, index: Tensor):
        """Inside the block, ``forward`` continues after module ``after`` (one of ``item_cut_points``) on the
        items ``index`` (a (K,) long tensor) only, and returns K outputs. Exact for the kept items whenever
        every later operation works per item (convolutions, group norm, per-item attention; dropout in eval
        mode): DSNO uses it after its last temporal layer, where the M frames of an example no longer interact
        (frame pruning). A backbone that supports it lists its cut points and narrows every per-item tensor
        still alive at the cut (features, skip connections, embeddings)."""
        raise ValueError(f"backbone {self.name!r} cannot drop items after {after!r}: it declares no item cut points")
        yield  # pragma: no cover - makes this a generator for contextmanager

    def enable_gradient_checkpointing(self, checkpoint: Callable[..., Tensor]) -> None:
        """Recompute the network's blocks in the backward pass instead of keeping their activations: from now on,
        while gradients are enabled, the network calls ``checkpoint(block, *args)`` where it would call
        ``block(*args)`` (diffusers' ``gradient_checkpointing_func`` convention). ``checkpoint`` runs the call
        under ``torch.utils.checkpoint`` (``DSNO.enable_gradient_checkpointing`` passes one that keeps the temporal
        layers active while a block is recomputed). A backbone that supports it overrides this; the default
        refuses."""
        raise ValueError(
            f"backbone {self.name!r} does not support gradient checkpointing: drop --gradient-checkpointing"
        )

    # ----------------------------------------------------------------------------------------------
    # Conditioning beyond class labels, text prompts and latent states (defaults: none of them)
    # ----------------------------------------------------------------------------------------------
    @property
    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        """The per-item conditioning inputs ``forward`` takes as keywords beyond ``labels``: name → the shape of
        one item's tensor (a batch of B items is (B, *shape)). Every stage passes them on unchanged per item:
        the solvers through ``extra_args``, classifier-free guidance doubles them with their null counterparts,
        DSNO gives every frame of an example the example's input. Default: none."""
        return {}

    @property
    def takes_prompts(self) -> bool:
        """True for a text-conditioned backbone: ``encode_prompts`` turns prompts into its conditioning inputs."""
        return False

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The conditioning inputs (name → (P, *shape) float32 on CPU) of P text prompts; only for backbones that
        ``takes_prompts``."""
        raise ValueError(f"backbone {self.name!r} takes no text prompts (it has no text encoder)")

    @property
    def decoded_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images ``decode`` returns: ``image_shape`` unless the states are latents."""
        return self.image_shape

    def decode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] (B, *decoded_shape) from data-space samples (B, *image_shape): the identity, unless the
        backbone works on latents (then its decoder, e.g. a VAE)."""
        return x

    def check_conditioning(self, x: Tensor, cond: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
        """Validate the conditioning inputs of a batch ``x`` against ``conditioning_shapes``: every declared input
        present with shape (B, *shape), nothing else; returns them on x's device. One clear ValueError otherwise."""
        shapes = self.conditioning_shapes
        given = {k: v for k, v in cond.items() if v is not None}
        if unknown := sorted(set(given) - set(shapes)):
            takes = ", ".join(shapes) or "none"
            raise ValueError(f"{self.name} takes no conditioning input {', '.join(unknown)} (it takes: {takes})")
        out = {}
        for name, shape in shapes.items():
            if name not in given:
                raise ValueError(
                    f"{self.name} needs the conditioning input {name} of shape (B, {', '.join(map(str, shape))})"
                    + (" (encode prompts with encode_prompts)" if self.takes_prompts else "")
                )
            v = torch.as_tensor(given[name], device=x.device)
            if tuple(v.shape) != (x.shape[0], *shape):
                raise ValueError(
                    f"{name} must have shape ({x.shape[0]}, {', '.join(map(str, shape))}), got {tuple(v.shape)}"
                )
            out[name] = v
        return out

    def source(self) -> dict[str, Any] | None:
        """Where the weights came from, as ``load_backbone`` keyword arguments (with ``name``) that rebuild this
        backbone *with* them; None when nothing records them (random or in-memory weights). The default: ``config()``
        with the .safetensors file ``load_weights`` last read. A backbone that loads its weights from elsewhere (a
        diffusers model folder or Hub id) overrides it. A collection records it (``teacher_source``), and `train`,
        `sample --teacher` and `bench` rebuild the teacher from it, checked against the collection's weights hash."""
        weights = getattr(self, "weights_file", None)  # a subclass that skipped Backbone.__init__ has none
        return None if weights is None else {**self.config(), "checkpoint": weights}

    def eps_fn(self, x: Tensor, t: Tensor, labels: Tensor | None = None, **cond: Tensor) -> Tensor:
        """The solvers' contract: ε̂(x, t) from the network output (``prediction.eps_from_prediction``)."""
        t = self.expand_times(t, x)
        return eps_from_prediction(self.forward(x, t, labels=labels, **cond), x, t, self.schedule, self.prediction)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """Shape of the states the network takes and returns: ``image_shape``, or (2C, H, W) for a PSLD
        schedule (the first C channels are x, the last C the momentum m; ``schedules.split``)."""
        c, h, w = self.image_shape
        return (self.schedule.state_channels(c), h, w)

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor | None = None, **cond: Tensor) -> Tensor:
        """A backbone is called like a module: ``bb(x, t, labels)`` is ``bb.forward(x, t, labels)``."""
        return self.forward(x, t, labels=labels, **cond)

    # ----------------------------------------------------------------------------------------------
    # Input checks shared by implementations
    # ----------------------------------------------------------------------------------------------
    def expand_times(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Times as a (B,) tensor on x's device: a scalar is broadcast to the batch of ``x``."""
        t = torch.as_tensor(t, device=x.device)
        if not t.is_floating_point():
            t = t.to(torch.float64)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"times must have shape (B,) = ({x.shape[0]},) or be a scalar, got {tuple(t.shape)}")
        return t

    def check_inputs(self, x: Tensor, labels: Tensor | None) -> Tensor | None:
        """Validate ``x`` (B, *state_shape) and return labels as a (B,) long tensor (or None).

        For a class-conditional backbone with a ``null_label``, ``labels=None`` means unconditional and
        becomes the null label; label values are range-checked on CPU tensors (on accelerators the check
        would cost a host sync per call, and the embedding lookup fails loudly anyway)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.state_shape:
            what = " (a PSLD state: x then m)" if self.state_shape != self.image_shape else ""
            raise ValueError(
                f"{self.name}: x must have shape (B, {', '.join(map(str, self.state_shape))}){what}, got "
                f"{tuple(x.shape)}"
            )
        if not self.num_classes:
            if labels is not None:
                raise ValueError(f"{self.name} is unconditional (num_classes=0) but labels were given")
            return None
        if labels is None:
            if self.null_label is None:
                raise ValueError(f"{self.name} is class-conditional without a null label: labels are required")
            return torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        labels = torch.as_tensor(labels, device=x.device)
        if labels.is_floating_point():
            raise ValueError("labels must be integer class indices, got a floating-point tensor")
        labels = labels.long()
        if labels.dim() == 0:
            labels = labels.expand(x.shape[0])
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape (B,) = ({x.shape[0]},), got {tuple(labels.shape)}")
        if labels.device.type == "cpu" and len(labels):
            hi = self.num_classes if self.null_label is None else max(self.num_classes, self.null_label + 1)
            lo_v, hi_v = int(labels.min()), int(labels.max())
            if lo_v < 0 or hi_v >= hi:
                bad = lo_v if lo_v < 0 else hi_v
                raise ValueError(
                    f"label {bad} out of range: classes are 0..{self.num_classes - 1}"
                    + (f" and {self.null_label} (null label)" if self.null_label is not None else "")
                )
        return labels

    # ----------------------------------------------------------------------------------------------
    # Weights (safetensors only: never torch.load / pickle)
    # ----------------------------------------------------------------------------------------------
    def save_weights(self, path: str | Path) -> None:
        """Write ``network.state_dict()`` to a .safetensors file, with ``config()`` in its metadata."""
        from safetensors.torch import save_file

        # clone: safetensors refuses tensors sharing storage (tied weights), and needs contiguous CPU data
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.network.state_dict().items()}
        save_file(
            tensors,
            str(path),
            metadata={CHECKPOINT_CONFIG_KEY: json.dumps(self.config()), "format": "opdiff-backbone/1"},
        )

    def load_weights(self, path: str | Path, strict: bool = True) -> None:
        """Load a .safetensors checkpoint into ``network``. A checkpoint whose keys or shapes differ from the
        architecture raises ValueError naming the first offending keys (with ``strict=False``, only keys
        present in both with equal shapes are loaded and the rest is left as is)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"backbone checkpoint {str(path)!r} does not exist")
        try:
            state = load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise not_safetensors(path, e) from None
        own = self.network.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
        if strict and (missing or unexpected or shapes):
            parts = []
            problems = (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches (checkpoint vs model)", shapes),
            )
            for what, items in problems:
                if items:
                    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
                    parts.append(f"{len(items)} {what}: {', '.join(items[:_SHOW])}{more}")
            origin = _checkpoint_origin(path)
            raise ValueError(
                f"checkpoint {str(path)!r} does not match backbone {self.name!r} with this config: {'; '.join(parts)}; "
                f"it belongs to another backbone or configuration{origin}"
            )
        if not strict:
            state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        self.network.load_state_dict(state, strict=strict)
        self.weights_file = str(path.resolve())

    # ----------------------------------------------------------------------------------------------
    # Conveniences delegating to the network
    # ----------------------------------------------------------------------------------------------
    def to(self, *args, **kwargs) -> "Backbone":
        self.network.to(*args, **kwargs)
        return self

    def eval(self) -> "Backbone":
        self.network.eval()
        return self

    def train(self, mode: bool = True) -> "Backbone":
        self.network.train(mode)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    @property
    def device(self) -> torch.device:
        return next(iter(self.network.parameters())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.network.parameters())).dtype

    def __repr__(self) -> str:
        cond = f", num_classes={self.num_classes}" if self.num_classes else ""
        return (
            f"{type(self).__name__}(name={self.name!r}, image_shape={self.image_shape}, "
            f"schedule={self.schedule.name!r}, "
            f"prediction={self.prediction!r}{cond}, params={self.num_parameters():,})"
        )


def _narrow(value: Any, index: Tensor, full: int) -> Any:
    """``value`` with every tensor whose first dimension is ``full`` (a per-item tensor of the whole batch) cut
    to the items ``index``, inside tuples and lists too; anything else is returned as it is."""
    if isinstance(value, Tensor):
        return value[index] if value.dim() and value.shape[0] == full else value
    if isinstance(value, (tuple, list)):
        return type(value)(_narrow(v, index, full) for v in value)
    return value


@contextlib.contextmanager
def keep_items_by_hooks(network: nn.Module, after: str, consumers: list[str], index: Tensor):
    """``Backbone.keep_items`` for networks whose later blocks receive every per-item tensor as an argument
    (diffusers' ``UNet2DModel``: the up blocks take the features, their skip connections and the embedding): a
    forward hook cuts the output of module ``after`` to the items ``index``, and a forward pre-hook on each module
    of ``consumers`` (the blocks called after it by the parent's ``forward``) cuts every argument that still has
    the whole batch (the batch ``after`` was called with). Not for a parent that combines whole-batch tensors
    itself between its blocks (``opdiff-unet`` concatenates its skips in its own ``forward``, so it narrows there
    instead)."""
    modules = dict(network.named_modules())
    full: list[int] = []  # the whole batch, seen on the way into ``after``

    def record_batch(module, args, kwargs):  # the first tensor argument, positional or keyword: the features
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor))
        full[:] = [first.shape[0]]

    def narrow_output(module, args, output):
        return _narrow(output, index, full[0])

    def narrow_inputs(module, args, kwargs):
        return _narrow(args, index, full[0]), {k: _narrow(v, index, full[0]) for k, v in kwargs.items()}

    handles = [
        modules[after].register_forward_pre_hook(record_batch, with_kwargs=True),
        modules[after].register_forward_hook(narrow_output),
    ]
    handles += [modules[c].register_forward_pre_hook(narrow_inputs, with_kwargs=True) for c in consumers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def not_safetensors(path: str | Path, error: Exception) -> ValueError:
    """The error for a weights file that safetensors cannot read (a pickle, a damaged or foreign file)."""
    return ValueError(
        f"{str(path)!r} is not a safetensors file ({error}); opdiff loads weights from .safetensors only "
        f"(convert a pickled checkpoint once with safetensors.torch.save_file)"
    )


def _checkpoint_origin(path: Path) -> str:
    """' (saved by ...)' from the checkpoint's metadata, for mismatch messages; '' if it has none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        cfg = json.loads(meta[CHECKPOINT_CONFIG_KEY])
        return f" (its metadata says backbone {cfg.get('name')!r})"
    except Exception:  # metadata is optional: foreign checkpoints have none
        return ""
