#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, all of the node's GPUs in it.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh        (bash launch/slurm_gpu.sh --help: this text)
#
# jax.distributed.initialize() reads SLURM's environment (coordinator = the first node, process id =
# SLURM_PROCID), so every node runs the same command. Variables (in the environment sbatch passes on):
#   CONFIG    config file, optionally with its argument                   (default: configs/drosd15.py)
#             configs/dposd15.py:gpu8 (any SD1.5 file) lays the config out for 80 GB GPUs: 64 pairs per
#             micro-batch over all of them (8 per GPU on one node of 8, 2 on four nodes)
#   WORKDIR   checkpoints and logs on a filesystem every node sees                            (required)
#   EXTRA     more flags for jaxpref.train, e.g.
#             "--config.model_path=stable-diffusion-v1-5/stable-diffusion-v1-5 --config.data.data_dir=/shared/tfds"
#   DRY_RUN=1 print the srun command instead of running it
#
# Preemption and time limits: SLURM sends SIGTERM 300 s before the time limit (--signal=TERM@300) and when it
# preempts the job; jaxpref.train finishes its step, writes a checkpoint and exits 75 ("rerun to resume"), and
# this script then requeues the job (scontrol requeue), which resumes from that checkpoint. Any other status
# ends the job with train's own (jaxpref/errors.py): 0 finished, 2 bad config, 3 diverged, 4 I/O.
#
# One node needs no SLURM: one process drives all its GPUs, the mesh sized from the devices it finds,
#   python -m jaxpref.train --config=configs/dposd15.py:gpu8 --workdir=/runs/dpo \
#       --config.model_path=stable-diffusion-v1-5/stable-diffusion-v1-5 --config.data.data_dir=/data/tfds
#SBATCH --job-name=jaxpref
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=TERM@300
#SBATCH --open-mode=append
set -euo pipefail

EXIT_CONFIG=2
EXIT_PREEMPTED=75

usage() {
  sed -n '2,/^#SBATCH/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
  echo "slurm_gpu.sh: $*" >&2
  exit "$EXIT_CONFIG"
}

for arg in "$@"; do
  case "$arg" in
    -h|--help|help) usage; exit 0 ;;
    *) die "unexpected argument '$arg'; settings are variables (bash launch/slurm_gpu.sh --help)" ;;
  esac
done

[ -n "${WORKDIR:-}" ] || die "set WORKDIR (checkpoints and logs on a filesystem every node sees); bash launch/slurm_gpu.sh --help lists every variable"
CONFIG=${CONFIG:-configs/drosd15.py}
EXTRA=${EXTRA:-}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# EXTRA is split into flags on purpose.
# shellcheck disable=SC2206
command=(srun --ntasks-per-node=1 python -m jaxpref.train --config="$CONFIG" --workdir="$WORKDIR" --distributed $EXTRA)
if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "+ ${command[*]}"
  exit 0
fi
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job (SLURM_JOB_ID is unset): submit it with sbatch (bash launch/slurm_gpu.sh --help)"

rc=0
"${command[@]}" || rc=$?
if [ "$rc" -eq "$EXIT_PREEMPTED" ]; then
  echo "slurm_gpu.sh: preempted (exit 75): a checkpoint was written; requeueing job $SLURM_JOB_ID to resume" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
