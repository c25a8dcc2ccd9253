"""The relay against its anchors, side by side, on this machine: every figure of the
speed goals in one command.

    .venv/bin/python bench/compare.py [--rounds 5] [--seconds 5] [--connections 16]
        [--paid-rounds 3] [--paid-sends 30] [--payers 20] [--payer-rounds 2]
        [--herd-clients 50] [--herd-rounds 5] [--only FIGURE,...] [--profile]

Starts what the chosen figures need (all by default), each server under the same gunicorn
settings (2 gthread workers x 16 threads; the relay with the Procfile's config module):

- anvil with automining (the test USDC), and on it the relay (rules moderation), the x402
  SDK's Flask PaymentMiddleware on a fixed-price route, settled by the SDK's own
  facilitator and web3 signer (each worker from its own dev account: that signer orders
  nonces within one process), and a bare Flask JSON echo (bench/anchors.py); for the paid
  figure also the same middleware settled by the relay's facilitator (no goal: the
  difference is the relay's ledger);
- a fake Gemini answering at once (tests/fake_gemini.py) and a second relay moderating
  with it, for the new-text quotes;
- anvil mining a block every second behind a JSON-RPC proxy that notes when each
  transaction is broadcast (tests/rpc_proxy.py), with a relay and an SDK anchor of their
  own pointed at the proxy.

The figures (names for --only), relay against anchor, in rounds that alternate which
goes first:

- 402, probe, quote-cached, quote-new: the 402 of a quoted /api/send (anchor: the SDK's
  402), the bare probe, a quote of a cached text and a quote of a new text (every request
  a distinct text, so every one calls the model; anchor: bare Flask): wrk for --seconds,
  requests per second and the server's CPU ms per request. Every answer's status is
  checked (402 for the 402 paths, 200 for quotes and the echo); a wrong one stops the run;
- paid: --paid-sends paid requests one after the other on the automining chain, each
  prepared (quote, 402, signature by the SDK's client) outside the timing; paid sends per
  second is 1 / mean latency;
- payers: --payers payments on 1 s blocks, all signed first, then sent together; the
  distinct blocks holding the settlements, the spread of their broadcast times (first to
  last eth_sendRawTransaction reaching the node) and the paid-request p50 in block times;
- herd: --herd-clients concurrent quotes of one brand-new text, a new text each round:
  how many model calls the fake Gemini got;
- rss: resident memory of each server's master and workers after the other figures.

With --profile, each wrk path runs once more against its relay under
``py-spy record --subprocesses`` (not counted in the table), and the five functions
holding the most samples below the Flask view are printed per path (bench/pyspy_profile.py).

How to read it: the details come first (CPU per request, latencies, every batch, memory,
profiles), then one table, a row per figure: the relay's value, the anchor's, the ratio
relay / anchor and the goal, and whether it is met. Values are medians over the rounds
with their spread (min-max). For rates a ratio above 1 means the relay is faster; for
memory, broadcast spread and latency lower is better.
Needs wrk (Debian: apt-get install wrk); --profile needs py-spy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import TypeVar

import redis
import requests
from eth_typing import HexStr

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import anchors, paid_sends, pyspy_profile, wrk_runs  # noqa: E402
from bench.anchors import PAID_PATH  # noqa: E402
from bench.gunicorn_servers import Server, venv_tool  # noqa: E402
from bench.settlements import fund  # noqa: E402
from relay.dev.chain import DevChain  # noqa: E402
from tests.fake_gemini import FAKE_API_KEY, FakeGemini  # noqa: E402
from tests.rpc_proxy import RpcProxy  # noqa: E402

PAY_TO = "0x85F37873f97afa61263A27107f2e7b0B672d7CFF"
US = paid_sends.US
BLOCK_TIME = 1.0
RELAY_APP = "relay.app:create_app()"
WHO = ("relay", "anchor")
WRK_PATHS = ("402", "probe", "quote-cached", "quote-new")
FIGURES = (*WRK_PATHS, "paid", "payers", "herd", "rss")
#: What each figure needs started (attributes of Lab).
NEEDS = {
    "402": ("relay", "sdk"),
    "probe": ("relay", "bare"),
    "quote-cached": ("gemini_relay", "bare"),
    "quote-new": ("gemini_relay", "bare"),
    "paid": ("relay", "sdk", "sdk_on_relay_facilitator"),
    "payers": ("block_relay", "block_sdk"),
    "herd": ("gemini_relay",),
    "rss": ("relay", "sdk"),
}
SHIPPED = {"message": "Your order has shipped", "to": US}
#: A distinct text per request: wrk replaces the marker.
FRESH = {"message": f"Your order {wrk_runs.UNIQUE} has shipped", "to": US}
T = TypeVar("T")


# --- what runs -------------------------------------------------------------------------


#: A Redis database of its own, emptied before the run.
RATE_LIMIT_STORAGE_URL = "redis://127.0.0.1:6379/14"


class Lab:
    """The chains, fakes and servers the chosen figures need, started on first use and
    stopped by ``stack`` (in reverse order) however the run ends."""

    def __init__(self, stack: ExitStack, scratch: Path) -> None:
        self.stack = stack
        self.scratch = scratch
        self.servers: list[Server] = []
        self._migrated: set[Path] = set()

    def env(self, chain: DevChain, rpc_url: str, database: str, **extra: str) -> dict[str, str]:
        """The relay's environment (the anchors read it too), its database migrated."""
        path = self.scratch / database
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.scratch),
            "QUOTE_SECRET": "bench-quote-secret-0123456789",
            "PAY_TO_ADDRESS": PAY_TO,
            "FACILITATOR": "local",
            "RPC_URL": rpc_url,
            "SETTLER_PRIVATE_KEY": chain.accounts[0].private_key,
            "MODERATION_PROVIDER": "rules",
            "SMS_PROVIDER": "outbox",
            "DATABASE_URL": f"sqlite:///{path}",
            "QUOTE_RATE_LIMIT": "100000000/minute",
            # Limits shared by both workers, as README's several-process set-up has them.
            "RATE_LIMIT_STORAGE_URL": RATE_LIMIT_STORAGE_URL,
            "LOG_LEVEL": "WARNING",
            **extra,
        }
        if path not in self._migrated:
            command = [sys.executable, "-m", "relay.cli", "db", "upgrade"]
            done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"db upgrade failed:\n{done.stdout}{done.stderr}")
            self._migrated.add(path)
        return env

    def anchor_env(self, chain: DevChain, env: dict[str, str], name: str) -> dict[str, str]:
        """The SDK anchor's environment: a settler account of its own per worker (dev
        accounts 1 and 2; the relay settles from account 0)."""
        keys = ",".join(account.private_key for account in chain.accounts[1:3])
        claims = str(self.scratch / f"{name}-settlers")
        return {**env, anchors.SETTLER_KEYS_ENV: keys, anchors.CLAIMS_ENV: claims}

    def serve(self, name: str, app: str, env: dict[str, str], *, config: bool = False) -> Server:
        server = Server(name, app, env, config=config)
        self.stack.callback(server.stop)
        print(f"starting {name}", file=sys.stderr)
        self.servers.append(server.start())
        return server

    @cached_property
    def chain(self) -> DevChain:
        return self.stack.enter_context(DevChain.start())

    @cached_property
    def automine_env(self) -> dict[str, str]:
        return self.env(self.chain, self.chain.rpc_url, "relay.db")

    @cached_property
    def relay(self) -> Server:
        return self.serve("relay", RELAY_APP, self.automine_env, config=True)

    @cached_property
    def sdk(self) -> Server:
        env = self.anchor_env(self.chain, self.automine_env, "sdk")
        return self.serve("x402 SDK middleware", "bench.anchors:sdk_app()", env)

    @cached_property
    def sdk_on_relay_facilitator(self) -> Server:
        app = "bench.anchors:sdk_app('relay')"
        return self.serve("x402 SDK middleware, relay's facilitator", app, self.automine_env)

    @cached_property
    def bare(self) -> Server:
        return self.serve("bare Flask", "bench.anchors:bare_app()", self.automine_env)

    @cached_property
    def gemini(self) -> FakeGemini:
        return self.stack.enter_context(FakeGemini())

    @cached_property
    def gemini_relay(self) -> Server:
        env = self.env(
            self.chain,
            self.chain.rpc_url,
            "gemini.db",
            MODERATION_PROVIDER="gemini",
            GEMINI_API_KEY=FAKE_API_KEY,
            GEMINI_BASE_URL=self.gemini.url,
        )
        return self.serve("relay, Gemini moderation", RELAY_APP, env, config=True)

    @cached_property
    def block_chain(self) -> DevChain:
        return self.stack.enter_context(DevChain.start(block_time=BLOCK_TIME))

    @cached_property
    def proxy(self) -> RpcProxy:
        return self.stack.enter_context(RpcProxy(self.block_chain.rpc_url))

    @cached_property
    def block_env(self) -> dict[str, str]:
        return self.env(self.block_chain, self.proxy.url, "blocks.db")

    @cached_property
    def block_relay(self) -> Server:
        return self.serve("relay, 1 s blocks", RELAY_APP, self.block_env, config=True)

    @cached_property
    def block_sdk(self) -> Server:
        env = self.anchor_env(self.block_chain, self.block_env, "block-sdk")
        return self.serve("x402 SDK middleware, 1 s blocks", "bench.anchors:sdk_app()", env)

    def start(self, figures: Iterable[str]) -> None:
        for figure in figures:
            for part in NEEDS[figure]:
                getattr(self, part)


