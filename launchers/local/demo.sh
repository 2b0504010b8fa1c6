#!/usr/bin/env bash
# The main job (`make demo`): SimCLR pretraining on Fashion-MNIST shards with 2 CPU processes and ZeRO-2, export of
# the encoder, then the few-label linear-probe table (pretrained vs random init vs raw pixels).
#   launchers/local/demo.sh [--set key=value ...]      (extra --set overrides go to `sslscale pretrain`)
# Shards are written once into data-cache/; each demo is a fresh run in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/demo}
CONFIG=${CONFIG:-configs/pretrain/simclr_fmnist.yaml}
export PYTHONWARNINGS="ignore::FutureWarning"  # deprecated-collective notices from inside DeepSpeed
sslscale() { "$PYTHON" -m sslscale.cli "$@"; }

for split in train test; do
  if [ ! -f "data-cache/fmnist-$split/manifest.json" ]; then
    sslscale shards --source fashion-mnist --split "$split" --out "data-cache/fmnist-$split" --per-shard 5000 --force
  fi
done

rm -rf "$RUN"
start=$(date +%s)
PYTHON="$PYTHON" launchers/local/pretrain_2proc.sh "$CONFIG" --set run_dir="$RUN" "$@"
echo "pretraining took $(( $(date +%s) - start )) s"
sslscale export "$RUN" --out "$RUN/encoder.safetensors"
sslscale evaluate "$RUN/encoder.safetensors" --source fashion-mnist --labels-per-class 10 --seeds 3 \
  --json "$RUN/evaluation.json"
sslscale adapt configs/adapt/fmnist_demo.yaml --set model="$RUN/encoder.safetensors" --set run_dir="$RUN/adapt"
