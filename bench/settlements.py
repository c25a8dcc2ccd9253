"""Benchmark: how paid sends share blocks when many agents pay at once (SPEC §9).

    python bench/settlements.py [--payers N] [--block-time S] [--threads T] [--workers W]

Starts its own anvil with interval mining (``--block-time`` seconds per block) and one
`relay serve` process (FACILITATOR=local, rules moderation, outbox SMS, SQLite), then makes
N paid sends twice: all at once (N threads, payments signed beforehand) and one after the
other. It prints, side by side, settlements per block (N / distinct blocks used), paid-send
latency in block times (p50 / p95 of request latency divided by the block time), the wall
time, and the ratio concurrent / sequential. Everything it starts is stopped on exit.

Not part of the test suite; the assertion lives in tests/test_throughput.py.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import requests  # noqa: E402
from eth_account import Account  # noqa: E402
from eth_account.signers.local import LocalAccount  # noqa: E402
from eth_typing import HexStr  # noqa: E402

from relay.dev.chain import MINTER_ADDRESS, DevChain  # noqa: E402
from tests.processes import RelayProcess  # noqa: E402
from tests.x402_helpers import pay  # noqa: E402

US = "+13012576365"
FUNDS = 1_000_000
HTTP_TIMEOUT = 180


@dataclass
class Run:
    """The outcome of one batch of paid sends."""

    name: str
    payers: int
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    nonces_used: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def distinct_blocks(self) -> int:
        return len(set(self.blocks))

    @property
    def per_block(self) -> float:
        return len(self.blocks) / self.distinct_blocks if self.blocks else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def fund(chain: DevChain, count: int) -> list[LocalAccount]:
    """Fresh payers holding FUNDS USDC each, minted together."""
    wallets: list[LocalAccount] = [Account.create() for _ in range(count)]
    chain.rpc("anvil_impersonateAccount", MINTER_ADDRESS)
    try:
        hashes = [
            chain.token.functions.mint(w.address, FUNDS).transact({"from": MINTER_ADDRESS})
            for w in wallets
        ]
    finally:
        chain.rpc("anvil_stopImpersonatingAccount", MINTER_ADDRESS)
    for tx_hash in hashes:
        if chain.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)["status"] != 1:
            raise RuntimeError("mint reverted")
    return wallets


def relay_env(chain: DevChain, database: Path) -> dict[str, str]:
    return {
        "QUOTE_SECRET": "bench-settlements-secret-0123456789",
        "PAY_TO_ADDRESS": Account.create().address,
        "FACILITATOR": "local",
        "RPC_URL": chain.rpc_url,
        "SETTLER_PRIVATE_KEY": chain.accounts[0].private_key,
        "MODERATION_PROVIDER": "rules",
        "SMS_PROVIDER": "outbox",
        "DATABASE_URL": f"sqlite:///{database}",
        "QUOTE_RATE_LIMIT": "100000/minute",
    }


def signed_request(url: str, body: dict[str, Any], payer: LocalAccount) -> str:
    """Get the 402 challenge for ``body`` and sign it: the PAYMENT-SIGNATURE value."""
    answer = requests.post(url, json=body, timeout=HTTP_TIMEOUT)
    if answer.status_code != 402:
        raise RuntimeError(f"expected 402, got {answer.status_code}: {answer.text}")
    return pay(answer.headers["PAYMENT-REQUIRED"], payer.key.hex())


def paid_send(url: str, body: dict[str, Any], signature: str) -> tuple[float, str | None, str]:
    """(latency, transaction or None, error text) of one paid POST /api/send."""
    start = time.monotonic()
    try:
        answer = requests.post(
            url, json=body, headers={"PAYMENT-SIGNATURE": signature}, timeout=HTTP_TIMEOUT
        )
    except requests.RequestException as exc:
        return time.monotonic() - start, None, repr(exc)
    latency = time.monotonic() - start
    if answer.status_code != 200:
        return latency, None, f"{answer.status_code} {answer.text[:200]}"
    return latency, answer.json()["transaction"], ""


def settler_nonce(chain: DevChain) -> int:
    return chain.w3.eth.get_transaction_count(chain.accounts[0].address, "latest")


def record(chain: DevChain, run: Run, results: list[tuple[float, str | None, str]]) -> None:
    for latency, tx, error in results:
        run.latencies.append(latency)
        if tx is None:
            run.failures.append(error)
            continue
        receipt = chain.w3.eth.get_transaction_receipt(HexStr(tx))
        if receipt["status"] != 1:
            run.failures.append(f"reverted {tx}")
        run.blocks.append(receipt["blockNumber"])


def concurrent(chain: DevChain, url: str, payers: list[LocalAccount], tag: str) -> Run:
    run = Run("concurrent", len(payers))
    bodies = [{"message": f"Bench {tag} concurrent {i}", "to": US} for i in range(len(payers))]
    signatures = [signed_request(url, b, p) for b, p in zip(bodies, payers, strict=True)]
    before = settler_nonce(chain)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(payers)) as pool:
        results = list(
            pool.map(lambda i: paid_send(url, bodies[i], signatures[i]), range(len(payers)))
        )
    run.wall = time.monotonic() - start
    run.nonces_used = settler_nonce(chain) - before
    record(chain, run, results)
    return run


def sequential(chain: DevChain, url: str, payers: list[LocalAccount], tag: str) -> Run:
    run = Run("sequential", len(payers))
    before = settler_nonce(chain)
    results = []
    for i, payer in enumerate(payers):
        body = {"message": f"Bench {tag} sequential {i}", "to": US}
        signature = signed_request(url, body, payer)  # signed just in time; not timed
        results.append(paid_send(url, body, signature))
    run.wall = sum(latency for latency, _, _ in results)
    run.nonces_used = settler_nonce(chain) - before
    record(chain, run, results)
    return run


def table(con: Run, seq: Run, block_time: float) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "-"

    rows: list[tuple[str, float, float, str]] = [
        ("settlements per block", con.per_block, seq.per_block, "{:.2f}"),
        ("distinct blocks used", con.distinct_blocks, seq.distinct_blocks, "{:.0f}"),
        ("block span (max-min+1)", span(con), span(seq), "{:.0f}"),
        ("latency p50 (blocks)", p(con, 50) / block_time, p(seq, 50) / block_time, "{:.2f}"),
        ("latency p95 (blocks)", p(con, 95) / block_time, p(seq, 95) / block_time, "{:.2f}"),
        ("wall time (s)", con.wall, seq.wall, "{:.2f}"),
        ("wall time (blocks)", con.wall / block_time, seq.wall / block_time, "{:.2f}"),
        ("settler nonces used", con.nonces_used, seq.nonces_used, "{:.0f}"),
        ("failed sends", len(con.failures), len(seq.failures), "{:.0f}"),
    ]
    header = ("metric", "concurrent", "sequential", "conc/seq")
    lines = [[name, fmt.format(a), fmt.format(b), ratio(a, b)] for name, a, b, fmt in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]

    def render(cells: tuple[str, ...] | list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def span(run: Run) -> float:
    return max(run.blocks) - min(run.blocks) + 1 if run.blocks else math.nan


def p(run: Run, q: float) -> float:
    return percentile(run.latencies, q)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--payers", type=int, default=20, help="paid sends per batch (20)")
    parser.add_argument("--block-time", type=float, default=1.0, help="seconds per block (1)")
    parser.add_argument("--threads", type=int, default=32, help="relay serve --threads (32)")
    parser.add_argument(
        "--workers", type=int, default=2, help="relay serve --workers (2, as the Procfile)"
    )
    args = parser.parse_args(argv)
    if args.payers < 1 or args.block_time <= 0:
        parser.error("--payers must be >= 1 and --block-time > 0")
    # SIGTERM unwinds like Ctrl-C, so the relay and anvil are stopped either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with (
        tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp,
        DevChain.start(block_time=args.block_time) as chain,
    ):
        work = Path(tmp)
        payers = fund(chain, 2 * args.payers)
        env = relay_env(chain, work / "relay.db")
        relay = RelayProcess(
            env,
            work / "relay.log",
            args=("--threads", str(args.threads), "--workers", str(args.workers)),
        )
        try:
            relay.start()
            url = relay.url + "/api/send"
            tag = str(int(time.time()))
            con = concurrent(chain, url, payers[: args.payers], tag)
            seq = sequential(chain, url, payers[args.payers :], tag)
        except BaseException:
            print(relay.log(), file=sys.stderr)
            raise
        finally:
            relay.stop()

    print(
        f"{args.payers} payers, block time {args.block_time:g}s, "
        f"relay serve --threads {args.threads} --workers {args.workers} (SQLite)\n"
    )
    print(table(con, seq, args.block_time))
    for run in (con, seq):
        counts = {b: run.blocks.count(b) for b in sorted(set(run.blocks))}
        shown = ", ".join(f"#{b}: {n}" for b, n in counts.items())
        if len(counts) > 8:
            shown = f"{len(counts)} blocks #{min(counts)}..#{max(counts)}, at most "
            shown += f"{max(counts.values())} in one"
        print(f"\n{run.name} settlements per block: {shown}", end="")
    print()
    for run in (con, seq):
        for failure in run.failures[:5]:
            print(f"{run.name} failure: {failure}", file=sys.stderr)
    ok = not con.failures and not seq.failures
    ok = ok and con.nonces_used == con.payers and seq.nonces_used == seq.payers
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
