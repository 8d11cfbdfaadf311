"""A small CLIP-BPE-compatible vocabulary for the Fashion-MNIST captions.

The files (``tokenizer/vocab.json``, ``tokenizer/merges.txt``) follow the exact format of CLIP's
BPE tokenizer, so ``transformers.CLIPTokenizer`` loads them offline. The vocabulary keeps CLIP's
256 byte-level symbols (plain and end-of-word), so any text tokenizes, plus whole-word tokens for
the caption words: 600-odd entries instead of CLIP's 49,408, which keeps the text tower's
embedding table tiny (a real CLIP vocabulary would cost ~6M parameters at width 128, more than
the rest of the model together).
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_DIR = Path(__file__).with_name("tokenizer")
MAX_LENGTH = 16

#: Words that become single tokens (every caption word plus a few likely prompt words).
WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "and", "photo", "picture", "image", "black", "white", "small",
    "t", "-", "shirt", "shirts", "tshirt", "top", "trouser", "trousers", "pants", "pullover",
    "sweater", "dress", "coat", "jacket", "sandal", "sandals", "sneaker", "sneakers", "shoe",
    "bag", "handbag", "ankle", "boot", "boots", "photograph", "drawing", "fashion", "item",
    "clothing", "in", "on", "with", "background", "gray", "grey", "dark", "large",
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that assemble ``word + '</w>'`` into one symbol."""
    b2u = _bytes_to_unicode()
    symbols = [b2u[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    merges, left = [], symbols[0]
    for right in symbols[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def write_tokenizer_files(out_dir: Path = TOKENIZER_DIR) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs (deterministic)."""

    out_dir.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        for m in _word_merges(word):
            if m not in merges:
                merges.append(m)
    for _ in range(10):  # repair words whose greedy BPE path differs from the planned one
        tok = _write(out_dir, vocab_list, merges)
        bad = [w for w in WORDS if len(tok.tokenize(w)) != 1]
        for w in bad:
            pieces = tok.tokenize(w)
            left = pieces[0]
            for right in pieces[1:]:
                if (left, right) not in merges:
                    merges.append((left, right))
                left = left + right
        if not bad:
            break
    else:
        raise RuntimeError(f"words not single tokens: {bad}")
    tok.save_pretrained(str(out_dir))
    return out_dir


def _write(out_dir: Path, base_vocab: list[str], merges: list[tuple[str, str]]):
    from transformers import CLIPTokenizer

    vocab_list = list(base_vocab)
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            vocab_list.append(a + b)
            seen.add(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=MAX_LENGTH,
                         pad_token="<|endoftext|>")


def load_tokenizer(path: Path | str = TOKENIZER_DIR):
    """The CLIPTokenizer from the repo's files (offline)."""
    from transformers import CLIPTokenizer

    if not any((Path(path) / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        raise FileNotFoundError(f"tokenizer files missing in {path}; run write_tokenizer_files()")
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
