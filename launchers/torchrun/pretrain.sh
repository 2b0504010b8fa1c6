#!/usr/bin/env bash
# Pretraining through torchrun (elastic launcher): one process per GPU (or NPROC CPU processes) per node; run it once
# on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launchers/torchrun/pretrain.sh configs/pretrain/simclr_fmnist.yaml
#   NNODES=2 RDZV_ENDPOINT=host0:29400 launchers/torchrun/pretrain.sh CONFIG      (c10d rendezvous, any node order)
# Environment: NPROC (default: GPUs on this node, else 2), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1),
# MASTER_PORT (29500) for the static rendezvous; RDZV_ENDPOINT (host:port) and RDZV_ID (sslscale) for c10d;
# OMP_NUM_THREADS (default: cores / NPROC); PYTHON (python); TORCH_ELASTIC_SHUTDOWN_TIMEOUT (120 s a rank gets to
# checkpoint after a stop signal before torchrun kills it). Exit status: launchers/README.md (75 = preempted).
set -euo pipefail

CONFIG=${1:?usage: pretrain.sh CONFIG.yaml [--set key=value ...]}
shift
PYTHON=${PYTHON:-python}
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 2 ))}
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
source "$(dirname "${BASH_SOURCE[0]}")/../supervise.sh"

if [ -n "${RDZV_ENDPOINT:-}" ]; then
  RDZV=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-sslscale}")
else
  RDZV=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
supervise "$NPROC" "$PYTHON" -m torch.distributed.run --nnodes "${NNODES:-1}" --nproc_per_node "$NPROC" "${RDZV[@]}" \
  -m sslscale.cli pretrain "$CONFIG" "$@" --resume auto
