#!/usr/bin/env bash
# The GPU benchmark of docs/performance.md as one script: SD1.5 DPO, SmPO and DRO steps (8 pairs, bf16,
# cuDNN flash attention) beside the PyTorch diffusers DPO step, on one GPU, in one run.
#
#   bash benchmarks/gpu_bench.sh OUT_DIR [SECONDS]          # main rows: JAX's three steps + PyTorch eager
#   OBJECTIVES=smpo bash benchmarks/gpu_bench.sh OUT_DIR [SECONDS]  # one objective (add TORCH= to skip PyTorch)
#   STAGE=torch-compile bash benchmarks/gpu_bench.sh OUT_DIR [SECONDS]   # the torch.compile row alone
#   STAGE=shared OBJECTIVES=smpo,dro bash benchmarks/gpu_bench.sh OUT_DIR [SECONDS]  # one process per
#       objective: they compile at once (the compiles are CPU work, minutes each), then time one at a time
#   STAGE=sweep bash benchmarks/gpu_bench.sh OUT_DIR [SECONDS]   # benchmarks/sweep.py: JAX's DPO step,
#       torch.compile's and each variant of sweep.VARIANTS (XLA flags, batch, the SmPO and DRO options), with
#       profiles of the first two; ONLY=name,name picks variants
#
# Writes OUT_DIR/gpu.txt (device, clocks, versions), OUT_DIR/sd15_b8_cudnn.{json,log},
# OUT_DIR/torch_compile_sd15_b8.{json,log}, (shared) OUT_DIR/sd15_b8_cudnn_<objective>.{json,log} or (sweep)
# OUT_DIR/sweep.json, OUT_DIR/<variant>.{json,log} and OUT_DIR/profile/.
# SECONDS (default 540) bounds the run: the process group is stopped then, and the JSON keeps every
# objective that finished (bench.py rewrites it after each).
# Missing packages (diffusers, ml_collections) may sit as wheels in .whl/ of the repository root.
set -uo pipefail
out=${1:?usage: gpu_bench.sh OUT_DIR [SECONDS]}
seconds=${2:-540}
stage=${STAGE:-main}
size=${SIZE:-sd15} batch=${BATCH:-8} attention=${ATTENTION:-cudnn}  # SIZE=tiny ATTENTION=xla: CPU check
objectives=${OBJECTIVES:-dpo,smpo,dro}  # one per call where a compile takes minutes
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# Run "$@" in its own process group for at most $1 seconds (bench.py's workers included).
bounded() {
  local secs=$1; shift
  setsid "$@" &
  local pid=$!
  (sleep "$secs"; kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null) &
  local guard=$!
  wait "$pid"; local rc=$?
  kill "$guard" 2>/dev/null
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.used,memory.total --format=csv
  python3 - <<'EOF'
import importlib.metadata as md
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "torch", "diffusers",
             "transformers", "nvidia-cudnn-cu13"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
EOF
} 2>&1 | tee -a "$out/gpu.txt"

case $stage in
  main)
    bounded "$seconds" bash -c "python3 benchmarks/bench.py --size $size --batch $batch --attention $attention \
      --objectives $objectives ${TORCH---torch} --json '$out/${size}_b${batch}_$attention.json' 2>&1 \
      | tee '$out/${size}_b${batch}_$attention.log'" ;;
  shared)
    IFS=, read -ra each <<< "$objectives"
    turn=$(mktemp -d)
    for o in "${each[@]}"; do  # no preallocation: a process waiting for its turn holds no weights
      XLA_PYTHON_CLIENT_PREALLOCATE=false bounded "$seconds" bash -c "python3 benchmarks/bench.py --size $size \
        --batch $batch --attention $attention --objectives $o --share-device $turn:${#each[@]} \
        --json '$out/${size}_b${batch}_${attention}_$o.json' 2>&1 | tee '$out/${size}_b${batch}_${attention}_$o.log'" &
    done
    wait ;;
  torch-compile)
    bounded "$seconds" bash -c "python3 benchmarks/torch_dpo_step.py --size $size --batch $batch --dtype bfloat16 \
      --compile --json '$out/torch_compile_${size}_b$batch.json' 2>&1 | tee '$out/torch_compile_${size}_b$batch.log'" ;;
  sweep)
    bounded "$((seconds + 30))" python3 benchmarks/sweep.py --out "$out" --seconds "$seconds" --size "$size" \
      --batch "$batch" --attention "$attention" ${ONLY:+--only "$ONLY"} 2>&1 | tee "$out/sweep.log" ;;
  *) echo "unknown STAGE=$stage (main, shared, torch-compile, sweep)" >&2; exit 2 ;;
esac
