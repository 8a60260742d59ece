#!/usr/bin/env bash
# The committed TPU memory results (benchmarks/results/tpu_aot/, table in benchmarks/NOTES.md): SD1.5 train
# steps compiled for TPU topologies on a CPU host by `python -m jaxpref.aot`, one after another (each SD1.5
# compile takes ~10 min of 2 CPU cores). Needs the [tpu] extra. Run from the repository root:
#   nice -n 10 bash benchmarks/tpu_aot.sh [name ...]      # no names: all, in this order
# A row that does not fit still writes its JSON (exit 1 is its verdict, not an error of this script).
set -uo pipefail
OUT=benchmarks/results/tpu_aot
mkdir -p "$OUT"
FSDP="--config.mesh.data=1 --config.mesh.fsdp=-1"
declare -A JOBS=(
  [dpo_v5e-2x4_4pc_pallas]="--config=configs/dposd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True --config.attention=pallas_tpu"
  [dpo_v5e-2x4_4pc_xla]="--config=configs/dposd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True --config.attention=xla"
  [dro_v5e-2x4_4pc]="--config=configs/drosd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True"
  [smpo-code_v5e-2x4_4pc]="--config=configs/smposd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True"
  [smpo-consistent_v5e-2x4_4pc]="--config=configs/smposd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True --config.smpo.inversion=consistent"
  [dpo_v4-2x2x1_8pc]="--config=configs/dposd15.py --topology=v4:2x2x1 --pairs_per_chip=8 $FSDP --config.remat=True"
  [dpo_v5p-2x2x1_8pc]="--config=configs/dposd15.py --topology=v5p:2x2x1 --pairs_per_chip=8 $FSDP --config.remat=True"
)
ORDER=(dpo_v5e-2x4_4pc_pallas dpo_v5e-2x4_4pc_xla dro_v5e-2x4_4pc smpo-code_v5e-2x4_4pc smpo-consistent_v5e-2x4_4pc
       dpo_v4-2x2x1_8pc dpo_v5p-2x2x1_8pc)
[ $# -gt 0 ] && ORDER=("$@")
for name in "${ORDER[@]}"; do
  echo "=== $name: python -m jaxpref.aot ${JOBS[$name]}"
  python -m jaxpref.aot ${JOBS[$name]} --json "$OUT/sd15_$name.json" 2>&1 | tee "$OUT/sd15_$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]}"
done
