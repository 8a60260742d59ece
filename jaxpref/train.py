"""The training command and its loop: ``python -m jaxpref.train --config=configs/drosd15.py --workdir=DIR``.

Parse config -> validate (before anything compiles) -> check and lock the workdir -> mesh -> models ->
data -> sharded state (or the latest checkpoint of the workdir) -> loop of compiled steps -> checkpoints,
logs, samples, evaluation -> final checkpoint, exported UNet, base-vs-trained report. With no ``--config``
it trains the embedded default (configs/tiny.py: DRO on the shapes world with the shipped tiny model, CPU,
minutes). ``--print_config`` lists every config key with its value and meaning. ``train(config, workdir)``
is the same run as a function (tests, notebooks, sweeps).

A checkpoint holds the state and every process's loader position, so a resumed run continues with
exactly the next batch, and metrics.jsonl drops the rows the interrupted run wrote after that checkpoint.
The run stops with a message (exit 1, nothing exported) when it diverges (``config.max_consecutive_skips``
updates in a row skipped for a non-finite loss or gradient), when another run holds the workdir, or when a
checkpoint cannot be written.
"""
from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import sys
import time

if __name__ == "__main__":
    # The command, not the library: transformers warns at import that PyTorch is missing; jaxpref uses only
    # its tokenizers.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from jaxpref import checkpoint as checkpoint_lib
from jaxpref import config_lib, lora, sharding, trainer
from jaxpref import evaluate as evaluate_lib
from jaxpref.data import feed as feed_lib
from jaxpref.models import save_unet

COMPILE_CACHE = os.path.join("~", ".cache", "jaxpref", "jax_cache")


def _is_main() -> bool:
    return jax.process_index() == 0


def _say(message: str):
    """What the run is doing, for the person at the console (process 0; third-party INFO logs are off)."""
    if _is_main():
        print(message, flush=True)


