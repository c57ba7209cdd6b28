"""Fixtures shared by the multi-process test modules."""

from __future__ import annotations

import pytest

from .layouts import run_layout


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> list[float]:
    """The single-process loss curve of the debug config, the parity reference."""
    return run_layout(tmp_path_factory.mktemp("single"), 1, [])
