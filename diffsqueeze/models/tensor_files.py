"""The tensors of safetensors files, each mapped on demand, its own pages only.

A streamed teacher (models/streamed.py) asks for every weight of the model at every forward.
``safe_open`` per tensor (accelerate's ``OffloadedWeightsLoader``) parses the file's JSON header
again for each of them, which took most of a streamed forward's time; a handle kept open maps the
file, and the pages it touches stay in the process's resident set (the second copy the streaming
is there to avoid). Here the headers are parsed once, the files stay open as plain descriptors,
and each tensor is a private mapping of its own byte range: nothing is copied, and when the
caller drops the tensor its mapping goes. ``python scripts/bench_hot_paths.py``: a streamed
forward against ``safe_open`` per tensor, outputs equal (docs/BENCHMARKS.md).

The layout (safetensors' format): an 8-byte little-endian header length, a JSON header naming
each tensor's dtype, shape and byte range, then the data, little-endian and row-major.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

__all__ = ["SafetensorsTensors"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsTensors(Mapping):
    """``name -> tensor`` over one or more safetensors files (CPU tensors, the files' dtypes)."""

    def __init__(self, files: list[Path]):
        # Unbuffered file objects own the descriptors: they close when the last reference goes.
        self._files = [open(path, "rb", buffering=0) for path in files]  # noqa: SIM115
        self._where: dict[str, tuple[int, torch.dtype, tuple[int, ...], int, int]] = {}
        self._sizes: dict[int, int] = {}
        for path, file in zip(files, self._files):
            fd = file.fileno()
            self._sizes[fd] = os.fstat(fd).st_size
            (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, size, 8))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"{path}: tensor '{name}' has dtype {info['dtype']}, which streaming cannot read")
                begin, end = info["data_offsets"]
                self._where[name] = (fd, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, end - begin)

    def __getitem__(self, name: str) -> torch.Tensor:
        fd, dtype, shape, offset, nbytes = self._where[name]
        if offset + nbytes > self._sizes[fd]:
            raise OSError(f"tensor '{name}': the file ended {offset + nbytes - self._sizes[fd]} bytes early")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        # A private mapping of just this tensor's pages: no copy (the page cache's pages are used
        # until written), the tensor at the address modulo the page that a mapped load gives it
        # (CPU kernels can sum in an alignment-dependent order: bit-identical to a loaded model),
        # and the mapping goes with the tensor.
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        pages = mmap.mmap(fd, offset - start + nbytes, offset=start, access=mmap.ACCESS_COPY)
        return torch.frombuffer(pages, dtype=dtype, offset=offset - start, count=nbytes // dtype.itemsize).reshape(shape)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __copy__(self):
        return self  # read-only: a copied module shares its files

    def __deepcopy__(self, memo):
        return self

    def close(self) -> None:
        for file in self._files:
            file.close()
