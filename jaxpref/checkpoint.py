"""Orbax checkpoints that resume anywhere: async, atomic, last K kept, restored onto any mesh.

A checkpoint holds the whole ``TrainState`` (params, optimizer state, EMA, step, DRO's negatives
buffer) as sharded arrays, plus JSON metadata (the data loader's state, the run's rng seed). Restoring
takes the *target* shardings, so a state saved on 8 devices restores on 1, 2 or 4.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointManager:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for one run's workdir."""

    def __init__(self, workdir: str, *, keep: int = 3, every: int = 0, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts an async save (orbax writes to a temp dir and renames it when complete: atomic)."""
        return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, target_shapes: Any, target_shardings: Any) -> tuple[Any, dict]:
        """Restores ``step`` onto the given shardings (any mesh): returns (state, meta)."""
        abstract = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target_shapes, target_shardings)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      meta=ocp.args.JsonRestore()))
        except ValueError:  # orbax names neither the tensor nor the likely cause: a different model
            bad = _params_mismatch(getattr(target_shapes, "params", None), _saved_state(self.directory, step)["params"])
            if bad:
                raise ValueError(f"{self.directory} step {step}: the checkpoint's UNet does not match this run's model "
                                 f"(config.model_path); {bad}. Resume with the model it was trained from, or use a "
                                 "new workdir") from None
            raise
        return out["state"], dict(out["meta"])

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def load_policy_params(workdir: str, unet_shapes: Any = None, use_ema: bool = True, step: int | None = None):
    """The policy UNet params of a training workdir's latest (or given) checkpoint, on one device.

    EMA weights when the run kept them and ``use_ema`` (DRO's checkpoints hold EMA), else φ.
    ``unet_shapes`` (a param tree of ShapeDtypeStructs), when given, must match: a checkpoint of another
    architecture fails with the path and both shapes. Restores the whole state to read it (host memory:
    params + optimizer state).
    """
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise ValueError(f"{workdir}: no checkpoints/ folder (expected a jaxpref training workdir)")
    manager = _reader(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"{directory}: no finished checkpoint in it")
    tree = _saved_state(directory, step, manager)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    manager.close()
    params = state["ema_params"] if use_ema and state.get("ema_params") is not None else state["params"]
    bad = _params_mismatch(unet_shapes, params)
    if bad:
        raise ValueError(f"{directory} step {step}: the checkpoint's UNet does not match the expected architecture; "
                         f"{bad}")
    return params


def _reader(directory: str) -> ocp.CheckpointManager:
    """A read-only manager that knows the state item's handler (so its metadata can be read)."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    return ocp.CheckpointManager(directory, handler_registry=registry)


def _saved_state(directory: str, step: int, manager: ocp.CheckpointManager | None = None) -> Any:
    """The saved state's tree of array metadata (shape, dtype) as nested dicts."""
    reader = manager or _reader(directory)
    tree = reader.item_metadata(step)["state"]
    if manager is None:
        reader.close()
    return getattr(tree, "tree", tree)


def _params_mismatch(want: Any, got: Any) -> str:
    """'' when the two param trees have the same paths and shapes, else the first difference."""
    if want is None:
        return ""
    shapes = lambda t: {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    want, got = shapes(want), shapes(got)
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    return f"e.g. {bad[0]}: checkpoint {got.get(bad[0])} vs model {want.get(bad[0])}" if bad else ""


class PreemptionGuard:
    """Turns SIGTERM into a flag the train loop polls: finish the step, save, exit 0."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @property
    def requested(self) -> bool:
        return self._event.is_set()
