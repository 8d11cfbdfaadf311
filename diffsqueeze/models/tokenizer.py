"""An offline CLIP tokenizer with a byte-level character vocabulary, for the tiny builtin models.

CLIP's tokenizer is byte-level BPE. With every byte symbol in the vocabulary (plain and with the
end-of-word suffix) and no merges, each word splits into characters: the real CLIPTokenizer code
path, a vocabulary of 514 entries and no file to download.
"""

from __future__ import annotations

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The 256 printable symbols that byte-level BPE maps the bytes 0..255 to (GPT-2 / CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def char_vocab() -> dict[str, int]:
    """Vocabulary: specials, then each byte symbol plain and as a word end (``x</w>``)."""
    symbols = _byte_symbols()
    tokens = [BOS, EOS] + symbols + [s + "</w>" for s in symbols]
    return {tok: i for i, tok in enumerate(tokens)}


def build_char_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer over :func:`char_vocab`; ``len(tokenizer)`` is 514."""
    return CLIPTokenizer(vocab=char_vocab(), merges=[], model_max_length=model_max_length)
