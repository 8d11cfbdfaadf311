"""Prompt sets: ``builtin`` or a text file with one prompt per line.

A prompt file is read whole, and every prompt is tokenized by each pipeline call that uses it, so
its size is bounded before it is read (:data:`MAX_PROMPT_FILE_BYTES`, :data:`MAX_PROMPT_CHARS`):
a 10 MB line once cost 95 s and 7.3 GB of memory to give the text encoder its 77 tokens.
"""

from __future__ import annotations

from pathlib import Path

from diffsqueeze.errors import DiffsqueezeError

#: Largest prompt file read. 16 MiB holds 250,000 prompts of 64 characters; COCO-30k, the largest
#: caption set FID is commonly reported on, is about 2 MB. Checked before the file is read.
MAX_PROMPT_FILE_BYTES = 16 * 2**20
#: Longest prompt line, in characters. No text encoder a diffusers pipeline uses reads more than
#: 512 tokens (T5 in Flux; CLIP reads 77), about 2,000 characters of English: twice that leaves
#: room for scripts that tokenize denser, while a runaway line (a file without newlines, a pasted
#: document) is refused instead of being tokenized whole by every pipeline call.
MAX_PROMPT_CHARS = 4096

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
        DiffsqueezeError: unknown set, missing file, a file without any prompt, a file over
            :data:`MAX_PROMPT_FILE_BYTES` (before it is read) or a line over :data:`MAX_PROMPT_CHARS`.
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
    size = path.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise DiffsqueezeError(f"prompt file '{spec}' is {size:,} bytes, over the limit of {MAX_PROMPT_FILE_BYTES:,} "
                               f"bytes ({MAX_PROMPT_FILE_BYTES // 2**20} MiB); give a smaller prompt set")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DiffsqueezeError(f"prompt file '{spec}' cannot be read ({type(exc).__name__}: {exc})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        prompt = line.strip()
        if len(prompt) > MAX_PROMPT_CHARS:
            raise DiffsqueezeError(f"prompt file '{spec}' ({size:,} bytes): line {number} is {len(prompt):,} characters "
                                   f"long, over the limit of {MAX_PROMPT_CHARS:,} characters per prompt (no text "
                                   f"encoder reads more than 512 tokens)")
        if prompt:
            prompts.append(prompt)
    if not prompts:
        raise DiffsqueezeError(f"prompt file '{spec}' holds no prompt (one prompt per line expected)")
    return prompts
