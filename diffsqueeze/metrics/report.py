"""Reports: ``metrics.json`` -> ``report.md`` and ``report.html`` with the grid, every number with
its provenance, and a plot of quality (FID, CLIP score) against denoiser size (inline SVG, no
plotting library).

One directory (a run or an eval output) gives that directory's report. Several directories
(``diffsqueeze report RUN_A RUN_B ...``) give a comparison: one table row and one plot point per
model (each run's original and compressed model), written to ``--out``.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.metrics.atomic_files import atomic_write_text
from diffsqueeze.metrics.frechet import MIN_FID_IMAGES

log = logging.getLogger(__name__)

PLOT_FILE = "quality_vs_size.svg"


def read_metrics(folder: Path) -> dict:
    """The ``metrics.json`` of a run / eval directory.

    Raises:
        DiffsqueezeError: missing or unreadable.
    """
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise DiffsqueezeError(f"'{folder}' has no metrics.json (run `diffsqueeze eval` or a recipe with an eval: section first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DiffsqueezeError(f"{path} is not valid JSON: {exc}") from exc


@dataclass
class Point:
    """One model on the quality-vs-size plot."""

    label: str
    series: str
    size_mb: float | None
    fid: float | None
    clip: float | None
    psnr: float | None = None


def _value(block: Any) -> float | None:
    if isinstance(block, dict):
        block = block.get("value")
    return float(block) if isinstance(block, (int, float)) and math.isfinite(block) else None


def _size_mb(block: Any) -> float | None:
    if isinstance(block, dict) and isinstance(block.get("denoiser_bytes"), (int, float)):
        return block["denoiser_bytes"] / 1e6
    return None


def points_of(metrics: dict, series: str) -> list[Point]:
    """Plot points of one metrics file: the baseline/original (if scored), stages with their own
    scores (if any), then the evaluated model."""
    pts = []
    base = metrics.get("baseline_scores")
    if isinstance(base, dict):
        pts.append(Point(f"{series}: original", series, _size_mb(base.get("size")), _value(base.get("fid")),
                         _value(base.get("clip_score"))))
    for st in metrics.get("stages") or []:
        if isinstance(st, dict) and any(k in st for k in ("fid", "clip_score", "fidelity")):
            pts.append(Point(f"{series}: {st.get('index', '?')}-{st.get('name', 'stage')}", series, _size_mb(st.get("size")),
                             _value(st.get("fid")), _value(st.get("clip_score")), _psnr(st)))
    pts.append(Point(f"{series}: {'compressed' if metrics.get('kind') == 'run' else 'model'}", series,
                     _size_mb(metrics.get("size")), _value(metrics.get("fid")), _value(metrics.get("clip_score")),
                     _psnr(metrics)))
    return pts


def _psnr(block: dict) -> float | None:
    return _value((block.get("fidelity") or {}).get("psnr"))


# ------------------------------------------------------------------------------------------
# SVG plot

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * k / n for k in range(n + 1)]


def _panel(points: list[Point], attr: str, title: str, x0: int, width: int, height: int, colors: dict[str, str]) -> str:
    pts = [(p.size_mb, getattr(p, attr), p) for p in points if p.size_mb is not None and getattr(p, attr) is not None]
    parts = [f'<g transform="translate({x0},0)">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)} vs denoiser size</text>']
    left, top, right, bottom = 52, 28, 12, 40
    pw, ph = width - left - right, height - top - bottom
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    if not pts:
        parts.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" font-size="12" fill="#777">'
                     f'no {html.escape(title)} values</text></g>')
        return "".join(parts)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = min(ys), max(ys)
    xpad = (xhi - xlo) * 0.08 or max(abs(xhi) * 0.1, 0.01)
    ypad = (yhi - ylo) * 0.08 or max(abs(yhi) * 0.1, 0.01)
    xlo, xhi, ylo, yhi = max(0.0, xlo - xpad), xhi + xpad, ylo - ypad, yhi + ypad

    def sx(v: float) -> float:
        return left + (v - xlo) / (xhi - xlo) * pw

    def sy(v: float) -> float:
        return top + ph - (v - ylo) / (yhi - ylo) * ph

    for t in _ticks(xlo, xhi):
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle" font-size="10">{t:.3g}</text>')
    for t in _ticks(ylo, yhi):
        parts.append(f'<text x="{left - 4}" y="{sy(t) + 3:.1f}" text-anchor="end" font-size="10">{t:.3g}</text>')
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="11">denoiser size (MB)</text>')
    series: dict[str, list[tuple[float, float, Point]]] = {}
    for x, y, p in pts:
        series.setdefault(p.series, []).append((x, y, p))
    for name, sp in series.items():
        color = colors[name]
        if len(sp) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in sp)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for x, y, p in sp:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{color}">'
                         f'<title>{html.escape(p.label)}: {y:.4g} at {x:.3g} MB</title></circle>')
            short = p.label.split(": ", 1)[-1]
            parts.append(f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 6:.1f}" font-size="10" fill="{color}">{html.escape(short)}</text>')
    parts.append("</g>")
    return "".join(parts)


def quality_size_svg(points: Sequence[Point], width: int = 960, height: int = 300) -> str:
    """Three panels (FID, CLIP score, PSNR to the original) against denoiser size; one colour per series."""
    names = list(dict.fromkeys(p.series for p in points))
    colors = {n: _COLORS[i % len(_COLORS)] for i, n in enumerate(names)}
    third = width // 3
    legend_h = 16 * len(names) + 6
    body = [_panel(list(points), "fid", "FID", 0, third, height, colors),
            _panel(list(points), "clip", "CLIP score", third, third, height, colors),
            _panel(list(points), "psnr", "PSNR to original", 2 * third, third, height, colors)]
    for i, n in enumerate(names):
        y = height + 12 + 16 * i
        body.append(f'<rect x="10" y="{y - 9}" width="10" height="10" fill="{colors[n]}"/>'
                    f'<text x="26" y="{y}" font-size="11">{html.escape(n)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + legend_h}" '
            f'viewBox="0 0 {width} {height + legend_h}" font-family="sans-serif">'
            f'<rect width="100%" height="100%" fill="white"/>{"".join(body)}</svg>')


# ------------------------------------------------------------------------------------------
# tables


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


KEPT_PSNR_DB = 25.0
"""PSNR to the original's image (same prompt and seed) at or above which the images count as kept."""
KEPT_CLIP_DROP = 1.5
"""Largest drop of the CLIP score below the original's that still counts as kept."""


