"""The suite's own setup (tests/conftest.py): under ``--dist loadgroup`` every test carries its xdist group, so a
file's tests and module fixtures stay on one worker (xdist appends ``@<group>`` to the ids it schedules); tests
marked ``compiled_for_few_runs`` compile at LLVM level 0, the others at the shipped level."""
import os

import pytest


def test_xdist_groups_take_effect(request):
    if not (os.environ.get("PYTEST_XDIST_WORKER") and request.config.getvalue("loadgroup")):
        pytest.skip("a run without --dist loadgroup has no groups")
    assert request.node.nodeid.endswith("@test_suite_setup.py"), request.node.nodeid


def _optimization_level_override():
    from jax._src import compiler

    options = compiler.get_compile_options(num_replicas=1, num_partitions=1)
    return dict(options.env_option_overrides).get("xla_backend_optimization_level")


@pytest.mark.compiled_for_few_runs
def test_the_few_runs_marker_compiles_at_llvm_level_0():
    """The marked tests' compiles carry XLA's level-0 option (conftest): a jax change that stopped it would only
    make them slower, silently, without this check."""
    assert _optimization_level_override() == 0


def test_unmarked_tests_compile_at_the_shipped_level():
    assert _optimization_level_override() is None
