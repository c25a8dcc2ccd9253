"""Prometheus metrics at /metrics: counters and histograms the flows move as they go, and
gauges read from the ledger and the chain when scraped.

Under gunicorn every worker writes its counters to files in PROMETHEUS_MULTIPROC_DIR and a
scrape adds up every worker's files (prometheus_client's multiprocess mode, which the library
chooses when it is first imported: relay/gunicorn_conf.py sets the directory up before any
worker imports it). Labels are bounded: a route is its URL rule, never the path (paths hold
message ids and the webhook secret); no number, payer or id is ever a label.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING

from eth_account import Account
from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from relay.chain import gas_balance
from relay.errors import NotFound, RelayError, Unauthorized
from relay.ledger import RECONCILED_NOTICE
from relay.states import FINAL_STATES, UNFINISHED, PaymentState, RefundState

if TYPE_CHECKING:
    from relay.moderation import Verdict
    from relay.services import Services

log = logging.getLogger(__name__)

#: Gauges read from the ledger and the chain are kept this long: scrapes never hammer either.
CACHE_SECONDS = 5.0
#: The longest a scrape waits for the chain (one read: the first failure skips the rest).
CHAIN_TIMEOUT_SECONDS = 2.0
WEI_PER_ETH = Decimal(10**18)

REQUESTS = Counter(
    "relay_http_requests", "HTTP requests answered, by URL rule and status.", ["route", "code"]
)
REQUEST_SECONDS = Histogram(
    "relay_http_request_duration_seconds", "Time to answer an HTTP request.", ["route"]
)
PAYMENTS_FINISHED = Counter(
    "relay_payments_finished", "Payments that reached a final state.", ["state"]
)
SETTLEMENT_SECONDS = Histogram(
    "relay_settlement_duration_seconds",
    "Time to settle a payment on the chain (broadcast to receipt); outcome ok or the error code.",
    ["outcome"],
    buckets=(0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
)
DISPATCH_SECONDS = Histogram(
    "relay_dispatch_duration_seconds",
    "Time to hand a paid SMS to the provider, retries included; outcome ok or error.",
    ["outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
MODEL_CALLS = Counter(
    "relay_model_calls",
    "Moderation verdicts not served from the cache, by model (rules: the free local rules).",
    ["model", "decision"],
)
MODEL_CACHE_HITS = Counter(
    "relay_model_cache_hits", "Moderation verdicts served from the cache.", ["model"]
)
MODEL_COST = Counter("relay_model_cost_usd", "What the moderation calls cost, in USD.", ["model"])
MODEL_TOKENS = Counter(
    "relay_model_tokens", "Tokens of the moderation calls, by kind.", ["model", "kind"]
)
MODEL_ERRORS = Counter(
    "relay_model_errors", "Moderation that gave no verdict, by error code.", ["code"]
)
SMS_FAILURES = Counter(
    "relay_sms_failures",
    "Provider failures after payment: refused, unconfirmed (may have been sent), lookup.",
    ["kind"],
)
DELIVERY_REPORTS = Counter(
    "relay_sms_delivery_reports", "Delivery reports received, by status.", ["status"]
)
REFUNDS = Counter("relay_refunds", "Refunds that reached a state.", ["state"])
REFUNDED = Counter("relay_refunded_usdc_atomic", "USDC sent back by confirmed refunds (atomic).")
READ_FAILURES = Counter(
    "relay_metrics_read_failures",
    "Reads at scrape time that failed (their gauges are left out or NaN), by source.",
    ["source"],
)


# Hooks of the flows ----------------------------------------------------------------------


@contextmanager
def timed(histogram: Histogram) -> Iterator[None]:
    """Observe how long the block takes, with its outcome: ok, or the RelayError's code."""
    started, outcome = time.perf_counter(), "error"
    try:
        yield
        outcome = "ok"
    except RelayError as exc:
        outcome = exc.code
        raise
    finally:
        histogram.labels(outcome=outcome).observe(time.perf_counter() - started)


@contextmanager
def counted_errors(
    counter: Counter, *, unless: Callable[[], bool] = lambda: False
) -> Iterator[None]:
    """Count a RelayError raised by the block under its code, unless ``unless()`` says it
    is not the kind counted."""
    try:
        yield
    except RelayError as exc:
        if not unless():
            counter.labels(code=exc.code).inc()
        raise


def finished(state: str) -> None:
    """A payment moved to ``state``: counted when that state is final."""
    if state in FINAL_STATES:
        PAYMENTS_FINISHED.labels(state=state).inc()


def moderated(verdict: Verdict, cost: Decimal) -> None:
    """A verdict: a cache hit, or a model call with its tokens and cost."""
    model = verdict.model
    if verdict.cached:
        MODEL_CACHE_HITS.labels(model=model).inc()
        return
    MODEL_CALLS.labels(model=model, decision="approved" if verdict.approved else "rejected").inc()
    MODEL_COST.labels(model=model).inc(float(cost))
    MODEL_TOKENS.labels(model=model, kind="input").inc(verdict.input_tokens)
    MODEL_TOKENS.labels(model=model, kind="output").inc(verdict.output_tokens)
    MODEL_TOKENS.labels(model=model, kind="thinking").inc(verdict.thinking_tokens)


def refund_reached(state: str, amount_atomic: int) -> None:
    """A refund moved to ``state`` (the ledger's compare-and-set says it was ours)."""
    REFUNDS.labels(state=state).inc()
    if state == RefundState.CONFIRMED:
        REFUNDED.inc(amount_atomic)


# Gauges read at scrape time ----------------------------------------------------------------


