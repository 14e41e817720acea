#!/bin/bash
# Launch SCRIPT (train.py or cache.py) on every node of the current SLURM allocation:
# one torchrun agent per node (srun), rendezvous on the first node, one worker per GPU.
#   launch.sh train.py cfg.toml [table.key=value ...]
# Environment: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE or 8), RDZV_PORT (default 29500).
set -euo pipefail
SCRIPT="$1"; shift
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
NNODES="${SLURM_JOB_NUM_NODES:-1}"
HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
RDZV_PORT="${RDZV_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
echo "[launch] $SCRIPT on $NNODES node(s) x $GPUS_PER_NODE GPU(s), rendezvous $HEAD_NODE:$RDZV_PORT"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  python -m torch.distributed.run \
    --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv_id="$SLURM_JOB_ID" \
    "$SCRIPT" "$@"
