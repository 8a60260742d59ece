#!/usr/bin/env bash
# Runs one jaxpref training command on every host of a Cloud TPU VM pod slice, after checking here that
# the config's train step fits the slice's HBM.
#
# Every host runs the same command; jax.distributed.initialize() finds the other hosts by itself on
# TPU VMs, and each host feeds its own shard of the data. Before anything is started on the pod, this
# machine compiles the train step for TOPOLOGY (`python -m jaxpref.aot`: no TPU, no weights needed, the
# [tpu] extra installed) and refuses to launch a config that DOES NOT FIT. Set:
#   TPU_NAME   the TPU VM name             (required)
#   ZONE       its zone                    (required)
#   TOPOLOGY   the slice, generation:chips, e.g. v5e:2x4 (v5litepod-8), v5e:4x4, v4:2x2x4, v5p:2x2x4 (required)
#   PROJECT    the GCP project             (default: gcloud's current project)
#   CONFIG     config file                 (default: configs/drosd15.py)
#   WORKDIR    checkpoint/log folder on a filesystem every host sees, e.g. gs://bucket/run1 (required)
#   REPO_DIR   where the repo is checked out on the hosts (default: ~/jaxpref)
#   EXTRA      extra flags, e.g. "--config.model_path=/mnt/sd15 --config.total_steps=2000"; the fit check
#              gets them too (a --config.model_path folder that exists here gives the check its architecture)
#   SKIP_FIT_CHECK=1  launch without the check (e.g. when the host lacks the [tpu] extra)
# Example:
#   TPU_NAME=v5e-8 ZONE=us-west4-a TOPOLOGY=v5e:2x4 WORKDIR=gs://my-bucket/dro1 \
#     EXTRA="--config.model_path=/mnt/sd15" bash launch/tpu_pod.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
CONFIG=${CONFIG:-configs/drosd15.py}
REPO_DIR=${REPO_DIR:-~/jaxpref}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
EXTRA=${EXTRA:-}

if [ "${SKIP_FIT_CHECK:-0}" != "1" ]; then
  : "${TOPOLOGY:?set TOPOLOGY (e.g. v5e:2x4) for the fit check, or SKIP_FIT_CHECK=1}"
  cd "$(dirname "$0")/.."
  echo "checking that $CONFIG fits $TOPOLOGY (python -m jaxpref.aot; compiling for TPU takes minutes)"
  set +e
  python -m jaxpref.aot --config="$CONFIG" --topology="$TOPOLOGY" $EXTRA
  rc=$?
  set -e
  if [ $rc -eq 1 ]; then
    echo "not launching: $CONFIG does not fit $TOPOLOGY (see above; SKIP_FIT_CHECK=1 launches anyway)" >&2
    exit 1
  elif [ $rc -ne 0 ]; then
    echo "not launching: the fit check failed (exit $rc; SKIP_FIT_CHECK=1 launches anyway)" >&2
    exit $rc
  fi
fi

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="
  cd $REPO_DIR && pip install -q -e '.[tpu]' && \
  python -m jaxpref.train --config=$CONFIG --workdir=$WORKDIR --distributed $EXTRA"
