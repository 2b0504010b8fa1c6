#!/usr/bin/env bash
# Two CPU processes on this machine (gloo), one thread each: the configuration the recipes are tuned on.
#   launchers/local/pretrain_2proc.sh configs/pretrain/simclr_fmnist.yaml [--set key=value ...]
# Re-running resumes from the newest complete checkpoint of the run directory. Ctrl-C or SIGTERM (to this script or
# its process group): the ranks finish the step, checkpoint and the script exits 75 (launchers/README.md).
set -euo pipefail

CONFIG=${1:?usage: pretrain_2proc.sh CONFIG.yaml [--set key=value ...]}
shift
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
source "$(dirname "${BASH_SOURCE[0]}")/../supervise.sh"

supervise 2 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 \
  -m sslscale.cli pretrain "$CONFIG" "$@" --resume auto
