"""Searches for quantization parameters: INT scales (docs/methods.md §2, §5) and FP biases (§3).

Every search scores a list of candidates and keeps, per channel, the one with the lowest loss.
The default loss is the tensor's own error ``mean |x - x_hat|^p`` reduced per channel, computed
for many candidates at once (chunked to bound memory). A callable ``loss_fn(x_hat)`` replaces
it, e.g. :func:`output_l2_loss` for the L2 error of a layer's output given the candidate
dequantized weight (what the FP paper searches on). If ``loss_fn`` returns one value per
channel, each channel picks its own candidate; if it returns a scalar, one candidate index
is shared by all channels (their scales still differ through their own ranges).

``axis`` names the dims that keep their own parameters: ``None`` per tensor, ``0`` per output
channel of a weight, ``(0, 1)`` per group of a ``to_groups`` view. Results have ``x``'s rank
with size-1 reduced dims, so they broadcast against ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffsqueeze.quant.primitives.formats import (
    FPFormat,
    IntFormat,
    NumberFormat,
    bias_to_scale,
    check_finite,
    formats_for_bits,
    fp_quantize,
    int_code_range,
    int_fake_quantize,
    int_qparams,
    maxval,
)

__all__ = [
    "search_act_params",
    "search_weight_params",
    "Axis",
    "LossFn",
    "keep_shape",
    "channel_minmax",
    "channel_quantile",
    "lp_error",
    "output_l2_loss",
    "int_scale_search",
    "percentile_int_init",
    "initial_fp_bias",
    "fp_bias_search",
    "fp_format_search",
]

Axis = int | Sequence[int] | None
LossFn = Callable[[Tensor], Tensor]
MAX_ELEMENTS = 2**22
"""Elements of ``x`` times candidates evaluated in one vectorised chunk (default loss)."""


def _kept(x: Tensor, axis: Axis) -> list[int]:
    if axis is None:
        return []
    dims = [axis] if isinstance(axis, int) else list(axis)
    return sorted({d % x.dim() for d in dims})


def keep_shape(x: Tensor, axis: Axis) -> list[int]:
    """Shape of per-``axis`` parameters: ``x.shape`` with every other dim set to 1."""
    kept = _kept(x, axis)
    return [n if d in kept else 1 for d, n in enumerate(x.shape)]


def _flatten(x: Tensor, axis: Axis) -> Tensor:
    """``x`` as ``(channels, elements)`` with the kept dims first."""
    kept = _kept(x, axis)
    rest = [d for d in range(x.dim()) if d not in kept]
    n_ch = math.prod(x.shape[d] for d in kept)
    return x.permute(*kept, *rest).reshape(n_ch, -1)


def channel_minmax(x: Tensor, axis: Axis = None) -> tuple[Tensor, Tensor]:
    """Per-``axis`` minimum and maximum, shaped by :func:`keep_shape`."""
    flat = _flatten(x, axis)
    shape = keep_shape(x, axis)
    return flat.amin(1).reshape(shape), flat.amax(1).reshape(shape)


def channel_quantile(x: Tensor, q: float, axis: Axis = None) -> Tensor:
    """Per-``axis`` q-quantile (the ceil(q n)-th smallest value; no size limit, unlike
    ``torch.quantile``), shaped by :func:`keep_shape`."""
    flat = _flatten(x, axis)
    k = min(max(math.ceil(q * flat.shape[1]), 1), flat.shape[1])
    return flat.kthvalue(k, dim=1).values.reshape(keep_shape(x, axis))


def lp_error(x: Tensor, x_hat: Tensor, p: float = 2.0, axis: Axis = None) -> Tensor:
    """``mean |x - x_hat|^p`` over the dims not in ``axis``; leading extra dims of ``x_hat``
    (candidates) are kept. Shape: ``x_hat.shape[:-x.dim()] + keep_shape(x, axis)``."""
    lead = x_hat.dim() - x.dim()
    reduce = [lead + d for d in range(x.dim()) if d not in _kept(x, axis)]
    err = (x_hat - x).abs().pow(p)
    return err.mean(dim=reduce, keepdim=True) if reduce else err


def output_l2_loss(
    forward: Callable[[Tensor], Tensor], reference: Tensor, channel_dim: int | None = None
) -> LossFn:
    """Loss on a layer's output: ``sum (forward(w_hat) - reference)^2`` (docs/methods.md §3).

    Args:
        forward: Maps a candidate dequantized weight to the layer output on calibration
            inputs, e.g. ``lambda w: F.linear(inputs, w, bias)``.
        reference: The full-precision layer output on the same inputs.
        channel_dim: Output dim indexed by the weight's output channel (-1 for Linear, 1 for
            Conv2d): the loss is then per channel, so a per-channel search picks each
            channel's own best. ``None``: one scalar.
    """

    def loss(w_hat: Tensor) -> Tensor:
        err = (forward(w_hat) - reference).pow(2)
        if channel_dim is None:
            return err.sum()
        return err.transpose(0, channel_dim).reshape(err.shape[channel_dim], -1).sum(1)

    return loss


def _loss_row(loss: Tensor, shape: list[int]) -> Tensor:
    """A ``loss_fn`` result as one value per channel (a scalar is shared by all channels)."""
    if loss.numel() == 1:
        return loss.reshape(()).expand(shape)
    if loss.numel() != math.prod(shape):
        raise ValueError(
            f"loss_fn returned {loss.numel()} values; expected 1 or one per channel ({math.prod(shape)})"
        )
    return loss.reshape(shape)


def _select(
    x: Tensor,
    cands: tuple[Tensor, ...],
    fake_quant: Callable[..., Tensor],
    axis: Axis,
    loss_fn: LossFn | None,
    p: float,
) -> tuple[tuple[Tensor, ...], Tensor]:
    """Pick per channel the candidate with the lowest loss.

    ``cands`` are tensors of shape ``(K, *keep_shape)``; ``fake_quant(x, *params)`` must
    broadcast a leading candidate dim. Returns the chosen parameters and their losses.
    """
    shape = keep_shape(x, axis)
    n_cand = cands[0].shape[0]
    if loss_fn is None:
        chunk = max(1, MAX_ELEMENTS // max(x.numel(), 1))
        losses = torch.cat([
            lp_error(x, fake_quant(x, *(c[i : i + chunk] for c in cands)), p, axis)
            for i in range(0, n_cand, chunk)
        ])
    else:
        rows = [_loss_row(loss_fn(fake_quant(x, *(c[i] for c in cands))), shape) for i in range(n_cand)]
        losses = torch.stack(rows)
    best = losses.argmin(dim=0, keepdim=True)  # first minimum on ties
    chosen = tuple(torch.take_along_dim(c, best.expand(1, *c.shape[1:]), dim=0)[0] for c in cands)
    return chosen, torch.take_along_dim(losses, best, dim=0)[0]


def _int_fq(bits: int, symmetric: bool) -> Callable[..., Tensor]:
    def fq(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        return int_fake_quantize(x, scale, zero_point, bits=bits, symmetric=symmetric, check=False)

    return fq


def int_scale_search(
    x: Tensor,
    bits: int,
    symmetric: bool,
    axis: Axis = None,
    *,
    n_candidates: int = 80,
    shrink: float = 0.01,
    p: float = 2.4,
    loss_fn: LossFn | None = None,
    coarse_step: int = 0,
) -> tuple[Tensor, Tensor]:
    """Scale/zero point by range shrinking (docs/methods.md §2).

    Candidates ``(max, min) * (1 - shrink * i)``, ``i = 0..n_candidates-1`` (symmetric: the
    absolute max), each turned into ``(s, z)`` by :func:`int_qparams`; keeps the lowest
    ``mean |x - x_hat|^p`` (p = 2.4) per channel, or the lowest ``loss_fn``.

    ``coarse_step`` (default loss only): 0 scores every candidate; ``k > 1`` scores every k-th,
    then refines each channel's best by halving steps (``±k/2, ±k/4, .., ±1``), about
    ``n/k + 2 log2 k`` passes over ``x`` instead of ``n``. The loss of a channel is nearly
    unimodal in ``i``, so this finds the exhaustive optimum in almost every channel (tested:
    total loss within 1e-4 of the exhaustive search on Gaussian and heavy-tailed weights).

    Returns:
        ``(scale, zero_point)`` shaped by :func:`keep_shape`.

    Raises:
        ValueError: ``bits`` out of 2..8, or ``x`` holds NaN/Inf.
    """
    check_finite(x)
    xmin, xmax = channel_minmax(x.detach(), axis)
    if symmetric:
        xmax = torch.maximum(xmax, -xmin)
        xmin = -xmax
    factors = 1 - shrink * torch.arange(n_candidates, dtype=xmin.dtype, device=x.device)
    factors = factors.reshape(-1, *([1] * x.dim()))
    cands = int_qparams(xmin * factors, xmax * factors, bits, symmetric)
    if loss_fn is not None:
        (scale, zero_point), _ = _select(x.detach(), cands, _int_fq(bits, symmetric), axis, loss_fn, p)
        return scale, zero_point
    shape = keep_shape(x, axis)
    flat_s, flat_z = (c.reshape(n_candidates, -1) for c in cands)
    best = _int_lp_search(_flatten(x.detach(), axis), flat_s, flat_z, bits, symmetric, p, coarse_step)
    ch = torch.arange(flat_s.shape[1], device=x.device)
    return flat_s[best, ch].reshape(shape), flat_z[best, ch].reshape(shape)


BLOCK_ELEMENTS = 2**19
"""Elements of ``x`` per block of channels in :func:`_int_lp_search` (a few MB: stays in cache)."""


def _int_lp_search(flat: Tensor, scales: Tensor, zero_points: Tensor, bits: int, symmetric: bool,
                   p: float, coarse_step: int) -> Tensor:
    """Index of the best candidate per row of ``flat`` (channels, elements) under
    ``mean |x - x_hat|^p``; ``scales``/``zero_points`` are ``(candidates, channels)``.

    Computed as ``s^p mean |x/s - clamp(round(x/s), lo - z, hi - z)|^p`` (equal to the error of
    :func:`int_fake_quantize`, since ``z`` is an integer) block by block of channels in two
    reused buffers: one pass over a cache-sized block per candidate, no allocation per
    candidate. Ties keep the first (lowest) index, as ``argmin`` does.
    """
    lo, hi = int_code_range(bits, symmetric)
    n_cand, n_ch = scales.shape
    length = flat.shape[1]
    rows = max(1, BLOCK_ELEMENTS // max(length, 1))
    dtype = torch.promote_types(flat.dtype, torch.float32)  # float64 stays float64 (references)
    work = torch.empty(min(rows, n_ch), length, dtype=dtype, device=flat.device)
    codes = torch.empty_like(work)
    best = torch.empty(n_ch, dtype=torch.long, device=flat.device)
    s_all, z_all = scales.to(dtype), zero_points.to(dtype)
    for r0 in range(0, n_ch, rows):
        block = flat[r0 : r0 + rows].to(dtype)
        m = block.shape[0]
        u, q = work[:m], codes[:m]
        chans = torch.arange(r0, r0 + m, device=flat.device)

        def loss_at(idx: Tensor) -> Tensor:
            s, z = s_all[idx, chans][:, None], z_all[idx, chans][:, None]
            torch.div(block, s, out=u)
            torch.round(u, out=q)
            q.clamp_(lo - z, hi - z)
            return u.sub_(q).abs_().pow_(p).mean(1) * s[:, 0].pow(p)

        step = coarse_step if coarse_step > 1 else 1
        grid = list(range(0, n_cand, step))
        losses = torch.stack([loss_at(torch.full((m,), i, device=flat.device)) for i in grid])
        pick = losses.argmin(0)
        idx, low = torch.tensor(grid, device=flat.device)[pick], losses.gather(0, pick[None])[0]
        d = step // 2
        while d >= 1:  # refine around each channel's best: a lower loss moves it (a tie: the lower index)
            for off in (-d, d):
                cand = (idx + off).clamp(0, n_cand - 1)
                loss = loss_at(cand)
                better = (loss < low) | ((loss == low) & (cand < idx))
                idx, low = torch.where(better, cand, idx), torch.where(better, loss, low)
            d //= 2
        best[r0 : r0 + m] = idx
    return best


def percentile_int_init(
    x: Tensor,
    bits: int,
    symmetric: bool,
    axis: Axis = None,
    percentiles: Sequence[float] = (0.999, 0.9999, 0.99999),
) -> tuple[Tensor, Tensor]:
    """Activation scale from percentiles, keeping the lowest L2 error (docs/methods.md §5).

    For each percentile q the range is ``[quantile(1 - q), quantile(q)]`` (symmetric:
    ``[-quantile(|x|, q), quantile(|x|, q)]``).

    Returns:
        ``(scale, zero_point)`` shaped by :func:`keep_shape`.
    """
    check_finite(x)
    x = x.detach()
    lo, hi = [], []
    for q in percentiles:
        if symmetric:
            a = channel_quantile(x.abs(), q, axis)
            lo.append(-a)
            hi.append(a)
        else:
            lo.append(channel_quantile(x, 1 - q, axis))
            hi.append(channel_quantile(x, q, axis))
    cands = int_qparams(torch.stack(lo), torch.stack(hi), bits, symmetric)
    (scale, zero_point), _ = _select(x, cands, _int_fq(bits, symmetric), axis, None, 2.0)
    return scale, zero_point


def initial_fp_bias(absmax: Tensor, fmt: FPFormat, eps: float = 1e-8) -> Tensor:
    """Bias whose grid just covers ``absmax``: ``maxval(fmt, beta_0) == absmax`` (docs/methods.md §3).

    For every code finite this is the paper's
    ``beta_0 = 2^E - log2(max|x|) + log2(2 - 2^-M) - 1``; hardware grids use their own maxval.
    ``absmax`` below ``eps`` (all-zero channels) counts as ``eps``.
    """
    return math.log2(maxval(fmt, 0.0)) - torch.log2(absmax.clamp(min=eps))


def _fp_bias_search(
    x: Tensor, fmt: FPFormat, axis: Axis, loss_fn: LossFn | None, n_steps: int, p: float
) -> tuple[Tensor, Tensor]:
    check_finite(x)
    x = x.detach()
    xmin, xmax = channel_minmax(x, axis)
    beta0 = initial_fp_bias(torch.maximum(xmax, -xmin), fmt)
    steps = torch.arange(n_steps + 1, dtype=beta0.dtype, device=x.device) / n_steps
    cands = (beta0 * steps.reshape(-1, *([1] * x.dim())),)

    def fq(t: Tensor, bias: Tensor) -> Tensor:
        return fp_quantize(t, fmt, bias, check=False)

    (bias,), loss = _select(x, cands, fq, axis, loss_fn, p)
    return bias, loss


def fp_bias_search(
    x: Tensor,
    fmt: FPFormat,
    axis: Axis = None,
    *,
    loss_fn: LossFn | None = None,
    n_steps: int = 100,
    p: float = 2.0,
) -> Tensor:
    """Exponent bias search (docs/methods.md §3): candidates ``beta_0 * i / n_steps``, ``i = 0..n_steps``.

    ``beta_0`` from :func:`initial_fp_bias` per channel of ``axis``. Keeps the lowest MSE of
    ``x`` itself by default, or the lowest ``loss_fn`` (the paper: L2 error of the layer
    output, see :func:`output_l2_loss`). Weights: ``axis=0``; activations: ``axis=None``;
    the paper alternates them, each ``loss_fn`` using the other's current quantizer.
    As in the released code the candidates lie between 0 and ``beta_0``: for ``beta_0 > 0``
    every candidate range covers ``max|x|`` (no clipping), for ``beta_0 < 0`` they clip.

    Returns:
        Bias tensor shaped by :func:`keep_shape`.

    Raises:
        ValueError: ``x`` holds NaN/Inf.
    """
    return _fp_bias_search(x, fmt, axis, loss_fn, n_steps, p)[0]


def fp_format_search(
    x: Tensor,
    bits: int,
    axis: Axis = None,
    *,
    hardware: bool = False,
    loss_fn: LossFn | None = None,
    n_steps: int = 100,
) -> tuple[FPFormat, Tensor]:
    """Per-layer FP format choice (docs/methods.md §3): bias-search each format of ``bits`` bits
    (:func:`~diffsqueeze.quant.primitives.formats.formats_for_bits`) and keep the one with the lowest
    total loss; ties go to the first listed format.

    Returns:
        ``(format, bias)``.
    """
    best: tuple[float, FPFormat, Tensor] | None = None
    for fmt in formats_for_bits(bits, hardware):
        bias, loss = _fp_bias_search(x, fmt, axis, loss_fn, n_steps, 2.0)
        total = float(loss.sum())
        if best is None or total < best[0]:
            best = (total, fmt, bias)
    return best[1], best[2]


# ---- per format: which search finds a quantizer's parameters ------------------------------------


def search_weight_params(fmt: NumberFormat, g: Tensor, *, loss_fn: LossFn | None, n_steps: int,
                         coarse_step: int) -> dict[str, Tensor]:
    """The parameters of a weight quantizer in ``fmt`` for grouped weights ``g`` ``(out, n_groups,
    group_size)``, one set per group: the INT range search (docs/methods.md §2) or the FP bias search (§3);
    nothing for formats whose scales come from their blocks.

    Args:
        loss_fn: The layer-output loss of candidate weights; None scores the weight error.
        n_steps: FP bias candidates.
        coarse_step: INT candidates scored first (0: all; see :func:`int_scale_search`).
    """
    if isinstance(fmt, IntFormat):
        scale, zp = int_scale_search(g, fmt.bits, fmt.symmetric, axis=(0, 1), loss_fn=loss_fn, coarse_step=coarse_step)
        return {"scale": scale, "zero_point": zp}
    if isinstance(fmt, FPFormat):
        return {"bias": fp_bias_search(g, fmt, axis=(0, 1), loss_fn=loss_fn, n_steps=n_steps)}
    return {}


def search_act_params(fmt: NumberFormat, rows: Tensor, *, axis: Axis, n_steps: int,
                      percentile: bool) -> tuple[Tensor, Tensor | None]:
    """Scale (and INT zero point) of a static activation quantizer in ``fmt`` over sampled ``rows``:
    the INT range search or percentile range (docs/methods.md §2, §5), or the FP bias search folded into a
    scale on the standard-bias grid (§3).

    Raises:
        ValueError: ``fmt`` has no calibrated activation scales (block formats scale on the fly).
    """
    if isinstance(fmt, IntFormat):
        search = percentile_int_init if percentile else int_scale_search
        return search(rows, fmt.bits, fmt.symmetric, axis=axis)
    if isinstance(fmt, FPFormat):
        return bias_to_scale(fmt, fp_bias_search(rows, fmt, axis=axis, n_steps=n_steps)), None
    raise ValueError(f"{fmt.name} computes its activation scales on the fly: nothing to calibrate")
