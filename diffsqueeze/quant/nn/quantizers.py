"""Weight and activation quantizer modules; all their state is parameters and buffers.

* :class:`WeightQuantizer`: INT (scale, zero point) or FP ExMy (real exponent bias) per
  output channel or per group (METHODS §2, §3), round-to-nearest, or learned rounding with
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
from diffsqueeze.quant.primitives.block_formats import BLOCK_FORMATS, block_fake_quantize
from diffsqueeze.quant.primitives.dynamic_groups import dynamic_group_fake_quantize
from diffsqueeze.quant.primitives.formats import (
    FPFormat,
    IntFormat,
    fp_quantize,
    fp_step,
    int_code_range,
    int_fake_quantize,
    maxval,
    parse_format,
    to_groups,
)
from diffsqueeze.quant.primitives.rounding import (
    grad_scale,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
    round_ste,
)


class WeightQuantizer(nn.Module):
    """Fake quantizer of a weight tensor, per output channel or per group of inputs.

    The weight is viewed as ``(out, n_groups, group_size)`` (``w.reshape(out, -1)`` split in
    groups; per channel is one group of the whole row). Buffers: ``scale`` and
    ``zero_point`` (INT) or ``bias`` (FP), shaped ``(out, n_groups, 1)``.

    Args:
        fmt: Format name or object.
        weight_shape: Shape of the weight it quantizes.
        group_size: 0 for per output channel, else inputs per group (must divide the row).
    """

    def __init__(self, fmt: str | IntFormat | FPFormat, weight_shape: tuple[int, ...], group_size: int = 0):
        super().__init__()
        self.fmt = parse_format(fmt)
        self.weight_shape = tuple(weight_shape)
        row = math.prod(self.weight_shape[1:])
        self.group_size = group_size or row
        if row % self.group_size:
            raise ValueError(f"group_size {group_size} does not divide the weight row length {row}")
        shape = (self.weight_shape[0], row // self.group_size, 1)
        if isinstance(self.fmt, IntFormat):
            self.register_buffer("scale", torch.ones(shape))
            self.register_buffer("zero_point", torch.zeros(shape))
        else:
            self.register_buffer("bias", torch.full(shape, float(self.fmt.standard_bias)))
        self.alpha: nn.Parameter | None = None  # AdaRound variables V while learning
        self.soft = True

    @property
    def is_int(self) -> bool:
        return isinstance(self.fmt, IntFormat)

    def grouped(self, w: Tensor) -> Tensor:
        """``w`` as ``(out, n_groups, group_size)``."""
        return to_groups(w.reshape(w.shape[0], -1), self.group_size)

    def set_params(self, **params: Tensor) -> None:
        """Copy searched parameters (``scale``/``zero_point`` or ``bias``) into the buffers."""
        for name, value in params.items():
            buf = getattr(self, name)
            buf.copy_(value.detach().reshape(buf.shape).to(buf))

    def quantize_rtn(self, w: Tensor) -> Tensor:
        """Round-to-nearest fake quantization of ``w`` (METHODS §2, §3)."""
        g = self.grouped(w)
        if self.is_int:
            out = int_fake_quantize(g, self.scale, self.zero_point, bits=self.fmt.bits,
                                    symmetric=self.fmt.symmetric, check=False)
        else:
            out = fp_quantize(g, self.fmt, self.bias, check=False)
        return out.reshape(w.shape)

    # ---- learned rounding (METHODS §4) -------------------------------------------------

    def _floor_and_step(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """``floor(W / s)`` and the (element-wise for FP) step ``s``, W clamped to the range."""
        if self.is_int:
            return torch.floor(g / self.scale), self.scale.expand_as(g)
        mv = maxval(self.fmt, self.bias)
        gc = torch.minimum(torch.maximum(g, -mv), mv)
        step = fp_step(gc, self.fmt, self.bias, check=False)
        return torch.floor(gc / step), step

    def init_rounding(self, w: Tensor) -> None:
        """Create the rounding variables V with ``h(V)`` equal to the fractional part of W/s."""
        g = self.grouped(w.detach())
        floor, step = self._floor_and_step(g)
        if self.is_int:
            rest = g / step - floor
        else:
            mv = maxval(self.fmt, self.bias)
            rest = torch.minimum(torch.maximum(g, -mv), mv) / step - floor
        self.alpha = nn.Parameter(inverse_rectified_sigmoid(rest).reshape(w.shape).contiguous())
        self.soft = True

    def quantize_learned(self, w: Tensor) -> Tensor:
        """``(floor(W/s) + h(V)) s`` on the grid; hard ``h = 1[V >= 0]`` when not ``soft``.

        Elements of W that are exactly zero (pruned) stay zero: their ``h`` is forced to 0.
        Gradients flow to V only (W is treated as constant).
        """
        g = self.grouped(w.detach())
        floor, step = self._floor_and_step(g)
        v = self.grouped(self.alpha)
        h = rectified_sigmoid(v) if self.soft else (v >= 0).to(g.dtype)
        h = h * (g != 0).to(g.dtype)
        if self.is_int:
            lo, hi = int_code_range(self.fmt.bits, self.fmt.symmetric)
            q = torch.clamp(floor + h + self.zero_point, lo, hi)
            out = (q - self.zero_point) * self.scale
        else:
            mv = maxval(self.fmt, self.bias)
            out = torch.minimum(torch.maximum((floor + h) * step, -mv), mv)
        return out.reshape(w.shape)

    @torch.no_grad()
    def finalize_rounding(self, w: Tensor) -> Tensor:
        """Hard-round (``h = 1[V >= 0]``), drop V, return the on-grid weight to store."""
        self.soft = False
        out = self.quantize_learned(w)
        self.alpha = None
        return out

    def forward(self, w: Tensor) -> Tensor:
        if self.alpha is not None:
            return self.quantize_learned(w)
        return self.quantize_rtn(w)

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, group_size={self.group_size}"


class BlockWeightQuantizer(nn.Module):
    """Round-to-nearest of a weight in a block-scaled format (NVFP4, MXFP4, MXFP8; METHODS §10).

    Each block of consecutive inputs of an output row shares a scale computed from the block
    itself (NVFP4: times one FP32 scale per weight tensor), so there is nothing to search or
    learn; rows are zero-padded to whole blocks (the padding is stored, and cut off on decode).
    Learned rounding is not built for these formats: :meth:`init_rounding` leaves the quantizer
    at round-to-nearest (QuEST then trains the weight through it, straight through).

    Args:
        fmt: ``nvfp4``, ``mxfp4`` or ``mxfp8``.
        weight_shape: Shape of the weight it quantizes.
    """

    def __init__(self, fmt: str, weight_shape: tuple[int, ...]):
        super().__init__()
        self.fmt = BLOCK_FORMATS[fmt.lower()]
        self.weight_shape = tuple(weight_shape)
        self.row = math.prod(self.weight_shape[1:])
        self.padded_row = -(-self.row // self.fmt.block) * self.fmt.block
        self.group_size = self.row  # one part per row for the callers that ask (no searched scales)
        self.alpha = None
        self.is_int = False

    def padded_rows(self, w: Tensor) -> Tensor:
        """``w`` as ``(out, padded_row)``, zero-padded to whole blocks."""
        rows = w.reshape(w.shape[0], -1)
        return F.pad(rows, (0, self.padded_row - self.row)) if self.padded_row > self.row else rows

    def quantize_rtn(self, w: Tensor) -> Tensor:
        return block_fake_quantize(self.padded_rows(w), self.fmt)[:, : self.row].reshape(w.shape)

    def init_rounding(self, w: Tensor) -> None:
        """No rounding variables: block formats stay round-to-nearest (class docstring)."""

    def forward(self, w: Tensor) -> Tensor:
        return self.quantize_rtn(w)

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, blocks of {self.fmt.block}"


class ActQuantizer(nn.Module):
    """Activation fake quantizer with timestep groups and an LSQ-learnable scale.

    Parameters/buffers: ``scale`` (learnable, ``(G, *shape)``), ``zero_point`` (INT, buffer),
    and for ``G > 1`` the routing table ``group_t`` (calibration timesteps) / ``group_of``.
    FP formats use the standard-bias grid times ``scale``: ``scale = 2^(b0 - beta)`` is the
    real-valued bias of METHODS §3 (see :func:`~diffsqueeze.quant.primitives.formats.bias_to_scale`).

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

    def __init__(self, fmt: str | IntFormat | FPFormat, param_shape: tuple[int, ...] = (1,), groups: int = 1,
                 n_timesteps: int = 1, dynamic_group: int = 0, channel_dim: int = -1):
        super().__init__()
        self.block_format = BLOCK_FORMATS.get(fmt.lower()) if isinstance(fmt, str) else None
        self.fmt = self.block_format.element if self.block_format else parse_format(fmt)
        self.dynamic_group = self.block_format.block if self.block_format else int(dynamic_group)
        self.channel_dim = channel_dim
        if self.dynamic_group and groups != 1:
            raise ValueError("dynamic activation scales take no timestep groups")
        self.param_shape = tuple(param_shape)
        self.groups = groups
        self.scale = nn.Parameter(torch.ones(groups, *self.param_shape))
        if isinstance(self.fmt, IntFormat):
            self.register_buffer("zero_point", torch.zeros(groups, *self.param_shape))
        if groups > 1:
            self.register_buffer("group_t", torch.zeros(n_timesteps, dtype=torch.float64))
            self.register_buffer("group_of", torch.zeros(n_timesteps, dtype=torch.long))
        self.tctx = None  # TimestepContext, linked by diffsqueeze.quant.nn.routing
        self.enabled = True
        self.lsq = False  # learnable-scale gradient path

    @property
    def is_int(self) -> bool:
        return isinstance(self.fmt, IntFormat)

    @property
    def format_name(self) -> str:
        """The format as a recipe names it (``nvfp4`` rather than its element grid)."""
        return self.block_format.name if self.block_format is not None else self.fmt.name

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
            if self.is_int and zero_point is not None:
                self.zero_point[group].copy_(zero_point.detach().reshape(self.param_shape).to(self.zero_point))

    def fake_quant(self, x: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
        """Quantize ``x`` with the given parameters (no grouping)."""
        if not self.lsq:
            if self.is_int:
                return int_fake_quantize(x, scale, zero_point, bits=self.fmt.bits, symmetric=self.fmt.symmetric,
                                         check=False)
            return (fp_quantize(x / scale, self.fmt, self.fmt.standard_bias, check=False) * scale).to(x.dtype)
        # values per scale over the whole training batch (a data-parallel process holds its share)
        n_per_scale = max(round(x.numel() / step_share()) // max(scale.numel(), 1), 1)
        if self.is_int:
            lo, hi = int_code_range(self.fmt.bits, self.fmt.symmetric)
            s = grad_scale(scale, 1.0 / math.sqrt(n_per_scale * hi))
            u = torch.clamp(x / s, lo - zero_point, hi - zero_point)
            return round_ste(u) * s
        top = maxval(self.fmt, float(self.fmt.standard_bias))
        s = grad_scale(scale, 1.0 / math.sqrt(n_per_scale * top))
        u = torch.clamp(x / s, -top, top)
        q = u + (fp_quantize(u.detach(), self.fmt, self.fmt.standard_bias, check=False) - u).detach()
        return q * s

    def dynamic_quant(self, x: Tensor) -> Tensor:
        """Quantize ``x`` with scales computed from it, per token and channel group (straight-through
        gradient: the rounding is the identity for backward, and no value is clipped)."""
        with torch.no_grad():
            if self.block_format is not None:
                xt = x.movedim(self.channel_dim, -1)
                n, pad = xt.shape[-1], (-xt.shape[-1]) % self.block_format.block
                xq = block_fake_quantize(F.pad(xt, (0, pad)) if pad else xt, self.block_format)
                xq = xq[..., :n].movedim(-1, self.channel_dim)
            else:
                xq = dynamic_group_fake_quantize(x, self.fmt, self.dynamic_group, self.channel_dim)
        if torch.is_grad_enabled() and x.requires_grad:
            return x + (xq - x).detach()
        return xq

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.dynamic_group:
            return self.dynamic_quant(x)
        g = self.current_group()
        zp = self.zero_point[g] if self.is_int else None
        return self.fake_quant(x, self.scale[g], zp)

    def extra_repr(self) -> str:
        if self.block_format is not None:
            return f"{self.block_format.name}, dynamic"
        if self.dynamic_group:
            return f"{self.fmt.name}, dynamic groups of {self.dynamic_group}"
        return f"{self.fmt.name}, shape={self.param_shape}, groups={self.groups}"
