"""The train loop behind ``python -m jaxpref.train``: ``train(config, workdir) -> summary``.

Everything that can fail on bad input (config, paths, data) fails before the first compile. State is
born sharded; the step is compiled once with explicit shardings and a donated state; a checkpoint
holds the state and every process's loader position, so a resumed run continues with exactly the next
batch.
"""
from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxpref import checkpoint as checkpoint_lib
from jaxpref import config_lib, data_feed, sharding, step as step_lib, trainer


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
    from jax.experimental import multihost_utils

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
        import orbax.checkpoint as ocp

        ocp.multihost.sync_global_processes(name, timeout=1800)


def _frozen_shardings(mesh, frozen):
    return sharding.params_sharding(mesh, frozen)


def build_state(run: trainer.Run, mesh):
    """The initial TrainState, created directly with its shardings (jit + out_shardings of eval_shape)."""
    init = lambda params: step_lib.init_train_state(params, run.optimizer, run.config, text_shape=run.text_shape,
                                                    latent_shape=run.latent_shape)
    shapes = jax.eval_shape(init, run.pipeline.unet_params)
    shardings = sharding.state_sharding(mesh, shapes)
    state = jax.jit(init, out_shardings=shardings)(run.pipeline.unet_params)
    return state, shapes, shardings


def train(config, workdir: str, *, pipeline=None, max_steps: int | None = None) -> dict:
    """Trains until ``config.total_steps`` (or ``max_steps`` more updates, for tests). Returns a summary."""
    config_lib.validate(config)
    jax.config.update("jax_threefry_partitionable", True)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    config_lib.validate(config, num_devices=mesh.size)
    run = trainer.build_run(config, pipeline)
    feed = data_feed.TrainFeed(config, run, mesh)            # opens (and if needed builds) the data first
    os.makedirs(workdir, exist_ok=True)
    if _is_main():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    state, state_shapes, state_shardings = build_state(run, mesh)
    frozen = trainer.frozen_params(run)
    frozen_sh = _frozen_shardings(mesh, frozen)
    frozen = jax.device_put(frozen, frozen_sh)
    manager = checkpoint_lib.CheckpointManager(workdir, keep=config.checkpoint.keep, every=config.checkpoint.every)
    start = manager.latest_step()
    if start is not None:
        state, meta = manager.restore(start, state_shapes, state_shardings)
        feed.set_state(_own_loader_state(meta, f"{manager.directory}/{start}"))
        logging.info("resumed from %s at step %d", manager.directory, start)
    start = int(start or 0)

    batch = feed.next()
    train_step = sharding.jit_train_step(
        step_lib.make_train_step(config, run.objective, run.optimizer, run.learning_rate), mesh, state_shardings,
        frozen_sh, jax.eval_shape(lambda b: b, batch))
    base_rng = jax.random.PRNGKey(config.seed)
    # Compiled before the loop, then all processes meet: CPU (gloo) collectives give up after 30 s, and
    # hosts can finish compiling further apart than that.
    train_step = train_step.lower(state, batch, jax.random.fold_in(base_rng, start), frozen).compile()
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
            if config.log.sample_every and step % config.log.sample_every == 0:
                _save_samples(run, state, workdir, step)
            if config.eval.every and step % config.eval.every == 0 and step < last:
                writer.write(step, _evaluate(run, _policy(state), None), prefix="eval/")
    manager.wait()
    summary = {"step": step, "preempted": preempted, "history": history, "workdir": workdir}
    if not preempted and step >= config.total_steps:
        summary.update(_finish(run, state, workdir, writer))
    writer.close()
    manager.close()
    return summary


