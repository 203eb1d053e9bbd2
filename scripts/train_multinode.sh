#!/usr/bin/env bash
# Multi-node training with torchrun's c10d rendezvous. Run this same command on every node.
#
#   NNODES=4 HEAD=node001 RUN=/shared/runs/in256 scripts/train_multinode.sh --config imagenet256-pretrain parallel=fsdp
#
# NNODES: number of nodes; HEAD: a host every node can reach (the rendezvous endpoint);
# GPUS: GPUs per node (default: all visible); RUN: run directory on a filesystem every node shares
# (sharded checkpoints are written by every rank). Extra arguments go to train.py.
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}"
: "${HEAD:?set HEAD (hostname of the rendezvous node)}"
: "${RUN:?set RUN (run directory on a shared filesystem)}"
GPUS="${GPUS:-$(nvidia-smi -L | wc -l)}"
PORT="${PORT:-29500}"
cd "$(dirname "$0")/.."
exec torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS" \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" --rdzv_id "${RDZV_ID:-maskdit-$(basename "$RUN")}" \
    train.py --out "$RUN" --resume "$@"
