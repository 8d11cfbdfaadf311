"""Training through quantized layers without keeping a fake-quantized copy of every weight.

A quantized layer's forward computes its on-grid weight ``Q(W)`` as a new tensor and hands it to
``linear`` / ``conv2d``. When anything upstream needs gradients (QuEST trains every activation
scale, BinaryDM every latent weight), autograd saves that tensor for the input gradient, so a
forward + backward holds one more weight-sized tensor per layer: a second copy of the model
(measured at SD-1.5 size: the QuEST stage peaked at 4.2x the FP32 UNet on the CPU).

Inside :func:`recomputed_quantized_weights`, autograd's saved-tensor hooks swap each such saved
tensor for a note of which layer made it, and the backward pass asks the layer for ``Q(W)``
again. ``W`` and the quantizer do not change between a forward and its backward (the optimizer
steps after), so the recomputed tensor holds exactly the saved values: the gradients are
bit-identical, the cost is one weight quantization per layer per backward.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["recomputed_quantized_weights", "note_quantized_weight"]

_active: "_Recorder | None" = None


class _Saved:
    """What autograd keeps instead of a quantized weight: the layer and the view's geometry."""

    __slots__ = ("layer", "size", "stride", "offset")

    def __init__(self, layer, t: Tensor):
        self.layer, self.size, self.stride, self.offset = layer, t.shape, t.stride(), t.storage_offset()


class _Recorder:
    def __init__(self):
        # storage address -> (weak reference to the quantized weight, its layer): a saved tensor is
        # the weight itself or a view of it (``linear`` saves the transpose)
        self.made: dict[int, tuple[weakref.ref, object]] = {}

    def note(self, layer, w: Tensor) -> None:
        self.made[w.untyped_storage().data_ptr()] = (weakref.ref(w), layer)

    def pack(self, t: Tensor):
        if t.layout != torch.strided or t.device.type == "meta":
            return t
        entry = self.made.get(t.untyped_storage().data_ptr())
        if entry is None:
            return t
        made = entry[0]()  # alive while the op that saves it runs; a dead one is another tensor at a reused address
        if made is None or made.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            return t
        return _Saved(entry[1], t)

    @staticmethod
    def unpack(saved):
        if not isinstance(saved, _Saved):
            return saved
        with torch.no_grad():
            w = saved.layer.quantized_weight()
        return w.as_strided(saved.size, saved.stride, saved.offset)


def note_quantized_weight(layer, w: Tensor) -> None:
    """Called by a quantized layer with the on-grid weight it is about to use (a no-op outside
    :func:`recomputed_quantized_weights`, and for a weight that is the parameter itself)."""
    if _active is not None and w is not layer.weight:
        _active.note(layer, w)


@contextmanager
def recomputed_quantized_weights() -> Iterator[None]:
    """Forward passes inside recompute their quantized weights in the backward instead of saving them.

    Wrap the forward (the hooks are taken when autograd saves, at forward time); the backward
    may run after the block has exited.
    """
    global _active
    outer, _active = _active, _Recorder()
    recorder = _active
    try:
        with torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
            yield
    finally:
        _active = outer
