#!/usr/bin/env bash
# Set up neurocodec from nothing: a virtual environment in .venv with the pinned dependencies, and the
# Debian packages that the tests and tools call (Opus and Codec2 command-line codecs for evaluation, espeak-ng).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  missing=()
  # openssl: the service tests make a self-signed TLS certificate; espeak-ng: `neurocodec data espeak` and its tests
  for pkg in opus-tools codec2 openssl espeak-ng; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[dev]'
# Real photographs for the image codec (scikit-image's CC0 / public-domain samples, read from its wheel)
.venv/bin/python -m neurocodec.cli image-data -o data/images >/dev/null || echo "warning: data/images not built (neurocodec image-data)"
echo "neurocodec is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
