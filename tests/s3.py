"""A real S3-compatible server for the tests: moto's standalone server on 127.0.0.1.

It runs as its own process (`moto_server`), so the test process, CLI subprocesses, Ray
workers and other Ray nodes all reach the same buckets over HTTP. Clients find it through
the standard AWS environment variables only (AWS_ENDPOINT_URL and test credentials), which
is what the storage module must honour with no storage keys in the config. Ray workers
inherit the environment their node started with, so `env` must be in place before Ray starts
(conftest's `ray_session` takes care of that).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MOTO_SERVER = str(Path(sys.executable).with_name("moto_server"))
START_TIMEOUT = 60


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]

    def filesystem(self):
        """pyarrow's S3 filesystem on this server (the same client the pipeline uses)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint.split("://", 1)[1], scheme="http",
                                 access_key="testing", secret_key="testing", region="us-east-1",
                                 allow_bucket_creation=True)

    def bucket(self, prefix: str = "t") -> str:
        """A new empty bucket; returns its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.filesystem().create_dir(name)
        return name

    def objects(self, uri: str) -> dict[str, int]:
        """Every object under an s3:// URI, by key relative to it, with its size."""
        import pyarrow.fs as pafs

        root = uri.removeprefix("s3://").rstrip("/")
        infos = self.filesystem().get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}

    def read(self, uri: str) -> bytes:
        with self.filesystem().open_input_stream(uri.removeprefix("s3://")) as f:
            return f.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint, timeout=2):
            return True
    except OSError:
        return False


@contextmanager
def moto_server() -> Iterator[S3Server]:
    """Start `moto_server` on a free loopback port, wait until it answers, stop it (by id) after."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
    proc = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + START_TIMEOUT
        while not _answers(endpoint):
            assert proc.poll() is None, Path(log.name).read_text()[-2000:]
            assert time.time() < deadline, f"moto_server did not answer on {endpoint}"
            time.sleep(0.1)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        yield S3Server(endpoint, env)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        os.unlink(log.name)
