"""The recipe's ``eval:`` section, and what a FID reference may be."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from diffsqueeze.errors import RecipeError

#: FID/KID implementations :func:`diffsqueeze.run.evaluation.evaluate_run` can use.
FID_BACKENDS = ("torchmetrics", "clean-fid")
#: Builtin reference image sets for FID/KID.
BUILTIN_REFERENCES = ("builtin:fashion-mnist",)
#: Builtin CLIP models for the CLIP score.
BUILTIN_CLIPS = ("builtin:fashion-clip",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
#: Feature networks for FID/KID.
FEATURE_NETS = ("inception", "tiny-random")
#: Most images one evaluation generates. FID is reported at 50,000 images by convention, and
#: the largest sets reference statistics are computed over (ImageNet's 1.28 million training
#: images) fit below this. The job keeps every image's 2048 features (8 KiB) for the final
#: float64 FID/KID on the main process, about 16 GiB per side at this count before the float64
#: copies, so a count far above it (a typo such as 1e9) could never finish; it is refused before
#: any model loads.
MAX_EVAL_IMAGES = 2_000_000


def num_images_problem(n: int) -> str | None:
    """Why ``n`` images is no evaluation size above the floor callers check (None when it is one)."""
    if n > MAX_EVAL_IMAGES:
        return (f"{n:,} images is over the limit of {MAX_EVAL_IMAGES:,} per evaluation (FID is reported at 50,000; "
                f"every image's features are kept for the final scores)")
    return None


@dataclass(frozen=True)
class EvalConfig:
    """How a run's result is scored against the original model.

    Attributes:
        prompts: prompt set (``builtin``, ``builtin:NAME``) or a text file, one prompt a line.
        seeds: seeds of the side-by-side grid (one row per prompt and seed).
        num_inference_steps: sampler steps for every generated image (default: the model's own,
            the defaults of its pipeline's ``__call__``).
        guidance_scale: classifier-free guidance scale (default: the model's own).
        grid: write the compressed-vs-original grid.
        num_images: images generated for FID/KID (0 skips them; at most :data:`MAX_EVAL_IMAGES`).
            Image ``i`` uses seed ``i`` and prompt ``i mod len(prompts)``.
        reference: ``fp`` (the original model's own outputs), a folder of images, or a builtin
            dataset (``builtin:fashion-mnist``).
        batch_size: images generated per pipeline call.
        clip_model: CLIP for the CLIP score: ``None`` (skip), a local folder, a hub id, or
            ``builtin:fashion-clip``.
        fidelity: score PSNR / SSIM (and LPIPS where available offline) of the compressed
            model's images against the original's for the same prompt and seed.
        grid_prompts: how many prompts of the set go into the grid (rows = prompts x seeds).
        fid_backend: ``torchmetrics`` (in memory, streaming) or ``clean-fid`` (folders).
        save_images: keep the generated FID images as PNG files beside the features.
        score_stages: also score every intermediate stage checkpoint of a run on the grid's
            images (size, PSNR/SSIM to the original, CLIP score) for the quality-vs-size plot.
        height, width: size of every generated image (default: the pipeline's own).
        features: feature network for FID/KID: ``inception`` (the FID Inception-v3 weights) or
            ``tiny-random`` (a tiny random net for smoke tests: fast, meaningless numbers).
    """

    prompts: str = "builtin"
    seeds: tuple[int, ...] = (0, 1)
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    grid: bool = True
    num_images: int = 0
    reference: str = "fp"
    batch_size: int = 8
    clip_model: Optional[str] = None
    fidelity: bool = True
    grid_prompts: int = 4
    fid_backend: str = "torchmetrics"
    save_images: bool = False
    features: str = "inception"
    score_stages: bool = True
    height: Optional[int] = None
    width: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RecipeError(name, f"must be >= 1 (pixels), got {getattr(self, name)}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise RecipeError("num_inference_steps", f"must be >= 1, got {self.num_inference_steps}")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise RecipeError("guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        if self.num_images < 0:
            raise RecipeError("num_images", f"must be >= 0, got {self.num_images}")
        if self.num_images == 1:
            raise RecipeError("num_images", "FID needs at least 2 images (or 0 to skip FID/KID)")
        if num_images_problem(self.num_images):
            raise RecipeError("num_images", num_images_problem(self.num_images))
        if self.batch_size < 1:
            raise RecipeError("batch_size", f"must be >= 1, got {self.batch_size}")
        if not self.seeds:
            raise RecipeError("seeds", "needs at least one seed")
        if any(s < 0 for s in self.seeds):
            raise RecipeError("seeds", f"seeds must be >= 0, got {list(self.seeds)}")
        if self.grid_prompts < 1:
            raise RecipeError("grid_prompts", f"must be >= 1, got {self.grid_prompts}")
        if not self.prompts:
            raise RecipeError("prompts", "must name a prompt set or a file")
        if not self.reference:
            raise RecipeError("reference", "must be 'fp', a folder of images or a builtin dataset")
        if self.clip_model is not None:
            if not self.clip_model.strip():
                raise RecipeError("clip_model", "empty; leave it out (null) to skip the CLIP score")
            if not (self.clip_model in BUILTIN_CLIPS or Path(self.clip_model).is_dir() or _looks_like_hub_id(self.clip_model)):
                raise RecipeError("clip_model", f"'{self.clip_model}' is no folder, hub id (org/name) or builtin "
                                  f"({', '.join(BUILTIN_CLIPS)})")
        ref = self.reference
        if not (ref == "fp" or ref in BUILTIN_REFERENCES or Path(ref).is_dir()
                or (ref.endswith(".safetensors") and Path(ref).is_file())):
            raise RecipeError("reference", f"'{ref}': expected 'fp', a folder of images, a .safetensors statistics "
                              f"file or one of {', '.join(BUILTIN_REFERENCES)}")
        if self.fid_backend not in FID_BACKENDS:
            raise RecipeError("fid_backend", f"unknown backend '{self.fid_backend}'; known: {', '.join(FID_BACKENDS)}")
        if self.features not in FEATURE_NETS:
            raise RecipeError("features", f"unknown feature network '{self.features}'; known: {', '.join(FEATURE_NETS)}")


def _looks_like_hub_id(spec: str) -> bool:
    return not spec.startswith((".", "/", "~")) and not Path(spec).exists() and bool(_HUB_ID.match(spec))


def reference_problem(ref: str) -> str | None:
    """Why ``ref`` is no FID reference (None when it is one); ``fp`` is left to the caller.

    Shared by ``eval --ref`` and the recipe's ``eval.reference``: both fail on it before any image
    is generated. A model (``builtin:tiny-sd``, a diffusers folder, a run directory, a hub id) is
    the commonest mistake: a model to compare with is a baseline, not a reference.
    """
    from diffsqueeze.metrics.images import IMAGE_EXTENSIONS

    path = Path(ref)
    if ref.startswith("builtin:"):
        if ref in BUILTIN_REFERENCES:
            return None
        from diffsqueeze.models.builtin import BUILTINS

        if ref.split(":", 1)[1] in BUILTINS:
            return f"'{ref}' is a model, not a set of reference images (to compare with a model, give it as the baseline)"
        return f"'{ref}' is no builtin dataset (known: {', '.join(BUILTIN_REFERENCES)})"
    if ref.endswith(".safetensors"):
        return None if path.is_file() else f"the statistics file '{ref}' does not exist"
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "manifest.json").is_file():
            return (f"'{ref}' is a model folder, not a folder of reference images (to compare with a model, give it "
                    f"as the baseline)")
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file()):
            return f"the folder '{ref}' holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        return None
    if path.exists():
        return f"'{ref}' is a file, neither a folder of images nor a .safetensors statistics file"
    if "/" in ref and not ref.startswith((".", "/", "~")) and ref.count("/") == 1:
        return f"'{ref}' is no folder here; a hub model id is a model, not a set of reference images"
    return f"the folder '{ref}' does not exist"
