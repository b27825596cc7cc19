#!/usr/bin/env bash
# Bring a device call's result home: checkpoint -> runs/default-model-gpu/checkpoints/last.ckpt (another folder:
# --run runs/NAME; a checkpoint it replaces is kept as pre-gpu-stepN.ckpt.bak), codec.safetensors, config.yaml
# into a new folder, metrics.csv rows merged, the call's figures appended to the run's gpu_runs.jsonl. DIR is
# the `files_at` folder of the run tool's reply.
# Stop a CPU training of the run first (it would overwrite last.ckpt); restart it afterwards.
#
#   bash scripts/gpu_collect.sh /work/.device/<...>/files [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ $# -ge 1 ] || { echo "usage: bash scripts/gpu_collect.sh DIR [--force]" >&2; exit 2; }
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$PY" scripts/gpukit.py collect "$@"
