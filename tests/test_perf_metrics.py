"""Every run reports its speed: perf/step_ms and perf/pairs_per_s on logged updates, perf/mfu where a peak is
known (declared here for the CPU), equal to the method's FLOPs per update over the measured step time over
the peak; none on a device whose peak is unknown; a checkpoint's blocking copy is left out of the step time.
``config.profile`` traces the requested updates only.
"""
import glob
import gzip
import json
import os
import re
import shutil
import time

import pytest

import train_helpers as th
from jaxpref import checkpoint as checkpoint_lib, flops, train as train_lib


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "train/loss" in r}


def test_speed_mfu_and_profile_of_a_run(world, reference, tmp_path, capsys, monkeypatch):
    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir, ignore=shutil.ignore_patterns("lock"))

    # Resumed at 6 -> 9: update 7 starts the clock, 8 and 9 are measured; update 8 is traced. A profiled step is
    # its own program (its op names are in the compile cache's key): built at LLVM level 0 for its three updates
    # (conftest's compiled_for_few_runs); the run below loads the reference run's step from the cache.
    config = th.tiny_dpo_config(*world, total_steps=9, peak_tflops=0.5, profile="8:8")
    with pytest.MonkeyPatch.context() as level_0:
        th.compile_at_llvm_level_0(level_0.setattr)
        train_lib.train(config, workdir)
    rows = _rows(workdir)
    assert "perf/step_ms" not in rows[7]
    for step in (8, 9):
        r = rows[step]
        seconds = r["perf/step_ms"] / 1e3
        assert r["perf/pairs_per_s"] == pytest.approx(config.batch_size / seconds)
        assert r["perf/peak_flops"] == 0.5e12      # one CPU device
        assert r["perf/mfu"] == pytest.approx(r["perf/flops_per_update"] / seconds / r["perf/peak_flops"])
    # The FLOPs are DPO's model (2B·G + 2B·F) with the UNet's own F and G.
    assert 0 < rows[8]["perf/flops_per_update"] == rows[9]["perf/flops_per_update"]
    assert "profiling updates 8-8" in capsys.readouterr().out
    traces = glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
    assert len(traces) == 1, traces
    with gzip.open(os.path.join(workdir, "profile", "step.hlo.txt.gz"), "rt") as f:  # the traced program's HLO
        hlo = f.read()
    assert re.search(r'op_name="jit\(train_step\)/optimizer/', hlo)
    assert re.search(r'op_name="jit\(train_step\)/[^"]*reference\)?/UNet2DConditionModel/', hlo)

    # No declared peak on a CPU: speed, but no MFU. The checkpoint at 12 blocks 2 s more than it does: the
    # step time leaves the save's blocking part out, as it leaves evaluations out.
    monkeypatch.setattr(checkpoint_lib.CheckpointManager, "save", _slow_save)
    train_lib.train(th.tiny_dpo_config(*world, total_steps=13), workdir)
    rows = _rows(workdir)
    assert "perf/step_ms" in rows[11] and "perf/mfu" not in rows[11]
    assert 0 < rows[13]["perf/step_ms"] < 0.5 * SAVE_DELAY_S * 1e3, rows[13]
    assert flops.peak_flops("cpu") is None
    with open(os.path.join(workdir, train_lib.FINISHED_FILE)) as f:   # the copied run's step-6 summary replaced
        assert json.load(f)["step"] == 13


SAVE_DELAY_S = 2.0
_save = checkpoint_lib.CheckpointManager.save


def _slow_save(self, *args, **kwargs):
    time.sleep(SAVE_DELAY_S)
    return _save(self, *args, **kwargs)
