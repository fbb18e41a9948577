"""FID (operator_diffusion.fid, `opdiff fid`): the distance against its closed form, statistics against a hand
computation, clean-fid's own "clean" pipeline against ours (on a stand-in torchscript network: the real
Inception weights are never downloaded), the cache, the statistics file format (never unpickled), the
feature network and its training, and the command's results and refusals. No test touches the network."""

from __future__ import annotations

import hashlib
import json
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import operator_diffusion.fid as F
import operator_diffusion.fid.stats as fid_stats  # where load_extractor looks up DIGITS_FEATURENET
from opdiff_cli.main import app
from operator_diffusion.images import ImageSet, load_images, save_png
from operator_diffusion.runs import reset_accelerate_state

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails the test; the statistics cache lives in tmp."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv(F.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return load_images("digits")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits):
    """96 digits as grayscale PNG files."""
    root = tmp_path_factory.mktemp("digits_png")
    for i, im in enumerate(digits.images[:96]):
        save_png(im, root / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def netfile(tmp_path_factory):
    """A random-init 8×8 grayscale FeatureNet with 16 features, saved."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("net") / "net.safetensors"
    F.FeatureNet(1, 8, width=8, feature_dim=16, num_classes=10).save(path)
    return path


def _stats(mu, sigma, extractor="x", n=10):
    return F.FeatureStats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), n, extractor, "s", {"k": 1})


# ---------------------------------------------------------------------------------------------------
# The distance and the statistics
# ---------------------------------------------------------------------------------------------------
def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = F.frechet_distance(_stats(mu1, np.diag(s1)), _stats(mu2, np.diag(s2)))
    assert got == pytest.approx(expected, rel=1e-9)
    a = rng.normal(size=(5, 5))
    same = _stats(mu1, a @ a.T + np.eye(5))
    assert abs(F.frechet_distance(same, same)) <= 1e-6


@pytest.mark.parametrize("dim, rank", [(16, 16), (32, 32), (32, 12)])  # full rank, and singular (N < D) products
def test_trace_sqrt_product_matches_scipy_sqrtm(dim, rank):
    """Tr((Σ₁Σ₂)^{1/2}) by eigh against scipy's sqrtm of the non-symmetric product (today's SciPy), and the
    distance against clean-fid's formula written out with it."""
    import scipy.linalg

    rng = np.random.default_rng(dim + rank)
    a, b = rng.normal(size=(dim, rank)), rng.normal(size=(dim, dim))
    s1, s2 = a @ a.T / rank, b @ b.T / dim + 0.1 * np.eye(dim)
    expected = float(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    assert F.trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-7)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    fd = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * expected
    assert F.frechet_distance(_stats(mu1, s1), _stats(mu2, s2)) == pytest.approx(fd, rel=1e-7)


def test_frechet_distance_refuses_statistics_of_different_extractors():
    with pytest.raises(F.FIDInputError, match="different feature extractors"):
        F.frechet_distance(_stats(np.zeros(3), np.eye(3), "a"), _stats(np.zeros(3), np.eye(3), "b"))
    with pytest.raises(F.FIDInputError, match="D=3"):
        F.frechet_distance(_stats(np.zeros(3), np.eye(3)), _stats(np.zeros(4), np.eye(4)))


def test_stats_from_features_is_the_mean_and_unbiased_covariance():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(7, 3)).astype(np.float32)
    x = feats.astype(np.float64)
    n, d = x.shape
    mean = [sum(x[i, a] for i in range(n)) / n for a in range(d)]
    cov = [
        [sum((x[i, a] - mean[a]) * (x[i, b] - mean[b]) for i in range(n)) / (n - 1) for b in range(d)] for a in range(d)
    ]
    mu, sigma = F.stats_from_features(feats)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, cov, rtol=0, atol=1e-12)
    with pytest.raises(F.FIDInputError, match="at least 2"):
        F.stats_from_features(feats[:1])


