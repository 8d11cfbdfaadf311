"""FP ExMy formats with a real-valued exponent bias (docs/methods.md §3) and their hardware grids.

Pure, vectorised tensor functions; the bias may be a number or a tensor broadcastable to ``x``.
Outputs keep ``x``'s dtype; the arithmetic runs in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffsqueeze.quant.primitives.grouping import check_finite, work_dtype
from diffsqueeze.quant.primitives.number_format import FLOAT_DTYPES, NumberFormat, RoundingGrid
from diffsqueeze.quant.primitives.pack import pack_codes, packed_nbytes, unpack_codes
from diffsqueeze.quant.primitives.rounding import grad_scale

# --------------------------------------------------------------------------------------------

# (E, M) -> how the hardware encoding spends its top codes:
#   "none": every code is a finite number (OCP MX FP6 / FP4),
#   "nan_top_code": the all-ones code is NaN, the rest of the top exponent is finite
#                   (OCP FP8 E4M3 = torch.float8_e4m3fn, max 448),
#   "ieee": the all-ones exponent is Inf/NaN (OCP FP8 E5M2 = torch.float8_e5m2, max 57344).
_HW_SPECIALS = {(4, 3): "nan_top_code", (5, 2): "ieee", (3, 2): "none", (2, 3): "none", (2, 1): "none"}
_HW_TORCH_DTYPES = {(4, 3): "float8_e4m3fn", (5, 2): "float8_e5m2"}


@dataclass(frozen=True)
class FPFormat(NumberFormat):
    """A sign + ``exp_bits`` exponent + ``man_bits`` mantissa floating-point format.

    The exponent bias is not part of the format: every FP function takes it as an argument
    (a real number or a tensor), as the low-bit FP method searches it (docs/methods.md §3).

    Attributes:
        exp_bits: Exponent bits E >= 1.
        man_bits: Mantissa bits M >= 0.
        name: Canonical name (``fp8_e4m3``); hardware flavours end in ``_hw``.
        hardware: ``False``: the paper's grid, every code finite, maxval
            ``(2 - 2^-M) 2^(2^E - 1 - bias)``. ``True``: the grid of the real hardware
            encoding (OCP FP8 E4M3/E5M2 reserve top codes, see ``special``; OCP FP6/FP4 use
            every code so their grid equals the paper's).
    """

    exp_bits: int
    man_bits: int
    name: str = ""
    hardware: bool = False

    def __post_init__(self) -> None:
        e, m = self.exp_bits, self.man_bits
        if not (isinstance(e, int) and isinstance(m, int) and e >= 1 and m >= 0 and 1 + e + m <= 8):
            raise ValueError(f"invalid FP format E{e}M{m}: need E >= 1, M >= 0, 1 + E + M <= 8 bits")
        if self.hardware and (e, m) not in _HW_SPECIALS:
            known = ", ".join(f"E{a}M{b}" for a, b in _HW_SPECIALS)
            raise ValueError(f"no hardware encoding for E{e}M{m}; hardware formats: {known}")
        if not self.name:
            suffix = "_hw" if self.hardware else ""
            object.__setattr__(self, "name", f"fp{1 + e + m}_e{e}m{m}{suffix}")

    @property
    def kind(self) -> str:
        """``"fp"``."""
        return "fp"

    @property
    def bits(self) -> int:
        """Total bits, 1 + E + M."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def standard_bias(self) -> int:
        """The IEEE/OCP bias ``2^(E-1) - 1``."""
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def special(self) -> str:
        """Reserved top codes: ``"none"``, ``"nan_top_code"`` or ``"ieee"`` (see module)."""
        return _HW_SPECIALS[(self.exp_bits, self.man_bits)] if self.hardware else "none"

    @property
    def max_exp_code(self) -> int:
        """Largest exponent field of a finite value."""
        return 2**self.exp_bits - (2 if self.special == "ieee" else 1)

    @property
    def max_man_code(self) -> int:
        """Largest mantissa field at :attr:`max_exp_code`."""
        return 2**self.man_bits - (2 if self.special == "nan_top_code" else 1)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype holding this grid at the standard bias, if torch has one."""
        name = _HW_TORCH_DTYPES.get((self.exp_bits, self.man_bits)) if self.hardware else None
        return getattr(torch, name, None) if name else None

    @property
    def element(self) -> "FPFormat":
        return self

    @property
    def block(self) -> int:
        return 0

    @property
    def eight_bit(self) -> str | None:
        """The hardware E4M3 for hardware grids; None (search the 8-bit formats) for the paper's grids."""
        return "fp8_e4m3_hw" if self.hardware else None

    # ---- the number-format protocol (number_format.py); the math is below ------------------

    def weight_params(self, shape: tuple[int, ...]) -> dict[str, Tensor]:
        return {"bias": torch.full(shape, float(self.standard_bias))}

    def fake_quantize(self, g: Tensor, params: dict[str, Tensor]) -> Tensor:
        return fp_quantize(g, self, params["bias"], check=False)

    def rounding_floor_step(self, g: Tensor, params: dict[str, Tensor]) -> RoundingGrid:
        mv = maxval(self, params["bias"])
        gc = torch.minimum(torch.maximum(g, -mv), mv)
        step = fp_step(gc, self, params["bias"], check=False)
        return RoundingGrid(torch.floor(gc / step), step, gc)

    def rounding_value(self, grid: RoundingGrid, h: Tensor, params: dict[str, Tensor]) -> Tensor:
        mv = maxval(self, params["bias"])
        return torch.minimum(torch.maximum((grid.floor + h) * grid.step, -mv), mv)

    def scaled_fake_quantize(self, x: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
        return (fp_quantize(x / scale, self, self.standard_bias, check=False) * scale).to(x.dtype)

    def lsq_fake_quantize(self, x: Tensor, scale: Tensor, zero_point: Tensor | None, n_per_scale: int) -> Tensor:
        top = maxval(self, float(self.standard_bias))
        s = grad_scale(scale, 1.0 / math.sqrt(n_per_scale * top))
        u = torch.clamp(x / s, -top, top)
        q = u + (fp_quantize(u.detach(), self, self.standard_bias, check=False) - u).detach()
        return q * s

    def group_scales(self, g: Tensor) -> tuple[Tensor, Tensor | None]:
        s = g.abs().amax(dim=-1, keepdim=True) / maxval(self, float(self.standard_bias))
        return torch.where(s > 0, s, torch.ones((), dtype=g.dtype, device=g.device)), None

    def minmax_fake_quantize(self, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        s = torch.maximum(lo.abs(), hi.abs()).clamp(min=1e-12) / maxval(self, float(self.standard_bias))
        return fp_quantize(x / s, self, self.standard_bias, check=False) * s

    def encode(self, g: Tensor, params: dict[str, Tensor], scale_dtype: str,
               shape: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        bias = params["bias"].detach().to(torch.float32)
        scale = bias_to_scale(self, bias)  # the searched real bias folded into a scale on the standard grid
        codes = fp_encode(g, self, bias)
        if self.torch_dtype is not None:
            storage, qweight = "float8", codes.reshape(shape).contiguous().view(self.torch_dtype)
        else:
            storage, qweight = f"packed{self.bits}", pack_codes(codes, self.bits)
        return {"storage": storage}, {"qweight": qweight, "wscale": scale.to(FLOAT_DTYPES[scale_dtype]).contiguous()}

    def empty_buffers(self, part: dict[str, Any], out: int, device: Any) -> dict[str, Tensor]:
        if part["storage"] == "float8":
            q = torch.empty(tuple(part["shape"]), dtype=self.torch_dtype, device=device)
        else:
            q = torch.empty(packed_nbytes(part["numel"], self.bits), dtype=torch.uint8, device=device)
        scale = torch.empty(out, part["n_groups"], 1, dtype=FLOAT_DTYPES[part["scale_dtype"]], device=device)
        return {"qweight": q, "wscale": scale}

    def decode(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> Tensor:
        shape = tuple(part["shape"])
        q, scale = tensors["qweight"], tensors["wscale"].to(torch.float32)
        if part["storage"] == "float8":
            return (q.to(torch.float32).reshape(shape[0], part["n_groups"], -1) * scale).reshape(shape)
        codes = unpack_codes(q, part["numel"], self.bits).reshape(shape[0], part["n_groups"], -1)
        return (fp_decode(codes, self, None, torch.float32) * scale).reshape(shape)

    def check_part(self, part: dict[str, Any]) -> str | None:
        want = "float8" if self.torch_dtype is not None else f"packed{self.bits}"
        if part.get("storage") != want or part.get("bits") != self.bits:
            return (f"storage {part.get('storage')!r} / bits {part.get('bits')!r} do not match format {self.name} "
                    f"(expected {want}, {self.bits})")
        return None

    def check_stored(self, tensors: dict[str, Tensor], part: dict[str, Any]) -> str | None:
        q = tensors["qweight"]
        if self.torch_dtype is not None:
            return None if q.dtype == self.torch_dtype else f"codes are {q.dtype}, the map says {self.torch_dtype}"
        want = packed_nbytes(math.prod(part["shape"]), self.bits)
        if q.dtype != torch.uint8 or q.numel() != want:
            return (f"packed codes have {q.numel()} {q.dtype} elements, the map's {part['format']} {part['shape']} "
                    f"needs {want} uint8 bytes")
        return None


E4M3, E5M2 = FPFormat(4, 3), FPFormat(5, 2)
E3M2, E2M3 = FPFormat(3, 2), FPFormat(2, 3)
E2M1, E3M0, E1M2 = FPFormat(2, 1), FPFormat(3, 0), FPFormat(1, 2)
E4M3_HW, E5M2_HW = FPFormat(4, 3, hardware=True), FPFormat(5, 2, hardware=True)
E3M2_HW, E2M3_HW = FPFormat(3, 2, hardware=True), FPFormat(2, 3, hardware=True)
E2M1_HW = FPFormat(2, 1, hardware=True)

FP_FORMATS = (E4M3, E5M2, E3M2, E2M3, E2M1, E3M0, E1M2, E4M3_HW, E5M2_HW, E3M2_HW, E2M3_HW, E2M1_HW)


def _split_bias(bias: Tensor) -> tuple[Tensor, Tensor]:
    """``bias = n + f``: returns ``n = floor(bias)`` and ``c = 2^-f`` in (0.5, 1].

    Every grid value is then ``integer * 2^j * c``; computing it as ``integer * (2^j * c)``
    (the bracket is exact) rounds once, so the grid, the quantizer and the scale identity
    below agree exactly, even for a real bias.
    """
    if not bias.is_floating_point():
        bias = bias.to(torch.get_default_dtype())
    n = torch.floor(bias)
    return n, torch.exp2(n - bias)


def maxval(fmt: FPFormat, bias: Tensor | float) -> Tensor | float:
    """Largest representable magnitude (docs/methods.md §3).

    ``(1 + max_man / 2^M) * 2^(max_exp - bias)``: with every code finite this is the paper's
    ``(2 - 2^-M) * 2^(2^E - 1 - bias)``; hardware E4M3 gives 448 and E5M2 57344 at the
    standard bias.

    Args:
        fmt: FP format.
        bias: Real exponent bias, number or tensor.

    Returns:
        A float for a number ``bias``, else a tensor of ``bias``'s shape.
    """
    b = bias if isinstance(bias, Tensor) else torch.tensor(float(bias), dtype=torch.float64)
    mv = _maxval_split(fmt, *_split_bias(b))
    return mv if isinstance(bias, Tensor) else mv.item()


def _maxval_split(fmt: FPFormat, n: Tensor, c: Tensor) -> Tensor:
    top = 2**fmt.man_bits + fmt.max_man_code  # largest mantissa as an integer
    return top * (torch.exp2(fmt.max_exp_code - fmt.man_bits - n) * c)


def _clamp_and_step(x: Tensor, fmt: FPFormat, bias: Tensor | float) -> tuple[Tensor, Tensor]:
    """``x_c`` and the element-wise step ``s`` of docs/methods.md §3, in the working dtype.

    ``e = clamp(floor(log2|x_c| + bias), min=1)``, ``s = 2^(e - M - bias)``. The floor is
    taken of the sum, as the released code does; for an integer bias this equals
    ``floor(log2|x_c|) + bias`` and for a real bias it keeps the grid an exact power-of-two
    scale of the standard one. ``floor(log2|a| + bias)`` is computed exactly from frexp:
    with ``|a| = m 2^k``, m in [1, 2), ``bias = n + f``, it is ``k + n + [m >= 2^(1 - f)]``.
    """
    wd = work_dtype(x)
    x = x.to(wd)
    n, c = _split_bias(torch.as_tensor(bias, dtype=wd, device=x.device))
    mv = _maxval_split(fmt, n, c)
    xc = torch.minimum(torch.maximum(x, -mv), mv)
    mant, expo = torch.frexp(xc.abs())
    e = (expo - 1).to(wd) + n + (2 * mant >= 2 * c).to(wd)
    e = torch.where(xc == 0, torch.ones_like(e), e).clamp(min=1)
    return xc, torch.exp2(e - fmt.man_bits - n) * c


def fp_step(
    x: Tensor, fmt: FPFormat, bias: Tensor | float, *, check: bool = True
) -> Tensor:
    """Element-wise grid step at ``x`` (after clamping): ``s = 2^(e - M - bias)`` (docs/methods.md §3).

    This is the per-element ``s`` that learned rounding uses on the FP grid (docs/methods.md §4):
    ``floor(x / s)`` and ``x / s - floor(x / s)`` give the two neighbouring grid points.

    Args:
        x: Input, any shape.
        fmt: FP format.
        bias: Exponent bias, number or tensor broadcastable to ``x``.
        check: Raise on NaN/Inf (costs a device sync; turn off in hot loops).

    Returns:
        Steps, broadcast shape of ``x`` and ``bias``, ``x``'s dtype.
    """
    if check:
        check_finite(x)
    return _clamp_and_step(x, fmt, bias)[1].to(x.dtype)


def fp_quantize(
    x: Tensor, fmt: FPFormat, bias: Tensor | float, *, check: bool = True
) -> Tensor:
    """Round ``x`` to the nearest value of the ExMy grid with exponent ``bias`` (docs/methods.md §3).

    ``x_c = clamp(x, -maxval, maxval)``, ``e = clamp(floor(log2|x_c| + bias), min=1)``,
    ``s = 2^(e - M - bias)``, ``x_hat = round(x_c / s) * s``: round-half-to-even, subnormals
    where e is clamped at 1, saturation beyond ``maxval``, zero to zero (sign kept). For a
    hardware format at the standard bias this equals torch's float8 cast bit for bit.

    Args:
        x: Input, any shape; must be finite (see ``check``).
        fmt: FP format.
        bias: Real exponent bias, number or tensor broadcastable to ``x`` (per channel).
        check: Raise on NaN/Inf (costs a device sync; turn off in hot loops).

    Returns:
        Quantized values, broadcast shape of ``x`` and ``bias``, ``x``'s dtype.

    Raises:
        ValueError: ``x`` holds NaN or Inf and ``check`` is on.
    """
    if check:
        check_finite(x)
    xc, s = _clamp_and_step(x, fmt, bias)
    return (torch.round(xc / s) * s).to(x.dtype)


def fp_grid(fmt: FPFormat, bias: float | None = None) -> Tensor:
    """Every representable value, sorted and unique, as float64 (reference for tests/export).

    Enumerates the codes: exponent field 0 gives subnormals ``(m / 2^M) 2^(1 - bias)``,
    field ``e >= 1`` gives ``(1 + m / 2^M) 2^(e - bias)``; reserved hardware codes are left out.

    Args:
        fmt: FP format.
        bias: Real exponent bias; the standard bias if ``None``.
    """
    b = torch.tensor(fmt.standard_bias if bias is None else float(bias), dtype=torch.float64)
    n, c = _split_bias(b)
    m = torch.arange(2**fmt.man_bits, dtype=torch.float64)
    vals = [m * (torch.exp2(1 - fmt.man_bits - n) * c)]  # subnormals
    for e in range(1, fmt.max_exp_code + 1):
        mm = m if e < fmt.max_exp_code else m[: fmt.max_man_code + 1]
        vals.append((2**fmt.man_bits + mm) * (torch.exp2(e - fmt.man_bits - n) * c))
    pos = torch.cat(vals)
    return torch.unique(torch.cat([-pos, pos]))


def bias_to_scale(fmt: FPFormat, bias: Tensor | float) -> Tensor | float:
    """Scale ``2^(standard_bias - bias)`` that turns a real bias into the standard grid.

    ``fp_quantize(x, fmt, bias) == scale * fp_quantize(x / scale, fmt, fmt.standard_bias)``
    (docs/methods.md §3, hardware grids): export stores standard-bias codes and folds ``scale`` into
    the layer's dequantization scale.
    """
    b = bias if isinstance(bias, Tensor) else torch.tensor(float(bias), dtype=torch.float64)
    n, c = _split_bias(b)
    scale = torch.exp2(fmt.standard_bias - n) * c
    return scale if isinstance(bias, Tensor) else scale.item()


def scale_to_bias(fmt: FPFormat, scale: Tensor | float) -> Tensor | float:
    """Inverse of :func:`bias_to_scale`: ``bias = standard_bias - log2(scale)``."""
    if isinstance(scale, Tensor):
        return fmt.standard_bias - torch.log2(scale)
    return fmt.standard_bias - math.log2(scale)


def fp_encode(x: Tensor, fmt: FPFormat, bias: Tensor | float | None = None) -> Tensor:
    """Bit codes ``sign | exponent field | mantissa field`` (uint8) of ``x`` on the grid.

    ``x`` is divided by :func:`bias_to_scale` and rounded to the standard-bias grid first, so
    any finite ``x`` is accepted. For hardware E4M3/E5M2 the codes equal the bits of torch's
    float8 cast; for FP4/FP6 they are the OCP MX codes, ready to pack.

    Args:
        x: Values, any shape.
        fmt: FP format.
        bias: Bias the values were quantized with; the standard bias if ``None``.
    """
    b0 = fmt.standard_bias
    u = x if bias is None else x / bias_to_scale(fmt, bias)
    u = fp_quantize(u, fmt, b0).to(work_dtype(x))
    mag = u.abs()
    mant, expo = torch.frexp(mag)
    e = torch.where(mag == 0, torch.ones_like(expo), expo - 1 + b0).clamp(min=1)
    mfull = torch.round(mag / torch.exp2((e - fmt.man_bits - b0).to(u.dtype))).to(torch.int32)
    normal = mfull >= 2**fmt.man_bits
    efield = torch.where(normal, e, torch.zeros_like(e))
    mfield = torch.where(normal, mfull - 2**fmt.man_bits, mfull)
    sign = torch.signbit(u).to(torch.int32)
    code = (sign << (fmt.exp_bits + fmt.man_bits)) | (efield << fmt.man_bits) | mfield
    return code.to(torch.uint8)


def fp_decode(
    codes: Tensor, fmt: FPFormat, bias: Tensor | float | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Values of bit codes made by :func:`fp_encode` (times :func:`bias_to_scale` if ``bias``)."""
    c = codes.to(torch.int32)
    mfield = (c & (2**fmt.man_bits - 1)).to(dtype)
    efield = (c >> fmt.man_bits) & (2**fmt.exp_bits - 1)
    sign = 1 - 2 * ((c >> (fmt.exp_bits + fmt.man_bits)) & 1).to(dtype)
    frac = mfield / 2**fmt.man_bits + (efield > 0).to(dtype)
    val = sign * frac * torch.exp2((efield.clamp(min=1) - fmt.standard_bias).to(dtype))
    return val if bias is None else val * bias_to_scale(fmt, bias)
