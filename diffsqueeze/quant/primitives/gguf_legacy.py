"""GGUF's legacy 4/5-bit block types Q4_0, Q4_1, Q5_0, Q5_1: blocks of 32 weights, a float16 scale
``d`` per block (and a float16 minimum ``m`` for the ``_1`` types), codes as ggml's reference
quantizer computes them (``quantize_row_q4_0_ref`` ...; the ``gguf`` package's ``gguf.quants``
reproduces it and is the reference the tests compare with, bit for bit).

Per block of 32 values ``x`` (float32; ``z = 2^(bits-1)``, ``top = 2^bits - 1``):

- ``_0`` (symmetric): ``mx`` = the value of largest magnitude, signed (the first one on ties),
  ``d = mx / -z``, ``q = min(top, trunc(x * (1/d) + (z + 0.5)))`` (``q = z`` where ``d = 0``);
  decoded ``float16(d) * (q - z)``. The largest-magnitude value gets code 0, so its side of the
  grid reaches ``-z * d = mx`` and the other side stops one step short.
- ``_1`` (with minimum): ``d = (max - min) / top``,
  ``q = min(top, trunc((x - min) * (1/d) + 0.5))``; decoded ``float16(d) * q + float16(min)``.

Every operation is one float32 operation in that order (no fused multiply-add), as the ``gguf``
package computes it; codes are found with the float32 ``d`` and decoded with the float16 one, as
in ggml. Where ``1/d`` overflows (a block whose values are all below ~2^-125) ``gguf`` casts the
non-finite products to code 0, and so does this module; such blocks decode to zeros (``_0``) or
their float16 minimum (``_1``). A scale beyond float16's range (``|mx| > 8 * 65504`` for Q4_0)
is stored as infinity, as ggml stores it: the values are not representable in these formats.

Storage (:class:`GGUFLegacyFormat`): the codes packed at ``bits`` bits each (``pack_codes``), one
float16 ``d`` per block (``wscale``) and for ``_1`` one float16 ``m`` (``wzero``): 4.5, 5, 5.5 and
6 bits per weight, as in a GGUF file. :mod:`.gguf_bytes` lays the same codes out as GGUF blocks.

Learned rounding (``_0`` types): with each block's scale fixed as the reference encoder chose it,
a weight's code may move to the neighbour code on the other side (AdaRound), never past the
grid's ends; the block's largest-magnitude value keeps its code 0, so re-encoding the learned
weights with the reference encoder gives back the same scale and codes. The ``_1`` types stay
round-to-nearest: their minimum ``m`` is the block's own smallest value, which learned rounding
would move (re-encoding would then choose another grid); the K-quants' offsets come from a search
instead and do learn (:mod:`.gguf_kquants`).
Pure tensor functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffsqueeze.quant.primitives.grouping import check_finite, from_groups, to_groups
from diffsqueeze.quant.primitives.int_format import IntFormat
from diffsqueeze.quant.primitives.number_format import BlockScaledFormat, NumberFormat, RoundingGrid
from diffsqueeze.quant.primitives.pack import pack_codes, packed_nbytes, unpack_codes

__all__ = ["BLOCK", "GGUFLegacyFormat", "LegacyCodes", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "GGUF_LEGACY_FORMATS",
           "legacy_quantize", "legacy_dequantize"]

BLOCK = 32


@dataclass(frozen=True)
class LegacyCodes:
    """Codes (uint8 in ``[0, 2^bits)``, the input's shape) and the float16 block scales ``d`` (and
    minimums ``m`` for the ``_1`` types, else None), shaped ``x.shape[:-1] + (n_blocks,)``."""

    codes: Tensor
    d: Tensor
    m: Tensor | None = None


@dataclass(frozen=True)
class GGUFLegacyFormat(BlockScaledFormat):
    """A GGUF legacy block type (module docstring).

    Attributes:
        name: ``q4_0``, ``q4_1``, ``q5_0`` or ``q5_1``.
        bits: Bits of one code (4 or 5).
        has_min: The ``_1`` types: codes above a per-block minimum rather than around zero.
    """

    name: str
    bits: int
    has_min: bool

    @property
    def block(self) -> int:
        return BLOCK

    @property
    def top(self) -> int:
        """The largest code, ``2^bits - 1``."""
        return 2**self.bits - 1

    @property
    def zero(self) -> int:
        """The code of value 0 in the ``_0`` types, ``2^(bits-1)``."""
        return 2 ** (self.bits - 1)

    @property
    def element(self) -> NumberFormat:
        # the grid a proxy (smoothing) quantizes elements on: codes around zero, or above a minimum
        return IntFormat(self.bits, symmetric=not self.has_min)

    @property
    def eight_bit(self) -> str:
        return "q8_0"  # the 8-bit type of the family (first/last-layer activations)

    @property
    def learnable_rounding(self) -> bool:
        return not self.has_min

    # ---- weights ------------------------------------------------------------------------------

    def fake_quantize_blocks(self, x: Tensor) -> Tensor:
        return legacy_dequantize(legacy_quantize(x, self), self).to(x.dtype)

    def rounding_floor_step(self, g: Tensor, params: dict[str, Tensor]) -> RoundingGrid:
        """Learned rounding in code units with each block's float16 scale fixed (``_0`` types).

        ``u = x * (1/d) + (z + 0.5) - 0.5`` is the reference encoder's position on the code axis
        (its code is ``floor(u + 0.5)``); it is truncated to a multiple of ``2^(bits-13)``, which
        keeps every rounding decision and makes ``u * float16(d)`` exact in float32, so the
        quantizer's ``W / step - floor`` is exactly the fraction and its hard rounding at
        initialization is the reference encoder's. The block's largest-magnitude value is pinned
        at code 0 (floor -1: both neighbours clamp to 0). A block whose float16 scale is 0 decodes
        to zeros whatever its codes: all its elements are pinned at code 0 with ``step`` the zero
        of the sign that makes ``(0 - z) * step`` the reference's decoded zero, and ``W`` is 1
        (``W / step`` infinite, not 0/0).
        """
        if self.has_min:
            raise ValueError(f"{self.name} has no learned rounding (its grid has a per-block offset)")
        blocks = to_groups(g.reshape(g.shape[0], -1).to(torch.float32), BLOCK)
        d, c = _symmetric_positions(blocks, self)
        scale = d.to(torch.float16).to(torch.float32).expand_as(blocks)
        live = scale != 0
        res = 2.0 ** (13 - self.bits)
        u = torch.floor((c - 0.5) * res) / res  # exact: c - 0.5, the scaling and the floor
        u = torch.where(live, u, torch.zeros_like(u))
        imax = blocks.abs().argmax(dim=-1, keepdim=True)
        pinned = torch.zeros_like(live).scatter(-1, imax, True) | ~live
        floor = torch.where(pinned, torch.full_like(u, -1.0), torch.floor(u))
        step = torch.where(live, scale, -(scale * (_codes(c, self.top) - self.zero)))
        w = torch.where(live, u * step, torch.ones_like(u))
        return RoundingGrid(*(from_groups(t).reshape(g.shape) for t in (floor, step, w)))

    def rounding_value(self, grid: RoundingGrid, h: Tensor, params: dict[str, Tensor]) -> Tensor:
        """``float16(d) * (code - z)`` with ``code = clamp(floor + h, 0, top)``: the decoded grid."""
        return (torch.clamp(grid.floor + h, 0, self.top) - self.zero) * grid.step

    # ---- storage ------------------------------------------------------------------------------

    def encode(self, g: Tensor, params: dict[str, Tensor], scale_dtype: str,
               shape: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        rows = g.reshape(g.shape[0], -1)
        q = legacy_quantize(rows, self)
        spec = {"storage": self.name, "padded_row": rows.shape[1], "group_size": BLOCK,
                "n_groups": rows.shape[1] // BLOCK}
        tensors = {"qweight": pack_codes(q.codes, self.bits), "wscale": q.d.reshape(-1).contiguous()}
        if q.m is not None:
            tensors["wzero"] = q.m.reshape(-1).contiguous()
        return spec, tensors

    def empty_buffers(self, part: dict[str, Any], out: int, device: Any) -> dict[str, Tensor]:
        n = out * part["padded_row"]
        bufs = {"qweight": torch.empty(packed_nbytes(n, self.bits), dtype=torch.uint8, device=device),
                "wscale": torch.empty(n // BLOCK, dtype=torch.float16, device=device)}
        if self.has_min:
            bufs["wzero"] = torch.empty(n // BLOCK, dtype=torch.float16, device=device)
        return bufs

    def decode(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> Tensor:
        shape = tuple(part["shape"])
        out, row = shape[0], part["padded_row"]
        codes = unpack_codes(tensors["qweight"], out * row, self.bits).reshape(out, row)
        m = tensors["wzero"].reshape(out, -1) if self.has_min else None
        w = legacy_dequantize(LegacyCodes(codes, tensors["wscale"].reshape(out, -1), m), self)
        return w[:, : part["numel"] // out].reshape(shape)

    def check_part(self, part: dict[str, Any]) -> str | None:
        row = part.get("padded_row")
        if part.get("storage") != self.name or part.get("bits") != self.bits or not isinstance(row, int) or row % BLOCK:
            return (f"{self.name} storage needs bits {self.bits} and a padded_row that is a multiple of {BLOCK}; got "
                    f"storage {part.get('storage')!r}, bits {part.get('bits')!r}, padded_row {row!r}")
        return None

    def check_stored(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> str | None:
        n = part["shape"][0] * part["padded_row"]
        want = {"qweight": (torch.uint8, packed_nbytes(n, self.bits)), "wscale": (torch.float16, n // BLOCK)}
        if self.has_min:
            want["wzero"] = (torch.float16, n // BLOCK)
        got = {k: tensors.get(k) for k in want}
        if any(t is None or t.dtype != dt or t.numel() != size for (dt, size), t in zip(want.values(), got.values())):
            have = ", ".join(f"{k} {'missing' if t is None else f'{t.numel()} {t.dtype}'}" for k, t in got.items())
            need = ", ".join(f"{k} {size} {dt}" for k, (dt, size) in want.items())
            return f"{self.name} tensors are {have}; the map's shape {part['shape']} needs {need}"
        return None


def _symmetric_positions(blocks: Tensor, fmt: GGUFLegacyFormat) -> tuple[Tensor, Tensor]:
    """float32 ``d`` (one per block, keepdim) and ``c = x * (1/d) + (z + 0.5)`` of the ``_0`` types."""
    imax = blocks.abs().argmax(dim=-1, keepdim=True)  # the first of equal magnitudes, as numpy and ggml
    d = blocks.gather(-1, imax) / -float(fmt.zero)
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return d, blocks * inv + (fmt.zero + 0.5)


def _codes(c: Tensor, top: int) -> Tensor:
    """``min(top, trunc(c))`` as float32 codes: ``c >= 0`` wherever it is finite; where it is not
    (``1/d`` overflowed), code 0, which is what gguf's float-to-uint8 cast gives."""
    return torch.where(torch.isfinite(c), torch.trunc(c).clamp(0, top), torch.zeros_like(c))


