#!/usr/bin/env bash
# The committed TPU memory results (benchmarks/results/tpu_aot/, table in docs/performance.md): SD1.5, SD1.5 LoRA
# and SDXL train steps compiled for TPU topologies on a CPU host by `python -m jaxpref.aot`, one after another
# (each compile took 14-90 minutes and 15-25 GB of host memory here, SmPO with inversion chunks ~35 GB: add swap
# on a 24 GB host). The SDXL configs already shard fsdp over all chips (mesh data=1, fsdp=-1); the SD1.5 rows
# set it. Needs the [tpu] extra. Run from the repository root:
#   nice -n 10 bash benchmarks/tpu_aot.sh [name ...]      # no names: all, in this order
# A row that does not fit still writes its JSON (exit 1 is its verdict, not an error of this script).
set -uo pipefail
OUT=benchmarks/results/tpu_aot
mkdir -p "$OUT"
FSDP="--config.mesh.data=1 --config.mesh.fsdp=-1"
declare -A JOBS=(
  [sd15_dpo_v5e-2x4_4pc_pallas]="--config=configs/dposd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True --config.attention=pallas_tpu"
  [sd15_dpo_v5e-2x4_4pc_xla]="--config=configs/dposd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True --config.attention=xla"
  [sd15_dro_v5e-2x4_4pc]="--config=configs/drosd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True"
  [sd15_smpo-code_v5e-2x4_4pc]="--config=configs/smposd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True"
  [sd15_smpo-consistent_v5e-2x4_4pc]="--config=configs/smposd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True --config.smpo.inversion=consistent"
  [sd15_kto_v5e-2x4_4pc]="--config=configs/ktosd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True"
  [sd15_mapo_v5e-2x4_4pc]="--config=configs/maposd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True"
  [sd15_dpo_v5e-2x4_4pc_dots]="--config=configs/dposd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True --config.remat_policy=dots_saveable"
  [sd15_dpo-lora-fused_v5e-1x1_4pc]="--config=configs/dposd15_lora.py --topology=v5e:1x1 --pairs_per_chip=4 --config.lora.fuse_reference_forward=True"
  [sd15_smpo-code-chunks4_v5e-2x4_4pc]="--config=configs/smposd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True --config.smpo.inversion_chunks=4"
  [sd15_dro-reuse2_v5e-2x4_4pc]="--config=configs/drosd15.py --topology=v5e:2x4 --pairs_per_chip=4 $FSDP --config.remat=True --config.dro.steps_per_trajectory=2"
  [sd15_dpo_v4-2x2x1_8pc]="--config=configs/dposd15.py --topology=v4:2x2x1 --pairs_per_chip=8 $FSDP --config.remat=True"
  [sd15_dpo_v5p-2x2x1_8pc]="--config=configs/dposd15.py --topology=v5p:2x2x1 --pairs_per_chip=8 $FSDP --config.remat=True"
  [sd15_dro_v5p-2x2x1_8pc]="--config=configs/drosd15.py --topology=v5p:2x2x1 --pairs_per_chip=8 $FSDP --config.remat=True"
  [sd15_dro_v4-2x2x1_8pc]="--config=configs/drosd15.py --topology=v4:2x2x1 --pairs_per_chip=8 $FSDP --config.remat=True"
  [sd15_smpo-code_v4-2x2x1_8pc]="--config=configs/smposd15.py --topology=v4:2x2x1 --pairs_per_chip=8 $FSDP --config.remat=True"
  [sd15_smpo-consistent_v4-2x2x1_8pc]="--config=configs/smposd15.py --topology=v4:2x2x1 --pairs_per_chip=8 $FSDP --config.remat=True --config.smpo.inversion=consistent"
  [sd15_smpo-code_v5p-2x2x1_8pc]="--config=configs/smposd15.py --topology=v5p:2x2x1 --pairs_per_chip=8 $FSDP --config.remat=True"
  [sd15_smpo-consistent_v5p-2x2x1_8pc]="--config=configs/smposd15.py --topology=v5p:2x2x1 --pairs_per_chip=8 $FSDP --config.remat=True --config.smpo.inversion=consistent"
  [sd15_dpo-lora_v5e-1x1_4pc]="--config=configs/dposd15_lora.py --topology=v5e:1x1 --pairs_per_chip=4"
  [sd15_dpo-lora_v5e-1x1_2pc]="--config=configs/dposd15_lora.py --topology=v5e:1x1 --pairs_per_chip=2"
  [sdxl_dpo_v5p-2x2x1_1pc]="--config=configs/dposdxl.py --topology=v5p:2x2x1 --pairs_per_chip=1"
  [sdxl_dpo_v4-2x2x1_1pc]="--config=configs/dposdxl.py --topology=v4:2x2x1 --pairs_per_chip=1"
  [sdxl_dpo_v5p-2x2x1_2pc]="--config=configs/dposdxl.py --topology=v5p:2x2x1 --pairs_per_chip=2"
  [sdxl_dpo_v4-2x2x1_2pc]="--config=configs/dposdxl.py --topology=v4:2x2x1 --pairs_per_chip=2"
)
ORDER=(sd15_dpo_v5e-2x4_4pc_pallas sdxl_dpo_v5p-2x2x1_1pc sd15_dpo-lora_v5e-1x1_4pc sdxl_dpo_v4-2x2x1_1pc
       sd15_dpo-lora_v5e-1x1_2pc sdxl_dpo_v5p-2x2x1_2pc sdxl_dpo_v4-2x2x1_2pc sd15_dpo_v5e-2x4_4pc_xla sd15_dro_v5e-2x4_4pc
       sd15_smpo-code_v5e-2x4_4pc sd15_smpo-consistent_v5e-2x4_4pc sd15_dpo_v4-2x2x1_8pc sd15_dpo_v5p-2x2x1_8pc
       sd15_dro_v4-2x2x1_8pc sd15_smpo-code_v4-2x2x1_8pc sd15_smpo-consistent_v4-2x2x1_8pc sd15_dro_v5p-2x2x1_8pc
       sd15_smpo-code_v5p-2x2x1_8pc sd15_smpo-consistent_v5p-2x2x1_8pc sd15_kto_v5e-2x4_4pc sd15_mapo_v5e-2x4_4pc
       sd15_dpo_v5e-2x4_4pc_dots sd15_dpo-lora-fused_v5e-1x1_4pc sd15_smpo-code-chunks4_v5e-2x4_4pc
       sd15_dro-reuse2_v5e-2x4_4pc)
[ $# -gt 0 ] && ORDER=("$@")
for name in "${ORDER[@]}"; do
  echo "=== $name: python -m jaxpref.aot ${JOBS[$name]}"
  python -m jaxpref.aot ${JOBS[$name]} --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]}"
done
