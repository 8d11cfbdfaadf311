"""Load any model diffsqueeze can read: builtin models, diffusers folders, hub ids, run
directories and the compressed artifacts diffsqueeze writes (packed or with module records).

The one entry point for loading: :mod:`diffsqueeze.models.io` does the work and this module
hands it every artifact format (:data:`diffsqueeze.quant.export.load.ARTIFACT_FORMATS`), so
the model layer never imports compression code.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import DiffusionPipeline

from diffsqueeze.errors import ModelLoadError
from diffsqueeze.models import io
from diffsqueeze.models.state import CompressionState
from diffsqueeze.quant.export.kernels import decode_weights_once, use_real_kernels
from diffsqueeze.quant.export.load import ARTIFACT_FORMATS


def plain_model_folder(spec: str) -> Path | None:
    """The local diffusers folder ``spec`` names (a run directory: its ``model/``) when it is a plain
    one, no compressed-artifact format claiming it; ``None`` for builtins, hub ids and artifacts."""
    if spec.startswith("builtin:"):
        return None
    folder = io.model_folder(spec)
    if folder is None:
        return None
    state = CompressionState.load(folder)
    return None if any(fmt.detect(folder, state) for fmt in ARTIFACT_FORMATS) else folder


def load_with_state(spec: str, device: str = "cpu", dtype: str = "float32",
                    shared: dict | None = None) -> tuple[DiffusionPipeline, CompressionState]:
    """A runnable pipeline and its compression state (masks, module records).

    Args:
        spec: ``builtin:NAME``, a diffusers folder, a run directory (its ``model/``), or a hub id.
        device: torch device string.
        dtype: ``float32`` | ``float16`` | ``bfloat16``.
        shared: components taken as given instead of read (see :func:`diffsqueeze.models.io.read_pipeline`).

    Raises:
        ModelLoadError: nothing loadable at ``spec`` or its files are damaged.
    """
    return io.read_pipeline(spec, device, dtype, formats=ARTIFACT_FORMATS, shared=shared)


KERNEL_MODES = ("simulated", "real")
DECODE_MODES = ("forward", "once")


def load_pipeline(spec: str, device: str = "cpu", dtype: str = "float32", kernels: str = "simulated",
                  decode: str = "forward") -> DiffusionPipeline:
    """A runnable pipeline (see :func:`load_with_state`).

    Args:
        kernels: ``simulated`` (every packed layer decodes its codes and computes in float: the
            reference, bit-identical to the run) or ``real`` (layers with a real low-bit kernel
            for their exact format use it: :mod:`diffsqueeze.quant.export.kernels`; ``inspect``
            lists which).
        decode: ``forward`` (packed layers computing in float decode their weight on every
            forward: low memory) or ``once`` (decoded once at load and kept dense: the float
            layer's speed and memory).

    Raises:
        ModelLoadError: nothing loadable at ``spec``; an unknown ``kernels``/``decode`` mode.
    """
    if kernels not in KERNEL_MODES or decode not in DECODE_MODES:
        raise ModelLoadError(f"kernels must be one of {', '.join(KERNEL_MODES)} and decode one of "
                             f"{', '.join(DECODE_MODES)}; got kernels={kernels!r}, decode={decode!r}")
    pipe, state = load_with_state(spec, device, dtype)
    if kernels == "real":
        use_real_kernels(pipe, state, device)
    if decode == "once":
        decode_weights_once(pipe)
    return pipe
