"""Subcommands ``eval``, ``grid`` and ``report`` (wired into :mod:`diffsqueeze.cli`).

Each ``add_*_parser(subparsers)`` adds its subcommand and sets ``func`` to a handler that takes
the parsed namespace and returns an exit code. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _add_sampling_args(p: argparse.ArgumentParser, steps: int, guidance: float) -> None:
    p.add_argument("--prompts", default="builtin", help="prompt set name (builtin, builtin:NAME) or a text file, one prompt a line")
    p.add_argument("--steps", type=int, default=steps, help=f"sampler steps (default {steps})")
    p.add_argument("--guidance", type=float, default=guidance, help=f"classifier-free guidance scale (default {guidance})")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="pipeline dtype (default: float16 on cuda, float32 on cpu)")


def _device_dtype(args: argparse.Namespace) -> tuple[str, str]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    return device, dtype


def cmd_grid(args: argparse.Namespace) -> int:
    from diffsqueeze.errors import DiffsqueezeError
    from diffsqueeze.metrics.grid import grid_for_models
    from diffsqueeze.models import check_model_spec
    from diffsqueeze.models.prompts import load_prompts

    if args.names and len(args.names) != len(args.models):
        raise DiffsqueezeError(f"--names gives {len(args.names)} names for {len(args.models)} models")
    if args.steps < 1 or args.batch_size < 1:
        raise DiffsqueezeError("--steps and --batch-size must be >= 1")
    for spec in args.models:
        check_model_spec(spec)
    prompts = load_prompts(args.prompts)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise DiffsqueezeError(f"--out '{out}' must end in .png, .jpg or .webp")
    _quiet_libraries()
    device, dtype = _device_dtype(args)
    image, info = grid_for_models(args.models, prompts, args.seeds, args.steps, args.guidance, device=device,
                                  dtype=dtype, names=args.names, batch_size=args.batch_size, cell=args.cell)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    info["prompt_source"] = args.prompts
    out.with_suffix(".json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(f"grid: {out} ({len(prompts) * len(args.seeds)} rows x {len(args.models)} models; provenance in {out.with_suffix('.json')})")
    return 0


def add_grid_parser(subparsers) -> argparse.ArgumentParser:
    """``diffsqueeze grid --models A B C --prompts FILE|builtin --seeds 0 1 --out grid.png``."""
    p = subparsers.add_parser("grid", help="side-by-side image grid: rows prompt x seed, columns models",
                              description="Generate every (prompt, seed) with every model (same sampler, steps, "
                              "guidance) and draw one PNG; columns are labelled with the denoiser size and a "
                              "metric from the model's metrics.json if it has one.")
    p.add_argument("--models", nargs="+", required=True, help="builtin:NAME, diffusers folders, run directories or hub ids")
    p.add_argument("--names", nargs="+", default=None, help="column names (default: the model specs)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds (default 0 1)")
    p.add_argument("--max-prompts", type=int, default=4, help="use the first N prompts of the set (default 4; 0 = all)")
    p.add_argument("--out", default="grid.png", help="output image (default grid.png); a .json with the provenance goes beside it")
    p.add_argument("--cell", type=int, default=128, help="cell size in pixels (default 128)")
    _add_sampling_args(p, steps=20, guidance=7.5)
    p.set_defaults(func=cmd_grid)
    return p
