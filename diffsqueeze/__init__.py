"""diffsqueeze: compress diffusion models from one YAML recipe and measure what it cost."""

# First: its per-message filters must precede the imports that print dependencies' notes, for the
# Python API (run_recipe, diffsqueeze.load) as for the command line. Each drops one known message.
import diffsqueeze.console  # noqa: F401
from diffsqueeze.version import __version__

__all__ = ["__version__", "load"]


def load(path: str, device: str = "cpu", dtype: str = "float32", kernels: str = "simulated", decode: str = "forward"):
    """Load a runnable diffusers pipeline: a run directory, its ``model/``, a diffusers folder,
    ``builtin:NAME`` or a hub id (same as :func:`diffsqueeze.loading.load_pipeline`).

    ``kernels="real"`` runs every layer that has a real low-bit kernel for its format on it
    (CPU: W8A8 INT on oneDNN); ``decode="once"`` keeps the other packed layers' weights
    decoded (speed of float, memory of float)."""
    from diffsqueeze.loading import load_pipeline

    return load_pipeline(path, device=device, dtype=dtype, kernels=kernels, decode=decode)
