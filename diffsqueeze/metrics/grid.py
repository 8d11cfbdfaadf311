"""Fixed-seed image generation and side-by-side grids (``diffsqueeze grid``).

Rows are prompt x seed, columns are models; every cell of a row is generated with the same
prompt, seed, sampler, steps and guidance. Each image gets its own ``torch.Generator`` seeded
with its seed, so an image does not depend on which other images share its batch.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

from diffsqueeze.metrics.images import to_uint8_batch
from diffsqueeze.metrics.pipeline_info import (
    denoiser_bytes,
    pipeline_device,
    resolve_sampling,
    sampler_description,
)
from diffsqueeze.models.conditioning import (
    check_size,
    conditioning_of,
    generate,
    pipeline_prompts,
    raw_images,
    truncation_warnings,
    warn_once,
)

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float | None,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Generate one image per ``(prompt, seed)`` pair.

    Args:
        pipe: any diffusers pipeline: text-to-image, class-conditional (prompts are its labels)
            or unconditional (prompts are ignored), see :mod:`diffsqueeze.models.conditioning`.
        prompts, seeds: equal-length sequences; image ``i`` uses ``prompts[i]`` and a generator
            seeded with ``seeds[i]``.
        height, width: image size (default: the pipeline's own).

    Returns:
        uint8 ``(N, 3, H, W)`` on the CPU (diffusers' own rounding, see ``images.to_uint8_batch``).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = pipeline_device(pipe)
    gen_device = "cpu" if device.type == "mps" else device
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator(gen_device).manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        result = generate(pipe, list(prompts[i : i + batch_size]), gens, num_inference_steps, guidance_scale,
                          "pt", height, width)
        images = raw_images(result)
        out.append(to_uint8_batch(images.float().cpu() if torch.is_tensor(images) else images))
    return torch.cat(out) if out else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)


def known_metric(spec: str) -> str | None:
    """A headline metric for a column label, from ``metrics.json`` of a run / eval directory."""
    path = Path(spec) / "metrics.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    fidelity = data.get("fidelity") if isinstance(data.get("fidelity"), dict) else {}
    fid = data.get("fid") if isinstance(data.get("fid"), dict) else {}
    n = f" (n={fid['num_generated']})" if isinstance(fid.get("num_generated"), int) else ""
    candidates = (("FID {:.2f}" + n, data.get("fid")), ("CLIP {:.2f}", data.get("clip_score")),
                  ("PSNR {:.1f} dB", fidelity.get("psnr")))
    for fmt, value in candidates:
        if isinstance(value, dict):
            value = value.get("value")
        if isinstance(value, (int, float)):
            return fmt.format(value)
    return None


@dataclass
class GridColumn:
    """One model's column: its images in row order and the label lines above them."""

    name: str
    images: torch.Tensor  # uint8 (rows, 3, H, W)
    label: list[str] = field(default_factory=list)


def _font(size: int):
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return PIL.ImageFont.load_default()


