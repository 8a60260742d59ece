#!/usr/bin/env bash
# Sets up a Cloud TPU VM slice (one host or a pod) and trains on every host of it.
#
#   bash launch/tpu_pod.sh [--help] [STAGE ...]
#
# Stages, run in this order (each can run alone: STAGES=train, or positional names `... tpu_pod.sh fetch`):
#   copy      put the code on every worker: this checkout as it is (tracked and untracked, not ignored files;
#             a tarball sent with `gcloud compute tpus tpu-vm scp --worker=all`), or with REPO_URL a
#             `git clone` of REPO_URL at REPO_REF on every worker
#   install   pip install -e '.[tpu]' on every worker (jax with libtpu)
#   fetch     put what the run reads on every worker: FETCH_BUCKET's gs:// model folders in ~/models/<name>;
#             the config's hub ids (model, reference, VAE, LoRA start, evaluation rewards: python -m
#             jaxpref.fetch --config=CONFIG EXTRA) in each worker's Hugging Face cache (safetensors and configs
#             only; gated or private repositories: huggingface-cli login on the workers first); Pick-a-Pic v2
#             (PICKAPIC_SOURCE, a slice with MAX_SHARDS) built into DATA_DIR
#   fitcheck  check that CONFIG's train step fits TOPOLOGY's HBM (python -m jaxpref.aot: compiled with the TPU
#             compiler from shapes only); a config that DOES NOT FIT stops the script before training
#   train     python -m jaxpref.train --distributed on every worker (jax.distributed.initialize() finds the
#             other hosts by itself; each host reads its own shard of the data)
#
# Variables:
#   TPU_NAME        the TPU VM name                                                        (required)
#   ZONE            its zone, e.g. us-west4-a                                              (required)
#   PROJECT         the GCP project                                (default: gcloud's current project)
#   CONFIG          config file, relative to the repo, optionally with its argument     (default: configs/drosd15.py)
#   WORKDIR         checkpoints and logs, on storage every host sees: gs://bucket/run   (required by train)
#   EXTRA           --config.* overrides for train, the fetch and the fit check, word-split on the worker, e.g.
#                   "--config.model_path=stable-diffusion-v1-5/stable-diffusion-v1-5 --config.data.data_dir=gs://bucket/tfds"
#   STAGES          comma-separated stages to run                   (default: copy,install,fetch,fitcheck,train)
#   DRY_RUN=1       print every command (gcloud and local) instead of running it
#   REPO_URL        stage copy: clone this git URL on every worker instead of copying this checkout
#   REPO_REF        the branch, tag or commit of REPO_URL                                  (default: main)
#   REPO_DIR        the code's folder on every worker, relative to its home or absolute  (default: jaxpref)
#   PIP_EXTRA       stage install: the extra installed                                         (default: tpu)
#   FETCH_MODELS    stage fetch: more hub ids, space-separated, fetched on every worker besides the config's
#                   (models read later, e.g. by python -m jaxpref.evaluate)
#   FETCH_BUCKET    stage fetch: gs:// model folders, space-separated, copied to ~/models/<name> on every worker
#                   (a model folder must be local: EXTRA="--config.model_path=\$HOME/models/<name>", the
#                   escaped $HOME expanded on the worker)
#   PICKAPIC_SOURCE stage fetch: build Pick-a-Pic v2 (all its splits, as training reads them) from this hub
#                   dataset id or local parquet folder on the workers, e.g. yuvalkirstain/pickapic_v2 (default: none)
#   MAX_SHARDS      a slice: the first N parquet shards of each split                      (default: all)
#   DATA_DIR        where the datasets are built: a local folder on every worker, or gs://bucket/tfds (then
#                   built once, on worker 0); pass it to training as --config.data.data_dir in EXTRA
#   FIT_CHECK       remote: on worker 0 (after install; JAX_PLATFORMS=cpu, the chips stay free)   (default)
#                   local:  on this machine (needs pip install -e '.[tpu]'; SD1.5: >10 min, >15 GB RAM)
#                   off:    no check
#   TOPOLOGY        the slice for the fit check, generation:chips: v5e:2x4 (a v5litepod-8), v5e:4x4, v4:2x2x4,
#                   v5p:2x2x4 (python -m jaxpref.aot --help)                (required unless FIT_CHECK=off)
#
# Exit status: train's own (jaxpref/errors.py): 0 finished; 2 bad config (nothing started); 3 diverged;
# 4 I/O; 75 preempted: a checkpoint was written, rerun the train stage with the same WORKDIR to resume.
#
# Examples:
#   # a v5e-8: copy this checkout, install, fetch SD1.5 and a Pick-a-Pic slice, check the fit, train
#   TPU_NAME=v5e-8 ZONE=us-west4-a TOPOLOGY=v5e:2x4 CONFIG=configs/dposd15.py WORKDIR=gs://my-bucket/dpo1 \
#     PICKAPIC_SOURCE=yuvalkirstain/pickapic_v2 MAX_SHARDS=8 DATA_DIR=gs://my-bucket/tfds \
#     EXTRA="--config.model_path=stable-diffusion-v1-5/stable-diffusion-v1-5 --config.data.data_dir=gs://my-bucket/tfds" \
#     bash launch/tpu_pod.sh
#   # after a preemption (exit 75), or to train again with the code already there:
#   STAGES=train TPU_NAME=v5e-8 ZONE=us-west4-a WORKDIR=gs://my-bucket/dpo1 EXTRA="..." bash launch/tpu_pod.sh
#   # see every command first:
#   DRY_RUN=1 TPU_NAME=v5e-8 ZONE=us-west4-a TOPOLOGY=v5e:2x4 WORKDIR=gs://my-bucket/dpo1 bash launch/tpu_pod.sh
#
# One machine with several GPUs needs no script: one process drives all its GPUs,
#   python -m jaxpref.train --config=configs/dposd15.py:gpu8 --workdir=/runs/dpo \
#       --config.model_path=stable-diffusion-v1-5/stable-diffusion-v1-5 --config.data.data_dir=/data/tfds
# (`:gpu8`: 8 x 80 GB GPUs, data parallel over the devices it finds; configs/dposd15.py). Several GPU nodes:
# launch/slurm_gpu.sh.
set -euo pipefail

