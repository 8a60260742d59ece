"""Faults an operator meets, each stopping the run with a message that names the cause and the fix:
divergence (non-finite updates in a row), a second run on a locked workdir, a truncated weights file, a
failed checkpoint save, a workdir that cannot be written; and metrics.jsonl after a kill and a resume.

The train-level tests run the session's reference config (one compiled step, shared with test_train.py
through the persistent compile cache) and inject the fault: NaN latents, a save that fails in orbax's
background thread, a checkpoint lost to a kill. Cost (2 CPU cores, warm compile cache): ~3 minutes for
the file, most of it four in-process runs, two CLI children and the reference run.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import train_helpers as th
from jaxpref import checkpoint as checkpoint_lib, config_lib, errors, train as train_lib
from jaxpref.models import weights


# ---------------------------------------------------------------------------------------------
# Weights files.

def _write_two_tensors(path):
    weights.write_safetensors(path, {"a.weight": np.arange(512 * 64, dtype=np.float32).reshape(512, 64),
                                     "b.bias": np.ones(8, np.float16)})
    return os.path.getsize(path)


def test_truncated_safetensors_names_the_file_and_the_tensor(tmp_path):
    path = str(tmp_path / "unet.safetensors")
    size = _write_two_tensors(path)
    assert weights.read_safetensors(path)["a.weight"][511, 63] == 512 * 64 - 1
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match=rf"{path} is truncated or corrupt \(tensor a\.weight needs bytes "
                                         rf"\d+\.\.{size - 16}, file has {size - 100}\)"):
        weights.read_safetensors(path)


def test_safetensors_header_shape_that_disagrees_with_its_bytes_is_named(tmp_path):
    """A header whose dtype x shape is not its byte span (a corrupt or hand-edited file) fails by name."""
    path = str(tmp_path / "model.safetensors")
    _write_two_tensors(path)
    with open(path, "rb") as f:
        blob = f.read()
    patched = blob.replace(b'"shape":[8]', b'"shape":[9]')
    assert patched != blob
    with open(path, "wb") as f:
        f.write(patched)
    with pytest.raises(ValueError, match=r"is corrupt \(tensor b\.bias: F16 \[9\] is 18 bytes, its data offsets "
                                         r"\d+\.\.\d+ span 16\)"):
        weights.read_safetensors(path)


def test_truncated_safetensors_header_is_named(tmp_path):
    path = str(tmp_path / "model.safetensors")
    _write_two_tensors(path)
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(ValueError, match=rf"{path} is truncated or corrupt \(its header needs bytes 8\.\.\d+, "
                                         r"file has 20\)"):
        weights.read_safetensors(path)


# ---------------------------------------------------------------------------------------------
# Config keys, metrics rows and the console.

def test_every_config_key_has_a_meaning_and_print_config_lists_them():
    helps = config_lib.key_help()      # the generic keys' and every method's own
    assert set(config_lib._flat_keys(config_lib.base_config())) == set(helps)
    out = subprocess.run([sys.executable, "-m", "jaxpref.train", "--print_config", "--config.optimizer.lr=0.5"],
                         cwd=th.REPO, env=th.subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for key, meaning in helps.items():
        assert f"\n{key} = " in "\n" + out.stdout and meaning in out.stdout, key
    assert "optimizer.lr = 0.5   (base default: 0.0001)" in out.stdout
    assert "max_consecutive_skips = 20\n" in out.stdout
    # What it prints is a config a run accepts: a bad value is the run's one line and exit 2, and --help is
    # no failure (absl's own --help exits 1).
    bad = subprocess.run([sys.executable, "-m", "jaxpref.train", "--print_config", "--config.objective=ddpo"],
                         cwd=th.REPO, env=th.subprocess_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "config.objective='ddpo'" in bad.stderr and "did you mean 'dpo'" in bad.stderr
    assert not bad.stdout
    helped = subprocess.run([sys.executable, "-m", "jaxpref.train", "--help"], cwd=th.REPO, env=th.subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "--print_config" in helped.stdout + helped.stderr


def _strict_rows(path):
    """metrics.jsonl's rows, parsed as strict JSON (NaN / Infinity tokens rejected), without the timing fields
    (perf/: they measure the machine, not the run)."""
    def reject(token):
        raise ValueError(f"{path}: non-JSON token {token}")

    with open(path) as f:
        rows = [json.loads(line, parse_constant=reject) for line in f]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_metrics_are_strict_json_and_the_rate_starts_at_the_second_line(tmp_path, capsys):
    writer = train_lib.MetricWriter(str(tmp_path), total_steps=10)
    writer.write(1, {"loss": np.float32(np.nan), "bucket": float("inf"), "grad_norm": 2.0})
    writer.progress(1, {"loss": 0.5})
    writer.progress(2, {"loss": 0.4})
    writer.close()
    assert _strict_rows(tmp_path / "metrics.jsonl") == [
        {"step": 1, "train/loss": None, "train/bucket": None, "train/grad_norm": 2.0}]
    first, second = capsys.readouterr().out.splitlines()
    assert first == "step 1/10 loss=0.5"
    assert "steps/s, ETA" in second and "nan" not in second


def test_a_resumed_writer_drops_the_rows_after_its_checkpoint(tmp_path):
    """Rows 1-5 and a line cut short by a kill; resuming from checkpoint 3 keeps rows 1-3."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": s / 10}) + "\n" for s in range(1, 6))
                    + '{"step": 6, "train/lo')
    train_lib.MetricWriter(str(tmp_path), total_steps=10, resume_step=3).close()
    assert [r["step"] for r in _strict_rows(path)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Divergence.

def _pushes(config, flags):
    streak = train_lib.SkipStreak(config)
    for step, flag in enumerate(flags, start=1):
        streak.push(step, np.float32(flag))
    return streak


def test_skip_streak_stops_at_the_limit_and_names_the_steps(capsys):
    config = config_lib.load_config("tiny")
    config.max_consecutive_skips = 3
    streak = _pushes(config, [0, 1, 1, 0, 1, 1, 1])   # steps 5-7 skipped in a row; step 7 is read at the flush
    assert streak.count == 2 and "step 2: update skipped" in capsys.readouterr().err
    with pytest.raises(train_lib.TrainingDiverged, match=r"at step 7: the last 3 updates \(steps 5-7; "
                                                         r"config\.max_consecutive_skips=3\).*config\.optimizer\.lr="):
        streak.flush()
    config.max_consecutive_skips = 0                  # 0: never stop
    _pushes(config, [1] * 30).flush()


NAN_DATA_CONFIG = """import sys
sys.path.insert(0, {tests!r})
import train_helpers


def get_config():
    # Test-only: every batch after the first two has NaN latents, so every update from step 3 on is skipped.
    import jax
    import numpy as np
    from jaxpref.data import feed

    next_batch, served = feed.TrainFeed.next, []

    def nan_after_two(self):
        batch = next_batch(self)
        served.append(1)
        if len(served) > 2:
            mean = batch["latent_mean"]
            batch["latent_mean"] = jax.device_put(np.full(mean.shape, np.nan, np.float32), mean.sharding)
        return batch

    feed.TrainFeed.next = nan_after_two
    return train_helpers.tiny_dpo_config({model!r}, {data!r}, **{overrides!r})
"""


def test_a_diverging_run_exits_nonzero_without_exporting(world, tmp_path):
    """``python -m jaxpref.train`` whose data turns NaN after step 2: steps 3-5 are skipped, each with a
    warning; with max_consecutive_skips=3 the run stops after step 5 with exit 1 and a message naming the step
    and the likely causes; nothing is exported; metrics.jsonl stays strict JSON (null losses). The console
    shows the compile line and no third-party INFO lines."""
    config_file = tmp_path / "config.py"
    config_file.write_text(NAN_DATA_CONFIG.format(tests=th.TESTS, model=world[0], data=world[1], overrides={
        "total_steps": 20, "max_consecutive_skips": 3, "checkpoint.every": 10}))
    workdir = str(tmp_path / "run")
    proc = th.train_cli(str(config_file), workdir)
    assert th.finish(proc) == errors.EXIT_DIVERGED, th.log_of(proc)
    log = th.log_of(proc, tail=10 ** 6)
    assert "training diverged at step 5: the last 3 updates (steps 3-5" in log and "config.optimizer.lr=" in log
    assert "step 4: update skipped" in log
    assert not os.path.exists(os.path.join(workdir, "export"))
    rows = _strict_rows(os.path.join(workdir, "metrics.jsonl"))
    assert [r["train/loss"] is None for r in rows] == [False, False, True, True, True]
    assert "compiling the train step" in log and "compiled in" in log
    assert "PyTorch was not found" not in log
    assert not [line for line in log.splitlines() if line[:1] == "I" and line[1:5].isdigit()], log  # absl INFO


# ---------------------------------------------------------------------------------------------
# The workdir: checked first, one run at a time.

def test_a_workdir_that_cannot_be_written_fails_before_the_model_loads(world, tmp_path, monkeypatch):
    from jaxpref import trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the workdir was checked")

    monkeypatch.setattr(trainer, "build_run", no_model)
    config = th.tiny_dpo_config(*world)
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("")
    with pytest.raises(ValueError, match=rf"--workdir={a_file} is a file, not a folder"):
        train_lib.train(config, str(a_file))
    with pytest.raises(ValueError, match=rf"--workdir={a_file}/run: cannot write there"):
        train_lib.train(config, str(a_file / "run"))


LOCK_HOLDER = """import sys, time
from jaxpref import checkpoint
lock = checkpoint.WorkdirLock(sys.argv[1]).acquire()  # held while this process lives
print("locked", flush=True)
time.sleep(300)
"""


def test_a_dead_runs_lock_is_taken_over(tmp_path):
    """A live holder refuses a second lock, naming host and pid; once it is SIGKILLed, the lock is free."""
    import signal
    import socket

    workdir = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, workdir], stdout=subprocess.PIPE, text=True,
                              env=th.subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(checkpoint_lib.WorkdirLocked, match=rf"host {socket.gethostname()}, pid {holder.pid},"):
            checkpoint_lib.WorkdirLock(workdir).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = checkpoint_lib.WorkdirLock(workdir).acquire()
    with open(os.path.join(workdir, checkpoint_lib.LOCK_FILE)) as f:
        assert json.load(f)["pid"] == os.getpid()
    lock.release()


