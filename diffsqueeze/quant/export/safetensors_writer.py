"""A safetensors file written one tensor at a time (the export of a 2.6B-parameter UNet).

``safetensors.torch.save_file`` takes every tensor at once: the packed codes of a whole SDXL
UNet (2.4 GiB at 8 bits) would sit in memory beside its float weights. Here each tensor is
appended to a data file as it is produced and dropped; the header (names, dtypes, shapes,
offsets) is written at the end, followed by the data, giving a standard safetensors file
(8-byte little-endian header length, JSON header padded to 8 bytes, contiguous data).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_streamed(path: Path, tensors: Iterable[tuple[str, Tensor]], metadata: dict[str, str] | None = None) -> int:
    """Write ``(name, tensor)`` pairs as they come into the safetensors file ``path``; returns its bytes.

    Raises:
        ValueError: a name given twice, or a dtype safetensors has no code for.
    """
    path = Path(path)
    data_path = path.with_name(f".{path.name}.data")
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    try:
        with open(data_path, "wb") as data:
            for name, t in tensors:
                if name in header:
                    raise ValueError(f"tensor '{name}' given twice")
                if t.dtype not in DTYPES:
                    raise ValueError(f"tensor '{name}': dtype {t.dtype} cannot be stored in safetensors")
                t = t.detach().contiguous().cpu()
                nbytes = t.numel() * t.element_size()
                if nbytes:
                    t.reshape(-1).view(torch.uint8).numpy().tofile(data)
                header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 * 2**20)
    finally:
        data_path.unlink(missing_ok=True)
    return 8 + len(raw) + offset
