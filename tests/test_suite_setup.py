"""The suite's own scheduling (tests/conftest.py): under ``--dist loadgroup`` every test carries its xdist group,
so a file's tests and module fixtures stay on one worker (xdist appends ``@<group>`` to the ids it schedules)."""
import os

import pytest


def test_xdist_groups_take_effect(request):
    if not (os.environ.get("PYTEST_XDIST_WORKER") and request.config.getvalue("loadgroup")):
        pytest.skip("a run without --dist loadgroup has no groups")
    assert request.node.nodeid.endswith("@test_suite_setup.py"), request.node.nodeid
