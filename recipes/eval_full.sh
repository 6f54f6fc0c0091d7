#!/usr/bin/env bash
# The evaluations the full table in docs/results.md still lacks: Lee & Kim's protocol (preset
# leekim) and the unseen radii (l-inf 4/255 and 12/255, AutoAttack-rand at l2 0.5) for the four
# purification rows, on the same 512 seeded test images as every other row. Run it in the
# background; it resumes where it stopped (each `atop eval` keeps its per-batch state in
# artifacts/cifar10-cpu/<name>.state.json, committed) and skips an evaluation whose JSON exists:
#
#   nohup recipes/eval_full.sh ../shared/data/cifar10 > runs/eval-full.log 2>&1 &
#
# The classifiers come from git, not from runs/: the store versions v6 (the standard f and
# AToP over it) and v8 (the AT f) were retired from the package but stay in history, and a store
# folder given as --classifier stands for the training checkpoint its manifest records, so a run
# begun on that checkpoint on another machine resumes here (docs/evaluation.md, "Resuming").
#
# Cost on this machine's 2 cores (`atop eval --estimate`, every attack on every image): a
# purification row over the AT f ~10 CPU-hours, over the standard f (its f is 4 passes) ~20;
# each unseen run about a third of its row. The prefilter below cuts the standard-f rows to an
# estimated 6-9 CPU-hours (--estimate --prefilter with a survival fraction says how much). On a GPU: DEVICE=cuda JOBS=1 (draws are still made on the CPU from the same
# seeds, so a state begun on one device finishes on the other). The batch size is part of a
# run's identity (its seeds derive from the batch index): keep BATCH for a run already begun.
#
# Prefilter (atop eval --prefilter, docs/evaluation.md): before each costly PGD or flow attack,
# the same attack at 50 steps x EOT 8, which the costly one then follows on the survivors only.
# The worst case is the same quantity; the costly attack's own cell becomes cumulative (marked
# with a dagger in the table). On the standard-f rows, where PGD-50 x EOT-8 already leaves 6-7%,
# it saves most of the PGD-200 and flow work. A run begun without it keeps the attacks it
# finished (their committed state is not thrown away) and takes the prefilter only before the
# threat models it has not reached (PREFILTER_OF: AToP over the AT f, begun before the
# prefilter existed, takes it before flow, where PGD-50 x EOT-8 left 0.8%).
#
# Reuse (atop eval --reuse): a run takes, from another state file of the same evaluation (same
# model and images), every attack section they share, instead of attacking again: the l2aa run
# of a row takes its leekim run's l2 prefilter and PGD-200 (and adds AutoAttack on what they
# left); REUSE_OF names the older runs whose sections a queued run shares (the PGD-50 x EOT-8
# runs of docs/results.md are the prefilters of AToP over the AT f at 4/255 and 12/255, and of
# AP over the AT f at 8/255). AToP over the AT f ran its leekim l2 PGD-200 without a prefilter,
# so its l2aa run goes without one too (PREFILTER_OF ":flow", a threat model that run lacks).
#
# A run already going (an `atop eval` with the same --out, e.g. left by a driver that was
# stopped) is skipped, and JOBS counts every `atop eval` on the machine, so a restarted driver
# neither runs one evaluation twice nor oversubscribes the cores.
#
# Cheap attacks first (CHEAP_FIRST=1, the default; atop eval --prefilter-only): a first pass runs,
# for every queued run, only its attacks that cost no more than the prefilter (the PGD-50 x EOT-8
# copies, and the FGSM before the l-inf one) and writes its partial report; the second pass runs
# the costly attacks, resuming from the same state files. Every cell of the table gets an upper
# bound within hours, where the queue in order would leave later rows with none for days; the
# full runs end no later (the same attacks, in another order). CHEAP_FIRST=0: one pass, in order.
#
# PARTIAL=1: attack nothing; for every queued run with a state file and no JSON yet, write
# OUT/<name>.partial.json/.md, the attacks it has finished (atop eval --partial; safe while the
# run goes on), which docs/results_table.args can list until the run ends.
#
# Knobs: CHEAP_FIRST (1), JOBS (evaluations at a time, 2), THREADS (torch threads each, 1), DEVICE (cpu | cuda),
# BATCH (64), PREFILTER (50x8; "none" to run every attack alone on every image), ONLY
# (comma-separated rows or evaluations, e.g. ONLY=atop-at,eval-v6-leekim; default all, in
# order), N (images, 512: the table's) and OUT (artifacts/cifar10-cpu) for a smoke run; DRY=1
# prints each queued `atop eval` command line, in order, and runs and restores nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
DEVICE=${DEVICE:-cpu}
BATCH=${BATCH:-64}
ONLY=${ONLY:-}
PREFILTER=${PREFILTER:-50x8}
PARTIAL=${PARTIAL:-}
DRY=${DRY:-}
CHEAP_FIRST=${CHEAP_FIRST:-1}
declare -A PREFILTER_OF=([eval-atop-at-leekim]=":flow" [eval-atop-at-l2aa]=":flow")  # appended to PREFILTER
declare -A REUSE_OF=(  # state files (in OUT, without .state.json) a run takes shared sections from
  [eval-atop-at-linf4]="unseen-atopat-linf4"
  [eval-atop-at-linf12]="unseen-atopat-linf12"
  [eval-ap-at-leekim]="eval-ap-at-pgd50"
)
N=${N:-512}
OUT=${OUT:-artifacts/cifar10-cpu}
AP=artifacts/cifar10-cpu/purifier.safetensors        # the pre-trained purifier (AP)
ATOP_AT=artifacts/cifar10-cpu/atop-at.best.safetensors # the purifier fine-tuned by AToP over the AT f

