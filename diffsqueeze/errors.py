"""The one exception hierarchy: every error diffsqueeze raises for bad input or damaged files derives
from :class:`DiffsqueezeError`, which the CLI prints as one line without a traceback. Errors that
mean a missing file also derive from ``FileNotFoundError``."""


class DiffsqueezeError(Exception):
    """Base class: a problem with the user's input or files, reported as one clear message."""


class RecipeError(DiffsqueezeError):
    """A recipe key is unknown, mistyped, out of range or inconsistent.

    Attributes:
        path: Dotted key path inside the recipe (``stages[0].prune.targets.unet``).
    """

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class ModelLoadError(DiffsqueezeError):
    """A model spec names nothing loadable (unknown builtin, missing folder, corrupt file)."""


class RunDirError(DiffsqueezeError):
    """The output directory holds a different run, or a run cannot be resumed."""


def one_line(text: str) -> str:
    """Whitespace (newlines included) collapsed: an error message is one line."""
    return " ".join(text.split())
