#!/usr/bin/env bash
# The full evaluation protocol (docs/evaluation.md) for the results table: five rows on the same
# classifier and the same seeded test subset, then docs/results.md. Resumable at batch
# granularity: every `atop eval` keeps its state in $OUT/<row>.state.json, so re-running this
# script after a kill (or a reboot) continues where it stopped; finished rows (<row>.json
# present) are skipped. Run it in the background:
#   nohup recipes/eval_full.sh ../shared/data/cifar10 runs runs/eval > runs/eval-full.log 2>&1 &
# Two rows run at a time with one thread each (two cores, no oversubscription). Upper-bound wall
# time on this machine (1 thread per row, 512 images, measured costs, docs/evaluation.md):
# AToP or AP ~16 h each, RT only ~2 h, undefended and AT < 1 h each: ~18 h with 2 rows at a time.
#
# Environment knobs: N (images, 512), PRESET (leekim | quick), SAMPLES (votes, 8), JOBS (2),
# DEVICE (cpu | cuda; on a GPU use JOBS=1 and a larger BATCH, e.g. 256), BATCH (64),
# STORE and MODEL (attack the exported store version for the AToP row instead of checkpoints),
# AT (path of an adversarially trained classifier checkpoint; the row is skipped if absent), CLF
# (the frozen classifier every row shares; default the recipe's adapted ensemble), PUR (the AToP
# purifier; default the recipe's last fine-tune stage).
set -euo pipefail
DATA=${1:-../shared/data/cifar10}
RUNS=${2:-runs}
OUT=${3:-$RUNS/eval}
N=${N:-512}
PRESET=${PRESET:-leekim}
SAMPLES=${SAMPLES:-8}
JOBS=${JOBS:-2}
DEVICE=${DEVICE:-cpu}
BATCH=${BATCH:-64}
AT=${AT:-$RUNS/classifier-at/final.safetensors}
CLF=${CLF:-$RUNS/classifier-ens-pur/final.safetensors}
PUR=${PUR:-$RUNS/finetune-2/final.safetensors}
mkdir -p "$OUT"

row() {  # row NAME ARGS... : one `atop eval`, skipped when its JSON exists
  local name=$1; shift
  if [ -f "$OUT/$name.json" ]; then echo "[$name] done, skipping"; return; fi
  echo "[$name] $(date -u +%FT%TZ) atop eval $*"
  OMP_NUM_THREADS=1 nice -n 10 atop eval --data "$DATA" --preset "$PRESET" --n "$N" --samples "$SAMPLES" \
    --device "$DEVICE" --batch-size "$BATCH" --threads 1 --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 \
    && echo "[$name] $(date -u +%FT%TZ) finished" || echo "[$name] FAILED, see $OUT/$name.log"
}

throttle() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done; }

for f in "$CLF" "$RUNS/purifier/final.safetensors" "$PUR"; do
  [ -f "$f" ] || { echo "missing $f: train first (recipes/cpu.sh)"; exit 2; }
done
if [ -n "${STORE:-}" ]; then
  ATOP_ARGS=(--store "$STORE" --model "${MODEL:-cifar10-atop}")
else
  ATOP_ARGS=(--classifier "$CLF" --purifier "$PUR")
fi

# The expensive rows first, so the two cores stay busy until the end.
throttle; row atop "${ATOP_ARGS[@]}" &
throttle; row ap --classifier "$CLF" --purifier "$RUNS/purifier/final.safetensors" &
throttle; row rt-only --classifier "$CLF" --purifier "$PUR" --defense rt &
throttle; row undefended --classifier "$CLF" &
if [ -f "$AT" ]; then throttle; row at --classifier "$AT" & else echo "[at] no $AT, skipping the AT row"; fi
wait

args=()
for r in "undefended:undefended" "RT only:rt-only" "AP:ap" "AToP:atop" "AT:at"; do
  label=${r%%:*}; name=${r#*:}
  [ -f "$OUT/$name.json" ] && args+=(--row "$label=$OUT/$name.json")
done
python bench/results_table.py "${args[@]}" --out "$OUT/results.md"
echo "table: $OUT/results.md (copy into docs/results.md and the README once the sanity checks pass)"
grep -l "SANITY CHECK FAILED" "$OUT"/*.log 2>/dev/null | sed 's/^/WARNING: sanity failures in /' || true