# --- wrk paths -------------------------------------------------------------------------


@dataclass
class WrkCase:
    """One path: the relay's request and the anchor's request it is compared with."""

    key: str
    title: str
    relay: Server
    #: Built anew for each run (a fresh quote token for the quoted send).
    relay_request: Callable[[], wrk_runs.Request]
    anchor: Server
    anchor_request: Callable[[], wrk_runs.Request]
    rates: dict[str, list[float]] = field(default_factory=lambda: {w: [] for w in WHO})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {w: [] for w in WHO})


def post(path: str, body: dict[str, str] | None, expect: int) -> wrk_runs.Request:
    return wrk_runs.Request("POST", path, None if body is None else json.dumps(body), expect)


def quoted_send(relay: Server) -> wrk_runs.Request:
    """POST /api/send with a fresh quote token of SHIPPED: a 402."""
    quote = requests.post(f"{relay.url}/api/quote", json=SHIPPED, timeout=30)
    paid_sends.expect(quote, 200, "POST /api/quote")
    return post("/api/send", dict(SHIPPED, quote_token=quote.json()["quote_token"]), 402)


def fixed(request: wrk_runs.Request) -> Callable[[], wrk_runs.Request]:
    return lambda: request


def wrk_cases(lab: Lab, chosen: list[str]) -> list[WrkCase]:
    """The chosen wrk paths: the relay's request and the anchor's."""
    echo = fixed(post("/echo", SHIPPED, 200))
    cases: dict[str, Callable[[], WrkCase]] = {
        "402": lambda: WrkCase(
            "402",
            "402 on a quoted /api/send",
            lab.relay,
            partial(quoted_send, lab.relay),
            lab.sdk,
            fixed(post(PAID_PATH, SHIPPED, 402)),
        ),
        "probe": lambda: WrkCase(
            "probe",
            "bare probe (POST /api/send, no body)",
            lab.relay,
            fixed(post("/api/send", None, 402)),
            lab.bare,
            echo,
        ),
        "quote-cached": lambda: WrkCase(
            "quote-cached",
            "quote, cached text (fake Gemini)",
            lab.gemini_relay,
            fixed(post("/api/quote", SHIPPED, 200)),
            lab.bare,
            echo,
        ),
        "quote-new": lambda: WrkCase(
            "quote-new",
            "quote, new text (fake Gemini)",
            lab.gemini_relay,
            fixed(post("/api/quote", FRESH, 200)),
            lab.bare,
            fixed(post("/echo", FRESH, 200)),
        ),
    }
    return [cases[key]() for key in WRK_PATHS if key in chosen]


