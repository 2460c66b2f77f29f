from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    # Real data: $CERTTUNE_DATA if set, else the shared folder beside the checkout (see shared/data/README.md).
    env = os.environ.get("CERTTUNE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def ray_shut_down_after():
    """For a test that searches in this process (certtune's API joins or starts Ray and stays connected, as a
    library should): shut Ray down after it, so later tests' own `ray.init` starts cleanly."""
    yield
    import ray

    ray.shutdown()
