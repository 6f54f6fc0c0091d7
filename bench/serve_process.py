"""``atop serve`` in a child process, for the integration tests and the benchmarks (not the service).

The child gets a free local port, a clean environment (no inherited ``ATOP_*`` settings, one
OpenMP thread unless the flags say otherwise) and a log file; ``wait_ready`` polls ``/readyz``
and ``stop`` sends SIGTERM (a graceful drain) before it kills.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """This process's environment without ``ATOP_*`` settings, with one OpenMP thread and
    unbuffered output: what a measured or tested child process should start from."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATOP_")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class ServeProcess:
    """One ``python -m atop.cli serve --host 127.0.0.1 --port P *flags`` child."""

    def __init__(self, log_path: Path, *flags: str, cwd: Path | None = None, cpus: tuple[int, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        cmd = [sys.executable, "-m", "atop.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*cmd, *flags], stdout=self._log, stderr=subprocess.STDOUT, env=child_env(), cwd=cwd
        )
        if cpus:
            os.sched_setaffinity(self.proc.pid, cpus)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Return once ``/readyz`` answers 200; raise with the log's tail if the child dies or
        is not ready in time."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:  # refused while starting, or 503 while loading
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()[-3000:]}")

    def stop(self, grace_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode
