"""``jaxpref.gpu_targets``: NVIDIA GPUs as ``jaxpref.aot`` targets. Without JAX's CUDA plugin (CI) these check
the parts that need none: names, the memory a JAX process may take, the compute capability the attention
choice reads from the target, the report's wording and the missing plugin's one line. With the plugin, the
tiny step compiles for an H100 as it would on one. The SD1.5 prediction is checked against GPU measurements
by ``benchmarks/gpu_memory.py`` (its JSONs under benchmarks/results/gpu_aot/)."""
import importlib.util
import json
import os
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import aot, gpu_targets
from jaxpref.models import attention

HAS_PLUGIN = any(importlib.util.find_spec(p) for p in gpu_targets.PLUGINS)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot_for_h100():
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": ""}   # "" lets JAX load the CUDA plugin
    return subprocess.run([sys.executable, "-m", "jaxpref.aot", "--config=configs/tiny.py:dpo", "--topology=h100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def _device(kind="NVIDIA H100 80GB HBM3", capability="9.0"):
    return types.SimpleNamespace(platform="gpu", device_kind=kind, compute_capability=capability)


def test_names():
    assert gpu_targets.parse("h100") == ("h100", 1)
    assert gpu_targets.parse("H200x8") == ("h200", 8)
    assert gpu_targets.parse("v5e:2x4") is None and gpu_targets.parse("h100:8") is None
    text = gpu_targets.target_config("a100")
    assert "core_count: 108" in text and "major: 8 minor: 0" in text and text.count("{") == text.count("}")


def test_the_usable_memory_is_what_jax_allocates(monkeypatch):
    """75% of the GPU by default (JAX's preallocation), XLA_PYTHON_CLIENT_MEM_FRACTION where set."""
    h100 = gpu_targets.GPUS["h100"]["memory"]
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert gpu_targets.usable_bytes(_device()) == (int(h100 * 0.75), 0.75)
    assert aot.hbm_bytes(_device()) == int(h100 * 0.75)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    assert gpu_targets.usable_bytes(_device()) == (int(h100 * 0.95), 0.95)
    assert gpu_targets.usable_bytes(_device("Tesla T4")) is None


def test_attention_reads_the_target_gpus_capability():
    """SD1.5's head dim 160 takes cuDNN flash attention from Hopper on: traced for an H100 mesh on a host
    without a GPU, auto picks cuDNN; for an A100 it keeps it off cuDNN. Before Ampere (a T4) cuDNN's flash
    attention is not there at all."""
    q = jnp.zeros((1, 4096, 8, 160), jnp.bfloat16)
    t4_head = jnp.zeros((1, 4096, 8, 64), jnp.bfloat16)   # a head dim cuDNN takes on Ampere
    for capability, want in (("9.0", "cudnn"), ("8.0", "chunked")):
        mesh = types.SimpleNamespace(devices=np.array([_device(capability=capability)]))
        with attention.use_mesh(mesh):
            assert attention.resolve("auto", q, q) == want, capability
    for capability, want in (("8.0", "cudnn"), ("7.5", "chunked")):   # cuDNN flash attention needs Ampere: not a T4
        mesh = types.SimpleNamespace(devices=np.array([_device("Tesla T4", capability)]))
        with attention.use_mesh(mesh):
            assert attention.resolve("auto", t4_head, t4_head) == want, capability


def test_a_gpu_report_names_the_memory_it_is_measured_against():
    report = {"objective": "dpo", "topology": "h100", "chips": 1, "device_kind": "NVIDIA H100 80GB HBM3",
              "hosts": 1, "mesh": {"data": 1, "fsdp": 1}, "pairs_per_chip": 8, "batch_size": 8, "grad_accum": 1,
              "dtype": "bfloat16", "remat": False, "remat_policy": "nothing_saveable", "attention": "cudnn",
              "attention_kernel": "cuDNN flash attention", "model": "SD1.5 preset", "platform": "gpu",
              "memory_fraction": 0.75, "hbm_per_chip": 60 * 2 ** 30, "arguments": {"params": 2 ** 30},
              "memory": {"argument": 2 ** 30, "temp": 2 ** 31, "output": 0, "alias": 0, "generated_code": 0,
                         "total": 3 * 2 ** 30}, "flops_per_chip": None, "compile_seconds": 80.0, "fits": True}
    text = aot.format_report(report)
    assert "of   60.000 GiB usable GPU memory (75%: XLA_PYTHON_CLIENT_MEM_FRACTION)" in text
    assert "cuDNN flash attention" in text and "FLOPs" not in text and "TPU layout" not in text


@pytest.mark.skipif(HAS_PLUGIN, reason="JAX's CUDA plugin is installed here")
def test_without_the_cuda_plugin_the_line_says_what_to_install():
    p = _aot_for_h100()
    assert p.returncode == 2 and "pip install -U 'jax[cuda12]'" in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.mark.skipif(not HAS_PLUGIN, reason="needs JAX's CUDA plugin (pip install -U 'jax[cuda12]')")
def test_the_tiny_step_compiles_for_an_h100():
    p = _aot_for_h100()
    assert p.returncode == 0 and "FITS" in p.stdout and "NVIDIA H100" in p.stdout, p.stdout + p.stderr


def test_the_committed_predictions_match_the_gpus_measurements():
    """Each committed prediction names a measured bench.py JSON; the peak it quotes is that file's, and the
    prediction is within 1% of it (docs/performance.md's table)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_memory

    results = os.path.join(ROOT, "benchmarks", "results")
    checked = 0
    for name in sorted(os.listdir(os.path.join(results, "gpu_aot"))):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(results, "gpu_aot", name)) as f:
            row = json.load(f)
        if not row.get("measured_file"):
            continue
        measured = gpu_memory.measured_peak(os.path.join(results, row["measured_file"]), row["objective"])
        assert row["measured_peak_bytes"] == measured, name
        assert row["predicted_peak_bytes"] == row["report"]["memory"]["total"], name
        assert abs(row["predicted_peak_bytes"] / measured - 1) < 0.01, name
        checked += 1
    assert checked >= 3
