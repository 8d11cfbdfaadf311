"""The number-format protocol: what every format (INT, FP ExMy, hardware FP8, block-scaled, ...)
answers, so that quantizers, stages, export, reload and kernels ask the format object and never
branch on its class (docs/architecture.md, "A number format").

A format quantizes a weight viewed as ``g = (out, n_groups, group_size)`` (a row of the weight
split into groups; :meth:`NumberFormat.layout` says how a row is grouped and padded) with the
parameters its weight quantizer holds (:meth:`NumberFormat.weight_params`: e.g. an INT scale and
zero point, an FP exponent bias, nothing for formats that scale their own blocks). It stores
``g`` as codes and scales (:meth:`NumberFormat.encode`), decodes them back bit-exactly
(:meth:`NumberFormat.decode`), and checks a saved part spec and its tensors before a model is
built from them. Activations use the per-element grid :attr:`NumberFormat.element` with scales
calibrated per tensor/channel (:meth:`NumberFormat.scaled_fake_quantize`) or computed per token
group on the fly (:meth:`NumberFormat.dynamic_fake_quantize`).

Every method is a pure tensor function of its arguments; a format object holds no tensors.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from diffsqueeze.quant.primitives.dynamic_groups import dynamic_group_fake_quantize

__all__ = ["NumberFormat", "BlockScaledFormat", "FLOAT_DTYPES", "RoundingGrid"]

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
"""Dtypes a stored scale may have (a part spec's ``scale_dtype``)."""


class RoundingGrid(NamedTuple):
    """Where learned rounding (AdaRound) works, per element of a grouped weight: the grid value of
    code ``c`` is ``c * step - offset``, ``c = clamp(floor + h, ...)`` with ``h`` in [0, 1] learned.

    Attributes:
        floor: the code below the weight (or a code that pins an element, per format).
        step: the grid's step at the element.
        w: the weight on the code axis times ``step``: ``w / step - floor`` is the fraction that
            initialises ``h`` (round-to-nearest at initialisation).
        offset: subtracted after the product (a GGUF K-quant's ``dmin * m``); None: no offset.
    """

    floor: Tensor
    step: Tensor
    w: Tensor
    offset: Tensor | None = None


class NumberFormat:
    """Base of every number format (subclasses are frozen dataclasses).

    Attributes every format has:
        name: canonical name, accepted by :func:`diffsqueeze.quant.primitives.formats.parse_format`.
        bits: bits of one element code.
        kind: the family, written into saved part specs and shown to users (``int``, ``fp``, ``block``).
        element: the grid of one element (the format itself, except block-scaled formats).
        block: elements that share a scale computed from themselves (0: scales are the quantizer's
            searched or learned parameters).
        learnable_rounding: whether AdaRound-style rounding variables apply (a grid with a step).
        eight_bit: the 8-bit format of the same family (first/last-layer activations), or None:
            search among the 8-bit FP formats.
        torch_dtype: a torch dtype that holds the codes directly (hardware FP8), else None.
    """

    # name, bits, kind, element and block are fields or properties of each subclass (a dataclass
    # field may not override a property of its base); the rest have defaults here.

    @property
    def learnable_rounding(self) -> bool:
        return True

    @property
    def eight_bit(self) -> str | None:
        return None

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None

    # ---- weights --------------------------------------------------------------------------

    def layout(self, row: int, group_size: int) -> tuple[int, int]:
        """``(group_size, padded_row)`` of a weight row of ``row`` inputs; ``group_size`` 0 is one
        group per row. Raises ``ValueError`` where the group does not divide the row."""
        gs = group_size or row
        if row % gs:
            raise ValueError(f"group_size {group_size} does not divide the weight row length {row}")
        return gs, row

    def weight_params(self, shape: tuple[int, ...]) -> dict[str, Tensor]:
        """The parameters a weight quantizer holds for groups of ``shape = (out, n_groups, 1)``, at
        their neutral values (buffer name -> tensor). None for formats that scale their blocks."""
        return {}

    def fake_quantize(self, g: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Round-to-nearest of grouped weights ``g`` onto the grid: the values :meth:`encode` stores."""
        raise NotImplementedError

    def rounding_floor_step(self, g: Tensor, params: dict[str, Tensor]) -> RoundingGrid:
        """The grid learned rounding works on (floor, step, W clamped to the grid's range, offset)."""
        raise ValueError(f"{self.name} has no learned rounding")

    def rounding_value(self, grid: RoundingGrid, h: Tensor, params: dict[str, Tensor]) -> Tensor:
        """``(grid.floor + h) * grid.step`` clamped to the grid (less ``grid.offset``), ``h`` in [0, 1]
        the learned rounding."""
        raise ValueError(f"{self.name} has no learned rounding")

    # ---- activations ----------------------------------------------------------------------

    def act_params(self, shape: tuple[int, ...]) -> dict[str, Tensor]:
        """Buffers an activation quantizer holds besides its scale (an INT zero point)."""
        return {}

    def scaled_fake_quantize(self, x: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
        """``x`` quantized with ``scale`` (and zero point) on the standard grid, in ``x``'s dtype."""
        raise NotImplementedError

    def lsq_fake_quantize(self, x: Tensor, scale: Tensor, zero_point: Tensor | None, n_per_scale: int) -> Tensor:
        """As :meth:`scaled_fake_quantize`, with LSQ's gradients for ``scale`` (straight-through rounding,
        the scale's gradient scaled by ``1 / sqrt(n_per_scale * top code)``)."""
        raise NotImplementedError

    def group_scales(self, g: Tensor) -> tuple[Tensor, Tensor | None]:
        """Scale (and zero point) of each group of ``g`` (last dim) from its own values."""
        raise NotImplementedError

    def dynamic_fake_quantize(self, x: Tensor, group_size: int, dim: int) -> Tensor:
        """``x`` quantized with scales computed on the fly per group of ``group_size`` along ``dim``."""
        return dynamic_group_fake_quantize(x, self, group_size, dim)

    def minmax_fake_quantize(self, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """``x`` quantized on the range ``[lo, hi]`` (min-max for INT, absmax for FP)."""
        raise NotImplementedError

    # ---- storage --------------------------------------------------------------------------

    def encode(self, g: Tensor, params: dict[str, Tensor], scale_dtype: str,
               shape: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Codes and scales of grouped on-grid weights ``g`` of a weight part of ``shape``: ``(spec fields, tensors)``. The spec
        fields join the part spec saved in ``diffsqueeze.json`` (``storage``, ``n_groups``, ...);
        tensor names get the part index appended (``qweight0``)."""
        raise NotImplementedError

    def empty_buffers(self, part: dict[str, Any], out: int, device: Any) -> dict[str, Tensor]:
        """Empty tensors shaped as :meth:`encode` wrote them for ``part`` (filled on load)."""
        raise NotImplementedError

    def decode(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> Tensor:
        """The float32 weight part of shape ``part["shape"]``, bit-identical to :meth:`fake_quantize`."""
        raise NotImplementedError

    def check_part(self, part: dict[str, Any]) -> str | None:
        """Why a saved part spec cannot be this format's (``None``: it can)."""
        return None

    def check_stored(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> str | None:
        """Why loaded tensors do not fit the part spec (``None``: they do)."""
        return None


class BlockScaledFormat(NumberFormat):
    """Base of formats whose scale for each block of ``block`` consecutive elements comes from the
    block itself (NVFP4, MXFP4, MXFP8, GGUF Q8_0 and the legacy GGUF types): nothing to search
    (the block's own scale; round-to-nearest unless a subclass offers learned rounding with that
    scale fixed, as GGUF Q4_0/Q5_0 do), a weight row is one group zero-padded to whole blocks (the padding is stored and cut off on
    decode), activations are quantized on the fly in the same blocks, and static activation
    scales (a proxy, or a recipe's first/last layers) use the element grid. A subclass gives
    :meth:`fake_quantize_blocks` and its storage methods."""

    @property
    def kind(self) -> str:
        return "block"

    @property
    def learnable_rounding(self) -> bool:
        return False

    def fake_quantize_blocks(self, x: Tensor) -> Tensor:
        """``x`` (last dim a positive multiple of ``block``) quantized and dequantized, in ``x``'s dtype."""
        raise NotImplementedError

    def layout(self, row: int, group_size: int) -> tuple[int, int]:
        padded = -(-row // self.block) * self.block
        return padded, padded

    def fake_quantize(self, g: Tensor, params: dict[str, Tensor]) -> Tensor:
        return self.fake_quantize_blocks(g.reshape(g.shape[0], -1)).reshape(g.shape)

    def act_params(self, shape: tuple[int, ...]) -> dict[str, Tensor]:
        return self.element.act_params(shape)

    def scaled_fake_quantize(self, x: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
        return self.element.scaled_fake_quantize(x, scale, zero_point)

    def lsq_fake_quantize(self, x: Tensor, scale: Tensor, zero_point: Tensor | None, n_per_scale: int) -> Tensor:
        return self.element.lsq_fake_quantize(x, scale, zero_point, n_per_scale)

    def minmax_fake_quantize(self, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        return self.element.minmax_fake_quantize(x, lo, hi)

    def dynamic_fake_quantize(self, x: Tensor, group_size: int, dim: int) -> Tensor:
        """In the format's own blocks and scale encoding, whatever ``group_size`` says."""
        xt = x.movedim(dim, -1)
        n, pad = xt.shape[-1], (-xt.shape[-1]) % self.block
        xq = self.fake_quantize_blocks(F.pad(xt, (0, pad)) if pad else xt)
        return xq[..., :n].movedim(-1, dim)