# ---------------------------------------------------------------------------------------------------
# Statistics files
# ---------------------------------------------------------------------------------------------------
def test_stats_save_load_roundtrip_is_exact(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4, 4))
    s = F.FeatureStats(rng.normal(size=4), a @ a.T, 123, "featurenet:abc", "my/folder", {"kind": "folder", "n": 123})
    path = tmp_path / "stats.npz"
    s.save(path)
    t = F.FeatureStats.load(path)
    assert np.array_equal(t.mu, s.mu) and np.array_equal(t.sigma, s.sigma)
    assert (t.n, t.extractor, t.source, t.identity) == (
        123,
        "featurenet:abc",
        "my/folder",
        {"kind": "folder", "n": 123},
    )
    s.save(tmp_path / "plain_name")  # any file name: written exactly there (np.savez would append .npz)
    assert (tmp_path / "plain_name").is_file() and not (tmp_path / "plain_name.npz").exists()


UNPICKLED = []


class _Trap:
    def __reduce__(self):
        return (UNPICKLED.append, (1,))


def test_malformed_or_pickled_stats_files_are_refused_without_unpickling(tmp_path):
    good = dict(
        mu=np.zeros(3),
        sigma=np.eye(3),
        n=np.asarray(5),
        meta=np.asarray(json.dumps({"extractor": "x", "source": "", "identity": {}, "format_version": 1})),
    )
    cases = {
        "pickled": {**good, "mu": np.asarray([_Trap(), _Trap(), _Trap()], dtype=object)},
        "missing": {k: v for k, v in good.items() if k != "meta"},
        "shape": {**good, "sigma": np.eye(2)},
        "version": {**good, "meta": np.asarray(json.dumps({"extractor": "x", "format_version": 9}))},
        "meta": {**good, "meta": np.asarray("not json")},
    }
    for name, arrays in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(ValueError) as e:
            F.FeatureStats.load(path)
        assert "\n" not in str(e.value), str(e.value)
    (tmp_path / "text.npz").write_text("hello")
    np.save(tmp_path / "single.npy", np.zeros(3))
    for path in (tmp_path / "text.npz", tmp_path / "single.npy"):
        with pytest.raises(ValueError):
            F.FeatureStats.load(path)
    assert UNPICKLED == []


# ---------------------------------------------------------------------------------------------------
# Folder vs itself, shifted images, the cache
# ---------------------------------------------------------------------------------------------------
def test_folder_against_itself_is_zero_and_shifts_increase_fid(folder, netfile, digits):
    ext = F.FeatureNetExtractor(netfile)
    ref = F.reference_stats(str(folder), ext)
    same = F.compute_fid(str(folder), str(folder), ext)
    assert abs(same["fid"]) <= 1e-6 and same["n_source"] == same["n_reference"] == 96
    in_memory = F.compute_fid(digits.images[:96], str(folder), ext)  # samples as a uint8 array (PNG is lossless)
    assert abs(in_memory["fid"]) <= 1e-6 and in_memory["source"] == "array"
    noise = F.fid_of_pixels(digits.images[96:192], ref, ext)  # another 96 digits: the sampling-noise level
    pixels = digits.images[:96].astype(np.int64)
    brighter = [F.fid_of_pixels(np.clip(pixels + k, 0, 255).astype(np.uint8), ref, ext) for k in (20, 40, 80, 160)]
    assert 1e-4 < brighter[0] < brighter[1] < brighter[2] < brighter[3], brighter  # monotone in the shift
    assert brighter[2] > noise and brighter[3] > 5 * noise, (brighter, noise)
    assert F.fid_of_pixels(np.roll(digits.images[:96], 2, axis=2), ref, ext) > 5 * noise