def legacy_quantize(x: Tensor, fmt: GGUFLegacyFormat) -> LegacyCodes:
    """The reference encoder's codes and float16 scales (and minimums) of ``x``, whose last dim is a
    positive multiple of 32 (computed in float32 whatever ``x``'s dtype, as gguf does).

    Raises:
        ValueError: ``x`` holds NaN/Inf, or its last dim is not a multiple of 32.
    """
    check_finite(x)
    blocks = to_groups(x.to(torch.float32), BLOCK)
    m = None
    if fmt.has_min:
        lo = blocks.amin(dim=-1, keepdim=True)
        d = (blocks.amax(dim=-1, keepdim=True) - lo) / float(fmt.top)
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        c = (blocks - lo) * inv + 0.5
        m = lo.squeeze(-1).to(torch.float16)
    else:
        d, c = _symmetric_positions(blocks, fmt)
    return LegacyCodes(from_groups(_codes(c, fmt.top)).to(torch.uint8), d.squeeze(-1).to(torch.float16), m)


def legacy_dequantize(q: LegacyCodes, fmt: GGUFLegacyFormat) -> Tensor:
    """float32 values of :func:`legacy_quantize`'s output: ``d * (q - z)`` or ``d * q + m``."""
    codes = to_groups(q.codes.to(torch.float32), BLOCK)
    d = q.d.to(torch.float32).unsqueeze(-1)
    if fmt.has_min:
        if q.m is None:
            raise ValueError(f"{fmt.name} codes need their block minimums; got None")
        return from_groups(d * codes + q.m.to(torch.float32).unsqueeze(-1))
    return from_groups(d * (codes - fmt.zero))


Q4_0 = GGUFLegacyFormat("q4_0", 4, has_min=False)
Q4_1 = GGUFLegacyFormat("q4_1", 4, has_min=True)
Q5_0 = GGUFLegacyFormat("q5_0", 5, has_min=False)
Q5_1 = GGUFLegacyFormat("q5_1", 5, has_min=True)
GGUF_LEGACY_FORMATS: dict[str, GGUFLegacyFormat] = {f.name: f for f in (Q4_0, Q4_1, Q5_0, Q5_1)}