restore() {  # restore VERSION COMMIT : the store version from git into runs/vVERSION (verified by atop eval)
  local dir=runs/v$1/model_store/cifar10-atop/$1
  if [ ! -f "$dir/manifest.json" ] && [ -z "$DRY" ]; then
    mkdir -p "runs/v$1"
    git archive "$2" "model_store/cifar10-atop/$1" | tar -x -C "runs/v$1"
  fi
  echo "$dir"
}
V6=$(restore 6 858a78f0544f6353f4867d3a75f70532b237e6fe)  # last commit holding v6
V8=$(restore 8 1e7ae4dafd30b4715acbfc67435357f32a4c9f93)  # last commit holding v8

declare -A SOURCE=(
  [atop-at]="--classifier $V8 --purifier $ATOP_AT"
  [ap-at]="--classifier $V8 --purifier $AP"
  [v6]="--store ${V6%/cifar10-atop/6} --version 6"
  [ap-v6]="--classifier $V6 --purifier $AP"
)
declare -A PROTOCOL=(
  [leekim]="--preset leekim"
  [linf4]="--preset custom --attacks pgd,autoattack-rand --eps 4/255 --steps 200 --alpha 0.0035 --eot 20"
  [linf12]="--preset custom --attacks pgd,autoattack-rand --eps 12/255 --steps 200 --alpha 0.0105 --eot 20"
  [l2aa]="--preset custom --attacks pgd,autoattack-rand --norm l2 --eps 0.5 --steps 200 --alpha 0.1 --eot 20"
)

atop_eval() {  # atop eval ARGS..., or its command line under DRY=1
  if [ -n "$DRY" ]; then echo "atop eval $*"; else atop eval "$@"; fi
}

one() {  # one ROW PROTOCOL [PASS] : one `atop eval`, skipped when its JSON exists (PASS cheap: --prefilter-only)
  local name=eval-$1-$2 pass=${3:-full}
  if [ -f "$OUT/$name.json" ]; then echo "[$name] done, skipping"; return; fi
  local args
  # shellcheck disable=SC2206  # the two tables hold word lists
  args=(--data "$DATA" ${SOURCE[$1]} ${PROTOCOL[$2]} --n "$N" --samples 2 --device "$DEVICE" --batch-size "$BATCH"
    --out "$OUT/$name")
  local pre=""
  if [ "$PREFILTER" != none ]; then pre="--prefilter $PREFILTER${PREFILTER_OF[$name]:-}"; fi
  # shellcheck disable=SC2206
  args+=($pre)
  local donor donors=${REUSE_OF[$name]:-}
  if [ "$2" = l2aa ]; then donors+=" eval-$1-leekim"; fi
  for donor in $donors; do
    if [ -f "$OUT/$donor.state.json" ]; then args+=(--reuse "$OUT/$donor.state.json"); fi
  done
  if [ -n "$PARTIAL" ]; then  # the report of what its state has finished, with the run's own flags
    if [ ! -f "$OUT/$name.state.json" ]; then return; fi
    if [ -n "$DRY" ]; then atop_eval "${args[@]}" --threads 1 --partial; return; fi
    atop_eval "${args[@]}" --threads 1 --partial > /dev/null && echo "[$name] partial report: $OUT/$name.partial.json"
    return
  fi
  if [ "$pass" = cheap ]; then args+=(--prefilter-only); fi
  if [ -n "$DRY" ]; then atop_eval "${args[@]}" --threads "$THREADS"; return; fi
  if running "$name"; then echo "[$name] already running (pid $(running "$name")), skipping"; return; fi
  echo "[$name] $(date -u +%FT%TZ) started $pass pass $pre (log runs/$name.log)"
  if OMP_NUM_THREADS=$THREADS atop_eval "${args[@]}" --threads "$THREADS" >> "runs/$name.log" 2>&1; then
    if [ "$pass" = cheap ]; then
      echo "[$name] $(date -u +%FT%TZ) cheap attacks done: $OUT/$name.partial.json"
    else
      echo "[$name] $(date -u +%FT%TZ) finished: $OUT/$name.json"
    fi
  else
    echo "[$name] FAILED, see runs/$name.log"
  fi
}

