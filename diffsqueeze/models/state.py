"""What compression adds to a pipeline beyond its weights: pruning masks and the module map.

The state travels with the pipeline through the stages, into every checkpoint and into the
exported model (``diffsqueeze.json`` + ``masks.safetensors`` beside the diffusers folder).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffsqueeze.bitmask import pack_bool, unpack_bool
from diffsqueeze.errors import ModelLoadError

STATE_FILE = "diffsqueeze.json"
MASKS_FILE = "masks.safetensors"
STATE_VERSION = 1
RUN_COST_KEYS = frozenset({"wall_time_s", "s_per_epoch", "epoch_times_s", "peak_memory_mb", "peak_rss_mb", "peak_cuda_mb"})
"""Summary fields that record what a stage cost (time, memory), not what it produced: kept in the
run's manifest, left out of ``diffsqueeze.json`` so that two identical runs write identical files."""


def without_run_costs(obj):
    """``obj`` (nested dicts and lists) without the :data:`RUN_COST_KEYS` fields."""
    if isinstance(obj, dict):
        return {k: without_run_costs(v) for k, v in obj.items() if k not in RUN_COST_KEYS}
    if isinstance(obj, list):
        return [without_run_costs(v) for v in obj]
    return obj


PACKED_MASKS = "diffsqueeze-packed-masks"


class MaskStore(MutableMapping):
    """``key -> bool keep-mask``, held at one bit per weight.

    Reading a key unpacks that mask (a fresh bool tensor); assigning packs it. Iterating over
    ``items()`` unpacks one mask at a time, so a pass over an SDXL UNet's masks never holds more
    than one of them unpacked (all of them as bool would be a quarter of its FP32 size).
    """

    def __init__(self, masks: dict | None = None):
        self._packed: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
        for key, mask in (masks or {}).items():
            self[key] = mask

    def __getitem__(self, key: str) -> torch.Tensor:
        packed, shape = self._packed[key]
        return unpack_bool(packed, shape)

    def __setitem__(self, key: str, mask: torch.Tensor) -> None:
        self._packed[key] = (pack_bool(mask.detach().cpu().bool()), tuple(mask.shape))

    def __delitem__(self, key: str) -> None:
        del self._packed[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def packed(self) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
        """``key -> (bits, shape)`` without unpacking."""
        return dict(self._packed)

    def set_packed(self, key: str, bits: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Store an already packed mask (as :meth:`packed` gives it, or as a file holds it)."""
        if bits.dtype != torch.uint8 or bits.numel() != -(-math.prod(shape) // 8):
            raise ValueError(f"mask '{key}': {bits.numel()} {bits.dtype} values do not hold a {tuple(shape)} mask")
        self._packed[key] = (bits, tuple(shape))


def _read_masks(path: Path) -> MaskStore:
    """Masks of ``masks.safetensors``: packed bits with their shapes in the metadata, or (files
    written before masks were packed) one bool tensor per key."""
    store = MaskStore()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        shapes = json.loads(meta["shapes"]) if meta.get("format") == PACKED_MASKS else None
        for key in f.keys():
            t = f.get_tensor(key)
            if shapes is None:
                store[key] = t
            else:
                store.set_packed(key, t, tuple(shapes[key]))
    return store


@dataclass
class CompressionState:
    """Masks and per-module records of a compressed pipeline.

    Attributes:
        masks: ``"<component>/<parameter name>"`` -> bool tensor, True where the weight is kept
            (a :class:`MaskStore`: held at one bit per weight).
        modules: ``"<component>/<module name>"`` -> JSON-able record of how the module was
            changed (quantized module class and its config); later stages add to it.
        history: one summary per applied stage, in order.
    """

    masks: MaskStore = field(default_factory=MaskStore)
    modules: dict[str, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.masks, MaskStore):
            self.masks = MaskStore(self.masks)

    def save(self, folder: Path) -> None:
        """Write ``diffsqueeze.json`` and (if any) ``masks.safetensors`` into ``folder``."""
        folder = Path(folder)
        meta = {"version": STATE_VERSION, "modules": self.modules, "history": without_run_costs(self.history),
                "masks": MASKS_FILE if self.masks else None}
        if self.masks:
            packed = self.masks.packed()
            save_file({k: bits for k, (bits, _) in packed.items()}, str(folder / MASKS_FILE),
                      metadata={"format": PACKED_MASKS, "shapes": json.dumps({k: list(s) for k, (_, s) in packed.items()})})
        (folder / STATE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> CompressionState:
        """Read the state written by :meth:`save`; a folder without one gives an empty state."""
        folder = Path(folder)
        path = folder / STATE_FILE
        if not path.exists():
            return cls()
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path} is not valid JSON ({exc}); the compressed model is damaged") from exc
        if meta.get("version") != STATE_VERSION:
            raise ModelLoadError(f"{path}: unsupported state version {meta.get('version')!r} (this diffsqueeze reads {STATE_VERSION})")
        masks = {}
        if meta.get("masks"):
            try:
                masks = _read_masks(folder / meta["masks"])
            except Exception as exc:  # safetensors raises several types for damaged files
                raise ModelLoadError(f"cannot read pruning masks {folder / meta['masks']}: {exc}") from exc
        return cls(masks=masks, modules=meta.get("modules", {}), history=meta.get("history", []))
