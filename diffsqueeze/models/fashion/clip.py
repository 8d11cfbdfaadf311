"""The small CLIP (``builtin:fashion-clip``): config, loading, zero-shot classification."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .data import CLASS_NAMES, TEMPLATES, caption
from .tokenizer import MAX_LENGTH, TOKENIZER_DIR, load_tokenizer

WEIGHTS_DIR = Path(__file__).with_name("weights")
CLIP_DIR = WEIGHTS_DIR / "clip"

#: Pixel normalisation of the vision tower (RGB, 32x32, values in [0, 1] -> [-1, 1]).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
IMAGE_SIZE = 32


def clip_config():
    """The architecture of the fashion CLIP (text and vision towers, width 128)."""
    from transformers import CLIPConfig

    tok_vocab = 681
    text = dict(vocab_size=tok_vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=128,
                bos_token_id=tok_vocab - 2, eos_token_id=tok_vocab - 1, pad_token_id=tok_vocab - 1)
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=4, num_channels=3, projection_dim=128)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=128)


def image_processor():
    """A ``CLIPImageProcessor`` matching the vision tower (any PIL image -> 3x32x32, [-1, 1])."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": IMAGE_SIZE}, do_center_crop=True,
                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_rescale=True,
                              do_normalize=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
                              do_convert_rgb=True, resample=3)


def gray_to_clip_pixels(x: torch.Tensor) -> torch.Tensor:
    """``(N, 1, 32, 32)`` in [-1, 1] -> ``(N, 3, 32, 32)`` vision-tower input (same normalisation)."""
    return x.expand(-1, 3, -1, -1)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def load_fashion_clip(path: Path | str = CLIP_DIR):
    """Load ``(CLIPModel, CLIPTokenizer)`` from ``path`` (offline, safetensors)."""
    from transformers import CLIPModel

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"fashion CLIP weights missing in {path}: train them with "
            "`python scripts/train_fashion_clip.py` (see docs/builtin-model.md)")
    model = CLIPModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True).eval()
    has_tok = (path / "vocab.json").is_file() or (path / "tokenizer.json").is_file()
    tok_dir = path if has_tok else TOKENIZER_DIR
    return model, load_tokenizer(tok_dir)


@torch.no_grad()
def class_text_embeddings(model, tokenizer, ensemble: bool = True) -> torch.Tensor:
    """Normalised text embeddings ``(10, D)``, averaged over all caption templates if ``ensemble``."""
    embs = []
    for c in range(len(CLASS_NAMES)):
        prompts = [caption(c, template=t) for t in range(len(TEMPLATES))] if ensemble else [caption(c, template=1)]
        e = model.get_text_features(input_ids=tokenize(tokenizer, prompts))
        e = getattr(e, "pooler_output", e)
        e = torch.nn.functional.normalize(e, dim=-1).mean(0)
        embs.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.stack(embs)


@torch.no_grad()
def zero_shot_predict(model, tokenizer, pixels: torch.Tensor, batch_size: int = 500, ensemble: bool = True) -> torch.Tensor:
    """Predicted class for vision-tower inputs ``(N, 3, 32, 32)``."""
    text = class_text_embeddings(model, tokenizer, ensemble)
    preds = []
    for i in range(0, len(pixels), batch_size):
        e = model.get_image_features(pixel_values=pixels[i : i + batch_size])
        e = getattr(e, "pooler_output", e)
        preds.append((torch.nn.functional.normalize(e, dim=-1) @ text.T).argmax(-1))
    return torch.cat(preds)
