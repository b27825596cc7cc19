"""Train a codec: `python train/fit.py --config grvq_4cb.yaml [--preset tiny] [--trainer.max_steps N] ...`.

Thin entry point; the work is in `neurocodec.train.fit` (also reachable as `neurocodec train ...`).
Run `python train/fit.py --help` for every option and its default.
"""

import sys

from neurocodec.train.fit import cli

if __name__ == "__main__":
    sys.exit(cli())
