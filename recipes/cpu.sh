#!/usr/bin/env bash
# CPU recipe (2 cores): classifier (two networks, ensembled and mirror-averaged), width-32 UNet
# purifier, AToP fine-tune, evaluation.
# Idempotent and resumable: a finished stage (final.safetensors present) is skipped, an
# interrupted one resumes from its last checkpoint. Run it in the background:
#   nohup recipes/cpu.sh ../shared/data/cifar10 runs > runs/recipe.log 2>&1 &
# Wall time on 2 cores (measured): ResNet-20 ~60 min (85 s/epoch alone) + warm restart ~40 min,
# fast net ~25 min (90 s/epoch), purifier ~30-45 min (1.6 s/step sharing the cores), adapting
# the two networks to the purifier ~25 min (~100 and ~120 s per epoch), fine-tune
# ~40 min (3 s/step) and ~27 min more for the second round (2 s/step), each evaluation ~17 min
# (2 threads). The f_q stages: ~26 min for the two adaptations side by side on one thread each,
# finetune-q ~11 min (3.2 s/step), its two checks ~50 min side by side on one thread each (~10 s
# per attacked image, then the convergence check).
# Run one 2-thread job at a time, or 1-thread jobs side by side: a 2-thread job beside a
# 1-thread one on 2 cores ran 7x slower here (21 s per fine-tune step instead of 3).
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
stage classifier-warm atop train classifier --data "$DATA" --epochs 30 --batch-size 128 --lr 0.05 \
  --init "$RUNS/classifier/final.safetensors"
stage classifier-fast atop train classifier --data "$DATA" --arch fast --width 48 --depth 1 --epochs 16 \
  --batch-size 256 --lr 0.2 --warmup 0.15 --label-smoothing 0.2
# f = the two networks' averaged softmax, each also averaged over the mirror image (4 passes).
stage classifier-ens atop train ensemble --data "$DATA" --flip-tta \
  --member "$RUNS/classifier-warm/final.safetensors" --member "$RUNS/classifier-fast/final.safetensors"
CLF="$RUNS/classifier-ens/final.safetensors"
stage purifier atop train purifier --data "$DATA" --epochs 5 --rt rt2 --noise-std 0.0625 --noise-max 0.125 \
  --classifier "$RUNS/classifier/final.safetensors"
# f adapted to the pre-trained purifier: each member trains for a few epochs more with half of
# every batch replaced by g(t(x)) (the purifier frozen), then ensembled again. This f is frozen
# for the fine-tune and deployed.
PUR="$RUNS/purifier/final.safetensors"
stage classifier-warm-pur atop train classifier --data "$DATA" --epochs 8 --batch-size 128 --lr 0.02 --warmup 0.1 \
  --init "$RUNS/classifier-warm/final.safetensors" --purifier "$PUR"
stage classifier-fast-pur atop train classifier --data "$DATA" --arch fast --width 48 --depth 1 --epochs 6 \
  --batch-size 256 --lr 0.04 --warmup 0.1 --label-smoothing 0.2 \
  --init "$RUNS/classifier-fast/final.safetensors" --purifier "$PUR"
stage classifier-ens-pur atop train ensemble --data "$DATA" --flip-tta \
  --member "$RUNS/classifier-warm-pur/final.safetensors" --member "$RUNS/classifier-fast-pur/final.safetensors"
CLF="$RUNS/classifier-ens-pur/final.safetensors"
# The AT baseline, and the start of the classifier the default model serves: fast
# adversarial training (FGSM from a random start, step 1.25*eps, every image adversarial) of a
# width-64 fast net, bf16 autocast, weights averaged (EMA 0.999), PGD-10 on 256 held-out training
# images after every epoch; best.safetensors is the best epoch. ~2.3 min per epoch alone on 2 cores.
# (v8 was the same for 18 epochs without the average: at-fast64 in artifacts/cifar10-cpu.)
stage at-fast64-e30 atop train classifier --data "$DATA" --arch fast --width 64 --depth 2 --epochs 30 \
  --batch-size 256 --lr 0.2 --warmup 0.2 --adversarial fgsm --ema 0.999
# v12 (retired): a warm restart of that average for 15 epochs on a new one-cycle schedule (peak
# lr 0.05, a new data order); its final.safetensors was exported (chosen before evaluation;
# best.safetensors is the noisy check's pick). ~2.3 min per epoch.
stage at-fast64-wr15 atop train classifier --data "$DATA" --arch fast --width 64 --depth 2 --epochs 15 \
  --batch-size 256 --lr 0.05 --warmup 0.2 --adversarial fgsm --ema 0.999 --seed 1 \
  --init "$RUNS/at-fast64-e30/final.safetensors"
# The default model (v13): the same restart with adversarial weight perturbation (--awp 0.005:
# each step's gradient taken at weights moved 0.5% of each layer's norm uphill); ~3.3 min per
# epoch. Its final.safetensors is exported: 78.1% clean, 38.9% worst-case l-inf (v12: 79.2 / 37.7).
stage at-fast64-awp15 atop train classifier --data "$DATA" --arch fast --width 64 --depth 2 --epochs 15 \
  --batch-size 256 --lr 0.05 --warmup 0.2 --adversarial fgsm --ema 0.999 --seed 1 --awp 0.005 \
  --init "$RUNS/at-fast64-e30/final.safetensors"
