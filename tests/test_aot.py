"""``python -m jaxpref.aot``: the train step compiled for a TPU topology on this CPU host, and its verdict."""
import dataclasses
import json
import os
import subprocess
import sys
from unittest import mock

import jax
import pytest

from jaxpref import aot, config_lib, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30


def _aot(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "jaxpref.aot", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT))


def test_tiny_dpo_step_fits_v5e_8(tmp_path):
    """The tiny config's DPO step, compiled by the TPU compiler for 8 v5e chips: FITS, exit 0, Pallas attention."""
    out = tmp_path / "fit.json"
    p = _aot("--config=configs/tiny.py:dpo", "--topology=v5e:2x4", f"--json={out}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "FITS" in p.stdout and "DOES NOT FIT" not in p.stdout
    assert "TPU_ACCELERATOR_TYPE" not in p.stderr and "TPU_WORKER_HOSTNAMES" not in p.stderr  # libtpu kept quiet
    r = json.loads(out.read_text())
    assert r["fits"] and r["chips"] == 8 and r["device_kind"] == "TPU v5 lite" and r["hbm_per_chip"] == 16 * GIB
    assert r["uses_pallas_attention"]  # auto on a TPU topology
    assert r["pairs_per_chip"] == 2 and r["mesh"] == {"data": 8, "fsdp": 1}
    m = r["memory"]
    assert 0 < m["temp"] < GIB and m["total"] >= m["argument"] + m["temp"] - m["alias"]
    # Arguments per chip from the shardings (replicated on data=8) vs the compiler's count, which lays small
    # arrays out in (8, 128) tiles: at the tiny model's 32-wide layers that is up to ~2x, never less.
    assert sum(r["arguments"].values()) <= m["argument"] <= 3 * sum(r["arguments"].values())
    assert r["flops_per_chip"] > 0


def test_a_refused_program_names_its_largest_values(monkeypatch):
    """When the TPU compiler refuses a step outright (over HBM) it assigns no buffers; the report then lists the
    program's largest values before partitioning with the ops that make them. The tiny DPO step with dense
    (`xla`) attention, its compile refused by a stand-in for the compiler: the largest value is the top-level
    self-attention's logits, f32 [2 x 16 pairs, 2 heads, 64 tokens, 64 tokens] (8 x 8 latents) = 1 MiB."""
    def refuse(self, *args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                           "temporaries (99.00G) exceeds available HBM (15.75G).")

    monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
    config = config_lib.load_config("tiny:dpo")
    config.attention = "xla"
    r = aot.check(config, "v5e:2x4", top=3)
    assert r["compiler_refused"] and not r["fits"] and "99.00G" in r["compiler_message"]
    largest = r["largest_before_partitioning"]
    assert largest[0]["bytes"] == 4 * (2 * 16) * 2 * 64 * 64
    assert any("attn1" in b["op"] and "dot_general" in b["op"] for b in largest), largest
    text = aot.format_report(r)
    assert "largest values of the program before partitioning" in text and "attn1" in text


def test_an_oversized_batch_does_not_fit(tmp_path):
    """10 million pairs per chip: the batch alone is over 16 GiB per chip; DOES NOT FIT, exit 1."""
    p = _aot("--config=configs/tiny.py:dpo", "--topology=v5e:2x4", "--pairs_per_chip=10000000")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "DOES NOT FIT" in p.stdout and "arguments alone exceed" in p.stdout


def test_unknown_topologies_and_bad_config_keys_are_named():
    with pytest.raises(ValueError, match=r"v9:2x2.*v5e:2x4"):
        aot.topology_devices("v9:2x2")
    with pytest.raises(ValueError, match=r"v5e:3x5.*does not know it.*v4:2x2x4"):
        aot.topology_devices("v5e:3x5")
    # A plain `pip install -e .` has no TPU compiler: the line says what to install, not that v5e:2x4 is unknown.
    real_find_spec = aot.importlib.util.find_spec
    with mock.patch.object(aot.importlib.util, "find_spec",
                           lambda name, *a: None if name == "libtpu" else real_find_spec(name, *a)), \
            mock.patch.object(aot.topologies, "get_topology_desc", side_effect=RuntimeError("TPU support not installed")):
        with pytest.raises(ValueError, match=r"needs the TPU compiler.*pip install -e '\.\[tpu\]'"):
            aot.topology_devices("v5e:2x4")
    single = aot.topology_devices("v5e:1x1")  # one chip: smaller than a v5e host's 2x2
    assert len(single) == 1 and single[0].device_kind == "TPU v5 lite"
    p = _aot("--config=configs/tiny.py:dpo", "--topology=v5q:2x4")
    assert p.returncode == 2 and "v5q:2x4" in p.stderr and "v5e:2x4" in p.stderr


def test_a_multi_host_pod_is_one_program():
    """v4:2x2x4 is 16 chips on 4 hosts: one mesh over all of them, the batch split 16 ways."""
    devices = aot.topology_devices("v4:2x2x4")
    assert len(devices) == 16 and len({d.process_index for d in devices}) == 4
    c = config_lib.load_config("tiny:dpo")
    c.batch_size, c.mesh.data, c.mesh.fsdp = 32, 4, 4
    program = aot.build_program(c, devices)
    assert dict(program.mesh.shape) == {"data": 4, "fsdp": 4}
    text = program.lower().as_text()
    assert "tpu_custom_call" in text and "num_partitions = 16" in text


def test_sd15_params_and_optimizer_per_chip_scale_as_one_over_fsdp():
    """SD1.5 (the built-in preset, no weights), DPO: params + AdamW per chip x N is within 10% of one chip's."""
    c = config_lib.load_config("dposd15")
    c.batch_size, c.grad_accum = 8, 1
    devices = aot.topology_devices("v5e:2x4")
    program = aot.build_program(c, devices)
    per_chip = {}
    for n in (1, 2, 4, 8):
        mesh = sharding.make_mesh(1, n, devices=devices[:n])
        args = dataclasses.replace(program, mesh=mesh).argument_bytes()
        per_chip[n] = args["params"] + args["optimizer"]
    assert per_chip[1] == pytest.approx(3 * 859_520_964 * 4, rel=0.01)  # fp32 params, Adam's mu and nu
    for n in (2, 4, 8):
        assert per_chip[n] * n == pytest.approx(per_chip[1], rel=0.10)


def test_sdxl_configs_compile_for_sdxl_from_the_presets():
    """configs/dposdxl.py (placeholder model path): the SDXL presets, checked against the public checkpoint's
    sizes (UNet 2,567,463,684 params; CLIP-L 123,060,480 + OpenCLIP-bigG 694,659,840), fsdp over the v5p-8's
    4 chips: a quarter of the fp32 params per chip."""
    c = config_lib.load_config("dposdxl")
    program = aot.build_program(c, aot.topology_devices("v5p:2x2x1"))
    pipe = program.run.pipeline
    count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    assert pipe.is_sdxl and pipe.folder == "SDXL preset" and dict(program.mesh.shape) == {"data": 1, "fsdp": 4}
    assert count(pipe.unet_params) == 2_567_463_684
    assert count(pipe.text_encoder_params["text_encoder"]) == 123_060_480
    assert count(pipe.text_encoder_params["text_encoder_2"]) == 694_659_840
    assert program.argument_bytes()["params"] == pytest.approx(2_567_463_684 * 4 / 4, rel=0.01)
    assert aot.architecture_of("/path/to/stable-diffusion-v1-5") == "sd15"
    assert aot.architecture_of("/m/sdxl-turbo") == "sd15" and aot.architecture_of("/m/sdxl-turbo", "sdxl") == "sdxl"


def test_the_pod_launcher_refuses_a_config_that_does_not_fit(tmp_path):
    """launch/tpu_pod.sh with FIT_CHECK=local runs the aot check here first: DOES NOT FIT -> exit 1 and gcloud
    never called; FIT_CHECK=off goes straight to gcloud."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud_calls"
    (bin_dir / "gcloud").write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {calls}\n")
    (bin_dir / "gcloud").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=ROOT, TPU_NAME="pod", ZONE="z",
               WORKDIR="gs://b/run", TOPOLOGY="v5e:2x4", CONFIG="configs/tiny.py:dpo", EXTRA="--config.batch_size=80000000",
               FIT_CHECK="local", STAGES="fitcheck,train", PYTHON=sys.executable)
    script = os.path.join(ROOT, "launch", "tpu_pod.sh")
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 1 and "DOES NOT FIT" in p.stdout and "not training" in p.stderr
    assert not calls.exists()
    p = subprocess.run(["bash", script], env=dict(env, FIT_CHECK="off"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "jaxpref.train --config=configs/tiny.py:dpo" in calls.read_text()
