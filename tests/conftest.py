"""Shared test fixtures: a private token cache, so tests neither read nor fill the user's."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("plait-cache")
    old = os.environ.get("PLAIT_CACHE")
    os.environ["PLAIT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("PLAIT_CACHE", None)
    else:
        os.environ["PLAIT_CACHE"] = old


@pytest.fixture(autouse=True)
def _threads():
    # Two cores here; keep torch from oversubscribing when pytest runs alongside other work.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
