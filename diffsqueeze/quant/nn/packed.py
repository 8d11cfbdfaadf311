"""Packed quantized layers: the weight stays as packed low-bit codes and is unpacked per forward.

``PackedQuantLinear`` / ``PackedQuantConv2d`` (INT or FP ExMy codes) and ``PackedBinaryLinear`` /
``PackedBinaryConv2d`` (BinaryDM sign bits) subclass the in-memory quantized layers of
:mod:`diffsqueeze.quant.nn.layers` / :mod:`diffsqueeze.quant.nn.binary_layers` and keep their input
(activation) quantizers and ``bias`` unchanged; only the float ``weight`` parameter and the
weight quantizers are replaced by buffers holding codes and scales. ``quantized_weight()``
decodes the weight for one forward (it is freed afterwards), computed with the same float
operations as the fake quantizer, so the packed layer's output is bit-identical to the
in-memory layer's (:func:`diffsqueeze.quant.export.save.pack_layer` checks this for every layer).

Buffers (``i`` = weight part: 0, and 1 for layers with shortcut splitting):

* INT: ``qweight{i}`` packed unsigned codes ``q - qmin``; ``wscale{i}`` ``(out, groups, 1)``;
  ``wzero{i}`` (asymmetric) zero point as ``uint8``.
* FP: ``qweight{i}`` packed ``sign|exponent|mantissa`` codes on the standard-bias grid (or, for
  the hardware FP8 formats, a ``torch.float8_*`` tensor shaped like the weight part);
  ``wscale{i}`` = ``bias_to_scale(bias)``, the searched real bias folded into a scale.
* Block-scaled (NVFP4, MXFP4, MXFP8): ``qweight{i}`` the packed element codes of the rows
  zero-padded to whole blocks; ``wscale{i}`` one byte per block (E8M0 or E4M3 bits);
  ``wscale_t{i}`` NVFP4's FP32 tensor scale.
* Binary: ``codes1`` (and ``codes2`` for order 2) one bit per weight; ``a1`` (``a2``); ``keep``
  one bit per weight where the layer was pruned (0 is no binary code).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from diffsqueeze.quant.nn.binary_layers import BinaryConv2d, BinaryLinear
from diffsqueeze.quant.nn.layers import QuantConv2d, QuantLinear
from diffsqueeze.quant.primitives.block_formats import BLOCK_FORMATS, block_dequantize, unpack_block_codes
from diffsqueeze.quant.primitives.formats import (
    FPFormat,
    fp_decode,
    int_code_range,
    int_dequantize,
    parse_format,
)
from diffsqueeze.quant.primitives.pack import packed_nbytes, unpack_codes

__all__ = ["PackedMixin", "PackedQuantLinear", "PackedQuantConv2d", "PackedBinaryLinear", "PackedBinaryConv2d",
           "PACKED_CLASSES", "packed_class_for", "empty_packed_like", "part_buffers"]

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _fp8_dtype(fmt: FPFormat) -> torch.dtype | None:
    return fmt.torch_dtype if isinstance(fmt, FPFormat) else None


def part_buffers(part: dict, out: int, device: Any = "meta") -> dict[str, Tensor]:
    """Empty buffers (names without the part index) that a weight part of this spec holds."""
    if part["storage"] == "block":
        fmt = BLOCK_FORMATS[part["format"]]
        n = out * part["padded_row"]
        bufs = {"qweight": torch.empty(packed_nbytes(n, fmt.bits), dtype=torch.uint8, device=device),
                "wscale": torch.empty(n // fmt.block, dtype=torch.uint8, device=device)}
        if fmt.scale == "e4m3+fp32":
            bufs["wscale_t"] = torch.empty((), dtype=torch.float32, device=device)
        return bufs
    fmt = parse_format(part["format"])
    rows = (out, part["numel"] // out)
    sdt = FLOAT_DTYPES[part["scale_dtype"]]
    ng = part["n_groups"]
    bufs: dict[str, Tensor] = {}
    if part["storage"] == "float8":
        bufs["qweight"] = torch.empty(tuple(part["shape"]), dtype=_fp8_dtype(fmt), device=device)
    else:
        bufs["qweight"] = torch.empty(packed_nbytes(math.prod(rows), fmt.bits), dtype=torch.uint8, device=device)
    bufs["wscale"] = torch.empty(out, ng, 1, dtype=sdt, device=device)
    if fmt.kind == "int" and not fmt.symmetric:
        bufs["wzero"] = torch.empty(out, ng, 1, dtype=torch.uint8, device=device)
    return bufs


class PackedMixin:
    """Decode-on-forward replacement of the float weight (see the module docstring)."""

    packed_spec: dict[str, Any]
    decoded_once: bool = False

    @property
    def weight(self) -> Tensor:  # noqa: D401 - diffusers and describe.py read ``layer.weight``
        """The decoded (on-grid) weight; computed on every access unless :meth:`decode_once`."""
        return self.quantized_weight()

    def decode_once(self) -> None:
        """Decode the weight now and keep it dense: later forwards skip the decode (speed of the
        float layer, memory of the float weight; the packed codes stay, for ``inspect`` and
        saving)."""
        self._dense_weight = None
        self._dense_weight = self.quantized_weight().detach()
        self.decoded_once = True

    def quantized_weight(self) -> Tensor:
        dense = self.__dict__.get("_dense_weight")
        if dense is not None:
            return dense
        spec = self.packed_spec
        parts = [self._decode_part(i, p) for i, p in enumerate(spec["parts"])]
        w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self._to_compute(w)

    def _to_compute(self, w: Tensor) -> Tensor:
        """The decoded weight in the pipeline's compute dtype (float32 unless loaded in half precision)."""
        dt = getattr(self, "compute_dtype", torch.float32)
        return w if w.dtype == dt else w.to(dt)

    def _decode_part(self, i: int, part: dict) -> Tensor:
        shape = tuple(part["shape"])
        if part["storage"] == "block":
            fmt = BLOCK_FORMATS[part["format"]]
            stored = {"elements": getattr(self, f"qweight{i}"), "scales": getattr(self, f"wscale{i}")}
            if fmt.scale == "e4m3+fp32":
                stored["tensor_scale"] = getattr(self, f"wscale_t{i}")
            rows = (shape[0], part["padded_row"])
            w = block_dequantize(unpack_block_codes(stored, fmt, rows), fmt, torch.float32)
            return w[:, : part["numel"] // shape[0]].reshape(shape)
        fmt = parse_format(part["format"])
        out = shape[0]
        q = getattr(self, f"qweight{i}")
        scale = getattr(self, f"wscale{i}").to(torch.float32)
        ng = part["n_groups"]
        if part["storage"] == "float8":
            vals = q.to(torch.float32).reshape(out, ng, -1)
            return (vals * scale).reshape(shape)
        codes = unpack_codes(q, part["numel"], fmt.bits).reshape(out, ng, -1)
        if fmt.kind == "int":
            lo, _ = int_code_range(fmt.bits, fmt.symmetric)
            qf = codes.to(torch.float32) + lo
            zero = getattr(self, f"wzero{i}").to(torch.float32) if not fmt.symmetric else None
            return int_dequantize(qf, scale, zero).reshape(shape)
        return (fp_decode(codes, fmt, None, torch.float32) * scale).reshape(shape)

    def packed_nbytes(self) -> int:
        """Bytes of the packed weight state (codes, scales, masks, the float16 low-rank branch) of this layer."""
        branch = sum(2 * p.numel() for n, p in self._parameters.items() if p is not None and n.startswith("lowrank_"))
        return branch + sum(b.numel() * b.element_size() for n, b in self._buffers.items()
                            if b is not None and n.startswith(("qweight", "wscale", "wzero", "codes", "keep", "a1", "a2")))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed={self.packed_spec.get('summary', '')}"


class PackedBinaryMixin(PackedMixin):
    """Multi-basis binary weight from sign bits: ``a1 b1 (+ a2 b2)``, 0 where pruned (METHODS §7)."""

    def quantized_weight(self) -> Tensor:
        spec = self.packed_spec
        shape = tuple(spec["weight_shape"])
        out = shape[0]
        n = math.prod(shape)
        keep = None
        if spec.get("masked"):
            keep = unpack_codes(self.keep, n, 1).reshape(out, -1).to(torch.float32)
        b1 = torch.where(unpack_codes(self.codes1, n, 1).reshape(out, -1) > 0, 1.0, -1.0)
        if keep is not None:
            b1 = b1 * keep
        w = b1 * self.a1.to(torch.float32).reshape(-1, 1)
        if spec["order"] == 2:
            b2 = torch.where(unpack_codes(self.codes2, n, 1).reshape(out, -1) > 0, 1.0, -1.0)
            if keep is not None:
                b2 = b2 * keep
            w = w + b2 * self.a2.to(torch.float32).reshape(-1, 1)
        return self._to_compute(w.reshape(shape) + 0.0)  # the in-memory binarizer adds a +0 STE term: same signed zeros

    @property
    def order(self) -> int:
        return int(self.packed_spec["order"])

    def binary_weight(self) -> Tensor:
        with torch.no_grad():
            return self.quantized_weight()


class PackedQuantLinear(PackedMixin, QuantLinear):
    """``QuantLinear`` whose weight is packed INT/FP codes."""


class PackedQuantConv2d(PackedMixin, QuantConv2d):
    """``QuantConv2d`` whose weight is packed INT/FP codes."""


class PackedBinaryLinear(PackedBinaryMixin, BinaryLinear):
    """``BinaryLinear`` whose weight is packed sign bits."""


class PackedBinaryConv2d(PackedBinaryMixin, BinaryConv2d):
    """``BinaryConv2d`` whose weight is packed sign bits."""


PACKED_CLASSES: dict[str, type] = {
    "QuantLinear": PackedQuantLinear,
    "QuantConv2d": PackedQuantConv2d,
    "BinaryLinear": PackedBinaryLinear,
    "BinaryConv2d": PackedBinaryConv2d,
}


def packed_class_for(kind: str) -> type:
    """The packed class of an in-memory module kind (``QuantLinear`` -> ``PackedQuantLinear``)."""
    if kind not in PACKED_CLASSES:
        raise KeyError(f"no packed form of module kind {kind!r}; known: {', '.join(PACKED_CLASSES)}")
    return PACKED_CLASSES[kind]


def shell_from(layer: nn.Module, kind: str, spec: dict) -> nn.Module:
    """A packed module sharing ``layer``'s bias and activation quantizers, without weight buffers yet."""
    cls = packed_class_for(kind)
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    new._parameters = {k: v for k, v in layer._parameters.items() if k != "weight"}
    new._buffers = dict(layer._buffers)
    new._modules = {k: v for k, v in layer._modules.items() if k not in ("weight_quant", "weight_quant_2")}
    new.packed_spec = spec
    return new


def empty_packed_like(layer: nn.Module, kind: str, spec: dict, device: Any = "meta") -> nn.Module:
    """A packed module with empty code/scale buffers shaped by ``spec`` (filled by ``load_state_dict``)."""
    new = shell_from(layer, kind, spec)
    shape = tuple(spec["weight_shape"])
    if kind.startswith("Binary"):
        n = math.prod(shape)
        sdt = FLOAT_DTYPES[spec["scale_dtype"]]
        new.register_buffer("codes1", torch.empty(packed_nbytes(n, 1), dtype=torch.uint8, device=device))
        if spec["order"] == 2:
            new.register_buffer("codes2", torch.empty(packed_nbytes(n, 1), dtype=torch.uint8, device=device))
        if spec.get("masked"):
            new.register_buffer("keep", torch.empty(packed_nbytes(n, 1), dtype=torch.uint8, device=device))
        new.register_buffer("a1", torch.empty(shape[0], 1, dtype=sdt, device=device))
        if spec["order"] == 2:
            new.register_buffer("a2", torch.empty(shape[0], 1, dtype=sdt, device=device))
        return new
    for i, part in enumerate(spec["parts"]):
        for name, buf in part_buffers(part, shape[0], device).items():
            new.register_buffer(f"{name}{i}", buf)
    return new
