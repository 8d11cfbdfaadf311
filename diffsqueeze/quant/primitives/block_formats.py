"""Block-scaled number formats MXFP4, MXFP8 (OCP MX v1.0) and NVFP4 (docs/methods.md §10).

A block of ``block`` consecutive elements along the last dim shares one scale; the elements are
cast to an FP element format (the project's hardware grids from :mod:`.fp_format`) with
saturation and round-half-to-even.

- MX: the scale is E8M0, ``X = 2^e`` with ``e = floor(log2 amax_block) - emax_elem`` clamped to
  ``[-127, 127]`` (byte ``e + 127``, so never the NaN byte 0xFF). An all-zero block gets
  ``e = -127`` (byte 0), the smallest scale.
- NVFP4: an FP32 tensor scale ``s_t = amax_tensor / (6 * 448)`` and per block of 16 an E4M3
  scale ``fp8(amax_block / 6 / s_t)`` (saturating at 448); ``x_hat = q * fp8 * s_t``. Where
  ``s_t`` would be 0 in FP32 (an all-zero tensor, or amax below ~2^-137 underflowing the
  division) it is set to the smallest positive FP32, 2^-149, so no scale is 0/0 or infinite; a
  block whose E4M3 scale is 0 encodes all its elements as 0.

Pure tensor functions. MX arithmetic runs in float32 (float64 for float64 inputs) and is exact,
as the scale is a power of two. NVFP4's scale arithmetic runs in float64 whatever the input:
``fp8 * s_t`` needs up to 27 significant bits and ``q * fp8 * s_t`` 29, so float32 would round
the divisor and the product twice; float64 holds both exactly and the output is rounded once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from diffsqueeze.quant.primitives.fp_format import (
    E2M1_HW,
    E4M3_HW,
    FPFormat,
    fp_decode,
    fp_encode,
    fp_quantize,
    maxval,
)
from diffsqueeze.quant.primitives.grouping import (
    check_finite,
    from_groups,
    to_groups,
    work_dtype,
)
from diffsqueeze.quant.primitives.number_format import BlockScaledFormat
from diffsqueeze.quant.primitives.pack import pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "BLOCK_FORMATS",
    "MXFP4",
    "MXFP8",
    "NVFP4",
    "BlockCodes",
    "BlockFormat",
    "block_bytes",
    "block_dequantize",
    "block_fake_quantize",
    "block_quantize",
    "pack_block_codes",
    "unpack_block_codes",
]

ScaleKind = Literal["e8m0", "e4m3+fp32"]
E8M0_BIAS = 127
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127  # byte 255 (exponent 128) is NaN
_FP32_SMALLEST = 2.0**-149


@dataclass(frozen=True)
class BlockFormat(BlockScaledFormat):
    """A block-scaled format: ``element`` codes in blocks of ``block`` along the last dim.

    Attributes:
        name: ``mxfp4``, ``mxfp8`` or ``nvfp4``.
        element: The element grid (a hardware :class:`FPFormat` at its standard bias).
        block: Elements sharing one scale.
        scale: ``"e8m0"`` (MX: a power-of-two scale per block) or ``"e4m3+fp32"`` (NVFP4: an
            E4M3 scale per block times one FP32 scale per tensor).
    """

    name: str
    element: FPFormat
    block: int
    scale: ScaleKind

    @property
    def bits(self) -> int:
        """Bits of one element code (the block scales come on top: :func:`block_bytes`)."""
        return self.element.bits

    @property
    def eight_bit(self) -> str:
        return "mxfp8"

    # ---- the number-format protocol (number_format.py: BlockScaledFormat) -------------------

    def fake_quantize_blocks(self, x: Tensor) -> Tensor:
        return block_fake_quantize(x, self)

    def encode(self, g: Tensor, params: dict[str, Tensor], scale_dtype: str,
               shape: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        rows = g.reshape(g.shape[0], -1)
        packed = pack_block_codes(block_quantize(rows, self), self)
        tensors = {"qweight": packed["elements"], "wscale": packed["scales"]}
        if "tensor_scale" in packed:
            tensors["wscale_t"] = packed["tensor_scale"]
        spec = {"storage": "block", "padded_row": rows.shape[1], "group_size": self.block,
                "n_groups": rows.shape[1] // self.block}
        return spec, tensors

    def empty_buffers(self, part: dict[str, Any], out: int, device: Any) -> dict[str, Tensor]:
        n = out * part["padded_row"]
        bufs = {"qweight": torch.empty(packed_nbytes(n, self.bits), dtype=torch.uint8, device=device),
                "wscale": torch.empty(n // self.block, dtype=torch.uint8, device=device)}
        if self.scale == "e4m3+fp32":
            bufs["wscale_t"] = torch.empty((), dtype=torch.float32, device=device)
        return bufs

    def decode(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> Tensor:
        shape = tuple(part["shape"])
        stored = {"elements": tensors["qweight"], "scales": tensors["wscale"]}
        if self.scale == "e4m3+fp32":
            stored["tensor_scale"] = tensors["wscale_t"]
        rows = (shape[0], part["padded_row"])
        w = block_dequantize(unpack_block_codes(stored, self, rows), self, torch.float32)
        return w[:, : part["numel"] // shape[0]].reshape(shape)

    def check_part(self, part: dict[str, Any]) -> str | None:
        if part.get("storage") != "block" or part.get("bits") != self.bits or not isinstance(part.get("padded_row"), int):
            return (f"block storage needs a block format, its bits and padded_row; got storage "
                    f"{part.get('storage')!r}, bits {part.get('bits')!r}, padded_row {part.get('padded_row')!r}")
        return None

    def check_stored(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> str | None:
        q, s = tensors["qweight"], tensors["wscale"]
        n = part["shape"][0] * part["padded_row"]
        if q.dtype != torch.uint8 or q.numel() != packed_nbytes(n, self.bits) or s.numel() != n // self.block:
            return (f"{self.name} codes/scales have {q.numel()}/{s.numel()} elements, the map's shape "
                    f"{part['shape']} needs {packed_nbytes(n, self.bits)}/{n // self.block}")
        return None

    def __post_init__(self) -> None:
        if self.scale not in ("e8m0", "e4m3+fp32"):
            raise ValueError(f"block format {self.name}: unknown scale kind {self.scale!r}; use 'e8m0' or 'e4m3+fp32'")
        if self.block <= 0:
            raise ValueError(f"block format {self.name}: block size must be positive, got {self.block}")


@dataclass
class BlockCodes:
    """The stored form of a block-quantized tensor.

    Attributes:
        elements: uint8 element bit codes (``fp_encode`` of the element format), ``x``'s shape.
        scales: Block scales, shape ``x.shape[:-1] + (n_blocks,)``: uint8 E8M0 bytes for MX,
            ``torch.float8_e4m3fn`` for NVFP4.
        tensor_scale: NVFP4's FP32 tensor scale (0-dim float32); ``None`` for MX.
    """

    elements: Tensor
    scales: Tensor
    tensor_scale: Tensor | None = None


MXFP4 = BlockFormat("mxfp4", E2M1_HW, 32, "e8m0")
MXFP8 = BlockFormat("mxfp8", E4M3_HW, 32, "e8m0")
NVFP4 = BlockFormat("nvfp4", E2M1_HW, 16, "e4m3+fp32")
BLOCK_FORMATS: dict[str, BlockFormat] = {f.name: f for f in (MXFP4, MXFP8, NVFP4)}


def _check_shape(shape: tuple[int, ...] | torch.Size, fmt: BlockFormat) -> None:
    n = shape[-1] if len(shape) else 0
    if n <= 0 or n % fmt.block:
        raise ValueError(f"{fmt.name} needs a last dim that is a positive multiple of its block size "
                         f"{fmt.block}; got shape {tuple(shape)} (last dim {n})")


def _emax_elem(element: FPFormat) -> int:
    """Exponent of the element format's largest normal (E2M1: 2, E4M3: 8)."""
    return element.max_exp_code - element.standard_bias


