"""Shared test settings: deterministic hypothesis runs and small random helpers."""
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,  # same examples every run: CI stays deterministic
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")


@pytest.fixture
def rng():
    """A freshly seeded generator per test."""
    return np.random.default_rng(20261122)