# A uniform soup of the two restarts (v12's and v13's final averages, both from v10's weights):
# one network whose every weight and BatchNorm statistic is the mean of theirs, so it costs one
# forward pass; seconds, no training (atop train ensemble --soup).
stage soup-v12-v13 atop train ensemble --soup --data "$DATA" \
  --member "$RUNS/at-fast64-wr15/final.safetensors" --member "$RUNS/at-fast64-awp15/final.safetensors"
# A restart of that soup with a stronger inner attack: PGD-3 (step 2.5*eps/3, random start) instead
# of FGSM, plus AWP, 12 epochs, peak lr 0.03, seed 2; ~5 min per epoch alone on 2 cores (59 min).
# Ended at 77.1% clean and 45.3% PGD-50 on the 512 test images (the soup: 78.6% / 42.2%).
stage at-soup-pgd3awp12 atop train classifier --data "$DATA" --arch fast --width 64 --depth 2 --epochs 12 \
  --batch-size 256 --lr 0.03 --warmup 0.2 --adversarial pgd --adv-steps 3 --adv-alpha 0.0261 --ema 0.999 \
  --seed 2 --awp 0.005 --init "$RUNS/soup-v12-v13/final.safetensors"
# Between the two: v14 restarted 12 epochs with PGD-2 (step 1.25 eps, random start) + AWP, seed 3,
# for a point between v14 (FGSM-RS: 78.6% clean, 39.5% worst case) and the PGD-3 restart above
# (77.1%, 41.2%). Rule fixed before its gate: ship only at >= 78% clean (10,000 images) and a
# worst case l-inf above v14's on the full protocol (docs/training.md). ~1 h on 2 cores.
stage at-soup-pgd2awp12 atop train classifier --data "$DATA" --arch fast --width 64 --depth 2 --epochs 12 \
  --batch-size 256 --lr 0.03 --warmup 0.2 --adversarial pgd --adv-steps 2 --adv-alpha 0.0392 --ema 0.999 \
  --seed 3 --awp 0.005 --init "$RUNS/soup-v12-v13/final.safetensors"
# v14 restarted 12 epochs with FGSM-RS + AWP (v13's inner attack) and distilled from the standard f
# (v6's ensemble: the loss on each adversarial image is half cross-entropy, half KL to the teacher's
# prediction on the clean image at temperature 4; ARD, Goldblum et al. 2020, with a non-robust
# teacher), for clean accuracy at v14's robustness. Seed 4. Rule fixed before its gate: full
# protocol only at >= 78.0% clean (10,000 images) and PGD-50 above v14's 42.2% on the 512 images;
# ship only if the worst case l-inf then beats v14's 39.5% at >= 78.0% clean.
if [ ! -f "$RUNS/store-v6/cifar10-atop/6/model.pt" ]; then  # the teacher: v6, retired from the package
  mkdir -p "$RUNS/store-v6/cifar10-atop/6"
  for f in manifest.json model.onnx model.pt; do
    git show "1e7ae4d~1:model_store/cifar10-atop/6/$f" > "$RUNS/store-v6/cifar10-atop/6/$f"
  done
fi
stage at-soup-ard12 atop train classifier --data "$DATA" --arch fast --width 64 --depth 2 --epochs 12 \
  --batch-size 256 --lr 0.03 --warmup 0.2 --adversarial fgsm --ema 0.999 --seed 4 --awp 0.005 \
  --teacher "$RUNS/store-v6/cifar10-atop/6" --distill-weight 0.5 --distill-temperature 4 \
  --init "$RUNS/soup-v12-v13/final.safetensors"
# The same distilled restart with PGD-2 (step 1.25 eps, random start) as the inner attack instead
# of FGSM-RS: PGD-2 alone bought +2.7 points of PGD-50 over v14 for -1.1 clean; distillation bought
# +1.4 clean at v14's robustness. Seed 5. Rule fixed before its gate: full protocol only at >= 78.0%
# clean (10,000) and PGD-50 above at-soup-ard12's 42.8% on the 512 images; it replaces whichever
# candidate is then chosen only if its worst case l-inf is higher at >= 78.0% clean (the model
# issue's fallback rule: the most robust configuration at >= 78% clean, none reaching 80%).
stage at-soup-ard-pgd2-12 atop train classifier --data "$DATA" --arch fast --width 64 --depth 2 --epochs 12 \
  --batch-size 256 --lr 0.03 --warmup 0.2 --adversarial pgd --adv-steps 2 --adv-alpha 0.0392 --ema 0.999 \
  --seed 5 --awp 0.005 --teacher "$RUNS/store-v6/cifar10-atop/6" --distill-weight 0.5 \
  --distill-temperature 4 --init "$RUNS/soup-v12-v13/final.safetensors"