def test_reference_stats_are_cached_per_num(folder, netfile, tmp_path, monkeypatch):
    ext = F.FeatureNetExtractor(netfile)
    calls = []
    features = ext.features
    monkeypatch.setattr(ext, "features", lambda *a, **k: calls.append(1) or features(*a, **k))
    cache = tmp_path / "c"
    first = F.reference_stats(str(folder), ext, cache_dir=cache)
    second = F.reference_stats(str(folder), ext, cache_dir=cache)
    assert len(calls) == 1 and len(list(cache.glob("*.npz"))) == 1
    assert np.array_equal(first.mu, second.mu) and np.array_equal(first.sigma, second.sigma) and second.n == 96
    fewer = F.reference_stats(str(folder), ext, num=50, cache_dir=cache)
    assert len(calls) == 2 and len(list(cache.glob("*.npz"))) == 2 and fewer.n == 50
    F.reference_stats(str(folder), ext, num=50, cache_dir=cache)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------------
# Inception: downloaded by clean-fid's mechanism unless offline; clean-fid's clean pipeline reproduced
# ---------------------------------------------------------------------------------------------------
def test_a_missing_inception_path_that_was_given_is_named_and_never_downloaded(tmp_path, monkeypatch):
    import cleanfid.downloads_helper

    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_url", lambda *a: pytest.fail("downloaded"))
    missing = tmp_path / "nowhere" / "inception.pt"
    with pytest.raises(FileNotFoundError) as e:
        F.load_extractor("inception", inception_path=missing)
    assert str(missing) in str(e.value) and F.INCEPTION_URL in str(e.value)
    assert "pass --inception-path" not in str(e.value)  # they passed it
    res = runner.invoke(app, ["fid", "digits", "--ref", "digits", "--inception-path", str(missing), "--device", "cpu"])
    assert res.exit_code == 2 and str(missing) in res.stderr and res.stderr.count("\n") == 1, res.output
    assert "pass --inception-path" not in res.stderr


def test_the_default_inception_file_is_downloaded_by_cleanfid_unless_offline(tmp_path, monkeypatch):
    import urllib.error

    import cleanfid.downloads_helper
    import huggingface_hub.constants  # noqa: F401  (imported now: it reads HF_HUB_OFFLINE once, at import)

    from operator_diffusion.fid import inception

    default = tmp_path / "tmp" / F.INCEPTION_NAME
    monkeypatch.setattr(inception, "INCEPTION_FILE", str(default))
    asked = []

    def download(local_folder, url):  # clean-fid's check_download_url, without the network
        asked.append((local_folder, url))
        Path(local_folder).mkdir(parents=True, exist_ok=True)
        (Path(local_folder) / Path(url).name).write_bytes(b"torchscript weights")
        return str(Path(local_folder) / Path(url).name)

    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_url", download)
    for offline in ({"offline": True}, {}):  # --offline, then HF_HUB_OFFLINE
        with monkeypatch.context() as m:
            m.setenv("HF_HUB_OFFLINE", "1")
            with pytest.raises(FileNotFoundError, match="offline") as e:
                F.load_extractor("inception", **offline)
        assert "pass --inception-path PATH" in str(e.value) and F.INCEPTION_URL in str(e.value) and asked == []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    ext = F.load_extractor("inception")
    assert asked == [(str(default.parent), F.INCEPTION_URL)] and ext.path == default
    assert ext.sha256 == hashlib.sha256(b"torchscript weights").hexdigest()
    F.load_extractor("inception")  # there now: not downloaded again
    assert len(asked) == 1

    default.unlink()

    def unreachable(local_folder, url):
        Path(local_folder, Path(url).name).write_bytes(b"partial")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_url", unreachable)
    with pytest.raises(FileNotFoundError, match="download of .* failed") as e:
        F.load_extractor("inception")
    assert "--inception-path PATH" in str(e.value) and "\n" not in str(e.value) and not default.exists()


