"""The benchmark suite (``python benchmarks/bench.py``) keeps working: the tiny DPO benchmark end to end
(CLI, table, JSON), the PyTorch reference step's loss at init, and the FSDP per-device state bytes of
SD1.5 falling as 1/N over 1/2/4/8 simulated devices (eval_shape only), the self-generated data benchmark's
pairs and experts. The FLOP model and MFU are
``jaxpref.flops``' (tests/test_flops.py)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxpref import flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import bench  # noqa: E402  (benchmarks/bench.py)


@pytest.mark.compiled_for_few_runs  # checks the benchmark's fields and FLOP counts (HLO-level), not its speed
def test_tiny_dpo_benchmark_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    payload = bench.main(["--size", "tiny", "--objectives", "dpo", "--dtype", "float32", "--iters", "2",
                          "--json", str(out)])
    table = capsys.readouterr().out
    assert "dpo step" in table and "ms/call" in table
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(payload["rows"], default=str))
    (row,) = saved["rows"]
    assert row["impl"] == "jax" and row["workload"] == "dpo step" and row["pairs"] == 2
    for key in ("seconds", "pairs_per_second", "model_flops", "xla_flops", "model_tflops_per_s", "xla_tflops_per_s",
                "peak_bytes", "compile_seconds"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    assert row["mfu_model"] is None  # CPU: no peak, no MFU
    # The model count (2B·G + 2B·F from XLA's batch-1 UNet counts) and XLA's count of the whole step
    # agree to within the step's non-UNet work (text encoder, loss, AdamW).
    assert row["xla_flops"] == pytest.approx(row["model_flops"], rel=0.15)
    info = saved["objectives"]["dpo"]
    assert math.isfinite(info["final_metrics"]["loss"])


def test_torch_reference_step_tiny():
    """The PyTorch DPO step runs on CPU and, with policy = reference in fp32, its first loss is log 2."""
    import torch
    import torch_dpo_step as tds

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spinning OpenMP threads on shared CI cores: 100x slower steps
    try:
        policy, reference, text_encoder = tds.build_models("tiny", "cpu", torch.float32)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
        step = tds.make_step(policy, reference, text_encoder, optimizer, "cpu", torch.float32)
        loss = step(*tds.make_batch("tiny", 2, "cpu"))
        assert float(loss) == pytest.approx(math.log(2), abs=1e-5)
        rows = tds.run("tiny", 2, "float32", iters=1, flops=(1e9, 3e9), log=lambda *_: None, warmup=0)
    finally:
        torch.set_num_threads(threads)
    (row,) = rows
    assert row.impl == "torch eager" and row.seconds > 0
    assert row.model_flops == flops.model_flops("dpo step", 2, 1e9, 3e9)


_STATE_BYTES = """
import json
import sys
sys.path.insert(0, "benchmarks")
import memory_table
print(json.dumps([memory_table.state_bytes("sd15", n) for n in (1, 2, 4, 8)]))
"""


def test_sd15_state_bytes_fall_as_one_over_n():
    """FSDP over (1, N): params + AdamW state per device ∝ 1/N within 10% (small tensors replicate)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    out = subprocess.run([sys.executable, "-c", _STATE_BYTES], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["devices"] for r in rows] == [1, 2, 4, 8]
    one = rows[0]
    assert one["params"] == 859_520_964 * 4  # SD1.5's UNet, fp32
    assert one["opt_state"] == pytest.approx(2 * one["params"], rel=1e-6)  # AdamW mu and nu (+ counters)
    assert one["frozen_ref"] == pytest.approx(859_520_964 * 2, rel=1e-6)  # bf16 reference
    for r in rows:
        assert r["params+opt"] * r["devices"] / one["params+opt"] == pytest.approx(1.0, rel=0.10), r


def test_command_line_from_another_folder(tmp_path):
    """``python benchmarks/bench.py`` imports from its own path, whatever the working folder."""
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "bench.py"), "--help"], cwd=tmp_path,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "python benchmarks/bench.py --memory-table" in out.stdout and "Method.flops" in out.stdout