# A candidate, not shipped: more capacity (width 96, 7.2M parameters), ~4.5 min per epoch alone on
# 2 cores. Ended at 76.6% clean and 41.8% PGD-50 (v12: 79.2% / 41.4% on the same 512 images):
# under the 78% floor and no more robust (docs/training.md).
stage at-fast96-e20 atop train classifier --data "$DATA" --arch fast --width 96 --depth 2 --epochs 20 \
  --batch-size 256 --lr 0.2 --warmup 0.2 --adversarial fgsm --ema 0.999

# AToP over the AT classifier: the pre-trained purifier fine-tuned with the AT f frozen, every
# image of every batch PGD-3 through the whole pipeline, 15 epochs on one schedule, the per-epoch
# PGD-10 x EOT-4 check on 256 held-out images. ~6.5 min per epoch alone on 2 cores (bf16).
# Finished 2026-12-05 (artifacts/cifar10-cpu/atop-at.*): 73.2% clean (2 draws), 42.8% under
# PGD-50 x EOT-8 on 512 test images (docs/training.md); not shipped.
stage atop-at atop train finetune --data "$DATA" --classifier "$RUNS/at-fast64/final.safetensors" \
  --purifier "$PUR" --adv pgd --adv-steps 3 --adv-eot 1 --clean-fraction 0 --lam 2.0 --lr 3e-4 --epochs 15

# AToP: the pre-trained purifier fine-tuned against that frozen f (v4).
stage finetune atop train finetune --data "$DATA" --epochs 2 --adv pgd --adv-steps 3 --adv-eot 1 --lam 0.5 \
  --lr 3e-4 --clean-fraction 0.5 --noise-std 0.0625 --classifier "$CLF" --purifier "$PUR"
# Two more AToP epochs from there, weighted towards classification (lam 2, three quarters of each
# batch clean, the rest PGD against the whole pipeline): the shipped v5. Against v4 (the stage
# above alone) it trades ~0.8 points of robust accuracy for +0.6 points of clean accuracy.
stage finetune-2 atop train finetune --data "$DATA" --epochs 2 --adv pgd --adv-steps 3 --adv-eot 1 --lam 2.0 \
  --lr 3e-4 --clean-fraction 0.75 --noise-std 0.0625 --eval-images 2000 --classifier "$CLF" \
  --purifier "$RUNS/finetune/final.safetensors"

# A quick PGD-EOT check of AP (pre-trained purifier) and AToP (fine-tuned), same attack: 50 steps
# of 2/255 (20 steps of 1/255 left the bare adapted f at 8.6%, failing the sanity check), EOT 8.
# The reported table comes from the full protocol (recipes/eval_full.sh, hours per row).
check() {  # check NAME CLASSIFIER PURIFIER_STAGE : writes RUNS/NAME.{json,md} unless present
  local out="$RUNS/$1"
  if [ -f "$out.json" ]; then echo "[$1] done, skipping"; return; fi
  atop eval --data "$DATA" --classifier "$2" \
    --purifier "$RUNS/$3/final.safetensors" --n 256 --attacks pgd --eps 8/255 --steps 50 --alpha 2/255 --eot 8 \
    --samples 8 --convergence-n 16 --threads "$THREADS" --out "$out"
}
check eval-purifier "$CLF" purifier
check eval-finetune-2 "$CLF" finetune-2

# f_q: the same adaptation with a quarter of each batch purified instead of a half (6 and 5
# epochs): 90.17% bare and 83.12% through RT2 + the pre-trained purifier, so one classifier that
# meets both classifier bars; the half-purified f above gives the shipped pipeline 0.8 points more
# clean accuracy and stays deployed. finetune-q: one AToP epoch on 25,000 training images from
# finetune-2's purifier against f_q, frozen; then AP and AToP under the same attack as above.
stage classifier-warm-q atop train classifier --data "$DATA" --epochs 6 --batch-size 128 --lr 0.02 --warmup 0.1 \
  --init "$RUNS/classifier-warm/final.safetensors" --purifier "$PUR" --purified-fraction 0.25
stage classifier-fast-q atop train classifier --data "$DATA" --arch fast --width 48 --depth 1 --epochs 5 \
  --batch-size 256 --lr 0.04 --warmup 0.1 --label-smoothing 0.2 \
  --init "$RUNS/classifier-fast/final.safetensors" --purifier "$PUR" --purified-fraction 0.25
stage classifier-ens-q atop train ensemble --data "$DATA" --flip-tta \
  --member "$RUNS/classifier-warm-q/final.safetensors" --member "$RUNS/classifier-fast-q/final.safetensors"
CLFQ="$RUNS/classifier-ens-q/final.safetensors"
stage finetune-q atop train finetune --data "$DATA" --epochs 1 --limit-train 25000 --adv pgd --adv-steps 3 \
  --adv-eot 1 --lam 2.0 --lr 3e-4 --clean-fraction 0.75 --noise-std 0.0625 --eval-images 2000 \
  --classifier "$CLFQ" --purifier "$RUNS/finetune-2/final.safetensors"
check eval-q-purifier "$CLFQ" purifier
check eval-q-finetune-q "$CLFQ" finetune-q
