#!/usr/bin/env bash
# The README's first command on a fresh machine: a new virtual environment, no extras, then a short
# training and a sample.py call on its output. Run by .ci/run before the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/maskdit-fresh.XXXX)
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
"$work/venv/bin/python" -m pip install --quiet torch==2.13.0
"$work/venv/bin/python" -m pip install --quiet -e .
"$work/venv/bin/python" -c "import triton, maskdit_fast, kernels; print('fresh venv: triton', triton.__version__)"
"$work/venv/bin/python" train.py train.max_steps=20 --eval-samples 0 --no-progress --out "$work/run"
"$work/venv/bin/python" sample.py --ckpt "$work/run/ema.safetensors" --out "$work/samples" --n 16
test -s "$work/run/ema.safetensors" && test -s "$work/samples/grid.png" && test -s "$work/samples/samples.npz"
echo "fresh install: train.py and sample.py ran from 'pip install torch==2.13.0 && pip install -e .'"
