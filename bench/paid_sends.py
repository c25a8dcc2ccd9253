"""Paid requests for bench/compare.py, signed with the x402 SDK's own client.

A payment is prepared first (outside any timing): for the relay a quote, the 402 of
``POST /api/send`` with its quote token, and the signature; for the SDK anchor the 402 of
``POST /paid`` and the signature. Only the paid request itself is timed, alone
(``sequential``) or with the others fired together behind a barrier (``concurrent``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests
from eth_account.signers.local import LocalAccount
from x402.http import decode_payment_response_header

from bench.anchors import PAID_PATH
from tests.x402_helpers import pay

US = "+13012576365"
HTTP_TIMEOUT = 120


@dataclass(frozen=True)
class Payment:
    """A signed paid request, ready to go."""

    url: str
    body: dict[str, Any]
    signature: str


@dataclass(frozen=True)
class Paid:
    """How one paid request went: its latency and settlement, or what went wrong."""

    latency: float
    transaction: str | None
    error: str = ""


#: Prepares the payment of one text by one payer against a server's base URL.
Prepare = Callable[[str, str, LocalAccount], Payment]


def expect(answer: requests.Response, status: int, what: str) -> requests.Response:
    if answer.status_code != status:
        raise RuntimeError(f"{what}: expected {status}, got {answer.status_code}: {answer.text}")
    return answer


def signed(url: str, body: dict[str, Any], payer: LocalAccount) -> Payment:
    """The 402 challenge for ``body`` at ``url``, signed by ``payer``."""
    answer = expect(requests.post(url, json=body, timeout=HTTP_TIMEOUT), 402, f"POST {url}")
    return Payment(url, body, pay(answer.headers["PAYMENT-REQUIRED"], payer.key.hex()))


def prepare_relay(base_url: str, text: str, payer: LocalAccount) -> Payment:
    """A quote of ``text``, then the 402 of its quoted send, signed."""
    body = {"message": text, "to": US}
    quote = requests.post(f"{base_url}/api/quote", json=body, timeout=HTTP_TIMEOUT)
    token = expect(quote, 200, "POST /api/quote").json()["quote_token"]
    return signed(f"{base_url}/api/send", dict(body, quote_token=token), payer)


def prepare_anchor(base_url: str, text: str, payer: LocalAccount) -> Payment:
    """The 402 of the SDK middleware's paid route, signed."""
    return signed(f"{base_url}{PAID_PATH}", {"message": text, "to": US}, payer)


def send(payment: Payment) -> Paid:
    """Send one paid request and time it."""
    start = time.monotonic()
    try:
        answer = requests.post(
            payment.url,
            json=payment.body,
            headers={"PAYMENT-SIGNATURE": payment.signature},
            timeout=HTTP_TIMEOUT,
        )
    except requests.RequestException as exc:
        return Paid(time.monotonic() - start, None, repr(exc))
    latency = time.monotonic() - start
    if answer.status_code != 200:
        return Paid(latency, None, f"{answer.status_code} {answer.text[:200]}")
    return Paid(latency, settlement_of(answer))


def settlement_of(answer: requests.Response) -> str | None:
    """The settlement transaction: the PAYMENT-RESPONSE header, else the JSON's."""
    header = answer.headers.get("PAYMENT-RESPONSE")
    if header:
        return str(decode_payment_response_header(header).transaction).lower()
    transaction = answer.json().get("transaction")
    return str(transaction).lower() if transaction else None


def sequential(
    prepare: Prepare, base_url: str, texts: list[str], payers: list[LocalAccount]
) -> list[Paid]:
    """One paid request after the other, each prepared just before it is sent."""
    return [send(prepare(base_url, text, payer)) for text, payer in zip(texts, payers, strict=True)]


def concurrent(payments: list[Payment]) -> list[Paid]:
    """All paid requests at once: one thread each, released together by a barrier."""
    barrier = threading.Barrier(len(payments))

    def one(payment: Payment) -> Paid:
        barrier.wait()
        return send(payment)

    with ThreadPoolExecutor(max_workers=len(payments)) as pool:
        return list(pool.map(one, payments))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]