evals() {  # "PID COMMAND LINE" of every `atop eval` on the machine
  pgrep -fa -- "atop eval --data" || true
}
running() {  # running NAME : the pid of an `atop eval` writing OUT/NAME, if any
  evals | grep -E -- "--out $OUT/$1( |\$)" | head -1 | cut -d' ' -f1 | grep .
}
others() {  # how many `atop eval` run on the machine (PARTIAL and DRY runs do not count them)
  if [ -n "$PARTIAL$DRY" ]; then echo 0; else evals | wc -l; fi
}
throttle() {  # wait for a free slot: JOBS counts our jobs and every other `atop eval` running
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ] || [ "$(others)" -ge "$JOBS" ]; do sleep 20; done
}

mkdir -p runs "$OUT"
# The order: the main protocol of the closest rival of the shipped AT model (AToP over the AT f),
# then the two rows the issue names (AToP and AP over the standard f, the paper's setting); then
# the unseen radii, for the generalisation claim (AT against AToP on attacks neither was trained
# on): first the paper's AToP (v6) at l-inf 4/255 and 12/255, which have no figure at all yet
# (their PGD-50 x EOT-8 prefilter gives an upper bound within the hour), then AToP over the AT f,
# whose PGD-50 figures at those radii stand until its runs end, then v6's l2 AutoAttack and AP
# over the standard f; last, AP over the AT f, a row the issue does not name (the ablation:
# AToP's fine-tune against the pre-trained purifier on the same robust f), whose PGD-50 figures
# stand until then.
QUEUE="atop-at:leekim v6:leekim ap-v6:leekim v6:linf4 v6:linf12"
QUEUE+=" atop-at:linf4 atop-at:linf12 atop-at:l2aa v6:l2aa ap-v6:linf4 ap-v6:linf12 ap-v6:l2aa"
QUEUE+=" ap-at:leekim ap-at:linf4 ap-at:linf12 ap-at:l2aa"
PASSES=full
if [ "$CHEAP_FIRST" = 1 ] && [ "$PREFILTER" != none ] && [ -z "$PARTIAL" ]; then PASSES="cheap full"; fi
for pass in $PASSES; do
  for job in $QUEUE; do
    row=${job%%:*} protocol=${job#*:}
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$row,"* && ",$ONLY," != *",eval-$row-$protocol,"* ]]; then continue; fi
    throttle
    if [ -n "$DRY" ]; then one "$row" "$protocol" "$pass"; else one "$row" "$protocol" "$pass" & [ -n "$PARTIAL" ] || sleep 10; fi
  done
  wait  # a run's full pass must not start beside its own cheap one (it would be skipped as running)
done
if [ -n "$DRY" ]; then exit 0; fi
if [ -n "$PARTIAL" ]; then
  echo "partial reports written; list them in docs/results_table.args until their runs end, then"
  echo "  python bench/results_table.py @docs/results_table.args --update docs/results.md"
  exit 0
fi
echo "done: add the finished JSONs to their rows in docs/results_table.args, then"
echo "  python bench/results_table.py @docs/results_table.args --update docs/results.md"
grep -l "SANITY CHECK FAILED" runs/eval-*.log 2>/dev/null | sed 's/^/WARNING: sanity failures in /' || true
