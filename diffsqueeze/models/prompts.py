"""Prompt sets: ``builtin`` or a text file with one prompt per line."""

from __future__ import annotations

from pathlib import Path

from diffsqueeze.errors import DiffsqueezeError

# Short, generic prompts: the tiny random models ignore meaning; the trained builtin model
# registers its own class prompts under "builtin:fashion".
BUILTIN_PROMPTS: dict[str, list[str]] = {
    "builtin": [
        "a photo of a cat",
        "a red car on a street",
        "a bowl of fruit on a table",
        "a mountain lake at sunrise",
        "a portrait of an old man",
        "a city skyline at night",
        "a sneaker on a white background",
        "a watercolor painting of a bird",
    ],
    # The classes of the builtin Fashion-MNIST model, one canonical prompt each (data.class_prompt).
    "builtin:fashion": [
        "a photo of a t-shirt", "a photo of a trouser", "a photo of a pullover", "a photo of a dress",
        "a photo of a coat", "a photo of a sandal", "a photo of a shirt", "a photo of a sneaker",
        "a photo of a bag", "a photo of an ankle boot",
    ],
}


def register_prompt_set(name: str, prompts: list[str]) -> None:
    """Make ``name`` usable wherever a prompt set is given (``builtin:fashion`` and the like)."""
    BUILTIN_PROMPTS[name] = list(prompts)


def load_prompts(spec: str) -> list[str]:
    """Load a prompt set by name (``builtin``, ``builtin:NAME``) or from a text file.

    Raises:
        DiffsqueezeError: unknown set, missing file, or a file without any prompt.
    """
    if spec in BUILTIN_PROMPTS:
        return list(BUILTIN_PROMPTS[spec])
    known = ", ".join(sorted(BUILTIN_PROMPTS))
    if spec.startswith("builtin"):
        raise DiffsqueezeError(f"unknown prompt set '{spec}'; known: {known} (or a text file, one prompt per line)")
    path = Path(spec)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DiffsqueezeError(f"prompt file '{spec}' {what} (give a text file, one prompt per line, or a prompt set: {known})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DiffsqueezeError(f"prompt file '{spec}' cannot be read ({type(exc).__name__}: {exc})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DiffsqueezeError(f"prompt file '{spec}' holds no prompt (one prompt per line expected)")
    return prompts
