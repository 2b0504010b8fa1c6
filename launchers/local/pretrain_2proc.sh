#!/usr/bin/env bash
# Two CPU processes on this machine (gloo), one thread each: the configuration the recipes are tuned on.
#   launchers/local/pretrain_2proc.sh configs/pretrain/simclr_fmnist.yaml [--set key=value ...]
# Re-running resumes from the newest complete checkpoint of the run directory.
set -euo pipefail

CONFIG=${1:?usage: pretrain_2proc.sh CONFIG.yaml [--set key=value ...]}
shift
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 \
  -m sslscale.cli pretrain "$CONFIG" "$@" --resume auto
