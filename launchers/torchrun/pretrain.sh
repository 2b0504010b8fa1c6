#!/usr/bin/env bash
# Pretraining through torchrun (elastic launcher): one process per GPU (or NPROC CPU processes) per node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launchers/torchrun/pretrain.sh configs/pretrain/simclr_fmnist.yaml
# Environment: NPROC (default: GPUs on this node, else 2), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1),
# MASTER_PORT (29500), OMP_NUM_THREADS (default: cores / NPROC).
set -euo pipefail

CONFIG=${1:?usage: pretrain.sh CONFIG.yaml [--set key=value ...]}
shift
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 2 ))}
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}

exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m sslscale.cli pretrain "$CONFIG" "$@" --resume auto
