"""GGUF's K-quants Q4_K, Q5_K and Q6_K: ggml's reference quantizers, vectorised over super-blocks.

A super-block is 256 consecutive values of a row (``QK_K``):

- Q4_K / Q5_K: 8 sub-blocks of 32, each with a 6-bit scale ``sc`` and a 6-bit min ``m`` under two
  float16 super-scales ``d`` and ``dmin``; codes ``q`` in ``0..15`` (``0..31``); decoded
  ``(d * sc) * q - dmin * m`` (float32, one operation at a time; the products are exact, only the
  subtraction rounds). 4.5 (5.5) bits per weight.
- Q6_K: 16 sub-blocks of 16, each with an int8 scale ``sc`` under one float16 ``d``; codes in
  ``0..63``; decoded ``(d * sc) * (q - 32)`` (exact in float32). 6.5625 bits per weight.

The encoders reconstruct ggml's ``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref`` (with
``make_qkx2_quants``: per sub-block a weighted least-squares fit of scale and offset over
``nstep + 1`` candidate inverse scales ``(rmin + rdelta * is + nmax) / (max - min)``, weights
``sqrt(mean(x^2)) + |x|``, ``rmin, rdelta, nstep = -1, 0.1, 20`` for Q4_K and ``-0.5, 0.1, 15`` for
Q5_K, the offset ``min`` clamped to at most 0 and, as in C, replaced by each better candidate's, so
later candidates search from it; then the sub-block scales and mins are rounded to 6 bits against
the largest of each, ``d = max_scale / 63``, ``dmin = max_min / 63``, and the codes are recomputed
as ``nearest_int((x + dmin * m) / (d * sc))``) and ``quantize_row_q6_K_ref`` (with
``make_qx_quants(16, 32, x, rmse_type 1)``: weights ``x^2``, candidate inverse scales ``-32 / max``
then ``-(32 + 0.1 is) / max``, ``is = -9..9`` but 0; then ``d = max_scale / -128``,
``sc = min(127, nearest_int(-128 * scale / max_scale))`` and ``nearest_int(x / (d * sc)) + 32``).
``nearest_int`` is ggml's magic-number rounding: half to even (``torch.round``); a non-finite
argument gives ggml's ``-2^22`` (then clamped to the lowest code). Every sum runs sequentially in
float32 in the C loop's order (not torch's pairwise sums; ``cumsum`` accumulates in double) and
every expression is evaluated one float32 operation at a time in C's order (no fused multiply-add),
so ties and candidate choices follow the C source as written.

How this was checked (``tests/quant/test_gguf_kquants.py``): ggml's C code could not be read or
compiled here (no network), so the algorithm is reconstructed from ggml's source as remembered and
checked in what can be checked offline: (1) it equals, byte for byte, a literal scalar port of the
C loops (numpy float32 scalars, the ``nearest_int`` bit trick) on random and edge-case super-blocks;
(2) the bytes of :mod:`.gguf_bytes` dequantize through the ``gguf`` package and through diffusers'
GGUF dequantizers bit for bit to :func:`kquant_dequantize`'s values (the layout of the scale bytes
is ``get_scale_min_k4``'s, as the ``gguf`` package's dequantizer reads it); (3) the search's squared
error is below a plain min/max choice on Gaussian weights. Bit identity with a llama.cpp binary is
not verified (and depends on its build: with ``-ffp-contract=fast`` and FMA, the default for a
native GCC build, C fuses some of these multiply-adds).

A sub-block whose quantized scale is 0 keeps the search's codes, as in ggml (they decode to
``-dmin * m``, or 0, whatever they are). Pure tensor functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffsqueeze.quant.primitives.grouping import check_finite

__all__ = ["QK_K", "KQuantCodes", "KQUANT_SPECS", "KQuantSpec", "check_kquant_input", "dequantize_blocks", "flat_codes",
           "kquant_dequantize", "kquant_ref_quantize", "nearest_int", "ref_blocks", "shaped_codes"]

QK_K = 256
_CHUNK = 2048  # super-blocks per search chunk
GROUP_MAX_EPS = 1e-15  # ggml's threshold below which a Q6_K (sub-)block is all zeros
_F32 = torch.float32


@dataclass(frozen=True)
class KQuantSpec:
    """One K-quant type: code bits, sub-block length and (Q4_K/Q5_K) ``make_qkx2_quants``' search."""

    name: str
    bits: int
    sub: int  # values per sub-block
    has_min: bool
    rmin: float = 0.0
    rdelta: float = 0.0
    nstep: int = 0

    @property
    def n_sub(self) -> int:
        return QK_K // self.sub

    @property
    def top(self) -> int:
        return 2**self.bits - 1


