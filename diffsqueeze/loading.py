"""Load any model diffsqueeze can read: builtin models, diffusers folders, hub ids, run
directories and the compressed artifacts diffsqueeze writes (packed or with module records).

The one entry point for loading: :mod:`diffsqueeze.models.io` does the work and this module
hands it every artifact format (:data:`diffsqueeze.quant.export.load.ARTIFACT_FORMATS`), so
the model layer never imports compression code.
"""

from __future__ import annotations

from diffusers import DiffusionPipeline

from diffsqueeze.models import io
from diffsqueeze.models.state import CompressionState
from diffsqueeze.quant.export.load import ARTIFACT_FORMATS


def load_with_state(spec: str, device: str = "cpu", dtype: str = "float32") -> tuple[DiffusionPipeline, CompressionState]:
    """A runnable pipeline and its compression state (masks, module records).

    Args:
        spec: ``builtin:NAME``, a diffusers folder, a run directory (its ``model/``), or a hub id.
        device: torch device string.
        dtype: ``float32`` | ``float16`` | ``bfloat16``.

    Raises:
        ModelLoadError: nothing loadable at ``spec`` or its files are damaged.
    """
    return io.load_with_state(spec, device, dtype, formats=ARTIFACT_FORMATS)


def load_pipeline(spec: str, device: str = "cpu", dtype: str = "float32") -> DiffusionPipeline:
    """A runnable pipeline (see :func:`load_with_state`)."""
    return load_with_state(spec, device, dtype)[0]
