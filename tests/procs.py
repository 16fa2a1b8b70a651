"""Driver subprocesses for the fault and cluster tests: started in their own session, always reaped.

A test kills only processes it started, by id: the driver, and the descendants it had when
it was killed (raylet, GCS, Ray workers), which outlive it as orphans otherwise.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"   # Ray's switch between single-machine and cluster mode


def env() -> dict[str, str]:
    """The test environment for a child, without a Ray address that would attach it elsewhere."""
    out = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out.update(RAY_USAGE_STATS_ENABLED="0", NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    return out


def descendants(root: int) -> list[int]:
    """Ids of every living process below `root`, read from /proc (Linux)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += children
        frontier = children
    return found


def cmdline(pid: int) -> str:
    """A process's command line (Ray workers put their task name there), '' once it has ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Driver:
    """`python -m jobs.curate ARGS` in a subprocess, its output in a log file.

    `cwd` and `extra_env` (TMPDIR, say) let a test pin down every local folder the run could write to.
    """

    def __init__(self, args: list[str], log: Path, cwd: Path = ROOT, extra_env: dict[str, str] | None = None):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "jobs.curate", *args], cwd=cwd,
                                         env={**env(), **(extra_env or {})},
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def descendants(self) -> list[int]:
        return descendants(self.proc.pid)

    def wait(self, timeout: float = 300) -> int:
        """Exit code; a driver still running after `timeout` is killed and the test fails."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"driver ran past {timeout}s; log:\n{self.output()[-4000:]}") from None

    def kill_when(self, condition: Callable[[], bool], timeout: float = 240, poll: float = 0.005) -> None:
        """SIGKILL the driver as soon as `condition()` holds; fail if it exits first or never holds."""
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"driver exited ({self.proc.returncode}) before the kill point:\n"
                                     f"{self.output()[-4000:]}")
            if time.time() > deadline:
                self.kill()
                raise AssertionError("kill point never reached")
            time.sleep(poll)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the driver, then the processes it had started (by id), and reap them."""
        children = self.descendants()
        self.proc.kill()
        self.proc.wait()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run_cli(args: list[str], log: Path, timeout: float = 300, **driver) -> tuple[int, str]:
    """Run the CLI to the end (`driver`: Driver's options); return its exit code and its output."""
    start = log.stat().st_size if log.exists() else 0
    proc = Driver(args, log, **driver)
    code = proc.wait(timeout)
    return code, proc.output()[start:]
