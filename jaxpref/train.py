"""The training command and its loop: ``python -m jaxpref.train --config=configs/drosd15.py --workdir=DIR``.

Parse config -> validate (before anything compiles) -> mesh -> models -> data -> sharded state (or the
latest checkpoint of the workdir) -> loop of compiled steps -> checkpoints, logs, samples, evaluation ->
final checkpoint, exported UNet, base-vs-trained report. With no ``--config`` it trains the embedded
default (configs/tiny.py: DRO on the shapes world with the shipped tiny model, CPU, minutes).
``train(config, workdir)`` is the same run as a function (tests, notebooks, sweeps).

A checkpoint holds the state and every process's loader position, so a resumed run continues with
exactly the next batch.
"""
from __future__ import annotations

import base64
import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from jaxpref import checkpoint as checkpoint_lib
from jaxpref import config_lib, sharding, trainer
from jaxpref import evaluate as evaluate_lib
from jaxpref.data import feed as feed_lib
from jaxpref.models import save_unet

def _is_main() -> bool:
    return jax.process_index() == 0


class MetricWriter:
    """JSONL + TensorBoard + console, on process 0 only."""

    def __init__(self, workdir: str, total_steps: int):
        self.total_steps = total_steps
        self.enabled = _is_main()
        self._jsonl = self._tb = None
        self._start = self._start_step = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional; JSONL always works
                self._tb = None

    def write(self, step: int, metrics: dict, prefix: str = "train/"):
        if not self.enabled:
            return
        record = {"step": step, **{prefix + k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)

    def progress(self, step: int, metrics: dict):
        now = time.perf_counter()
        if self._start is None:
            self._start, self._start_step = now, step
            rate = eta = float("nan")
        else:
            rate = (step - self._start_step) / max(now - self._start, 1e-9)
            eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k}={float(metrics[k]):.4g}" for k in ("loss", "implicit_acc", "grad_norm",
                                                                   "active_hinge", "skipped_total") if k in metrics)
        if self.enabled:
            print(f"step {step}/{self.total_steps} {shown} | {rate:.2f} steps/s, ETA {eta:.0f}s", flush=True)

    def close(self):
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


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


def train(config, workdir: str, *, pipeline=None, max_steps: int | None = None) -> dict:
    """Trains until ``config.total_steps`` (or ``max_steps`` more updates, for tests). Returns a summary."""
    config_lib.validate(config)
    jax.config.update("jax_threefry_partitionable", True)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    config_lib.validate(config, num_devices=mesh.size)
    run = trainer.build_run(config, pipeline)
    feed = feed_lib.TrainFeed(config, run, mesh)            # opens (and if needed builds) the data first
    os.makedirs(workdir, exist_ok=True)
    if _is_main():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    state, state_shapes, state_shardings = trainer.init_state(run, mesh)
    frozen = trainer.frozen_params(run)
    frozen = jax.device_put(frozen, trainer.frozen_shardings(run, mesh, frozen))
    manager = checkpoint_lib.CheckpointManager(workdir, keep=config.checkpoint.keep, every=config.checkpoint.every)
    start = manager.latest_step()
    if start is not None:
        state, meta = manager.restore(start, state_shapes, state_shardings)
        feed.set_state(_own_loader_state(meta, f"{manager.directory}/{start}"))
        logging.info("resumed from %s at step %d", manager.directory, start)
    start = int(start or 0)

    batch = feed.next()
    base_rng = jax.random.PRNGKey(config.seed)
    # Compiled before the loop, then all processes meet: CPU (gloo) collectives give up after 30 s, and
    # hosts can finish compiling further apart than that.
    train_step = trainer.compile_train_step(run, mesh, state, batch, frozen, jax.random.fold_in(base_rng, start))
    _sync_processes(f"jaxpref_step_compiled_{start}")
    writer = MetricWriter(workdir, config.total_steps)
    last = config.total_steps if max_steps is None else min(config.total_steps, start + max_steps)
    history, preempted, step = [], False, start
    with checkpoint_lib.PreemptionGuard() as guard:
        while step < last:
            state, metrics = train_step(state, batch, jax.random.fold_in(base_rng, step), frozen)
            step += 1
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
            if config.log.sample_every and step % config.log.sample_every == 0 and jax.process_count() == 1:
                evaluate_lib.save_samples(run, _policy(state), os.path.join(workdir, "samples", f"step_{step:06d}.png"))
            if config.eval.every and step % config.eval.every == 0 and step < last:
                writer.write(step, evaluate_lib.evaluate_run(run, _policy(state), None, mesh=mesh), prefix="eval/")
    manager.wait()
    summary = {"step": step, "preempted": preempted, "history": history, "workdir": workdir}
    if not preempted and step >= config.total_steps:
        summary.update(_finish(run, state, workdir, writer, mesh))
    writer.close()
    manager.close()
    return summary


def _agreed(flag: bool) -> bool:
    """All processes stop together: a SIGTERM on any host stops every host."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def _policy(state):
    """The weights a run reports and exports: EMA when kept (DRO's checkpoints hold EMA), else φ."""
    return state.ema_params if state.ema_params is not None else state.params


def _finish(run, state, workdir, writer, mesh) -> dict:
    """Exports the trained UNet, evaluates base vs trained on held-out prompts, writes a before/after grid."""
    out = {}
    policy = sharding.host_params(_policy(state))
    if run.config.checkpoint.export_unet and _is_main():
        save_unet(os.path.join(workdir, "export", "unet"), run.pipeline.unet.clone(remat=False), policy)
        out["exported_unet"] = os.path.join(workdir, "export", "unet")
    if run.config.eval.final and _is_main() and jax.process_count() == 1:
        base, trained = evaluate_lib.base_vs_trained(run, policy, workdir, mesh)
        writer.write(int(state.step), trained, prefix="eval/")
        out.update(base=base, trained=trained)
    return out


config_flags.DEFINE_config_file("config", config_lib.config_path("tiny"), "Training config file (a get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Checkpoints, logs, samples and the exported model go here.")
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.distributed or FLAGS.coordinator_address:
        # CPU-only multi-process runs (tests on localhost) need gloo collectives, set before any backend starts.
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               cpu_collectives=os.environ.get("JAX_PLATFORMS", "") == "cpu")
    summary = train(FLAGS.config, FLAGS.workdir)
    if summary.get("preempted"):
        logging.info("preempted: checkpoint written at step %d; exiting 0", summary["step"])
    return 0


if __name__ == "__main__":
    app.run(main)
