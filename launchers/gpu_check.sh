#!/usr/bin/env bash
# The GPU check, for a CUDA machine with its own torch, Triton, nvcc and ninja (no network, no venv: the machine's
# python3 is used as is, like `make test TORCH=system`). One run, about 8 minutes on an H100/H200: builds the CUDA
# extension for this device, checks it has CUDA kernels, runs every GPU test (fails on any skip), then the GPU
# benchmarks; writes ONE JSON file ($OUT/gpu-check.json when OUT is set, else bench-results/gpu-check.json) and
# prints a summary. Exit status 0 only when every section passed. See `sslscale/bench/gpu_check.py`.
#   bash launchers/gpu_check.sh [--budget SECONDS] [--skip-build] [--out PATH]      (or: make gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m sslscale.cli bench gpu-check "$@"
