#!/usr/bin/env bash
# Download, here (PyPI), the packages bench_gpu.py needs that the GPU machine's image lacks:
# keras (+ namex, optree), diffusers (+ importlib_metadata) and ftfy (+ wcwidth), for its Python 3.12.
# They land in .whl/ at the repository root, which must be git-ignored (.git/info/exclude) so
# that it travels only when the device call names it in `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0 diffusers==0.42.1 importlib_metadata==10.2.0 \
  ftfy==6.3.1 wcwidth==0.9.4
ls -la .whl