def test_fid_and_bench_offline_flags_never_download_the_inception_weights(tiny_run, tmp_path, monkeypatch):
    """`--offline` (issue 16): with HF_HUB_OFFLINE unset and the default Inception file missing, `opdiff fid` and
    `opdiff bench --ref` answer the offline instruction in one line (exit 2) instead of trying clean-fid's download;
    without the flag they try it (and here, as with no network, it fails)."""
    import cleanfid.downloads_helper
    from huggingface_hub import constants

    from operator_diffusion.fid import inception

    monkeypatch.setattr(inception, "INCEPTION_FILE", str(tmp_path / "tmp" / F.INCEPTION_NAME))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = []

    def no_network(local_folder, url):  # clean-fid's download, on a machine with no network
        asked.append(url)
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_url", no_network)
    fid = ["fid", "digits", "--ref", "digits", "--num", "8", "--device", "cpu"]
    bench = ["bench", str(tiny_run["run"]), "--num", "2", "--nfe", "1", "--solvers", "ddim", "--ref", "digits"]
    for command in (fid, bench):
        r = runner.invoke(app, [*command, "--offline"])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
        assert "offline" in r.stderr and F.INCEPTION_URL in r.stderr and "failed" not in r.stderr, r.stderr
        assert asked == [] and not (tmp_path / "tmp").exists()
        r = runner.invoke(app, command)
        assert r.exit_code == 2 and "download of" in r.stderr and "failed" in r.stderr, r.output
        assert asked == [F.INCEPTION_URL]
        asked.clear()
    reset_accelerate_state()


class _FakeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 7, stride=4)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(64, 2048)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))[:, :, None, None]


class _FakeInception(nn.Module):
    """Stand-in with the interface of clean-fid's torchscript Inception (``layers``, ``forward(x,
    return_features)``)."""

    def __init__(self):
        super().__init__()
        self.layers = _FakeLayers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_inception_extractor_matches_cleanfid_clean_mode_on_a_folder(tmp_path, digits):
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.utils import ResizeDataset

    torch.manual_seed(0)
    weights = tmp_path / "w" / F.INCEPTION_NAME
    weights.parent.mkdir()
    torch.jit.script(_FakeInception()).save(str(weights))
    rng = np.random.default_rng(3)
    gray = digits.images[:3]
    rgb = rng.integers(0, 256, size=(3, 20, 24, 3), dtype=np.uint8)
    for name, pixels in (("gray", gray), ("rgb", rgb)):
        d = tmp_path / name
        d.mkdir()
        for i, im in enumerate(pixels):
            save_png(im, d / f"{i}.png")
        files = sorted(str(p) for p in d.glob("*.png"))
        # preprocessing: clean-fid's own dataset (file → RGB → clean resize → tensor) vs ours from pixels
        theirs = torch.stack([ResizeDataset(files, mode="clean")[i] for i in range(len(files))])
        ours = F.clean_preprocess(pixels)
        assert ours.shape == (3, 3, 299, 299) and ours.dtype == torch.float32
        assert torch.equal(ours, theirs)
        # features: clean-fid's folder pipeline with its InceptionV3W vs the extractor on the pixels
        model = InceptionV3W(str(weights.parent), download=False).eval()
        want = get_folder_features(
            str(d), model, num_workers=0, batch_size=2, device=torch.device("cpu"), mode="clean", verbose=False
        )
        ext = F.InceptionExtractor(weights)
        got = ext.features(pixels, batch_size=2)
        assert got.shape == (3, 2048) and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert ext.id.startswith("inception_v3:clean:") and len(ext.id) == len("inception_v3:clean:") + 12


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_cleanfid_reference_is_read_locally_or_refused(tmp_path, monkeypatch):
    torch.manual_seed(0)
    weights = tmp_path / F.INCEPTION_NAME
    torch.jit.script(_FakeInception()).save(str(weights))
    ext = F.InceptionExtractor(weights)
    cache = tmp_path / "cache"
    url, paths = F.cleanfid_stats_path("cifar10", "32", "train", cache)
    assert url.endswith("/cifar10_clean_train_32.npz") and paths[1] == cache / "cifar10_clean_train_32.npz"
    if not paths[0].exists():
        with pytest.raises(FileNotFoundError) as e:
            F.reference_stats("cleanfid:cifar10/32/train", ext, cache_dir=cache)
        assert url in str(e.value) and str(paths[1]) in str(e.value)
    cache.mkdir()
    np.savez(paths[1], mu=np.ones(2048), sigma=np.eye(2048))
    if not paths[0].exists():
        s = F.reference_stats("cleanfid:cifar10/32/train", ext, cache_dir=cache)
        assert s.extractor == ext.id and s.n == 0 and np.array_equal(s.mu, np.ones(2048))
    with pytest.raises(F.FIDInputError, match="inception"):
        F.reference_stats(
            "cleanfid:cifar10/32/train", F.FeatureNetExtractor(F.FeatureNet(1, 8, 4, 4, 0)), cache_dir=cache
        )
    url, paths = F.cleanfid_stats_path("lsun_church", "256", "train", cache)
    if not paths[0].exists():  # the command: exit 2 naming the URL, before any image is processed
        res = runner.invoke(
            app,
            [
                "fid",
                "digits",
                "--ref",
                "cleanfid:lsun_church/256/train",
                "--inception-path",
                str(weights),
                "--cache-dir",
                str(cache),
                "--device",
                "cpu",
            ],
        )
        assert res.exit_code == 2 and url in res.stderr and res.stderr.count("\n") == 1, res.output