def measure(
    server: Server, request: wrk_runs.Request, seconds: int, connections: int
) -> tuple[float, float]:
    """req/s and server CPU ms per request of one wrk run."""
    before = server.cpu_seconds()
    result = wrk_runs.run(server.url, request, seconds, connections)
    used = server.cpu_seconds() - before
    if result.socket_errors:
        print(f"  {server.name}: socket errors {result.socket_errors}", file=sys.stderr)
    return result.rate, 1000 * used / max(result.count, 1)


def run_wrk(cases: list[WrkCase], rounds: int, seconds: int, connections: int) -> None:
    for case in cases:  # warm both once
        measure(case.relay, case.relay_request(), 1, connections)
        measure(case.anchor, case.anchor_request(), 1, connections)
    for number in range(rounds):
        for case in cases:
            pairs = [
                ("relay", case.relay, case.relay_request),
                ("anchor", case.anchor, case.anchor_request),
            ]
            for who, server, request in alternate(pairs, number):
                rate, cpu = measure(server, request(), seconds, connections)
                case.rates[who].append(rate)
                case.cpu[who].append(cpu)
        print(f"wrk round {number + 1}/{rounds} done", file=sys.stderr)


def alternate(pairs: Sequence[T], number: int) -> list[T]:
    """The pairs in order on even rounds, reversed on odd ones."""
    return list(pairs if number % 2 == 0 else pairs[::-1])