ALL_STAGES=(copy install fetch fitcheck train)
EXIT_CONFIG=2
EXIT_PREEMPTED=75

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {  # one line, then the exit status of a bad setting
  echo "tpu_pod.sh: $*" >&2
  exit "$EXIT_CONFIG"
}

quote() {  # the arguments as one shell line, quoted only where needed (for DRY_RUN and the log)
  local out="" arg prefix
  for arg in "$@"; do
    prefix=""
    if [[ "$arg" =~ ^(--[A-Za-z0-9_-]+=)(.*)$ ]]; then prefix=${BASH_REMATCH[1]}; arg=${BASH_REMATCH[2]}; fi
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]*$ ]]; then
      out+="$prefix$arg "
    else
      out+="$prefix'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

run() {  # runs a command, or under DRY_RUN=1 prints it
  if [ "${DRY_RUN:-0}" = "1" ]; then
    echo "+ $(quote "$@")"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

for arg in "$@"; do
  case "$arg" in
    -h|--help|help) usage; exit 0 ;;
  esac
done

# The stages: positional names win over STAGES; either way they run in the order above.
requested=${STAGES:-}
if [ $# -gt 0 ]; then requested=$(IFS=,; echo "$*"); fi
requested=${requested:-$(IFS=,; echo "${ALL_STAGES[*]}")}
IFS=', ' read -r -a wanted <<< "$requested"
for s in "${wanted[@]}"; do
  [[ " ${ALL_STAGES[*]} " == *" $s "* ]] || die "unknown stage '$s'; stages are ${ALL_STAGES[*]} (STAGES=copy,install or positional names)"
done
wants() { [[ " ${wanted[*]} " == *" $1 "* ]]; }

CONFIG=${CONFIG:-configs/drosd15.py}
EXTRA=${EXTRA:-}
REPO_DIR=${REPO_DIR:-jaxpref}
REPO_REF=${REPO_REF:-main}
PIP_EXTRA=${PIP_EXTRA:-tpu}
FIT_CHECK=${FIT_CHECK:-remote}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

case "$FIT_CHECK" in remote|local|off) ;; *) die "FIT_CHECK=$FIT_CHECK: use remote, local or off" ;; esac
[[ "$REPO_DIR" =~ ^[A-Za-z0-9_./-]+$ && "$REPO_DIR" != "." && "$REPO_DIR" != "/" && "$REPO_DIR" != ".." ]] \
  || die "REPO_DIR=$REPO_DIR: a folder relative to the workers' home or absolute (letters, digits, _ . / -), not the home itself"