class TrainingDiverged(RuntimeError):
    """``config.max_consecutive_skips`` updates in a row were skipped for a non-finite loss or gradient."""


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
        logging.warning("step %d: update skipped, non-finite loss or gradient (params and optimizer state unchanged); "
                        "%d in a row", step, self.count)
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
    uninterrupted run's; TensorBoard hides those events too (``purge_step``).
    """

    def __init__(self, workdir: str, total_steps: int, resume_step: int = 0):
        self.total_steps = total_steps
        self.enabled = _is_main()
        self._jsonl = self._tb = None
        self._start = self._start_step = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            drop_rows_after(path, resume_step)
            self._jsonl = open(path, "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # TensorBoard is optional; JSONL always works
                self._tb = None

    def write(self, step: int, metrics: dict, prefix: str = "train/"):
        if not self.enabled:
            return
        record = {"step": step, **{prefix + k: _finite_or_none(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, step)

    def progress(self, step: int, metrics: dict):
        """The console line of a logged step; rate and ETA from the second logged step on (measured from the
        first, so they leave out the compile and the first step's warm-up)."""
        now = time.perf_counter()
        timing = ""
        if self._start is None:
            self._start, self._start_step = now, step
        else:
            rate = (step - self._start_step) / max(now - self._start, 1e-9)
            timing = f" | {rate:.2f} steps/s, ETA {(self.total_steps - step) / rate:.0f}s"
        shown = " ".join(f"{k}={float(metrics[k]):.4g}" for k in ("loss", "implicit_acc", "grad_norm",
                                                                   "active_hinge", "skipped_total") if k in metrics)
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
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


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
    if _is_main():
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


def train(config, workdir: str, *, pipeline=None, max_steps: int | None = None) -> dict:
    """Trains until ``config.total_steps`` (or ``max_steps`` more updates, for tests). Returns a summary.

    Raises TrainingDiverged, checkpoint_lib.WorkdirLocked or checkpoint_lib.CheckpointSaveError when the run
    has to stop (the command exits 1 with the message).
    """
    config_lib.validate(config)
    jax.config.update("jax_threefry_partitionable", True)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    config_lib.validate(config, num_devices=mesh.size)
    checkpoint_lib.check_workdir(workdir)     # before the model and the data load: a bad --workdir fails in seconds
    with _workdir_lock(workdir):
        return _train(config, workdir, mesh, pipeline, max_steps)


def _train(config, workdir: str, mesh, pipeline, max_steps: int | None) -> dict:
    _say(("" if pipeline is not None else f"loading the model ({config.model_path}); ")
         + f"opening the data ({config.data.name}; built on first use)")
    run = trainer.build_run(config, pipeline)
    feed = feed_lib.TrainFeed(config, run, mesh)            # opens (and if needed builds) the data first
    if _is_main():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    state, state_shapes, state_shardings = trainer.init_state(run, mesh)
    frozen = trainer.frozen_params(run)
    frozen = jax.device_put(frozen, trainer.frozen_shardings(run, mesh, frozen))
    manager = checkpoint_lib.CheckpointManager(workdir, keep=config.checkpoint.keep, every=config.checkpoint.every)
    writer = None
    try:
        start = manager.latest_step()
        if start is not None:
            state, meta = manager.restore(start, state_shapes, state_shardings)
            feed.set_state(_own_loader_state(meta, f"{manager.directory}/{start}"))
            _say(f"resumed from {manager.directory}/{start} (step {start} of {config.total_steps})")
        start = int(start or 0)

        batch = feed.next()
        base_rng = jax.random.PRNGKey(config.seed)
        # Compiled before the loop, then all processes meet: CPU (gloo) collectives give up after 30 s, and
        # hosts can finish compiling further apart than that.
        _say(_compile_note())
        compile_start = time.perf_counter()
        train_step = trainer.compile_train_step(run, mesh, state, batch, frozen, jax.random.fold_in(base_rng, start))
        _say(f"compiled in {time.perf_counter() - compile_start:.1f}s")
        _sync_processes(f"jaxpref_step_compiled_{start}")
        writer = MetricWriter(workdir, config.total_steps, resume_step=start)
        last = config.total_steps if max_steps is None else min(config.total_steps, start + max_steps)
        history, preempted, step = [], False, start
        streak = SkipStreak(config)
        loop_start, side_seconds = time.perf_counter(), 0.0   # side: evaluations and sample grids
        with checkpoint_lib.PreemptionGuard() as guard:
            while step < last:
                state, metrics = train_step(state, batch, jax.random.fold_in(base_rng, step), frozen)
                step += 1
                streak.push(step, metrics["update_skipped"])
                manager.check_saves()
                loader_state = feed.get_state()       # position after this step's batch
                if step < last:
                    batch = feed.next()
                if step % config.log.every == 0 or step == last or step == start + 1:
                    metrics = jax.device_get(metrics)
                    history.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
                    writer.write(step, metrics)
                    writer.progress(step, metrics)
                preempted = _agreed(guard.requested)
                if manager.should_save(step) or preempted or step == last:
                    manager.save(step, state, {"loaders": _all_loader_states(loader_state), "seed": config.seed},
                                 force=True)
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
                        writer.write(step, evaluate_lib.evaluate_run(run, _policy(run, state), None, mesh=mesh),
                                     prefix="eval/")
                    side_seconds += time.perf_counter() - side_start
        streak.flush()
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


def _compile_note() -> str:
    first = "first run on CPU: ~1 min" if jax.default_backend() == "cpu" else "first run: minutes"
    later = ("later runs use the cache" if jax.config.jax_compilation_cache_dir
             else "set JAX_COMPILATION_CACHE_DIR to reuse it in later runs")
    return f"compiling the train step ({first}; {later}) ..."


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


def _finish(run, state, workdir, writer, mesh) -> dict:
    """Exports the trained UNet, evaluates base vs trained on held-out prompts, writes a before/after grid."""
    out = {}
    trained = sharding.host_params(_trained(state))
    policy = trained
    if run.config.lora.enabled:
        policy = jax.device_get(lora.merge(run.pipeline.unet_params, trained, lora.scale(run.config.lora)))
        if _is_main():
            out["exported_lora"] = lora.save_diffusers_lora(os.path.join(workdir, "export"), trained,
                                                            run.config.lora.rank, run.config.lora.alpha)
    if run.config.checkpoint.export_unet and _is_main():
        save_unet(os.path.join(workdir, "export", "unet"), run.pipeline.unet.clone(remat=False), policy)
        out["exported_unet"] = os.path.join(workdir, "export", "unet")
    if run.config.eval.final and _is_main() and jax.process_count() == 1:
        base, trained = evaluate_lib.base_vs_trained(run, policy, workdir, mesh)
        writer.write(int(state.step), trained, prefix="eval/")
        out.update(base=base, trained=trained)
        curve = evaluate_lib.reward_curve(workdir, base)
        if curve:
            print(f"reward curve: {curve}", flush=True)
    return out


config_flags.DEFINE_config_file("config", config_lib.config_path("tiny"),
                                "Training config file (a get_config()); --print_config lists its keys.",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Checkpoints, logs, samples and the exported model go here.")
flags.DEFINE_bool("print_config", False, "Print every config key with its value (the --config file's, after "
                  "--config.* overrides), base_config()'s default where it differs, and its meaning; then exit.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host: TPU pods, SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process launch).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process launch).")
flags.DEFINE_integer("process_id", None, "This process's id (explicit multi-process launch).")
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
    """The command keeps compiled steps in ~/.cache/jaxpref/jax_cache (the tests' default too) unless
    $JAX_COMPILATION_CACHE_DIR names another folder: a rerun or a resume skips the compile."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(COMPILE_CACHE))


def _quiet_third_party_logs():
    """Third-party INFO logs (orbax's lines for every save, jax's backend probing) stay off unless
    ``--verbosity=0`` (or 1: debug) asks for them; the run says what it does itself (``_say``). absl's app
    raises an unset --verbosity to INFO after parsing, so this runs in main."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _quiet_third_party_logs()
    if FLAGS.print_config:
        print(config_lib.describe(FLAGS.config))
        return 0
    if FLAGS.distributed or FLAGS.coordinator_address:
        # CPU-only multi-process runs (tests on localhost) need gloo collectives, set before any backend starts.
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               cpu_collectives=os.environ.get("JAX_PLATFORMS", "") == "cpu")
    _use_compile_cache()
    try:
        summary = train(FLAGS.config, FLAGS.workdir)
    except (TrainingDiverged, checkpoint_lib.WorkdirLocked, checkpoint_lib.CheckpointSaveError) as e:
        print(f"jaxpref.train stopped: {e}", file=sys.stderr, flush=True)
        return 1
    if summary.get("preempted"):
        _say(f"preempted: checkpoint written at step {summary['step']}; rerun the same command to resume")
    return 0


if __name__ == "__main__":
    app.run(main)
