#!/usr/bin/env bash
# Continue the default model's training run (scripts/train_default_model.sh) on a lent GPU machine. Runs ON
# the device, from the repository root; build the kit here first (bash scripts/gpu_kit.sh). The device call:
#
#   run(command="bash scripts/gpu_train_default_model.sh 8", carry=[".gpukit"], timeout_s=600)
#
# then, here: bash scripts/gpu_collect.sh <the reply's files_at>      (docs/default_model/GPU.md)
#
# Argument: minutes of training (Lightning's --trainer.max_time), cut down so that the whole command -- wheel
# install, corpus, fit.py's startup, the last validation and checkpoint, the files for the way back -- ends
# inside TOTAL_S (570 s; the tool stops a command at 600 s). Further arguments go to train/fit.py.
# The recipe is a CPU run's own resolved config (.gpukit/config.yaml, copied from the run's config.yaml): same
# network, batch, losses, learning-rate schedule and data options; only the corpus path, max_time, val_every
# and the progress bar differ. Like a CPU session, the first call fine-tunes the shipped weights (--init_from
# default; the run's checkpoint does not fit in the 64 MiB beside the corpus). Into $OUT: last.ckpt,
# metrics.csv, codec.safetensors, summary.json, config.yaml, gpu_run.json (steps/s), train.log.
# Env: PY (python3), OUT, KIT (.gpukit), SITE (/tmp/site), CORPUS (/tmp/corpus), VAL_EVERY (1000 generator
# steps), TOTAL_S, RESERVE_S; for a dry run on a CPU machine whose python has the packages already:
# SKIP_WHEELS=1 ALLOW_CPU=1.
set -uo pipefail
t0=$(date +%s)
cd "$(dirname "$0")/.."
MINUTES=${1:-8}
[ $# -gt 0 ] && shift
PY=${PY:-python3}
OUT=${OUT:?OUT must name the folder whose files come back}
KIT=${KIT:-.gpukit}
SITE=${SITE:-/tmp/site}
CORPUS=${CORPUS:-/tmp/corpus}
RUN=${RUN:-runs/default-model-gpu}
TOTAL_S=${TOTAL_S:-570}
RESERVE_S=${RESERVE_S:-90}  # fit.py startup + the last validation and checkpoint + the report
VAL_EVERY=${VAL_EVERY:-1000}  # a validation (and checkpoint) about every minute at GPU speed
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
stage() { echo "[gpu-train $(( $(date +%s) - t0 )) s] $*"; }

if [ "${SKIP_WHEELS:-0}" != 1 ]; then
    stage "installing $(ls "$KIT"/wheels/*.whl | wc -l) wheels into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$KIT"/wheels/*.whl || exit 1
    export PYTHONPATH="$SITE:$PWD"
else
    export PYTHONPATH="$PWD"
fi
# stop before the long steps if an import fails or (unless ALLOW_CPU=1, the dry run here) there is no GPU
"$PY" scripts/gpukit.py check $([ "${ALLOW_CPU:-0}" = 1 ] || echo --require-gpu) || exit 1
stage "building the corpus in $CORPUS"
"$PY" scripts/gpukit.py corpus --kit "$KIT" --out "$CORPUS" || exit 1
start=$("$PY" scripts/gpukit.py resume --run "$RUN") || exit 1
# the first call fine-tunes the shipped weights; a call on a warm machine continues the device's own checkpoint
if [ "$start" -gt 0 ]; then from=(--ckpt_path "$RUN/checkpoints/last.ckpt"); else from=(--init_from default); fi

left=$(( TOTAL_S - ($(date +%s) - t0) - RESERVE_S ))
train_s=$(( MINUTES * 60 ))
[ "$train_s" -gt "$left" ] && train_s=$left
if [ "$train_s" -lt 30 ]; then echo "only $left s left for training: nothing done" >&2; exit 1; fi
max_time=$(printf '00:%02d:%02d:%02d' $((train_s / 3600)) $((train_s % 3600 / 60)) $((train_s % 60)))
stage "training from generator step $start for $max_time (validation every $VAL_EVERY steps)"
fit_start=$(date +%s.%N)
# timeout: a last guard so that the files still come back; max_time stops fit.py well before it
timeout --signal=INT --kill-after=20 $(( train_s + RESERVE_S - 20 )) \
    "$PY" train/fit.py --config "$KIT/config.yaml" "${from[@]}" \
    --data.manifest "$CORPUS/manifest.jsonl" --trainer.run_name "$(basename "$RUN")" \
    --trainer.max_time "$max_time" --trainer.val_every "$VAL_EVERY" --trainer.enable_progress_bar false \
    "$@" 2>&1 | tee "$OUT/train.log"
fit_rc=${PIPESTATUS[0]}
fit_end=$(date +%s.%N)
stage "fit.py exited with status $fit_rc"
"$PY" scripts/gpukit.py report --kit "$KIT" --run "$RUN" --out "$OUT" --start-step "$start" \
    --fit-start "$fit_start" --fit-seconds "$(awk "BEGIN {print $fit_end - $fit_start}")" --fit-rc "$fit_rc" \
    --max-time "$max_time"
rc=$?
stage "done"
exit $rc
