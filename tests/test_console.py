"""What a user sees at the console: the default command (shortened exactly as CI's fresh-install check runs
it: fewer updates and a smaller evaluation, the same train step, which it finds in the persistent compile cache
after test_embedded.py's default run, in the same xdist group) prints our own lines only (no absl/orbax/XLA INFO or WARNING line, no "slow compile" alarm), announces
each evaluation with its duration; a mistyped key is one short error with exit code 2, its traceback only
under --verbosity=debug.
"""
import os
import re
import subprocess
import sys

import pytest

import train_helpers as th
from jaxpref import errors

SHORT_DEFAULT = open(os.path.join(th.TESTS, "short_default_args.txt")).read().split()
LIBRARY_LOG_LINE = re.compile(r"^[IWE]\d{4} |^(INFO|WARNING):|Very slow compile|tensorflow_datasets|orbax")


def _train(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "jaxpref.train", *args], cwd=th.REPO, env=th.subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_default_command_prints_our_lines_only_and_announces_each_evaluation(world, tmp_path):
    _, data_dir = world
    out = _train(f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={data_dir}", *SHORT_DEFAULT)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert not [line for line in text.splitlines() if LIBRARY_LOG_LINE.search(line)], text
    for what in ("the policy at step 5", "the base model", "the trained policy"):
        assert f"evaluating {what}: 4 prompts x 1 images (DDIM 4, CFG 3) ..." in text, text
        assert re.search(rf"evaluating {what}: .*: done in \d+\.\ds", text), text
    assert re.search(r"compiled in \d+\.\ds", text) and "steps/s, ETA" in text
    assert os.path.isfile(tmp_path / "run" / "before_after.png")
    assert os.path.isfile(tmp_path / "run" / "reward_curve.png")


def test_a_mistyped_key_is_one_short_error(tmp_path):
    out = _train(f"--workdir={tmp_path / 'run'}", "--config.dro.margni=0.1", timeout=300)
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == errors.EXIT_CONFIG and len(lines) <= 3, lines
    assert "config.dro.margni" in lines[-1] and "did you mean 'dro.margin'" in lines[-1]
    assert not os.path.exists(tmp_path / "run")

    debug = _train(f"--workdir={tmp_path / 'run'}", "--config.dro.margni=0.1", "--verbosity=debug", timeout=300)
    assert debug.returncode == errors.EXIT_CONFIG and "Traceback" in debug.stderr


def test_a_bad_value_names_key_value_and_what_is_accepted(tmp_path):
    out = _train(f"--workdir={tmp_path / 'run'}", "--config.optimizer.lr=-0.001", timeout=300)
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == errors.EXIT_CONFIG and len(lines) <= 3, lines
    assert lines[-1] == "jaxpref.train: config.optimizer.lr=-0.001: a number > 0"


def test_a_data_builder_fails_in_one_line_and_takes_verbosity():
    """The data builders parse their own arguments and share the commands' contract: a bad source is one line
    naming it, exit 2; --verbosity=debug adds the traceback."""
    cmd = [sys.executable, "-m", "jaxpref.data.pickapic", "--source=/nonexistent/pickapic_parquet"]
    out = subprocess.run(cmd, cwd=th.REPO, env=th.subprocess_env(), capture_output=True, text=True, timeout=300)
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == errors.EXIT_CONFIG and len(lines) == 1, lines
    assert lines[0].startswith("jaxpref.data.pickapic: ") and "/nonexistent/pickapic_parquet" in lines[0]
    debug = subprocess.run(cmd + ["--verbosity", "debug"], cwd=th.REPO, env=th.subprocess_env(), capture_output=True,
                           text=True, timeout=300)
    assert debug.returncode == errors.EXIT_CONFIG and "Traceback" in debug.stderr, debug.stderr


def test_a_library_error_is_one_line_of_at_most_300_characters():
    """A library's long, many-line message (e.g. orbax listing a checkpoint's files) is cut to one line of the
    stated width, its type named; ours keep their text."""
    from jaxpref import console

    long = OSError("x" * 1000 + "\nsecond line")
    line = console.one_line(long)
    assert "\n" not in line and len(line) <= len("OSError: ") + 300 and line.startswith("OSError: xxx")
    assert line.endswith("...")
    assert console.one_line(errors.ConfigError("lr", -1, "a positive number")).count("\n") == 0
    assert console.one_line(RuntimeError("short")) == "RuntimeError: short"
