"""The relay against its anchors, side by side, on this machine.

    .venv/bin/python bench/compare.py [--rounds 5] [--seconds 5] [--connections 16]

Starts anvil (the test USDC), then three servers under the same gunicorn settings
(2 gthread workers x 8 threads; the relay with the Procfile's config module): the relay, the x402
SDK's Flask PaymentMiddleware on a fixed-price route, and a bare Flask JSON echo
(bench/anchors.py). Each path is driven by wrk against the relay and its anchor in
alternating rounds; the table shows medians with their spread (min-max), CPU time per
request of the server's processes, and the ratio relay / anchor (above 1: the relay is
faster). Resident memory is that of each server's master and workers after the rounds.
Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from relay.dev.chain import DevChain  # noqa: E402

PAY_TO = "0x85F37873f97afa61263A27107f2e7b0B672d7CFF"
US = "+13012576365"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """One gunicorn server of an app, on its own port."""

    name: str
    app: str
    env: dict[str, str]
    #: The relay runs with the Procfile's config module; the anchors with gunicorn's defaults.
    config: bool = False
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = free_port()
        command = [
            str(Path(sys.executable).parent / "gunicorn"),
            *(["--config", "python:relay.gunicorn_conf"] if self.config else []),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            "2",
            "--threads",
            "8",
            "--worker-class",
            "gthread",
            "--log-level",
            "warning",
            self.app,
        ]
        self.proc = subprocess.Popen(
            command, cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, start_new_session=True
        )
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

    def pids(self) -> list[int]:
        """The master and its workers."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [self.proc.pid, *(int(pid) for pid in children.split())]

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
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)


@dataclass
class Case:
    """One path: the relay's request and the anchor's request it is compared with."""

    title: str
    relay: tuple[str, str, str | None]  # method, path, JSON body
    anchor: Server
    anchor_request: tuple[str, str, str | None]
    rates: dict[str, list[float]] = field(default_factory=lambda: {"relay": [], "anchor": []})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {"relay": [], "anchor": []})


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wrk(
    url: str, request: tuple[str, str, str | None], seconds: int, connections: int
) -> tuple[float, int]:
    """Requests per second and the number of requests of one wrk run."""
    method, path, body = request
    script = f'wrk.method = "{method}"\n'
    if body is not None:
        escaped = body.replace("\\", "\\\\").replace('"', '\\"')
        script += f'wrk.body = "{escaped}"\nwrk.headers["Content-Type"] = "application/json"\n'
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script)
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", lua.name, url + path]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    os.unlink(lua.name)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rate, count


def measure(
    server: Server, request: tuple[str, str, str | None], seconds: int, connections: int
) -> tuple[float, float]:
    """req/s and server CPU ms per request."""
    before = server.cpu_seconds()
    rate, count = wrk(server.url, request, seconds, connections)
    used = server.cpu_seconds() - before
    return rate, 1000 * used / max(count, 1)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} ({min(values):.0f}-{max(values):.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    servers: list[Server] = []
    with DevChain.start() as chain:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(scratch),
            "QUOTE_SECRET": "bench-quote-secret-0123456789",
            "PAY_TO_ADDRESS": PAY_TO,
            "FACILITATOR": "local",
            "RPC_URL": chain.rpc_url,
            "SETTLER_PRIVATE_KEY": chain.accounts[0].private_key,
            "MODERATION_PROVIDER": "rules",
            "SMS_PROVIDER": "outbox",
            "DATABASE_URL": f"sqlite:///{scratch / 'relay.db'}",
            "QUOTE_RATE_LIMIT": "100000000/minute",
            "LOG_LEVEL": "WARNING",
        }
        subprocess.run(
            [sys.executable, "-m", "relay.cli", "db", "upgrade"],
            env=env,
            cwd=scratch,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        relay = Server("relay", "relay.app:create_app()", env, config=True)
        sdk = Server("x402 SDK middleware", "bench.anchors:sdk_app()", env)
        bare = Server("bare Flask", "bench.anchors:bare_app()", env)
        servers = [relay, sdk, bare]
        try:
            for server in servers:
                server.start()
            body = {"message": "Your order has shipped", "to": US}
            quote = httpx.post(relay.url + "/api/quote", json=body, timeout=30).json()
            quoted = dict(body, quote_token=quote["quote_token"])
            import json

            cases = [
                Case(
                    "402 on a quoted /api/send",
                    ("POST", "/api/send", json.dumps(quoted)),
                    sdk,
                    ("POST", "/paid", json.dumps(body)),
                ),
                Case(
                    "bare probe (POST /api/send, no body)",
                    ("POST", "/api/send", None),
                    bare,
                    ("POST", "/echo", json.dumps(body)),
                ),
                Case(
                    "quote, cached text",
                    ("POST", "/api/quote", json.dumps(body)),
                    bare,
                    ("POST", "/echo", json.dumps(body)),
                ),
            ]
            for case in cases:  # warm both once
                measure(relay, case.relay, 1, args.connections)
                measure(case.anchor, case.anchor_request, 1, args.connections)
            for number in range(args.rounds):
                for case in cases:
                    pairs = [
                        ("relay", relay, case.relay),
                        ("anchor", case.anchor, case.anchor_request),
                    ]
                    for who, server, request in pairs if number % 2 == 0 else pairs[::-1]:
                        rate, cpu = measure(server, request, args.seconds, args.connections)
                        case.rates[who].append(rate)
                        case.cpu[who].append(cpu)
                print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
            report(cases, servers)
        finally:
            for server in servers:
                server.stop()
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


def report(cases: list[Case], servers: list[Server]) -> None:
    print()
    head = f"{'path':40} {'relay req/s':>22} {'anchor req/s':>22} {'ratio':>7}"
    print(f"{head}  CPU ms/req relay / anchor")
    for case in cases:
        ratio = statistics.median(case.rates["relay"]) / statistics.median(case.rates["anchor"])
        cpu_relay, cpu_anchor = (statistics.median(case.cpu[who]) for who in ("relay", "anchor"))
        cpu = f"{cpu_relay:.2f} / {cpu_anchor:.2f}"
        print(
            f"{case.title:40} {spread(case.rates['relay']):>22} {spread(case.rates['anchor']):>22}"
            f" {ratio:6.2f}x  {cpu}  (anchor: {case.anchor.name})"
        )
    print()
    sizes = {server.name: server.rss_mb() for server in servers}
    relay = sizes["relay"]
    for name, size in sizes.items():
        print(f"RSS master + 2 workers, {name:22} {size:7.1f} MB  relay/this {relay / size:5.2f}x")


if __name__ == "__main__":
    sys.exit(main())
