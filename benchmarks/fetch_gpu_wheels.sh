#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels benchmarks/gpu_check.sh installs on an offline
# GPU machine whose image already has CUDA PyTorch and most dependencies (Python 3.12, x86-64).
# They land in .whl-gpu/ (17 MB; keep it out of git: echo /.whl-gpu/ >> .git/info/exclude) and
# must be carried to the GPU machine with the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl-gpu
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl-gpu \
  transformer-lens==4.3.0 transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  beartype==0.23.1 typeguard==4.6.1 fancy-einsum==0.0.3
ls -l .whl-gpu
