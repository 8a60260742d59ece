"""NVIDIA GPUs as compile targets on any host: ``python -m jaxpref.aot --topology=h100`` without a GPU.

XLA compiles for a GPU it does not see from a description of the device (``GpuTargetConfig``: SM count,
shared memory, compute capability, memory size, the CUDA and cuDNN versions), given to JAX's CUDA plugin
through ``jax.experimental.topologies``. The plugin (``pip install -U 'jax[cuda12]'``) brings the compiler;
no driver or device is needed. Without a device there is no autotuning: XLA would pick Triton GEMM tiles by
heuristics and refuses some of SD's shapes, so matmuls compile as cuBLAS calls (``--xla_gpu_enable_triton_gemm
=false``, set before the compiler starts). The buffers are assigned as on the device: the SD1.5 DPO, SmPO and
DRO steps' peaks predicted this way were within 0.3% of the peaks measured on an H200 (docs/performance.md).

JAX and jaxpref read a GPU's compute capability from a local device when they pick an attention kernel (cuDNN
flash attention takes head dims up to 256 from Hopper on, SD1.5's 160 included); ``target_capability``
answers with the target's while a step is compiled for it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re

# Per GPU: SMs, compute capability, memory (bytes, as nvidia-smi totals it), bandwidth (bytes/s), L2, clock,
# shared memory per SM and the opt-in maximum per block (CUDA's device properties).
GPUS = {
    "h100": dict(description="NVIDIA H100 80GB HBM3", core_count=132, capability=(9, 0),
                 memory=81559 * 2 ** 20, bandwidth=3.35e12, l2=50 * 2 ** 20, clock_ghz=1.98,
                 smem_per_core=233472, smem_per_block_optin=232448, fpus_per_core=128),
    "h200": dict(description="NVIDIA H200", core_count=132, capability=(9, 0),
                 memory=143771 * 2 ** 20, bandwidth=4.8e12, l2=50 * 2 ** 20, clock_ghz=1.98,
                 smem_per_core=233472, smem_per_block_optin=232448, fpus_per_core=128),
    "a100": dict(description="NVIDIA A100-SXM4-80GB", core_count=108, capability=(8, 0),
                 memory=81920 * 2 ** 20, bandwidth=2.039e12, l2=40 * 2 ** 20, clock_ghz=1.41,
                 smem_per_core=167936, smem_per_block_optin=166912, fpus_per_core=64),
}
_NAME = re.compile(rf"^({'|'.join(GPUS)})(?:x(\d+))?$")
PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")
# What a JAX process may allocate by default: XLA_PYTHON_CLIENT_MEM_FRACTION, else 75% of the GPU's memory.
DEFAULT_MEM_FRACTION = 0.75


def parse(name: str) -> tuple[str, int] | None:
    """("h100", 8) for "h100x8", ("h200", 1) for "h200"; None for a name that is not a GPU's."""
    m = _NAME.match(name.strip().lower())
    return (m.group(1), int(m.group(2) or 1)) if m else None


def prepare_host() -> None:
    """Before JAX starts its backends: let the CUDA plugin load without a driver, and compile matmuls as
    cuBLAS calls (no autotuning without a device)."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_triton_gemm=false".strip()


def target_config(kind: str) -> str:
    """The ``GpuTargetConfig`` text of a GPU kind, with this install's CUDA runtime and cuDNN versions."""
    g = GPUS[kind]
    runtime, cudnn = _library_versions()
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {g['smem_per_core']}
  threads_per_core_limit: 2048
  core_count: {g['core_count']}
  fpus_per_core: {g['fpus_per_core']}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(g['bandwidth'])}
  l2_cache_size: {g['l2']}
  clock_rate_ghz: {g['clock_ghz']}
  device_memory_size: {g['memory']}
  shared_memory_per_block_optin: {g['smem_per_block_optin']}
  cuda_compute_capability {{ major: {g['capability'][0]} minor: {g['capability'][1]} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {cudnn // 10000} minor: {cudnn // 100 % 100} }}
runtime_version {{ major: {runtime // 1000} minor: {runtime // 10 % 100} }}
device_description_str: "{g['description']}"
"""


def _library_versions() -> tuple[int, int]:
    """(CUDA runtime as 12090, cuDNN as 92800) of the installed plugin; CUDA 12.8 / cuDNN 9.7 if it cannot say."""
    try:
        from jax._src.lib import cuda_versions
        return int(cuda_versions.cuda_runtime_get_version()), int(cuda_versions.cudnn_get_version())
    except Exception:  # noqa: BLE001 - an older plugin without the helpers: the versions only tune heuristics
        return 12080, 90700


def devices(name: str):
    """The abstract devices of ``count`` GPUs of ``kind`` on one host; ValueError naming what is missing."""
    kind, count = parse(name)
    if not any(importlib.util.find_spec(p) for p in PLUGINS):
        raise ValueError(f"--topology={name!r}: compiling for an NVIDIA GPU needs JAX's CUDA plugin, which this "
                         "install lacks: pip install -U 'jax[cuda12]' (no GPU or driver needed)")
    if not 1 <= count <= 8:
        raise ValueError(f"--topology={name!r}: 1 to 8 GPUs of one host ({kind}x8 the most)")
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(platform="cuda", target_config=target_config(kind),
                                            topology=f"1x1x{count}").devices
    except Exception as e:  # noqa: BLE001 - the plugin's own error, in one line
        raise ValueError(f"--topology={name!r}: JAX's CUDA plugin cannot describe it ({str(e).splitlines()[0]})") from e


def usable_bytes(device) -> tuple[int, float] | None:
    """(bytes a JAX process may allocate on ``device``, the fraction used) for a kind in ``GPUS``."""
    for g in GPUS.values():
        if g["description"] == device.device_kind:
            fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
            return int(g["memory"] * fraction), fraction
    return None


@contextlib.contextmanager
def target_capability(device):
    """While tracing for ``device``: JAX's cuDNN attention checks ask for the target's compute capability
    instead of a local GPU's (there may be none)."""
    capability = getattr(device, "compute_capability", None)
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
    except ImportError:
        fused = None
    if capability is None or fused is None or not hasattr(fused, "check_compute_capability"):
        yield
        return
    current = tuple(int(x) for x in str(capability).split("."))
    saved = fused.check_compute_capability, fused.is_cuda_compute_capability_equal
    fused.check_compute_capability = lambda c: current >= tuple(int(x) for x in c.split("."))
    fused.is_cuda_compute_capability_equal = lambda c: current == tuple(int(x) for x in c.split("."))
    try:
        yield
    finally:
        fused.check_compute_capability, fused.is_cuda_compute_capability_equal = saved