on_pod=0
for s in copy install fetch train; do wants "$s" && on_pod=1; done
if wants fitcheck && [ "$FIT_CHECK" = remote ]; then on_pod=1; fi
if [ "$on_pod" = 1 ]; then
  [ -n "${TPU_NAME:-}" ] || die "set TPU_NAME (the TPU VM name, as in gcloud compute tpus tpu-vm list); bash launch/tpu_pod.sh --help lists every variable"
  [ -n "${ZONE:-}" ] || die "set ZONE (the TPU VM's zone, e.g. us-west4-a); bash launch/tpu_pod.sh --help lists every variable"
fi
if wants fitcheck && [ "$FIT_CHECK" != off ] && [ -z "${TOPOLOGY:-}" ]; then
  die "set TOPOLOGY for the fit check (the slice as generation:chips, e.g. v5e:2x4), or FIT_CHECK=off"
fi
if wants train && [ -z "${WORKDIR:-}" ]; then
  die "set WORKDIR (checkpoints and logs on storage every host sees, e.g. gs://bucket/run1)"
fi

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="${ZONE:-}")
if [ -n "${PROJECT:-}" ]; then WHERE+=(--project="$PROJECT"); fi

on_workers() {  # on_workers all|0 COMMAND: one shell command line on every worker, or on worker 0
  run "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

in_repo() {  # a worker's command line run in the code's folder
  printf 'cd %s && %s' "$REPO_DIR" "$1"
}

stage_copy() {
  if [ -n "${REPO_URL:-}" ]; then
    on_workers all "rm -rf $REPO_DIR && git clone --quiet $(quote "$REPO_URL") $REPO_DIR && git -C $REPO_DIR checkout --quiet $(quote "$REPO_REF")"
    return
  fi
  git -C "$ROOT" rev-parse --git-dir > /dev/null 2>&1 \
    || die "copy: $ROOT is not a git checkout (the files to send are git's); set REPO_URL to clone one on the workers"
  local tarball
  STAGING=$(mktemp -d)
  trap 'rm -rf "$STAGING"' EXIT
  tarball="$STAGING/jaxpref.tar.gz"
  # The working tree as it is: tracked and untracked files that git does not ignore (no build outputs, no .git).
  if [ "${DRY_RUN:-0}" = "1" ]; then
    echo "+ git -C $(quote "$ROOT") ls-files --cached --others --exclude-standard | tar -czf $(quote "$tarball") -T -"
  else
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
      | tar --null -T - -czf "$tarball")
  fi
  run "${TPU[@]}" scp "$tarball" "$TPU_NAME:jaxpref.tar.gz" "${WHERE[@]}" --worker=all
  on_workers all "rm -rf $REPO_DIR && mkdir -p $REPO_DIR && tar -xzf jaxpref.tar.gz -C $REPO_DIR && rm jaxpref.tar.gz"
}

stage_install() {
  on_workers all "$(in_repo "python3 -m pip install -q -e \".[$PIP_EXTRA]\"")"
}

