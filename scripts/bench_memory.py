"""Peak resident memory of "load + one generation": packed compressed models vs the FP model.

Each model is measured in a fresh subprocess (peak RSS, ``VmHWM``, is per process image), after the
imports, so the numbers are comparable; the weights' own bytes in memory (parameters + buffers of
every component, packed codes included) are reported beside them.

    python scripts/bench_memory.py builtin:tiny-sd runs/w4a16_fp runs/w1a4_binarydm \
        [--steps 10] [--out docs/BENCHMARKS.md]

With ``--out``, the table replaces the section between the ``bench_memory`` markers of that file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from diffsqueeze.process_memory import current_rss_mb, peak_rss_mb


def measure_one(spec: str, steps: int) -> dict:
    """Load ``spec`` and generate one image; memory figures in MiB."""
    import torch

    import diffsqueeze.cli as cli
    from diffsqueeze.loading import load_pipeline

    cli.quiet_libraries()
    torch.set_num_threads(1)
    import diffsqueeze.stages  # noqa: F401  (import everything a packed load imports before the baseline)
    base = current_rss_mb()
    t0 = time.perf_counter()
    pipe = load_pipeline(spec)
    load_s = time.perf_counter() - t0
    after_load = current_rss_mb()
    weights = sum(t.numel() * t.element_size() for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                  for t in list(c.parameters()) + list(c.buffers()))
    t0 = time.perf_counter()
    pipe(prompt=["a photo of a cat"], num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
         output_type="np")
    gen_s = time.perf_counter() - t0
    return {"spec": spec, "rss_after_imports_mb": round(base, 1), "rss_after_load_mb": round(after_load, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "peak_over_imports_mb": round(peak_rss_mb() - base, 1),
            "weights_in_memory_mb": round(weights / 2**20, 3), "load_s": round(load_s, 2), "generate_s": round(gen_s, 2)}


def make_synthetic(folder: Path, width: int) -> list[str]:
    """A larger model than tiny-sd, so that weight memory dominates: tiny-sd with a UNet of
    ``block_out_channels = (width, 2 width, 2 width)`` (random weights), saved FP and with every
    conv/linear of the UNet INT4-RTN quantized (per channel, weight-only) and exported packed."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffsqueeze.loading import load_pipeline
    from diffsqueeze.models import save_pipeline
    from diffsqueeze.models.state import CompressionState
    from diffsqueeze.quant.export.save import export_pipeline
    from diffsqueeze.quant.nn.layers import make_quant_module
    from diffsqueeze.quant.nn.swaps import swap_module
    from diffsqueeze.quant.primitives.formats import int_qparams

    torch.manual_seed(0)
    pipe = load_pipeline("builtin:tiny-sd")
    pipe.unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32).eval()
    pipe.register_modules(unet=pipe.unet)
    save_pipeline(pipe, folder / "fp")
    state = CompressionState()
    for name, m in list(pipe.unet.named_modules()):
        if type(m) in (torch.nn.Linear, torch.nn.Conv2d):
            q = make_quant_module(m, {"weight_format": "int4"})
            g = q.weight_quant.grouped(q.weight.detach())
            s, z = int_qparams(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), 4, False)
            q.weight_quant.set_params(scale=s, zero_point=z)
            swap_module(pipe.unet, name, q)
            state.modules[f"unet/{name}"] = {"kind": type(q).__name__, **q.config}
    export_pipeline(pipe, state, folder / "int4")
    return [str(folder / "fp"), str(folder / "int4")]


def table(rows: list[dict], steps: int) -> str:
    fp = rows[0]
    lines = [f"Load + one {steps}-step generation (1 image), CPU, one thread, each in a fresh process; "
             f"'over imports' = peak RSS minus RSS after importing torch/diffusers/diffsqueeze. "
             f"Command: `python {' '.join(sys.argv)}`.", "",
             "| model | weights in memory (MiB) | peak RSS (MiB) | peak RSS over imports (MiB) | vs its FP | load s | generate s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = r if r["spec"].endswith("/fp") else fp
        if r["spec"].endswith("/int4"):
            ref = next(x for x in rows if x["spec"].endswith("/fp"))
        ratio = r["peak_over_imports_mb"] / ref["peak_over_imports_mb"] if ref["peak_over_imports_mb"] else float("nan")
        lines.append(f"| `{r['spec']}` | {r['weights_in_memory_mb']:.3f} | {r['peak_rss_mb']:.1f} | {r['peak_over_imports_mb']:.1f} "
                     f"| {ratio:.2f}x | {r['load_s']:.2f} | {r['generate_s']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="FP model first (builtin:NAME), then run directories / model folders")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--synthetic", type=Path, default=None,
                    help="also build (if missing) and measure a wider-UNet FP / packed-INT4 pair in this folder")
    ap.add_argument("--width", type=int, default=128)
    args = ap.parse_args()
    if args.synthetic is not None and not args.one:
        if not (args.synthetic / "int4" / "model_index.json").is_file():
            make_synthetic(args.synthetic, args.width)
        args.specs += [str(args.synthetic / "fp"), str(args.synthetic / "int4")]
    if args.one:
        print(json.dumps(measure_one(args.specs[0], args.steps)))
        return 0
    rows = []
    for spec in args.specs:
        res = subprocess.run([sys.executable, __file__, spec, "--one", "--steps", str(args.steps)],
                             capture_output=True, text=True, check=False)
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            return res.returncode
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    body = table(rows, args.steps)
    print(body)
    if args.out:
        from diffsqueeze.metrics.compare import write_marked_section

        write_marked_section(args.out, "bench_memory", body, "Peak memory of packed models (bench_memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
