#!/usr/bin/env bash
# CPU recipe (2 cores): ResNet-20 classifier, width-32 UNet purifier, AToP fine-tune, evaluation.
# Idempotent and resumable: a finished stage (final.safetensors present) is skipped, an
# interrupted one resumes from its last checkpoint. Run it in the background:
#   nohup recipes/cpu.sh ../shared/data/cifar10 runs > runs/recipe.log 2>&1 &
# Wall time on 2 cores: classifier ~60 min (85 s/epoch alone), purifier ~30-45 min (measured
# 1.6 s/step sharing the cores), fine-tune ~11 min, the two quick evaluations ~4 min each.
set -euo pipefail
DATA=${1:-../shared/data/cifar10}
RUNS=${2:-runs}
THREADS=${THREADS:-2}
mkdir -p "$RUNS"

stage() {  # stage NAME COMMAND... : run unless RUNS/NAME/final.safetensors exists
  local name=$1; shift
  if [ -f "$RUNS/$name/final.safetensors" ]; then
    echo "[$name] done, skipping"
  else
    echo "[$name] running: $*"
    "$@" --out "$RUNS/$name" --threads "$THREADS" --resume
  fi
}

stage classifier atop train classifier --data "$DATA" --epochs 40 --batch-size 128 --lr 0.1
stage purifier atop train purifier --data "$DATA" --epochs 5 --rt rt2 --noise-std 0.0625 --noise-max 0.125 \
  --classifier "$RUNS/classifier/final.safetensors"
stage atop atop train finetune --data "$DATA" --epochs 1 --adv pgd --adv-steps 3 --adv-eot 1 --lam 0.1 \
  --lr 2e-4 --clean-fraction 0.5 --noise-std 0.0625 \
  --classifier "$RUNS/classifier/final.safetensors" --purifier "$RUNS/purifier/final.safetensors"

# A quick PGD-EOT check of AP (pre-trained purifier) and AToP (fine-tuned), same attack. The
# reported table comes from recipes/eval_full.sh (the full protocol, hours per row).
for model in purifier atop; do
  out="$RUNS/eval-$model"
  [ -f "$out.json" ] && { echo "[eval-$model] done, skipping"; continue; }
  atop eval --data "$DATA" --classifier "$RUNS/classifier/final.safetensors" \
    --purifier "$RUNS/$model/final.safetensors" --n 256 --attacks pgd --eps 8/255 --steps 20 --eot 8 \
    --samples 8 --threads "$THREADS" --out "$out"
done
