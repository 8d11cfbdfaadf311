"""The bytes a GGUF file holds for a tensor of type Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K,
from the codes and scales the formats of :mod:`.gguf_legacy`, :mod:`.gguf_q8_0` and :mod:`.gguf_kquants`
compute (for an exporter that writes ``.gguf`` files; the tests check the first five against
``gguf.quants.quantize`` byte for byte, and the K-quants, which ``gguf`` cannot quantize, by
dequantizing them with ``gguf.quants.dequantize`` and diffusers' GGUF dequantizers).

Each row of ``n`` values becomes ``n / 32`` blocks laid out as ggml's structs (little endian):

======  =====  ==========================================================================
type    bytes  block
======  =====  ==========================================================================
Q4_0    18     ``d`` f16, ``qs[16]``: ``qs[j] = q[j] | q[j + 16] << 4``
Q4_1    20     ``d`` f16, ``m`` f16, ``qs[16]`` as Q4_0
Q5_0    22     ``d`` f16, ``qh`` u32 (bit ``j`` = bit 4 of ``q[j]``), ``qs[16]`` of the low nibbles
Q5_1    24     ``d`` f16, ``m`` f16, ``qh``, ``qs[16]`` as Q5_0
Q8_0    34     ``d`` f16, ``qs[32]`` int8
======  =====  ==========================================================================

The K-quants use super-blocks of 256 values (``GGUF_BLOCK_SIZES``), ``L`` their codes:

======  =====  ==========================================================================
type    bytes  super-block
======  =====  ==========================================================================
Q4_K    144    ``d`` f16, ``dmin`` f16, ``scales[12]``, ``qs[128]``: for ``c < 4``,
               ``qs[32c + l] = L[64c + l] | L[64c + 32 + l] << 4``
Q5_K    176    ``d``, ``dmin``, ``scales[12]``, ``qh[32]`` (bit ``s`` of ``qh[l]`` = bit 4 of
               ``L[32s + l]``), ``qs[128]`` of the low nibbles as Q4_K
Q6_K    210    ``ql[128]``: ``ql[64h + e] = (L[128h + e] & 15) | (L[128h + 64 + e] & 15) << 4``;
               ``qh[64]``: ``qh[32h + l]`` holds bits 4-5 of ``L[128h + 32k + l]`` at bit
               ``2k``; ``scales[16]`` int8; ``d`` f16
======  =====  ==========================================================================

Q4_K/Q5_K's ``scales[12]`` hold the 6-bit sub-block scales ``sc`` and mins ``m`` as ggml's
``get_scale_min_k4`` reads them: for ``j < 4``, byte ``j`` = ``sc[j] | (sc[j + 4] >> 4) << 6``,
byte ``j + 4`` = ``m[j] | (m[j + 4] >> 4) << 6``, byte ``j + 8`` = ``(sc[j + 4] & 15) | (m[j + 4] & 15) << 4``.

Pure tensor functions (float16 bytes are read in the machine's order: little endian, as on every
platform torch runs on).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffsqueeze.quant.primitives.gguf_kquants import kquant_quantize
from diffsqueeze.quant.primitives.gguf_kref import KQUANT_SPECS, QK_K, KQuantCodes
from diffsqueeze.quant.primitives.gguf_legacy import BLOCK, GGUF_LEGACY_FORMATS, LegacyCodes, legacy_quantize
from diffsqueeze.quant.primitives.gguf_q8_0 import q8_0_quantize

__all__ = ["GGUF_TYPE_SIZES", "GGUF_BLOCK_SIZES", "gguf_blocks", "gguf_kquant_blocks", "gguf_quantize_bytes"]

GGUF_TYPE_SIZES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34, "q4_k": 144, "q5_k": 176, "q6_k": 210}
"""Bytes of one block per type (ggml's ``GGML_QUANT_SIZES``): 32 values, 256 for the K-quants."""

GGUF_BLOCK_SIZES = {name: QK_K if name in KQUANT_SPECS else BLOCK for name in GGUF_TYPE_SIZES}
"""Values per block, per type: a row stored as that type must be a multiple of it."""


def _f16_bytes(v: Tensor) -> Tensor:
    """``(..., n_blocks)`` float16 -> ``(..., n_blocks, 2)`` uint8."""
    v = v.to(torch.float16).contiguous()
    return v.view(torch.uint8).reshape(*v.shape, 2)


def _low_nibbles(q: Tensor) -> Tensor:
    """``(..., 32)`` codes -> ``(..., 16)`` bytes ``(q[j] & 15) | (q[j + 16] & 15) << 4``."""
    q = q & 15
    return q[..., :16] | (q[..., 16:] << 4)


def _high_bits(q: Tensor) -> Tensor:
    """``(..., 32)`` 5-bit codes -> ``(..., 4)`` bytes of the little-endian u32 whose bit ``j`` is bit 4 of ``q[j]``."""
    bits = ((q >> 4) & 1).reshape(*q.shape[:-1], 4, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=q.device)
    return (bits << shifts).sum(dim=-1, dtype=torch.uint8)


def gguf_blocks(name: str, codes: Tensor, d: Tensor, m: Tensor | None = None) -> Tensor:
    """GGUF blocks of stored codes: uint8 ``(..., n_blocks * type_size)``.

    Args:
        name: ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1`` or ``q8_0``.
        codes: ``(..., n)``, ``n`` a multiple of 32: uint8 codes of the legacy types, int8 for Q8_0.
        d: float16 scales ``(..., n / 32)``.
        m: float16 block minimums of the ``_1`` types (None for the others).

    Raises:
        ValueError: unknown type, a missing or unexpected ``m``, or shapes that do not match.
    """
    if name not in GGUF_TYPE_SIZES or name in KQUANT_SPECS:
        raise ValueError(f"no GGUF layout for {name!r}; known: {', '.join(GGUF_LEGACY_FORMATS)}, q8_0 "
                         "(the K-quants: gguf_kquant_blocks)")
    has_min = name.endswith("_1")
    if (m is None) == has_min:
        raise ValueError(f"{name} {'needs' if has_min else 'takes no'} block minimums")
    n = codes.shape[-1]
    if n % BLOCK or tuple(d.shape) != (*codes.shape[:-1], n // BLOCK) or (m is not None and m.shape != d.shape):
        raise ValueError(f"{name}: codes {tuple(codes.shape)} need a last dim that is a multiple of {BLOCK} and "
                         f"scales of shape {(*codes.shape[:-1], n // BLOCK)}; got d {tuple(d.shape)}"
                         + (f", m {tuple(m.shape)}" if m is not None else ""))
    q = codes.reshape(*codes.shape[:-1], n // BLOCK, BLOCK)
    parts = [_f16_bytes(d)]
    if name == "q8_0":
        parts.append(q.to(torch.int8).view(torch.uint8))
    else:
        q = q.to(torch.uint8)
        if m is not None:
            parts.append(_f16_bytes(m))
        if name.startswith("q5"):
            parts.append(_high_bits(q))
        parts.append(_low_nibbles(q))
    out = torch.cat(parts, dim=-1)
    return out.reshape(*codes.shape[:-1], -1)


def _scale_bytes(sc: Tensor, m: Tensor) -> Tensor:
    """``(..., 8)`` 6-bit scales and mins -> ``(..., 12)`` bytes as ``get_scale_min_k4`` reads them."""
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    lo = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6)], dim=-1)
    return torch.cat([lo, (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)], dim=-1)