KQUANT_SPECS = {s.name: s for s in (KQuantSpec("q4_k", 4, 32, True, -1.0, 0.1, 20),
                                    KQuantSpec("q5_k", 5, 32, True, -0.5, 0.1, 15),
                                    KQuantSpec("q6_k", 6, 16, False))}


@dataclass(frozen=True)
class KQuantCodes:
    """Codes (uint8, ``(..., n)``), sub-block scales ``sc`` (uint8 0..63 for Q4_K/Q5_K, int8 for
    Q6_K) and mins ``m`` (uint8 0..63; None for Q6_K), ``(..., n / 256, n_sub)``, and the float16
    super-scales ``d`` (and ``dmin``), ``(..., n / 256)``."""

    codes: Tensor
    sc: Tensor
    d: Tensor
    m: Tensor | None = None
    dmin: Tensor | None = None


def _f32(v: float) -> Tensor:
    return torch.tensor(v, dtype=_F32)


def _rdiv(a: float, t: Tensor) -> Tensor:
    """``a / t`` rounded once (torch's ``float / tensor`` multiplies by a rounded reciprocal)."""
    return torch.div(torch.full_like(t, a), t)


def nearest_int(v: Tensor) -> Tensor:
    """ggml's ``nearest_int`` (float32 in, integral float32 out): half to even; ``-2^22`` where not finite."""
    return torch.where(torch.isfinite(v), torch.round(v), torch.full_like(v, -4194304.0))


def _sq(v: Tensor) -> Tensor:
    return v * v


def _seq_sum(t: Tensor) -> Tensor:
    """``s = 0; s += t[i]`` over the first dim in order: a float32 C loop (not torch's pairwise sum)."""
    total = t[0].clone()
    for i in range(1, t.shape[0]):
        total += t[i]
    return total


