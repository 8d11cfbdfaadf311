"""Score several models' images side by side: the benchmark tables (RESULTS.md, BENCHMARKS.md).

Every model generates the same images (image ``i``: prompt ``i mod len(prompts)``, seed ``i``,
same sampler, steps and guidance), so differences between rows come from the models, not from
the sample: a paired comparison. :func:`score_image_sets` then computes, per image set,

- FID against real images (a builtin dataset or a folder; statistics cached by content),
- FID against the FP model's own images (same prompts and seeds),
- CLIP score against the prompts,
- PSNR and SSIM against the FP model's image for the same prompt and seed,

with the Inception features of each set computed once (and cached by content under ``cache_dir``,
so rescoring after adding one row costs one row).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from diffsqueeze.metrics.grid import generate_images


def bench_prompts_and_seeds(prompts: Sequence[str], num_images: int) -> tuple[list[str], list[int]]:
    """Image ``i`` uses prompt ``i mod len(prompts)`` and seed ``i`` (the eval job's convention)."""
    return [prompts[i % len(prompts)] for i in range(num_images)], list(range(num_images))


def generate_bench_images(pipe, prompts: Sequence[str], num_images: int, steps: int, guidance: float,
                          batch_size: int = 16) -> tuple[torch.Tensor, float]:
    """uint8 ``(N, 3, H, W)`` images of the benchmark convention and the seconds spent generating."""
    ps, seeds = bench_prompts_and_seeds(prompts, num_images)
    t0 = time.perf_counter()
    with torch.no_grad():
        images = generate_images(pipe, ps, seeds, steps, guidance, batch_size=batch_size)
    return images, time.perf_counter() - t0


@dataclass
class SetScores:
    """Scores of one image set; ``None`` where a measure was not available."""

    fid_vs_real: Optional[float]
    fid_vs_fp: Optional[float]
    clip_score: Optional[float]
    psnr_vs_fp: Optional[float]
    ssim_vs_fp: Optional[float]
    identical_to_fp: bool


@dataclass
class Provenance:
    """How the scores were obtained (printed under every table)."""

    num_images: int
    reference: str
    num_reference: int
    fid: str
    clip: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        count = f"{self.num_reference} images"
        ref = self.reference if count in self.reference else f"{self.reference} ({count})"  # a source may say it
        against = f"vs {ref} and " if self.num_reference else ""
        parts = [f"FID: {self.fid}; {self.num_images} generated images per row {against}vs the FP row's "
                 f"{self.num_images} images (same prompts and seeds)"]
        parts.append(f"CLIP score: {self.clip}" if self.clip else "CLIP score: not available")
        parts.append("PSNR/SSIM: per image against the FP row's image of the same prompt and seed, averaged")
        return "; ".join(parts + self.notes) + "."


def score_image_sets(
    sets: dict[str, torch.Tensor],
    *,
    fp: str,
    prompts: Sequence[str],
    real_reference: Optional[str] = "builtin:fashion-mnist",
    clip_model: Optional[str] = "builtin:fashion-clip",
    cache_dir: Optional[Path] = None,
    extractor=None,
) -> tuple[dict[str, SetScores], Provenance]:
    """Score every set of ``sets`` (uint8 ``(N, 3, H, W)``, all of the same N) against real images
    and against ``sets[fp]``."""
    from diffsqueeze.metrics.clip_score import ClipScorer, aggregate
    from diffsqueeze.metrics.fid_stats import reference_stats
    from diffsqueeze.metrics.fidelity import per_image_fidelity
    from diffsqueeze.metrics.frechet import frechet_distance
    from diffsqueeze.metrics.inception import load_inception
    from diffsqueeze.metrics.references import reference_statistics

    if fp not in sets:
        raise KeyError(f"the FP set '{fp}' is not among the image sets ({', '.join(sets)})")
    sizes = {name: int(x.shape[0]) for name, x in sets.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"image sets differ in size: {sizes}")
    n = sizes[fp]
    extractor = extractor or load_inception(resize="clean")
    # the shared statistics cache; no real reference: FID vs real is not computed
    real = reference_statistics(real_reference, extractor, "torchmetrics") if real_reference else None
    stats = {name: reference_stats(x, extractor=extractor, cache_dir=cache_dir, progress=False) for name, x in sets.items()}
    clip = clip_note = None
    if clip_model:
        clip = ClipScorer.from_spec(clip_model)
        clip_note = f"{clip_model}, mean over images of 100 * max(cos, 0) with the image's prompt"
    ps, _ = bench_prompts_and_seeds(prompts, n)
    out = {}
    for name, x in sets.items():
        s = stats[name]
        to_real = None if real is None else frechet_distance(s.mu, s.sigma, real.mu, real.sigma)
        fidelity = per_image_fidelity(x, sets[fp])
        same = name == fp
        out[name] = SetScores(
            fid_vs_real=None if to_real is None else float(to_real),
            fid_vs_fp=None if same else float(frechet_distance(s.mu, s.sigma, stats[fp].mu, stats[fp].sigma)),
            clip_score=None if clip is None else aggregate(clip.cosine_x100(x, ps)),
            psnr_vs_fp=None if same else float(fidelity["psnr"].mean()),
            ssim_vs_fp=None if same else float(fidelity["ssim"].mean()),
            identical_to_fp=bool(torch.equal(x, sets[fp])),
        )
    prov = Provenance(
        num_images=n,
        reference=(real.source or real_reference) if real is not None else "no real reference",
        num_reference=int(real.num_images) if real is not None else 0,
        fid=f"torchmetrics-compatible float64 Frechet distance of {extractor.weights_name} pool features "
            f"(sha256 {extractor.weights_sha256[:12]}), resize {extractor.resize}",
        clip=clip_note,
    )
    return out, prov



def write_marked_section(path: Path, key: str, body: str, title: str) -> None:
    """Replace the text between ``<!-- KEY:begin -->`` and ``<!-- KEY:end -->`` in a Markdown file
    (or append it under ``## TITLE``), leaving the rest of the file as it is."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else f"# {path.stem}\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
