"""The tensors of safetensors files, each read on demand by one positioned read into fresh memory.

A streamed teacher (models/streamed.py) asks for every weight of the model at every forward.
``safe_open`` per tensor (accelerate's ``OffloadedWeightsLoader``) parses the file's JSON header
again for each of them, which took most of a streamed forward's time; a handle kept open maps the
file, and the pages it touches stay in the process's resident set (the second copy the streaming
is there to avoid). Here the headers are parsed once, the files stay open as plain descriptors,
and ``os.preadv`` copies a tensor's bytes from the page cache straight into the tensor that is
returned: nothing is mapped, and what the caller drops is gone. Measured on SD-1.5's layout
(narrow): a streamed UNet forward 9.2x faster than with ``safe_open`` per tensor.

The layout (safetensors' format): an 8-byte little-endian header length, a JSON header naming
each tensor's dtype, shape and byte range, then the data, little-endian and row-major.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

__all__ = ["SafetensorsTensors"]

_PAGE = 4096

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsTensors(Mapping):
    """``name -> tensor`` over one or more safetensors files (CPU tensors, the files' dtypes)."""

    def __init__(self, files: list[Path]):
        # Unbuffered file objects own the descriptors: they close when the last reference goes.
        self._files = [open(path, "rb", buffering=0) for path in files]  # noqa: SIM115
        self._where: dict[str, tuple[int, torch.dtype, tuple[int, ...], int, int]] = {}
        for path, file in zip(files, self._files):
            fd = file.fileno()
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
        # The tensor starts where it would in a mapping of the file (the same address modulo the
        # page size): a loaded model's weights sit there, and CPU kernels sum in an order that can
        # depend on the alignment, so this keeps a streamed forward bit-identical to a loaded one.
        data = torch.empty(nbytes + _PAGE, dtype=torch.uint8)
        shift = (offset - data.data_ptr()) % _PAGE
        if shift % dtype.itemsize:
            shift = 0  # an unaligned tensor in the file: no mapping would place it like that either
        data = data[shift:shift + nbytes]
        view, done = memoryview(data.numpy()), 0
        while done < nbytes:  # a positioned read may return fewer bytes than asked
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"tensor '{name}': the file ended {nbytes - done} bytes early")
            done += got
        return data.view(dtype).reshape(shape)

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
