#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, all of the node's GPUs in it.
#
# jax.distributed.initialize() reads SLURM's environment (coordinator = first node, process id =
# SLURM_PROCID), so every node runs the same command. Submit with sbatch, e.g.
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=1 launch/slurm_gpu.sh
# Variables:
#   CONFIG   config file                 (default: configs/drosd15.py)
#   WORKDIR  checkpoint/log folder on a shared filesystem (required)
#   EXTRA    extra flags, e.g. "--config.model_path=/shared/sd15 --config.mesh.fsdp=8"
#SBATCH --job-name=jaxpref
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
: "${WORKDIR:?set WORKDIR}"
CONFIG=${CONFIG:-configs/drosd15.py}
EXTRA=${EXTRA:-}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
srun --ntasks-per-node=1 python -m jaxpref.train --config="$CONFIG" --workdir="$WORKDIR" --distributed $EXTRA
