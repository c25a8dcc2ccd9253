"""gunicorn servers for bench/compare.py: one app on its own port, its processes' CPU time
and resident memory read from /proc, always stopped by the caller."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
STOP_SECONDS = 20


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def venv_tool(name: str) -> str:
    """A command installed next to this Python (gunicorn, py-spy)."""
    return str(Path(sys.executable).parent / name)


@dataclass
class Server:
    """One gunicorn server of an app (2 gthread workers x 16 threads), on its own port."""

    name: str
    app: str
    env: dict[str, str]
    #: The relay runs with the Procfile's config module; the anchors with gunicorn's defaults.
    config: bool = False
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.port = free_port()
        command = [
            venv_tool("gunicorn"),
            *(["--config", "python:relay.gunicorn_conf"] if self.config else []),
            *("--bind", f"127.0.0.1:{self.port}", "--workers", "2", "--threads", "16"),
            *("--worker-class", "gthread", "--log-level", "warning"),
            self.app,
        ]
        self.proc = subprocess.Popen(
            command, cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, start_new_session=True
        )
        self._wait_until_up()
        return self

    def _wait_until_up(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.url}/nothing-here", timeout=2)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"{self.name} did not start") from None
                time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def master_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The master and its workers."""
        pid = self.master_pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [pid, *(int(child) for child in children.split())]

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / TICKS

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        return total / 1024

    def stop(self) -> None:
        """SIGTERM to the whole process group; SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_SECONDS)
