"""The package version (one place; the manifest and the package both read it)."""

__version__ = "0.1.0"
