"""diffsqueeze: compress diffusion models from one YAML recipe and measure what it cost."""

__version__ = "0.1.0"


def load(path: str, device: str = "cpu", dtype: str = "float32"):
    """Load a runnable diffusers pipeline: a run directory, its ``model/``, a diffusers folder,
    ``builtin:NAME`` or a hub id (same as :func:`diffsqueeze.models.load_pipeline`)."""
    from diffsqueeze.models import load_pipeline

    return load_pipeline(path, device=device, dtype=dtype)
