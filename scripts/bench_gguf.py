"""Seconds per image of a GGUF or torchao export in plain diffusers, against the FP32 pipeline it came from.

For each (model, type): a round-to-nearest ``ptq`` run of the model on the type's grid, its
``diffsqueeze export --format gguf|torchao``, the FP32 model saved as a plain diffusers folder; then both
are timed in plain diffusers, each in its own fresh process that never imports diffsqueeze (the
export's own LOAD.md lines; ``from_pretrained`` for FP32), A and B in turns, ``--repeats`` times,
the median of each and their ratio. Also the mean absolute pixel difference between the two
(their weights differ by the quantization). Writes a Markdown table into ``--out`` (a marked
section) with this command under it.

    python scripts/bench_gguf.py --models builtin:tiny-dit builtin:tiny-flux --types q8_0 q4_0 q4_k torchao-int8wo torchao-int8dq --out docs/BENCHMARKS.md

Types: GGUF types (``q8_0``, ``q4_0``, ``q4_k``, ...: weight-only) and torchao layouts
(``torchao-int8wo``: int8 weights per output channel; ``torchao-int8dq``: and int8 activations
quantized per token on the fly; ``torchao-fp8wo``: float8 E4M3 weights per channel).
    (the GPU rows: scripts/bench_targets_gpu.py, scripts/gpu_bench.sh part 'targets')
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TIMED = textwrap.dedent("""
    import json, sys, time
    import numpy as np, torch
    folder, kind, device, steps, images, size, out = sys.argv[1:8]
    torch.manual_seed(0)
    if kind in ("gguf", "torchao"):
        scope = {}
        exec(json.load(open(folder + f"/{kind}_export.json"))["load"], scope)  # the export's own LOAD.md lines
        pipe = scope["pipe"]
    else:
        from diffusers import DiffusionPipeline
        index = json.load(open(folder + "/model_index.json"))
        absent = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}
        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, **absent)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    assert "diffsqueeze" not in sys.modules
    kw = dict(num_inference_steps=int(steps), guidance_scale=2.0, output_type="np")
    if int(size):
        kw.update(height=int(size), width=int(size))
    pipe(prompt=["warm-up"], generator=torch.Generator().manual_seed(0), **kw)  # first-call costs out of the timing
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    got = pipe(prompt=["a photo"] * int(images), generator=torch.Generator().manual_seed(1), **kw).images
    if device == "cuda":
        torch.cuda.synchronize()
    np.save(out, got)
    print(json.dumps({"s_per_image": (time.perf_counter() - t0) / int(images)}))
""")


def sh(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return proc.stdout


NEAREST = {"method": "nearest"}
PER_TOKEN = {"bits": 8, "format": "int", "granularity": "group", "group_size": 4096}  # one group wider than a row
TORCHAO_PTQ = {  # the ptq stage whose grid each torchao layout stores exactly (docs/artifacts.md)
    "torchao-int8wo": {"weights": {"bits": 8, "format": "int_sym"}, "activations": None, "rounding": NEAREST},
    "torchao-int8dq": {"weights": {"bits": 8, "format": "int_sym"}, "activations": PER_TOKEN, "rounding": NEAREST,
                       "exclude": ["pos_embed.*"]},  # the patch-embedding convolution stays float
    "torchao-fp8wo": {"weights": {"bits": 8, "format": "fp8_e4m3_hw"}, "activations": None, "rounding": NEAREST},
}


def target_of(fmt: str) -> str:
    return "torchao" if fmt.startswith("torchao-") else "gguf"


def ptq_of(fmt: str) -> dict:
    if target_of(fmt) == "torchao":
        return TORCHAO_PTQ[fmt]
    return {"weights": {"bits": int(fmt[1]), "format": fmt}, "activations": None, "rounding": NEAREST}


def prepare(work: Path, model: str, fmt: str) -> tuple[Path, Path]:
    """(FP32 diffusers folder, export folder) of ``model`` at type ``fmt``."""
    import yaml

    fp = work / model.replace(":", "-") / "fp32"
    if not fp.is_dir():
        sh([sys.executable, "-c", f"from diffsqueeze.loading import load_pipeline; "
                                  f"load_pipeline({model!r}).save_pretrained({str(fp)!r})"])
    run = work / model.replace(":", "-") / fmt
    export = run.with_name(f"{fmt}-export")
    if not export.is_dir():
        recipe = {"model": model, "output_dir": str(run), "device": "cpu",
                  "calibration": {"num_samples": 1, "timesteps": 2, "num_inference_steps": 2, "batch_size": 1},
                  "stages": [{"ptq": ptq_of(fmt)}]}
        path = run.with_suffix(".yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe))
        sh([sys.executable, "-m", "diffsqueeze", "run", str(path), "--overwrite"])
        sh([sys.executable, "-m", "diffsqueeze", "export", str(run), "--format", target_of(fmt), "--out", str(export)])
    return fp, export


def timed(script: Path, folder: Path, kind: str, args, out: Path) -> float:
    line = sh([sys.executable, "-I", str(script), str(folder), kind, args.device, str(args.steps), str(args.images),
               str(args.size), str(out)]).strip().splitlines()[-1]
    return json.loads(line)["s_per_image"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["builtin:tiny-dit", "builtin:tiny-flux"])
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_0"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--images", type=int, default=4, help="images per timed call")
    ap.add_argument("--size", type=int, default=0, help="image side in pixels (0: the model's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-gguf")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np

    args.work.mkdir(parents=True, exist_ok=True)
    script = args.work / "timed.py"
    script.write_text(TIMED)
    rows = []
    for model in args.models:
        for fmt in args.types:
            fp, export = prepare(args.work, model, fmt)
            a, b = [], []
            for _ in range(args.repeats):  # in turns: the machine's load moves both alike
                a.append(timed(script, fp, "fp32", args, args.work / "fp.npy"))
                b.append(timed(script, export, target_of(fmt), args, args.work / "export.npy"))
            diff = float(np.abs(np.load(args.work / "fp.npy") - np.load(args.work / "export.npy")).mean())
            size = json.loads((export / f"{target_of(fmt)}_export.json").read_text())["components"]
            rows.append((model, fmt, statistics.median(a), statistics.median(b), diff,
                         sum(c["bytes"] for c in size.values())))
            print(rows[-1], flush=True)
    import diffusers
    import torch

    machine = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or platform.machine()}, " \
              f"{torch.get_num_threads()} torch threads"
    lines = [f"Plain diffusers {diffusers.__version__}, torch {torch.__version__}, {args.device} ({machine}); "
             f"{args.images} images per call, {args.steps} steps, median of {args.repeats} calls each, FP32 and the "
             "export in turns, each call in a fresh process that never imports diffsqueeze. Bytes: the compressed "
             "component's weights file.", "",
             f"Command: `python scripts/bench_gguf.py {' '.join(sys.argv[1:])}`", "",
             "| model | type | FP32 s/image | export s/image | export / FP32 time | mean abs pixel diff | weights file bytes |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, fmt, ta, tb, diff, nbytes in rows:
        lines.append(f"| {model} | {fmt} | {ta:.3f} | {tb:.3f} | {tb / ta:.2f} | {diff:.4f} | {nbytes:,} |")
    body = "\n".join(lines)
    print(body)
    if args.out:
        sys.path.insert(0, str(REPO))
        from diffsqueeze.metrics.compare import write_marked_section

        write_marked_section(args.out, f"bench_gguf:{args.device}",
                             body, f"GGUF and torchao exports in plain diffusers ({args.device}, bench_gguf)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
