#!/usr/bin/env bash
# Pretraining through the deepspeed launcher (one process per GPU on every host of a hostfile).
#   HOSTFILE=hosts launchers/deepspeed/pretrain.sh configs/pretrain/simclr_fmnist.yaml [--set key=value ...]
# Hostfile lines: "host slots=N". The launcher reaches the other hosts over passwordless ssh (pdsh).
# Inside a SLURM allocation without ssh, run it once per node instead (NO_SSH=1): each node starts its own
# workers with --no_ssh, its --node_rank and the shared master address, e.g.
#   srun --ntasks-per-node=1 env NO_SSH=1 HOSTFILE=hosts launchers/deepspeed/pretrain.sh CONFIG
# Environment: HOSTFILE (default: hostfile), NUM_GPUS (single-host run without a hostfile),
# MASTER_ADDR / MASTER_PORT, OMP_NUM_THREADS (default: cores / local processes; the launcher sets none).
set -euo pipefail

CONFIG=${1:?usage: pretrain.sh CONFIG.yaml [--set key=value ...]}
shift
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_PORT=${MASTER_PORT:-29500}

if [ -f "$HOSTFILE" ]; then
  SLOTS=$(awk '/slots=/ {split($2, a, "="); print a[2]; exit}' "$HOSTFILE")
  LAUNCH=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
  if [ "${NO_SSH:-0}" = 1 ]; then
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:?NO_SSH=1 needs NODE_RANK or SLURM_NODEID}}
    MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF {print $1; exit}' "$HOSTFILE")}
    LAUNCH+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
  fi
else
  SLOTS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
  SLOTS=$(( SLOTS > 0 ? SLOTS : 1 ))
  LAUNCH=(--num_gpus "$SLOTS" --master_port "$MASTER_PORT")
fi

# The deepspeed launcher leaves OMP_NUM_THREADS unset: every worker would use all cores (8x slower on CPU).
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / SLOTS > 0 ? CORES / SLOTS : 1 ))}

# --no_local_rank: LOCAL_RANK comes in the environment; no --local_rank flag needed.
exec deepspeed "${LAUNCH[@]}" --no_local_rank --module sslscale.cli pretrain "$CONFIG" "$@" --resume auto