_TURN_WORKER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import measure
share, compile_s, out = measure.parse_share(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
time.sleep(compile_s)                      # the compile
compiled = time.time()
with measure.timing_turn(share, log=lambda *a: None):
    start = time.time()
    time.sleep(0.5)                        # the timed calls
    end = time.time()
json.dump({"compiled": compiled, "start": start, "end": end}, open(out, "w"))
"""


def test_processes_sharing_a_device_time_after_all_compiled_and_one_at_a_time(tmp_path):
    """``bench.py --share-device DIR:N`` (gpu_bench.sh STAGE=shared): no process times while another
    compiles or times; a failed one (``mark_failed``) is not waited for."""
    import measure

    share = f"{tmp_path / 'turn'}:4"
    procs = [subprocess.Popen([sys.executable, "-c", _TURN_WORKER, BENCHMARKS, share, str(s), str(tmp_path / f"{i}.json")])
             for i, s in enumerate((0.1, 1.5, 0.1))]
    measure.mark_failed(measure.parse_share(share))  # the fourth process died before compiling
    assert all(p.wait(timeout=60) == 0 for p in procs)
    runs = sorted((json.loads((tmp_path / f"{i}.json").read_text()) for i in range(3)), key=lambda r: r["start"])
    last_compile = max(r["compiled"] for r in runs)
    assert all(r["start"] >= last_compile for r in runs)
    assert all(a["end"] <= b["start"] for a, b in zip(runs, runs[1:]))
    for bad in ("turn", "turn:", "turn:0", ":2"):  # named at the command line, before any compile
        with pytest.raises(ValueError, match="DIR:N"):
            measure.parse_share(bad)
    with pytest.raises(SystemExit):  # a group is N commands of one objective each, started together
        bench.main(["--objectives", "dpo,dro", "--share-device", share])


def test_self_generated_benchmark_data_is_what_the_trainer_reads(tmp_path):
    """``benchmarks/self_generated.py``'s pairs rank each caption's images best against worst with near-ties
    dropped, its experts folder opens as DRO's data (each caption's best 3, best first; hand-set rewards), and a
    run that does not read the pairs is refused."""
    import self_generated
    from jaxpref.data import common, sources

    captions = ["a red circle on a white background", "two blue squares on a black background"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 6, 16, 16, 3), dtype=np.uint8)
    rewards = np.array([[0.1, 0.9, 0.5, 0.3, 0.7, 0.2], [0.40, 0.41, 0.8, 0.2, 0.6, 0.395]], np.float32)
    pairs = self_generated.pair_source(captions, images, rewards)
    got = [(r["caption"].decode(), r["reward_0"], r["reward_1"]) for r in pairs.data]
    want = [(captions[0], 0.9, 0.1), (captions[0], 0.7, 0.2), (captions[0], 0.5, 0.3),
            (captions[1], 0.8, 0.2), (captions[1], 0.6, 0.395)]  # 0.41 vs 0.40: a tie, dropped
    assert [(c, pytest.approx(w), pytest.approx(l)) for c, w, l in want] == got
    assert pairs.kind == "pairs" and pairs.reward_range == pytest.approx((0.1, 0.9))
    np.testing.assert_array_equal(common.decode_image(pairs.data[0]["jpg_0"]), images[0, 1])  # PNG: lossless
    np.testing.assert_array_equal(common.decode_image(pairs.data[0]["jpg_1"]), images[0, 0])

    experts = sources.open_source(self_generated.write_experts(str(tmp_path / "experts"), captions, images, rewards))
    assert experts.kind == "images" and len(experts) == 6
    kept = [(e["caption"], float(e["reward"])) for e in (experts[i] for i in range(len(experts)))]
    assert kept == sorted(kept, key=lambda e: -e[1])
    assert sorted(r for c, r in kept if c == captions[0]) == pytest.approx([0.5, 0.7, 0.9])
    assert sorted(r for c, r in kept if c == captions[1]) == pytest.approx([0.41, 0.6, 0.8])

    # The pairs reach a run through its data opener; a run that never opened them fails instead of reporting.
    from jaxpref.data import feed
    opener = feed.open_train_source
    with self_generated.training_pairs(pairs):
        assert feed.open_train_source(None, None) is pairs
    with pytest.raises(RuntimeError, match="did not read the generated pairs"):
        with self_generated.training_pairs(pairs):
            pass
    assert feed.open_train_source is opener
