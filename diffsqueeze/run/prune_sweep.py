"""The pruning knee (docs/methods.md §8): quality against sparsity, per component and for all together.

The pruning paper's main finding is that magnitude pruning keeps quality up to a sparsity and
then collapses suddenly (SD2: 38.5% overall). :func:`prune_sweep` measures that curve: for each
series (components pruned together, a pattern) and each sparsity it prunes a fresh copy of the
model with the ``prune`` stage, generates the same images as the FP model (image ``i``: prompt
``i mod P``, seed ``i``) and scores them with :func:`~diffsqueeze.metrics.compare.score_image_sets`
(FID vs FP, PSNR/SSIM vs FP, CLIP score, FID vs real where a reference is given). The knee of a
series is the sparsity where the FID-vs-FP curve bends most (Kneedle: the largest gap between
the normalized curve and the straight line from its first to its last point; Satopaa et al. 2011).
"""

from __future__ import annotations

import copy
import html
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.metrics.atomic_files import atomic_write_text
from diffsqueeze.metrics.compare import generate_bench_images, score_image_sets
from diffsqueeze.metrics.feature_nets import load_feature_net
from diffsqueeze.metrics.pipeline_info import resolve_sampling, sampler_description
from diffsqueeze.models.state import CompressionState
from diffsqueeze.pipelines.context import StageContext
from diffsqueeze.prune.stage import PruneConfig, PruneStage

PLOT_FILE = "quality_vs_sparsity.svg"
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


@dataclass(frozen=True)
class Series:
    """Components pruned together at each sparsity, with one pattern.

    Attributes:
        components: component names or ``denoiser`` (each pruned to the sparsity).
        pattern: ``unstructured`` or ``"N:M"`` (then the one sparsity 1 - N/M).
    """

    components: tuple[str, ...]
    pattern: str = "unstructured"

    @property
    def name(self) -> str:
        return "+".join(self.components) + ("" if self.pattern == "unstructured" else f" {self.pattern}")


@dataclass
class SweepRow:
    """One pruned model's scores (``sparsity`` 0 is the FP model itself)."""

    series: str
    sparsity: float
    achieved: float
    fid_vs_fp: Optional[float]
    fid_vs_real: Optional[float]
    psnr_vs_fp: Optional[float]
    ssim_vs_fp: Optional[float]
    clip_score: Optional[float]


def knee(sparsities: Sequence[float], fid_vs_fp: Sequence[float]) -> float | None:
    """The sparsity where the rising FID-vs-FP curve bends most (Kneedle), or None without a bend.

    Both axes are scaled to [0, 1] between the first and last point; the knee is the point
    farthest below the straight line between them (a flat-then-steep curve lies below it).
    """
    if len(sparsities) < 3 or fid_vs_fp[-1] <= fid_vs_fp[0]:
        return None
    x0, x1, y0, y1 = sparsities[0], sparsities[-1], fid_vs_fp[0], fid_vs_fp[-1]
    gaps = [(x - x0) / (x1 - x0) - (y - y0) / (y1 - y0) for x, y in zip(sparsities, fid_vs_fp)]
    best = max(range(len(gaps)), key=lambda i: gaps[i])
    return sparsities[best] if gaps[best] > 0 else None


def _pruned(fp_pipe, series: Series, sparsity: float, out_dir: Path) -> tuple[object, float]:
    """A copy of ``fp_pipe`` pruned by the ``prune`` stage; returns it and the achieved sparsity."""
    pipe = copy.deepcopy(fp_pipe)
    config = PruneConfig(targets={c: sparsity for c in series.components}, pattern=series.pattern)
    stage = PruneStage(config)
    stage.check(pipe)
    ctx = StageContext(index=0, run_dir=out_dir, device=torch.device("cpu"), seed=0,
                       state=CompressionState(), teacher_factory=lambda: fp_pipe)
    summary = stage.apply(pipe, ctx)
    comps = summary["components"].values()
    achieved = sum(c["pruned_weights"] for c in comps) / max(sum(c["counted_weights"] for c in comps), 1)
    return pipe, achieved


