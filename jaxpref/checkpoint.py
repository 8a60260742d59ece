"""Orbax checkpoints that resume anywhere: async, atomic, last K kept, restored onto any mesh.

A checkpoint holds the whole ``TrainState`` (params, optimizer state, EMA, step, DRO's negatives
buffer) as sharded arrays, plus JSON metadata (the data loader's state, the run's rng seed). Restoring
takes the *target* shardings, so a state saved on 8 devices restores on 1, 2 or 4.

Also what keeps a workdir whole: ``check_workdir`` (a bad ``--workdir`` fails before anything slow),
``WorkdirLock`` (one run writes a workdir at a time), and a save that fails in the background stopping
the run (``CheckpointSaveError``) instead of training on without checkpoints.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import signal
import socket
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxpref import console, errors, fileio

LOCK_FILE = "lock"


class CheckpointSaveError(errors.JaxprefError, RuntimeError):
    """A checkpoint could not be written (full disk, lost mount, permissions): the run stops."""

    exit_code = errors.EXIT_IO


class WorkdirLocked(errors.JaxprefError, RuntimeError):
    """Another live run holds the workdir."""

    exit_code = errors.EXIT_IO


class CheckpointManager:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for one run's workdir.

    Orbax keeps a failed background save's error until someone waits for it; ``check_saves`` (called every
    step, free while a save runs) waits as soon as the save is done, so a full disk stops the run at the
    next step with the OS error, not steps later as unrelated noise.
    """

    def __init__(self, workdir: str, *, keep: int = 3, every: int = 0, async_save: bool = True):
        self.directory = os.path.join(workdir, "checkpoints")
        if not fileio.is_remote(workdir):   # abspath would turn gs://b/run into <cwd>/gs:/b/run
            self.directory = os.path.abspath(self.directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._unconfirmed = None   # the step of a save started but not yet known to have succeeded
        self._failed = False

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts an async save (orbax writes to a temp dir and renames it when complete: atomic)."""
        self.wait()  # orbax waits for the previous save anyway; this names its failure
        try:
            started = self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                       meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:  # noqa: BLE001 - whatever the filesystem raised, named with the path
            raise self._save_error(step, e) from e
        if started:
            self._unconfirmed = step
        return started

    def check_saves(self):
        """Raises CheckpointSaveError once a background save has failed; returns at once while one runs."""
        if self._unconfirmed is not None and not self._manager.is_saving_in_progress():
            self.wait()

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

    def restore_latest(self, target_shapes: Any, target_shardings: Any, say=print):
        """(step, state, meta) of the newest checkpoint that restores, or None when there is none.

        A newest checkpoint that cannot be read (a truncated file after a crash) is renamed
        ``<step>.unreadable`` (kept, not deleted), said in one line, and the one before it is restored. When
        that one fails too, the cause is not one damaged checkpoint (another model, another config): the
        first error is raised and nothing is renamed.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        try:
            return (steps[0], *self.restore(steps[0], target_shapes, target_shardings))
        except Exception as first:  # noqa: BLE001 - any read failure; judged by whether the previous one restores
            if len(steps) < 2:
                raise
            try:
                state, meta = self.restore(steps[1], target_shapes, target_shardings)
            except Exception:  # noqa: BLE001 - both fail: not a damaged file; report the newest's error
                raise first from None
            kept = self._set_aside(steps[0])
            say(f"checkpoint {steps[0]} cannot be restored ({console.one_line(first)}); kept as {kept}; resuming from "
                f"checkpoint {steps[1]}")
            return steps[1], state, meta

    def _set_aside(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.unreadable"
        n = 1
        while fileio.exists(dst):
            n += 1
            dst = f"{src}.unreadable{n}"
        fileio.replace(src, dst)
        self._manager.reload()
        return dst

    def wait(self):
        """Waits for the save in flight; CheckpointSaveError (with the OS error and the path) if it failed."""
        step, self._unconfirmed = self._unconfirmed, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises the writer thread's error as it was
            raise self._save_error(step, e) from e

    def close(self):
        """Waits for the last save and closes; after a failed save, only closes (its error was raised)."""
        if self._failed:
            try:
                self._manager.close()
            except Exception as e:  # noqa: BLE001 - the failure was already raised; say what closing met
                logging.warning("closing %s after a failed save: %s", self.directory, e)
            return
        self.wait()
        self._manager.close()

    def _save_error(self, step, error: Exception) -> CheckpointSaveError:
        self._failed = True
        latest = self._manager.latest_step()
        kept = (f"checkpoint {latest} ({self.directory}/{latest}) is intact: rerun the same command to resume from "
                "it" if latest is not None else "no earlier checkpoint exists: rerun the same command to start over")
        return CheckpointSaveError(f"saving checkpoint {step} to {self.directory} failed: {error}. The run stopped; "
                                   f"{kept} once the cause is fixed (a full disk: free space or pass another "
                                   "--workdir)")


def check_workdir(workdir: str):
    """Creates ``workdir`` (or checks the folder there) and that this process can write in it: run before the
    model and the data load, so a bad ``--workdir`` fails in seconds."""
    if fileio.exists(workdir) and not fileio.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is a file, not a folder; pass a new folder or a run's workdir")
    try:
        fileio.check_writable(workdir)   # a bucket URL stays a bucket (os.makedirs would make a local "gs:")
    except OSError as e:
        raise ValueError(f"--workdir={workdir}: cannot write there ({e.strerror or e}); pass a folder this user "
                         "can write (checkpoints, metrics and the exported model go there)") from e


_UNLOCKED_WARNED: set = set()   # bucket workdirs already warned about (once each per process)


class WorkdirLock:
    """One run writes a workdir at a time: an exclusive ``flock`` on ``<workdir>/lock``, held for the run.

    The kernel drops the lock when its process ends, however it ends (SIGKILL, OOM, a crash), so a stale
    lock never blocks the next run; the file's text (host, pid, start time) only names the holder. The
    file is never deleted: a run that opened it just before a deletion would lock a file nobody else sees.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = None

    def acquire(self) -> "WorkdirLock":
        if not fileio.supports_lock(self.workdir):
            if self.workdir not in _UNLOCKED_WARNED:
                _UNLOCKED_WARNED.add(self.workdir)
                logging.warning("%s is a bucket: no lock on it; make sure no other run uses this workdir",
                                self.workdir)
            return self
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read()
            f.close()
            raise WorkdirLocked(_locked_message(self.workdir, holder)) from None
        except OSError as e:  # a filesystem without locks (some network mounts): say so and go on
            f.close()
            logging.warning("%s: cannot lock (%s); make sure no other run uses this workdir", self.path, e)
            return self
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        f.flush()
        self._file = f
        return self

    def release(self):
        if self._file is not None:
            self._file.truncate(0)   # the holder is gone: a later message must not name it
            self._file.close()       # closing drops the flock
            self._file = None


def _locked_message(workdir: str, holder_text: str) -> str:
    try:
        holder = json.loads(holder_text)
        who = f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        who = "holder not yet recorded"
    return (f"{workdir} is in use by another run ({who}). Two runs on one workdir overwrite each other's checkpoints "
            "and metrics. Wait for that run to finish, stop it (SIGTERM: it checkpoints and exits), or pass another "
            "--workdir")


def load_policy_params(workdir: str, unet_shapes: Any = None, use_ema: bool = True, step: int | None = None):
    """The policy UNet params of a training workdir's latest (or given) checkpoint, on one device.

    EMA weights when the run kept them and ``use_ema`` (DRO's checkpoints hold EMA), else φ.
    ``unet_shapes`` (a param tree of ShapeDtypeStructs), when given, must match: a checkpoint of another
    architecture fails with the path and both shapes. Restores the whole state to read it (host memory:
    params + optimizer state).
    """
    directory = os.path.join(workdir, "checkpoints")
    if not fileio.isdir(directory):
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
