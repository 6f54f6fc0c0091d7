#!/usr/bin/env bash
# The model issue's GPU step, sized for one short lease (15 minutes of device time in all, the
# machine's start-up included): adversarially train the served architecture for as many epochs as
# fit a time box, on the CPU default's recipe, and bring back what the CPU needs to export and
# evaluate it like any other model.
#
#   fast net width 64, depth 2 (3.2M parameters: the largest that keeps the exported ONNX +
#   TorchScript pair inside the repository's size budget), every image adversarial at l-inf
#   8/255, made by ADV_STEPS steps of PGD from a random start (default 3, step 2.5*eps/steps:
#   on the CPU a PGD-3 restart gained 3.1 points of PGD-50 over FGSM's, docs/training.md;
#   ADV_STEPS=1 is FGSM-RS, the CPU default's, cheaper per epoch), one-cycle lr 0.2 over the
#   whole run, EMA 0.999, bf16 autocast, the per-epoch PGD-10 check on 256 held-out training
#   images with its best epoch, and AWP (adversarial weight perturbation; AWP=0 turns it off).
#
# It first times two short probes (20 and 80 steps) to get the seconds per step on that machine,
# then picks the number of epochs that fits TRAIN_S (capped at MAX_EPOCHS), so the learning-rate
# schedule completes inside the box instead of being cut off.
#
# Here, once (the data does not travel with ../shared; the tree plus data is ~56 MB < 64 MiB):
#   mkdir -p .gpu/cifar10 && cp ../shared/data/cifar10/* .gpu/cifar10/   # .gpu/ is git-ignored
# On the device (run tool: carry [".gpu"], timeout_s 560):
#   TRAIN_S=330 bash recipes/gpu.sh .gpu/cifar10 "$OUT"
# Back here, with the returned folder F:
#   atop export --classifier F/final.safetensors --purifier none --store /tmp/gpu-store --data D
#   atop eval --data D --store /tmp/gpu-store --preset custom --attacks pgd --steps 50 --eot 1 \
#     --n 512 --samples 1 --out runs/gate-gpu          # the quick gate, then --preset leekim
# Dry run on a CPU (tiny data and width; the two probes time the real network, so ~1-3 min on
# 2 cores; checked 2026-12-05 with the PGD-3 default: every file produced):
#   TRAIN_S=20 MAX_EPOCHS=2 EXTRA="--limit-train 600 --limit-test 64 --robust-check 64 --width 8" \
#     bash recipes/gpu.sh tests-data-folder /tmp/gpu-dry
set -euo pipefail
DATA=${1:?usage: recipes/gpu.sh DATA OUT}
OUT=${2:?usage: recipes/gpu.sh DATA OUT}
TRAIN_S=${TRAIN_S:-330}      # seconds the real run may take, its checks included
MAX_EPOCHS=${MAX_EPOCHS:-100}
AWP=${AWP:-0.005}
ADV_STEPS=${ADV_STEPS:-3}
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"
# shellcheck disable=SC2206
extra=(${EXTRA:-})
args=(--data "$DATA" --arch fast --width 64 --depth 2 --batch-size 256 --lr 0.2 --warmup 0.2
  --ema 0.999 --checkpoint-every-s 60 "${extra[@]}")
if [ "$ADV_STEPS" = 1 ]; then
  args+=(--adversarial fgsm)
else  # step 2.5 * eps / steps, eps = 8/255
  args+=(--adversarial pgd --adv-steps "$ADV_STEPS" --adv-alpha "$($PY -c "print(2.5 * 8 / 255 / $ADV_STEPS)")")
fi
[ "$AWP" != 0 ] && args+=(--awp "$AWP")
log() { echo "[gpu.sh $(date +%T)] $*" | tee -a "$OUT/gpu.log"; }

log "python: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")')"
probe() {  # seconds for a run of $1 steps (data loading and start-up included)
  local t0
  t0=$($PY -c 'import time; print(time.time())')
  $PY -m atop.cli train classifier "${args[@]}" --epochs 1000 --max-steps "$1" --robust-check 0 \
    --out "$WORK/probe$1" --overwrite >>"$OUT/probe.log" 2>&1
  $PY -c "import time; print(round(time.time() - $t0, 2))"
}
t_short=$(probe 20)
t_long=$(probe 80)
# Seconds per step from the difference (start-up cancels), steps per epoch at batch 256 on the
# training split less the 256 held out, and the epoch's checks (10,000 clean test images, PGD-10
# on 256) charged as 15% on top.
read -r per_step spe epochs < <($PY - "$t_short" "$t_long" "$TRAIN_S" "$MAX_EPOCHS" "${extra[@]}" <<'EOF'
import sys
t_short, t_long, budget, cap = map(float, sys.argv[1:5])
rest = sys.argv[5:]
n = int(rest[rest.index("--limit-train") + 1]) if "--limit-train" in rest else 50000
per_step = max(1e-4, (t_long - t_short) / 60)
spe = max(1, (n - 256) // 256)
print(f"{per_step:.4f}", spe, max(1, min(int(cap), int(budget / (spe * per_step * 1.15)))))
EOF
)
log "probe: ${t_short}s for 20 steps, ${t_long}s for 80: $per_step s/step, $spe steps/epoch -> $epochs epochs in ${TRAIN_S}s"

log "training: ${args[*]} --epochs $epochs"
$PY -m atop.cli train classifier "${args[@]}" --epochs "$epochs" --out "$WORK/at" >"$OUT/train.log" 2>&1 \
  || log "training exited with $? (see train.log); bringing back what there is"
for f in final.safetensors best.safetensors best.json final.json metrics.jsonl; do
  [ -f "$WORK/at/$f" ] && cp "$WORK/at/$f" "$OUT/"
done
log "done: $(ls "$OUT" | tr '\n' ' ')"