def _mx_exponents(amax: Tensor, element: FPFormat) -> Tensor:
    # frexp gives floor(log2 amax) exactly (log2 can round up just below a power of two)
    expo = torch.frexp(amax)[1].to(torch.int32) - 1
    e = torch.where(amax > 0, expo - _emax_elem(element), torch.full_like(expo, E8M0_MIN_EXP))
    return e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def _nvfp4_tensor_scale(x: Tensor, fmt: BlockFormat) -> Tensor:
    amax = x.abs().max().to(torch.float64)
    s_t = amax / (maxval(fmt.element, fmt.element.standard_bias) * maxval(E4M3_HW, E4M3_HW.standard_bias))
    s_t = s_t.to(torch.float32)
    if not bool(torch.isfinite(s_t)):
        raise ValueError(f"nvfp4: tensor amax {amax.item():.4g} / 2688 overflows the FP32 tensor scale")
    return torch.where(s_t > 0, s_t, torch.full_like(s_t, _FP32_SMALLEST))


def _nvfp4_divisor(scales: Tensor, tensor_scale: Tensor) -> Tensor:
    """``fp8 * s_t`` per block, exact in float64."""
    return scales.to(torch.float64) * tensor_scale.to(torch.float64)


def block_quantize(x: Tensor, fmt: BlockFormat) -> BlockCodes:
    """Quantize ``x`` to ``fmt``: element codes, block scales and (NVFP4) the tensor scale.

    Args:
        x: Finite values of any shape whose last dim is a positive multiple of ``fmt.block``.
        fmt: A :class:`BlockFormat` (see :data:`BLOCK_FORMATS`).

    Returns:
        The :class:`BlockCodes`; :func:`block_dequantize` turns them back into values.

    Raises:
        ValueError: the last dim is not a positive multiple of the block, or ``x`` is not finite.
    """
    _check_shape(x.shape, fmt)
    check_finite(x)
    el = fmt.element
    if fmt.scale == "e8m0":
        g = to_groups(x.to(work_dtype(x)), fmt.block)
        e = _mx_exponents(g.abs().amax(dim=-1), el)
        scaled = g / torch.exp2(e.to(g.dtype)).unsqueeze(-1)
        codes = fp_encode(from_groups(scaled), el)
        return BlockCodes(codes, (e + E8M0_BIAS).to(torch.uint8))
    s_t = _nvfp4_tensor_scale(x, fmt)
    g = to_groups(x.to(torch.float64), fmt.block)
    s_b = g.abs().amax(dim=-1) / maxval(el, el.standard_bias)
    ratio = s_b / s_t.to(torch.float64)
    # fp_quantize saturates at 448 and rounds half to even; the cast to float8 is then exact
    scales = fp_quantize(ratio, E4M3_HW, E4M3_HW.standard_bias, check=False).to(torch.float8_e4m3fn)
    d = _nvfp4_divisor(scales, s_t).unsqueeze(-1)
    scaled = torch.where(d > 0, g / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(g))
    return BlockCodes(fp_encode(from_groups(scaled), el), scales, s_t)


