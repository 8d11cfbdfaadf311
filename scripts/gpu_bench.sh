#!/usr/bin/env bash
# The GPU benchmark in one call (about 5 minutes on one H100/H200): QuEST's two stages at SD-1.5
# size (scripts/bench_quest.py --size full) and the SD-1.5 rows of scripts/bench_scale.py on CUDA
# (prune -> W8A8 RTN and W4A4 + QuEST: wall time, peak RSS and peak CUDA memory per stage).
# Results land in $OUT (default runs/gpu): quest.jsonl, scale.json, scale.md; copy the tables into
# docs/BENCHMARKS.md with the card's name and this command.
#
#   bash scripts/gpu_bench.sh            # on the GPU machine
#   bash scripts/gpu_bench.sh --dry-run  # the same commands at small size on the CPU, to check the script
#
# Needs torch with CUDA, diffusers, transformers, accelerate and safetensors importable, and this
# repository's root as the working directory. bench_speed's GPU rows (FP8/INT8 kernels against
# fp16) are not here: no CUDA low-bit kernel path is built yet (docs/BENCHMARKS.md).
set -euo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if [ "${1:-}" = "--dry-run" ]; then
  DEVICE=cpu; SIZE=small; SCALE=(--small)
else
  DEVICE=cuda; SIZE=full; SCALE=()
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
fi
export PYTHONUNBUFFERED=1
python scripts/bench_quest.py --size "$SIZE" --device "$DEVICE" --workdir "$OUT/quest-work" --out "$OUT/quest.jsonl"
python scripts/bench_scale.py "${SCALE[@]}" --models sd15 --recipes "prune -> W8A8 RTN" "W4A4 + QuEST" \
  --device "$DEVICE" --work "$OUT/scale" --json "$OUT/scale.json" --out "$OUT/scale.md"
echo "done: $OUT"