def _fid_verdict(fid: dict) -> tuple[str, str]:
    """The FID cell and the KID cell: a number only when both sides have enough images."""
    if _value(fid) is None:
        return "n/a: " + (fid.get("note") or "not computed"), "n/a"
    n_gen, n_ref = fid.get("num_generated"), fid.get("num_reference")
    if isinstance(n_gen, int) and isinstance(n_ref, int) and min(n_gen, n_ref) < MIN_FID_IMAGES:
        why = f"n/a: {n_gen} generated vs {n_ref} reference images; FID needs >= {MIN_FID_IMAGES} on each side"
        return why, "n/a (too few images, as FID)"
    kid = "–"
    if fid.get("kid_mean") is not None:
        one_subset = fid.get("kid_subset_size") is not None and fid["kid_subset_size"] >= min(n_gen or 0, n_ref or 0)
        spread = "" if one_subset or not fid.get("kid_std") else f" ± {fid['kid_std']:.2g}"
        kid = f"{fid['kid_mean']:.2g}{spread}" + (" (one subset: the whole sets, no spread)" if one_subset else "")
    return f"{_value(fid):.4g}", kid


def verdict(metrics: dict) -> tuple[str, list[tuple[str, str, str, str]]]:
    """Did compression work? One sentence, and ``(measure, original, this model, change)`` rows.

    The images count as kept when the PSNR to the original's images is at least
    :data:`KEPT_PSNR_DB` and the CLIP score drops by at most :data:`KEPT_CLIP_DROP`; FID is shown
    only when both image sets hold :data:`~diffsqueeze.metrics.frechet.MIN_FID_IMAGES` images.
    """
    base = metrics.get("baseline_scores") or {}
    size, base_size = _size_mb(metrics.get("size")), _size_mb(base.get("size"))
    rows = []
    ratio = base_size / size if size and base_size else None
    mb = (lambda v: "–" if v is None else f"{v:.2f}")
    rows.append(("denoiser size (MB)", mb(base_size), mb(size), f"{ratio:.2f}x smaller" if ratio else "–"))
    fd = metrics.get("fidelity") or {}
    psnr, ssim = _value(fd.get("psnr")), _value(fd.get("ssim"))
    if psnr is not None:
        rows.append(("PSNR to the original's images (dB)", "–", f"{psnr:.2f}",
                     f"kept (>= {KEPT_PSNR_DB:g} dB)" if psnr >= KEPT_PSNR_DB else f"lost (< {KEPT_PSNR_DB:g} dB)"))
    if ssim is not None:
        rows.append(("SSIM to the original's images", "–", f"{ssim:.3f}", "1 = identical"))
    clip, base_clip = _value(metrics.get("clip_score")), _value(base.get("clip_score"))
    drop = None
    if clip is not None:
        drop = base_clip - clip if base_clip is not None else None
        change = "–" if drop is None else (f"{-drop:+.2f} (kept: drop <= {KEPT_CLIP_DROP:g})" if drop <= KEPT_CLIP_DROP
                                           else f"{-drop:+.2f} (lost: drop > {KEPT_CLIP_DROP:g})")
        rows.append(("CLIP score", _fmt(base_clip), f"{clip:.2f}", change))
    elif (metrics.get("clip_score") or {}).get("note"):
        rows.append(("CLIP score", "–", "–", metrics["clip_score"]["note"]))
    fid = metrics.get("fid") or {}
    fid_cell, kid_cell = _fid_verdict(fid)
    reference = fid.get("reference")
    base_fid = _value(base.get("fid"))
    against = "the original's images" if str(reference).startswith("fp") else reference
    rows.append(("FID" + (f" vs {against}" if reference else ""), "–" if not base_fid else _fmt(base_fid), fid_cell, ""))
    if fid.get("kid_mean") is not None:
        rows.append(("KID", "–", kid_cell, ""))
    kept = [psnr is None or psnr >= KEPT_PSNR_DB, drop is None or drop <= KEPT_CLIP_DROP]
    measured = psnr is not None or drop is not None
    if not measured:
        sentence = "No quality measure to the original was computed (eval.fidelity and a CLIP model are off)."
    elif all(kept) and ratio is not None and ratio < 1.05:
        sentence = (f"The images are kept, but the denoiser is not smaller ({ratio:.2f}x; pruned weights are stored "
                    f"dense unless a quantization stage packs them).")
    elif all(kept):
        sentence = "Compression worked: " + (f"the denoiser is {ratio:.2f}x smaller" if ratio else "size not measured")
        sentence += " and the images are kept (" + ", ".join(
            x for x in (f"PSNR {psnr:.1f} dB" if psnr is not None else "", f"CLIP {-drop:+.2f}" if drop is not None else "")
            if x) + ")."
    else:
        sentence = ("Quality lost: " + "; ".join(x for x in (
            f"PSNR {psnr:.1f} dB < {KEPT_PSNR_DB:g}" if psnr is not None and psnr < KEPT_PSNR_DB else "",
            f"CLIP {-drop:+.2f}, more than {KEPT_CLIP_DROP:g} below the original" if drop is not None and drop > KEPT_CLIP_DROP
            else "") if x) + (f" (denoiser {ratio:.2f}x smaller)." if ratio else "."))
    return sentence, rows


