"""Shared test settings.

The tests use tiny tensors, for which torch's intra-op threads cost more in synchronisation than they
gain (measured: a DOP853 reference solve took 0.1 s on one thread and up to 7 s on two threads of a
loaded 2-core machine), so the whole suite runs single-threaded."""

import torch

torch.set_num_threads(1)


from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from operator_diffusion.backbones import Backbone, load_backbone  # noqa: E402
from operator_diffusion.oracles import GaussianMixtureOracle  # noqa: E402
from operator_diffusion.schedules import VPLinear  # noqa: E402

TINY_TEACHER = {"preset": "tiny", "in_channels": 1, "dropout": 0.0, "prediction": "x0"}  # bounded trajectories


@pytest.fixture(autouse=True)
def _private_fid_cache(tmp_path_factory, monkeypatch):
    """Whatever a test caches (reference statistics, Hub collections) goes to a temporary folder, never to
    ~/.cache/opdiff."""
    monkeypatch.setenv("OPDIFF_CACHE", str(tmp_path_factory.getbasetemp() / "opdiff-cache"))


@pytest.fixture(autouse=True)
def _no_inception_download(monkeypatch):
    """Nothing downloads at test time: clean-fid's download (what a missing Inception file triggers online) fails as
    an unreachable network does."""
    import cleanfid.downloads_helper

    def refuse(local_folder, url):
        raise OSError(f"no downloads in the tests ({url})")

    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_url", refuse)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state (each `train` call builds its own Accelerator)."""
    from operator_diffusion.training import reset_accelerate_state

    reset_accelerate_state()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished `opdiff train` run distilled from a (random, seeded; nonzero output layer) tiny 1×8×8
    opdiff-unet teacher:
    48 trajectories (seeds 0–47, unipc 16 steps, M = 4), 12 training steps from the teacher's weights.
    Returns the paths {"teacher", "data", "run"}."""
    from operator_diffusion.backbones import load_backbone
    from operator_diffusion.collection import collect
    from operator_diffusion.collection_plan import CollectConfig
    from operator_diffusion.training import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_run")
    torch.manual_seed(0)
    teacher = load_backbone("opdiff-unet", **TINY_TEACHER)
    torch.nn.init.normal_(teacher.network.out_conv.weight, std=0.05)  # zero-initialised: x̂_0 would be 0 everywhere
    ckpt = root / "teacher.safetensors"
    teacher.save_weights(ckpt)
    collect(teacher, root / "data", CollectConfig(num=48, steps=16, shard_size=24, batch_size=24), checkpoint=ckpt)
    train(
        TrainConfig(
            data=str(root / "data"),
            out=str(root / "run"),
            init_from=str(ckpt),
            batch_size=8,
            max_steps=12,
            save_every=12,
            log_every=4,
            warmup=2,
            lr=1e-3,
            ema=0.9,
        )
    )
    reset_accelerate()
    return {"teacher": ckpt, "data": root / "data", "run": root / "run"}


# --------------------------------------------------------------------------------------------------
# Shared test doubles and references
# --------------------------------------------------------------------------------------------------
def tiny(seed: int = 0, **kw):
    """A tiny backbone with every parameter perturbed: the zero-initialised output conv would make any
    comparison of outputs trivial."""
    torch.manual_seed(seed)
    bb = load_backbone("opdiff-unet", preset="tiny", **kw)
    with torch.no_grad():
        for p in bb.network.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return bb.eval()


def vp_linear_alpha_sigma(t: torch.Tensor, beta_min=0.1, beta_max=20.0):
    """Score-SDE linear VP in closed form: log α = −¼t²(β_max−β_min) − ½tβ_min, σ = √(1−α²)."""
    t = t.double()
    alpha = torch.exp(-0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min)
    return alpha, torch.sqrt(1 - alpha**2)


SHAPE = (3, 8, 8)


class MixtureTeacher(Backbone):
    """A backbone whose ε is the exact ε of a 3-component Gaussian mixture on 3×8×8 images."""

    name = "test-mixture-teacher"

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        means = 0.8 * torch.randn(3, *SHAPE, generator=g, dtype=torch.float64)
        self.oracle = GaussianMixtureOracle(VPLinear(), torch.ones(3), means, torch.tensor([0.2, 0.3, 0.25]))
        self.seed = seed
        net = nn.Module()
        net.register_parameter("unused", nn.Parameter(torch.zeros(1)))  # device/dtype anchor
        super().__init__(net, VPLinear(), "eps", SHAPE)

    def forward(self, x, t, labels=None):
        self.check_inputs(x, labels)
        t = self.expand_times(t, x)
        return self.oracle.eps(x.double(), t.double()).to(x.dtype)

    def config(self):
        return {"name": self.name, "seed": self.seed}

    @property
    def default_injection_points(self):
        return []


def train_config(data: Path, out: Path, **kw):
    """A short `opdiff train` config of a tiny opdiff-unet student (20 steps, batch 8)."""
    from operator_diffusion.training import TrainConfig

    base = dict(
        data=str(data),
        out=str(out),
        backbone="opdiff-unet",
        backbone_options={"preset": "tiny", "dropout": 0.0},
        batch_size=8,
        max_steps=20,
        save_every=10,
        log_every=1,
        warmup=5,
        lr=1e-3,
        ema=0.99,
        init="small",
    )
    return TrainConfig(**{**base, **kw})
