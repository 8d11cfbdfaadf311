"""GGUF's Q8_0: blocks of 32 weights, each an 8-bit code times one float16 scale per block.

As ggml defines it (and the ``gguf`` package reproduces bit for bit): per block of 32,
``d = amax / 127`` in float32, codes ``q = roundf(x * (1 / d))`` (round half away from zero;
``q = 0`` where ``d = 0``), and the stored scale is ``d`` rounded to float16, so a reader decodes
``q * float16(d)``. The codes are in [-127, 127]. Storage is 8.5 bits per weight (34 bytes per 32).

As a weight format it stores exactly what a GGUF file holds for the tensor: the scales come from
the blocks (nothing to search; round-to-nearest), a row is zero-padded to whole blocks (the
padding is stored and cut off on decode). Learned rounding keeps each block's scale: a code may
move to its neighbour on the other side of the weight; the block's largest magnitude keeps its
code +-127, so the learned block's ``amax / 127`` is exactly its float16 scale and re-encoding it
gives back the same scale and codes (what export checks). As an activation format it quantizes on the fly per
token in blocks of 32 channels. Pure tensor functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffsqueeze.quant.primitives.grouping import check_finite, from_groups, to_groups
from diffsqueeze.quant.primitives.int_format import IntFormat
from diffsqueeze.quant.primitives.number_format import BlockScaledFormat, NumberFormat, RoundingGrid

BLOCK = 32
QMAX = 127


def _roundf(v: Tensor) -> Tensor:
    """C's ``roundf``: half away from zero (as ggml and the gguf package compute it)."""
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + torch.floor(2 * (a - fl)))


def q8_0_quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """Codes (int8, ``x``'s shape) and float16 block scales (``x.shape[:-1] + (n_blocks,)``) of ``x``,
    whose last dim is a positive multiple of 32."""
    check_finite(x)
    g = to_groups(x.to(torch.float32), BLOCK)
    d = g.abs().amax(dim=-1, keepdim=True) / QMAX
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _roundf(g * inv)
    return from_groups(q).to(torch.int8), d.squeeze(-1).to(torch.float16)


def q8_0_dequantize(codes: Tensor, scales: Tensor) -> Tensor:
    """float32 values ``q * d`` of :func:`q8_0_quantize`'s output."""
    g = to_groups(codes.to(torch.float32), BLOCK)
    return from_groups(g * scales.to(torch.float32).unsqueeze(-1))


@dataclass(frozen=True)
class Q8_0Format(BlockScaledFormat):
    """The GGUF Q8_0 format (module docstring)."""

    name: str = "q8_0"

    @property
    def bits(self) -> int:
        return 8

    @property
    def block(self) -> int:
        return BLOCK

    @property
    def element(self) -> NumberFormat:
        return IntFormat(8, symmetric=True)  # the grid a proxy (smoothing) quantizes elements on

    @property
    def eight_bit(self) -> str:
        return self.name

    def fake_quantize_blocks(self, x: Tensor) -> Tensor:
        return q8_0_dequantize(*q8_0_quantize(x)).to(x.dtype)

    @property
    def learnable_rounding(self) -> bool:
        return True

    def rounding_floor_step(self, g: Tensor, params: dict[str, Tensor]) -> RoundingGrid:
        """Per element: ``floor(x / d)`` on the reference's code axis (``x * (1 / d)``), the step
        ``float16(d)``; the block's largest magnitude pinned at +-127 (floor 127 or -128: both
        neighbours clamp to it). A block whose float16 scale is 0 decodes to zeros, signed as its
        codes are: each element is pinned on its reference code's side of zero, step +0, ``w`` 1
        (its fraction is not 0/0)."""
        blocks = to_groups(g.reshape(g.shape[0], -1).to(torch.float32), BLOCK)
        d = blocks.abs().amax(dim=-1, keepdim=True) / QMAX
        u = blocks * torch.where(d == 0, torch.zeros_like(d), 1 / d)
        step = d.to(torch.float16).to(torch.float32).expand_as(blocks)
        live = step != 0
        imax = blocks.abs().argmax(dim=-1, keepdim=True)
        top = torch.zeros_like(live).scatter(-1, imax, True)
        floor = torch.where(top, torch.where(blocks > 0, float(QMAX), -float(QMAX) - 1), torch.floor(u))
        code = _roundf(u)
        floor = torch.where(live, floor, torch.where(code >= 0, code, code - 1))
        w = torch.where(live, u * step, torch.ones_like(u))
        return RoundingGrid(*(from_groups(t).reshape(g.shape) for t in (floor, step, w)))

    def rounding_value(self, grid: RoundingGrid, h: Tensor, params: dict[str, Tensor]) -> Tensor:
        """``clamp(floor + h, -127, 127) * float16(d)``: the decoder's value."""
        return torch.clamp(grid.floor + h, -QMAX, QMAX) * grid.step

    def encode(self, g: Tensor, params: dict[str, Tensor], scale_dtype: str,
               shape: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        rows = g.reshape(g.shape[0], -1)
        codes, scales = q8_0_quantize(rows)
        spec = {"storage": "q8_0", "padded_row": rows.shape[1], "group_size": BLOCK, "n_groups": rows.shape[1] // BLOCK}
        return spec, {"qweight": codes.reshape(-1), "wscale": scales.reshape(-1)}

    def empty_buffers(self, part: dict[str, Any], out: int, device: Any) -> dict[str, Tensor]:
        n = out * part["padded_row"]
        return {"qweight": torch.empty(n, dtype=torch.int8, device=device),
                "wscale": torch.empty(n // BLOCK, dtype=torch.float16, device=device)}

    def decode(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> Tensor:
        shape = tuple(part["shape"])
        rows = (shape[0], part["padded_row"])
        w = q8_0_dequantize(tensors["qweight"].reshape(rows), tensors["wscale"].reshape(shape[0], -1))
        return w[:, : part["numel"] // shape[0]].reshape(shape)

    def check_part(self, part: dict[str, Any]) -> str | None:
        row = part.get("padded_row")
        if part.get("storage") != "q8_0" or part.get("bits") != 8 or not isinstance(row, int) or row % BLOCK:
            return (f"q8_0 storage needs bits 8 and a padded_row that is a multiple of {BLOCK}; got storage "
                    f"{part.get('storage')!r}, bits {part.get('bits')!r}, padded_row {row!r}")
        return None

    def check_stored(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> str | None:
        q, s = tensors["qweight"], tensors["wscale"]
        n = part["shape"][0] * part["padded_row"]
        if q.dtype != torch.int8 or q.numel() != n or s.dtype != torch.float16 or s.numel() != n // BLOCK:
            return (f"q8_0 codes/scales are {q.numel()} {q.dtype} / {s.numel()} {s.dtype}; the map's shape "
                    f"{part['shape']} needs {n} int8 / {n // BLOCK} float16")
        return None


Q8_0 = Q8_0Format()
