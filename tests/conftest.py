import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# "ci" keeps the whole suite within a few minutes on 2 cores; "dev" searches harder.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own empty data cache (MBNET_CACHE) and no MBNET_DATA: nothing outside
    tmp_path is read or written, and nothing is downloaded."""
    monkeypatch.delenv("MBNET_DATA", raising=False)
    c = tmp_path / "cache"
    monkeypatch.setenv("MBNET_CACHE", str(c))
    return c


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true",
                     help="tests/test_fuzz.py: run >= 10,000 malformed binding calls instead of a CI-sized few hundred")
