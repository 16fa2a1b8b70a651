"""The demo as a Ray job: a real head node on 127.0.0.3 (and a second node on 127.0.0.2),
`ray job submit`, `ray job logs`.

The head runs in its own session with its own temp dir, free ports and a fresh auth token,
so it never meets the test session's embedded Ray or anyone else's; it is stopped by
process id (never with `ray stop`, which stops every Ray on the machine), and every wait
has a deadline.
"""
from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from tests.procs import LOOPBACK_ONLY, ROOT, descendants, env

# A head (and a worker node) of their own, and jobs of up to JOB_TIMEOUT each.
pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1200)]

RAY = str(Path(sys.executable).with_name("ray"))
N = 100
SHARD_ROWS = 10   # ten shards: score has a middle to be killed in
DEMO_N = 60       # the one-node job: every kind of row the demo makes, at the fewest rows
# Kept out of the uploaded working dir (on top of .gitignore): nodes bring their own venv.
EXCLUDES = [".git", ".venv*", "runs", "bench", ".ci", ".hypothesis", ".pytest_cache", "*.egg-info"]
JOB_TIMEOUT = 540
# Ray swaps 127.0.0.1 (and "localhost") for the machine's outward address; any other loopback
# address it keeps, so every node of these clusters stays on 127.0.0.0/8.
HEAD_IP = "127.0.0.3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOKEN = secrets.token_hex(32)


def node_env() -> dict[str, str]:
    """The nodes' and CLI's environment: the venv first on PATH (the job's `python` is the venv's),
    and token auth with this test's own token (a head enables auth when ~/.ray/auth_token exists)."""
    out = env()
    out.pop(LOOPBACK_ONLY, None)   # cluster mode: the nodes bind to the loopback addresses given below
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


@dataclass
class Cluster:
    address: str   # the job submission (dashboard) address
    gcs: str       # what `ray start --address` joins


