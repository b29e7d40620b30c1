"""Shared test configuration. End-to-end fixtures live in tests/netns.py."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# The machine the suite runs on is shared and loaded: a property test's example can take far
# more than hypothesis's default 200 ms deadline, and generating data can trip its too_slow
# check, neither of which says anything about the code under test. Tests that set their own
# settings inherit these (the profile is loaded before any test module is imported).
settings.register_profile(
    "loaded", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("loaded")

# TUNPROXY_TEST_AS_USER=1 runs the suite as if not root (what a non-root run covers).
IS_ROOT = os.geteuid() == 0 and not os.environ.get("TUNPROXY_TEST_AS_USER")

needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: creates network namespaces, veth pairs and TUN devices"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("netns") is not None and not IS_ROOT:
            item.add_marker(
                pytest.mark.skip(
                    reason="needs root: creates network namespaces, veth pairs and TUN devices"
                )
            )


@pytest.fixture
def topo(tmp_path):  # type: ignore[no-untyped-def]
    """A client and a server namespace joined by veth (see tests/netns.py); always removed."""
    from tests.netns import topology

    with topology(tmp_path) as t:
        yield t
