"""Fixtures of the flow tests: a Prefect test-harness server per module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def harness():
    """A Prefect test-harness server (SQLite in a temporary directory) for the module's flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
