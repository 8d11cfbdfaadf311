"""CLIP score: ``100 * max(cos(E_image, E_text), 0)`` averaged over images (docs/methods.md §9).

The numbers go through torchmetrics' :class:`~torchmetrics.multimodal.clip_score.CLIPScore`
feature path (processor -> ``get_image_features`` / ``get_text_features`` -> L2-normalise ->
``100 * dot``). torchmetrics 1.9 breaks on transformers >= 5: there ``CLIPModel.get_*_features``
return a ``BaseModelOutputWithPooling`` (projected embedding in ``pooler_output``) instead of a
tensor, and torchmetrics calls ``.norm`` on it (``AttributeError: ... has no attribute 'norm'``).
The fix is the smallest shim torchmetrics documents: its ``model_name_or_path`` accepts a callable
returning a "CLIP compatible" ``(model, processor)`` whose model's ``get_*_features`` return
tensors. :class:`ProjectedFeatures` is that model: it wraps a ``CLIPModel`` and returns the
projected embedding tensor on every transformers version.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.models.conditioning import token_count_over
from diffsqueeze.models.streamed import tensor_value

log = logging.getLogger(__name__)

BUILTIN_FASHION_CLIP = "builtin:fashion-clip"


def _embedding(out: Any) -> torch.Tensor:
    """The projected embedding from either a tensor (transformers < 5) or a model output (>= 5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot find an embedding in {type(out).__name__} (no pooler_output)")
    return pooled


class ProjectedFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return tensors.

    This is the "CLIP compatible model" torchmetrics' CLIPScore documents for its callable
    ``model_name_or_path``; it makes torchmetrics 1.9 work with transformers 5.x.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    @property
    def config(self) -> Any:  # torchmetrics reads config.text_config.max_position_embeddings
        return self.clip.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _embedding(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _embedding(self.clip.get_text_features(*args, **kwargs))


def module_hash(module: nn.Module) -> str:
    """sha256 (first 16 hex digits) over a module's state dict: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = tensor_value(module, name, state[name]).detach().cpu().contiguous()  # a streamed teacher's from its files
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def load_clip(spec: str, device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load ``(CLIPModel, processor)`` from ``builtin:fashion-clip``, a local folder or a hub id.

    Only safetensors are read; a local folder never touches the network.

    Raises:
        DiffsqueezeError: nothing loadable at ``spec``.
    """
    from transformers import CLIPModel, CLIPProcessor

    try:
        if spec == BUILTIN_FASHION_CLIP:
            from diffsqueeze.models.fashion.clip import (
                image_processor,
                load_fashion_clip,
            )

            model, tokenizer = load_fashion_clip()
            processor = CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer)
        else:
            local = Path(spec).is_dir()
            if not local and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
                raise DiffsqueezeError(f"clip model '{spec}': no such folder, and not a hub id of the form 'org/name'")
            model = CLIPModel.from_pretrained(spec, local_files_only=local, use_safetensors=True)
            processor = CLIPProcessor.from_pretrained(spec, local_files_only=local)
    except DiffsqueezeError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, ...; the cause goes in the message
        raise DiffsqueezeError(f"cannot load CLIP model '{spec}': {type(exc).__name__}: {exc}") from exc
    return model.to(device).eval(), processor


@dataclass
class ClipScorer:
    """Scores images against their prompts with one CLIP model.

    Attributes:
        model: a ``transformers.CLIPModel`` (any version).
        processor: its ``CLIPProcessor`` (tokenizer + image processor).
        name: where the model came from (for provenance).
    """

    model: nn.Module
    processor: Any
    name: str = "in-memory"

    def __post_init__(self) -> None:
        self.model = self.model.eval()
        self.features = ProjectedFeatures(self.model)
        self._hash: str | None = None

    @classmethod
    def from_spec(cls, spec: str, device: str = "cpu") -> "ClipScorer":
        """See :func:`load_clip`."""
        model, processor = load_clip(spec, device)
        return cls(model, processor, name=spec)

    @property
    def weights_hash(self) -> str:
        if self._hash is None:
            self._hash = module_hash(self.model)
        return self._hash

    def torchmetrics_metric(self):
        """A torchmetrics ``CLIPScore`` over this model that works on transformers 5.x (the shim)."""
        from torchmetrics.multimodal.clip_score import CLIPScore

        return CLIPScore(model_name_or_path=lambda: (self.features, self.processor))

    @torch.no_grad()
    def cosine_x100(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-image ``100 * cos(E_image, E_text)`` (unclamped), float64, on the CPU.

        Same feature path as torchmetrics' CLIPScore (its ``_clip_score_update``).

        Args:
            images: uint8 ``(N, 3, H, W)`` in [0, 255].
            prompts: ``N`` prompts.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 in [0, 255], got {images.dtype}")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        device = next(self.model.parameters()).device
        pixels = self.processor(images=[i.cpu() for i in images], return_tensors="pt")["pixel_values"]
        img = self.features.get_image_features(pixel_values=pixels.to(device))
        max_len = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", None)
        # Truncating in the tokenizer keeps the end-of-text token that CLIP pools at; torchmetrics
        # slices the ids instead. Both agree on prompts that fit (every test and builtin prompt).
        text = self.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=max_len is not None,
                              max_length=max_len)
        ids, mask = text["input_ids"], text["attention_mask"]
        if max_len is not None and ids.shape[-1] > max_len:
            ids, mask = ids[..., :max_len], mask[..., :max_len]
        txt = self.features.get_text_features(ids.to(device), mask.to(device))
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
        return (100 * (img * txt).sum(-1)).double().cpu()

    def truncation_warning(self, prompts: Sequence[str], source: str) -> str | None:
        """What the CLIP text tower cuts of ``prompts`` (the set ``source``), or None if it cuts
        none: :meth:`cosine_x100` scores a longer prompt on its first tokens only."""
        max_len = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", None)
        n = token_count_over(self.processor.tokenizer, prompts, max_len) if max_len else 0
        if not n:
            return None
        return (f"CLIP score: {n} of {len(prompts)} prompts of '{source}' are longer than {self.name}'s text tower "
                f"takes: each is scored on its first {max_len} tokens")

    def provenance(self) -> dict:
        import torchmetrics

        return {
            "implementation": f"CLIP score, torchmetrics {torchmetrics.__version__} CLIPScore feature path "
            "(ProjectedFeatures shim for transformers>=5); score = mean over images of 100*max(cos, 0)",
            "clip_model": self.name,
            "weights_hash": self.weights_hash,
            "image_input": "uint8 RGB, the CLIP processor's own resize/crop/normalisation",
        }


def aggregate(cos_x100: torch.Tensor) -> float:
    """CLIP score over images: ``mean(100 * max(cos, 0))`` (docs/methods.md §9), float64."""
    return float(cos_x100.double().clamp_min(0).mean()) if len(cos_x100) else float("nan")


def tiny_clip(seed: int = 0, image_size: int = 32) -> tuple[nn.Module, Any]:
    """A tiny random-weight ``(CLIPModel, CLIPProcessor)`` built in code, for tests and benchmarks.

    Its scores mean nothing; it exercises the real transformers/torchmetrics code paths offline.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffsqueeze.models.tokenizer import build_char_tokenizer

    text = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    images = CLIPImageProcessor(do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
                                crop_size={"height": image_size, "width": image_size})
    return model, CLIPProcessor(image_processor=images, tokenizer=build_char_tokenizer())
