"""The demo as a Ray job: a real head node on 127.0.0.1, `ray job submit`, `ray job logs`.

The head runs in its own session with its own temp dir, free ports and a fresh auth token,
so it never meets the test session's embedded Ray or anyone else's; it is stopped by
process id (never with `ray stop`, which stops every Ray on the machine), and every wait
has a deadline.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from tests.procs import ROOT, descendants, env

RAY = str(Path(sys.executable).with_name("ray"))
N = 200
# Kept out of the uploaded working dir (on top of .gitignore): nodes bring their own venv.
EXCLUDES = [".git", ".venv*", "runs", "bench", ".ci", ".hypothesis", ".pytest_cache", "*.egg-info"]
JOB_TIMEOUT = 540


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOKEN = secrets.token_hex(32)


def node_env() -> dict[str, str]:
    """The nodes' and CLI's environment: the venv first on PATH (the job's `python` is the venv's),
    and token auth with this test's own token (a head enables auth when ~/.ray/auth_token exists)."""
    out = env()
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    return out


def api(address: str, path: str) -> dict:
    request = urllib.request.Request(f"{address}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the head and everything below it (by id), then SIGKILL what is left."""
    pids = [proc.pid, *descendants(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(1)
    proc.wait()


@pytest.fixture
def head() -> Iterator[str]:
    """A one-node Ray cluster with a dashboard on 127.0.0.1; yields the job submission address."""
    temp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash,
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
    args = [RAY, "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--temp-dir", temp,
            "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]
    with open(Path(temp) / "head.log", "wb") as log:
        proc = subprocess.Popen(args, env=node_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (Path(temp) / "head.log").read_text()[-4000:]
            assert time.time() < deadline, "the head's dashboard never answered"
            try:
                api(address, "/api/version")
                break
            except OSError:
                time.sleep(1)
        yield address
    finally:
        stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def ray_cli(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([RAY, *args], cwd=ROOT, env=node_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_demo_runs_as_a_submitted_job(head, tmp_path):
    out = tmp_path / "demo"
    job = f"curate-demo-{os.getpid()}"
    started = time.time()
    ray_cli("job", "submit", "--address", head, "--submission-id", job, "--no-wait", "--working-dir", ".",
            "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
            "--", "python", "-m", "jobs.curate", "demo", "--out", str(out), "--n", str(N))
    while (status := api(head, f"/api/jobs/{job}")["status"]) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
        if time.time() - started > JOB_TIMEOUT:
            ray_cli("job", "stop", "--address", head, job)
            pytest.fail(f"job still {status} after {JOB_TIMEOUT}s")
        time.sleep(2)
    logs = ray_cli("job", "logs", "--address", head, job)
    assert status == "SUCCEEDED", logs[-4000:]
    print(f"job {job}: {status} in {time.time() - started:.1f}s")

    for phase in ("download", "score", "write"):  # per-phase progress: rows done, rows/s, elapsed
        assert re.search(rf"INFO {phase}: \d+/\d+ rows, [\d.]+ rows/s, [\d.]+s elapsed", logs), phase
    assert "attaching to Ray" in logs  # the job used the cluster, not an embedded Ray

    manifest = pads.dataset(out / "manifest", format="parquet").to_table().to_pandas()
    assert len(manifest) == pq.read_metadata(out / "input" / "urls.parquet").num_rows == N
    assert manifest.key.is_unique
    stats = json.loads((out / "stats.json").read_text())
    assert stats["funnel"]["rows_in"] == N and stats["failures"] == []
    in_shards = []
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            in_shards += [m.name.rsplit(".", 1)[0] for m in t if m.name.endswith(".jpg")]
    assert sorted(in_shards) == sorted(manifest[manifest.keep].key)
    assert stats["shards"]["samples"] == len(in_shards) > 0
