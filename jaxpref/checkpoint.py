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
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


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
