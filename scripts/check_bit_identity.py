"""Check that a change to the code leaves what the shipped recipes produce unchanged, byte for byte.

Runs the shipped recipes that finish in minutes on ``builtin:fashion`` (with the iteration counts
cut where a recipe trains), then fingerprints each run's ``model/`` folder, its comparison grid
and the per-image pixel digests of its evaluation images:

    python scripts/check_bit_identity.py record baseline.json   # before the change
    python scripts/check_bit_identity.py check baseline.json    # after it: exit 1 on any difference

What is compared, and why not raw file hashes everywhere:
- safetensors files: every tensor (name, dtype, shape, bytes) and the header's metadata as a
  sorted mapping. The safetensors writer orders metadata keys differently from one process to
  the next, so the raw bytes of two identical exports can differ while their content does not.
- ``diffsqueeze.json``: the JSON content without wall times and memory readings (fields that
  record how long a run took, not what it produced).
- other JSON files (diffusers configs): the content without ``_name_or_path``, the folder the
  source model was read from (it names the checkout, not the result).
- every other file in ``model/``, and ``grids/*.png``: sha256 of the bytes.
- evaluation images: the per-image pixel digests the evaluation job stores in its shards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (recipe, overrides): the recipes that run in minutes on 2 CPU cores.
RUNS: dict[str, tuple[str, list[str]]] = {
    "demo": ("configs/demo.yaml", []),
    "w8a8_int": ("configs/w8a8_int.yaml", ["eval.num_images=4"]),
    "w4a16_fp": ("configs/w4a16_fp.yaml", ["stages.0.ptq.rounding.iters=20", "eval.num_images=4"]),
    "w4a4_quest": ("configs/w4a4_quest.yaml", ["eval.num_images=4"]),
    "w1a4_binarydm": ("configs/w1a4_binarydm.yaml", ["stages.0.binarize.train.iters=20", "eval.num_images=4"]),
}

# keys whose values record the cost of a run (time, memory), not its result
VOLATILE_KEYS = {"wall_time_s", "peak_rss_mb", "peak_cuda_mb", "peak_memory_mb", "epoch_times_s", "s_per_epoch",
                 "seconds", "time_s", "started", "finished", "created", "elapsed_s", "images_per_s"}


def _strip_volatile(obj):
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in VOLATILE_KEYS and not k.endswith("_time_s")}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj


def safetensors_digest(path: Path) -> str:
    """sha256 of a safetensors file's tensors and metadata, independent of the header's key order."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    h = hashlib.sha256()
    h.update(json.dumps(header.pop("__metadata__", {}), sort_keys=True).encode())
    for name in sorted(header):
        info = header[name]
        start, end = info["data_offsets"]
        h.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
        h.update(body[start:end])
    return h.hexdigest()


def file_digest(path: Path) -> str:
    if path.suffix == ".safetensors":
        return safetensors_digest(path)
    if path.name == "diffsqueeze.json":
        content = _strip_volatile(json.loads(path.read_text(encoding="utf-8")))
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    if path.suffix == ".json":
        content = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(content, dict):  # diffusers records the folder the source model was read from
            content.pop("_name_or_path", None)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def eval_image_digests(run_dir: Path) -> str | None:
    """sha256 over the pixel digests in the evaluation shards, in image order."""
    shards = sorted((run_dir / "eval" / "shards").glob("batch-*.safetensors"))
    if not shards:
        return None
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for shard in shards:
        tensors = load_file(str(shard))
        for key in sorted(k for k in tensors if "digest" in k or "hash" in k):
            h.update(key.encode())
            h.update(tensors[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint(run_dir: Path) -> dict[str, str]:
    out = {}
    model = run_dir / "model"
    for f in sorted(p for p in model.rglob("*") if p.is_file()):
        out[f"model/{f.relative_to(model)}"] = file_digest(f)
    for f in sorted((run_dir / "grids").glob("*.png")):
        out[f"grids/{f.name}"] = file_digest(f)
    images = eval_image_digests(run_dir)
    if images is not None:
        out["eval/images"] = images
    return out


def run_all(work: Path, names: list[str]) -> dict[str, dict[str, str]]:
    result = {}
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for name in names:
        recipe, overrides = RUNS[name]
        out = work / name
        cmd = [sys.executable, "-m", "diffsqueeze", "run", str(ROOT / recipe), f"output_dir={out}", *overrides,
               "--overwrite"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        result[name] = fingerprint(out)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["record", "check"])
    ap.add_argument("fingerprints", type=Path, help="JSON file written by 'record', read by 'check'")
    ap.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bit-identity-") as tmp:
        work = args.work or Path(tmp)
        got = run_all(work, args.runs)
    if args.mode == "record":
        args.fingerprints.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"recorded {sum(len(v) for v in got.values())} fingerprints of {len(got)} runs in {args.fingerprints}")
        return 0
    want = json.loads(args.fingerprints.read_text(encoding="utf-8"))
    bad = []
    for name in args.runs:
        expected, actual = want.get(name, {}), got[name]
        for key in sorted(set(expected) | set(actual)):
            if expected.get(key) != actual.get(key):
                bad.append(f"{name}: {key}: {expected.get(key, 'missing')[:12]} -> {actual.get(key, 'missing')[:12]}")
    for line in bad:
        print("DIFFERS", line)
    print(f"{len(bad)} differences in {sum(len(v) for v in got.values())} fingerprints of {len(got)} runs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
