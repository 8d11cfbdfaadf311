"""W8A8 INT on the CPU: oneDNN's int8 convolution and matmul with float32 output, computing with
the run's calibrated scales and codes.

A packed W8A8 INT layer (8-bit INT weights per output channel, 8-bit INT activations with one
scale per tensor, per timestep group) becomes :class:`OneDNNW8A8Conv2d` / :class:`OneDNNW8A8Linear`:

* the input is quantized exactly as the simulated layer does it (``clamp(round(x / s) + z)``,
  the timestep group's ``s``, ``z`` chosen by the timestep router) into uint8 codes;
* the weight codes are the exported ones, shifted to int8 (``q - 128`` for asymmetric codes);
  the kernel accumulates in int32 and scales by ``s_x * s_w`` into float32 (no requantization of
  the output);
* oneDNN takes symmetric weights only, so an asymmetric weight's zero point ``z_w`` enters as a
  correction ``- s_w z_w * sum(x_hat over the kernel window)``; the window sums come from the
  kernel itself, as one extra output channel with all-ones weights (exact int32 sums, one more
  channel of the layer's ``C_out``).

The result equals the simulated layer up to float32 summation order. Measured on an AVX2 CPU
without VNNI (docs/BENCHMARKS.md): a 320->320 3x3 conv 3.3x, a 1280x1280 linear on 2048 tokens
1.7x faster than float32, quantization of the input included; a whole SD-1.5 UNet 2.6x.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from diffsqueeze.quant.export.kernels.kernel import Kernel, part_formats
from diffsqueeze.quant.nn.packed import PackedMixin
from diffsqueeze.quant.primitives.formats import int_code_range, parse_format
from diffsqueeze.quant.primitives.pack import unpack_codes

KERNEL_NAME = "oneDNN int8 W8A8 (fp32 out)"


def onednn_int8_available() -> bool:
    """Whether this torch build has oneDNN's int8 conv/linear ops (x86 CPUs)."""
    ops = torch.ops.onednn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("qconv_prepack", "qconv2d_pointwise", "qlinear_prepack", "qlinear_pointwise"))


def w8a8_int_problem(m: nn.Module) -> str | None:
    """Why a packed layer cannot run :data:`KERNEL_NAME` (``None``: it can)."""
    if not isinstance(m, PackedMixin) or not isinstance(m, (nn.Linear, nn.Conv2d)):
        return "not a packed INT layer"
    parts, formats = m.packed_spec.get("parts") or [], part_formats(m)
    if not parts:
        return "no weight parts"
    if getattr(m, "lowrank_rank", 0):
        return "low-rank branch: no fused int8 kernel for the 16-bit branch"
    if getattr(m, "smooth", None) is not None:
        return "smoothing scale: not folded into the int8 kernel's input quantization"
    asymmetric = False
    for part, fmt in zip(parts, formats):
        if fmt.kind != "int" or fmt.bits != 8:
            return f"weights {part['format']}: the int8 kernel takes 8-bit INT weights"
        if part["n_groups"] != 1:
            return "group-wise weight scales: the int8 kernel takes one scale per output channel"
        asymmetric |= not fmt.symmetric
    if not m.quant_acts or not m.act_quantizers():
        return "weight-only (activations in float): W8A8 kernel needs 8-bit activations"
    for aq in m.act_quantizers():
        if aq.fmt.kind != "int" or aq.fmt.bits != 8:
            return f"activations {aq.fmt.name}: the int8 kernel takes 8-bit INT activations"
        if aq.dynamic_group:
            return "dynamic per-group activation scales: the int8 kernel takes one static scale per tensor"
        if tuple(aq.param_shape) != (1,):
            return "per-channel activation scales: the int8 kernel takes one activation scale per tensor"
    if getattr(m, "compute_dtype", torch.float32) != torch.float32:
        return "half-precision pipeline: the CPU int8 kernel is used from float32"
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return f"conv padding {m.padding!r} / {m.padding_mode}: the int8 kernel takes explicit zero padding"
        if m.groups != 1 and (asymmetric or len(parts) > 1):
            return "grouped conv with asymmetric or split weights"
    if not onednn_int8_available():
        return "this torch build has no oneDNN int8 ops"
    if not onednn_int8_exact():
        return ("oneDNN's int8 kernels on this CPU saturate 16-bit pair sums (AVX2 without VNNI: "
                "uint8 x int8 products added in pairs in int16): results would differ from the model")
    return None


