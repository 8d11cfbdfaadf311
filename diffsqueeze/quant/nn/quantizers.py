"""Weight and activation quantizer modules; all their state is parameters and buffers.

* :class:`WeightQuantizer`: INT (scale, zero point) or FP ExMy (real exponent bias) per
  output channel or per group (docs/methods.md §2, §3), round-to-nearest, or learned rounding with
  AdaRound rounding variables on the INT grid or on the FP grid's element-wise step (§4).
* :class:`ActQuantizer`: INT or FP, per tensor or per channel, one scale set per
  calibration-timestep group (§5, QuEST), scales learnable with LSQ; or dynamic: one scale per
  token and group of input channels computed on the fly (INT/FP groups, or the block-scaled
  NVFP4/MXFP4/MXFP8 formats, §10), with nothing calibrated.

Calibrate / learn / convert are explicit calls (``set_params``, ``init_rounding``,
``finalize_rounding``); nothing initializes itself on a first forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffsqueeze.pipelines.distributed import step_share
from diffsqueeze.quant.primitives.formats import NumberFormat, parse_format, to_groups
from diffsqueeze.quant.primitives.number_format import RoundingGrid
from diffsqueeze.quant.primitives.rounding import inverse_rectified_sigmoid, rectified_sigmoid


class WeightQuantizer(nn.Module):
    """Fake quantizer of a weight tensor, per output channel, per group of inputs, or in the blocks
    of a block-scaled format (NVFP4, MXFP4, MXFP8; docs/methods.md §10), whatever its number format.

    The weight is viewed as ``(out, n_groups, group_size)`` (``w.reshape(out, -1)`` split in
    groups, zero-padded where the format stores whole blocks: :meth:`NumberFormat.layout`). Its
    buffers are the format's parameters (:meth:`NumberFormat.weight_params`): ``scale`` and
    ``zero_point`` (INT) or ``bias`` (FP), shaped ``(out, n_groups, 1)``; none for block formats,
    whose scales come from the blocks themselves (nothing to search or learn: learned rounding
    leaves them at round-to-nearest, and QuEST trains the weight through them straight through).

    Args:
        fmt: Format name or object.
        weight_shape: Shape of the weight it quantizes.
        group_size: 0 for per output channel, else inputs per group (must divide the row).
    """

    def __init__(self, fmt: str | NumberFormat, weight_shape: tuple[int, ...], group_size: int = 0):
        super().__init__()
        self.fmt = parse_format(fmt)
        self.weight_shape = tuple(weight_shape)
        self.row = math.prod(self.weight_shape[1:])
        self.group_size, self.padded_row = self.fmt.layout(self.row, group_size)
        params = self.fmt.weight_params((self.weight_shape[0], self.padded_row // self.group_size, 1))
        for name, value in params.items():
            self.register_buffer(name, value)
        self.param_names = tuple(params)
        self.alpha: nn.Parameter | None = None  # AdaRound variables V while learning
        self.soft = True
        # the rounding grid of the weight being learned, reused while neither the weight nor the
        # parameters change (a GGUF K-quant's grid is a search, too slow to repeat every step)
        self._grid_key: tuple | None = None
        self._grid: RoundingGrid | None = None

    @property
    def searchable(self) -> bool:
        """Whether the format has parameters to search (scales, biases) rather than computing them."""
        return bool(self.param_names)

    @property
    def params(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.param_names}

    def grouped(self, w: Tensor) -> Tensor:
        """``w`` as ``(out, n_groups, group_size)`` (zero-padded to the format's blocks)."""
        rows = w.reshape(w.shape[0], -1)
        if self.padded_row > rows.shape[1]:
            rows = F.pad(rows, (0, self.padded_row - rows.shape[1]))
        return to_groups(rows, self.group_size)

    def ungrouped(self, g: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`grouped` (the padding cut off)."""
        return g.reshape(g.shape[0], -1)[:, : self.row].reshape(shape)

    def set_params(self, **params: Tensor) -> None:
        """Copy searched parameters (``scale``/``zero_point`` or ``bias``) into the buffers."""
        for name, value in params.items():
            buf = getattr(self, name)
            buf.copy_(value.detach().reshape(buf.shape).to(buf))

    def quantize_rtn(self, w: Tensor) -> Tensor:
        """Round-to-nearest fake quantization of ``w`` (docs/methods.md §2, §3, §10)."""
        return self.ungrouped(self.fmt.fake_quantize(self.grouped(w), self.params), w.shape)

    # ---- learned rounding (docs/methods.md §4) -------------------------------------------------

    def init_rounding(self, w: Tensor) -> None:
        """Create the rounding variables V with ``h(V)`` equal to the fractional part of W/s
        (nothing for a format without learned rounding: it stays round-to-nearest)."""
        if not self.fmt.learnable_rounding:
            return
        grid = self.rounding_grid(w)
        rest = grid.w / grid.step - grid.floor
        # ungrouped: a row padded to whole blocks (a GGUF Q4_0 weight) has no rounding variables in its padding
        self.alpha = nn.Parameter(inverse_rectified_sigmoid(self.ungrouped(rest, w.shape)).contiguous())
        self.soft = True

    def rounding_grid(self, w: Tensor) -> RoundingGrid:
        """The format's rounding grid of ``w`` (grouped). For a layer's weight (a Parameter or a view
        of one) it is computed once per version of the weight and of the parameters: an optimizer's
        in-place update bumps the version and so recomputes it; any other tensor (a temporary,
        whose memory a later one may reuse) is never cached."""
        base = w if w._base is None else w._base
        if not isinstance(base, nn.Parameter):
            return self.fmt.rounding_floor_step(self.grouped(w.detach()), self.params)
        key = (id(base), w.data_ptr(), w._version, tuple(w.shape), w.stride(), w.dtype,
               tuple((p.data_ptr(), p._version) for p in self.params.values()))
        if key != self._grid_key or self._grid is None:
            self._grid = self.fmt.rounding_floor_step(self.grouped(w.detach()), self.params)
            self._grid_key = key
        return self._grid

    def quantize_learned(self, w: Tensor) -> Tensor:
        """``(floor(W/s) + h(V)) s`` on the grid; hard ``h = 1[V >= 0]`` when not ``soft``.

        Elements of W that are exactly zero (pruned) stay zero: their ``h`` is forced to 0.
        Gradients flow to V only (W is treated as constant).
        """
        g = self.grouped(w.detach())
        grid = self.rounding_grid(w)
        v = self.grouped(self.alpha)
        h = rectified_sigmoid(v) if self.soft else (v >= 0).to(g.dtype)
        h = h * (g != 0).to(g.dtype)
        return self.ungrouped(self.fmt.rounding_value(grid, h, self.params), w.shape)

    @torch.no_grad()
    def finalize_rounding(self, w: Tensor) -> Tensor:
        """Hard-round (``h = 1[V >= 0]``), drop V, return the on-grid weight to store."""
        self.soft = False
        out = self.quantize_learned(w)
        self.alpha = None
        self._grid_key = self._grid = None
        return out

    def forward(self, w: Tensor) -> Tensor:
        if self.alpha is not None:
            return self.quantize_learned(w)
        return self.quantize_rtn(w)

    def extra_repr(self) -> str:
        if self.fmt.block:
            return f"{self.fmt.name}, blocks of {self.fmt.block}"
        return f"{self.fmt.name}, group_size={self.group_size}"


class ActQuantizer(nn.Module):
    """Activation fake quantizer with timestep groups and an LSQ-learnable scale.

    Parameters/buffers: ``scale`` (learnable, ``(G, *shape)``), ``zero_point`` (INT, buffer),
    and for ``G > 1`` the routing table ``group_t`` (calibration timesteps) / ``group_of``.
    FP formats use the standard-bias grid times ``scale``: ``scale = 2^(b0 - beta)`` is the
    real-valued bias of docs/methods.md §3 (see :func:`~diffsqueeze.quant.primitives.formats.bias_to_scale`).

    Args:
        fmt: Format name or object.
        param_shape: Shape of one scale set, broadcast against the input (``(1,)`` per tensor,
            ``(C,)`` per last dim, ``(1, C, 1, 1)`` per conv channel).
        groups: Number of timestep groups G.
        n_timesteps: Calibration timesteps (length of the routing table).
        dynamic_group: Channels per group of dynamic (on-the-fly, per token) scales; 0 = the
            static calibrated scales above. A block format name (``nvfp4``, ``mxfp4``,
            ``mxfp8``) as ``fmt`` is always dynamic, in its own block size and scale encoding.
        channel_dim: The input's channel dim (1 for a conv, -1 for a linear), for dynamic groups.
    """

    def __init__(self, fmt: str | NumberFormat, param_shape: tuple[int, ...] = (1,), groups: int = 1,
                 n_timesteps: int = 1, dynamic_group: int = 0, channel_dim: int = -1):
        super().__init__()
        self.format = parse_format(fmt)
        self.fmt = self.format.element  # the grid of one value (a block format's element format)
        self.dynamic_group = self.format.block or int(dynamic_group)
        self.channel_dim = channel_dim
        if self.dynamic_group and groups != 1:
            raise ValueError("dynamic activation scales take no timestep groups")
        self.param_shape = tuple(param_shape)
        self.groups = groups
        self.scale = nn.Parameter(torch.ones(groups, *self.param_shape))
        for name, value in self.format.act_params((groups, *self.param_shape)).items():
            self.register_buffer(name, value)  # an INT zero point
        if groups > 1:
            self.register_buffer("group_t", torch.zeros(n_timesteps, dtype=torch.float64))
            self.register_buffer("group_of", torch.zeros(n_timesteps, dtype=torch.long))
        self.tctx = None  # TimestepContext, linked by diffsqueeze.quant.nn.routing
        self.enabled = True
        self.lsq = False  # learnable-scale gradient path

    @property
    def has_zero_point(self) -> bool:
        return "zero_point" in self._buffers

    @property
    def format_name(self) -> str:
        """The format as a recipe names it (``nvfp4`` rather than its element grid)."""
        return self.format.name

    def set_routing(self, timesteps: list[float], group_of: list[int]) -> None:
        """Calibration timesteps (sampling order) and the group of each."""
        if self.groups > 1:
            self.group_t.copy_(torch.tensor(timesteps, dtype=torch.float64))
            self.group_of.copy_(torch.tensor(group_of, dtype=torch.long))

    def current_group(self) -> int:
        """Group of the denoiser's current timestep: nearest calibration timestep's group."""
        if self.groups == 1:
            return 0
        if self.tctx is None or self.tctx.t is None:
            raise RuntimeError(
                "timestep-aware activation quantizer called without a timestep: after load_pipeline, "
                "call diffsqueeze.quant.nn.routing.prepare_pipeline(pipe) to route the denoiser's timestep to its quantizers"
            )
        i = int(torch.argmin((self.group_t - self.tctx.t).abs()))
        return int(self.group_of[i])

    def set_params(self, group: int, scale: Tensor, zero_point: Tensor | None = None) -> None:
        """Set one group's scale (and INT zero point)."""
        with torch.no_grad():
            self.scale[group].copy_(scale.detach().reshape(self.param_shape).to(self.scale))
            if self.has_zero_point and zero_point is not None:
                self.zero_point[group].copy_(zero_point.detach().reshape(self.param_shape).to(self.zero_point))

    def fake_quant(self, x: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
        """Quantize ``x`` with the given parameters (no grouping)."""
        if not self.lsq:
            return self.format.scaled_fake_quantize(x, scale, zero_point)
        # values per scale over the whole training batch (a data-parallel process holds its share)
        n_per_scale = max(round(x.numel() / step_share()) // max(scale.numel(), 1), 1)
        return self.format.lsq_fake_quantize(x, scale, zero_point, n_per_scale)

    def dynamic_quant(self, x: Tensor) -> Tensor:
        """Quantize ``x`` with scales computed from it, per token and channel group (straight-through
        gradient: the rounding is the identity for backward, and no value is clipped)."""
        with torch.no_grad():
            xq = self.format.dynamic_fake_quantize(x, self.dynamic_group, self.channel_dim)
        if torch.is_grad_enabled() and x.requires_grad:
            return x + (xq - x).detach()
        return xq

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.dynamic_group:
            return self.dynamic_quant(x)
        g = self.current_group()
        zp = self.zero_point[g] if self.has_zero_point else None
        return self.fake_quant(x, self.scale[g], zp)

    def extra_repr(self) -> str:
        if self.format.block:
            return f"{self.format.name}, dynamic"
        if self.dynamic_group:
            return f"{self.fmt.name}, dynamic groups of {self.dynamic_group}"
        return f"{self.fmt.name}, shape={self.param_shape}, groups={self.groups}"
