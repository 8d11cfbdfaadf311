"""Fashion-MNIST loading (Debian's ``dataset-fashion-mnist`` idx files) and captions.

The full set is read from ``/usr/share/datasets/fashion-mnist`` (or ``$FASHION_MNIST_DIR``).
A balanced 2,000-image subset of the test set ships inside the package
(``reference_test_subset.npz``) so that FID against real images works without the system package.
"""

from __future__ import annotations

import gzip
import os
import random
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffsqueeze.errors import DiffsqueezeError

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DIR",
    "TEMPLATES",
    "FashionMNISTMissingError",
    "caption",
    "class_prompt",
    "load_fashion_mnist",
    "load_reference_subset",
    "pad_to_32",
]

#: Fashion-MNIST label order (label i -> CLASS_NAMES[i]).
CLASS_NAMES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

#: Caption templates; ``{a}`` is the article ("a" / "an"), ``{}`` the class name.
TEMPLATES: tuple[str, ...] = (
    "{a} {}",
    "a photo of {a} {}",
    "a picture of {a} {}",
    "an image of {a} {}",
    "a black and white photo of {a} {}",
    "a small photo of {a} {}",
    "a photo of the {}",
    "the {}",
)

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
REFERENCE_SUBSET = Path(__file__).with_name("reference_test_subset.npz")


class FashionMNISTMissingError(DiffsqueezeError, FileNotFoundError):
    """The Fashion-MNIST idx files are not installed."""


def _article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def class_prompt(label: int) -> str:
    """The canonical prompt for a class: ``"a photo of a <name>"``."""
    name = CLASS_NAMES[label]
    return f"a photo of {_article(name)} {name}"


def caption(label: int, rng: random.Random | None = None, template: int | None = None) -> str:
    """A caption for ``label`` from a random (or the given) template."""
    name = CLASS_NAMES[label]
    if template is None:
        template = (rng or random).randrange(len(TEMPLATES))
    return TEMPLATES[template].replace("{a}", _article(name)).format(name)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split.

    Args:
        split: ``"train"`` (60,000) or ``"test"`` (10,000).
        root: folder with the ``*-ubyte.gz`` files; default ``$FASHION_MNIST_DIR`` or
            ``/usr/share/datasets/fashion-mnist``.

    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``.

    Raises:
        FashionMNISTMissingError: the files are missing (install ``dataset-fashion-mnist``).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get("FASHION_MNIST_DIR") or DEFAULT_DIR)
    prefix = "train" if split == "train" else "t10k"
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        raise FashionMNISTMissingError(
            f"Fashion-MNIST not found ({', '.join(missing)}). Install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or point $FASHION_MNIST_DIR "
            "at a folder holding the idx .gz files. Without it, only the shipped 2,000-image "
            "reference subset is available (load_reference_subset())."
        )
    images = _read_idx(img_path)
    labels = _read_idx(lbl_path).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def load_reference_subset() -> tuple[np.ndarray, np.ndarray]:
    """The shipped balanced test subset (200 per class): uint8 ``(2000, 28, 28)``, labels."""
    with np.load(REFERENCE_SUBSET) as z:
        return z["images"], z["labels"].astype(np.int64)


def pad_to_32(images: np.ndarray) -> np.ndarray:
    """Zero-pad ``(..., 28, 28)`` to ``(..., 32, 32)`` (the background is black)."""
    pad = [(0, 0)] * (images.ndim - 2) + [(2, 2), (2, 2)]
    return np.pad(images, pad)


def make_reference_subset(per_class: int = 200, seed: int = 0, out: Path = REFERENCE_SUBSET) -> Path:
    """Write the balanced test subset shipped in the package (deterministic)."""
    images, labels = load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    idx = np.concatenate([np.sort(rng.choice(np.flatnonzero(labels == c), per_class, replace=False))
                          for c in range(len(CLASS_NAMES))])
    np.savez_compressed(out, images=images[idx], labels=labels[idx].astype(np.uint8), indices=idx.astype(np.int32))
    return out


def to_model_range(images_u8: np.ndarray | Sequence) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return np.asarray(images_u8, dtype=np.float32) / 127.5 - 1.0