def provenance_lines(metrics: dict) -> list[tuple[str, dict]]:
    """``(metric, provenance dict)`` for every number that carries one."""
    out = []
    fid = metrics.get("fid") or {}
    if fid:
        out.append(("FID / KID", {k: v for k, v in fid.items() if k not in ("value", "fid", "kid_mean", "kid_std", "extra")}))
    clip = metrics.get("clip_score") or {}
    if clip:
        out.append(("CLIP score", {k: v for k, v in clip.items() if k != "value"}))
    fd = metrics.get("fidelity") or {}
    if fd:
        prov = dict(fd.get("provenance") or {})
        prov.update({k: v for k, v in fd.items() if k in ("n_pairs", "lpips_note", "scope", "baseline")})
        out.append(("PSNR / SSIM / LPIPS", prov))
    if metrics.get("generation"):
        out.append(("generation", metrics["generation"]))
    return out


def _brief(summary: Any) -> Any:
    """A stage summary without its per-layer detail (``layers`` keys), for a table cell."""
    if isinstance(summary, dict):
        return {k: _brief(v) for k, v in summary.items() if k != "layers"}
    return summary


def _stage_rows(metrics: dict) -> list[tuple[str, ...]]:
    rows = []
    for st in metrics.get("stages") or []:
        if isinstance(st, dict):
            summary = st.get("summary")
            text = json.dumps(_brief(summary), default=str)[:200] if summary is not None else ""
            fd = st.get("fidelity") or {}
            rows.append((str(st.get("index", "")), str(st.get("name", "")), _fmt(_size_mb(st.get("size"))),
                         _fmt(fd.get("psnr")), _fmt(fd.get("ssim")), _fmt(_value(st.get("clip_score"))), text))
    return rows


# ------------------------------------------------------------------------------------------
# writers


