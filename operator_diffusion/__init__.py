"""operator-diffusion: one-step sampling of pretrained diffusion models by operator learning (DSNO).

Submodules are imported lazily by the user (``from operator_diffusion import solvers``) so that importing
the package stays cheap.
"""

__version__ = "0.1.0"
