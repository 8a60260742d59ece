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
                          "--json", str(out), "--profile", str(tmp_path / "profile")])
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
    # --profile: the traced steps' kernels, each found in the compiled step's HLO by the op it ran, fall in
    # the step's phases (the train step's named scopes, the backward pass's transpose) and are busy no longer
    # than the traced steps took.
    profile = info["profile"]
    assert (tmp_path / "profile" / "dpo" / profile["trace"]).is_file()
    assert profile["source"] == "host"  # XLA:CPU has no device plane: its thunks stand in for kernels
    phases = profile["by_phase_ms"]
    for phase in ("optimizer", "reference", "backward", "forward/other"):
        assert phases.get(phase, 0) > 0, (phase, phases)
    assert phases.get("unknown", 0) < 0.5 * sum(phases.values()), phases
    assert 0 < profile["busy_ms_per_step"] <= 1.02 * profile["traced_ms_per_step"] + 1.0
    assert sum(profile["by_kind_ms"].values()) == pytest.approx(profile["kernel_ms_per_step"])


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


def test_ranked_processes_time_in_rank_order_after_all_compiled(tmp_path):
    """``--share-device DIR:N:RANK`` (sweep.py): the turns go by rank, whoever compiled first; a rank that
    failed is not waited for."""
    share = lambda rank: f"{tmp_path / 'turn'}:4:{rank}"  # noqa: E731
    procs = [subprocess.Popen([sys.executable, "-c", _TURN_WORKER, BENCHMARKS, share(rank), str(s),
                               str(tmp_path / f"{rank}.json")]) for rank, s in ((3, 0.1), (0, 1.5), (2, 0.1))]
    import measure
    measure.mark_failed(measure.parse_share(share(1)))  # rank 1 died before compiling
    assert all(p.wait(timeout=60) == 0 for p in procs)
    runs = {rank: json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 2, 3)}
    assert all(r["start"] >= runs[0]["compiled"] for r in runs.values())
    assert runs[0]["end"] <= runs[2]["start"] and runs[2]["end"] <= runs[3]["start"]
    for bad in ("turn:2:2", "turn:2:-1", "turn:0:0"):
        with pytest.raises(ValueError, match="DIR:N"):
            measure.parse_share(bad)


def test_sweep_stops_a_variant_still_compiling_and_times_the_rest_in_order(tmp_path, monkeypatch):
    """``sweep.py``: a variant not compiled by ``--compile-deadline`` is stopped and marked failed, so the
    others do not wait for it, unless it is one of the two rows the sweep is for (torch.compile's compiles
    past it here); the rest time in the table's order and the summary relates each step to the baseline's
    and torch.compile's per pair."""
    import sweep

    row = lambda impl, workload, pairs, s: {"impl": impl, "workload": workload, "pairs": pairs, "seconds": s,  # noqa: E731
                                            "pairs_per_second": pairs / s, "mfu_model": None, "peak_bytes": None}
    # Compile seconds far from the deadline (20 s): a worker's start (it imports jax) takes seconds on busy cores.
    seconds = {"jax-dpo": (0.1, 0.200, 8), "torch-compile": (24.0, 0.180, 8), "jax-dpo-b16": (600.0, 0.3, 16),
               "jax-dro-spt4": (0.1, 0.400, 8)}
    worker = _TURN_WORKER + "json.dump({'rows': [json.loads(sys.argv[5])], **json.load(open(out))}, open(out, 'w'))\n"

    def command(v, rank, count, args, share_dir):
        compile_s, step_s, pairs = seconds[v.name]
        workload = "dro step" if "dro" in v.name else "dpo step"
        return [sys.executable, "-c", worker, BENCHMARKS, f"{share_dir}:{count}:{rank}", str(compile_s),
                os.path.join(args.out, f"{v.name}.json"), json.dumps(row(v.tool, workload, pairs, step_s))]

    monkeypatch.setattr(sweep, "command", command)
    summary = sweep.main(["--out", str(tmp_path), "--only", "jax-dpo,torch-compile,jax-dpo-b16,jax-dro-spt4",
                          "--seconds", "120", "--compile-deadline", "20"])
    by_name = {e["variant"]: e for e in summary["variants"]}
    assert by_name["jax-dpo-b16"]["exit"].startswith("still compiling") and "ms" not in by_name["jax-dpo-b16"]
    assert by_name["torch-compile"]["exit"] == 0
    runs = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("jax-dpo", "torch-compile", "jax-dro-spt4")]
    assert all(a["end"] <= b["start"] for a, b in zip(runs, runs[1:]))
    assert by_name["jax-dpo"]["speedup_vs_torch_compile"] == pytest.approx(0.180 / 0.200)
    assert by_name["jax-dro-spt4"]["step_over_jax_dpo"] == pytest.approx(2.0)
    assert "speedup_vs_torch_compile" not in by_name["jax-dro-spt4"]  # another workload
    assert json.loads((tmp_path / "sweep.json").read_text()) == json.loads(json.dumps(summary))


def test_profile_kinds_and_busy_time(tmp_path, capsys):
    """Kernel names as cuDNN, cuBLAS, XLA and Inductor give them on Hopper fall in their kind; busy time is
    the union of the kernels' intervals (overlapping streams counted once)."""
    import profile_breakdown as pb

    kinds = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_cudnn": "convolution",
        "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas": "matmul",
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN": "matmul",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128": "attention",
        "triton_poi_fused__to_copy_add_convolution_3": "elementwise",
        "triton_red_fused_native_group_norm_0": "reduction",
        "triton_per_fused_native_group_norm_silu_7": "reduction",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float>>": "optimizer",
        "input_reduce_fusion_3": "reduction",
        "loop_convert_fusion_12": "elementwise",
        "gemm_fusion_dot_12": "matmul",
        "loop_transpose_fusion_2": "copy/transpose",
    }
    assert {name: pb.kernel_kind(name) for name in kinds} == kinds
    kernels = [("gemm_a", None, 0.0, 10e6), ("loop_add_fusion", None, 5e6, 10e6), ("gemm_a", None, 20e6, 10e6),
               ("input_reduce_fusion", None, 40e6, 20e6)]
    summary = pb.summarize(kernels, steps=2)
    assert summary["busy_ms_per_step"] == pytest.approx((15 + 10 + 20) / 2)
    assert summary["by_kind_ms"] == pytest.approx({"matmul": 10.0, "elementwise": 5.0, "reduction": 10.0})
    assert summary["top"][0]["op"] == "gemm_a" and summary["top"][0]["calls_per_step"] == 1.0
    # Its command line names a path that is not a trace in one line, exit 2.
    missing = str(tmp_path / "nowhere")
    not_trace = tmp_path / "notes.json"
    not_trace.write_text("not json")
    cases = (([missing], missing), ([str(not_trace)], str(not_trace)), ([str(tmp_path), "--steps=0"], "--steps=0"))
    for argv, named in cases:
        with pytest.raises(SystemExit) as exit_info:
            pb.main(argv)
        assert exit_info.value.code == 2 and named in capsys.readouterr().err


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
