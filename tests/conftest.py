"""Shared test settings.

The tests use tiny tensors, for which torch's intra-op threads cost more in synchronisation than they
gain (measured: a DOP853 reference solve took 0.1 s on one thread and up to 7 s on two threads of a
loaded 2-core machine), so the whole suite runs single-threaded."""

import torch

torch.set_num_threads(1)


import pytest  # noqa: E402

TINY_TEACHER = {"preset": "tiny", "in_channels": 1, "dropout": 0.0, "prediction": "x0"}  # bounded trajectories


@pytest.fixture(autouse=True)
def _private_fid_cache(tmp_path_factory, monkeypatch):
    """Reference statistics cached by any test go to a temporary folder, never to ~/.cache/opdiff."""
    monkeypatch.setenv("OPDIFF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "opdiff-cache"))


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
    from operator_diffusion.training import TrainConfig, train
    from operator_diffusion.trajectories import CollectConfig, collect

    root = tmp_path_factory.mktemp("tiny_run")
    torch.manual_seed(0)
    teacher = load_backbone("opdiff-unet", **TINY_TEACHER)
    torch.nn.init.normal_(teacher.network.out_conv.weight, std=0.05)  # zero-initialised: x̂_0 would be 0 everywhere
    ckpt = root / "teacher.safetensors"
    teacher.save_weights(ckpt)
    collect(teacher, root / "data", CollectConfig(num=48, steps=16, shard_size=24, batch_size=24), checkpoint=ckpt)
    train(TrainConfig(data=str(root / "data"), out=str(root / "run"), init_from=str(ckpt), batch_size=8, max_steps=12,
                      save_every=12, log_every=4, warmup=2, lr=1e-3, ema=0.9))
    reset_accelerate()
    return {"teacher": ckpt, "data": root / "data", "run": root / "run"}
