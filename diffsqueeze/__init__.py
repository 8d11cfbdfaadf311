"""diffsqueeze: compress diffusion models from one YAML recipe and measure what it cost."""

from diffsqueeze.version import __version__

__all__ = ["__version__", "load"]


def load(path: str, device: str = "cpu", dtype: str = "float32"):
    """Load a runnable diffusers pipeline: a run directory, its ``model/``, a diffusers folder,
    ``builtin:NAME`` or a hub id (same as :func:`diffsqueeze.loading.load_pipeline`)."""
    from diffsqueeze.loading import load_pipeline

    return load_pipeline(path, device=device, dtype=dtype)
