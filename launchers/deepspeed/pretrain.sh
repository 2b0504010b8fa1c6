#!/usr/bin/env bash
# Pretraining through the deepspeed launcher (one process per GPU on every host of a hostfile).
#   HOSTFILE=hosts launchers/deepspeed/pretrain.sh configs/pretrain/simclr_fmnist.yaml [--set key=value ...]
# Hostfile lines: "host slots=N". With several hosts the launcher reaches them over passwordless ssh (pdsh). A
# hostfile naming only this machine (localhost, 127.x, its hostname or one of its addresses) runs here without ssh.
# Without ssh (e.g. inside a SLURM allocation), run it once per node instead (NO_SSH=1): each node starts its own
# workers with --no_ssh, its --node_rank and the shared master address, e.g.
#   srun --ntasks-per-node=1 env NO_SSH=1 HOSTFILE=hosts launchers/deepspeed/pretrain.sh CONFIG
# Environment: HOSTFILE (default: hostfile), NUM_GPUS (single-host run without a hostfile), NO_SSH, NODE_RANK (or
# SLURM_NODEID), MASTER_ADDR (default: the first host) / MASTER_PORT (29500), OMP_NUM_THREADS (default: cores / local
# processes; the launcher sets none), DEEPSPEED (the launcher command, default: deepspeed).
# Exit status: launchers/README.md (75 = preempted).
set -euo pipefail

CONFIG=${1:?usage: pretrain.sh CONFIG.yaml [--set key=value ...]}
shift
HOSTFILE=${HOSTFILE:-hostfile}
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-deepspeed}
source "$(dirname "${BASH_SOURCE[0]}")/../supervise.sh"

is_this_host() {  # is_this_host NAME: true for names and addresses of this machine
  local name=$1 addr
  case "$name" in
    localhost | localhost.* | 127.* | ::1 | "$(hostname)" | "$(hostname -s 2>/dev/null)" | "$(hostname -f 2>/dev/null)")
      return 0 ;;
  esac
  for addr in $(hostname -I 2>/dev/null); do [ "$name" = "$addr" ] && return 0; done
  return 1
}

if [ -f "$HOSTFILE" ]; then
  mapfile -t HOSTS < <(awk 'NF && $1 !~ /^#/ {print $1}' "$HOSTFILE")
  [ "${#HOSTS[@]}" -gt 0 ] || { echo "pretrain.sh: $HOSTFILE lists no hosts" >&2; exit 2; }
  if [ "${#HOSTS[@]}" = 1 ] && is_this_host "${HOSTS[0]}" && [ -z "${NO_SSH:-}" ]; then
    NO_SSH=1 NODE_RANK=0 MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}  # nothing to ssh into
  fi
  LAUNCH=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
  if [ "${NO_SSH:-0}" = 1 ]; then
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:?NO_SSH=1 needs NODE_RANK or SLURM_NODEID}}
    MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
    LAUNCH+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
    LINE=$(( NODE_RANK + 1 ))
  else
    LINE=1  # ranks on other hosts start over ssh, with neither this script's exit file nor its pid
  fi
  SLOTS=$(awk -v n="$LINE" 'NF && $1 !~ /^#/ && ++i == n {for (f = 2; f <= NF; f++) if ($f ~ /^slots=/)
          {sub("slots=", "", $f); print $f}}' "$HOSTFILE")
  SLOTS=${SLOTS:-1}
  LOCAL=$([ "${NO_SSH:-0}" = 1 ] && echo "$SLOTS" || echo 0)
else
  SLOTS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
  SLOTS=$(( SLOTS > 0 ? SLOTS : 1 ))
  LAUNCH=(--num_gpus "$SLOTS" --master_port "$MASTER_PORT")
  LOCAL=$SLOTS
fi

# The deepspeed launcher leaves OMP_NUM_THREADS unset: every worker would use all cores (8x slower on CPU).
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / SLOTS > 0 ? CORES / SLOTS : 1 ))}

# --no_local_rank: LOCAL_RANK comes in the environment; no --local_rank flag needed.
supervise "$LOCAL" $DEEPSPEED "${LAUNCH[@]}" --no_local_rank --module sslscale.cli pretrain "$CONFIG" "$@" \
  --resume auto
