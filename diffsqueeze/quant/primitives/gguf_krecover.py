"""Codes and scales of K-quant super-blocks whose values already lie on a K-quant grid.

ggml's K-quant encoders are not idempotent: re-encoding decoded values can choose other scales
(measured on 4M Gaussian weights: 0.06% of the Q4_K, 8.5% of the Q5_K and 0.03% of the Q6_K
super-blocks; the candidate scales do not reach a grid whose codes leave the top code or two
unused). Export stores, and a GGUF writer writes, a weight that is already on the grid, so
:func:`.gguf_kquants.kquant_quantize` encodes with ggml's reference and, for each super-block whose
reference codes do not decode back to it bit for bit but that looks like a grid
(:func:`looks_on_grid`: every sub-block constant or on a lattice of at most the type's levels),
searches for codes that do (:func:`recover`):

- Q4_K/Q5_K, value ``(d * sc) * q - dmin * m``: the reference gives the sub-block of the largest
  scale ``sc = 63`` and the one of the largest min ``m = 63``. Candidates ``d``: the reference's
  on the values, the largest sub-block lattice step over ``63 g`` (``g`` the gcd of that
  sub-block's code gaps), the gcd of all steps over ``h``; candidates ``dmin``: the reference's,
  ``-min / 63`` of the sub-block of the lowest minimum (its minimum at code 0), then
  ``(a * q0 - min) / 63`` for other codes ``q0`` of a sub-block's minimum. Per sub-block under a
  ``(d, dmin)``: ``sc = step / (d t)`` and ``m`` from ``q0``, or any ``sc`` and one code for a
  constant sub-block.
- Q6_K, value ``(d * sc) * (q - 32)`` (exact): candidates ``d``: the reference's, the largest
  lattice step (of the values and 0) over ``+-128 g`` and ``+-127 g``, the gcd of all values over
  ``+-h``; per sub-block ``sc = +-step / (|d| t)``, or ``sc = 0`` for a sub-block of zeros (codes
  chosen for the zeros' signs).

Candidates are tried in order of how often they are the answer (measured: the reference's
``(d, dmin)`` or the lowest minimum's ``dmin`` find ~99%), at most 256 per super-block on an exact
lattice and 16 otherwise (values the subtraction rounded, or float weights that merely look like a
lattice, as very sparse rows do). Every candidate is checked by decoding it, bit for bit, signed
zeros included; a super-block none of them reproduces keeps the reference's codes. Pure tensor
functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffsqueeze.quant.primitives.gguf_kref import QK_K as QK
from diffsqueeze.quant.primitives.gguf_kref import KQuantCodes, KQuantSpec, nearest_int

__all__ = ["looks_on_grid", "recover"]

_F32 = torch.float32
_TOL = 1e-3  # how far from an integer a gap / step may be on a lattice (0 on exact grids)
_EUCLID_STEPS = 40  # enough for integer ratios below 2^24; a float row (no common step) gets NaN


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().view(torch.int32)


def _gcd_last(t: Tensor) -> Tensor:
    """The float gcd of the last dim of ``t`` (non-negative; exact multiples of a common step, as
    on a K-quant grid: ``fmod`` is exact), by Euclid over pairs; 0 for a row of zeros, NaN where
    Euclid does not end within its steps (values with no common step of integer ratio below ~2^24)."""
    while t.shape[-1] > 1:
        if t.shape[-1] % 2:
            t = torch.cat([t, torch.zeros_like(t[..., :1])], dim=-1)
        a, b = t[..., 0::2], t[..., 1::2]
        for _ in range(_EUCLID_STEPS):
            live = b > 0
            if not bool(live.any()):
                break
            rem = torch.fmod(a, torch.where(live, b, torch.ones_like(b)))
            a, b = torch.where(live, b, a), torch.where(live, rem, b)
        t = torch.where(b > 0, torch.full_like(a, float("nan")), a)
    return t[..., 0]


def _lattice(xs: Tensor, with_zero: bool, kmax: int = 32) -> Tensor:
    """Per row of ``xs`` (``(..., n)``): the largest ``step = delta / k`` (``delta`` the smallest
    gap between its sorted distinct values, with ``with_zero`` 0 among them; ``k = 1..kmax``) of
    which every gap is an integer multiple to within ``_TOL``; NaN where there is none or all values
    are equal. On an exact grid (``d * sc * q - dmin * m`` without rounding) the step is exact."""
    pts = torch.cat([xs, torch.zeros_like(xs[..., :1])], dim=-1) if with_zero else xs
    s = pts.sort(dim=-1).values
    gaps = s[..., 1:] - s[..., :-1]
    pos = gaps > 0
    delta = torch.where(pos, gaps, torch.full_like(gaps, float("inf"))).amin(dim=-1)
    step = torch.full_like(delta, float("nan"))
    todo = pos.any(dim=-1)
    for k in range(1, kmax + 1):
        if not bool(todo.any()):
            break
        a = delta / k
        r = gaps / a[..., None]
        fits = todo & (((r - torch.round(r)).abs() <= _TOL) | ~pos).all(dim=-1)
        step = torch.where(fits, a, step)
        todo &= ~fits
    return step


def _subs(x: Tensor, spec: KQuantSpec) -> Tensor:
    return x.reshape(x.shape[0], spec.n_sub, spec.sub)


def looks_on_grid(x: Tensor, spec: KQuantSpec) -> Tensor:
    """Super-blocks ``(B, 256)`` whose every sub-block is constant or on a lattice of at most the
    type's levels: those worth :func:`recover`. A cheap test first: on a grid, no two distinct
    values of a sub-block are closer than its step, at least its range over the levels (float
    weights fail it: 32 random values always have a closer pair)."""
    xs = _subs(x, spec)
    with_zero = not spec.has_min
    pts = torch.cat([xs, torch.zeros_like(xs[..., :1])], dim=-1) if with_zero else xs
    s = pts.sort(dim=-1).values
    gaps = s[..., 1:] - s[..., :-1]
    delta = torch.where(gaps > 0, gaps, torch.full_like(gaps, float("inf"))).amin(dim=-1)
    levels = spec.top if spec.has_min else 63  # (Q6_K: the values and 0 lie within 63 steps)
    const = gaps.amax(dim=-1) == 0
    span = s[..., -1] - s[..., 0]
    out = (const | (delta * levels >= span * (1 - _TOL))).all(dim=-1)
    if bool(out.any()):
        step = _lattice(xs[out], with_zero)
        out[out.clone()] = (const[out] | (span[out] / step <= levels + _TOL)).all(dim=-1)
    return out


def _first(good: Tensor) -> tuple[Tensor, Tensor]:
    """Whether any of the last dim is True, and the index of the first True (0 where none)."""
    return good.any(dim=-1), good.to(torch.uint8).argmax(dim=-1)


def _mins(b: Tensor, mf: Tensor) -> Tensor:
    """``m = B / dmin`` rounded (0 where ``dmin`` is 0), as float, not clamped."""
    live = mf > 0
    return torch.where(live, nearest_int(b / torch.where(live, mf, torch.ones_like(mf))), 0.0)


_TRIES = 6  # (sc, code of the minimum) pairs verified per sub-block and (d, dmin), in order
_T_TRIES = 3  # divisors t of a sub-block's step (step = t * d * sc) tried, largest first


def _solve_with_min(xs: Tensor, step: Tensor, d: Tensor, dmin: Tensor, spec: KQuantSpec):
    """Q4_K/Q5_K sub-blocks ``xs`` (``(R, n_sub, sub)``) under float16 super-scales ``d``, ``dmin``
    (``(R,)``): per sub-block whether codes exist that decode to ``xs`` bit for bit, and ``sc``,
    ``m`` (float, ``(R, n_sub)``) and codes (float, ``xs``' shape)."""
    top, dev = spec.top, xs.device
    df, mf = d.to(_F32)[:, None, None, None], dmin.to(_F32)[:, None, None, None]
    q0 = torch.arange(top + 1, dtype=_F32, device=dev)
    t = torch.arange(1, top + 1, dtype=_F32, device=dev)[:, None]
    lo, hi = xs.amin(dim=-1)[..., None, None], xs.amax(dim=-1)[..., None, None]
    # a sub-block on a lattice of step g * d * sc (g the gcd of its code gaps): sc = step / (d t),
    # and m from a code q0 of its minimum; the pairs that give an integral m in range and codes
    # within the top are verified, at most _TRIES of them: exact m first, then the largest t (the
    # codes spanning most of the range, as the reference's do), then the smallest q0
    raw = torch.nan_to_num(step[..., None, None] / (df * t), nan=0.0)  # (R, n_sub, top, 1)
    sc = nearest_int(raw).clamp(0, 63)
    span = torch.round((hi - lo) / torch.where(sc > 0, df * sc, torch.ones_like(sc)))
    whole = ((raw - sc).abs() <= _TOL) & (sc >= 1) & (span <= top)  # step = t * d * sc, codes within the top
    pick_t = torch.where(whole, top - t, torch.full_like(t, 1e9)).argsort(dim=2)[:, :, :_T_TRIES]  # largest t first
    sc, span, whole = sc.gather(2, pick_t), span.gather(2, pick_t), whole.gather(2, pick_t)  # (R, n_sub, _T_TRIES, 1)
    t_rank = torch.arange(pick_t.shape[2], dtype=_F32, device=dev)[:, None]
    dd = df * sc
    b = dd * q0 - lo
    m = _mins(b, mf)
    fits = (m >= 0) & (m <= 63) & (q0 + span <= top) & whole & (((b - m * mf).abs() <= _TOL * mf) | (mf == 0))
    rank = (b != m * mf).to(_F32) * 1e6 + t_rank * (top + 1) + q0
    rank = torch.where(fits, rank, torch.full_like(rank, 1e9))
    order = rank.flatten(2).argsort(dim=-1)[..., :_TRIES]  # (R, n_sub, _TRIES)
    sc = sc.expand_as(m).flatten(2).gather(-1, order)
    m = m.flatten(2).gather(-1, order)
    fits = fits.flatten(2).gather(-1, order)
    dd, dm = d.to(_F32)[:, None, None] * sc, dmin.to(_F32)[:, None, None] * m
    q = nearest_int((xs[:, :, None, :] + dm[..., None]) / dd[..., None]).clamp(0, top)
    val = dd[..., None] * q - dm[..., None]
    good = (_bits(val) == _bits(xs[:, :, None, :].expand_as(val))).all(dim=-1) & fits
    found, pick = _first(good)
    sc, m = sc.gather(-1, pick[..., None])[..., 0], m.gather(-1, pick[..., None])[..., 0]
    q = q.gather(2, pick[..., None, None].expand(*pick.shape, 1, xs.shape[-1]))[:, :, 0]
    df, mf = d.to(_F32)[:, None], dmin.to(_F32)[:, None, None]
    const = (xs == xs[..., :1]).all(dim=-1)
    if bool(const.any()):  # a constant sub-block: any sc, and one code for all its values
        r, j = const.nonzero(as_tuple=True)
        ddc = df[r][:, :, None] * torch.arange(64, dtype=_F32, device=dev)[:, None]  # (K, 64, 1)
        c = xs[r, j, 0][:, None, None]
        mc = _mins(ddc * q0 - c, mf[r]).clamp(0, 63)  # (K, 64, top + 1)
        valc = ddc * q0 - mf[r] * mc
        found_c, pick_c = _first((_bits(valc) == _bits(c.expand_as(valc))).reshape(r.shape[0], -1))
        found[r, j] = found_c
        sc[r, j] = (pick_c // (top + 1)).to(_F32)
        m[r, j] = mc.reshape(r.shape[0], -1).gather(-1, pick_c[:, None])[:, 0]
        q[r, j] = (pick_c % (top + 1)).to(_F32)[:, None].expand(-1, xs.shape[-1])
    return found, sc, m, q


def _candidates(first: list[Tensor], rest: Tensor, valid: Tensor, last: list[Tensor]) -> tuple[Tensor, Tensor]:
    """float16 candidates ``(R, C)``: the tensors of ``first`` (one per row), then ``rest`` (in its
    order), then those of ``last``; and which are valid (``valid`` for ``rest``; finite, not negative)."""
    lead, tail = (torch.stack([f.to(torch.float16) for f in fs], dim=-1) for fs in (first, last))
    fine = [torch.isfinite(lead) & (lead >= 0), valid, torch.isfinite(tail) & (tail >= 0)]
    return torch.cat([lead, rest.to(torch.float16), tail], dim=-1), torch.cat(fine, dim=-1)


def _d_candidates(p0_d: Tensor, step: Tensor, tops: tuple[float, ...], n_t: int, max_sc: int) -> tuple[Tensor, Tensor]:
    """float16 ``d`` candidates ``(R, C)`` and whether each is plausible: the reference's, then
    the largest sub-block step over ``top * g`` (``top`` in ``tops``: the sub-block of the largest
    scale, its codes' gcd ``g = 1..n_t``), then the gcd of all steps over ``h = 1..n_t``; plausible
    where every sub-block's step is ``d * sc * t`` for integers ``1 <= |sc| <= max_sc``, ``t <= n_t``."""
    known = torch.nan_to_num(step, nan=0.0)
    big, unit = known.amax(dim=-1), _gcd_last(known)
    g = torch.arange(1, n_t + 1, dtype=_F32, device=step.device)
    cands = [p0_d.to(_F32)[:, None]] + [big[:, None] / (top * g) for top in tops]
    cands += [unit[:, None] / g, -unit[:, None] / g] if max_sc > 63 else [unit[:, None] / g]
    ds = torch.cat(cands, dim=-1).to(torch.float16)
    r = known[:, None, :, None] / (ds.to(_F32).abs()[..., None, None] * g)  # (R, C, n_sub, n_t)
    whole = ((r - torch.round(r)).abs() <= _TOL) & (torch.round(r) >= 1) & (torch.round(r) <= max_sc)
    plausible = (whole.any(dim=-1) | (known == 0)[:, None, :]).all(dim=-1) & torch.isfinite(ds) & (ds != 0)
    plausible[:, 0] |= torch.isfinite(ds[:, 0])  # the reference's is always tried
    return ds, plausible


_WINDOWS = (1, 3, 12, 48, 192)  # candidates tried per row in each round (256 at most)
_BATCH = 2048  # (row, candidate) pairs solved at once


def _budget(values: Tensor, limit: float) -> Tensor:
    """Candidates to try per super-block: 256 where its values lie on an exact lattice (the gcd of
    ``values``, ``(R, k)`` non-negative, divides them all with ratios up to ``limit``: so on an
    exact K-quant grid), else 16 (a grid with rounded values, or float weights that merely look
    like a lattice, as sparse rows do, and cannot be reproduced: no need to try them all)."""
    unit = _gcd_last(values)
    exact = (unit > 0) & (values.amax(dim=-1) <= unit * limit)
    return torch.where(exact, 256, 16)


def _first_success(valid: Tensor, budget: Tensor, solve, store) -> Tensor:
    """Try each row's valid candidates (the True columns of ``valid``, ``(R, C)``, in column order)
    in growing rounds until one succeeds: ``solve(rows, cols)`` solves a batch of (row, candidate)
    pairs (``rows`` ascending, ``cols`` ascending per row) and returns which succeeded and what it
    found (tensors over the batch); ``store(rows, cols, found)`` keeps the first success of each
    row; a row tries at most ``budget`` candidates. Returns the rows that found one."""
    ok = torch.zeros(valid.shape[0], dtype=torch.bool, device=valid.device)
    rank = valid.to(torch.int64).cumsum(dim=-1) - 1
    start = 0
    for size in _WINDOWS:
        sel = valid & (rank >= start) & (rank < start + size) & (rank < budget[:, None]) & ~ok[:, None]
        start += size
        rows, cols = sel.nonzero(as_tuple=True)
        for lo in range(0, rows.numel(), _BATCH):
            r, c = rows[lo: lo + _BATCH], cols[lo: lo + _BATCH]
            keep = ~ok[r]
            r, c = r[keep], c[keep]
            if not r.numel():
                continue
            good, found = solve(r, c)
            first = good.clone()
            rg = r[good]
            if rg.numel():  # the first success of each row only (earlier rows of the batch may repeat)
                pos = good.nonzero()[:, 0]
                dup = torch.zeros_like(rg, dtype=torch.bool)
                dup[1:] = rg[1:] == rg[:-1]
                first[pos[dup]] = False
            store(r[first], c[first], tuple(t[first] for t in found))
            ok[r[first]] = True
        if bool(ok.all()) or not bool((valid & (rank >= start) & (rank < budget[:, None]) & ~ok[:, None]).any()):
            break
    return ok


def _recover_with_min(x: Tensor, p0: KQuantCodes, spec: KQuantSpec) -> tuple[Tensor, KQuantCodes]:
    assert p0.dmin is not None and p0.m is not None
    rows_n, dev = x.shape[0], x.device
    xs = _subs(x, spec)
    step = _lattice(xs, with_zero=False)
    lo, hi = xs.amin(dim=-1), xs.amax(dim=-1)
    # d: the reference's; then those of the sub-block of sc = 63 and of the gcd of all steps
    ds, d_ok = _d_candidates(p0.d, step, (63.0,), spec.top, 63)
    # dmin: the reference's; 63 * dmin = -min for the sub-block of the lowest minimum (the reference's
    # m = 63, its minimum at code 0); a * q0 - min for codes q0 >= 1 of a sub-block's minimum (a its
    # step, or half of it where its codes are all even or all odd), smallest q0 then largest first;
    # then 0 and -min / 63
    # of the other sub-blocks (measured: the first two find ~99% of the super-blocks)
    q0 = torch.arange(1, spec.top + 1, dtype=_F32, device=dev)
    a = step[..., None] / torch.tensor([1.0, 2.0], device=dev)  # the sub-block's codes of gcd 1 or 2
    b = a[..., None] * q0 - lo[..., None, None]  # (R, n_sub, 2, top)
    later = (b >= 0) & (q0 + torch.round((hi - lo)[..., None] / a)[..., None] <= spec.top)
    at0 = (-lo / 63.0).sort(dim=-1, descending=True).values
    b = torch.where(later, b, torch.full_like(b, -1.0)).permute(0, 3, 2, 1).reshape(rows_n, spec.top, -1)
    b, order = b.sort(dim=-1, descending=True)  # per code q0 (smallest first), largest first
    later = later.permute(0, 3, 2, 1).reshape(rows_n, spec.top, -1).gather(-1, order)
    ms, m_ok = _candidates([p0.dmin, at0[:, 0]], (b / 63.0).reshape(rows_n, -1), later.reshape(rows_n, -1),
                           [torch.zeros_like(lo[:, 0])] + list(at0[:, 1:].unbind(-1)))
    out = KQuantCodes(p0.codes.clone(), p0.sc.clone(), p0.d.clone(), p0.m.clone(), p0.dmin.clone())
    n_d = ds.shape[1]

    def solve(r: Tensor, c: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:  # column j * n_d + i: (dmin j, d i)
        dc, mc = ds[r, c % n_d], ms[r, c // n_d]
        found, s, mm, q = _solve_with_min(xs[r], step[r], dc, mc, spec)
        return found.all(dim=-1), (s, mm, q, dc, mc)

    def store(r: Tensor, c: Tensor, found: tuple[Tensor, ...]) -> None:
        s, mm, q, dc, mc = found
        assert out.m is not None and out.dmin is not None
        out.codes[r], out.sc[r], out.m[r] = q.reshape(-1, QK).to(torch.uint8), s.to(torch.uint8), mm.to(torch.uint8)
        out.d[r], out.dmin[r] = dc, mc

    srt = xs.sort(dim=-1).values
    budget = _budget((srt[..., 1:] - srt[..., :-1]).reshape(rows_n, -1), 63.0 * spec.top)
    ok = _first_success((m_ok[:, :, None] & d_ok[:, None, :]).reshape(rows_n, -1), budget, solve, store)
    return ok, out


def _solve_q6(xs: Tensor, step: Tensor, d: Tensor):
    """Q6_K sub-blocks ``xs`` (``(R, 16, 16)``) under float16 ``d`` (``(R,)``): whether codes exist,
    ``sc`` and codes (float)."""
    df = d.to(_F32)[:, None, None]
    t = torch.arange(1, 33, dtype=_F32, device=xs.device)
    raw = torch.nan_to_num(step[..., None] / (df.abs() * t), nan=0.0)  # step = t * |d * sc|
    base = nearest_int(raw)
    whole = ((raw - base).abs() <= _TOL) & (base >= 1) & (base <= 128)
    pick = torch.where(whole, t, torch.full_like(t, 1e9)).argsort(dim=-1)[..., :_T_TRIES]  # smallest t first
    base = torch.where(whole.gather(-1, pick), base.gather(-1, pick), torch.zeros_like(pick, dtype=_F32))
    scs = torch.cat([base, -base, torch.zeros_like(base[..., :1])], dim=-1).clamp(-128, 127)
    dd = df * scs  # (R, 16, 2 * _T_TRIES + 1)
    q = nearest_int(xs[:, :, None, :] / dd[..., None]).clamp(-32, 31) + 32
    same_sign = torch.signbit(xs)[:, :, None, :] == torch.signbit(dd)[..., None]
    q = torch.where((dd == 0)[..., None], torch.where(same_sign, 32.0, 0.0), q)  # (+-0) * (q - 32): the sign
    val = dd[..., None] * (q - 32)
    found, pick = _first((_bits(val) == _bits(xs[:, :, None, :].expand_as(val))).all(dim=-1))
    sc = scs.gather(-1, pick[..., None])[..., 0]
    q = q.gather(2, pick[..., None, None].expand(*pick.shape, 1, xs.shape[-1]))[:, :, 0]
    return found, sc, q


def _recover_q6(x: Tensor, p0: KQuantCodes, spec: KQuantSpec) -> tuple[Tensor, KQuantCodes]:
    xs = _subs(x, spec)
    step = _lattice(xs, with_zero=True)
    # d: the reference's; then step / (+-128 g), step / (+-127 g) for the sub-block of the largest
    # |sc| (codes of gcd g), and the gcd of all values over +-h
    cands, plausible = _d_candidates(p0.d, step, (-128.0, 128.0, 127.0, -127.0), 32, 128)
    out = KQuantCodes(p0.codes.clone(), p0.sc.clone(), p0.d.clone())

    def solve(r: Tensor, c: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        dc = cands[r, c]
        found, s, q = _solve_q6(xs[r], step[r], dc)
        return found.all(dim=-1), (s, q, dc)

    def store(r: Tensor, c: Tensor, found: tuple[Tensor, ...]) -> None:
        s, q, dc = found
        out.codes[r], out.sc[r], out.d[r] = q.reshape(-1, QK).to(torch.uint8), s.to(torch.int8), dc

    ok = _first_success(plausible, _budget(x.abs(), 128.0 * 32), solve, store)
    return ok, out


def recover(x: Tensor, p0: KQuantCodes, spec: KQuantSpec) -> tuple[Tensor, KQuantCodes]:
    """Codes of super-blocks ``x`` (``(R, 256)`` float32) that decode to ``x`` bit for bit where the
    candidates (module docstring) find them: ``(found (R,), codes)``; ``p0`` (the reference
    encoder's codes of ``x``) is kept where none is found."""
    return _recover_with_min(x, p0, spec) if spec.has_min else _recover_q6(x, p0, spec)