def profile_cases(
    cases: list[WrkCase], seconds: int, connections: int, scratch: Path
) -> list[tuple[WrkCase, pyspy_profile.Profile]]:
    """One more wrk run of each relay path under py-spy (not counted in the table)."""
    profiles = []
    for case in cases:
        out = scratch / f"profile-{case.key}.txt"
        request = case.relay_request()  # its quote, if any, is not sampled
        spy = pyspy_profile.record(case.relay.master_pid, seconds + 2, out, venv_tool("py-spy"))
        try:
            time.sleep(1.0)  # py-spy attaches to the master and its workers
            wrk_runs.run(case.relay.url, request, seconds, connections)
            _, errors = spy.communicate(timeout=seconds + 60)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
        if spy.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed on {case.title}: {errors.decode(errors='replace')}")
        profiles.append((case, pyspy_profile.below_view(out.read_text())))
        print(f"profiled {case.title}", file=sys.stderr)
    return profiles


# --- paid sends, automine --------------------------------------------------------------


#: The paid figure's servers: the relay, the SDK anchor, and the SDK middleware settling
#: through the relay's own facilitator (no goal: what the relay's ledger costs).
PAID_WHO = (*WHO, "hybrid")


@dataclass
class PaidFigure:
    """Per round: paid sends per second (1 / mean latency), p50 and p90 latency."""

    rates: dict[str, list[float]] = field(default_factory=lambda: {w: [] for w in PAID_WHO})
    p50_ms: dict[str, list[float]] = field(default_factory=lambda: {w: [] for w in PAID_WHO})
    p90_ms: dict[str, list[float]] = field(default_factory=lambda: {w: [] for w in PAID_WHO})
    failures: dict[str, list[str]] = field(default_factory=lambda: {w: [] for w in PAID_WHO})


def texts(tag: str, count: int) -> list[str]:
    return [f"Your order {tag}-{i} has shipped" for i in range(count)]