def test_a_second_run_on_a_locked_workdir_exits_naming_the_holder(world, reference, tmp_path, monkeypatch):
    """While the in-process run is at checkpoint 3, ``python -m jaxpref.train`` on the same workdir exits 1 at
    once, naming this process; the first run completes, equal to the reference run (metrics and params)."""
    import socket

    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    config_file = th.write_config_file(str(tmp_path / "config.py"), *world)
    second = {}
    save = checkpoint_lib.CheckpointManager.save

    def save_then_start_a_second_run(self, step, *args, **kwargs):
        out = save(self, step, *args, **kwargs)
        if step == 3:
            start = time.perf_counter()
            proc = th.train_cli(config_file, workdir)
            second.update(rc=th.finish(proc, timeout=300), log=th.log_of(proc), seconds=time.perf_counter() - start)
        return out

    monkeypatch.setattr(checkpoint_lib.CheckpointManager, "save", save_then_start_a_second_run)
    summary = train_lib.train(th.tiny_dpo_config(*world), workdir)
    assert second["rc"] == errors.EXIT_IO, second["log"]
    assert f"{workdir} is in use by another run (host {socket.gethostname()}, pid {os.getpid()}," in second["log"]
    assert "loading the model" not in second["log"]   # refused before anything slow
    print(f"second run refused in {second['seconds']:.1f}s")
    assert summary["step"] == 6 and th.checkpoint_steps(workdir) == [3, 6]
    assert _strict_rows(os.path.join(workdir, "metrics.jsonl")) == _strict_rows(os.path.join(ref_dir, "metrics.jsonl"))
    assert th.tree_max_abs_diff(checkpoint_lib.load_policy_params(workdir),
                                checkpoint_lib.load_policy_params(ref_dir)) == 0.0