def block_dequantize(codes: BlockCodes, fmt: BlockFormat, dtype: torch.dtype = torch.float32) -> Tensor:
    """Values of :class:`BlockCodes`: ``element * scale`` (``* tensor_scale`` for NVFP4).

    Args:
        codes: Output of :func:`block_quantize` or :func:`unpack_block_codes`.
        fmt: The format the codes were made with.
        dtype: Output dtype; float32 by default. MX values are computed in float32 (float64 if
            ``dtype`` is float64), NVFP4 values in float64, then cast once to ``dtype``. Only codes
            of float64 inputs beyond float32's range (E8M0 scales near 2^127) overflow float32.

    Returns:
        A tensor of ``codes.elements``' shape.
    """
    _check_shape(codes.elements.shape, fmt)
    if fmt.scale == "e8m0":
        wd = torch.float64 if dtype == torch.float64 else torch.float32
        q = to_groups(fp_decode(codes.elements, fmt.element, dtype=wd), fmt.block)
        scale = torch.exp2((codes.scales.to(torch.int32) - E8M0_BIAS).to(wd)).unsqueeze(-1)
        return from_groups(q * scale).to(dtype)
    if codes.tensor_scale is None:
        raise ValueError("nvfp4 codes need a tensor_scale; got None")
    q = to_groups(fp_decode(codes.elements, fmt.element, dtype=torch.float64), fmt.block)
    return from_groups(q * _nvfp4_divisor(codes.scales, codes.tensor_scale).unsqueeze(-1)).to(dtype)


