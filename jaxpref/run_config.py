"""A run's configuration is fixed at its first start.

``config.json`` is written once, atomically, when a run starts fresh. A later start in the same workdir (a
resume, or an extension of a finished run) is compared with it before anything loads: a change of a key that
moves the training trajectory (objective, model, data, batch, schedule, learning rate, seed, a method's
settings, ...) is refused with the list of differences, unless ``--config_change=key,...`` accepts it; a
change of a key that only affects how the run is watched or how long it goes (``SAFE_KEYS``) is accepted.
Every accepted change is appended to ``config_history.jsonl``, so config.json plus that history is the whole
story of the run's settings.
"""
from __future__ import annotations

import json
import os
import time

from jaxpref import errors, fileio

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

# Keys (or prefixes ending in ".") whose change leaves the training trajectory as it was: how long the run
# goes, how it is logged, evaluated and checkpointed, and how the same numbers are laid on the devices.
SAFE_KEYS = ("total_steps", "max_consecutive_skips", "log.", "eval.", "checkpoint.", "mesh.", "sharding_rules",
             "attention", "remat", "remat_policy", "data.worker_count", "data.data_dir", "profile", "peak_tflops")


class ConfigChanged(errors.JaxprefError):
    """The workdir's run was started with other values of keys that change its training."""

    exit_code = errors.EXIT_CONFIG


def flat(config) -> dict:
    """{"optimizer.lr": 1e-4, ...} of a ConfigDict or of the dict stored in config.json (JSON-normalised:
    tuples read back as lists)."""
    tree = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
    walk(tree, "")
    return out


def is_safe(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in SAFE_KEYS)


def stored(workdir: str) -> dict | None:
    """The run's settings as they stand: config.json with every recorded change applied (None: a fresh
    workdir)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not fileio.isfile(path):
        return None
    with fileio.open_file(path) as f:
        try:
            settings = flat(json.load(f))
        except ValueError as e:
            raise errors.JaxprefError(f"{path}: not readable JSON ({e}); it records how this run was started: "
                                      "restore it, or start a new --workdir") from e
    history = os.path.join(workdir, HISTORY_FILE)
    if fileio.isfile(history):
        with fileio.open_file(history) as f:
            for line in f:
                if line.strip():
                    settings.update({k: new for k, (_, new) in json.loads(line)["changes"].items()})
    return settings


def differences(old: dict, new: dict) -> dict:
    """{key: (old, new)} of the keys whose values differ (a key missing on one side counts)."""
    keys = sorted(set(old) | set(new))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def check(workdir: str, config, accepted: tuple[str, ...] = ()) -> dict:
    """Compares ``config`` with the workdir's run (no-op for a fresh workdir). Raises ``ConfigChanged`` on a
    change of a key that changes training and is not in ``accepted``; returns the accepted changes (to be
    recorded once the start succeeds, ``record``)."""
    old = stored(workdir)
    if old is None:
        return {}
    changes = differences(old, flat(config))
    refused = {k: v for k, v in changes.items() if not is_safe(k) and k not in accepted}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigChanged(f"{workdir} holds a run started with other settings ({listed}); these change its "
                            "training, so the run would mix two experiments. Start a new --workdir, or accept "
                            f"the change knowingly with --config_change={','.join(refused)}")
    return changes


def record(workdir: str, config, changes: dict, accepted: tuple[str, ...] = ()):
    """Writes config.json for a fresh run (atomically), or appends an accepted change to the history."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not fileio.isfile(path):
        fileio.makedirs(workdir)
        fileio.write_text(path, config.to_json_best_effort(indent=2))   # atomic: a temporary file, or one object
        return
    if changes:
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": {k: list(v) for k, v in changes.items()},
               "accepted_unsafe": sorted(k for k in changes if not is_safe(k) and k in accepted)}
        fileio.append_text(os.path.join(workdir, HISTORY_FILE), json.dumps(row) + "\n")
