#!/usr/bin/env bash
# The GPU benchmark on one H100/H200. Parts, chosen with PARTS (default "quest sd15", at most 8
# minutes: one call); each runs at most its limit (LIMIT_<part>, seconds), all five together up
# to 18 minutes, so a second call takes the rest (PARTS="sd15-more sdxl flux", at most 10 minutes):
#   quest      QuEST's two stages at SD-1.5 size (scripts/bench_quest.py --size full)
#   sd15       scripts/bench_scale.py on CUDA, SD-1.5: prune -> W8A8 RTN and W4A4 + QuEST
#   sd15-more  the same, SD-1.5: W4A8 AdaRound and W1A4 BinaryDM
#   sdxl       the same, SDXL: prune -> W8A8 RTN
#   flux       the same, Flux-class: prune -> W8A8 RTN
# (wall time, peak RSS and peak CUDA memory per stage). Not in either call, run alone (at most
# LIMIT_targets, 300 s by default): PARTS=targets bash scripts/gpu_bench.sh
#   targets    scripts/bench_targets_gpu.py: seconds per denoiser forward and peak CUDA memory of
#              the deploy formats (torchao int8 / int8 dynamic / float8 dynamic, GGUF Q8_0 / Q4_0 /
#              Q4_K) against bf16, with torch.compile, SD3-medium-class and Flux-class, random weights
#              (targets.json, targets.md); rows it has no time left for are listed as not started
# Results land in $OUT (default runs/gpu):
# quest.jsonl, scale-<part>.json, scale-<part>.md and one log per part; the large working files
# (models, runs) go to $WORK (default /tmp/diffsqueeze-gpu-bench). Copy the tables into
# docs/BENCHMARKS.md with the card's name and this command.
#
#   bash scripts/gpu_bench.sh                                  # on the GPU machine: quest, sd15
#   PARTS="sd15-more sdxl flux" bash scripts/gpu_bench.sh      # the other parts
#   PARTS=targets bash scripts/gpu_bench.sh                    # the deploy formats against bf16
#   bash scripts/gpu_bench.sh --dry-run                        # the same at small size on the CPU
#
# A part that fails or runs out of time does not stop the next one (its log says why);
# bench_scale writes its JSON after every run, so a cut-short part keeps what finished. Needs
# torch (with CUDA unless --dry-run), diffusers, transformers, accelerate and safetensors
# importable (targets also torchao and gguf: without them its rows for those formats say so),
# and this repository's root as the working directory. bench_speed's GPU rows
# (FP8/INT8 kernels against fp16) are not here: no CUDA low-bit kernel path is built yet
# (docs/BENCHMARKS.md).
set -uo pipefail
OUT=${OUT:-runs/gpu}
WORK=${WORK:-/tmp/diffsqueeze-gpu-bench}
PYTHON=${PYTHON:-python3}
PARTS=${PARTS:-quest sd15}
LIMIT_quest=${LIMIT_quest:-250}
LIMIT_sd15=${LIMIT_sd15:-230}
LIMIT_sd15_more=${LIMIT_sd15_more:-200}
LIMIT_sdxl=${LIMIT_sdxl:-220}
LIMIT_flux=${LIMIT_flux:-160}
LIMIT_targets=${LIMIT_targets:-300}
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

scale() {  # scale PART LIMIT MODEL RECIPE...: one bench_scale part under its own time limit
  local part=$1 limit=$2 model=$3; shift 3
  echo "== $part (limit ${limit} s)"
  timeout "$limit" "$PYTHON" scripts/bench_scale.py "${SCALE[@]}" --models "$model" --recipes "$@" --device "$DEVICE" \
    --work "$WORK/scale-$part" --json "$OUT/scale-$part.json" --out "$OUT/scale-$part.md" 2>&1 | tee "$OUT/scale-$part.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "$part failed or ran out of time (exit $rc)"; status=1; }
  rm -rf "$WORK/scale-$part"
}

for part in $PARTS; do
  case $part in
    quest)
      echo "== quest (limit ${LIMIT_quest} s)"
      timeout "$LIMIT_quest" "$PYTHON" scripts/bench_quest.py --size "$SIZE" --device "$DEVICE" --workdir "$WORK/quest-work" \
        --out "$OUT/quest.jsonl" 2>&1 | tee "$OUT/quest.log"
      rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "quest failed or ran out of time (exit $rc)"; status=1; } ;;
    sd15) scale sd15 "$LIMIT_sd15" sd15 "prune -> W8A8 RTN" "W4A4 + QuEST" ;;
    sd15-more) scale sd15-more "$LIMIT_sd15_more" sd15 "W4A8 AdaRound" "W1A4 BinaryDM" ;;
    sdxl) scale sdxl "$LIMIT_sdxl" sdxl "prune -> W8A8 RTN" ;;
    flux) scale flux "$LIMIT_flux" flux "prune -> W8A8 RTN" ;;
    targets)  # the script stops starting rows 30 s before the limit (imports and the tables need the rest)
      echo "== targets (limit ${LIMIT_targets} s)"
      timeout "$LIMIT_targets" "$PYTHON" scripts/bench_targets_gpu.py "${SCALE[@]}" --device "$DEVICE" \
        --budget-s $((LIMIT_targets - 30)) --json "$OUT/targets.json" --out "$OUT/targets.md" 2>&1 | tee "$OUT/targets.log"
      rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "targets failed or ran out of time (exit $rc)"; status=1; } ;;
    *) echo "unknown part: $part (quest, sd15, sd15-more, sdxl, flux, targets)"; exit 2 ;;
  esac
done
rm -rf "$WORK"
echo "done: $OUT (status $status)"
exit $status