# ---------------------------------------------------------------------------------------------------
# The feature network
# ---------------------------------------------------------------------------------------------------
def test_feature_net_save_load_and_refusals(tmp_path, netfile):
    from safetensors.torch import save_file

    net = F.FeatureNet.load(netfile)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert net.features(x).shape == (5, 16) and net(x).shape == (5, 10)
    assert F.FeatureNetExtractor(net).id == F.FeatureNetExtractor(netfile).id  # same bytes, same id
    big = F.FeatureNet(3, 32, width=4, feature_dim=8, num_classes=0)
    assert big.features(torch.zeros(2, 3, 32, 32)).shape == (2, 8)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    for bad in ("plain.safetensors", "junk.safetensors"):
        with pytest.raises(ValueError):
            F.FeatureNet.load(tmp_path / bad)
    with pytest.raises(F.FIDInputError, match="16×16"):
        F.FeatureNetExtractor(F.FeatureNet(1, 16, 4, 4, 0)).features(np.zeros((4, 8, 8, 1), np.uint8))


def test_digits_name_is_reserved_for_the_shipped_network(tmp_path, monkeypatch, netfile):
    monkeypatch.setattr(fid_stats, "DIGITS_FEATURENET", tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="shipped digits feature network is missing"):
        F.load_extractor("digits")
    monkeypatch.setattr(fid_stats, "DIGITS_FEATURENET", netfile)
    assert F.load_extractor("digits").id == F.FeatureNetExtractor(netfile).id
    with pytest.raises(FileNotFoundError, match="unknown feature extractor"):
        F.load_extractor("no-such-extractor")


def test_train_feature_net_learns_the_digits(digits):
    net, metrics = F.train_feature_net(digits, epochs=6, batch_size=64, seed=0, width=16, feature_dim=32)
    assert metrics["n_heldout"] == 180 and metrics["n_train"] == 1617
    assert metrics["heldout_accuracy"] > 0.9, metrics
    assert net.features(digits.tensor()[:4]).shape == (4, 32)


