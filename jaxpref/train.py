"""The training command and its loop: ``python -m jaxpref.train --config=configs/drosd15.py --workdir=DIR``.

Parse config -> validate (before anything compiles) -> check and lock the workdir -> mesh -> models ->
data -> sharded state (or the latest checkpoint of the workdir) -> loop of compiled steps -> checkpoints,
logs, samples, evaluation -> final checkpoint, exported UNet, base-vs-trained report. With no ``--config``
it trains the embedded default (configs/tiny.py: DRO on the shapes world with the shipped tiny model, CPU,
minutes). ``--print_config`` lists every config key with its value and meaning. ``train(config, workdir)``
is the same run as a function (tests, notebooks, sweeps).

A checkpoint holds the state and every process's loader position, so a resumed run continues with
exactly the next batch, and metrics.jsonl drops the rows the interrupted run wrote after that checkpoint.
The run stops with one line and nothing exported when it diverges (exit 3: ``config.max_consecutive_skips``
updates in a row skipped for a non-finite loss or gradient), or when another run holds the workdir or a
checkpoint cannot be written (exit 4); docs/operating.md lists every exit code.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import hashlib
import json
import math
import os
import sys
import time

if __name__ == "__main__":
    from jaxpref import console as _console
    _console.quiet_native_logs()   # before jax loads: XLA's C++ log reads its level once

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from jaxpref import checkpoint as checkpoint_lib
from jaxpref import config_lib, console, errors, fileio, hub, lora, paths, run_config, sharding, trainer
from jaxpref import evaluate as evaluate_lib
from jaxpref import prompts as prompts_lib
from jaxpref import flops as flops_lib
from jaxpref.data import feed as feed_lib
from jaxpref.models import save_unet
from jaxpref.models.pipeline import save_pipeline


_say = console.say
FINISHED_FILE = "finished.json"   # a finished run's summary, written last: a rerun has nothing to do


class TrainingDiverged(errors.JaxprefError):
    """``config.max_consecutive_skips`` updates in a row were skipped for a non-finite loss or gradient."""

    exit_code = errors.EXIT_DIVERGED


class SkipStreak:
    """Counts updates skipped in a row (the step skips an update whose loss or gradient is not finite: params
    and optimizer state stay) and stops the run at ``config.max_consecutive_skips`` (0: never).

    Each step's flag is read one step late, once the next step is queued, so the device never waits for
    the host; the run stops one step after the streak's last.
    """

    def __init__(self, config):
        self.config = config
        self.limit = config.max_consecutive_skips
        self.count = 0
        self._pending = None

    def push(self, step: int, skipped_flag):
        """Keeps ``step``'s flag (a device scalar) and checks the previous step's."""
        previous, self._pending = self._pending, (step, skipped_flag)
        if previous is not None:
            self._observe(*previous)

    def flush(self):
        """Checks the last pushed step (after the loop)."""
        previous, self._pending = self._pending, None
        if previous is not None:
            self._observe(*previous)

    def _observe(self, step: int, skipped_flag):
        if not float(skipped_flag):
            self.count = 0
            return
        self.count += 1
        console.warn(f"step {step}: update skipped, non-finite loss or gradient (params and optimizer state "
                     f"unchanged); {self.count} in a row")
        if self.limit and self.count >= self.limit:
            raise TrainingDiverged(self._message(step))

    def _message(self, step: int) -> str:
        opt = self.config.optimizer
        return (f"training diverged at step {step}: the last {self.count} updates (steps {step - self.count + 1}-"
                f"{step}; config.max_consecutive_skips={self.limit}) were all skipped for a non-finite loss or "
                f"gradient. Likely causes: a learning rate too high for this model (config.optimizer.lr={opt.lr}), "
                f"gradient clipping off (config.optimizer.grad_clip={opt.grad_clip}), or NaN/Inf in the data (a "
                "corrupt latent cache). Nothing was exported, and the latest checkpoint may hold diverged weights: "
                "fix the cause and start again in a new --workdir")


class MetricWriter:
    """JSONL + TensorBoard + console, on process 0 only.

    metrics.jsonl is strict JSON: a non-finite value (a diagnostic with no samples in a batch, a diverged
    loss) is written as null. A resumed run first drops the rows after its checkpoint's step (written by the
    interrupted run after that checkpoint; the resumed run writes them again), so the file ends equal to an
    uninterrupted run's; TensorBoard hides those events too (``purge_step``). A row of a kind (``train/``,
    ``eval/``) already written for a step, e.g. the final evaluation of a run that stopped right after it,
    is replaced rather than written twice.

    The console's rate and ETA count training only: ``exclude(seconds)`` takes out time spent on
    evaluations and sample grids.
    """

    def __init__(self, workdir: str, total_steps: int, resume_step: int = 0, shown=()):
        self.total_steps = total_steps
        self.enabled = console.is_main_process()
        self.shown = ("loss", "implicit_acc", "grad_norm", *shown, "skipped_total")
        self._jsonl = self._tb = None
        self._start = self._start_step = None
        self._excluded = 0.0
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._written = set()
        if self.enabled:
            fileio.makedirs(workdir)
            path = self._path
            drop_rows_after(path, resume_step)
            self._written = _row_kinds(path)
            self._jsonl = fileio.open_append(path)
            try:
                from tensorboardX import SummaryWriter

                if fileio.is_remote(workdir):  # tensorboardX writes gs:// only through TensorFlow
                    raise ImportError

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # TensorBoard is optional; JSONL always works
                self._tb = None
                if fileio.is_remote(workdir):
                    logging.warning("%s is a bucket: no TensorBoard events (tensorboardX cannot write there); "
                                    "metrics.jsonl has every row", workdir)

    def write(self, step: int, metrics: dict, prefix: str = "train/", extra: dict | None = None):
        """One row: ``metrics`` under ``prefix``, and ``extra``'s keys as they are (e.g. perf/step_ms)."""
        if not self.enabled:
            return
        record = {"step": step, **{prefix + k: _finite_or_none(v) for k, v in metrics.items()},
                  **{k: _finite_or_none(v) for k, v in (extra or {}).items()}}
        if (step, prefix) in self._written:    # written before this run resumed: replace, never duplicate
            self._jsonl.close()
            drop_rows(self._path, lambda line: _row_step(line) == step and _row_kind(line) == prefix)
            self._jsonl = fileio.open_append(self._path)
        self._written.add((step, prefix))
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, step)

    def exclude(self, seconds: float) -> float:
        """Time spent off training (checkpoint copies, evaluations, sample grids): left out of the rate and the
        ETA. Returns ``seconds``."""
        if self._start is not None:
            self._excluded += seconds
        return seconds

    def progress(self, step: int, metrics: dict, perf: dict | None = None):
        """The console line of a logged step; rate and ETA from the second logged step on (measured from the
        first, so they leave out the compile and the first step's warm-up; evaluations are excluded too)."""
        now = time.perf_counter()
        timing = ""
        if self._start is None:
            self._start, self._start_step = now, step
        else:
            rate = (step - self._start_step) / max(now - self._start - self._excluded, 1e-9)
            timing = f" | {rate:.2f} steps/s, ETA {(self.total_steps - step) / rate:.0f}s of training"
        shown = " ".join(f"{k}={float(metrics[k]):.4g}" for k in self.shown if k in metrics)
        if perf:
            shown += f" | {perf['perf/step_ms']:.0f} ms/step, {perf['perf/pairs_per_s']:.3g} pairs/s"
            shown += f", MFU {100 * perf['perf/mfu']:.1f}%" if "perf/mfu" in perf else ""
        if self.enabled:
            print(f"step {step}/{self.total_steps} {shown}{timing}", flush=True)

    def close(self):
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def drop_rows_after(path: str, step: int):
    """Rewrites a metrics.jsonl without its rows after ``step`` (and a line cut short by a kill)."""
    drop_rows(path, lambda line: _row_step(line) is None or _row_step(line) > step)