def _agreed(flag: bool) -> bool:
    """All processes stop together: a SIGTERM on any host stops every host."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def _policy(state):
    """The weights a run reports and exports: EMA when kept (DRO's checkpoints hold EMA), else φ."""
    return state.ema_params if state.ema_params is not None else state.params


def _host_params(params):
    """Params as host numpy; across processes a gather (every process must call it)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def _evaluate(run, unet_params, out_dir, baseline=None) -> dict:
    from jaxpref import evaluate as evaluate_lib, prompts as prompts_lib, rewards

    cfg = run.config.eval
    if jax.process_count() > 1:  # generation gathers to one host's devices; not done across hosts yet
        return {}
    prompts = prompts_lib.load_prompts(cfg.prompts, limit=cfg.num_prompts)
    scorers = rewards.load_scorers(cfg.rewards)
    return evaluate_lib.evaluate(run.pipeline, prompts, scorers, unet_params=_host_params(unet_params),
                                 out_dir=out_dir, baseline_scores=baseline, num_images_per_prompt=cfg.images_per_prompt,
                                 sampler=cfg.sampler, num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                                 seed=run.config.seed, batch_size=cfg.batch_size)


def _save_samples(run, state, workdir, step):
    from jaxpref import evaluate as evaluate_lib, prompts as prompts_lib
    from PIL import Image

    if not _is_main() or jax.process_count() > 1:
        return
    cfg = run.config.eval
    prompts = prompts_lib.load_prompts(cfg.prompts, limit=run.config.log.sample_prompts)
    gen = evaluate_lib.generate(run.pipeline, prompts, unet_params=_host_params(_policy(state)), sampler=cfg.sampler,
                                num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, seed=run.config.seed,
                                batch_size=cfg.batch_size)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    Image.fromarray(evaluate_lib.make_grid(gen.images)).save(os.path.join(workdir, "samples", f"step_{step:06d}.png"))


def _finish(run, state, workdir, writer) -> dict:
    """Exports the trained UNet, evaluates base vs trained on held-out prompts, writes a before/after grid."""
    from jaxpref.models import save_unet

    out = {}
    policy = _host_params(_policy(state))
    if run.config.checkpoint.export_unet and _is_main():
        save_unet(os.path.join(workdir, "export", "unet"), run.pipeline.unet.clone(remat=False), policy)
        out["exported_unet"] = os.path.join(workdir, "export", "unet")
    if run.config.eval.final and _is_main() and jax.process_count() == 1:
        from jaxpref import evaluate as evaluate_lib

        base = _evaluate_base(run, os.path.join(workdir, "eval_base"))
        trained = _evaluate(run, policy, os.path.join(workdir, "eval_trained"),
                            baseline=evaluate_lib.load_scores(os.path.join(workdir, "eval_base")))
        writer.write(int(state.step), trained, prefix="eval/")
        out.update(base=base, trained=trained)
        _before_after_grid(workdir)
        _print_report(base, trained, workdir)
    return out


_BASE_EVALS: dict = {"model": None, "runs": {}}  # the last pipeline's base evaluations in this process


def _evaluate_base(run, out_dir) -> dict:
    """The base model's evaluation; runs in the same process on the same pipeline object (same params
    objects) with the same eval settings and seed (a sweep over objectives or lrs) copy the first one's
    folder instead of generating the images again."""
    import shutil

    model = (run.pipeline, run.pipeline.unet_params)
    if _BASE_EVALS["model"] is None or any(a is not b for a, b in zip(_BASE_EVALS["model"], model)):
        _BASE_EVALS.update(model=model, runs={})  # one pipeline kept: older ones' params can be freed
    key = (json.dumps(run.config.eval.to_dict(), sort_keys=True), run.config.seed)
    done = _BASE_EVALS["runs"].get(key)
    if done is not None and os.path.isdir(done["dir"]):
        shutil.copytree(done["dir"], out_dir, dirs_exist_ok=True)
        return dict(done["metrics"])
    metrics = _evaluate(run, run.pipeline.unet_params, out_dir)
    _BASE_EVALS["runs"][key] = {"dir": out_dir, "metrics": dict(metrics)}
    return metrics


def _before_after_grid(workdir):
    from PIL import Image

    paths = [os.path.join(workdir, d, "grid.png") for d in ("eval_base", "eval_trained")]
    if not all(os.path.isfile(p) for p in paths):
        return
    top, bottom = (np.asarray(Image.open(p).convert("RGB")) for p in paths)
    width = max(top.shape[1], bottom.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)))
    sep = np.full((4, width, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([pad(top), sep, pad(bottom)])).save(os.path.join(workdir, "before_after.png"))


def _print_report(base: dict, trained: dict, workdir: str):
    lines = ["", "held-out prompts       base      trained", "-" * 42]
    for key in sorted(base):
        if key.endswith("/mean") or key.endswith("/median"):
            lines.append(f"{key:<20} {base[key]:>9.4f} {trained.get(key, float('nan')):>12.4f}")
    for key in sorted(trained):
        if key.endswith("win_rate"):
            lines.append(f"{key:<20} {'':>9} {trained[key]:>12.3f}")
    lines.append(f"before/after grid: {os.path.join(workdir, 'before_after.png')}")
    print("\n".join(lines), flush=True)