def start_node(args: list[str], temp: str) -> subprocess.Popen:
    with open(Path(temp) / "node.log", "wb") as log:
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--temp-dir", temp, *args],
                                env=node_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def head() -> Iterator[Cluster]:
    """A one-node Ray cluster with a dashboard on 127.0.0.1, shared by this module's tests (its
    start-up is most of a test's cost); yields its addresses. Worker nodes come and go per test."""
    temp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dash, gcs = free_port(), free_port()
    ports = {"--port": gcs, "--dashboard-port": dash,
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
    proc = start_node(["--head", "--num-cpus", "2", "--node-ip-address", HEAD_IP, "--dashboard-host",
                       "127.0.0.1", "--include-dashboard", "true", *(f"{k}={v}" for k, v in ports.items())], temp)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (Path(temp) / "node.log").read_text()[-4000:]
            assert time.time() < deadline, "the head's dashboard never answered"
            try:
                api(address, "/api/version")
                break
            except OSError:
                time.sleep(1)
        yield Cluster(address, f"{HEAD_IP}:{gcs}")
    finally:
        stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def alive_nodes(cluster: Cluster) -> list[str]:
    """IPs of the nodes the state API lists as alive (empty until the head has registered itself)."""
    nodes = api(cluster.address, "/api/v0/nodes")["data"]["result"]["result"]
    return sorted(n["node_ip"] for n in nodes if n["state"] == "ALIVE")


@pytest.fixture
def worker_node(head) -> Iterator[subprocess.Popen]:
    """A second node on 127.0.0.2 (another "host" on the loopback), with its own temp dir."""
    temp = tempfile.mkdtemp(prefix="rayw", dir="/tmp")
    proc = start_node(["--address", head.gcs, "--num-cpus", "1", "--node-ip-address", "127.0.0.2",
                       "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                       "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                       "--dashboard-agent-listen-port", str(free_port()),
                       "--dashboard-agent-grpc-port", str(free_port())], temp)
    try:
        deadline = time.time() + 120
        while (nodes := alive_nodes(head)) != sorted([HEAD_IP, "127.0.0.2"]):
            assert proc.poll() is None, (Path(temp) / "node.log").read_text()[-4000:]
            assert time.time() < deadline, f"the worker node never joined: {nodes}"
            time.sleep(1)
        yield proc
    finally:
        stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def ray_cli(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([RAY, *args], cwd=ROOT, env=node_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def submit(cluster: Cluster, job: str, args: list[str], env_vars: dict[str, str] | None = None) -> None:
    runtime_env = {"excludes": EXCLUDES, "env_vars": env_vars or {}}
    ray_cli("job", "submit", "--address", cluster.address, "--submission-id", job, "--no-wait", "--working-dir", ".",
            "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "jobs.curate", *args)


def wait_for(cluster: Cluster, job: str, started: float, each: Callable[[], None] = lambda: None) -> tuple[str, str]:
    """Poll the job to its end (calling `each` between polls); its final status and its logs."""
    while (status := api(cluster.address, f"/api/jobs/{job}")["status"]) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
        if time.time() - started > JOB_TIMEOUT:
            ray_cli("job", "stop", "--address", cluster.address, job)
            pytest.fail(f"job still {status} after {JOB_TIMEOUT}s")
        each()
        time.sleep(0.2)
    return status, ray_cli("job", "logs", "--address", cluster.address, job)


def test_local_paths_are_refused_on_several_nodes_unless_declared_shared(tmp_path):
    from curate.config import validate
    from curate.guards import local_paths_refusal

    run, urls = str(tmp_path / "run"), str(tmp_path / "urls.parquet")
    cfg = validate({"run_dir": run, "input": {"paths": [urls]}})
    assert local_paths_refusal(cfg, 1) is None
    why = local_paths_refusal(cfg, 2)
    assert f"run_dir {run} and input path {urls} are local paths" in why
    assert "s3://BUCKET/runs/NAME" in why and "storage.shared_mount: true" in why
    cfg.storage.shared_mount = True
    assert local_paths_refusal(cfg, 3) is None
    on_s3 = validate({"run_dir": "s3://b/run", "input": {"paths": [urls]}})
    assert f"but input path {urls} is a local path" in local_paths_refusal(on_s3, 2)
    assert local_paths_refusal(validate({"run_dir": "s3://b/run", "input": {"paths": ["s3://b/u.parquet"]}}), 2) is None


def test_relative_paths_inside_a_ray_job_working_dir_are_refused(tmp_path, monkeypatch):
    """Inside `ray job submit --working-dir`, the process runs in Ray's unpacked copy of the upload:
    a relative run_dir would land there, in the head's package cache."""
    from curate.config import ConfigError, load

    job = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    job.mkdir(parents=True)
    cfg = tmp_path / "c.yaml"

    def write(run_dir: str, urls: str) -> Path:
        cfg.write_text(json.dumps({"run_dir": run_dir, "input": {"paths": [urls]}}))
        return cfg

    monkeypatch.chdir(job)
    with pytest.raises(ConfigError, match=r"run_dir 'runs/x' is a relative path.*Ray job's copy.*_ray_pkg_0123abcd"):
        load(write("runs/x", "s3://b/u.parquet"))
    with pytest.raises(ConfigError, match=r"input.paths 'data/\*.parquet' is a relative path"):
        load(write("s3://b/run", "data/*.parquet"))
    assert load(write("s3://b/run", "s3://b/u.parquet")).run_dir == "s3://b/run"
    assert load(write(str(tmp_path / "abs"), "s3://b/u.parquet")).run_dir == str(tmp_path / "abs")
    monkeypatch.chdir(tmp_path)   # outside a job, relative paths resolve against the shell's folder
    assert load(write("runs/x", "s3://b/u.parquet")).run_dir == str(tmp_path / "runs" / "x")


@pytest.mark.slow
def test_weights_are_checked_on_the_nodes_themselves(ray_session, tmp_path):
    from curate.guards import missing_weights_by_node
    from curate.run.runtime import alive_nodes
    from filters.models import ModelOptions

    nodes = [n["NodeManagerAddress"] for n in alive_nodes()]
    empty = ModelOptions(enabled=["aesthetic"], weights="pretrained", models_dir=str(tmp_path / "empty"))
    found = missing_weights_by_node(empty)
    assert sorted(found) == sorted(nodes) and all("aesthetic" in why for why in found.values())
    assert "missing from" in next(iter(found.values()))["aesthetic"]
    assert missing_weights_by_node(empty.model_copy(update={"weights": "random"})) == {}


@pytest.mark.slow
def test_demo_runs_as_a_submitted_job(head, tmp_path):
    out = tmp_path / "demo"
    job = f"curate-demo-{os.getpid()}"
    started = time.time()
    submit(head, job, ["demo", "--out", str(out), "--n", str(DEMO_N)])
    status, logs = wait_for(head, job, started)
    assert status == "SUCCEEDED", logs[-4000:]
    print(f"job {job}: {status} in {time.time() - started:.1f}s")

    for phase in ("download", "score", "write"):  # per-phase progress: rows done, rows/s, elapsed
        assert re.search(rf"INFO {phase}: \d+/\d+ rows, [\d.]+ rows/s, [\d.]+s elapsed", logs), phase
    assert "attaching to Ray" in logs  # the job used the cluster, not an embedded Ray

    manifest = pads.dataset(out / "manifest", format="parquet").to_table().to_pandas()
    assert len(manifest) == pq.read_metadata(out / "input" / "urls.parquet").num_rows == DEMO_N
    assert manifest.key.is_unique
    stats = json.loads((out / "stats.json").read_text())
    assert stats["funnel"]["rows_in"] == DEMO_N and stats["failures"] == []
    in_shards = []
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            in_shards += [m.name.rsplit(".", 1)[0] for m in t if m.name.endswith(".jpg")]
    assert sorted(in_shards) == sorted(manifest[manifest.keep].key)
    assert stats["shards"]["samples"] == len(in_shards) > 0

    # A relative run directory would resolve inside the job's copy of --working-dir: refused, saying why.
    relative = f"curate-rel-{os.getpid()}"
    submit(head, relative, ["demo", "--out", "runs/reljob", "--n", "20"])
    status, logs = wait_for(head, relative, time.time())
    assert status == "FAILED" and "--out 'runs/reljob' is a relative path" in logs, logs[-2000:]
    assert "Ray job's copy of its --working-dir" in logs and "s3://" in logs


@pytest.mark.slow
def test_a_two_node_job_on_s3_loses_its_worker_node_during_score_and_completes(s3, head, worker_node, tmp_path):
    """The cluster case: run_dir on S3, a second node that dies in the middle of score (SIGKILL of
    its raylet and workers). Ray re-runs the lost work on the head; every input row is accounted for.
    First, the same demo on a local run_dir is refused before any work: the other node has its own disk."""
    local = f"curate-local-{os.getpid()}"
    submit(head, local, ["demo", "--out", str(tmp_path / "local"), "--n", "20"], env_vars=s3.env)
    status, logs = wait_for(head, local, time.time())
    assert status == "FAILED" and "this Ray cluster has 2 nodes alive" in logs, logs[-2000:]
    assert "storage.shared_mount: true" in logs and "s3://BUCKET/runs/NAME" in logs
    assert not (tmp_path / "local" / "_lease.json").exists() and not (tmp_path / "local" / "raw").exists()

    root = f"s3://{s3.bucket('cluster')}/demo"
    shards = N // SHARD_ROWS
    job = f"curate-s3-{os.getpid()}"
    killed: list[int] = []

    def kill_the_worker_node_mid_score() -> None:
        if killed:
            return
        scored = sum(k.startswith("_done/score/") for k in s3.objects(root))
        if 1 <= scored < shards:
            killed.append(scored)
            for pid in [worker_node.pid, *descendants(worker_node.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    started = time.time()
    submit(head, job, ["demo", "--out", root, "--n", str(N), "--set", f"input.shard_rows={SHARD_ROWS}",
                       "--set", "score.batch_size=8"], env_vars=s3.env)
    status, logs = wait_for(head, job, started, kill_the_worker_node_mid_score)
    assert killed, "score finished before the worker node could be killed in its middle"
    assert status == "SUCCEEDED", logs[-4000:]
    assert worker_node.poll() is not None
    manifest = pads.dataset(root.removeprefix("s3://") + "/manifest", filesystem=s3.filesystem(),
                            format="parquet").to_table()
    assert manifest.num_rows == N and len(set(manifest.column("key").to_pylist())) == N
    assert "shard_failed" not in manifest.column("reason").to_pylist()
    stats = json.loads(s3.read(f"{root}/stats.json"))
    assert stats["funnel"]["rows_in"] == N and stats["failures"] == []
    kept = {k for k, keep in zip(manifest.column("key").to_pylist(), manifest.column("keep").to_pylist()) if keep}
    in_shards = set()
    for key in (k for k in s3.objects(root) if k.startswith("shards/") and k.endswith(".tar")):
        with tarfile.open(fileobj=io.BytesIO(s3.read(f"{root}/{key}"))) as tar:
            in_shards |= {m.name.rsplit(".", 1)[0] for m in tar if m.name.endswith(".jpg")}
    assert kept and in_shards == kept
