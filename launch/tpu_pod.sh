#!/usr/bin/env bash
# Runs one jaxpref training command on every host of a Cloud TPU VM pod slice.
#
# Every host runs the same command; jax.distributed.initialize() finds the other hosts by itself on
# TPU VMs, and each host feeds its own shard of the data. Set:
#   TPU_NAME   the TPU VM name             (required)
#   ZONE       its zone                    (required)
#   PROJECT    the GCP project             (default: gcloud's current project)
#   CONFIG     config file                 (default: configs/drosd15.py)
#   WORKDIR    checkpoint/log folder on a filesystem every host sees, e.g. gs://bucket/run1 (required)
#   REPO_DIR   where the repo is checked out on the hosts (default: ~/jaxpref)
#   EXTRA      extra flags, e.g. "--config.model_path=/mnt/sd15 --config.total_steps=2000"
# Example:
#   TPU_NAME=v5p-64 ZONE=us-east5-a WORKDIR=gs://my-bucket/dro1 EXTRA="--config.model_path=/mnt/sd15" \
#     bash launch/tpu_pod.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
CONFIG=${CONFIG:-configs/drosd15.py}
REPO_DIR=${REPO_DIR:-~/jaxpref}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
EXTRA=${EXTRA:-}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="
  cd $REPO_DIR && pip install -q -e . 'jax[tpu]' && \
  python -m jaxpref.train --config=$CONFIG --workdir=$WORKDIR --distributed $EXTRA"