def _markdown(title: str, entries: list[tuple[str, dict, Path]], plot_rel: str, out_dir: Path) -> str:
    lines = [f"# {title}", ""]
    for name, m, folder in entries:
        if len(entries) > 1:
            lines += [f"## {name}", ""]
        sentence, rows = verdict(m)
        lines += [f"**{sentence}**", "", "| | original | this model | change |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        lines.append("")
        if m.get("grid"):
            rel = os.path.relpath(folder / m["grid"], out_dir)
            lines += [f"![grid: prompts as rows; per seed, the original and this model side by side]({rel})", ""]
        lines += [f"- model: `{m.get('model')}`; compared with: `{m.get('baseline') or '–'}`", ""]
        stages = _stage_rows(m)
        if stages:
            lines += ["### Stages", "", "Scores of intermediate stages use the grid's prompts and seeds; the last stage is the "
                      "compressed model above.", "",
                      "| # | stage | size (MB) | PSNR | SSIM | CLIP | summary |", "|---|---|---|---|---|---|---|"]
            lines += ["| " + " | ".join(r[:-1]) + f" | `{r[-1]}` |" for r in stages]
            lines.append("")
    lines += ["## Quality vs size", "", f"![quality vs size]({plot_rel})", ""]
    for name, m, _ in entries:
        lines += [f"## How the numbers were obtained{f' ({name})' if len(entries) > 1 else ''}", ""]
        if m.get("fid", {}).get("note"):
            lines += [f"Note: {m['fid']['note']}", ""]
        for metric, prov in provenance_lines(m):
            lines.append(f"- **{metric}**: " + "; ".join(f"{k}: {_fmt(v)}" for k, v in prov.items()))
        lines.append("")
    return "\n".join(lines)


def _html(title: str, entries: list[tuple[str, dict, Path]], svg: str, out_dir: Path) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for name, m, folder in entries:
        if len(entries) > 1:
            body.append(f"<h2>{e(name)}</h2>")
        sentence, rows = verdict(m)
        ok = sentence.startswith("Compression worked")
        body.append(f'<p class="verdict {"ok" if ok else "bad"}">{e(sentence)}</p>')
        body.append("<table><tr><th></th><th>original</th><th>this model</th><th>change</th></tr>")
        body += [f"<tr><td>{e(a)}</td><td>{e(b)}</td><td><b>{e(c)}</b></td><td>{e(d)}</td></tr>" for a, b, c, d in rows]
        body.append("</table>")
        if m.get("grid"):
            rel = os.path.relpath(folder / m["grid"], out_dir)
            body.append(f'<p><img src="{e(rel)}" alt="grid: prompts as rows; per seed, the original and this model side by '
                        f'side" style="max-width:100%"></p>')
        body.append(f"<p>model: <code>{e(str(m.get('model')))}</code>; compared with: "
                    f"<code>{e(str(m.get('baseline') or '–'))}</code></p>")
        stages = _stage_rows(m)
        if stages:
            body.append("<h3>Stages</h3><table><tr><th>#</th><th>stage</th><th>size (MB)</th><th>PSNR</th><th>SSIM</th>"
                        "<th>CLIP</th><th>summary</th></tr>")
            body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r[:-1]) + f"<td><code>{e(r[-1])}</code></td></tr>"
                     for r in stages]
            body.append("</table>")
    body += ["<h2>Quality vs size</h2>", svg]
    for name, m, _ in entries:
        body.append(f"<h2>How the numbers were obtained{e(f' ({name})') if len(entries) > 1 else ''}</h2>")
        if m.get("fid", {}).get("note"):
            body.append(f"<p>Note: {e(m['fid']['note'])}</p>")
        body.append("<ul>")
        for metric, prov in provenance_lines(m):
            items = "".join(f"<li><b>{e(k)}</b>: {e(_fmt(v))}</li>" for k, v in prov.items())
            body.append(f"<li><b>{e(metric)}</b><ul>{items}</ul></li>")
        body.append("</ul>")
    style = ("body{font-family:sans-serif;max-width:1000px;margin:1em auto}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}code{font-size:90%}"
             ".verdict{font-size:115%;font-weight:bold;padding:.4em .6em;border-radius:4px}"
             ".ok{background:#e6f4ea;color:#1e4620}.bad{background:#fdecea;color:#611a15}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def write_report(folder: Path, others: Sequence[Path] = (), out_dir: Path | None = None, title: str | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and the plot for ``folder`` (and ``others``, compared).

    Args:
        folder: a run or eval directory holding ``metrics.json``.
        others: more such directories for a comparison report.
        out_dir: where to write (default ``folder``).

    Returns:
        The path of ``report.md``.
    """
    folders = [Path(folder)] + [Path(o) for o in others]
    out_dir = Path(out_dir) if out_dir is not None else folders[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _unique_names(folders)
    entries = [(n, read_metrics(f), f) for n, f in zip(names, folders)]
    points = [p for n, m, _ in entries for p in points_of(m, n)]
    svg = quality_size_svg(points)
    atomic_write_text(out_dir / PLOT_FILE, svg)
    title = title or ("diffsqueeze report: " + names[0] if len(entries) == 1 else f"diffsqueeze comparison of {len(entries)} runs")
    atomic_write_text(out_dir / "report.md", _markdown(title, entries, PLOT_FILE, out_dir))
    atomic_write_text(out_dir / "report.html", _html(title, entries, svg, out_dir))
    return out_dir / "report.md"


def _unique_names(folders: Sequence[Path]) -> list[str]:
    names = [f.resolve().name or str(f) for f in folders]
    if len(set(names)) < len(names):
        names = [str(f) for f in folders]
    return names
