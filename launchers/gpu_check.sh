#!/usr/bin/env bash
# GPU check, for a CUDA machine that has its own torch (+ triton, nvcc, ninja): builds the extension with the CUDA
# kernels, runs the kernel tests on the GPU and prints the GPU benchmarks (JSON under bench-results/gpu-*.json).
#   bash launchers/gpu_check.sh            (or: make gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
"$PY" - <<'PYEOF'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch " + torch.__version__)
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
PYEOF
MAX_JOBS=${MAX_JOBS:-8} "$PY" setup.py build_ext --inplace -q
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m sslscale.cli info
# Kernel tests only (the rest needs deepspeed/webdataset, absent from the GPU image); triton compiled, not interpreted.
TRITON_INTERPRET=0 "$PY" -m pytest -q -ra -p no:cacheprovider \
  tests/test_infonce.py tests/test_infonce_triton.py tests/test_attention.py tests/test_attention_triton.py
"$PY" -m sslscale.cli bench infonce --device cuda --out bench-results/gpu-infonce.json
"$PY" -m sslscale.cli bench attention --device cuda --out bench-results/gpu-attention.json
