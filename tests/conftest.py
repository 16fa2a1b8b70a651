"""Shared fixtures: one embedded Ray per test session, and one small demo run reused by many tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.procs import LOOPBACK_ONLY

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# An embedded Ray on Linux binds to the machine's outward address; with this switch off it binds
# to 127.0.0.1, as on a laptop, so every embedded Ray of the tests (and of the CLI runs they start,
# which inherit it) stays on the loopback. The multi-node tests turn it back on for their nodes.
os.environ[LOOPBACK_ONLY] = "0"

DEMO_N = 300
DEMO_TIMEOUT = 900   # seconds: the first test that needs the demo run also pays for building it


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers that follow from the fixtures a test uses, so they cannot drift from it: `s3` for
    the S3 server's users, and `slow` (and a deadline that leaves room to build the demo) for
    the demo run's."""
    for item in items:
        if "s3" in item.fixturenames:
            item.add_marker(pytest.mark.s3)
        if "demo_run" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(DEMO_TIMEOUT))


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 for the session, announced through the standard AWS
    environment variables (in this process, hence in every child and Ray worker started later)."""
    from tests.s3 import moto_server

    with moto_server() as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        yield server
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(request):
    """Ray with 2 CPUs, started once for the whole session (start-up costs seconds).

    Ray's workers keep the environment Ray started with: when any collected test uses the S3
    server, it starts first, so the session's workers see its endpoint and credentials.
    """
    import ray

    if any("s3" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("s3")
    if not ray.is_initialized():
        for attempt in range(3):   # a loaded machine can outlast Ray's own node start-up timeout once
            try:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
                break
            except Exception:
                ray.shutdown()
                if attempt == 2:
                    raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_run(ray_session, tmp_path_factory) -> Path:
    """A finished demo run of DEMO_N samples: the end-to-end tests read it, none may change it."""
    from curate.demo.run import run_demo

    out = tmp_path_factory.mktemp("demo") / "run"
    outcome = run_demo(out, n=DEMO_N, seed=7)
    assert outcome.ok, outcome.failures
    return out


TINY_TOWER = "curate-tiny-768"


@pytest.fixture(scope="session")
def tiny_tower(tmp_path_factory) -> str:
    """The name of a tiny open_clip config registered for the session: a 768-d embedding (the
    LAION heads' input width, as ViT-L/14's), one layer per tower, open_clip's bundled tokenizer.
    Tests of the model plumbing use it where the tower's size does not matter: building and
    running ViT-B-32 on CPU costs tens of seconds on a loaded machine."""
    import json

    import open_clip

    root = tmp_path_factory.mktemp("open_clip_configs")
    (root / f"{TINY_TOWER}.json").write_text(json.dumps({
        "embed_dim": 768,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(root)
    return TINY_TOWER
