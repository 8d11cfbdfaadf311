"""GGUF's K-quants Q4_K, Q5_K and Q6_K as weight number formats (docs/quantization.md, "GGUF types").

Super-blocks of 256 values along a row, encoded as ggml's reference quantizer does
(:mod:`.gguf_kref`: ``quantize_row_q4_K_ref``, ``quantize_row_q5_K_ref``, ``quantize_row_q6_K_ref``)
and decoded as the ``gguf`` package and diffusers' GGUF loader do:

====  ====================================================================  =============
type  super-block                                                           bits / weight
====  ====================================================================  =============
Q4_K  8 x 32: 4-bit codes, 6-bit ``sc`` and ``m``; f16 ``d``, ``dmin``        4.5
Q5_K  8 x 32: 5-bit codes, 6-bit ``sc`` and ``m``; f16 ``d``, ``dmin``        5.5
Q6_K  16 x 16: 6-bit codes, int8 ``sc``; f16 ``d``                           6.5625
====  ====================================================================  =============

Q4_K/Q5_K decode ``(d * sc) * q - dmin * m``, Q6_K ``(d * sc) * (q - 32)``.

:func:`kquant_quantize` is ggml's reference, except on a super-block that already lies exactly on
a K-quant grid and that the reference would move (ggml's encoders are not idempotent): there it
finds codes that decode to the same values (:mod:`.gguf_krecover`). So round-to-nearest is a fixed
point, a weight written back on the grid (QuEST, a kept round-to-nearest) quantizes to itself, and
export and the GGUF writer re-encode an exported weight to exactly its values. A float weight
(not on a grid) gets ggml's reference codes.

Storage (:class:`KQuantFormat`): ``qweight`` the codes packed at ``bits`` bits, ``wscale`` the
sub-block scales (6-bit packed; Q6_K: the int8 bytes), ``wzero`` the 6-bit mins (Q4_K/Q5_K) and
``wscale_t`` the float16 super-scales (``d, dmin`` pairs; Q6_K ``d``): 144, 176 and 210 bytes per
256 weights, as in a GGUF file. Rows are zero-padded to whole super-blocks (the padding is stored
and cut off on decode; a padded row cannot be written as a GGUF tensor). The padding's zeros are
quantized like the row's values (ggml's search sees them), but the codes of an on-grid row need
reproduce only its values: encode knows the row's length, and round-to-nearest treats a row's
trailing zeros as possible padding. A super-block where the search for such codes fails (measured:
about 1 in 10,000 on very sparse or heavy-tailed weights, none on dense ones) keeps the reference's
codes; export then refuses to pack the layer and says so.

Learned rounding (:meth:`KQuantFormat.rounding_floor_step`): the reference search fixes each
super-block's ``d``, ``dmin``, sub-block scales and mins on the float weight; AdaRound then moves
each code to the neighbour on the other side of the weight (clamped to the code range), on exactly
that grid, decoded with the decoder's float32 operations (``(d * sc) * q - dmin * m``). The learned
weight is not what the reference would choose for its values (the search is a least-squares fit,
so moving codes moves its optimum), but it lies on a K-quant grid, and encoding it recovers codes
that decode to it (:mod:`.gguf_krecover`; measured in tests/quant/test_gguf_kquants.py). At
initialisation the hard rounding is the reference's codes (but for exact ties, which ggml rounds
half to even). A zero weight (pruned) keeps the reference's code (zero is on a Q6_K grid, not in
general on a Q4_K/Q5_K one). Pure tensor functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffsqueeze.quant.primitives.gguf_krecover import looks_on_grid, recover
from diffsqueeze.quant.primitives.gguf_kref import (
    KQUANT_SPECS,
    QK_K,
    KQuantCodes,
    KQuantSpec,
    check_kquant_input,
    dequantize_blocks,
    flat_codes,
    kquant_dequantize,
    ref_blocks,
    shaped_codes,
)
from diffsqueeze.quant.primitives.int_format import IntFormat
from diffsqueeze.quant.primitives.number_format import BlockScaledFormat, NumberFormat, RoundingGrid
from diffsqueeze.quant.primitives.pack import pack_codes, packed_nbytes, unpack_codes

__all__ = ["QK_K", "KQuantFormat", "KQuantCodes", "Q4_K", "Q5_K", "Q6_K", "GGUF_KQUANT_FORMATS", "kquant_quantize",
           "kquant_dequantize"]


def _take(q: KQuantCodes, rows: Tensor) -> KQuantCodes:
    return KQuantCodes(q.codes[rows], q.sc[rows], q.d[rows], None if q.m is None else q.m[rows],
                       None if q.dmin is None else q.dmin[rows])


def _put(q: KQuantCodes, rows: Tensor, new: KQuantCodes) -> None:
    q.codes[rows], q.sc[rows], q.d[rows] = new.codes, new.sc, new.d
    if q.m is not None and q.dmin is not None and new.m is not None and new.dmin is not None:
        q.m[rows], q.dmin[rows] = new.m, new.dmin


def _filled(blocks: Tensor, care: Tensor, spec: KQuantSpec, zero: float | None) -> Tensor:
    """``blocks`` with each position not cared for replaced by its sub-block's first cared zero if it
    has one (so zeros there, padding or not, stay zeros of the same sign), else by ``zero`` (``0.0``
    or ``-0.0``), or with ``zero`` None by its first cared value. Any codes that decode to this
    decode to ``blocks`` where it is cared for."""
    xs, cs = blocks.reshape(-1, spec.n_sub, spec.sub), care.reshape(-1, spec.n_sub, spec.sub)
    zeros = cs & (xs == 0)
    first_zero = xs.gather(-1, zeros.to(torch.uint8).argmax(dim=-1, keepdim=True))
    first = xs.gather(-1, cs.to(torch.uint8).argmax(dim=-1, keepdim=True))
    other = first if zero is None else torch.full_like(first, zero)
    fill = torch.where(zeros.any(dim=-1, keepdim=True), first_zero,
                       torch.where(cs.any(dim=-1, keepdim=True), other, torch.zeros_like(other)))
    return torch.where(cs, xs, fill).reshape(blocks.shape)


def _fix(q: KQuantCodes, blocks: Tensor, rows: Tensor, spec: KQuantSpec) -> Tensor:
    """Replace the codes of super-blocks ``rows`` by codes that decode to ``blocks`` where found;
    returns the rows fixed."""
    rows = rows[looks_on_grid(blocks[rows], spec)] if rows.numel() else rows
    if not rows.numel():
        return rows
    found, fixed = recover(blocks[rows], _take(q, rows), spec)
    _put(q, rows[found], _take(fixed, found))
    return rows[found]


def kquant_quantize(x: Tensor, name: str, valid: int | Tensor | None = None) -> KQuantCodes:
    """Codes and scales of ``x`` (last dim a positive multiple of 256; computed in float32): ggml's
    reference, or for a super-block already on a K-quant grid, codes that decode to it (module
    docstring).

    Args:
        x: Values, ``(..., n)``.
        name: ``q4_k``, ``q5_k`` or ``q6_k``.
        valid: Values of each row that count (an int, or one per row of ``x.shape[:-1]``): a row
            zero-padded to whole super-blocks has on-grid values followed by zeros that no grid
            value needs to match, and its codes need only reproduce the first ``valid`` values.
            None: all of them.

    Raises:
        ValueError: unknown type, NaN/Inf in ``x``, or a last dim that is not a multiple of 256.
    """
    spec = check_kquant_input(x, name)
    n = x.shape[-1]
    flat = x.to(torch.float32).reshape(-1, n).contiguous()
    blocks = flat.reshape(-1, QK_K)
    q = ref_blocks(blocks, spec)
    off = dequantize_blocks(q, spec).view(torch.int32) != blocks.view(torch.int32)
    care = None
    if valid is not None:
        lengths = torch.as_tensor(valid, device=x.device).reshape(-1).expand(flat.shape[0])
        care = (torch.arange(n, device=x.device) < lengths[:, None]).reshape(-1, QK_K)
        off &= care
    moved = off.any(dim=-1)
    rows = moved.nonzero()[:, 0]
    if rows.numel():
        fixed = _fix(q, blocks, rows, spec)  # every value on the grid (zeros included) first
        if care is not None:  # the padding as zeros (of either sign: Q6_K's follow d * sc), else as values
            rest = moved.clone()
            rest[fixed] = False
            rest &= ~care.all(dim=-1)
            for zero in (0.0, -0.0, None):
                if not bool(rest.any()):
                    break
                rest[_fix(q, _filled(blocks, care, spec, zero), rest.nonzero()[:, 0], spec)] = False
    return shaped_codes(q, tuple(x.shape[:-1]), n)


def trailing_zeros_cut(x: Tensor) -> Tensor:
    """Per row of ``x`` (``(R, n)``): the index after its last nonzero value (0 for a row of zeros),
    where a row zero-padded to whole super-blocks may end."""
    nz = x != 0
    idx = torch.arange(1, x.shape[-1] + 1, device=x.device)
    return torch.where(nz, idx, torch.zeros_like(idx)).amax(dim=-1)


@dataclass(frozen=True)
class KQuantFormat(BlockScaledFormat):
    """A GGUF K-quant (module docstring).

    Attributes:
        name: ``q4_k``, ``q5_k`` or ``q6_k``.
        bits: Bits of one code (4, 5, 6).
    """

    name: str
    bits: int

    @property
    def spec(self) -> KQuantSpec:
        return KQUANT_SPECS[self.name]

    @property
    def block(self) -> int:
        return QK_K

    @property
    def element(self) -> NumberFormat:
        # the grid a proxy (smoothing) quantizes elements on: codes above a minimum, or around zero (Q6_K)
        return IntFormat(self.bits, symmetric=not self.spec.has_min)

    @property
    def eight_bit(self) -> str:
        return "q8_0"  # the 8-bit type of the family (first/last-layer activations)

    @property
    def learnable_rounding(self) -> bool:
        return True

    def rounding_floor_step(self, g: Tensor, params: dict[str, Tensor]) -> RoundingGrid:
        """The grid of ggml's reference scales (and mins) of ``g``'s rows (padding included, as
        round-to-nearest sees it), per element, on the code axis: Q4_K/Q5_K ``u = (x + dm) / dd``
        and value ``clamp(code, 0, top) * dd - dm``; Q6_K ``u = x / dd`` and value
        ``clamp(code, -32, 31) * dd`` (codes less 32). A dead sub-block (``dd`` 0) decodes to one
        value whatever its codes: its elements are pinned (Q6_K: at the reference's code, on the
        side of zero that keeps the sign of its decoded zero), ``w`` 1 so that its fraction is not 0/0."""
        spec = self.spec
        rows = g.reshape(g.shape[0], -1).to(torch.float32)
        blocks = rows.reshape(-1, QK_K)
        q = ref_blocks(blocks, spec)
        xs = blocks.reshape(-1, spec.n_sub, spec.sub)
        ref = q.codes.reshape(xs.shape).to(torch.float32)
        dd = (q.d.to(torch.float32)[:, None] * q.sc.to(torch.float32))[..., None].expand_as(xs)
        live = dd != 0
        if spec.has_min:
            assert q.m is not None and q.dmin is not None
            offset = (q.dmin.to(torch.float32)[:, None] * q.m.to(torch.float32))[..., None].expand_as(xs)
            u = (xs + offset) / torch.where(live, dd, torch.ones_like(dd))
            floor = torch.where(xs == 0, ref, torch.floor(u))  # a pruned weight keeps the reference's code
            floor = torch.where(live, floor, torch.full_like(u, -1.0))  # clamps to code 0: value -dm
            step = torch.where(live, dd, torch.ones_like(dd))
        else:
            offset = None
            u = xs / torch.where(live, dd, torch.ones_like(dd))
            c0 = ref - 32
            floor = torch.where(live, torch.floor(u), torch.where(c0 >= 0, c0, c0 - 1))
            step = dd
        w = torch.where(live, u * dd, torch.ones_like(u))
        parts = [floor, step, w] + ([] if offset is None else [offset])
        return RoundingGrid(*(t.reshape(g.shape) for t in parts))

    def rounding_value(self, grid: RoundingGrid, h: Tensor, params: dict[str, Tensor]) -> Tensor:
        """The decoder's value of ``clamp(floor + h)``, in its float32 operations (module docstring)."""
        if grid.offset is not None:
            return torch.clamp(grid.floor + h, 0, self.spec.top) * grid.step - grid.offset
        return torch.clamp(grid.floor + h, -32, 31) * grid.step

    def fake_quantize_blocks(self, x: Tensor) -> Tensor:
        """ggml's reference codes decoded; a row already on the grid, but for zeros at its end (the
        padding of a row not a multiple of 256, which may also hide on-grid zeros), decodes to itself
        before them."""
        rows = x.reshape(-1, x.shape[-1])
        q = kquant_quantize(rows, self.name, trailing_zeros_cut(rows))
        return kquant_dequantize(q, self.name).reshape(x.shape).to(x.dtype)

    # ---- storage ------------------------------------------------------------------------------

    def _sizes(self, n: int) -> dict[str, tuple[torch.dtype, int]]:
        """Buffer name -> (dtype, numel) for ``n`` (padded) weights."""
        nb, spec = n // QK_K, self.spec
        sizes = {"qweight": (torch.uint8, packed_nbytes(n, self.bits))}
        if spec.has_min:
            sizes["wscale"] = (torch.uint8, packed_nbytes(nb * spec.n_sub, 6))
            sizes["wzero"] = (torch.uint8, packed_nbytes(nb * spec.n_sub, 6))
            sizes["wscale_t"] = (torch.float16, 2 * nb)
        else:
            sizes["wscale"] = (torch.uint8, nb * spec.n_sub)
            sizes["wscale_t"] = (torch.float16, nb)
        return sizes

    def encode(self, g: Tensor, params: dict[str, Tensor], scale_dtype: str,
               shape: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        rows = g.reshape(g.shape[0], -1)
        q = flat_codes(kquant_quantize(rows, self.name, math.prod(shape[1:])))  # the padding need not match
        spec = {"storage": self.name, "padded_row": rows.shape[1], "group_size": QK_K,
                "n_groups": rows.shape[1] // QK_K}
        tensors = {"qweight": pack_codes(q.codes, self.bits)}
        if q.m is not None and q.dmin is not None:
            tensors["wscale"], tensors["wzero"] = pack_codes(q.sc, 6), pack_codes(q.m, 6)
            tensors["wscale_t"] = torch.stack([q.d, q.dmin], dim=-1).reshape(-1)
        else:
            tensors["wscale"] = q.sc.contiguous().view(torch.uint8).reshape(-1)
            tensors["wscale_t"] = q.d.reshape(-1).contiguous()
        return spec, tensors

    def empty_buffers(self, part: dict[str, Any], out: int, device: Any) -> dict[str, Tensor]:
        return {k: torch.empty(size, dtype=dt, device=device)
                for k, (dt, size) in self._sizes(out * part["padded_row"]).items()}

    def stored_codes(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> KQuantCodes:
        """The codes and scales a part stores, shaped per row of ``padded_row`` values as
        :func:`kquant_quantize` gives them: what :func:`.gguf_bytes.gguf_kquant_blocks` lays out as
        the GGUF rows of the part (padding included)."""
        out, row = part["shape"][0], part["padded_row"]
        n = out * row
        nb, n_sub = n // QK_K, self.spec.n_sub
        codes = unpack_codes(tensors["qweight"], n, self.bits).reshape(nb, QK_K)
        st = tensors["wscale_t"]
        if self.spec.has_min:
            sc = unpack_codes(tensors["wscale"], nb * n_sub, 6).reshape(nb, n_sub)
            m = unpack_codes(tensors["wzero"], nb * n_sub, 6).reshape(nb, n_sub)
            q = KQuantCodes(codes, sc, st[0::2], m, st[1::2])
        else:
            q = KQuantCodes(codes, tensors["wscale"].view(torch.int8).reshape(nb, n_sub), st)
        return shaped_codes(q, (out,), row)

    def decode(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> Tensor:
        shape = tuple(part["shape"])
        q = flat_codes(self.stored_codes(tensors, part))
        w = dequantize_blocks(q, self.spec).reshape(shape[0], part["padded_row"])
        return w[:, : part["numel"] // shape[0]].reshape(shape)

    def check_part(self, part: dict[str, Any]) -> str | None:
        row = part.get("padded_row")
        if part.get("storage") != self.name or part.get("bits") != self.bits or not isinstance(row, int) or row % QK_K:
            return (f"{self.name} storage needs bits {self.bits} and a padded_row that is a multiple of {QK_K}; got "
                    f"storage {part.get('storage')!r}, bits {part.get('bits')!r}, padded_row {row!r}")
        return None

    def check_stored(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> str | None:
        want = self._sizes(part["shape"][0] * part["padded_row"])
        got = {k: tensors.get(k) for k in want}
        if any(t is None or t.dtype != dt or t.numel() != size for (dt, size), t in zip(want.values(), got.values())):
            have = ", ".join(f"{k} {'missing' if t is None else f'{t.numel()} {t.dtype}'}" for k, t in got.items())
            need = ", ".join(f"{k} {size} {dt}" for k, (dt, size) in want.items())
            return f"{self.name} tensors are {have}; the map's shape {part['shape']} needs {need}"
        return None


Q4_K = KQuantFormat("q4_k", 4)
Q5_K = KQuantFormat("q5_k", 5)
Q6_K = KQuantFormat("q6_k", 6)
GGUF_KQUANT_FORMATS: dict[str, KQuantFormat] = {f.name: f for f in (Q4_K, Q5_K, Q6_K)}