stage_fetch() {
  local data_flag="" where=all model
  for model in ${FETCH_BUCKET:-}; do
    [[ "$model" == gs://* ]] || die "FETCH_BUCKET: $model is not a gs:// folder"
    on_workers all "mkdir -p models && gcloud storage cp -r ${model%/} models/"
  done
  # The models the run reads (model_path, reference_path, vae_path, lora.init_from, eval.rewards): hub ids
  # downloaded into each worker's Hugging Face cache, local paths checked.
  on_workers all "$(in_repo "python3 -m jaxpref.fetch --config=$CONFIG${EXTRA:+ $EXTRA}${FETCH_MODELS:+ $FETCH_MODELS}")"
  if [ -n "${PICKAPIC_SOURCE:-}" ]; then
    if [ -n "${DATA_DIR:-}" ]; then data_flag=" --data_dir=$DATA_DIR"; fi
    if [[ "${DATA_DIR:-}" == gs://* ]]; then where=0; fi   # one build in the bucket that every host reads
    on_workers "$where" "$(in_repo "python3 -m jaxpref.data.pickapic --source=$PICKAPIC_SOURCE${MAX_SHARDS:+ --max_shards=$MAX_SHARDS}$data_flag")"
  fi
}

fit_check_args() {
  echo "-m jaxpref.aot --config=$CONFIG --topology=$TOPOLOGY${EXTRA:+ $EXTRA}"
}

stage_fitcheck() {
  local rc=0
  case "$FIT_CHECK" in
    off) echo "fit check off (FIT_CHECK=off)" >&2; return ;;
    local)
      echo "checking here that $CONFIG fits $TOPOLOGY (compiling for TPU takes minutes)" >&2
      (cd "$ROOT" && run bash -c "${PYTHON:-python3} $(fit_check_args)") || rc=$? ;;
    remote)
      echo "checking on worker 0 that $CONFIG fits $TOPOLOGY (compiling for TPU takes minutes)" >&2
      on_workers 0 "$(in_repo "JAX_PLATFORMS=cpu python3 $(fit_check_args)")" || rc=$? ;;
  esac
  if [ "$rc" -eq 1 ]; then
    echo "tpu_pod.sh: not training: $CONFIG does not fit $TOPOLOGY (report above; FIT_CHECK=off trains anyway)" >&2
    exit 1
  elif [ "$rc" -ne 0 ]; then
    echo "tpu_pod.sh: not training: the fit check failed (exit $rc; FIT_CHECK=off trains anyway)" >&2
    exit "$rc"
  fi
}

stage_train() {
  # Each worker prints its own exit status, so that a preempted run (75) is told apart from a failure
  # whatever status gcloud returns for several workers.
  local log rc=0
  local command
  command="$(in_repo "python3 -m jaxpref.train --config=$CONFIG --workdir=$WORKDIR --distributed${EXTRA:+ $EXTRA}; \
rc=\$?; echo \"jaxpref.train exit \$rc on \$(hostname)\"; exit \$rc")"
  if [ "${DRY_RUN:-0}" = "1" ]; then
    on_workers all "$command"
    return
  fi
  log=$(mktemp)
  on_workers all "$command" 2>&1 | tee "$log" || rc=$?
  if grep -Eq "jaxpref\.train exit $EXIT_PREEMPTED on " "$log"; then
    rm -f "$log"
    echo "tpu_pod.sh: preempted (exit 75): a checkpoint was written; rerun to resume (STAGES=train, same WORKDIR)" >&2
    exit "$EXIT_PREEMPTED"
  fi
  local failed
  failed=$(grep -Eo "jaxpref\.train exit [0-9]+ on " "$log" | awk '$3 != 0 {print $3; exit}' || true)
  rm -f "$log"
  if [ -n "$failed" ]; then
    echo "tpu_pod.sh: training stopped with exit $failed (2 bad config, 3 diverged, 4 I/O: jaxpref/errors.py)" >&2
    exit "$failed"
  fi
  return "$rc"
}

for s in "${ALL_STAGES[@]}"; do
  if wants "$s"; then
    echo "== $s" >&2
    "stage_$s"
  fi
done