def prune_sweep(fp_pipe, series: Sequence[Series], sparsities: Sequence[float], prompts: Sequence[str],
                num_images: int, out_dir: Path, steps: int | None = None, guidance: float | None = None,
                real_reference: str | None = None, clip_model: str | None = None,
                batch_size: int = 16, features: str = "inception") -> dict:
    """Score every (series, sparsity) against the FP model; write ``sweep.json``, ``sweep.md`` and
    the plot into ``out_dir``; return the JSON content.

    Raises:
        DiffsqueezeError: a sparsity outside [0, 1), fewer than 2 images, or a component the
            pipeline does not have (before any image is generated).
    """
    if num_images < 2:
        raise DiffsqueezeError(f"--num-images must be >= 2 for FID, got {num_images}")
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        raise DiffsqueezeError(f"sparsities must be in [0, 1); got {bad}")
    for s in series:  # fail on a wrong component or pattern before generating anything
        PruneStage(PruneConfig(targets={c: 0.5 for c in s.components}, pattern=s.pattern)).check(fp_pipe)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps, guidance = resolve_sampling(fp_pipe, steps, guidance)
    sets = {"fp": generate_bench_images(fp_pipe, prompts, num_images, steps, guidance, batch_size)[0]}
    plan: list[tuple[Series, float, str]] = []
    for s in series:
        levels = [1 - int(s.pattern.split(":")[0]) / int(s.pattern.split(":")[1])] if ":" in s.pattern else sparsities
        for level in levels:
            if level > 0:
                plan.append((s, level, f"{s.name}@{level:g}"))
    achieved = {}
    for s, level, key in plan:
        pipe, achieved[key] = _pruned(fp_pipe, s, level, out_dir)
        sets[key] = generate_bench_images(pipe, prompts, num_images, steps, guidance, batch_size)[0]
        del pipe
    scores, prov = score_image_sets(sets, fp="fp", prompts=prompts, real_reference=real_reference,
                                    clip_model=clip_model, cache_dir=out_dir / "feature-cache",
                                    extractor=load_feature_net(features, resize="clean"))
    fp_row = scores["fp"]
    rows = []
    for s in series:
        rows.append(SweepRow(s.name, 0.0, 0.0, 0.0, fp_row.fid_vs_real, None, None, fp_row.clip_score))
        for t, level, key in plan:
            if t is s:
                r = scores[key]
                rows.append(SweepRow(s.name, level, achieved[key], r.fid_vs_fp, r.fid_vs_real, r.psnr_vs_fp,
                                     r.ssim_vs_fp, r.clip_score))
    knees = {}
    for s in series:
        pts = [r for r in rows if r.series == s.name]
        knees[s.name] = knee([r.sparsity for r in pts], [r.fid_vs_fp for r in pts])
    result = {"rows": [asdict(r) for r in rows], "knees": knees,
              "provenance": {"text": prov.text(), "num_images": num_images, "steps": steps, "guidance": guidance,
                             "sampler": sampler_description(fp_pipe), "prompts": len(prompts)}}
    atomic_write_text(out_dir / "sweep.json", json.dumps(result, indent=2))
    atomic_write_text(out_dir / PLOT_FILE, sweep_svg(rows, knees))
    atomic_write_text(out_dir / "sweep.md", sweep_markdown(result))
    return result


def _cell(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def sweep_markdown(result: dict, command: str | None = None) -> str:
    """The sweep as a Markdown table, its provenance and the knee of each series."""
    prov = result["provenance"]
    lines = [f"{prov['num_images']} images per row (image i: prompt i mod {prov['prompts']}, seed i), "
             f"{prov['sampler'].split('(')[0]} {prov['steps']} steps, guidance {'none' if prov['guidance'] is None else format(prov['guidance'], 'g')}. {prov['text']}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["| series | sparsity | achieved | FID vs FP | FID vs real | PSNR vs FP (dB) | SSIM vs FP | CLIP score |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['series']} | {r['sparsity']:.0%} | {r['achieved']:.1%} | {_cell(r['fid_vs_fp'])} | "
                     f"{_cell(r['fid_vs_real'])} | {_cell(r['psnr_vs_fp'])} | {_cell(r['ssim_vs_fp'], 3)} | "
                     f"{_cell(r['clip_score'])} |")
    lines.append("")
    for name, k in result["knees"].items():
        lines.append(f"- knee of **{name}**: " + (f"{k:.0%} sparsity (where the FID-vs-FP curve bends most)"
                                                   if k is not None else "none found (no bend in the measured range)"))
    return "\n".join(lines) + "\n"


def sweep_svg(rows: Sequence[SweepRow], knees: dict, width: int = 900, height: int = 320) -> str:
    """Two panels, FID vs FP and PSNR vs FP against sparsity, one line per series; knees marked."""
    names = list(dict.fromkeys(r.series for r in rows))
    panels = [("fid_vs_fp", "FID vs FP (lower is better)"), ("psnr_vs_fp", "PSNR vs FP, dB (higher is better)")]
    pw, ml, mt, mb = width // 2, 56, 28, 44
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 24 * len(names)}" '
             f'font-family="sans-serif" font-size="12">']
    xs = [r.sparsity for r in rows]
    x_max = max(xs) if xs and max(xs) > 0 else 1.0
    for p, (attr, title) in enumerate(panels):
        vals = [getattr(r, attr) for r in rows if getattr(r, attr) is not None and math.isfinite(getattr(r, attr))]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1
        x0, w, h = p * pw + ml, pw - ml - 16, height - mt - mb

        def px(x):
            return x0 + w * x / x_max

        def py(y):
            return mt + h * (1 - (y - lo) / (hi - lo))

        parts.append(f'<text x="{x0}" y="16" font-weight="bold">{html.escape(title)}</text>')
        parts.append(f'<rect x="{x0}" y="{mt}" width="{w}" height="{h}" fill="none" stroke="#999"/>')
        for i in range(5):
            y = lo + (hi - lo) * i / 4
            parts.append(f'<text x="{x0 - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
            xv = x_max * i / 4
            parts.append(f'<text x="{px(xv):.1f}" y="{mt + h + 16}" text-anchor="middle">{xv:.0%}</text>')
        parts.append(f'<text x="{x0 + w / 2}" y="{mt + h + 34}" text-anchor="middle">sparsity</text>')
        for n, name in enumerate(names):
            color = COLORS[n % len(COLORS)]
            pts = [(r.sparsity, getattr(r, attr)) for r in rows if r.series == name
                   and getattr(r, attr) is not None and math.isfinite(getattr(r, attr))]
            if len(pts) > 1:
                path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
                parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
            for x, y in pts:
                r = 5 if knees.get(name) == x else 3
                parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{r}" fill="{color}"/>')
    for n, name in enumerate(names):
        y = height + 16 + 24 * n
        k = knees.get(name)
        label = f"{name} (knee: {k:.0%})" if k is not None else f"{name} (no knee found)"
        parts.append(f'<rect x="{ml}" y="{y - 10}" width="12" height="12" fill="{COLORS[n % len(COLORS)]}"/>')
        parts.append(f'<text x="{ml + 18}" y="{y}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