def run_paid(lab: Lab, rounds: int, sends: int) -> PaidFigure:
    figure = PaidFigure()
    pairs = [
        ("relay", lab.relay, paid_sends.prepare_relay),
        ("anchor", lab.sdk, paid_sends.prepare_anchor),
        ("hybrid", lab.sdk_on_relay_facilitator, paid_sends.prepare_anchor),
    ]
    stamp = f"{time.time_ns():x}"
    for _, server, prepare in pairs:  # warm up: every worker's first settlement
        paid_sends.sequential(prepare, server.url, texts(f"{stamp}-warm", 4), fund(lab.chain, 4))
    for number in range(rounds):
        for who, server, prepare in alternate(pairs, number):
            payers = fund(lab.chain, sends)
            results = paid_sends.sequential(
                prepare, server.url, texts(f"{stamp}-{number}-{who}", sends), payers
            )
            latencies = [r.latency for r in results if r.transaction]
            figure.failures[who] += [r.error for r in results if not r.transaction]
            if latencies:
                figure.rates[who].append(1 / statistics.mean(latencies))
                figure.p50_ms[who].append(1000 * paid_sends.percentile(latencies, 50))
                figure.p90_ms[who].append(1000 * paid_sends.percentile(latencies, 90))
        print(f"paid round {number + 1}/{rounds} done", file=sys.stderr)
    return figure


# --- twenty payers on 1 s blocks -------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Paid requests sent together: where and when they settled."""

    blocks: int
    spread_ms: float
    p50_blocks: float
    settled: int
    failures: list[str]


def run_batch(lab: Lab, server: Server, prepare: paid_sends.Prepare, count: int, tag: str) -> Batch:
    """``count`` fresh payers sign first, then their paid requests go out together."""
    payers = fund(lab.block_chain, count)
    payments = [
        prepare(server.url, text, payer)
        for text, payer in zip(texts(tag, count), payers, strict=True)
    ]
    results = paid_sends.concurrent(payments)
    failures = [r.error for r in results if not r.transaction]
    settled = [r.transaction for r in results if r.transaction]
    blocks, broadcasts = where_and_when(lab, settled, failures)
    spread = 1000 * (max(broadcasts) - min(broadcasts)) if broadcasts else float("nan")
    latencies = [r.latency for r in results if r.transaction]
    p50 = paid_sends.percentile(latencies, 50) / BLOCK_TIME
    return Batch(len(blocks), spread, p50, len(settled), failures)


def where_and_when(
    lab: Lab, transactions: list[str], failures: list[str]
) -> tuple[set[int], list[float]]:
    """The blocks holding ``transactions`` and the moments they were broadcast; a reverted
    or unseen transaction is added to ``failures``."""
    blocks: set[int] = set()
    broadcasts = []
    for tx in transactions:
        receipt = lab.block_chain.w3.eth.wait_for_transaction_receipt(HexStr(tx), timeout=120)
        if receipt["status"] != 1:
            failures.append(f"reverted {tx}")
        blocks.add(int(receipt["blockNumber"]))
        seen = lab.proxy.broadcasts.get(tx)
        if seen is None:
            failures.append(f"{tx} never went through the proxy")
        else:
            broadcasts.append(seen)
    return blocks, broadcasts


def run_payers(lab: Lab, rounds: int, count: int) -> dict[str, list[Batch]]:
    batches: dict[str, list[Batch]] = {w: [] for w in WHO}
    pairs = [
        ("relay", lab.block_relay, paid_sends.prepare_relay),
        ("anchor", lab.block_sdk, paid_sends.prepare_anchor),
    ]
    stamp = f"{time.time_ns():x}"
    for _, server, prepare in pairs:  # warm up both workers
        run_batch(lab, server, prepare, 4, f"{stamp}-warm")
    for number in range(rounds):
        for who, server, prepare in alternate(pairs, number):
            batches[who].append(run_batch(lab, server, prepare, count, f"{stamp}-{number}-{who}"))
        print(f"payers round {number + 1}/{rounds} done", file=sys.stderr)
    return batches


# --- fifty quotes of one new text ------------------------------------------------------


