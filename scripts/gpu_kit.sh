#!/usr/bin/env bash
# Fill .gpukit/ (git-ignored through .git/info/exclude) with what a lent GPU machine needs to continue the
# default model's run: cp312 wheels of the packages its image lacks, the run's training files as Opus with its
# validation crops (corpus.tar), and the run's last checkpoint + config. Run it here, right before the device
# call (the checkpoint is copied as it is now); it prints the kit's size against the device's 64 MiB.
#
#   bash scripts/gpu_kit.sh                           # the recipe's run, runs/default-model-lstm
#   bash scripts/gpu_kit.sh --run runs/NAME [--manifest M] [--rebuild-corpus]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec nice -n 10 "$PY" scripts/gpukit.py build "$@"
