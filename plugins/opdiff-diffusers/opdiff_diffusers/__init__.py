"""opdiff-diffusers: diffusers ``UNet2DModel`` checkpoints as operator-diffusion backbones.

Installing this distribution registers the backbone ``diffusers-unet2d`` in the ``opdiff.backbones``
entry-point group, so that ``operator_diffusion.backbones.load_backbone("diffusers-unet2d", ...)`` finds it::

    >>> from operator_diffusion.backbones import load_backbone
    >>> bb = load_backbone("diffusers-unet2d", pretrained="google/ddpm-cifar10-32")   # needs the Hub (or its cache)

This package's ``__init__`` imports nothing heavy; ``opdiff_diffusers.backbone`` and ``opdiff_diffusers.pipeline``
(``DSNOPipeline``, a trained DSNO as a diffusers pipeline) import diffusers.
"""

__version__ = "0.1.0"

__all__ = ["DSNOPipeline", "DiffusersUNet2DBackbone", "__version__"]


def __getattr__(name: str):
    if name == "DiffusersUNet2DBackbone":  # lazy: importing diffusers takes seconds
        from .backbone import DiffusersUNet2DBackbone

        return DiffusersUNet2DBackbone
    if name == "DSNOPipeline":
        from .pipeline import DSNOPipeline

        return DSNOPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