def drop_rows(path: str, drop):
    """Rewrites a metrics.jsonl without the lines for which ``drop(line)`` holds."""
    if not fileio.isfile(path):
        return
    with fileio.open_file(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if not drop(line)]
    if len(kept) == len(lines):
        return
    with fileio.open_file(path + ".tmp", "w") as f:
        f.writelines(kept)
    fileio.replace(path + ".tmp", path)


def _row_kind(line: str) -> str | None:
    """A row's kind: the prefix of its metrics ("train/", "eval/")."""
    try:
        keys = [k for k in json.loads(line) if k != "step"]
    except ValueError:
        return None
    return keys[0].split("/", 1)[0] + "/" if keys else None


def _row_kinds(path: str) -> set:
    if not fileio.isfile(path):
        return set()
    with fileio.open_file(path) as f:
        return {(_row_step(line), _row_kind(line)) for line in f}


def _row_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _encode_loader_state(state: bytes) -> str:
    return base64.b64encode(state).decode()


def _all_loader_states(state: bytes) -> list[str]:
    """Every process's loader position (each reads its own shard of the data), for the checkpoint's meta."""
    if jax.process_count() == 1:
        return [_encode_loader_state(state)]
    raw = np.frombuffer(state, np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    everyone = multihost_utils.process_allgather(padded)
    return [_encode_loader_state(everyone[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]


def _own_loader_state(meta: dict, where: str) -> bytes:
    loaders = meta["loaders"] if "loaders" in meta else [meta["loader"]]  # "loader": one process, older runs
    if len(loaders) != jax.process_count():
        raise ValueError(f"{where}: written by {len(loaders)} process(es), resumed by {jax.process_count()}; each "
                         "process reads its own shard of the data, so the loader positions do not carry over. Resume "
                         f"with {len(loaders)} process(es) (any number of devices each)")
    return base64.b64decode(loaders[jax.process_index()])


def _sync_processes(name: str):
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(name, timeout=1800)


@contextlib.contextmanager
def _workdir_lock(workdir: str):
    """Process 0 holds the workdir's lock for the run; every process stops if it is taken."""
    lock = checkpoint_lib.WorkdirLock(workdir)
    refused = None
    if console.is_main_process():
        try:
            lock.acquire()
        except checkpoint_lib.WorkdirLocked as e:
            refused = e
    if _agreed(refused is not None):
        raise refused or checkpoint_lib.WorkdirLocked(f"{workdir} is in use by another run (process 0 names it)")
    try:
        yield
    finally:
        lock.release()


def train(config, workdir: str, *, pipeline=None, max_steps: int | None = None,
          config_change: tuple[str, ...] = ()) -> dict:
    """Trains until ``config.total_steps`` (or ``max_steps`` more updates, for tests). Returns a summary.

    A workdir that holds a run continues it if ``config`` changes none of the keys that move its training
    (``run_config``; ``config_change`` names those accepted anyway); one that holds a finished run returns
    that run's summary (``already_finished``). Raises ``errors.JaxprefError``
    subclasses when the run has to stop (the command prints one line and exits with their code).
    """
    config_lib.validate(config)
    jax.config.update("jax_threefry_partitionable", True)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    config_lib.validate(config, num_devices=mesh.size)
    checkpoint_lib.check_workdir(workdir)     # before the model and the data load: a bad --workdir fails in seconds
    with _workdir_lock(workdir):
        changes = run_config.check(workdir, config, tuple(config_change))   # before anything loads
        done = _finished_run(workdir, config) if not _changes_finish(changes) else None
        if done is not None:
            _say(f"{workdir} holds a finished run (step {done['step']} of {config.total_steps}; its export, metrics "
                 "and figures are there): nothing to do. Raise --config.total_steps to train on")
            return done
        return _train(config, workdir, mesh, pipeline, max_steps, (changes, tuple(config_change)))


def _check_eval_prompts(config, given: str, data_open: bool):
    """The held-out prompts a run will generate from load before anything slow: before the model loads, or,
    for a split of the training dataset itself (which the run may build on first use), as soon as it is open.
    ``given``: config.eval.prompts as the run was given it (the error names it)."""
    spec = config.eval.prompts
    kind, _, arg = spec.partition(":")
    own_data = kind == "tfds" and prompts_lib.tfds_parts(arg)[0] == config.data.name
    if own_data != data_open or not config_lib.evaluates(config, samples=True) or jax.process_count() > 1:
        return
    try:
        prompts_lib.load_prompts(spec, limit=1)
    except ValueError as e:
        raise errors.ConfigError("eval.prompts", given, str(e)) from e


def _changes_finish(changes: dict) -> bool:
    """Whether accepted config changes alter what a finished run's end does (its evaluation or export)."""
    return any(k.startswith(("eval.", "checkpoint.export")) for k in changes)


def _finished_run(workdir: str, config) -> dict | None:
    """The summary a finished run left (``finished.json``, written last by ``_finish`` and removed when training
    resumes) if it reached ``config.total_steps``: a rerun of the same command then loads and compiles nothing
    (one with changed ``eval.*`` or export settings exports and evaluates again, without training)."""
    path = os.path.join(workdir, FINISHED_FILE)
    if not _everywhere(fileio.isfile(path)):
        return None
    try:
        with fileio.open_file(path) as f:
            done = json.load(f)
        if done["step"] < config.total_steps:
            return None
    except (ValueError, KeyError, TypeError):   # damaged: the run's end is done again, and the file rewritten
        return None
    return {**done, "preempted": False, "history": [], "workdir": workdir, "already_finished": True}


def _train(config, workdir: str, mesh, pipeline, max_steps: int | None, config_changes=({}, ())) -> dict:
    # Hub ids (model, reference, VAE, LoRA, reward models) -> the Hugging Face cache, fetched once before the
    # data opens; the workdir records ``config`` as given.
    # Several processes skip the evaluations (evaluate_run): no reward model is fetched for them.
    local = hub.resolve_run_paths(config, announce=_say, model=pipeline is None, rewards=jax.process_count() == 1)
    local.eval.prompts = prompts_lib.for_run(local.eval.prompts, local.data.name, local.data.data_dir)
    _check_eval_prompts(local, config.eval.prompts, data_open=False)
    _say(("" if pipeline is not None else f"loading the model ({config.model_path}); ")
         + f"opening the data ({config.data.name}{'; built on first use' if config.data.name == 'shapes' else ''})")
    run = trainer.build_run(local, pipeline)
    feed = feed_lib.TrainFeed(local, run, mesh)             # opens (and if needed builds) the data first
    _check_eval_prompts(local, config.eval.prompts, data_open=True)
    if jax.process_count() > 1 and config_lib.evaluates(config, samples=True):
        _say("evaluations and sample grids run in single-process runs only: this run skips them; evaluate its "
             "export afterwards with python -m jaxpref.evaluate --checkpoint=<workdir>")

    state, state_shapes, state_shardings = trainer.init_state(run, mesh)
    frozen = trainer.frozen_params(run)
    frozen = jax.device_put(frozen, trainer.frozen_shardings(run, mesh, frozen))
    manager = checkpoint_lib.CheckpointManager(workdir, keep=config.checkpoint.keep, every=config.checkpoint.every)
    writer = None
    try:
        restored, start = manager.restore_latest(state_shapes, state_shardings, say=console.warn), 0
        if restored is not None:
            start, state, meta = restored
            feed.set_state(_own_loader_state(meta, f"{manager.directory}/{start}"))
            _say(f"resumed from {manager.directory}/{start} (step {start} of {config.total_steps})")
        start = int(start)
        if start >= config.total_steps:    # trained to the end, but its export or evaluation did not finish
            _say(f"the checkpoint is at step {start} of {config.total_steps}: nothing to train; exporting and "
                 "evaluating")
            if console.is_main_process():
                run_config.record(workdir, config, *config_changes)
            writer = MetricWriter(workdir, config.total_steps, resume_step=start, shown=run.method.describe_metrics())
            return {"step": start, "preempted": False, "history": [], "workdir": workdir,
                    **_finish(run, state, workdir, writer, mesh)}
        if console.is_main_process() and fileio.isfile(os.path.join(workdir, FINISHED_FILE)):
            fileio.remove(os.path.join(workdir, FINISHED_FILE))   # an extended run is not finished

        batch = feed.next()
        base_rng = jax.random.PRNGKey(config.seed)
        # Compiled before the loop, then all processes meet: CPU (gloo) collectives give up after 30 s, and
        # hosts can finish compiling further apart than that.
        _say(_compile_note(config, mesh))
        compile_start = time.perf_counter()
        with _profiled_names(config):
            train_step = trainer.compile_train_step(run, mesh, state, batch, frozen, jax.random.fold_in(base_rng, start))
        _say(f"compiled in {_remember_compile(config, mesh, time.perf_counter() - compile_start):.1f}s")
        _sync_processes(f"jaxpref_step_compiled_{start}")
        if console.is_main_process():
            run_config.record(workdir, config, *config_changes)   # the run has started: its settings are fixed
        writer = MetricWriter(workdir, config.total_steps, resume_step=start, shown=run.method.describe_metrics())
        last = config.total_steps if max_steps is None else min(config.total_steps, start + max_steps)
        history, preempted, step = [], False, start
        streak = SkipStreak(config)
        speed = StepSpeed(run, mesh)
        profiler = Profiler(config, workdir, train_step)
        loop_start, side_seconds = time.perf_counter(), 0.0   # side: saves, evaluations and sample grids
        with checkpoint_lib.PreemptionGuard() as guard:
            while step < last:
                profiler.before(step + 1, state)
                state, metrics = train_step(state, batch, jax.random.fold_in(base_rng, step), frozen)
                step += 1
                profiler.after(step, state)
                streak.push(step, metrics["update_skipped"])
                manager.check_saves()
                loader_state = feed.get_state()       # position after this step's batch
                if step < last:
                    batch = feed.next()
                if step % config.log.every == 0 or step == last or step == start + 1:
                    metrics = jax.device_get(metrics)
                    perf = speed.measure(step, side_seconds)
                    history.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
                    writer.write(step, metrics, extra=perf)
                    writer.progress(step, metrics, perf)
                preempted = _agreed(guard.requested)
                if manager.should_save(step) or preempted or step == last:
                    save_start = time.perf_counter()     # the state's copy to host blocks; the writing does not
                    manager.save(step, state, {"loaders": _all_loader_states(loader_state), "seed": config.seed},
                                 force=True)
                    side_seconds += writer.exclude(time.perf_counter() - save_start)
                if preempted:
                    break
                sample = config.log.sample_every and step % config.log.sample_every == 0 and jax.process_count() == 1
                evaluation = config.eval.every and step % config.eval.every == 0 and step < last
                if sample or evaluation:
                    jax.block_until_ready(state)
                    side_start = time.perf_counter()
                    if sample:
                        evaluate_lib.save_samples(run, _policy(run, state),
                                                  os.path.join(workdir, "samples", f"step_{step:06d}.png"))
                    if evaluation:
                        writer.write(step, evaluate_lib.evaluate_run(run, _policy(run, state), None, mesh=mesh,
                                                                     label=f"the policy at step {step}"),
                                     prefix="eval/")
                    side_seconds += writer.exclude(time.perf_counter() - side_start)
        streak.flush()
        profiler.close()
        manager.wait()
        jax.block_until_ready(state)
        loop_seconds = time.perf_counter() - loop_start - side_seconds
        summary = {"step": step, "preempted": preempted, "history": history, "workdir": workdir,
                   "steps_per_sec": (step - start) / max(loop_seconds, 1e-9)}
        if not preempted and step >= config.total_steps:
            summary.update(_finish(run, state, workdir, writer, mesh))
        return summary
    finally:
        _close(writer, manager, failing=sys.exc_info()[0] is not None)


class StepSpeed:
    """perf/step_ms, perf/pairs_per_s and, where a device's peak is known (``flops.peak_flops``, or
    ``config.peak_tflops``), perf/mfu with the method's own FLOPs per update (``Method.flops``): measured
    between two logged updates (their metrics fetched: the device has finished), evaluations, sample grids
    and checkpoints' blocking copies taken out, so compile, evaluation and saving never count."""

    def __init__(self, run, mesh):
        self.run, self.mesh = run, mesh
        self._mark = None                   # (time, step, side seconds) at the last logged update
        per_device = (run.config.peak_tflops * 1e12 if run.config.peak_tflops
                      else flops_lib.peak_flops(mesh.devices.flat[0].device_kind))
        self.peak = per_device * mesh.size if per_device else None
        self._flops = None

    def flops_per_update(self) -> float | None:
        """The method's model FLOPs of one update (counted once, from the lowered UNet; no compile)."""
        if self._flops is None:
            run = self.run
            unet_shapes = jax.eval_shape(lambda p: p, run.pipeline.unet_params)
            fg = flops_lib.unet_flops(run.method.eps, unet_shapes, run.latent_shape, run.text_shape)
            self._flops = (run.method.flops(run.config, run.config.batch_size, *fg)["step"] if fg else 0.0)
        return self._flops or None

    def measure(self, step: int, side_seconds: float) -> dict:
        now, mark = time.perf_counter(), self._mark
        if mark is None or step <= mark[1]:
            self._mark = (now, step, side_seconds)
            return {}
        seconds = (now - mark[0] - (side_seconds - mark[2])) / (step - mark[1])
        out = {"perf/step_ms": 1e3 * seconds, "perf/pairs_per_s": self.run.config.batch_size / seconds}
        if self.peak:
            update_flops = self.flops_per_update()
            if update_flops:
                out.update({"perf/flops_per_update": update_flops, "perf/peak_flops": self.peak,
                            "perf/mfu": update_flops / seconds / self.peak})
        self._mark = (time.perf_counter(), step, side_seconds)   # counting FLOPs (first time) is not a step
        return out


@contextlib.contextmanager
def _profiled_names(config):
    """With ``config.profile``, a step loaded from the compile cache must carry this code's op names: the
    cache key then includes the program's metadata (JAX leaves it out by default, so that moving code keeps
    its hits, at the cost of stale names in profiles)."""
    key = "jax_compilation_cache_include_metadata_in_key"
    before = getattr(jax.config, key, None)  # None: a JAX without the option (names may then be stale)
    if config.get("profile") and before is not None:
        jax.config.update(key, True)
    try:
        yield
    finally:
        if before is not None:
            jax.config.update(key, before)


class Profiler:
    """``config.profile='a:b'``: a jax.profiler trace of updates a..b in <workdir>/profile, beside the compiled
    step's HLO (``step.hlo.txt.gz``): a kernel's ``hlo_op`` in the trace names its instruction there, whose
    ``op_name`` says where in the step it runs."""

    def __init__(self, config, workdir: str, compiled_step=None):
        self.range = config_lib.profile_range(config)
        self.folder = os.path.join(workdir, "profile")
        self.compiled_step = compiled_step
        self.active = False

    def before(self, update: int, state):
        if self.range and update == self.range[0] and console.is_main_process():
            jax.block_until_ready(state)
            _say(f"profiling updates {self.range[0]}-{self.range[1]} into {self.folder}")
            if self.compiled_step is not None:
                os.makedirs(self.folder, exist_ok=True)
                with gzip.open(os.path.join(self.folder, "step.hlo.txt.gz"), "wt") as f:
                    f.write(self.compiled_step.as_text())
            jax.profiler.start_trace(self.folder)
            self.active = True

    def after(self, update: int, state):
        if self.active and update >= self.range[1]:
            jax.block_until_ready(state)
            self.close()

    def close(self):
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def _close(writer, manager, failing: bool):
    """Closes the run's files; while a failure propagates, closing's own error (the same full disk, say) is
    logged instead of raised over it."""
    for close in ([writer.close] if writer is not None else []) + [manager.close]:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - only while another error propagates
            if not failing:
                raise
            logging.warning("closing the run after the error below: %s", e)


_COMPILE_TIMES = "compile_seconds.json"  # in the compile cache folder: the last compile time of each setting


def _compile_key(config, mesh) -> str:
    """What the compiled step depends on: backend, devices and the config without the keys it ignores."""
    shaping = {k: v for k, v in run_config.flat(config).items()
               if not k.startswith(("log.", "eval.", "checkpoint.")) and k not in ("seed", "total_steps")}
    text = json.dumps([jax.default_backend(), mesh.size, shaping], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compile_times_path() -> str | None:
    folder = jax.config.jax_compilation_cache_dir
    return os.path.join(folder, _COMPILE_TIMES) if folder and "://" not in folder else None


def _compile_note(config, mesh) -> str:
    """The compile's announcement, with the last measured time of the same setting on this machine."""
    path, last = _compile_times_path(), None
    if path and os.path.isfile(path):
        with contextlib.suppress(ValueError, OSError), open(path) as f:
            last = json.load(f).get(_compile_key(config, mesh))
    if last is not None:
        return f"compiling the train step (took {last:.0f}s here last time; seconds if the compile cache has it) ..."
    cached = ("kept in the compile cache for later starts" if jax.config.jax_compilation_cache_dir
              else "set JAX_COMPILATION_CACHE_DIR to keep it for later starts")
    return f"compiling the train step (the first compile of these settings here: no estimate yet; {cached}) ..."


def _remember_compile(config, mesh, seconds: float) -> float:
    path = _compile_times_path()
    if path and console.is_main_process() and seconds > 5:   # a cache hit says nothing about the next cold compile
        with contextlib.suppress(ValueError, OSError):
            times = {}
            if os.path.isfile(path):
                with open(path) as f:
                    times = json.load(f)
            times[_compile_key(config, mesh)] = round(seconds, 1)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(times, f)
            os.replace(path + ".tmp", path)
    return seconds


def _everywhere(flag: bool) -> bool:
    """True when every process says so."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray([flag]))))


def _agreed(flag: bool) -> bool:
    """All processes stop together: a SIGTERM on any host stops every host."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def _trained(state):
    """The trained params a run reports and exports: EMA when kept (DRO's checkpoints hold EMA), else φ."""
    return state.ema_params if state.ema_params is not None else state.params


def _policy(run, state):
    """The policy's UNet params (with LoRA: the adapters merged into the base)."""
    if not run.config.lora.enabled:
        return _trained(state)
    return lora.merge(run.pipeline.unet_params, _trained(state), lora.scale(run.config.lora))


def _export_model(run, policy, folder: str) -> dict:
    """The trained model as a diffusers pipeline folder (the trained UNet, the other parts as loaded), usable
    as the next run's ``model_path`` (e.g. SmPO from an SFT run); the UNet alone where a part was not loaded
    (a latent cache leaves out the VAE)."""
    unet = run.pipeline.unet.clone(remat=False)
    parts = (run.pipeline.vae_params, run.pipeline.text_encoder_params)
    if any(p is None for p in parts):
        with fileio.staged(os.path.join(folder, "unet")) as local:   # a bucket workdir: written here, copied up
            save_unet(local, unet, policy)
        return {"exported_unet": os.path.join(folder, "unet")}
    with fileio.staged(folder) as local:
        save_pipeline(local, dataclasses.replace(run.pipeline, unet=unet), unet_params=policy)
    return {"exported_unet": os.path.join(folder, "unet"), "exported_model": folder}


def _finish(run, state, workdir, writer, mesh) -> dict:
    """Exports the trained UNet, evaluates base vs trained on held-out prompts, writes a before/after grid."""
    out = {}
    trained = sharding.host_params(_trained(state))
    policy = trained
    if run.config.lora.enabled:
        policy = jax.device_get(lora.merge(run.pipeline.unet_params, trained, lora.scale(run.config.lora)))
        if console.is_main_process():
            with fileio.staged(os.path.join(workdir, "export")) as local:
                saved = lora.save_diffusers_lora(local, trained, run.config.lora.rank, run.config.lora.alpha)
            out["exported_lora"] = saved.replace(local, os.path.join(workdir, "export"), 1)
    if run.config.checkpoint.export_unet and console.is_main_process():
        out.update(_export_model(run, policy, os.path.join(workdir, "export")))
    if run.config.eval.final and console.is_main_process() and jax.process_count() == 1:
        base, trained = evaluate_lib.base_vs_trained(run, policy, workdir, mesh)
        writer.write(int(state.step), trained, prefix="eval/")
        out.update(base=base, trained=trained)
        curve = evaluate_lib.reward_curve(workdir, base)
        if curve:
            print(f"reward curve: {curve}", flush=True)
    if console.is_main_process():
        done = json.dumps({"step": int(state.step), **out}, indent=1, default=float)
        fileio.write_text(os.path.join(workdir, FINISHED_FILE), done)
    return out


def explain_flag_error(argv, error) -> str | None:
    """One line for a ``--config.<key>=`` the config parser refused: the key, the value, and what is known."""
    known = list(config_lib._flat_keys(config_lib.base_config()))
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key, value = arg[len("--config."):].split("=", 1)
            if key not in known:
                return str(errors.ConfigError(key, value, "no such config key"
                                              f"{config_lib.did_you_mean(key, known)} (--print_config lists them)"))
    return None


try:  # ml_collections applies the --config.* overrides of the command line while defining the flag
    config_flags.DEFINE_config_file("config", config_lib.config_path("tiny"),
                                    "Training config file (a get_config()); --print_config lists its keys.",
                                    lock_config=True)
except Exception as e:  # noqa: BLE001 - a mistyped key or value: one line, exit 2
    if __name__ != "__main__":
        raise
    console.exit_on_flag_error("jaxpref.train", sys.argv, e, explain_flag_error)
flags.DEFINE_string("workdir", "workdir", "Checkpoints, logs, samples and the exported model go here.")
flags.DEFINE_bool("print_config", False, "Print every config key with its value (the --config file's, after "
                  "--config.* overrides), base_config()'s default where it differs, and its meaning; then exit.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host: TPU pods, SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process launch).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process launch).")
flags.DEFINE_integer("process_id", None, "This process's id (explicit multi-process launch).")
flags.DEFINE_list("config_change", [], "Keys whose change from the workdir's run is accepted although it changes "
                  "its training (e.g. optimizer.lr); recorded in <workdir>/config_history.jsonl.")
FLAGS = flags.FLAGS


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, cpu_collectives=False):
    """``jax.distributed.initialize`` (auto-detects TPU pods and SLURM when given no arguments)."""
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator_address:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)


def _use_compile_cache():
    """The command keeps compiled steps in $XDG_CACHE_HOME/jaxpref/jax_cache (~/.cache/jaxpref/jax_cache; the
    tests' default too) unless $JAX_COMPILATION_CACHE_DIR names another folder: a rerun or a resume skips the
    compile."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", paths.compile_cache_dir())


def config_from_flag():
    """``--config``'s ConfigDict; a file that is missing or fails to load is one line naming it."""
    try:
        config = FLAGS.config
        config.keys()     # the flag loads its file lazily, on first use
        return config
    except Exception as e:  # noqa: BLE001 - ml_collections hides the cause behind a generic OSError
        path = FLAGS["config"].config_filename.split(":")[0]
        why = "no such file" if not os.path.isfile(path) else f"failed to load ({console.one_line(e.__cause__ or e)})"
        raise errors.UsageError(f"--config={path}: {why}; experiment files: configs/*.py with get_config()") from e


def main(argv):
    """Exit codes (``jaxpref.errors``): 0 the run reached total_steps (and exported), 75 preempted after a
    checkpoint (rerun to resume), 2 bad config or arguments, 3 diverged, 4 I/O, 1 anything else."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_from_flag()
    if FLAGS.print_config:
        config_lib.validate(config, check_paths=False)  # what it prints is a config a run would accept
        print(config_lib.describe(config))
        return 0
    if FLAGS.distributed or FLAGS.coordinator_address:
        # CPU-only multi-process runs (tests on localhost) need gloo collectives, set before any backend starts.
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               cpu_collectives=os.environ.get("JAX_PLATFORMS", "") == "cpu")
    _use_compile_cache()
    summary = train(config, FLAGS.workdir, config_change=tuple(FLAGS.config_change))
    if summary.get("preempted"):
        _say(f"preempted: checkpoint written at step {summary['step']}; rerun the same command to resume "
             f"(exit {errors.EXIT_PREEMPTED})")
        return errors.EXIT_PREEMPTED
    return errors.EXIT_OK


if __name__ == "__main__":
    console.run(main, "jaxpref.train", explain_flag_error=explain_flag_error)
