"""Shared test setup: offline, quiet Ray defaults, and one local Ray cluster per test session (`ray_local`)."""
from __future__ import annotations

import os

import pytest

os.environ.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster
for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster with 2 CPUs for the whole session (started on first use)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
