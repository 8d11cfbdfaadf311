"""What compression adds to a pipeline beyond its weights: pruning masks and the module map.

The state travels with the pipeline through the stages, into every checkpoint and into the
exported model (``diffsqueeze.json`` + ``masks.safetensors`` beside the diffusers folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


@dataclass
class CompressionState:
    """Masks and per-module records of a compressed pipeline.

    Attributes:
        masks: ``"<component>/<parameter name>"`` -> bool tensor, True where the weight is kept.
        modules: ``"<component>/<module name>"`` -> JSON-able record of how the module was
            changed (quantized module class and its config); later stages add to it.
        history: one summary per applied stage, in order.
    """

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def save(self, folder: Path) -> None:
        """Write ``diffsqueeze.json`` and (if any) ``masks.safetensors`` into ``folder``."""
        folder = Path(folder)
        meta = {"version": STATE_VERSION, "modules": self.modules, "history": without_run_costs(self.history),
                "masks": MASKS_FILE if self.masks else None}
        if self.masks:
            save_file({k: v.to(torch.bool).contiguous().cpu() for k, v in self.masks.items()}, str(folder / MASKS_FILE))
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
                masks = load_file(str(folder / meta["masks"]))
            except Exception as exc:  # safetensors raises several types for damaged files
                raise ModelLoadError(f"cannot read pruning masks {folder / meta['masks']}: {exc}") from exc
        return cls(masks=masks, modules=meta.get("modules", {}), history=meta.get("history", []))
