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
from diffsqueeze.quant.primitives.formats import parse_format
from diffsqueeze.quant.primitives.number_format import FLOAT_DTYPES
from diffsqueeze.quant.primitives.binary import binary_bases
from diffsqueeze.quant.primitives.pack import pack_bool, packed_nbytes, unpack_codes

__all__ = ["PackedWeightMixin", "PackedMixin", "PackedQuantLinear", "PackedQuantConv2d", "PackedBinaryLinear", "PackedBinaryConv2d",
           "empty_packed_like", "part_buffers", "shell_from"]

PART_TENSORS = ("qweight", "wscale", "wzero", "wscale_t")
"""Names (without the part index) a format's :meth:`~NumberFormat.encode` may give a weight part's tensors."""


def part_buffers(part: dict, out: int, device: Any = "meta") -> dict[str, Tensor]:
    """Empty buffers (names without the part index) that a weight part of this spec holds."""
    return parse_format(part["format"]).empty_buffers(part, out, device)


class PackedWeightMixin:
    """Decode-on-forward replacement of the float weight (see the module docstring); each packed
    kind below says how it stores (:meth:`encode`), allocates (:meth:`empty_buffers`) and decodes
    (:meth:`decode`) its weight, and what a saved entry of it must hold (:meth:`check_entry`)."""

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
        dt = getattr(self, "compute_dtype", torch.float32)  # float32 unless loaded in half precision
        w = self.decode()
        return w if w.dtype == dt else w.to(dt)

    def decode(self) -> Tensor:
        """The float32 weight from the stored tensors."""
        raise NotImplementedError

    @classmethod
    def encode(cls, layer: nn.Module, w_hat: Tensor, scale_dtype: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The stored tensors of in-memory ``layer``'s weight (``w_hat``: its on-grid weight) and the
        entry fields that describe them."""
        raise NotImplementedError

    @classmethod
    def empty_buffers(cls, spec: dict[str, Any], device: Any) -> dict[str, Tensor]:
        """Empty tensors shaped as :meth:`encode` wrote them (filled by ``load_state_dict``)."""
        raise NotImplementedError

    @classmethod
    def check_entry(cls, entry: dict[str, Any]) -> str | None:
        """Why a saved entry cannot describe this packed kind (``None``: it can)."""
        return None

    def check_stored(self) -> str | None:
        """Why the loaded tensors do not fit the entry (``None``: they do)."""
        return None

    def packed_nbytes(self) -> int:
        """Bytes of the packed weight state (codes, scales, masks, the float16 low-rank branch) of this layer."""
        branch = sum(2 * p.numel() for n, p in self._parameters.items() if p is not None and n.startswith("lowrank_"))
        return branch + sum(b.numel() * b.element_size() for n, b in self._buffers.items()
                            if b is not None and n.startswith(("qweight", "wscale", "wzero", "codes", "keep", "a1", "a2")))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed={self.packed_spec.get('summary', '')}"


class PackedMixin(PackedWeightMixin):
    """INT/FP/block codes and scales per weight part, as each part's number format stores them."""

    def _part_formats(self) -> list:
        formats = self.__dict__.get("_formats")
        if formats is None:  # looked up once, not on every forward
            formats = self.__dict__["_formats"] = [parse_format(p["format"]) for p in self.packed_spec["parts"]]
        return formats

    def _part_tensors(self, i: int) -> dict[str, Tensor]:
        return {name: self._buffers[f"{name}{i}"] for name in PART_TENSORS if f"{name}{i}" in self._buffers}

    def decode(self) -> Tensor:
        parts = [fmt.decode(self._part_tensors(i), part)
                 for i, (fmt, part) in enumerate(zip(self._part_formats(), self.packed_spec["parts"]))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @classmethod
    def encode(cls, layer: nn.Module, w_hat: Tensor, scale_dtype: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        parts, tensors = [], {}
        for i, (q, sl) in enumerate(layer.weight_parts()):
            part_w = w_hat[:, sl]
            g = q.grouped(part_w)
            spec = {"format": q.fmt.name, "kind": q.fmt.kind, "bits": q.fmt.bits, "shape": list(part_w.shape),
                    "numel": part_w.numel(), "group_size": q.group_size, "n_groups": g.shape[1],
                    "scale_dtype": scale_dtype}
            fields, part_tensors = q.fmt.encode(g, q.params, scale_dtype, tuple(part_w.shape))
            parts.append({**spec, **fields})
            tensors.update({f"{k}{i}": v for k, v in part_tensors.items()})
        entry = {"parts": parts, "mask": "zero_codes", "storage": "packed", "summary": "+".join(p["format"] for p in parts)}
        return entry, tensors

    @classmethod
    def empty_buffers(cls, spec: dict[str, Any], device: Any) -> dict[str, Tensor]:
        out = spec["weight_shape"][0]
        return {f"{name}{i}": buf for i, part in enumerate(spec["parts"])
                for name, buf in part_buffers(part, out, device).items()}

    @classmethod
    def check_entry(cls, entry: dict[str, Any]) -> str | None:
        for part in entry.get("parts") or [None]:
            if not isinstance(part, dict):
                return "has no weight parts"
            try:
                fmt = parse_format(part["format"])
            except (ValueError, KeyError) as exc:
                return f"unknown format {part.get('format')!r} ({exc})"
            problem = fmt.check_part(part)
            if problem:
                return problem
        return None

    def check_stored(self) -> str | None:
        for i, (fmt, part) in enumerate(zip(self._part_formats(), self.packed_spec["parts"])):
            problem = fmt.check_stored(self._part_tensors(i), part)
            if problem:
                return problem
        return None


class PackedBinaryMixin(PackedWeightMixin):
    """Multi-basis binary weight from sign bits: ``a1 b1 (+ a2 b2)``, 0 where pruned (docs/methods.md §7)."""

    def decode(self) -> Tensor:
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
        return w.reshape(shape) + 0.0  # the in-memory binarizer adds a +0 STE term: same signed zeros

    @classmethod
    def encode(cls, layer: nn.Module, w_hat: Tensor, scale_dtype: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        wq = layer.weight_quant
        w = layer.weight.detach()
        mask = wq.mask_of(w)
        b1, b2 = binary_bases(w, wq.a1.detach().to(w.dtype), wq.order, mask)
        sdt = FLOAT_DTYPES[scale_dtype]
        tensors = {"codes1": pack_bool(b1 > 0), "a1": wq.a1.detach().to(sdt).contiguous()}
        if wq.order == 2:
            tensors["codes2"] = pack_bool(b2 > 0)
            tensors["a2"] = wq.a2.detach().to(sdt).contiguous()
        if mask is not None:
            tensors["keep"] = pack_bool(mask)
        entry = {"order": wq.order, "masked": mask is not None, "bits": 1, "format": f"binary_order{wq.order}",
                 "storage": "packed1", "scale_dtype": scale_dtype, "summary": f"binary order {wq.order}"}
        return entry, tensors

    @classmethod
    def empty_buffers(cls, spec: dict[str, Any], device: Any) -> dict[str, Tensor]:
        shape = tuple(spec["weight_shape"])
        bits = torch.empty(packed_nbytes(math.prod(shape), 1), dtype=torch.uint8, device=device)
        bufs = {"codes1": bits}
        if spec["order"] == 2:
            bufs["codes2"] = torch.empty_like(bits)
        if spec.get("masked"):
            bufs["keep"] = torch.empty_like(bits)
        sdt = FLOAT_DTYPES[spec["scale_dtype"]]
        bufs["a1"] = torch.empty(shape[0], 1, dtype=sdt, device=device)
        if spec["order"] == 2:
            bufs["a2"] = torch.empty(shape[0], 1, dtype=sdt, device=device)
        return bufs

    @classmethod
    def check_entry(cls, entry: dict[str, Any]) -> str | None:
        if entry.get("order") not in (1, 2):
            return f"has binary order {entry.get('order')!r}; known: 1, 2"
        return None

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


def shell_from(layer: nn.Module, cls: type, spec: dict) -> nn.Module:
    """A packed module of class ``cls`` sharing ``layer``'s bias and activation quantizers, without
    weight buffers yet."""
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    new._parameters = {k: v for k, v in layer._parameters.items() if k != "weight"}
    new._buffers = dict(layer._buffers)
    new._modules = {k: v for k, v in layer._modules.items() if k not in ("weight_quant", "weight_quant_2")}
    new.packed_spec = spec
    return new


def empty_packed_like(layer: nn.Module, cls: type, spec: dict, device: Any = "meta") -> nn.Module:
    """A packed module of class ``cls`` with empty code/scale buffers shaped by ``spec`` (filled by
    ``load_state_dict``)."""
    new = shell_from(layer, cls, spec)
    for name, buf in cls.empty_buffers(spec, device).items():
        new.register_buffer(name, buf)
    return new
