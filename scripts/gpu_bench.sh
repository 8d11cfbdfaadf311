#!/usr/bin/env bash
# The GPU benchmark in one call (at most 8 minutes on one H100/H200): QuEST's two stages at SD-1.5
# size (scripts/bench_quest.py --size full) and the SD-1.5 rows of scripts/bench_scale.py on CUDA
# (prune -> W8A8 RTN and W4A4 + QuEST: wall time, peak RSS and peak CUDA memory per stage).
# Results land in $OUT (default runs/gpu): quest.jsonl, scale.json, scale.md and one log per part;
# the large working files (models, runs) go to $WORK (default /tmp/diffsqueeze-gpu-bench). Copy the
# tables into docs/BENCHMARKS.md with the card's name and this command.
#
#   bash scripts/gpu_bench.sh            # on the GPU machine
#   bash scripts/gpu_bench.sh --dry-run  # the same commands at small size on the CPU, to check the script
#
# Each part runs under its own time limit and a part that fails or runs out of time does not stop
# the next one (its log says why); bench_scale writes its JSON after every run, so a cut-short part
# keeps what finished. Needs torch (with CUDA unless --dry-run), diffusers, transformers, accelerate
# and safetensors importable, and this repository's root as the working directory. bench_speed's
# GPU rows (FP8/INT8 kernels against fp16) are not here: no CUDA low-bit kernel path is built yet
# (docs/BENCHMARKS.md).
set -uo pipefail
OUT=${OUT:-runs/gpu}
WORK=${WORK:-/tmp/diffsqueeze-gpu-bench}
PYTHON=${PYTHON:-python3}
QUEST_LIMIT=${QUEST_LIMIT:-250}
SCALE_LIMIT=${SCALE_LIMIT:-230}
mkdir -p "$OUT" "$WORK"
if [ "${1:-}" = "--dry-run" ]; then
  DEVICE=cpu; SIZE=small; SCALE=(--small)
else
  DEVICE=cuda; SIZE=full; SCALE=()
  "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 1
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, installed or not
status=0
timeout "$QUEST_LIMIT" "$PYTHON" scripts/bench_quest.py --size "$SIZE" --device "$DEVICE" --workdir "$WORK/quest-work" \
  --out "$OUT/quest.jsonl" 2>&1 | tee "$OUT/quest.log" || { echo "bench_quest failed or ran out of time (exit $?)"; status=1; }
timeout "$SCALE_LIMIT" "$PYTHON" scripts/bench_scale.py "${SCALE[@]}" --models sd15 --recipes "prune -> W8A8 RTN" "W4A4 + QuEST" \
  --device "$DEVICE" --work "$WORK/scale" --json "$OUT/scale.json" --out "$OUT/scale.md" 2>&1 | tee "$OUT/scale.log" \
  || { echo "bench_scale failed or ran out of time (exit $?)"; status=1; }
rm -rf "$WORK"
echo "done: $OUT (status $status)"
exit $status
