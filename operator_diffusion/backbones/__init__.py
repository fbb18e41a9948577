"""Backbones: the ``Backbone`` protocol and a registry of implementations by name.

Implementations are found through the ``opdiff.backbones`` entry-point group (the built-in ``opdiff-unet``
is registered that way too, in this distribution's pyproject), imported only when first requested and
cached; ``register_backbone`` adds one programmatically (tests, notebooks).

    >>> bb = load_backbone("opdiff-unet", preset="tiny")
    >>> bb2 = load_backbone(**bb.config())          # same architecture
"""

from __future__ import annotations

import functools
import json
import warnings
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from .base import CHECKPOINT_CONFIG_KEY, Backbone, not_safetensors

__all__ = [
    "Backbone",
    "ENTRY_POINT_GROUP",
    "available_backbones",
    "backbone_origin",
    "backbone_class",
    "load_backbone",
    "register_backbone",
    "backbone_from_checkpoint",
    "checkpoint_config",
    "load_teacher",
]

ENTRY_POINT_GROUP = "opdiff.backbones"

_registered: dict[str, type[Backbone]] = {}  # by register_backbone, and entry points once imported


@functools.cache
def _entry_points() -> dict[str, EntryPoint]:
    """The group's entry points by name (read once; importing them is deferred to ``backbone_class``)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            warnings.warn(
                f"two backbone plugins are named {ep.name!r} ({found[ep.name].value} and {ep.value}); using the first",
                stacklevel=2,
            )
            continue
        found[ep.name] = ep
    return found


def available_backbones() -> list[str]:
    """Names of all backbones: installed entry points and programmatically registered ones."""
    return sorted(set(_entry_points()) | set(_registered))


def backbone_origin(name: str) -> str:
    """Where a backbone comes from, without importing it: "DIST VERSION (module:Class)" or "registered"."""
    ep = _entry_points().get(name)
    if ep is None:
        if name in _registered:
            return f"registered ({_registered[name].__module__}.{_registered[name].__qualname__})"
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones()) or 'none'}")
    dist = f"{ep.dist.name} {ep.dist.version} " if ep.dist is not None else ""
    return f"{dist}({ep.value})"


def register_backbone(name: str, cls: type[Backbone] | None = None, *, overwrite: bool = False):
    """Register ``cls`` under ``name`` (usable as a decorator: ``@register_backbone("mine")``).

    ``cls.name`` must equal ``name`` (``config()`` records it, and ``load_backbone`` resolves it).
    Replacing a different class already known under ``name`` needs ``overwrite=True``."""

    def register(cls: type[Backbone]) -> type[Backbone]:
        _check_class(name, cls, origin="register_backbone")
        known = _registered.get(name)
        taken = (known is not None and known is not cls) or (known is None and name in _entry_points())
        if taken and not overwrite:
            raise ValueError(f"a backbone named {name!r} already exists; pass overwrite=True to replace it")
        _registered[name] = cls
        return cls

    return register if cls is None else register(cls)


def backbone_class(name: str) -> type[Backbone]:
    """The class registered under ``name``, importing its plugin on first use."""
    if name in _registered:
        return _registered[name]
    ep = _entry_points().get(name)
    if ep is None:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones()) or '(none)'}")
    try:
        cls = ep.load()
    except Exception as e:  # ImportError, or any error raised while importing the plugin's module
        dist = f" from distribution {ep.dist.name!r}" if getattr(ep, "dist", None) is not None else ""
        raise ImportError(
            f"backbone plugin {name!r} ({ep.value}{dist}) failed to import: {type(e).__name__}: {e}"
        ) from e
    _check_class(name, cls, origin=f"entry point {ep.value}")
    _registered[name] = cls
    return cls


def load_backbone(name: str | None = None, /, **kwargs) -> Backbone:
    """Build the backbone ``name`` with constructor ``kwargs`` (e.g. ``preset``, ``schedule``, ``checkpoint``).

    ``kwargs`` may be a backbone's ``config()``, whose ``name`` key is then used (and must agree with
    ``name`` when both are given): ``load_backbone(**bb.config())`` rebuilds ``bb``'s architecture."""
    cfg_name = kwargs.pop("name", None)
    if name is None and cfg_name is None:
        raise ValueError(f"load_backbone needs a backbone name; available: {', '.join(available_backbones())}")
    if name is not None and cfg_name is not None and name != cfg_name:
        raise ValueError(f"load_backbone({name!r}) was given a config of backbone {cfg_name!r}")
    cls = backbone_class(name or cfg_name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(_with_close_options(str(e), cls)) from None
    except ValueError as e:
        wrong = _mistyped_option(str(e), kwargs, cls)
        if wrong is None:
            raise
        raise ValueError(wrong) from None


# what int() and float() say of a string that is no number
_NOT_A_NUMBER = (
    (r"could not convert string to float: (.+)$", "a number (e.g. 0.1)"),
    (r"invalid literal for int\(\) with base 10: (.+)$", "an integer (e.g. 2)"),
)


def _mistyped_option(message: str, kwargs: dict, cls: type) -> str | None:
    """'backbone option dropout takes a number ..., got '{bad'' for the ValueError int() or float() raise on an
    option's string value, naming that option; None for any other error."""
    import re

    for pattern, wants in _NOT_A_NUMBER:
        m = re.search(pattern, message)
        if m is None:
            continue
        keys = [k for k, v in kwargs.items() if isinstance(v, str) and repr(v) == m.group(1)]
        if keys:
            backbone = getattr(cls, "name", cls.__name__)
            return f"backbone option {keys[0]} of {backbone!r} takes {wants}, got {kwargs[keys[0]]!r}"
    return None


def option_names(cls: type) -> list[str]:
    """The keyword options a backbone class takes: its ``option_names()`` when it defines one (a backbone that
    forwards ``**kwargs`` to its network lists them there), else its constructor's named parameters."""
    import inspect

    own = getattr(cls, "option_names", None)
    if callable(own):
        return list(own())
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _with_close_options(message: str, cls: type) -> str:
    """A TypeError about an unexpected keyword, with the closest options of ``cls`` (did you mean …?)."""
    import difflib
    import re

    m = re.search(r"unexpected keyword argument '([^']+)'", message)
    if m is None:
        return message
    close = difflib.get_close_matches(m.group(1), option_names(cls), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown backbone option {m.group(1)!r} for {getattr(cls, 'name', cls.__name__)!r}{hint}"


def checkpoint_config(path: str | Path) -> dict | None:
    """The backbone config a checkpoint written by ``Backbone.save_weights`` carries in its metadata (None when it
    carries none); FileNotFoundError / ValueError for a missing or unreadable file."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"backbone checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise not_safetensors(path, e) from None
    return json.loads(meta[CHECKPOINT_CONFIG_KEY]) if CHECKPOINT_CONFIG_KEY in meta else None


def backbone_from_checkpoint(path: str | Path, **overrides) -> Backbone:
    """Rebuild a backbone from a checkpoint written by ``Backbone.save_weights`` (config in its metadata),
    then load its weights. ``overrides`` replace config entries (e.g. ``dropout=0.0``)."""
    config = checkpoint_config(path)
    if config is None:
        raise ValueError(
            f"checkpoint {str(path)!r} carries no backbone config in its metadata; "
            f"use load_backbone(name, checkpoint=..., **config) instead"
        )
    backbone = load_backbone(**{**config, **overrides})
    backbone.load_weights(path)
    return backbone


def load_teacher(name: str | None, checkpoint: str | Path | None = None, **options) -> Backbone:
    """The backbone a command's ``--backbone NAME``, ``--checkpoint FILE`` and options describe. A checkpoint that
    carries its config (``save_weights``) is enough on its own: without ``NAME`` it is rebuilt from that config (the
    options override entries, e.g. ``dropout=0``), and so it is with ``NAME`` naming the same backbone and no options
    (``-o preset=…`` need not be repeated). Otherwise the backbone is built from ``NAME`` and the options, as given,
    and the weights are loaded into it (a checkpoint of another architecture is refused there)."""
    config = None if checkpoint is None else checkpoint_config(checkpoint)
    if name is None:
        if checkpoint is None:
            raise ValueError(
                "no teacher given: pass --backbone NAME (see `opdiff backbones`) or --checkpoint FILE of a backbone "
                "saved by opdiff"
            )
        if config is None:
            raise ValueError(
                f"--checkpoint {str(checkpoint)!r} carries no backbone config in its metadata (it was not saved by "
                "opdiff); name its backbone with --backbone NAME and its options"
            )
    if config is not None and (name is None or (name == config.get("name") and not options)):
        backbone = load_backbone(**{**config, **options})
    else:
        backbone = load_backbone(name, **options)
    if checkpoint is not None:
        backbone.load_weights(checkpoint)
    return backbone


def _check_class(name: str, cls: object, origin: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise TypeError(
            f"backbone {name!r} ({origin}) is {cls!r}, not a subclass of operator_diffusion.backbones.Backbone"
        )
    if cls.name != name:
        raise ValueError(f"backbone class {cls.__qualname__} declares name {cls.name!r} but is registered as {name!r}")
