"""Shared fixtures: one embedded Ray per test session, and one small demo run reused by many tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

DEMO_N = 300


@pytest.fixture(scope="session")
def ray_session():
    """Ray with 2 CPUs, started once for the whole session (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_run(ray_session, tmp_path_factory) -> Path:
    """A finished demo run of DEMO_N samples: the end-to-end tests read it, none may change it."""
    from curate.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "run"
    outcome = run_demo(out, n=DEMO_N, seed=7)
    assert outcome.ok, outcome.failures
    return out
