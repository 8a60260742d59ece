"""How an SD1.5 experiment is laid out on a given machine: the mesh, the pairs per micro-batch, remat.

The experiment files in ``configs/`` ship sized for a TPU v5e-8 (16 GiB per chip: params and optimizer state
split over every chip, remat on). A runtime changes only the layout, never the recipe: the update's batch
size, the learning rate and the objective's settings stay the file's, so every layout trains the same run.

- ``gpu8`` (``--config=configs/dposd15.py:gpu8``, also drosd15 and smposd15): one node of 8 x 80 GB GPUs
  driven by one process (``python -m jaxpref.train``, no launcher). Pure data parallel over the devices
  the process finds (``mesh.data=-1``, ``mesh.fsdp=1``: the mesh is sized from the device count), 8 pairs
  per GPU per micro-batch, remat off. Measured on one H200 (docs/performance.md: bf16, fp32 AdamW,
  bf16 reference, cuDNN attention, no remat): 8 pairs peak at 28.9 GiB (DPO), 28.9 (DRO), 29.4 (SmPO),
  replicated state included. Compiled for 8 H100s (``python -m jaxpref.aot --topology=h100x8``), with the
  gradient accumulation and the all-reduce: 36.4, 39.4 and 38.0 GiB per GPU of the 59.7 JAX takes.
- ``lora_on_one_chip``: configs/dposd15_lora.py on the one accelerator of a notebook runtime, pairs per
  micro-batch from the memory JAX may use on it.
"""
from __future__ import annotations

from jaxpref.methods import get_method

GPU_NODE_GPUS = 8
GPU_NODE_PAIRS_PER_GPU = 8
RUNTIMES = ("", "gpu8")

# LoRA SD1.5 DPO (remat, bf16 base): XLA:CPU's memory analysis of the step needs 15.4 GiB at 2 pairs per
# micro-batch and 18.6 GiB at 4 (docs/performance.md; the TPU compiler's, with flash attention, 6.0 GiB
# at 4 pairs): the larger estimate decides. (memory JAX may use in GiB, pairs per micro-batch), largest first.
LORA_PAIRS_BY_MEMORY = ((30.0, 8), (20.0, 4), (0.0, 2))


def gpu_node(config, gpus: int = GPU_NODE_GPUS, pairs_per_gpu: int = GPU_NODE_PAIRS_PER_GPU):
    """Lays ``config`` out for one process on ``gpus`` GPUs of 80 GB (module docstring); returns it."""
    micro = gpus * pairs_per_gpu
    if config.batch_size % micro:
        raise ValueError(f"config.batch_size={config.batch_size}: the {gpus}-GPU layout needs a multiple of "
                         f"{micro} pairs ({pairs_per_gpu} per GPU per micro-batch)")
    config.grad_accum = config.batch_size // micro
    config.mesh.update(data=-1, fsdp=1)
    config.remat = False
    get_method(config.objective).fit_config_to_batch(config, micro)   # e.g. DRO's buffer holds a micro-batch
    return config


def for_runtime(config, runtime: str):
    """``configs/<file>.py:<runtime>``: '' keeps the file's layout, 'gpu8' is ``gpu_node``; returns ``config``."""
    if runtime not in RUNTIMES:
        raise ValueError(f"config argument {runtime!r}: a runtime layout, one of {RUNTIMES[1:]} (or none: the "
                         "file's own, a TPU v5e-8)")
    return gpu_node(config) if runtime == "gpu8" else config


def lora_pairs_per_chip(memory_gib: float | None) -> int | None:
    """Pairs per micro-batch for LoRA SD1.5 on one chip JAX may use ``memory_gib`` of; None (no figure: a
    CPU) keeps the config's."""
    if memory_gib is None:
        return None
    return next(pairs for floor, pairs in LORA_PAIRS_BY_MEMORY if memory_gib >= floor)


def device_memory_gib(device=None) -> float | None:
    """The memory JAX may allocate on ``device`` (default: the first local one), in GiB; None where the
    backend reports none (CPU). On GPUs this is XLA's preallocated share (75% by default)."""
    import jax

    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    return None if not limit else limit / 2 ** 30


def lora_on_one_chip(config, memory_gib: float | None):
    """configs/dposd15_lora.py on one accelerator: the pairs per micro-batch that ``memory_gib`` holds, the
    update's batch size kept (more pairs per micro-batch, fewer micro-batches); returns ``config``."""
    pairs = lora_pairs_per_chip(memory_gib)
    if pairs is None or config.batch_size % pairs:
        return config
    config.grad_accum = config.batch_size // pairs
    return config
