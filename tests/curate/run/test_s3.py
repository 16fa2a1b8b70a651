"""The run directory and the inputs on S3 (moto's server on 127.0.0.1, reached through the
standard AWS environment variables only; no storage key in any config).

`curate run` and `curate demo --out s3://...` complete; a SIGKILL of the driver in each phase,
then a re-run, gives exactly the uninterrupted run's objects; and no file of the run lands on
local disk. "On local disk" means the driver's working directory and TMPDIR, which every CLI
run here gets as a fresh folder of its own (Ray keeps its session files under TMPDIR/ray, and
the download phase its img2dataset scratch folder under TMPDIR): once a run has finished, no
file there may be a run file, i.e. carry a data suffix (parquet, tar, npy, arrow, jpg) or the
name of any object the run wrote.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from curate.demo.corpus import generate
from tests import resume
from tests.procs import run_cli
from tests.resume import N
from tests.servers import serve

# Driver subprocesses and full runs on S3 (the `s3` marker comes from the fixture, tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DATA_SUFFIXES = (".parquet", ".tar", ".npy", ".arrow", ".jpg")
DEMO_N = 60


@pytest.fixture(scope="module")
def urls(s3, tmp_path_factory) -> Iterator[str]:
    """The URL manifest in a bucket; the images it points at are served from 127.0.0.1."""
    folder = tmp_path_factory.mktemp("s3_corpus")
    samples = generate(folder / "images", n=N, seed=3)
    with serve(folder / "images", delay=0.1) as srv:
        uri = f"s3://{s3.bucket('input')}/corpus/urls.parquet"
        resume.write_urls(uri, srv.base, samples)
        yield uri


SECRET = "hunter2-not-a-real-key"   # in storage.options only: pyarrow's S3 client takes its keys from the environment
SECRET_KEY = "client_secret"


@pytest.fixture(scope="module")
def ref_root(s3, urls, tmp_path_factory, ray_session) -> str:
    """One uninterrupted run on S3, in this process on the session's Ray, with a secret in storage.options."""
    import yaml

    from curate.config import load
    from curate.pipeline import run_phases

    root = f"s3://{s3.bucket('ref')}/run"
    path = resume.config(root, urls, tmp_path_factory.mktemp("s3_ref") / "run.yaml")
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "storage": {"options": {SECRET_KEY: SECRET}}}))
    outcome = run_phases(load(path))
    assert outcome.ok, outcome.failures
    return root


@pytest.fixture(scope="module")
def reference(ref_root) -> dict:
    snap = resume.snapshot(ref_root)
    resume.check_reference(snap)
    return snap


def test_report_inspect_and_decide_take_uris_and_no_secret_is_written(s3, ref_root, monkeypatch):
    """`curate report|inspect RUN` and `curate decide RUN/config.yaml` with s3:// URIs (typer's Path
    would have made them s3:/...); config.yaml and the report never hold the secret, and a re-run from
    the saved config takes it from the environment."""
    from typer.testing import CliRunner

    from curate.cli import app

    saved = s3.read(f"{ref_root}/config.yaml").decode()
    assert SECRET not in saved and f"{SECRET_KEY}: <redacted>" in saved
    runner = CliRunner()
    result = runner.invoke(app, ["report", ref_root])
    assert result.exit_code == 0, result.output
    assert SECRET not in s3.read(f"{ref_root}/report.html").decode()
    result = runner.invoke(app, ["inspect", ref_root, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["funnel"]["rows_in"] == N

    env = "CURATE_STORAGE_" + SECRET_KEY.upper()
    monkeypatch.delenv(env, raising=False)
    result = runner.invoke(app, ["decide", f"{ref_root}/config.yaml"])
    assert result.exit_code == 2 and f"storage.options.{SECRET_KEY} is <redacted>" in result.output
    assert env in result.output
    monkeypatch.setenv(env, SECRET)
    result = runner.invoke(app, ["decide", f"{ref_root}/config.yaml"])
    assert result.exit_code == 0, result.output
    assert "kept" in result.output and SECRET not in s3.read(f"{ref_root}/config.yaml").decode()


@pytest.fixture
def local() -> Iterator[Path]:
    """A fresh folder to be a CLI run's working directory and TMPDIR (short: Ray's socket paths
    under TMPDIR/ray must fit 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="c", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def in_folder(folder: Path) -> dict:
    """Driver options that keep every local write of a CLI run inside `folder`."""
    return {"cwd": folder, "extra_env": {"TMPDIR": str(folder)}}


def run_files_on_disk(folder: Path, root: str, besides: tuple[str, ...] = ()) -> list[str]:
    """Files under `folder` (`besides`: top-level folders left out) that are run files: a data
    suffix, or the name of an object under the run directory `root`."""
    names = {key.rsplit("/", 1)[-1] for key in resume.objects(root)}
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] not in besides and (path.suffix in DATA_SUFFIXES or path.name in names):
            found.append(str(rel))
    return sorted(found)


@pytest.mark.slow
@pytest.mark.timeout(1200)   # four driver processes, each killed in its phase, then a re-run
def test_run_on_s3_killed_in_every_phase_resumes_to_the_same_result(s3, urls, reference, tmp_path, local):
    root = f"s3://{s3.bucket('run')}/run"
    cfg = resume.config(root, urls, tmp_path / "run.yaml")
    log = tmp_path / "driver.log"
    killed = local / "killed"
    killed.mkdir()
    resume.kill_in_every_phase(root, cfg, log, **in_folder(killed))

    final = local / "final"
    final.mkdir()
    code, out = run_cli(["run", str(cfg)], log, **in_folder(final))
    assert code == 0, out[-4000:]
    assert resume.snapshot(root) == reference
    assert not [k for k in resume.objects(root) if k.startswith("scores/_parts/")]
    assert run_files_on_disk(final, root) == []
    # The manifest is a dataset: one table straight from the bucket.
    manifest = pads.dataset(root.removeprefix("s3://") + "/manifest", filesystem=s3.filesystem(),
                            format="parquet").to_table()
    assert manifest.num_rows == N and len(set(manifest.column("key").to_pylist())) == N


@pytest.mark.slow
def test_demo_on_s3_completes_with_nothing_on_local_disk(s3, tmp_path, local):
    root = f"s3://{s3.bucket('demo')}/demo"
    code, out = run_cli(["demo", "--out", root, "--n", str(DEMO_N)], tmp_path / "demo.log", **in_folder(local))
    assert code == 0, out[-4000:]
    stats = json.loads(s3.read(f"{root}/stats.json"))
    assert stats["funnel"]["rows_in"] == DEMO_N and stats["failures"] == []
    found = resume.objects(root)
    shards = [k for k in found if k.startswith("shards/") and k.endswith(".tar")]
    assert len(shards) == stats["shards"]["count"] > 0
    assert {"report.html", "config.yaml", "input/urls.parquet"} <= set(found)
    manifest = pads.dataset(root.removeprefix("s3://") + "/manifest", filesystem=s3.filesystem(),
                            format="parquet").to_table()
    assert manifest.num_rows == DEMO_N and sum(manifest.column("keep").to_pylist()) == stats["shards"]["samples"]
    # The served images (the demo's stand-in for the web) are the only local files it may leave.
    images = f"curate-demo-images-n{DEMO_N}-seed0"
    assert (local / images).is_dir()
    assert run_files_on_disk(local, root, besides=(images,)) == []
