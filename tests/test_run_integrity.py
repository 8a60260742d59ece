"""A run's configuration and its files over the life of the run: settings fixed at the first start (a changed
learning rate refused, a longer run accepted and recorded), nonsense refused before the model loads, a
damaged newest checkpoint skipped for the one before it, and metrics.jsonl with each row once after the
final evaluation ran twice.

The runs start from a copy of the session's reference run (tiny DPO, checkpoints 3 and 6), so they reuse its
compiled step through the persistent compile cache.
"""
import ast
import json
import os
import shutil
import time

import pytest

import train_helpers as th
from jaxpref import config_lib, errors, run_config, train as train_lib, trainer


def _copy_of_reference(reference, tmp_path) -> str:
    ref_dir, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir, ignore=shutil.ignore_patterns("lock"))
    return workdir


def _forbid_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the check came too late")
    monkeypatch.setattr(trainer, "build_run", refuse)


def test_a_changed_learning_rate_on_resume_is_refused_and_config_json_kept(world, reference, tmp_path, monkeypatch):
    workdir = _copy_of_reference(reference, tmp_path)
    path = os.path.join(workdir, "config.json")
    before = open(path, "rb").read()
    _forbid_loading(monkeypatch)
    config = th.tiny_dpo_config(*world, **{"optimizer.lr": 0.01, "seed": 3})
    with pytest.raises(run_config.ConfigChanged) as err:
        train_lib.train(config, workdir)
    message = str(err.value)
    assert "optimizer.lr: 0.0001 -> 0.01" in message and "seed: 0 -> 3" in message
    assert "--config_change=optimizer.lr,seed" in message and "\n" not in message
    assert err.value.exit_code == errors.EXIT_CONFIG
    assert open(path, "rb").read() == before
    assert not os.path.exists(os.path.join(workdir, run_config.HISTORY_FILE))


def test_a_longer_run_is_accepted_and_recorded(world, reference, tmp_path):
    """total_steps 6 -> 8 on a finished run: it resumes at 6, trains 2 more updates, and the change is in the
    history (config.json still says how the run started)."""
    workdir = _copy_of_reference(reference, tmp_path)
    summary = train_lib.train(th.tiny_dpo_config(*world, total_steps=8), workdir)
    assert summary["step"] == 8 and [h["step"] for h in summary["history"]] == [7, 8]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["total_steps"] == 6
    with open(os.path.join(workdir, run_config.HISTORY_FILE)) as f:
        rows = [json.loads(line) for line in f]
    assert [r["changes"] for r in rows] == [{"total_steps": [6, 8]}] and rows[0]["accepted_unsafe"] == []
    assert run_config.stored(workdir)["total_steps"] == 8


def test_an_unsafe_change_accepted_by_name_is_recorded(world, reference, tmp_path):
    workdir = _copy_of_reference(reference, tmp_path)
    config = th.tiny_dpo_config(*world, **{"optimizer.lr": 2e-4})
    changes = run_config.check(workdir, config, accepted=("optimizer.lr",))
    run_config.record(workdir, config, changes, accepted=("optimizer.lr",))
    with open(os.path.join(workdir, run_config.HISTORY_FILE)) as f:
        row = json.loads(f.readline())
    assert row["changes"] == {"optimizer.lr": [1e-4, 2e-4]} and row["accepted_unsafe"] == ["optimizer.lr"]
    run_config.check(workdir, config)      # the recorded change is now the run's setting


@pytest.mark.parametrize("key,value", [("total_steps", 0), ("batch_size", -4), ("batch_size", 0),
                                       ("optimizer.lr", -0.001), ("dpo.beta", 0.0), ("grad_accum", 0)])
def test_nonsense_is_refused_before_the_model_loads(world, tmp_path, monkeypatch, key, value):
    _forbid_loading(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(errors.ConfigError) as err:
        train_lib.train(th.tiny_dpo_config(*world, **{key: value}), str(tmp_path / "run"))
    assert time.perf_counter() - start < 15
    assert str(err.value).startswith(f"config.{key}={value!r}: ") and "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(world, reference, tmp_path, capsys):
    """Checkpoint 6's largest file truncated: the run says so in one line, keeps it as 6.unreadable, resumes
    from 3 and ends with the uninterrupted run's losses."""
    _, ref = reference
    workdir = _copy_of_reference(reference, tmp_path)
    os.remove(os.path.join(workdir, train_lib.FINISHED_FILE))   # killed while checkpoint 6 was written
    state_dir = os.path.join(workdir, "checkpoints", "6", "state")
    files = [os.path.join(root, f) for root, _, names in os.walk(state_dir) for f in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    summary = train_lib.train(th.tiny_dpo_config(*world), workdir)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "checkpoint 6 cannot be restored" in line]
    assert len(lines) == 1 and "resuming from checkpoint 3" in lines[0], err
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6.unreadable"))
    assert summary["step"] == 6 and th.losses(summary["history"]) == {k: v for k, v in th.losses(ref["history"]).items()
                                                                      if k > 3}


def test_the_final_evaluation_run_twice_writes_its_row_once(world, reference, tmp_path):
    """A finished run rerun with the final evaluation turned on evaluates without training, once: the second
    rerun has nothing to do, and metrics.jsonl has one row per step and kind."""
    workdir = _copy_of_reference(reference, tmp_path)
    config = th.tiny_dpo_config(*world, **{"eval.final": True})
    first, second = train_lib.train(config, workdir), train_lib.train(config, workdir)
    assert "trained" in first and not first.get("already_finished") and second["already_finished"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    kinds = [(r["step"], "eval" if any(k.startswith("eval/") for k in r) else "train") for r in rows]
    assert len(kinds) == len(set(kinds)), kinds
    assert (6, "eval") in kinds and (6, "train") in kinds


def test_the_config_schema_is_assembled_from_the_methods():
    """Each registered method's section, help and checks come from its module; config_lib names none."""
    from jaxpref.methods import METHODS
    base, helps = config_lib.base_config(), config_lib.key_help()
    for name, method in METHODS.items():
        if method.config_section:
            assert set(base[method.config_section].keys()) == set(method.default_config().keys())
            for key in method.default_config():
                assert helps[f"{method.config_section}.{key}"] == method.config_help[key]
    tree = ast.parse(open(config_lib.__file__).read())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node)}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and id(n) not in docstrings}
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for name in METHODS:
        assert name not in strings and name not in attributes, name
        assert not any(s.startswith(f"{name}.") for s in strings), name
