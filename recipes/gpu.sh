#!/usr/bin/env bash
# GPU recipe: wider classifier (ResNet-20 x4 width), width-64 purifier, PGD+EOT fine-tune
# against the whole pipeline, and the full evaluation. Same stages and resumability as cpu.sh.
# On several GPUs, prefix each training command with: torchrun --standalone --nproc-per-node N -m atop.cli
set -euo pipefail
DATA=${1:-../shared/data/cifar10}
RUNS=${2:-runs-gpu}
mkdir -p "$RUNS"

stage() {
  local name=$1; shift
  if [ -f "$RUNS/$name/final.safetensors" ]; then echo "[$name] done, skipping"; else
    echo "[$name] running: $*"; "$@" --out "$RUNS/$name" --resume; fi
}

stage classifier atop train classifier --data "$DATA" --depth 3 --width 64 --epochs 100 --batch-size 256 --lr 0.2
stage purifier atop train purifier --data "$DATA" --width 64 --epochs 40 --batch-size 256 \
  --classifier "$RUNS/classifier/final.safetensors"
stage atop atop train finetune --data "$DATA" --width 64 --epochs 5 --adv pgd --adv-steps 10 --adv-eot 4 \
  --lam 0.1 --clean-fraction 0.5 --batch-size 256 \
  --classifier "$RUNS/classifier/final.safetensors" --purifier "$RUNS/purifier/final.safetensors"
# The full protocol (docs/evaluation.md), resumable from RUNS/eval-<model>.state.json; all five
# rows of the results table: recipes/eval_full.sh (add --device cuda to its rows on a GPU).
for model in purifier atop; do
  atop eval --data "$DATA" --classifier "$RUNS/classifier/final.safetensors" \
    --purifier "$RUNS/$model/final.safetensors" --preset leekim --n 512 --samples 16 --batch-size 256 \
    --device cuda --out "$RUNS/eval-$model"
done
