"""Number formats by name: the one registry of every format (docs/architecture.md, "A number format").

Integer (docs/methods.md §2), FP ExMy and hardware FP8 (§3), block-scaled NVFP4/MXFP4/MXFP8 (§10).
Each format is an object of the :class:`~.number_format.NumberFormat` protocol; its math lives in
its own module (:mod:`.int_format`, :mod:`.fp_format`, :mod:`.block_formats`). This module names
the formats (:data:`FORMATS`) and re-exports the INT/FP functions, so callers import one module.

Everything here is a pure, vectorised tensor function: no modules, no state. Scale, zero point
and exponent bias may be Python numbers or tensors broadcastable to ``x``, which gives
per-tensor, per-output-channel and per-group quantization from the same code (for groups,
reshape ``x`` with :func:`to_groups` first). Rounding is round-half-to-even (``torch.round``).

Outputs of the fake quantizers keep ``x``'s dtype; the arithmetic runs in float32 (float64 when
``x`` is float64), so low-precision inputs do not distort the grid.
"""

from __future__ import annotations

import re

from diffsqueeze.quant.primitives.block_formats import BLOCK_FORMATS
from diffsqueeze.quant.primitives.fp_format import (
    E1M2,
    E2M1,
    E2M1_HW,
    E2M3,
    E2M3_HW,
    E3M0,
    E3M2,
    E3M2_HW,
    E4M3,
    E4M3_HW,
    E5M2,
    E5M2_HW,
    FP_FORMATS,
    FPFormat,
    bias_to_scale,
    fp_decode,
    fp_encode,
    fp_grid,
    fp_quantize,
    fp_step,
    maxval,
    scale_to_bias,
)
from diffsqueeze.quant.primitives.gguf_kquants import GGUF_KQUANT_FORMATS
from diffsqueeze.quant.primitives.gguf_legacy import GGUF_LEGACY_FORMATS
from diffsqueeze.quant.primitives.gguf_q8_0 import Q8_0
from diffsqueeze.quant.primitives.grouping import check_finite, from_groups, to_groups
from diffsqueeze.quant.primitives.int_format import (
    INT_BITS,
    IntFormat,
    check_int_bits,
    int_code_range,
    int_dequantize,
    int_fake_quantize,
    int_qparams,
    int_quantize,
)
from diffsqueeze.quant.primitives.number_format import NumberFormat

__all__ = [
    "FORMATS",
    "NumberFormat",
    "INT_BITS",
    "IntFormat",
    "FPFormat",
    "E4M3",
    "E5M2",
    "E3M2",
    "E2M3",
    "E2M1",
    "E3M0",
    "E1M2",
    "E4M3_HW",
    "E5M2_HW",
    "E3M2_HW",
    "E2M3_HW",
    "E2M1_HW",
    "check_int_bits",
    "check_finite",
    "int_code_range",
    "int_qparams",
    "int_quantize",
    "int_dequantize",
    "int_fake_quantize",
    "to_groups",
    "from_groups",
    "known_formats",
    "parse_format",
    "formats_for_bits",
    "maxval",
    "fp_step",
    "fp_quantize",
    "fp_grid",
    "bias_to_scale",
    "scale_to_bias",
    "fp_encode",
    "fp_decode",
]


def _format_table() -> dict[str, NumberFormat]:
    table: dict[str, NumberFormat] = {}
    for b in INT_BITS:
        table[f"int{b}"] = IntFormat(b, symmetric=False)
        table[f"int{b}_sym"] = IntFormat(b, symmetric=True)
    for f in FP_FORMATS:
        short = f"e{f.exp_bits}m{f.man_bits}" + ("_hw" if f.hardware else "")
        table[f.name] = table[short] = f
    table["fp8_e4m3fn"] = table["e4m3fn"] = table["float8_e4m3fn"] = E4M3_HW
    table["float8_e5m2"] = E5M2_HW
    table.update(BLOCK_FORMATS)
    table[Q8_0.name] = Q8_0
    table.update(GGUF_LEGACY_FORMATS)  # q4_0, q4_1, q5_0, q5_1
    table.update(GGUF_KQUANT_FORMATS)  # q4_k, q5_k, q6_k
    return table


FORMATS: dict[str, NumberFormat] = _format_table()
"""Every format by name and alias (lower case): the one table a new format is added to."""


def known_formats() -> list[str]:
    """All names :func:`parse_format` accepts (canonical names and aliases), sorted."""
    return sorted(FORMATS)


def parse_format(name: str | NumberFormat) -> NumberFormat:
    """Look up a format by name (case-insensitive).

    ``int2``..``int8`` (asymmetric) and ``int2_sym``..``int8_sym``; ``fp8_e4m3`` / ``e4m3``
    and the other registered FP formats; ``_hw`` (or ``fp8_e4m3fn``, ``float8_e5m2``) for the
    hardware flavours; the block-scaled ``nvfp4``, ``mxfp4``, ``mxfp8``. A format object is
    returned unchanged.

    Raises:
        ValueError: Unknown name (the message lists the known ones) or INT bits out of range.
    """
    if isinstance(name, NumberFormat):
        return name
    key = str(name).strip().lower()
    if key in FORMATS:
        return FORMATS[key]
    m = re.fullmatch(r"int(\d+)(_sym)?", key)
    if m:
        check_int_bits(int(m.group(1)))  # raises with the allowed range
    raise ValueError(f"unknown format {name!r}; known: {', '.join(known_formats())}")


def formats_for_bits(bits: int, hardware: bool = False) -> list[FPFormat]:
    """Registered FP formats of a total bit-width, for per-layer format search (docs/methods.md §3).

    Args:
        bits: Total bit-width (4, 6 or 8 have formats).
        hardware: Return the hardware flavours (only formats that have one) instead.

    Raises:
        ValueError: No registered FP format has that width.
    """
    found = [f for f in FP_FORMATS if f.bits == bits and f.hardware == hardware]
    if not found:
        widths = sorted({f.bits for f in FP_FORMATS if f.hardware == hardware})
        raise ValueError(f"no FP format with {bits} bits; available widths: {widths}")
    return found