def test_a_feature_net_trains_on_non_square_images_and_refuses_other_shapes(digits, tmp_path):
    """Non-square images (issue 16): a FeatureNet takes [H, W]; its stages halve both sides until each is at most 4;
    it learns 8×6 crops of the digits, saves and loads; other shapes are refused in one line naming inception."""
    crops = ImageSet(np.ascontiguousarray(digits.images[:, :, 1:7]), digits.labels, "digit crops", {"kind": "crops"})
    net, metrics = F.train_feature_net(crops, epochs=6, batch_size=64, seed=0, width=16, feature_dim=32)
    assert net.hw == (8, 6) and net.config()["image_size"] == [8, 6] and metrics["heldout_accuracy"] > 0.85, metrics
    for hw, last in (((8, 6), (4, 3)), ((8, 12), (2, 3)), ((5, 40), (1, 3)), ((8, 8), (4, 4))):
        body = F.FeatureNet(1, list(hw), 4, 4, 0).body(torch.zeros(1, 1, *hw))
        assert tuple(body.shape[-2:]) == last
    net.save(tmp_path / "crops.safetensors")
    ext = F.FeatureNetExtractor(tmp_path / "crops.safetensors")
    assert ext.net.hw == (8, 6) and ext.id == F.FeatureNetExtractor(net).id
    np.savez(tmp_path / "crops.npz", images=crops.images[:200])
    np.savez(tmp_path / "shifted.npz", images=np.roll(crops.images[:200], 2, axis=2))
    args = ["--feature-extractor", str(tmp_path / "crops.safetensors"), "--device", "cpu", "--json"]
    same = runner.invoke(app, ["fid", str(tmp_path / "crops.npz"), "--ref", str(tmp_path / "crops.npz"), *args])
    other = runner.invoke(app, ["fid", str(tmp_path / "shifted.npz"), "--ref", str(tmp_path / "crops.npz"), *args])
    assert same.exit_code == 0 and other.exit_code == 0, same.output + other.output
    assert abs(json.loads(same.stdout)["fid"]) <= 1e-6 < 1 < json.loads(other.stdout)["fid"]
    for extractor, takes in ((str(tmp_path / "crops.safetensors"), "8×6"), ("digits", "8×8")):
        res = runner.invoke(
            app, ["fid", "digits", "--ref", str(tmp_path / "crops.npz"), "--feature-extractor", extractor]
        )
        assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.output
        assert f"takes only {takes}" in res.stderr and "--feature-extractor inception (any size" in res.stderr


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_cli_fid_of_non_square_images_through_inception_matches_cleanfid(tmp_path):
    """`opdiff fid` on two folders of non-square images of different aspects (20×24 RGB against 24×20 grayscale) gives
    the Fréchet distance of clean-fid's own folder features of the same files. The reference's Tr (Σ₁Σ₂)^{1/2} is the
    sum of the singular values of A₁A₂ᵀ/√((n₁−1)(n₂−1)), A the centred features (Σ = AᵀA/(n−1)): 12×12, not 2048²."""
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    torch.manual_seed(0)
    weights = tmp_path / "w" / F.INCEPTION_NAME
    weights.parent.mkdir()
    torch.jit.script(_FakeInception()).save(str(weights))
    rng = np.random.default_rng(5)
    sets = {
        "wide": rng.integers(0, 256, (12, 20, 24, 3), np.uint8),
        "tall": rng.integers(0, 256, (12, 24, 20, 1), np.uint8),
    }
    model = InceptionV3W(str(weights.parent), download=False).eval()
    centred, means = [], []
    for name, pixels in sets.items():
        (tmp_path / name).mkdir()
        for i, im in enumerate(pixels):
            save_png(im, tmp_path / name / f"{i:02d}.png")
        feats = get_folder_features(
            str(tmp_path / name),
            model,
            num_workers=0,
            batch_size=5,
            device=torch.device("cpu"),
            mode="clean",
            verbose=False,
        ).astype(np.float64)
        means.append(feats.mean(0))
        centred.append((feats - feats.mean(0)) / np.sqrt(len(feats) - 1))
    (a1, a2), (mu1, mu2) = centred, means
    trace_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    want = float(np.sum((mu1 - mu2) ** 2) + np.sum(a1**2) + np.sum(a2**2) - 2 * trace_sqrt)
    res = runner.invoke(
        app,
        ["fid", str(tmp_path / "wide"), "--ref", str(tmp_path / "tall"), "--inception-path", str(weights), "--json"]
        + ["--device", "cpu", "--cache-dir", str(tmp_path / "cache")],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["fid"] == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------
def test_cli_folder_against_itself_with_a_saved_feature_net(folder, netfile, tmp_path):
    stats = tmp_path / "src.npz"
    args = [
        "fid",
        str(folder),
        "--ref",
        str(folder),
        "--feature-extractor",
        str(netfile),
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--json",
    ]
    res = runner.invoke(app, [*args, "--save-stats", str(stats)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert abs(out["fid"]) <= 1e-6 and out["n_source"] == out["n_reference"] == 96 and out["feature_dim"] == 16
    assert out["reference_cached"] is False and out["extractor"] == F.FeatureNetExtractor(netfile).id
    again = json.loads(runner.invoke(app, args).stdout)
    assert again["reference_cached"] is True and again["fid"] == out["fid"]
    before = stats.read_bytes()
    refused = runner.invoke(app, [*args, "--save-stats", str(stats)])  # an existing file is never overwritten silently
    assert (
        refused.exit_code == 2 and "already exists; pass --overwrite" in refused.output and stats.read_bytes() == before
    )
    assert runner.invoke(app, [*args, "--save-stats", str(stats), "--overwrite"]).exit_code == 0
    from_stats = runner.invoke(
        app,
        [
            "fid",
            str(stats),
            "--ref",
            str(folder),
            "--feature-extractor",
            str(netfile),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ],
    )
    assert from_stats.exit_code == 0 and "FID" in from_stats.stdout, from_stats.output
    assert "warning" not in from_stats.stderr  # 96 images ≥ 16 features


def test_cli_warns_when_fewer_images_than_features(folder, netfile, tmp_path):
    res = runner.invoke(
        app,
        [
            "fid",
            str(folder),
            "--num",
            "10",
            "--ref",
            str(folder),
            "--feature-extractor",
            str(netfile),
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert res.exit_code == 0 and "10 images for 16-dimensional features" in res.stderr, res.output


@pytest.fixture(scope="module")
def other_stats(tmp_path_factory, folder):
    """Statistics of the folder under a different feature network (another seed)."""
    root = tmp_path_factory.mktemp("other")
    torch.manual_seed(1)
    F.FeatureNet(1, 8, width=8, feature_dim=16, num_classes=10).save(root / "other.safetensors")
    stats = F.reference_stats(str(folder), F.FeatureNetExtractor(root / "other.safetensors"), cache_dir=root / "cache")
    stats.save(root / "other_stats.npz")
    torch.manual_seed(2)
    F.FeatureNet(1, 16, width=4, feature_dim=8, num_classes=0).save(root / "net16.safetensors")
    return root


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "cannot read SOURCE"),
        ("extractor", "unknown feature extractor"),
        ("size", "16×16"),
        ("stats", "were computed with"),
        ("stats_pair", "different feature extractors"),
        ("num", "--num must be at least 2"),
        ("cleanfid", "cleanfid:NAME/RES/SPLIT"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(case, message, folder, netfile, other_stats, tmp_path):
    net = ["--feature-extractor", str(netfile)]
    args = {
        "missing": [str(tmp_path / "no_such_folder"), "--ref", str(folder), *net],
        "extractor": [str(folder), "--ref", str(folder), "--feature-extractor", "no-such-extractor"],
        "size": [str(folder), "--ref", str(folder), "--feature-extractor", str(other_stats / "net16.safetensors")],
        "stats": [str(folder), "--ref", str(other_stats / "other_stats.npz"), *net],
        "stats_pair": [str(other_stats / "other_stats.npz"), "--ref", str(_saved_stats(folder, netfile, tmp_path))],
        "num": [str(folder), "--num", "1", "--ref", str(folder), *net],
        "cleanfid": [str(folder), "--ref", "cleanfid:cifar10", *net],
    }[case]
    res = runner.invoke(app, ["fid", *args, "--device", "cpu", "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr


def _saved_stats(folder, netfile, tmp_path):
    path = tmp_path / "mine.npz"
    F.reference_stats(str(folder), F.FeatureNetExtractor(netfile), cache_dir=tmp_path / "c").save(path)
    return path