def quote_together(url: str, text: str, clients: int) -> None:
    """``clients`` threads POST /api/quote of ``text`` at once; all must be 200."""
    barrier = threading.Barrier(clients)

    def one(_: int) -> int:
        barrier.wait()
        body = {"message": text, "to": US}
        return requests.post(f"{url}/api/quote", json=body, timeout=60).status_code

    with ThreadPoolExecutor(max_workers=clients) as pool:
        statuses = list(pool.map(one, range(clients)))
    if set(statuses) != {200}:
        raise wrk_runs.UnexpectedAnswers(f"concurrent quotes: expected only 200, got {statuses}")


def run_herd(lab: Lab, rounds: int, clients: int) -> list[int]:
    """Model calls per round of ``clients`` concurrent quotes of a brand-new text."""
    stamp = f"{time.time_ns():x}"
    quote_together(lab.gemini_relay.url, f"Your order {stamp}-warm has shipped", clients)
    calls = []
    for number in range(rounds):
        before = lab.gemini.request_count
        quote_together(lab.gemini_relay.url, f"Your order {stamp}-{number} has shipped", clients)
        calls.append(lab.gemini.request_count - before)
    print("concurrent quotes done", file=sys.stderr)
    return calls


# --- the printout ----------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    figure: str
    relay: str
    anchor: str
    ratio: str
    goal: str
    met: bool | None


@dataclass
class Results:
    wrk: list[WrkCase] = field(default_factory=list)
    paid: PaidFigure | None = None
    payers: dict[str, list[Batch]] | None = None
    herd: list[int] | None = None
    rss: dict[str, float] = field(default_factory=dict)
    profiles: list[tuple[WrkCase, pyspy_profile.Profile]] = field(default_factory=list)


def spread(values: list[float], digits: int = 1, ends: int = 0) -> str:
    """The median with ``digits`` decimals, then (min-max) with ``ends`` decimals."""
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{statistics.median(values):.{digits}f} ({low:.{ends}f}-{high:.{ends}f})"


def median_ratio(relay: list[float], anchor: list[float]) -> float | None:
    if not relay or not anchor or statistics.median(anchor) == 0:
        return None
    return statistics.median(relay) / statistics.median(anchor)


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


#: wrk path -> (least ratio relay / anchor, what the anchor is)
WRK_GOALS = {
    "402": (1.5, "SDK"),
    "probe": (0.8, "bare Flask"),
    "quote-cached": (0.5, "bare Flask"),
    "quote-new": (0.2, "bare Flask"),
}


def wrk_rows(cases: list[WrkCase]) -> list[Row]:
    rows = []
    for case in cases:
        ratio = median_ratio(case.rates["relay"], case.rates["anchor"])
        least, anchor = WRK_GOALS[case.key]
        met = None if ratio is None else ratio >= least
        rows.append(
            Row(
                f"{case.title}, req/s",
                spread(case.rates["relay"]),
                spread(case.rates["anchor"]),
                ratio_text(ratio),
                f">= {least:.1f}x {anchor}",
                met,
            )
        )
    return rows


def paid_rows(paid: PaidFigure) -> list[Row]:
    ratio = median_ratio(paid.rates["relay"], paid.rates["anchor"])
    p50 = median_ratio(paid.p50_ms["relay"], paid.p50_ms["anchor"])
    return [
        Row(
            "paid send, automine, sends/s",
            spread(paid.rates["relay"], 2, 2),
            spread(paid.rates["anchor"], 2, 2),
            ratio_text(ratio),
            ">= 1.2x SDK",
            None if ratio is None else ratio >= 1.2,
        ),
        Row(
            "paid send, automine, p50 ms",
            spread(paid.p50_ms["relay"]),
            spread(paid.p50_ms["anchor"]),
            ratio_text(p50),
            "",
            None,
        ),
        Row(
            "paid sends/s vs SDK on the relay's facilitator",
            spread(paid.rates["relay"], 2, 2),
            spread(paid.rates["hybrid"], 2, 2),
            ratio_text(median_ratio(paid.rates["relay"], paid.rates["hybrid"])),
            "(the ledger's cost)",
            None,
        ),
    ]


