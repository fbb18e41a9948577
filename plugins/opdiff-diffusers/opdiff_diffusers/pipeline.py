"""``DSNOPipeline``: a trained opdiff DSNO (one-step sampler) as a diffusers ``DiffusionPipeline``.

The pipeline's folder is an opdiff run folder in the Hub layout (``model.safetensors``, ``config.json``; what
``opdiff push`` uploads) with diffusers' ``model_index.json`` beside it, so one folder serves both::

    pipe = DSNOPipeline.from_pretrained("runs/dsno")          # a run folder, a pushed Hub id, or a saved pipeline
    images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0)).images     # one network pass
    images = pipe(seeds=[0, 1, 2]).images                     # opdiff's per-seed noise: `opdiff sample --seeds 0-2`
    pipe.save_pretrained("dsno-pipeline")                     # safetensors only

Weights are read and written as safetensors only (``DSNO.load``/``DSNO.save``), never unpickled.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

from operator_diffusion.adapter import DSNO

__all__ = ["DSNOPipeline"]

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"  # an opdiff run's files
OUTPUT_TYPES = ("pil", "np", "pt")


class DSNOPipeline(DiffusionPipeline):
    """One-step sampling with a trained DSNO: ``pipe(...)`` makes every image in one forward pass of the U-Net
    with its temporal layers (the last output time's frame only).

    Args:
        dsno: the trained ``operator_diffusion.adapter.DSNO`` (``load_run(RUN)[0]``).
        run_info: the run's ``config.json`` (its collection, provenance); written back by ``save_pretrained``.
    """

    def __init__(self, dsno: DSNO, run_info: dict | None = None):
        super().__init__()
        self.register_modules(dsno=dsno)
        self.run_info = dict(run_info or {})

    @property
    def device(self) -> torch.device:
        return next(self.dsno.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.dsno.parameters()).dtype

    def to(self, *args, **kwargs) -> "DSNOPipeline":
        """Move the DSNO (``torch.nn.Module.to``'s arguments: a device, a dtype, or both)."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if args or kwargs:
            self.dsno.to(*args, **kwargs)
        return self

    # ----------------------------------------------------------------------------------------------
    # Loading and saving
    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DSNOPipeline":
        """A run folder (``opdiff train``'s output), a folder written by ``save_pretrained`` or ``opdiff push``, a
        Hub id of a pushed run (``operator_diffusion.hub.resolve_run``), or a bare DSNO ``.safetensors`` file.
        ``torch_dtype`` and ``device`` (or ``device_map`` naming one device) place the model; ``use_safetensors=False``
        is refused (there are no pickled weights to load)."""
        from operator_diffusion.sampling import load_model

        if kwargs.pop("use_safetensors", None) is False:
            raise ValueError("DSNOPipeline reads safetensors only; there are no pickled weights to load")
        dtype = kwargs.pop("torch_dtype", None)
        device = kwargs.pop("device", None) or kwargs.pop("device_map", None)
        unknown = sorted(k for k in kwargs if k not in ("local_files_only", "cache_dir", "revision"))
        if unknown:
            raise TypeError(f"DSNOPipeline.from_pretrained got unknown options {', '.join(unknown)}")
        model, info = load_model(pretrained_model_name_or_path)
        pipe = cls(dsno=model.eval(), run_info=info)
        if dtype is not None or device is not None:
            pipe.to(device=device, dtype=dtype)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs) -> None:
        """Write ``model.safetensors`` (the DSNO with its config in the metadata), the run's ``config.json`` and
        ``model_index.json``: a folder ``from_pretrained`` and ``opdiff sample`` both read."""
        if not safe_serialization:
            raise ValueError("DSNOPipeline writes safetensors only (safe_serialization=False is not supported)")
        if kwargs.get("push_to_hub"):
            raise ValueError("push a trained run with `opdiff push RUN REPO_ID` (it writes the model card)")
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise ValueError(f"{str(out)!r} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (MODEL_FILE + ".tmp")
        copy.deepcopy(self.dsno).float().cpu().save(tmp)  # float32 on CPU, as `opdiff train` exports
        tmp.replace(out / MODEL_FILE)
        info = dict(self.run_info) or {"model": self.dsno.config()}
        (out / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
        self.save_config(out)  # model_index.json: {"_class_name": "DSNOPipeline", "dsno": [...], ...}

    # ----------------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------------
    def prepare_inputs(
        self,
        batch_size: int | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        class_labels,
        seeds: Sequence[int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_T (B, *state) and labels (B,) or None, on CPU. With ``seeds``: opdiff's noise rule (seed s: its own
        generator draws x_T, then, without ``class_labels``, its class), so seed s gives ``opdiff sample``'s image
        of seed s. Otherwise ``generator`` draws the batch's x_T, then its classes; a list of generators draws image
        i's from generator i in the same order, so ``[torch.Generator().manual_seed(s) for s in seeds]`` gives the
        images of ``seeds``."""
        from operator_diffusion.seeds import check_seed, example_inputs

        bb = self.dsno.backbone
        if bb.takes_prompts:
            raise ValueError(
                "DSNOPipeline samples unconditional and class-conditional runs; use `opdiff sample --prompt`"
            )
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            if generator is not None:
                raise ValueError("give seeds or a generator, not both (seeds carry their own generators)")
            if batch_size is not None and batch_size != len(seeds):
                raise ValueError(f"batch_size {batch_size} but {len(seeds)} seeds; give one of them or make them agree")
            for s in seeds:
                check_seed(s)
            mode = "random" if bb.num_classes and class_labels is None else None
            x, y = example_inputs(seeds, bb.image_shape, mode, bb.num_classes, bb.schedule)
            n = len(seeds)
        else:
            gens = list(generator) if isinstance(generator, (list, tuple)) else None
            n = int(batch_size) if batch_size is not None else len(gens) if gens else 1
            if n < 1:
                raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
            if gens is not None and len(gens) != n:
                raise ValueError(f"{len(gens)} generators for batch_size {n}; give one per image or a single one")
            draw_labels = bool(bb.num_classes) and class_labels is None
            if gens is not None:  # image i: its noise, then its class, from gens[i] (opdiff's rule per generator)
                x = torch.cat([bb.schedule.prior((1, *bb.image_shape), generator=g, dtype=torch.float32) for g in gens])
                labels = [torch.randint(bb.num_classes, (1,), generator=g) for g in gens] if draw_labels else None
                y = None if labels is None else torch.cat(labels)
            else:
                x = bb.schedule.prior((n, *bb.image_shape), generator=generator, dtype=torch.float32)
                y = torch.randint(bb.num_classes, (n,), generator=generator) if draw_labels else None
        if class_labels is not None:
            if not bb.num_classes:
                raise ValueError("class_labels given to an unconditional model")
            values = [int(class_labels)] * n if np.ndim(class_labels) == 0 else [int(v) for v in class_labels]
            if len(values) != n or any(not 0 <= v < bb.num_classes for v in values):
                raise ValueError(f"class_labels must be one class or {n} classes, each in 0..{bb.num_classes - 1}")
            y = torch.tensor(values, dtype=torch.long)
        return x, y

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        seeds: Sequence[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """``batch_size`` images (default 1, or one per seed or generator) in one forward pass.

        Args:
            generator: draws x_T (and random classes) for the batch; a list gives one generator per image.
            class_labels: class-conditional models: one class for all, or one per image (default: random).
            seeds: opdiff's per-seed noise instead of ``generator``: the images of ``opdiff sample --seeds``.
            output_type: ``"pil"`` (8-bit images, opdiff's pixels round((x + 1)·127.5)), ``"np"`` (B, H, W, C)
                floats in [0, 1], or ``"pt"`` (B, C, H, W) floats in [0, 1].
        """
        from operator_diffusion.images import to_uint8
        from operator_diffusion.sampling import decode_outputs

        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        x, y = self.prepare_inputs(batch_size, generator, class_labels, seeds)
        model, device = self.dsno.eval(), self.device
        out = model(x.to(device, self.dtype), None if y is None else y.to(device), frames=[-1]).float().cpu()
        decoded = decode_outputs(model.backbone, out)
        images = (out if decoded is None else decoded)[:, -1]  # (B, C, H, W) in [-1, 1]
        if output_type == "pil":
            pixels = to_uint8(images)
            result = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
        else:
            unit = ((images + 1) / 2).clamp(0, 1)
            result = unit if output_type == "pt" else unit.permute(0, 2, 3, 1).numpy()
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
