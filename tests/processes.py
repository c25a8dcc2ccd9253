"""Run `relay serve` as a real process for end-to-end tests, and always stop it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import redis
import requests

from relay.dev.chain import DevChain
from relay.ledger import Ledger
from tests.conftest import new_wallet

REPO = Path(__file__).resolve().parent.parent


def procfile(kind: str) -> str:
    """The Procfile's command for a process kind (web, worker, release), as written."""
    return next(
        line.split(":", 1)[1].strip()
        for line in (REPO / "Procfile").read_text().splitlines()
        if line.startswith(f"{kind}:")
    )


def relay_env(chain: DevChain, database_url: str, **more: str) -> dict[str, str]:
    """The environment of a relay on ``chain`` (local settlement, rules, outbox)."""
    env = {
        "QUOTE_SECRET": "exactly-once-secret-0123456789",
        "PAY_TO_ADDRESS": new_wallet(chain).address,
        "FACILITATOR": "local",
        "RPC_URL": chain.rpc_url,
        "SETTLER_PRIVATE_KEY": chain.accounts[0].private_key,
        "MODERATION_PROVIDER": "rules",
        "SMS_PROVIDER": "outbox",
        "DATABASE_URL": database_url,
        "QUOTE_RATE_LIMIT": "10000/minute",
    }
    env.update(more)
    return env


@contextmanager
def migrated(chain: DevChain, folder: Path) -> Iterator[tuple[dict[str, str], Ledger]]:
    """A relay environment on a new SQLite ledger in ``folder``, upgraded to this release."""
    env = relay_env(chain, f"sqlite:///{folder / 'relay.db'}")
    ledger = Ledger.from_url(env["DATABASE_URL"])
    ledger.upgrade()
    try:
        yield env, ledger
    finally:
        ledger.engine.dispose()


def wait_until_up(url: str, proc: subprocess.Popen[bytes], path: str = "/health") -> None:
    """Wait until the server at ``url`` answers ``path``; fail if it exits or takes 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            requests.get(url + path, timeout=5)
            return
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.1)
    raise AssertionError("the server did not start")


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RelayProcess:
    """`relay serve` on a free port with the given environment."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        port: int | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port()
        self._args = args
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = env
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> RelayProcess:
        """Start the server and wait until /health answers."""
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **self._env}
        command = [
            sys.executable,
            "-m",
            "relay.cli",
            "serve",
            "--port",
            str(self.port),
            *self._args,
        ]
        with self._log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"relay exited: {self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or busy starting
                time.sleep(0.1)
        raise RuntimeError(f"relay did not become healthy: {self.log()}")

    def log(self) -> str:
        """What the server printed so far."""
        return self._log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)

    def stop(self) -> None:
        """Stop gracefully, then forcefully."""
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def redis_server(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A throw-away redis-server on ``port`` that keeps nothing on disk."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is needed for this test"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield proc
    finally:
        proc.kill()
        proc.wait()