@functools.cache
def onednn_int8_exact() -> bool:
    """Whether oneDNN's int8 linear and conv add ``255 x 127`` products exactly on this CPU.

    Without VNNI some x86 CPUs compute uint8 x int8 dot products with ``vpmaddubsw``, which adds
    two products in a saturating int16 (255 x 127 x 2 = 64770 > 32767). Measured on an AMD EPYC
    with AVX2 only: 64 such products summed to 1,048,544 instead of 2,072,640. Other AVX2 CPUs
    without VNNI computed them exactly, so this is probed once per process, not assumed.
    """
    k, n = 64, 8
    exact = k * 255 * 127
    scale, zero = torch.ones(n, dtype=torch.float32), torch.zeros(n, dtype=torch.int32)
    x = torch.full((1, k), 255, dtype=torch.uint8)
    w = torch.full((n, k), 127, dtype=torch.int8)
    lin = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, torch.ops.onednn.qlinear_prepack(w, None), scale, zero,
                                             None, 1.0, 0, torch.float32, "none", [], "")
    xc = x.reshape(1, k, 1, 1).contiguous(memory_format=torch.channels_last)
    packed = torch.ops.onednn.qconv_prepack(w.reshape(n, k, 1, 1), scale, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
    conv = torch.ops.onednn.qconv2d_pointwise(xc, 1.0, 0, packed, scale, zero, None, [1, 1], [0, 0], [1, 1], 1,
                                              1.0, 0, torch.float32, "none", [], "")
    return bool((lin == exact).all()) and bool((conv == exact).all())


class _Int8Part:
    """One weight part (the whole weight, or one side of a shortcut split) and its activation
    quantizer: int8 weight codes, per-channel weight scales, the zero-point correction."""

    def __init__(self, m: PackedMixin, i: int, act_quant):
        part = m.packed_spec["parts"][i]
        fmt = parse_format(part["format"])
        shape = tuple(part["shape"])
        lo, _ = int_code_range(8, fmt.symmetric)
        codes = unpack_codes(getattr(m, f"qweight{i}"), part["numel"], 8).reshape(shape).to(torch.int32) + lo
        if fmt.symmetric:
            self.w8 = codes.to(torch.int8)
            w_zero = torch.zeros(shape[0])
        else:  # uint8 codes with zero points -> int8 codes, zero points shifted alike
            self.w8 = (codes - 128).to(torch.int8)
            w_zero = getattr(m, f"wzero{i}").reshape(-1).to(torch.float32) - 128
        self.in_channels, self.out_channels = shape[1], shape[0]
        self.w_scale = getattr(m, f"wscale{i}").reshape(-1).to(torch.float32).contiguous()
        correction = self.w_scale * w_zero
        self.correction = correction if bool(correction.ne(0).any()) else None
        if self.correction is not None:
            # one more output channel of all-ones weights (scale 1): the kernel itself computes
            # the window sums of the dequantized input that the zero-point correction needs
            self.w8 = torch.cat([self.w8, torch.ones(1, *shape[1:], dtype=torch.int8)])
            self.w_scale = torch.cat([self.w_scale, torch.ones(1)])
        self.w_zero_ids = torch.zeros(len(self.w_scale), dtype=torch.long)  # the kernel's (symmetric) zero points
        self.act_quant = act_quant
        shift = 128 if act_quant.fmt.symmetric else 0  # symmetric int8 codes -> uint8 with zero point 128
        scales = act_quant.scale.detach().reshape(act_quant.groups)
        zeros = act_quant.zero_point.reshape(act_quant.groups)
        self.qparams = [(float(scales[g]), int(zeros[g]) + shift) for g in range(act_quant.groups)]

    def quantize(self, x: Tensor) -> tuple[Tensor, float, int]:
        """uint8 codes of ``x`` with the current timestep group's scale (as the simulated layer)."""
        s, z = self.qparams[self.act_quant.current_group()]
        q = torch.div(x.to(torch.float32), s)
        q.round_().add_(z).clamp_(0, 255)
        return q.to(torch.uint8), s, z


class OneDNNW8A8(nn.Module):
    """A W8A8 INT layer on oneDNN: one int8 kernel per weight part, outputs summed (a shortcut
    split layer quantizes the two input-channel ranges with their own scales)."""

    def __init__(self, m: PackedMixin):
        super().__init__()
        self.act_quants = nn.ModuleList(m.act_quantizers())  # they keep their routing to the timestep
        self.parts = [_Int8Part(m, i, aq) for i, aq in enumerate(m.act_quantizers())]
        bias = None if m.bias is None else m.bias.detach().to(torch.float32)
        for k, p in enumerate(self.parts):  # the bias goes into the first part's kernel
            b = bias if k == 0 else None
            p.bias = torch.cat([b, torch.zeros(1)]) if b is not None and p.correction is not None else b
        self.sizes = [p.in_channels for p in self.parts]

    def _part_inputs(self, x: Tensor, dim: int) -> list[Tensor]:
        return [x] if len(self.parts) == 1 else list(x.split(self.sizes, dim=dim))


class OneDNNW8A8Conv2d(OneDNNW8A8):
    """W8A8 INT ``Conv2d`` on oneDNN (see the module docstring)."""

    def __init__(self, m: PackedMixin):
        super().__init__(m)
        self.stride, self.padding, self.dilation = list(m.stride), list(m.padding), list(m.dilation)
        self.groups, self.kernel_size = m.groups, tuple(m.kernel_size)
        for p in self.parts:
            s, z = p.qparams[0]
            p.packed = torch.ops.onednn.qconv_prepack(p.w8, p.w_scale, s, z, self.stride, self.padding,
                                                      self.dilation, self.groups, None)

    def forward(self, x: Tensor) -> Tensor:
        y = None
        for k, (p, xp) in enumerate(zip(self.parts, self._part_inputs(x, 1), strict=True)):
            qx, s, z = p.quantize(xp)
            out = torch.ops.onednn.qconv2d_pointwise(qx, s, z, p.packed, p.w_scale, p.w_zero_ids, p.bias,
                                                     self.stride, self.padding, self.dilation, self.groups, 1.0, 0,
                                                     torch.float32, "none", [], "")
            if p.correction is not None:  # - s_w z_w * (window sums of the dequantized input): the ones channel
                n = p.out_channels
                out = torch.addcmul(out[:, :n], p.correction.reshape(1, -1, 1, 1), out[:, n:], value=-1)
            y = out if y is None else y + out
        return y.to(x.dtype)


class OneDNNW8A8Linear(OneDNNW8A8):
    """W8A8 INT ``Linear`` on oneDNN (see the module docstring)."""

    def __init__(self, m: PackedMixin):
        super().__init__(m)
        self.in_features, self.out_features = m.in_features, m.out_features
        for p in self.parts:
            p.packed = torch.ops.onednn.qlinear_prepack(p.w8, None)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = None
        for k, (p, xp) in enumerate(zip(self.parts, self._part_inputs(x.reshape(-1, self.in_features), -1),
                                        strict=True)):
            qx, s, z = p.quantize(xp)
            out = torch.ops.onednn.qlinear_pointwise(qx, s, z, p.packed, p.w_scale, p.w_zero_ids, p.bias,
                                                     1.0, 0, torch.float32, "none", [], "")
            if p.correction is not None:
                n = p.out_channels
                out = torch.addcmul(out[:, :n], p.correction, out[:, n:], value=-1)
            y = out if y is None else y + out
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def onednn_w8a8(m: PackedMixin) -> nn.Module:
    """The real-kernel module of an eligible packed layer (:func:`w8a8_int_problem` is ``None``)."""
    return OneDNNW8A8Conv2d(m) if isinstance(m, nn.Conv2d) else OneDNNW8A8Linear(m)


KERNEL = Kernel(
    name=KERNEL_NAME,
    considers=lambda m, mask: isinstance(m, PackedMixin) and isinstance(m, (nn.Linear, nn.Conv2d)) and m.quant_acts,
    problem=lambda m, device, mask: "CPU only" if device.type != "cpu" else w8a8_int_problem(m),
    build=lambda m, device: onednn_w8a8(m),
)
