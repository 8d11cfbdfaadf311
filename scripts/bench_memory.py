"""Peak resident memory of "load + one generation": packed compressed models vs the FP model.

Each model is measured in a fresh subprocess (peak RSS, ``ru_maxrss``, is per process), after the
imports, so the numbers are comparable; the weights' own bytes in memory (parameters + buffers of
every component, packed codes included) are reported beside them.

    python scripts/bench_memory.py builtin:tiny-sd runs/w4a16_fp runs/w1a4_binarydm \
        [--steps 10] [--out docs/BENCHMARKS.md]

With ``--out``, the table replaces the section between the ``bench_memory`` markers of that file.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BEGIN, END = "<!-- bench_memory:begin -->", "<!-- bench_memory:end -->"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_one(spec: str, steps: int) -> dict:
    """Load ``spec`` and generate one image; memory figures in MiB."""
    import torch

    import diffsqueeze.cli as cli
    from diffsqueeze.models import load_pipeline

    cli.quiet_libraries()
    torch.set_num_threads(1)
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
            "peak_rss_mb": round(rss_mb(), 1), "peak_over_imports_mb": round(rss_mb() - base, 1),
            "weights_in_memory_mb": round(weights / 2**20, 3), "load_s": round(load_s, 2), "generate_s": round(gen_s, 2)}


def table(rows: list[dict], steps: int) -> str:
    fp = rows[0]
    lines = [f"Load + one {steps}-step generation (1 image), CPU, one thread, each in a fresh process. "
             f"Command: `python scripts/bench_memory.py {' '.join(r['spec'] for r in rows)} --steps {steps}`.", "",
             "| model | weights in memory (MiB) | peak RSS (MiB) | peak RSS over imports (MiB) | vs FP | load s | generate s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["peak_over_imports_mb"] / fp["peak_over_imports_mb"] if fp["peak_over_imports_mb"] else float("nan")
        lines.append(f"| `{r['spec']}` | {r['weights_in_memory_mb']:.3f} | {r['peak_rss_mb']:.1f} | {r['peak_over_imports_mb']:.1f} "
                     f"| {ratio:.2f}x | {r['load_s']:.2f} | {r['generate_s']:.2f} |")
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Peak memory of packed models (bench_memory)\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="FP model first (builtin:NAME), then run directories / model folders")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
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
        write_section(args.out, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