def make_grid(columns: Sequence[GridColumn], row_labels: Sequence[str], cell: int = 128, pad: int = 4) -> PIL.Image.Image:
    """Draw the grid: a header row of column labels, a left column of row labels, images upscaled
    to ``cell`` pixels (nearest-neighbour for small images, so pixels stay visible)."""
    if not columns:
        raise ValueError("a grid needs at least one column")
    rows = len(row_labels)
    for c in columns:
        if len(c.images) != rows:
            raise ValueError(f"column '{c.name}' has {len(c.images)} images for {rows} rows")
    font = _font(12)
    line_h = 15
    header_h = pad * 2 + line_h * max(len(c.label) + 1 for c in columns)
    wrap = max(12, cell // 7)
    wrapped = [textwrap.wrap(label, wrap)[:6] or [""] for label in row_labels]
    left_w = cell + 2 * pad
    width = left_w + len(columns) * (cell + pad) + pad
    height = header_h + rows * (cell + pad) + pad
    canvas = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for j, col in enumerate(columns):
        x = left_w + j * (cell + pad)
        for k, line in enumerate([col.name] + list(col.label)):
            draw.text((x, pad + k * line_h), line[: max(8, cell // 6)], fill="black", font=font)
        for r in range(rows):
            arr = col.images[r].permute(1, 2, 0).cpu().numpy()
            im = PIL.Image.fromarray(arr)
            resample = PIL.Image.NEAREST if im.width < cell else PIL.Image.BICUBIC
            canvas.paste(im.resize((cell, cell), resample), (x, header_h + r * (cell + pad)))
    for r, lines in enumerate(wrapped):
        y = header_h + r * (cell + pad)
        for k, line in enumerate(lines):
            draw.text((pad, y + k * line_h), line, fill="black", font=font)
    return canvas


def make_paired_grid(columns: Sequence[GridColumn], prompts: Sequence[str], seeds: Sequence[int], cell: int = 64,
                     max_rows: int = 5, pad: int = 4) -> PIL.Image.Image:
    """A compact grid that fits a screen: prompts as rows, and for each seed the models side by side
    (original next to compressed), the prompts wrapped into blocks of ``max_rows`` placed side by side.

    ``columns`` hold their images in :func:`grid_rows` order (prompt-major, then seed).
    """
    n_p, n_s = len(prompts), len(seeds)
    for c in columns:
        if len(c.images) != n_p * n_s:
            raise ValueError(f"column '{c.name}' has {len(c.images)} images for {n_p} prompts x {n_s} seeds")
    font = _font(11)
    line_h = 14
    label_w = max(cell, 96)
    group_w = len(columns) * (cell + pad) + 2 * pad  # one seed's models, then a gap before the next seed
    block_w = label_w + n_s * group_w + pad
    blocks = -(-n_p // max_rows)
    rows = min(n_p, max_rows)
    header_h = pad + 2 * line_h + pad
    canvas = PIL.Image.new("RGB", (blocks * block_w, header_h + rows * (cell + pad) + pad), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for b in range(blocks):
        x0 = b * block_w
        for s, seed in enumerate(seeds):
            for j, col in enumerate(columns):
                x = x0 + label_w + s * group_w + j * (cell + pad)
                draw.text((x, pad), col.name[: max(6, cell // 6)], fill="black", font=font)
                draw.text((x, pad + line_h), f"seed {seed}", fill="#555", font=font)
        for r in range(rows):
            i = b * max_rows + r
            if i >= n_p:
                break
            y = header_h + r * (cell + pad)
            for k, line in enumerate(textwrap.wrap(prompts[i], max(10, label_w // 7))[: max(1, cell // line_h)]):
                draw.text((x0 + pad, y + k * line_h), line, fill="black", font=font)
            for s in range(n_s):
                for j, col in enumerate(columns):
                    im = PIL.Image.fromarray(col.images[i * n_s + s].permute(1, 2, 0).cpu().numpy())
                    resample = PIL.Image.NEAREST if im.width < cell else PIL.Image.BICUBIC
                    x = x0 + label_w + s * group_w + j * (cell + pad)
                    canvas.paste(im.resize((cell, cell), resample), (x, y))
    return canvas


def grid_rows(prompts: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], list[int], list[str]]:
    """Rows prompt x seed: ``(prompts per row, seeds per row, row labels)``."""
    row_prompts = [p for p in prompts for _ in seeds]
    row_seeds = [int(s) for _ in prompts for s in seeds]
    labels = [f"{p} [seed {s}]" for p, s in zip(row_prompts, row_seeds)]
    return row_prompts, row_seeds, labels


def column_label(pipe, spec: str | None, metric: str | None = None) -> list[str]:
    """Label lines under a column's name: denoiser size (and where it was measured), a metric."""
    from diffsqueeze.models.io import model_folder

    folder = model_folder(spec) if spec and not spec.startswith("builtin:") and Path(spec).exists() else None
    size, kind = denoiser_bytes(pipe, folder)
    lines = [f"{size / 1e6:.2f} MB ({kind})"]
    metric = metric or (known_metric(spec) if spec else None)
    if metric:
        lines.append(metric)
    return lines


def grid_for_models(
    specs: Sequence[str],
    prompts: Sequence[str] | None,
    seeds: Sequence[int],
    num_inference_steps: int | None,
    guidance_scale: float | None,
    device: str = "cpu",
    dtype: str = "float32",
    names: Sequence[str] | None = None,
    batch_size: int = 8,
    cell: int = 128,
    prompt_set: str | None = None,
    max_prompts: int = 0,
    height: int | None = None,
    width: int | None = None,
    kernels: str = "simulated",
    decode: str = "forward",
) -> tuple[PIL.Image.Image, dict]:
    """Load each model in turn, generate the rows, draw the grid.

    ``num_inference_steps`` / ``guidance_scale`` left ``None`` take the first model's own
    defaults (:func:`~diffsqueeze.metrics.pipeline_info.sampling_defaults`), for every column.
    ``prompts`` left ``None`` are the first model's conditions from ``prompt_set``
    (:func:`~diffsqueeze.models.conditioning.pipeline_prompts`: class labels for a
    class-conditional model, one unconditional row per seed for an unconditional one), the
    first ``max_prompts`` of them (0: all).

    Returns:
        ``(image, info)``; ``info`` records prompts, seeds, steps, guidance and each column's
        sampler and size (the grid's provenance).
    """
    from diffsqueeze.loading import load_pipeline

    columns, info_cols = [], []
    checked = prompts
    for k, spec in enumerate(specs):
        name = names[k] if names else Path(spec).name if Path(spec).exists() else spec
        pipe = load_pipeline(spec, device=device, dtype=dtype, kernels=kernels, decode=decode)
        if prompts is None:
            prompts = checked = pipeline_prompts(pipe, prompt_set)
            prompts = prompts[:max_prompts] if max_prompts else prompts
        elif conditioning_of(pipe).has_text:  # each column's tokenizers (the first's were checked with its set)
            for message in truncation_warnings(pipe, checked, prompt_set or "the grid's prompts"):
                warn_once(message)
        check_size(pipe, height, width, "grid")
        row_prompts, row_seeds, labels = grid_rows(prompts, seeds)
        log.info("grid: generating %d images with %s", len(row_prompts), spec)
        if num_inference_steps is None or guidance_scale is None:  # every column samples as the first model would
            num_inference_steps, guidance_scale = resolve_sampling(pipe, num_inference_steps, guidance_scale)
        images = generate_images(pipe, row_prompts, row_seeds, num_inference_steps, guidance_scale, batch_size,
                                 height, width)
        label = column_label(pipe, spec)
        columns.append(GridColumn(name, images, label))
        info_cols.append({"name": name, "model": spec, "sampler": sampler_description(pipe), "label": label})
        del pipe
    samplers = {c["sampler"] for c in info_cols}
    if len(samplers) > 1:
        log.warning("grid columns use different samplers: %s", "; ".join(sorted(samplers)))
    info = {"prompts": list(prompts), "seeds": [int(s) for s in seeds], "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale, "kernels": kernels, "decode": decode, "dtype": dtype,
            "device": torch.device(device).type, "torch_threads": torch.get_num_threads(), "columns": info_cols,
            "same_sampler": len(samplers) == 1}
    return make_grid(columns, labels, cell=cell), info