def payers_rows(batches: dict[str, list[Batch]], count: int) -> list[Row]:
    def values(who: str, name: str) -> list[float]:
        return [getattr(b, name) for b in batches[who]]

    def row(title: str, name: str, digits: tuple[int, int], goal: str, limit: float | None) -> Row:
        relay, anchor = values("relay", name), values("anchor", name)
        met = None if limit is None or not relay else statistics.median(relay) <= limit
        return Row(
            title,
            spread(relay, *digits),
            spread(anchor, *digits),
            ratio_text(median_ratio(relay, anchor)),
            goal,
            met,
        )

    return [
        row(f"{count} payers, 1 s blocks: blocks used", "blocks", (1, 0), "", None),
        row(f"{count} payers: broadcast spread, ms", "spread_ms", (0, 0), "<= 150 ms", 150),
        row(f"{count} payers: paid p50, block times", "p50_blocks", (2, 2), "<= 1.05", 1.05),
    ]


def herd_row(calls: list[int], clients: int) -> Row:
    value = f"{statistics.median(calls):g} (max {max(calls)})"
    return Row(
        f"{clients} quotes of one new text: model calls", value, "-", "-", "1", max(calls) == 1
    )


def rss_row(rss: dict[str, float]) -> Row | None:
    if "relay" not in rss or "x402 SDK middleware" not in rss:
        return None
    relay, sdk = rss["relay"], rss["x402 SDK middleware"]
    ratio = relay / sdk
    return Row(
        "RSS master + 2 workers, MB",
        f"{relay:.1f}",
        f"{sdk:.1f}",
        ratio_text(ratio),
        "<= 1.2x SDK",
        ratio <= 1.2,
    )


def print_details(results: Results, args: argparse.Namespace) -> None:
    print()
    if results.wrk:
        head = f"{'path':40} {'relay req/s':>22} {'anchor req/s':>22} {'ratio':>7}"
        print(f"{head}  CPU ms/req relay / anchor")
        for case in results.wrk:
            ratio = median_ratio(case.rates["relay"], case.rates["anchor"])
            cpu_relay, cpu_anchor = (statistics.median(case.cpu[who]) for who in WHO)
            relay, anchor = (spread(case.rates[who]) for who in WHO)
            print(
                f"{case.title:40} {relay:>22} {anchor:>22} {ratio_text(ratio):>7}"
                f"  {cpu_relay:.2f} / {cpu_anchor:.2f}  (anchor: {case.anchor.name})"
            )
        print()
    if results.paid is not None:
        print_paid(results.paid, args.paid_sends)
    if results.payers is not None:
        print_payers(results.payers)
    if results.herd is not None:
        title = f"{args.herd_clients} concurrent quotes of one new text"
        print(f"{title}, model calls per round: {results.herd}\n")
    for name, size in results.rss.items():
        print(f"RSS master + 2 workers, {name:34} {size:7.1f} MB")
    if results.profiles:
        print_profiles(results.profiles)


def print_paid(paid: PaidFigure, sends: int) -> None:
    for who in PAID_WHO:
        rates = ", ".join(f"{r:.2f}" for r in paid.rates[who])
        p50s = ", ".join(f"{p:.0f}" for p in paid.p50_ms[who])
        p90s = ", ".join(f"{p:.0f}" for p in paid.p90_ms[who])
        title = f"paid send, automine, {sends} in a row, {who:6}"
        print(f"{title}: sends/s per round {rates}; p50 ms {p50s}; p90 ms {p90s}")
        for failure in paid.failures[who][:5]:
            print(f"  failed: {failure}")
    print()


def print_payers(batches: dict[str, list[Batch]]) -> None:
    for who in WHO:
        for number, batch in enumerate(batches[who], 1):
            print(
                f"payers on 1 s blocks, {who:6} round {number}: {batch.settled} settled in "
                f"{batch.blocks} blocks, broadcast spread {batch.spread_ms:.0f} ms, "
                f"p50 {batch.p50_blocks:.2f} block times"
                + (f", {len(batch.failures)} failed" if batch.failures else "")
            )
            for failure in batch.failures[:5]:
                print(f"  failed: {failure}")
    print()