def block_fake_quantize(x: Tensor, fmt: BlockFormat) -> Tensor:
    """``block_dequantize(block_quantize(x, fmt))`` in ``x``'s dtype: the values ``fmt`` stores.

    Args:
        x: Finite values of any shape whose last dim is a positive multiple of ``fmt.block``.
        fmt: A :class:`BlockFormat`.

    Returns:
        ``x_hat``, same shape and dtype as ``x``.
    """
    _check_shape(x.shape, fmt)
    check_finite(x)
    el = fmt.element
    # the same arithmetic as block_quantize -> block_dequantize, without the bit encoding
    if fmt.scale == "e8m0":
        g = to_groups(x.to(work_dtype(x)), fmt.block)
        scale = torch.exp2(_mx_exponents(g.abs().amax(dim=-1), el).to(g.dtype)).unsqueeze(-1)
        return from_groups(fp_quantize(g / scale, el, el.standard_bias, check=False) * scale).to(x.dtype)
    s_t = _nvfp4_tensor_scale(x, fmt)
    g = to_groups(x.to(torch.float64), fmt.block)
    ratio = g.abs().amax(dim=-1) / maxval(el, el.standard_bias) / s_t.to(torch.float64)
    d = _nvfp4_divisor(fp_quantize(ratio, E4M3_HW, E4M3_HW.standard_bias, check=False), s_t).unsqueeze(-1)
    scaled = torch.where(d > 0, g / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(g))
    return from_groups(fp_quantize(scaled, el, el.standard_bias, check=False) * d).to(x.dtype)


def pack_block_codes(codes: BlockCodes, fmt: BlockFormat) -> dict[str, Tensor]:
    """Storage tensors of :class:`BlockCodes`, bit-exact and ready to save.

    Returns:
        ``elements``: flat uint8, two 4-bit codes per byte (first code in the low nibble) or one
        8-bit code per byte; ``scales``: flat uint8, the E8M0 bytes or the E4M3 bits;
        for NVFP4 also ``tensor_scale``: 0-dim float32.
    """
    out = {
        "elements": pack_codes(codes.elements, fmt.element.bits),
        "scales": (codes.scales.view(torch.uint8) if fmt.scale == "e4m3+fp32" else codes.scales).reshape(-1).clone(),
    }
    if fmt.scale == "e4m3+fp32":
        if codes.tensor_scale is None:
            raise ValueError("nvfp4 codes need a tensor_scale; got None")
        out["tensor_scale"] = codes.tensor_scale.to(torch.float32).reshape(())
    return out


def unpack_block_codes(tensors: dict[str, Tensor], fmt: BlockFormat, shape: tuple[int, ...] | torch.Size) -> BlockCodes:
    """Inverse of :func:`pack_block_codes` for a tensor of ``shape``.

    Raises:
        ValueError: a tensor is missing or has the wrong size or dtype (a damaged artifact).
    """
    _check_shape(shape, fmt)
    shape = tuple(shape)
    numel, n_blocks = math.prod(shape), math.prod(shape) // fmt.block
    need = ["elements", "scales"] + (["tensor_scale"] if fmt.scale == "e4m3+fp32" else [])
    missing = [k for k in need if k not in tensors]
    if missing:
        raise ValueError(f"{fmt.name} storage lacks {missing}; has {sorted(tensors)}")
    elements = unpack_codes(tensors["elements"], numel, fmt.element.bits).reshape(shape)
    scales = tensors["scales"]
    if scales.dtype != torch.uint8 or scales.numel() != n_blocks:
        raise ValueError(f"{fmt.name} scales for shape {shape} must be {n_blocks} uint8 bytes, "
                         f"got {scales.numel()} {str(scales.dtype).replace('torch.', '')}")
    scales = scales.reshape(*shape[:-1], shape[-1] // fmt.block)
    if fmt.scale == "e8m0":
        return BlockCodes(elements, scales.clone())
    ts = tensors["tensor_scale"]
    if ts.dtype != torch.float32 or ts.numel() != 1:
        got = f"{ts.numel()} {str(ts.dtype).replace('torch.', '')}"
        raise ValueError(f"nvfp4 tensor_scale must be one float32, got {got}")
    return BlockCodes(elements, scales.clone().view(torch.float8_e4m3fn), ts.reshape(()).clone())


def block_bytes(numel: int, fmt: BlockFormat) -> int:
    """Storage bytes of ``numel`` elements in ``fmt``: packed elements + block scales (+ tensor scale).

    MXFP4 17 bytes per 32 elements (4.25 bits each), MXFP8 33 (8.25 bits), NVFP4 9 per 16
    (4.5 bits) plus 4 bytes per tensor; equals the ``nbytes`` of :func:`pack_block_codes`'s tensors.

    Raises:
        ValueError: ``numel`` is not a positive multiple of the block.
    """
    if numel <= 0 or numel % fmt.block:
        raise ValueError(f"{fmt.name} stores whole blocks of {fmt.block}; got {numel} elements")
    tensor_scale = 4 if fmt.scale == "e4m3+fp32" else 0
    return packed_nbytes(numel, fmt.element.bits) + numel // fmt.block + tensor_scale