def gguf_kquant_blocks(name: str, q: KQuantCodes) -> Tensor:
    """GGUF super-blocks of K-quant codes and scales: uint8 ``(..., n_blocks * type_size)``.

    Args:
        name: ``q4_k``, ``q5_k`` or ``q6_k``.
        q: codes ``(..., n)`` (``n`` a multiple of 256) and scales as :func:`.kquant_quantize` gives them.

    Raises:
        ValueError: unknown type, missing mins, or shapes that do not match.
    """
    spec = KQUANT_SPECS.get(name)
    if spec is None:
        raise ValueError(f"no K-quant layout for {name!r}; known: {', '.join(KQUANT_SPECS)}")
    lead, n = q.codes.shape[:-1], q.codes.shape[-1]
    nb = n // QK_K
    sub_shape, d_shape = (*lead, nb, spec.n_sub), (*lead, nb)
    if (n % QK_K or tuple(q.sc.shape) != sub_shape or tuple(q.d.shape) != d_shape
            or (spec.has_min and (q.m is None or q.dmin is None or tuple(q.m.shape) != sub_shape
                                  or tuple(q.dmin.shape) != d_shape))):
        raise ValueError(f"{name}: codes {tuple(q.codes.shape)} need a last dim that is a multiple of {QK_K}, "
                         f"scales{' and mins' if spec.has_min else ''} of shape {sub_shape} and super-scales of "
                         f"shape {d_shape}")
    L = q.codes.reshape(*lead, nb, QK_K).to(torch.uint8)
    if spec.has_min:
        assert q.m is not None and q.dmin is not None
        parts = [_f16_bytes(q.d), _f16_bytes(q.dmin), _scale_bytes(q.sc, q.m)]
        pairs = L.reshape(*lead, nb, 4, 2, 32)  # chunk c: sub-blocks 2c (low nibbles) and 2c + 1 (high)
        if name == "q5_k":
            bits = ((L >> 4) & 1).reshape(*lead, nb, 8, 32)
            shifts = torch.arange(8, dtype=torch.uint8, device=L.device).reshape(8, 1)
            parts.append((bits << shifts).sum(dim=-2, dtype=torch.uint8))
        parts.append(((pairs[..., 0, :] & 15) | ((pairs[..., 1, :] & 15) << 4)).reshape(*lead, nb, 128))
    else:
        halves = L.reshape(*lead, nb, 2, 2, 64)  # half h: values 0..63 (low nibbles) and 64..127 (high)
        ql = ((halves[..., 0, :] & 15) | ((halves[..., 1, :] & 15) << 4)).reshape(*lead, nb, 128)
        quarters = (L >> 4).reshape(*lead, nb, 2, 4, 32)  # half h, quarter k: bits 2k..2k+1 of qh[32h + l]
        shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=L.device).reshape(4, 1)
        qh = (quarters << shifts).sum(dim=-2, dtype=torch.uint8).reshape(*lead, nb, 64)
        parts = [ql, qh, q.sc.to(torch.int8).view(torch.uint8), _f16_bytes(q.d)]
    return torch.cat(parts, dim=-1).reshape(*lead, -1)


def gguf_quantize_bytes(x: Tensor, name: str) -> Tensor:
    """What ``gguf.quants.quantize(x, GGMLQuantizationType.<NAME>)`` returns for ``x`` (last dim a
    positive multiple of the type's block, ``GGUF_BLOCK_SIZES``), computed by this package's
    encoders: uint8 ``(..., n / block * type_size)``. For the K-quants, which the ``gguf`` package
    cannot quantize: the bytes of ggml's reference quantizer as :mod:`.gguf_kref` reconstructs it,
    except for super-blocks already on a K-quant grid (an exported weight), whose bytes decode to
    exactly their values (:func:`.gguf_kquants.kquant_quantize`)."""
    if name in KQUANT_SPECS:
        return gguf_kquant_blocks(name, kquant_quantize(x, name))
    if name == "q8_0":
        codes, d = q8_0_quantize(x)
        return gguf_blocks(name, codes, d)
    if name not in GGUF_LEGACY_FORMATS:
        raise ValueError(f"no GGUF layout for {name!r}; known: {', '.join(GGUF_TYPE_SIZES)}")
    q: LegacyCodes = legacy_quantize(x, GGUF_LEGACY_FORMATS[name])
    return gguf_blocks(name, q.codes, q.d, q.m)
