"""clean-fid's InceptionV3 as a feature extractor: ``InceptionExtractor`` (2048-d pool3 features of the torchscript
weights; missing at clean-fid's default place, they are downloaded there by clean-fid's own mechanism unless offline)
and ``clean_preprocess`` (clean-fid's "clean" resize to 299×299).
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..images import as_rgb
from .extractor import FeatureExtractor
from .files import oneline

INCEPTION_NAME = "inception-2015-12-05.pt"  # clean-fid's file name (cleanfid/inception_torchscript.py)
# clean-fid's hard-coded location (cleanfid/features.py: "./" on Windows, "/tmp" elsewhere)
INCEPTION_FILE = os.path.join("./" if platform.system() == "Windows" else "/tmp", INCEPTION_NAME)
# where clean-fid downloads it from (cleanfid/downloads_helper.py: inception_url)
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def clean_preprocess(pixels: np.ndarray) -> Tensor:
    """clean-fid's "clean" preprocessing of uint8 (N, H, W, C) pixels: grayscale → RGB, then per image
    ``cleanfid.resize.build_resizer("clean")`` (PIL bicubic to 299×299 on float32, clipped to [0, 255]),
    then (N, 3, 299, 299) float32 in [0, 255], as ``cleanfid.utils.ResizeDataset`` hands it to the model
    (``ToTensor`` does not rescale float arrays)."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    rgb = as_rgb(pixels)
    return torch.from_numpy(np.stack([resize(im) for im in rgb]).transpose(0, 3, 1, 2).copy())


def _inception_module(path: str):
    """clean-fid's ``InceptionV3W`` (its ``forward``: (x − 128)/128 through the torchscript ``layers`` to
    2048 features, no resizing inside) over the torchscript weights at ``path`` (any file name)."""
    from cleanfid.inception_torchscript import InceptionV3W

    class _InceptionFile(InceptionV3W):
        def __init__(self, file: str):  # InceptionV3W.__init__ only allows <folder>/inception-2015-12-05.pt
            nn.Module.__init__(self)
            with warnings.catch_warnings():  # torch ≥ 2.9 deprecates TorchScript; clean-fid's weights are TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                self.base = torch.jit.load(file, map_location="cpu").eval()
            self.layers = self.base.layers
            self.resize_inside = False

    return _InceptionFile(path).eval()


def offline_now(offline: Optional[bool] = None) -> bool:
    """``offline`` when given, else whether ``HF_HUB_OFFLINE`` is set to a true value (``hub.is_offline``)."""
    if offline is not None:
        return bool(offline)
    from ..hub import is_offline

    return is_offline()


def download_inception(timeout: float = 60.0) -> Path:
    """clean-fid's own download (``cleanfid.downloads_helper.check_download_url``, what ``cleanfid.fid`` does) of
    ``INCEPTION_URL`` into ``INCEPTION_FILE``'s folder. A failure (no network) is a one-line FileNotFoundError
    saying where to put the file, and leaves no partial file."""
    import socket

    from cleanfid.downloads_helper import check_download_url

    target = Path(INCEPTION_FILE)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # clean-fid's urlopen has none: an unreachable network must not hang
    try:
        return Path(check_download_url(local_folder=str(target.parent), url=INCEPTION_URL))
    except (OSError, ValueError) as e:  # urllib's URLError and socket timeouts are OSErrors
        target.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"the Inception weights are missing and the download of {INCEPTION_URL} failed ({oneline(e)}): fetch it "
            f"on a machine with network and copy it to {INCEPTION_FILE} or pass --inception-path PATH"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


class InceptionExtractor(FeatureExtractor):
    """clean-fid's InceptionV3 features in "clean" mode (``build_feature_extractor("clean")``: the torchscript
    model, resize outside the network). ``path``: the torchscript weights, default clean-fid's own
    ``/tmp/inception-2015-12-05.pt``. A missing default file is downloaded there as clean-fid does
    (``download_inception``), unless ``offline`` (default: ``HF_HUB_OFFLINE``): then, or when the download fails,
    it is a ``FileNotFoundError`` saying where to put it and where clean-fid gets it from. A ``path`` that was given
    is never replaced by a download. The model is loaded on first use."""

    dim = 2048

    def __init__(self, path: Optional[str | os.PathLike] = None, device: str = "cpu", offline: Optional[bool] = None):
        self.path = Path(path) if path is not None else Path(INCEPTION_FILE)
        if not self.path.is_file() and path is not None:
            raise FileNotFoundError(
                f"the Inception weights {str(self.path)!r} (--inception-path) do not exist: fetch {INCEPTION_URL} on "
                "a machine with network and copy it there"
            )
        if not self.path.is_file() and offline_now(offline):
            raise FileNotFoundError(
                f"the Inception weights {str(self.path)!r} are missing, and opdiff is offline: fetch {INCEPTION_URL} "
                f"on a machine with network and copy it to {INCEPTION_FILE} or pass --inception-path PATH"
            )
        if not self.path.is_file():
            self.path = download_inception()
        from ..provenance import file_sha256

        self.sha256 = file_sha256(self.path)
        self.id = f"inception_v3:clean:{self.sha256[:12]}"
        self.device = device
        self._model = None

    def model(self, device: Optional[str] = None):
        if self._model is None:
            try:
                self._model = _inception_module(str(self.path))
            except RuntimeError as e:
                raise ValueError(
                    f"{str(self.path)!r} is not clean-fid's torchscript Inception ({oneline(e)}); get {INCEPTION_URL}"
                ) from None
        return self._model.to(device or self.device)

    def features(self, pixels, batch_size=64, device=None, progress=None):
        """2048-d pool3 features of clean-fid's clean mode (see ``clean_preprocess``)."""
        device = device or self.device
        model = self.model(device)
        return self._run(pixels, batch_size, progress, lambda b: model(clean_preprocess(b).to(device)))
