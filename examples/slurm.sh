#!/usr/bin/env bash
# Multi-node data-parallel training under Slurm: one `plait train` launcher per node, each
# starting one worker per GPU through torchrun's elastic launcher.
#
#   sbatch examples/slurm.sh configs/gpu-125m.toml
#
#SBATCH --job-name=plait
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
set -euo pipefail

CONFIG=${1:-configs/gpu-125m.toml}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
# The first node of the allocation hosts the rendezvous; every node must reach it on this port.
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PLAIT_RDZV_PORT:-29500}

srun --kill-on-bad-exit=1 bash -c "plait train --config $CONFIG \
  --nproc-per-node $GPUS_PER_NODE --nnodes $SLURM_NNODES --node-rank \$SLURM_NODEID \
  --rdzv-endpoint $HEAD:$PORT --max-restarts 3 \
  --parallel.dp_replicate_degree=-1 --run.dir=runs/\$SLURM_JOB_NAME-$SLURM_JOB_ID"
