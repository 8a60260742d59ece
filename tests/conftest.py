"""Shared pytest setup: a persistent XLA compilation cache, the session's shared worlds and runs, the
xdist grouping that keeps tests sharing a run on one worker, and the ``compiled_for_few_runs`` marker (LLVM
level 0 for tests that compile a program to run it once or a few times).

Session fixtures (one per test process):
  world              (tiny random SD folder, data dir with the shapes pairs), built once for all xdist
                     workers (a file lock under the run's shared base temp dir)
  reference          the uninterrupted 1-device DPO run 0 -> 6 on it (test_train, test_checkpoint,
                     test_sharding, test_faults compare against it): (workdir, summary), trained once for
                     all workers like ``world``
  compiled_steps     a dict the step tests keep their compiled steps in (same config, same program)
  sd15_unet_shapes   SD1.5's UNet param shapes (eval_shape, no weights)
"""
import gc
import os
import pathlib

import pytest

from jaxpref import paths  # imports no jax: the XLA flags below are still set before jax loads

# Outside the checkout, so fresh clones on the same machine (CI) reuse earlier compiles: the command's own default.
_CACHE = pathlib.Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or paths.compile_cache_dir())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
# Test-only, inherited by the child processes: LLVM's expensive passes off. Measured on the tiny DPO step: compile
# 32.9 -> 29.0 s, the same losses bit for bit and the same generated latents (no fast-math: the passes cannot
# reorder float arithmetic), execution speed unchanged. So the tests compute what the shipped command computes.
# XLA's YNNPACK fusions stay on (its default): turning them off (--xla_cpu_experimental_ynn_fusion_type=) loads a
# cached step 2x faster, but compiles and runs slower with two workers on two cores (whole suite, same host, one
# after the other: 1,190 s with them off, 1,103 s on).
_LLVM_FLAG = "--xla_llvm_disable_expensive_passes=true"
if _LLVM_FLAG not in os.environ.get("XLA_FLAGS", "").split():  # xdist workers inherit the controller's, already set
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_LLVM_FLAG}".strip()

import jax  # noqa: E402

# Python's cycle collector runs less often: the tests trace many programs, and tracing's short-lived objects
# set off collections that rescan everything live (tiny DRO step: lowering 5.9 -> 5.0 s).
gc.set_threshold(100_000, 50, 1_000)

jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import train_helpers as th  # noqa: E402

# xdist groups: each file is one group (its module fixtures are built once), except the tests below, each its own
# group so that they spread over the workers, and the embedded end-to-end runs: one group, one worker, in the
# order of _EMBEDDED, so that they share the base model's held-out evaluation (seed 0 is evaluated once for
# every run, see jaxpref.evaluate.evaluate_base) and the later ones (the shortened default command, the hub
# run, the quickstart notebook) find test_embedded.py's train steps in the persistent compile cache. xdist sends
# the groups to the workers most tests first (its --loadscope-reorder default, as even as longest-first here);
# within a group the tests run in the order below: the slow ones and those first.
_EMBEDDED = ("test_embedded.py", "test_console.py", "test_hub.py", "test_notebook.py")
_EMBEDDED_ELSEWHERE = {"test_the_default_command_prints_our_lines_only_and_announces_each_evaluation",
                       "test_train_command_trains_the_embedded_model_from_the_hub_cache"}
_OWN_GROUP = {"test_cli_survives_sigkill_and_sigterm_and_exports", "test_two_processes_train_in_lockstep_and_resume",
              "test_regeneration_is_byte_identical", "test_eight_devices_match_one"}


def _embedded(item) -> bool:
    return item.path.name in ("test_embedded.py", "test_notebook.py") or item.originalname in _EMBEDDED_ELSEWHERE


# tryfirst: xdist reads the groups in its own pytest_collection_modifyitems; run after it, the markers were
# ignored and a file's tests (and their module fixtures: the 8-device run, the step tests' compiles) split
# over both workers.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _embedded(item):
            group = "embedded"
        elif item.originalname in _OWN_GROUP:
            group = item.originalname
        else:
            group = item.path.name
        item.add_marker(pytest.mark.xdist_group(group))

    def order(item):
        first = item.get_closest_marker("slow") is not None or item.originalname in _OWN_GROUP
        return (not first, _EMBEDDED.index(item.path.name) if _embedded(item) else 0)
    items.sort(key=order)


def _shared_base(tmp_path_factory) -> pathlib.Path:
    """The base temp dir every xdist worker of this run sees (each worker's own is a child of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


# Tests marked ``compiled_for_few_runs`` compile at LLVM level 0 (``train_helpers.compile_at_llvm_level_0``; the
# tiny DPO step: compile 18.9 -> 11.9 s, a step 34 -> 164 ms): for tests that compile a step to run it a few times
# or only to read its memory analysis. The training runs (end to end, resume, sharding) keep the shipped level and
# compute what the command computes.
@pytest.fixture(autouse=True)
def _compile_for_few_runs(request, monkeypatch):
    if request.node.get_closest_marker("compiled_for_few_runs") is not None:
        th.compile_at_llvm_level_0(monkeypatch.setattr)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return th.build_world(_shared_base(tmp_path_factory) / "shared_world")


@pytest.fixture(scope="session")
def reference(world, tmp_path_factory):
    return th.shared_reference_run(world, _shared_base(tmp_path_factory) / "shared_reference")


@pytest.fixture(scope="session")
def compiled_steps():
    return {}


@pytest.fixture(scope="session")
def sd15_unet_shapes():
    from jaxpref.models.presets import SD15_UNET
    from jaxpref.models.unet import unet_param_shapes

    return unet_param_shapes(SD15_UNET)
