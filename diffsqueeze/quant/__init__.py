"""diffsqueeze.quant: number formats, quantizers, quantized modules and the ``ptq`` stage.

``prepare_pipeline(pipe)`` attaches timestep routing to a reloaded pipeline whose activation
quantizers are timestep-aware (see docs/quantization.md). Imported lazily: ``formats`` and
``search`` stay importable without diffusers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prepare_pipeline"]


def __getattr__(name: str) -> Any:
    if name == "prepare_pipeline":
        from diffsqueeze.quant.ptq import prepare_pipeline

        return prepare_pipeline
    raise AttributeError(f"module 'diffsqueeze.quant' has no attribute {name!r}")
