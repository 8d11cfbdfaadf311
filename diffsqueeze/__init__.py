"""diffsqueeze: compress diffusion models from one YAML recipe and measure what it cost."""

__version__ = "0.1.0"