def print_profiles(profiles: list[tuple[WrkCase, pyspy_profile.Profile]]) -> None:
    print()
    for case, profile in profiles:
        views = ", ".join(profile.views) or "no view"
        share = profile.in_view / max(profile.busy, 1)
        print(f"profile, {case.title}: {profile.in_view} samples in {views}", end="")
        print(f" ({share:.0%} of all samples taken)")
        for fraction, label in profile.top(5):
            print(f"  {100 * fraction:5.1f}%  {label}")
        print("  running (self time, share of all samples):")
        for fraction, label in profile.top_running(5):
            print(f"  {100 * fraction:5.1f}%  {label}")


def print_table(rows: list[Row]) -> None:
    header = Row("figure", "relay", "anchor", "ratio", "goal", None)
    cells = [[r.figure, r.relay, r.anchor, r.ratio, r.goal, met_text(r.met)] for r in rows]
    head = [header.figure, header.relay, header.anchor, header.ratio, header.goal, "met"]
    widths = [max(len(line[i]) for line in [head, *cells]) for i in range(len(head))]
    print()
    for line in [head, *cells]:
        first = line[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(line[1:4], widths[1:4], strict=True)]
        print("  ".join([first, *rest, line[4].ljust(widths[4]), line[5]]).rstrip())


def met_text(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "NO")


def rows_of(results: Results, args: argparse.Namespace) -> list[Row]:
    rows = wrk_rows(results.wrk)
    if results.paid is not None:
        rows += paid_rows(results.paid)
    if results.payers is not None:
        rows += payers_rows(results.payers, args.payers)
    if results.herd:
        rows.append(herd_row(results.herd, args.herd_clients))
    rss = rss_row(results.rss)
    if rss is not None:
        rows.append(rss)
    return rows


# --- the command -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="wrk rounds (5)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    parser.add_argument(
        "--paid-rounds", type=int, default=3, help="rounds of sequential paid sends (3)"
    )
    parser.add_argument("--paid-sends", type=int, default=30, help="paid sends per round (30)")
    parser.add_argument("--payers", type=int, default=20, help="payers paying at once (20)")
    parser.add_argument("--payer-rounds", type=int, default=2, help="rounds of them (2)")
    parser.add_argument(
        "--herd-clients", type=int, default=50, help="concurrent quotes of one new text (50)"
    )
    parser.add_argument(
        "--herd-rounds", type=int, default=5, help="rounds of them, a new text each (5)"
    )
    parser.add_argument(
        "--only",
        default=",".join(FIGURES),
        help=f"figures to run, comma-separated, of: {','.join(FIGURES)}",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile each relay wrk path with py-spy"
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figures {unknown}; choose from {','.join(FIGURES)}")
    return args


def measure_all(lab: Lab, args: argparse.Namespace) -> Results:
    results = Results()
    results.wrk = wrk_cases(lab, args.only)
    run_wrk(results.wrk, args.rounds, args.seconds, args.connections)
    if "paid" in args.only:
        results.paid = run_paid(lab, args.paid_rounds, args.paid_sends)
    if "payers" in args.only:
        results.payers = run_payers(lab, args.payer_rounds, args.payers)
    if "herd" in args.only:
        results.herd = run_herd(lab, args.herd_rounds, args.herd_clients)
    results.rss = {server.name: server.rss_mb() for server in lab.servers}
    if args.profile:
        results.profiles = profile_cases(results.wrk, args.seconds, args.connections, lab.scratch)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    if args.profile and not Path(venv_tool("py-spy")).exists():
        print("--profile needs py-spy in this Python's environment", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so every server, chain and fake is stopped either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    redis.Redis.from_url(RATE_LIMIT_STORAGE_URL).flushdb()
    try:
        with ExitStack() as stack:
            lab = Lab(stack, scratch)
            lab.start(args.only)
            results = measure_all(lab, args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_details(results, args)
    print_table(rows_of(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