def _make_qkx2_quants(x: Tensor, w: Tensor, spec: KQuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """ggml's ``make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, false)``
    on rows ``x`` (``(N, n)`` float32): codes ``L`` (float, ``(N, n)``), ``scale`` and ``the_min``
    (``(N,)``, ``the_min = -min >= 0``).

    As in C, one variable ``min`` holds the range's minimum and then the best candidate's offset:
    a candidate that wins changes ``min``, and every later candidate's inverse scale
    ``(rmin + rdelta * is + nmax) / (max - min)`` and codes ``nearest_int(iscale * (x - min))``
    use the new one; so the candidates run in order. Element-first layouts (``(n, N)``) keep each
    step of the C loops over elements one contiguous slice."""
    nmax = spec.top
    xt, wt = x.T.contiguous(), w.T.contiguous()  # (n, N)
    lo, hi = x.amin(dim=-1), x.amax(dim=-1)
    sum_w, sum_x = _seq_sum(torch.stack([wt, wt * xt], dim=1))  # sum_x starts at weights[0] * x[0], as in C
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    flat = hi == lo
    hi = torch.where(flat, lo + 1, hi)  # flat rows are answered at the end
    iscale = _rdiv(nmax, hi - lo)
    scale = _rdiv(1.0, iscale)
    levels = torch.round(iscale * (xt - lo)).clamp_(0, nmax)
    best = _seq_sum(wt * _sq((scale * levels + lo) - xt))
    steps = (_f32(spec.rmin) + _f32(spec.rdelta) * torch.arange(spec.nstep + 1, dtype=_F32)) + float(nmax)
    for c in range(spec.nstep + 1):
        l = torch.round((steps[c] / (hi - lo)) * (xt - lo)).clamp_(0, nmax)  # Laux
        wl = wt * l
        sum_l, sum_l2, sum_xl = _seq_sum(torch.stack([wl, wl * l, wl * xt], dim=1))  # one C loop, three sums
        big_d = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / big_d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / big_d
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = _seq_sum(wt * _sq((this_scale * l + this_min) - xt))
        better = (big_d > 0) & (cur < best)  # a later candidate replaces only when strictly better
        levels = torch.where(better, l, levels)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    levels = torch.where(flat, torch.zeros_like(levels), levels).T
    return levels, torch.where(flat, torch.zeros_like(scale), scale), -lo


def _make_qx_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` on rows ``x`` (``(N, n)``): codes
    ``L = l + nmax`` (float, ``(N, n)``) and the scale (``(N,)``)."""
    imax = x.abs().argmax(dim=-1, keepdim=True)  # the first of equal magnitudes, as ggml's strict '>'
    mx = x.gather(-1, imax)[:, 0]
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    xt = x.T.contiguous()  # (n, N)
    w = xt * xt
    # the inverse scales: -nmax / max first, then -(nmax + 0.1 is) / max for is = -9..9 but 0
    isc = torch.stack([_rdiv(-nmax, mx)] + [-(float(nmax) + _f32(0.1) * s) / mx for s in range(-9, 10) if s], dim=-1)
    l = torch.round(isc * xt[..., None]).clamp_(-nmax, nmax - 1)  # (n, N, C)
    sumlx, suml2 = _seq_sum(torch.stack([(w * xt)[..., None] * l, (w[..., None] * l) * l], dim=1))
    scale = torch.where(suml2[:, 0] != 0, sumlx[:, 0] / suml2[:, 0], torch.zeros_like(mx))
    best = scale * sumlx[:, 0]
    choice = torch.zeros_like(mx, dtype=torch.long)
    for c in range(1, isc.shape[1]):
        better = (suml2[:, c] > 0) & (sumlx[:, c] * sumlx[:, c] > best * suml2[:, c])
        scale = torch.where(better, sumlx[:, c] / suml2[:, c], scale)
        best = torch.where(better, scale * sumlx[:, c], best)
        choice = torch.where(better, c, choice)
    levels = l.gather(2, choice[None, :, None].expand(l.shape[0], -1, 1))[..., 0].T
    levels = torch.where(zero[:, None], torch.full_like(levels, -nmax), levels)
    return levels + nmax, torch.where(zero, torch.zeros_like(scale), scale)


def _quantize_with_min(x: Tensor, spec: KQuantSpec) -> KQuantCodes:
    """``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref`` on super-blocks ``x`` (``(B, 256)``)."""
    b = x.shape[0]
    sub = x.reshape(b * spec.n_sub, spec.sub)
    sum_x2 = _seq_sum(_sq(sub.T))
    av_x = torch.sqrt(sum_x2 / float(spec.sub))
    levels, scales, mins = _make_qkx2_quants(sub, av_x[:, None] + sub.abs(), spec)
    scales, mins = scales.reshape(b, spec.n_sub), mins.reshape(b, spec.n_sub)
    max_scale, max_min = scales.amax(dim=1), mins.amax(dim=1)  # ggml's running maxima start at +0
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    inv_scale = torch.where(max_scale > 0, _rdiv(63.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _rdiv(63.0, max_min), torch.zeros_like(max_min))
    # uint8_t ls = nearest_int(...) (a conversion modulo 256), then MIN(63, ls)
    ls = (nearest_int(inv_scale[:, None] * scales).long() & 0xFF).clamp(max=63)
    lm = (nearest_int(inv_min[:, None] * mins).long() & 0xFF).clamp(max=63)
    d, dmin = (max_scale / 63.0).to(torch.float16), (max_min / 63.0).to(torch.float16)
    dd = d.to(_F32)[:, None] * ls.to(_F32)
    dm = dmin.to(_F32)[:, None] * lm.to(_F32)
    xs = x.reshape(b, spec.n_sub, spec.sub)
    live = (dd != 0)[..., None]
    q = nearest_int((xs + dm[..., None]) / torch.where(live, dd[..., None], torch.ones_like(xs))).clamp(0, spec.top)
    q = torch.where(live, q, levels.reshape(xs.shape))
    return KQuantCodes(q.reshape(b, QK_K).to(torch.uint8), ls.to(torch.uint8), d, lm.to(torch.uint8), dmin)


def _quantize_q6_k(x: Tensor, spec: KQuantSpec | None = None) -> KQuantCodes:
    """``quantize_row_q6_K_ref`` on super-blocks ``x`` (``(B, 256)``)."""
    b = x.shape[0]
    levels, scales = _make_qx_quants(x.reshape(b * 16, 16), 32)
    levels, scales = levels.reshape(b, 16, 16), scales.reshape(b, 16)
    imax = scales.abs().argmax(dim=1, keepdim=True)
    max_scale = scales.gather(1, imax)[:, 0]
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = _rdiv(-128.0, torch.where(zero, torch.ones_like(max_scale), max_scale))
    d = torch.where(zero, torch.zeros_like(iscale), _rdiv(1.0, iscale)).to(torch.float16)
    sc = nearest_int(iscale[:, None] * scales).clamp(max=127)
    sc = torch.where(zero[:, None], torch.zeros_like(sc), sc)
    dd = d.to(_F32)[:, None] * sc
    xs = x.reshape(b, 16, 16)
    live = (dd != 0)[..., None]
    q = nearest_int(xs / torch.where(live, dd[..., None], torch.ones_like(xs))).clamp(-32, 31) + 32
    q = torch.where(live, q, levels)
    q = torch.where(zero[:, None, None], torch.zeros_like(q), q)  # ggml memsets an all-zero super-block
    return KQuantCodes(q.reshape(b, QK_K).to(torch.uint8), sc.to(torch.int8), d)


def check_kquant_input(x: Tensor, name: str) -> KQuantSpec:
    """The spec of ``name`` after checking ``x`` (finite, last dim a positive multiple of 256).

    Raises:
        ValueError: unknown type, NaN/Inf in ``x``, or a last dim that is not a multiple of 256.
    """
    spec = KQUANT_SPECS.get(name)
    if spec is None:
        raise ValueError(f"no K-quant {name!r}; known: {', '.join(KQUANT_SPECS)}")
    check_finite(x)
    n = x.shape[-1]
    if n == 0 or n % QK_K:
        raise ValueError(f"{name} needs a last dim that is a positive multiple of {QK_K}; got {n}")
    return spec


def ref_blocks(blocks: Tensor, spec: KQuantSpec) -> KQuantCodes:
    """ggml's reference encoder on float32 super-blocks ``(B, 256)``: codes ``(B, 256)``, scales
    (and mins) ``(B, n_sub)``, super-scales ``(B,)``. Computed in chunks of super-blocks (the
    searches hold every candidate's codes)."""
    fn = _quantize_with_min if spec.has_min else _quantize_q6_k
    parts = [fn(chunk, spec) for chunk in blocks.split(_CHUNK)] if blocks.shape[0] else [fn(blocks, spec)]
    if len(parts) == 1:
        return parts[0]
    joined = {k: None if getattr(parts[0], k) is None else torch.cat([getattr(p, k) for p in parts])
              for k in ("codes", "sc", "d", "m", "dmin")}
    return KQuantCodes(**joined)


def dequantize_blocks(q: KQuantCodes, spec: KQuantSpec) -> Tensor:
    """float32 values ``(B, 256)`` of :func:`ref_blocks`-shaped codes, computed as the ``gguf`` package does."""
    codes = q.codes.reshape(-1, spec.n_sub, spec.sub).to(_F32)
    dd = (q.d.to(_F32)[..., None] * q.sc.to(_F32))[..., None]
    if spec.has_min:
        if q.m is None or q.dmin is None:
            raise ValueError(f"{spec.name} codes need their sub-block mins and dmin; got None")
        dm = (q.dmin.to(_F32)[..., None] * q.m.to(_F32))[..., None]
        return (dd * codes - dm).reshape(-1, QK_K)
    return (dd * (codes - 32)).reshape(-1, QK_K)


def flat_codes(q: KQuantCodes) -> KQuantCodes:
    """``q`` with its leading dims merged: the ``(B, ...)`` shapes of :func:`ref_blocks`."""
    n_sub = q.sc.shape[-1]
    return KQuantCodes(q.codes.reshape(-1, QK_K), q.sc.reshape(-1, n_sub), q.d.reshape(-1),
                       None if q.m is None else q.m.reshape(-1, n_sub), None if q.dmin is None else q.dmin.reshape(-1))


def shaped_codes(q: KQuantCodes, lead: tuple[int, ...], n: int) -> KQuantCodes:
    """Inverse of :func:`flat_codes` for values of shape ``lead + (n,)``."""
    nb, n_sub = n // QK_K, q.sc.shape[-1]
    return KQuantCodes(q.codes.reshape(*lead, n), q.sc.reshape(*lead, nb, n_sub), q.d.reshape(*lead, nb),
                       None if q.m is None else q.m.reshape(*lead, nb, n_sub),
                       None if q.dmin is None else q.dmin.reshape(*lead, nb))


def kquant_ref_quantize(x: Tensor, name: str) -> KQuantCodes:
    """ggml's reference encoder's codes and scales of ``x`` (last dim a positive multiple of 256),
    computed in float32 whatever ``x``'s dtype.

    Raises:
        ValueError: unknown type, NaN/Inf in ``x``, or a last dim that is not a multiple of 256.
    """
    spec = check_kquant_input(x, name)
    return shaped_codes(ref_blocks(x.to(_F32).reshape(-1, QK_K), spec), tuple(x.shape[:-1]), x.shape[-1])


def kquant_dequantize(q: KQuantCodes, name: str) -> Tensor:
    """float32 values of a K-quant's codes and scales (shapes as :class:`KQuantCodes` says),
    computed as the ``gguf`` package does: ``(d * sc) * q - dmin * m``, ``(d * sc) * (q - 32)``."""
    spec = KQUANT_SPECS[name]
    return dequantize_blocks(flat_codes(q), spec).reshape(q.codes.shape)