# ---------------------------------------------------------------------------------------------
# Checkpoints: a failed save, metrics after a kill and a resume.

def _fail_meta_write_of(step: int, monkeypatch):
    """Makes the background write of checkpoint ``step``'s metadata fail as a full disk does (ENOSPC)."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

    write = handler.JsonCheckpointHandler._save_fn

    async def failing_write(self, item, directory):
        if os.path.basename(os.path.dirname(str(directory))).split(".")[0] == str(step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await write(self, item, directory)

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", failing_write)


def test_a_failed_save_stops_the_run_at_the_next_step(world, tmp_path, monkeypatch):
    """Checkpoint 4's background write fails (ENOSPC). The loader of step 6's batch waits until that save has
    ended, so the run must stop by the time step 6 starts: rows 1-4 or 1-5, no save 6, and a message with the OS error, the
    path and the intact checkpoint 2, which restores."""
    from jaxpref.data import feed

    _fail_meta_write_of(4, monkeypatch)
    managers, saves = [], []
    save, next_batch = checkpoint_lib.CheckpointManager.save, feed.TrainFeed.next

    def recording_save(self, step, *args, **kwargs):
        managers.append(self)
        saves.append(step)
        return save(self, step, *args, **kwargs)

    def next_after_the_save_ended(self):
        if 4 in saves:
            deadline = time.time() + 120
            while managers[0]._manager.is_saving_in_progress() and time.time() < deadline:
                time.sleep(0.05)
        return next_batch(self)

    monkeypatch.setattr(checkpoint_lib.CheckpointManager, "save", recording_save)
    monkeypatch.setattr(feed.TrainFeed, "next", next_after_the_save_ended)
    workdir = str(tmp_path / "run")
    config = th.tiny_dpo_config(*world, total_steps=20, **{"checkpoint.every": 2})
    with pytest.raises(checkpoint_lib.CheckpointSaveError) as err:
        train_lib.train(config, workdir)
    message = str(err.value)
    checkpoints = os.path.join(os.path.abspath(workdir), "checkpoints")
    assert f"saving checkpoint 4 to {checkpoints} failed" in message and "No space left on device" in message
    assert f"checkpoint 2 ({checkpoints}/2) is intact" in message
    assert saves == [2, 4]
    # Stopped within one step of the failed save's end: at step 5 or 6, depending on when the background
    # write failed relative to step 5 (both seen on a busy 2-core CPU).
    assert [r["step"] for r in _strict_rows(os.path.join(workdir, "metrics.jsonl"))] in ([1, 2, 3, 4], [1, 2, 3, 4, 5])
    assert th.checkpoint_steps(workdir) == [2]
    assert checkpoint_lib.load_policy_params(workdir) is not None


def test_metrics_after_a_kill_and_a_resume_equal_the_uninterrupted_runs(world, reference, tmp_path):
    """A run killed after logging step 4 but before checkpoint 4 was written (simulated: 0 -> 4, then
    checkpoint 4 deleted) resumes from checkpoint 3: metrics.jsonl then equals the uninterrupted run's rows
    exactly, each step once."""
    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    config = th.tiny_dpo_config(*world)
    train_lib.train(config, workdir, max_steps=4)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "train/lo')             # a row cut short by the kill
    train_lib.train(config, workdir)
    assert _strict_rows(os.path.join(workdir, "metrics.jsonl")) == _strict_rows(os.path.join(ref_dir, "metrics.jsonl"))