class ScrapeGauges:
    """Payments by state, reconciler lag and gas balances, read when scraped and kept
    CACHE_SECONDS; a read that fails is counted, and its gauges left out or NaN."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._wallets = gas_wallets(services)
        self._lock = threading.Lock()
        self._read_at = -math.inf
        self._families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        """The gauges, read again once they are CACHE_SECONDS old."""
        with self._lock:
            if time.monotonic() - self._read_at >= CACHE_SECONDS:
                self._families = [*self._ledger_gauges(), *self._gas_gauges()]
                self._read_at = time.monotonic()
            families = self._families
        yield from families

    def _ledger_gauges(self) -> list[Metric]:
        ledger, now = self._services.ledger, self._services.clock()
        try:
            counts = ledger.payment_counts()
            oldest = ledger.oldest_unheld(UNFINISHED, now)
            passed = ledger.noted(RECONCILED_NOTICE)
        except Exception as exc:  # the ledger's health is /health's to report
            read_failed("ledger", exc)
            return []
        states = GaugeMetricFamily(
            "relay_payments", "Payments in each state, from the ledger.", labels=["state"]
        )
        for state in PaymentState:
            states.add_metric([state.value], counts.get(state.value, 0))
        waiting = GaugeMetricFamily(
            "relay_unfinished_payment_age_seconds",
            "Age of the oldest unfinished payment that nobody holds (0: none).",
            value=0.0 if oldest is None else now - oldest,
        )
        lag = GaugeMetricFamily(
            "relay_reconciler_last_pass_age_seconds",
            "Seconds since a reconciler last finished a pass (NaN: never).",
            value=math.nan if passed is None else now - passed,
        )
        return [states, waiting, lag]

    def _gas_gauges(self) -> list[Metric]:
        if not self._wallets:
            return []
        gauge = GaugeMetricFamily(
            "relay_wallet_gas_balance_eth",
            "ETH the settler and refund wallets hold for gas (NaN: the chain did not answer).",
            labels=["wallet"],
        )
        for wallet, balance in eth_balances(self._services.settings.rpc_url, self._wallets):
            gauge.add_metric([wallet], balance)
        return [gauge]


def gas_wallets(services: Services) -> dict[str, str]:
    """Our wallets that pay gas: the settler (FACILITATOR=local) and the refund wallet."""
    settings, wallets = services.settings, {}
    if settings.facilitator == "local" and settings.settler_private_key:
        wallets["settler"] = str(Account.from_key(settings.settler_private_key).address)
    if services.refunder is not None:
        wallets["refund"] = services.refunder.address
    return wallets


def eth_balances(rpc_url: str, wallets: dict[str, str]) -> list[tuple[str, float]]:
    """Each wallet's ETH; once a read fails the chain is taken as down and the rest are NaN."""
    found = dict.fromkeys(wallets, math.nan)
    try:
        for wallet, address in wallets.items():
            wei = gas_balance(rpc_url, address, CHAIN_TIMEOUT_SECONDS)
            found[wallet] = float(Decimal(wei) / WEI_PER_ETH)
    except Exception as exc:  # an RPC that is down or slow must not fail the scrape
        read_failed("chain", exc)
    return list(found.items())


def read_failed(source: str, exc: Exception) -> None:
    """Count a failed read (the error's type only: its text may hold an RPC key)."""
    READ_FAILURES.labels(source=source).inc()
    log.warning("metrics: could not read the %s (%s)", source, type(exc).__name__)


# The endpoint ----------------------------------------------------------------------------

blueprint = Blueprint("metrics", __name__)


def init_app(app: Flask) -> None:
    """Serve /metrics and count every answer of the app (call before other request hooks)."""
    app.extensions["relay_metrics"] = ScrapeGauges(app.extensions["relay"])
    app.register_blueprint(blueprint)
    app.before_request(_start_timer)
    app.after_request(_count_answer)


@blueprint.get("/metrics")
def scrape() -> Response:
    """Every metric in the Prometheus text format, for the holder of METRICS_TOKEN."""
    services: Services = current_app.extensions["relay"]
    check_token(services.settings.metrics_token, request.headers.get("Authorization", ""))
    registry = CollectorRegistry()
    # First, so that a failed read it counts is already in this scrape's counters.
    registry.register(current_app.extensions["relay_metrics"])
    if multiprocess():
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(REGISTRY)
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_PLAIN_0_0_4)


def check_token(expected: str | None, authorization: str) -> None:
    """404 unless METRICS_TOKEN is set; then 401 unless ``Bearer <token>`` (constant time)."""
    if not expected:
        raise NotFound()
    if not hmac.compare_digest(authorization.encode(), f"Bearer {expected}".encode()):
        raise Unauthorized(
            "Send Authorization: Bearer <METRICS_TOKEN>.",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )


def multiprocess() -> bool:
    """Whether prometheus_client keeps its values in PROMETHEUS_MULTIPROC_DIR (it decides
    when first imported)."""
    return values.ValueClass is not values.MutexValue


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _count_answer(response: Response) -> Response:
    """Count the answer under its URL rule ("unmatched" when no rule matched)."""
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    started = g.get("metrics_started")
    seconds = None if started is None else time.perf_counter() - started
    count_answer(route, response.status_code, seconds)
    return response


def count_answer(route: str, status: int, seconds: float | None) -> None:
    """Count one answer of ``route`` and, when timed, how long it took."""
    counted, timed = _answer_series(route, status)
    counted.inc()
    if seconds is not None:
        timed.observe(seconds)


@lru_cache(maxsize=1024)
def _answer_series(route: str, status: int) -> tuple[Counter, Histogram]:
    """The labelled series of a route and status, looked up once (a look-up by labels
    takes a lock and checks every label value, each time)."""
    return REQUESTS.labels(route=route, code=str(status)), REQUEST_SECONDS.labels(route=route)
