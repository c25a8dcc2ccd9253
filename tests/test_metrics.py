"""GET /metrics: the real app scraped and parsed with prometheus_client's own parser, after
real quotes, paid sends on the local chain, refunds and reconciler passes; and `relay
serve` and the Procfile's web line with two workers whose counters add up."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics
from relay.app import create_app
from relay.dev.chain import DevChain
from relay.ledger import Ledger
from relay.pricing import moderation_cost, round_usd, token_prices
from relay.services import build_services
from relay.settings import Settings
from relay.states import PaymentState
from relay.worker import Worker
from tests.conftest import (
    KNOWN_SECRETS,
    PAY_TO,
    SINCH_PLAN,
    SINCH_TOKEN,
    Wallet,
    new_wallet,
    rewind_payment,
    services_of,
    sinch_overrides,
)
from tests.fake_gemini import FAKE_API_KEY, FakeGemini
from tests.fake_sinch import FakeSinch
from tests.processes import REPO, RelayProcess, free_port, procfile, wait_until_up
from tests.x402_helpers import pay

TOKEN = "metrics-token-0123456789abcdef"
KNOWN_SECRETS.add(TOKEN)  # the log guard fails any test whose logs show it
AUTH = {"Authorization": f"Bearer {TOKEN}"}
US = "+13012576365"
BODY = {"message": "Your order has shipped", "to": US}
PRICE = 50_000  # rules moderation: one segment, no token cost

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client: FlaskClient) -> Samples:
    response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type == "text/plain; version=0.0.4; charset=utf-8"
    return parse(response.get_data(as_text=True))


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value (0 when absent: a counter not moved yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def make_app(settings: Settings) -> Flask:
    return create_app(services=build_services(settings))


def paid(client: FlaskClient, body: Any, key: str) -> Any:
    """The unpaid 402, then the same request paid the way a stock v2 client pays."""
    challenge = client.post("/api/send", json=body)
    assert challenge.status_code == 402, challenge.get_data(as_text=True)
    signature = pay(challenge.headers["PAYMENT-REQUIRED"], key)
    return client.post("/api/send", json=body, headers={"PAYMENT-SIGNATURE": signature})


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> FlaskClient:
    return make_app(make_settings(metrics_token=TOKEN)).test_client()


# Protection --------------------------------------------------------------------------------


def test_without_a_token_there_is_no_metrics_endpoint(
    make_settings: Callable[..., Settings],
) -> None:
    response = make_app(make_settings()).test_client().get("/metrics", headers=AUTH)
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"


@pytest.mark.parametrize(
    "authorization",
    [None, "", TOKEN, f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"bearer{TOKEN}", "Basic x"],
)
def test_the_bearer_token_is_required(client: FlaskClient, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert b"relay_" not in response.data


def test_the_token_is_a_secret_never_logged(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(metrics_token=TOKEN)
    assert TOKEN in settings.secrets() and TOKEN not in repr(settings)
    client = make_app(settings).test_client()
    caplog.set_level(logging.DEBUG)
    assert client.get("/metrics", headers=AUTH).status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    logging.getLogger("relay.test").warning("a careless line with %s", TOKEN)
    assert caplog.records and TOKEN not in caplog.text
    assert "a careless line with ***" in caplog.text


def test_a_short_token_is_refused_at_start_up(make_settings: Callable[..., Settings]) -> None:
    problems = dataclasses.replace(make_settings(), metrics_token="short").problems()
    assert problems == ["METRICS_TOKEN must be at least 16 characters when set"]


def test_scrapes_never_count_against_the_rate_limit(
    make_settings: Callable[..., Settings],
) -> None:
    client = make_app(make_settings(metrics_token=TOKEN, quote_rate_limit="1/minute")).test_client()
    for _ in range(5):
        scrape(client)
    assert client.post("/api/quote", json=BODY).status_code == 200
    assert client.post("/api/quote", json=BODY).status_code == 429  # the limit does work


# Requests ----------------------------------------------------------------------------------


def test_requests_are_counted_by_url_rule_and_code_never_by_path(client: FlaskClient) -> None:
    before = scrape(client)
    assert client.get("/api/messages/idsecret0123456789").status_code == 404
    assert client.post("/webhooks/sinch/hooksecret0123456789", json={}).status_code == 404
    assert client.get("/no/such/pathsecret0123").status_code == 404
    assert client.get("/api/pricing").status_code == 200
    response = client.get("/metrics", headers=AUTH)
    after = parse(response.get_data(as_text=True))
    name = "relay_http_requests_total"
    assert moved(before, after, name, route="/api/messages/<message_id>", code="404") == 1
    assert moved(before, after, name, route="/webhooks/sinch/<secret>", code="404") == 1
    assert moved(before, after, name, route="unmatched", code="404") == 1
    assert moved(before, after, name, route="/api/pricing", code="200") == 1
    assert moved(before, after, "relay_http_request_duration_seconds_count", route="/api/pricing")
    assert b"secret0123" not in response.data
    routes = {
        dict(labels)["route"]
        for (name, labels), count in after.items()
        if name == "relay_http_requests_total" and count != value(before, name, **dict(labels))
    }
    assert routes == {
        "/api/messages/<message_id>",
        "/webhooks/sinch/<secret>",
        "unmatched",
        "/api/pricing",
        "/metrics",  # the first scrape
    }


# Moderation --------------------------------------------------------------------------------


def test_a_quote_counts_the_model_call_its_cost_and_then_a_cache_hit(
    make_settings: Callable[..., Settings],
) -> None:
    with FakeGemini() as gemini:
        settings = make_settings(
            metrics_token=TOKEN,
            moderation_provider="gemini",
            gemini_api_key=FAKE_API_KEY,
            gemini_base_url=gemini.url,
        )
        client = make_app(settings).test_client()
        before = scrape(client)
        first = client.post("/api/quote", json=BODY).get_json()
        second = client.post("/api/quote", json=BODY).get_json()
        after = scrape(client)
    model = "gemini-2.5-flash"
    usage = first["moderation_usage"]
    assert usage["cached"] is False and second["moderation_usage"]["cached"] is True
    assert moved(before, after, "relay_model_calls_total", model=model, decision="approved") == 1
    assert moved(before, after, "relay_model_cache_hits_total", model=model) == 1
    exact = moderation_cost(
        token_prices(model), usage["input_tokens"], usage["output_tokens"], usage["thinking_tokens"]
    )
    assert round_usd(exact) == Decimal(str(first["moderation_cost_usd"])) > 0  # what was charged
    cost = moved(before, after, "relay_model_cost_usd_total", model=model)
    assert cost == pytest.approx(float(exact), rel=1e-9)
    for kind in ("input", "output", "thinking"):
        tokens = moved(before, after, "relay_model_tokens_total", model=model, kind=kind)
        assert tokens == usage[f"{kind}_tokens"]
    assert moved(before, after, "relay_http_requests_total", route="/api/quote", code="200") == 2


def test_moderation_without_a_verdict_is_counted_by_code(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        metrics_token=TOKEN,
        moderation_provider="gemini",
        gemini_api_key=FAKE_API_KEY,
        gemini_base_url=f"http://127.0.0.1:{free_port()}",  # nobody listens
        gemini_timeout_seconds=1.0,
        gemini_max_attempts=1,
    )
    client = make_app(settings).test_client()
    before = scrape(client)
    assert client.post("/api/quote", json=BODY).status_code == 503
    after = scrape(client)
    assert moved(before, after, "relay_model_errors_total", code="moderation_unavailable") == 1


# Paid sends on the chain -------------------------------------------------------------------


def test_a_paid_send_moves_settlement_dispatch_and_payment_counters(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    client = make_app(paid_settings(metrics_token=TOKEN)).test_client()
    before = scrape(client)
    assert paid(client, BODY, payer.key).status_code == 200
    after = scrape(client)
    assert moved(before, after, "relay_settlement_duration_seconds_count", outcome="ok") == 1
    assert moved(before, after, "relay_settlement_duration_seconds_sum", outcome="ok") > 0
    assert moved(before, after, "relay_dispatch_duration_seconds_count", outcome="ok") == 1
    assert moved(before, after, "relay_payments_finished_total", state="dispatched") == 1
    send = "/api/send"
    assert moved(before, after, "relay_http_requests_total", route=send, code="402") == 1
    assert moved(before, after, "relay_http_requests_total", route=send, code="200") == 1


def test_a_refund_is_counted_with_the_provider_failure(
    paid_settings: Callable[..., Settings], chain: DevChain, payer: Wallet
) -> None:
    refunder = new_wallet(chain, 5_000_000)
    chain.set_eth_balance(refunder.address, 10**18)
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        settings = paid_settings(
            metrics_token=TOKEN, refund_private_key=refunder.key, **sinch_overrides(fake.base_url)
        )
        client = make_app(settings).test_client()
        before = scrape(client)
        fake.script({"status": 400, "code": "syntax_invalid_parameter_format", "text": "bad"})
        response = paid(client, BODY, payer.key)
        after = scrape(client)
    assert response.status_code == 502
    assert response.get_json()["refund"]["state"] == "confirmed"
    assert moved(before, after, "relay_sms_failures_total", kind="refused") == 1
    assert moved(before, after, "relay_dispatch_duration_seconds_count", outcome="error") == 1
    assert moved(before, after, "relay_refunds_total", state="signed") == 1
    assert moved(before, after, "relay_refunds_total", state="confirmed") == 1
    assert moved(before, after, "relay_refunded_usdc_atomic_total") == PRICE
    assert moved(before, after, "relay_payments_finished_total", state="refunded") == 1
    assert value(after, "relay_payments", state="refunded") == 0  # kept from the first scrape
    fresh = scrape(make_app(settings).test_client())
    assert value(fresh, "relay_payments", state="refunded") == 1


@contextmanager
def apps_on(settings: Settings) -> Iterator[Callable[[], Flask]]:
    """A maker of apps on these settings (each a fresh process: nothing cached); their
    database connections are closed at the end."""
    made: list[Flask] = []

    def make() -> Flask:
        made.append(make_app(settings))
        return made[-1]

    try:
        yield make
    finally:
        for app in made:
            services_of(app).ledger.engine.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_payments_by_state_and_reconciler_lag_come_from_the_ledger(
    paid_settings: Callable[..., Settings],
    chain: DevChain,
    payer: Wallet,
    database: str,
    request: pytest.FixtureRequest,
) -> None:
    on = {"database_url": request.getfixturevalue("pg_url")} if database == "postgresql" else {}
    if on:
        Ledger.upgrade_database(on["database_url"])
    with apps_on(paid_settings(metrics_token=TOKEN, **on)) as new_app:
        app = new_app()
        assert paid(app.test_client(), BODY, payer.key).status_code == 200
        services = services_of(app)
        (payment,) = services.ledger.list_payments()
        # A crash after the hand-over: unfinished, nobody holding it, two minutes old.
        rewind_payment(services, payment.id, state="dispatching", created_at=time.time() - 120)
        crashed = scrape(new_app().test_client())
        in_ledger = Counter(str(p.state) for p in services.ledger.list_payments())
        assert Worker(services).run_once() == {payment.id: "dispatched"}
        repaired = scrape(new_app().test_client())
    assert in_ledger == {"dispatching": 1}
    for state in PaymentState:
        assert value(crashed, "relay_payments", state=state.value) == in_ledger[state.value]
    assert value(crashed, "relay_unfinished_payment_age_seconds") == pytest.approx(120, abs=10)
    assert math.isnan(value(crashed, "relay_reconciler_last_pass_age_seconds"))
    assert value(repaired, "relay_payments", state="dispatching") == 0
    assert value(repaired, "relay_payments", state="dispatched") == 1
    assert value(repaired, "relay_unfinished_payment_age_seconds") == 0
    assert 0 <= value(repaired, "relay_reconciler_last_pass_age_seconds") < 10


# Gas balances ------------------------------------------------------------------------------


def test_gas_balances_are_the_chains(
    paid_settings: Callable[..., Settings], chain: DevChain
) -> None:
    refunder = new_wallet(chain)
    chain.set_eth_balance(refunder.address, 3 * 10**17 + 12345)
    settings = paid_settings(metrics_token=TOKEN, refund_private_key=refunder.key)
    samples = scrape(make_app(settings).test_client())
    settler = chain.accounts[0].address
    for wallet, address in (("settler", settler), ("refund", refunder.address)):
        wei = chain.w3.eth.get_balance(address)
        expected = float(Decimal(wei) / 10**18)
        assert value(samples, "relay_wallet_gas_balance_eth", wallet=wallet) == expected
    assert value(samples, "relay_wallet_gas_balance_eth", wallet="refund") == 0.300000000000012345


def test_without_wallets_of_ours_no_gas_is_reported(client: FlaskClient) -> None:
    assert not any(name == "relay_wallet_gas_balance_eth" for name, _ in scrape(client))


@contextmanager
def silent_rpc() -> Iterator[str]:
    """An RPC URL whose server takes connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_a_dead_rpc_never_hangs_a_scrape(
    make_settings: Callable[..., Settings], chain: DevChain
) -> None:
    with silent_rpc() as rpc_url:
        settings = make_settings(
            metrics_token=TOKEN,
            facilitator="local",
            rpc_url=rpc_url,
            settler_private_key=chain.accounts[0].private_key,
            refund_private_key=new_wallet(chain).key,
        )
        client = make_app(settings).test_client()
        before = scrape(client)  # the first scrape of this app waits for the chain once
        started = time.monotonic()
        again = scrape(make_app(settings).test_client())
        took = time.monotonic() - started
        cached_started = time.monotonic()
        cached = scrape(client)
        cached_took = time.monotonic() - cached_started
    assert took < 2 * metrics.CHAIN_TIMEOUT_SECONDS + 1
    assert cached_took < 1
    for samples in (before, again):
        for wallet in ("settler", "refund"):
            assert math.isnan(value(samples, "relay_wallet_gas_balance_eth", wallet=wallet))
        assert value(samples, "relay_payments", state="dispatched") == 0  # the ledger still read
    # One failure a read (the second wallet is not asked once the chain is down)...
    assert moved(before, again, "relay_metrics_read_failures_total", source="chain") == 1
    # ...and none while the gauges are cached.
    assert moved(again, cached, "relay_metrics_read_failures_total", source="chain") == 0


# Several processes -------------------------------------------------------------------------


def base_env(tmp_path: Path) -> dict[str, str]:
    return {
        "QUOTE_SECRET": "metrics-test-quote-secret-0123456789",
        "PAY_TO_ADDRESS": PAY_TO,
        "MODERATION_PROVIDER": "rules",
        "SMS_PROVIDER": "outbox",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'relay.db'}",
        "QUOTE_RATE_LIMIT": "10000/minute",
        "RPC_URL": "http://127.0.0.1:1",
        "METRICS_TOKEN": TOKEN,
    }


def quotes_per_process(directory: Path) -> dict[str, float]:
    """The quotes each process counted in its own file of the metrics directory."""
    counted = {}
    for path in directory.glob("counter_*.db"):
        for family in MultiProcessCollector.merge([str(path)], accumulate=False):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "relay_http_requests_total" and labels["route"] == "/api/quote":
                    counted[path.stem] = counted.get(path.stem, 0) + sample.value
    return counted


def quote_until_both_workers_served(url: str, directory: Path) -> int:
    """Quote in concurrent batches until two processes have counted some (for up to 30 s:
    on a loaded machine the second worker may still be starting while the first answers
    everything); how many were sent."""
    sent, deadline = 0, time.monotonic() + 30

    def quote(i: int) -> int:
        body = {"message": f"Metrics across workers {i}", "to": US}
        headers = {"Connection": "close"}
        return requests.post(url + "/api/quote", json=body, headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        while time.monotonic() < deadline:
            assert set(pool.map(quote, range(sent, sent + 24))) == {200}
            sent += 24
            if len(quotes_per_process(directory)) >= 2:
                return sent
    raise AssertionError(f"one worker served every quote: {quotes_per_process(directory)}")


def assert_scrapes_add_up(url: str, sent: int) -> None:
    """Whichever worker answers the scrape, it reports every worker's quotes."""
    for _ in range(6):
        answer = requests.get(url + "/metrics", headers={**AUTH, "Connection": "close"}, timeout=30)
        assert answer.status_code == 200, answer.text
        samples = parse(answer.text)
        assert value(samples, "relay_http_requests_total", route="/api/quote", code="200") == sent
        assert value(samples, "relay_model_calls_total", model="rules", decision="approved") == sent


def test_relay_serve_adds_up_two_workers_in_a_directory_of_its_own(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**base_env(tmp_path), "TMPDIR": str(scratch)}
    with RelayProcess(env, tmp_path / "relay.log", args=("--workers", "2")) as relay:
        (directory,) = scratch.glob("relay-metrics-*")
        sent = quote_until_both_workers_served(relay.url, directory)
        assert_scrapes_add_up(relay.url, sent)
    assert not directory.exists()  # removed when gunicorn stops


def test_the_procfile_web_line_adds_up_two_workers(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    port = free_port()
    env = {
        **base_env(tmp_path),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),  # this checkout, whatever is installed
        "HOME": str(tmp_path),
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }
    subprocess.run(
        [sys.executable, "-m", "relay.cli", "db", "upgrade"], env=env, cwd=tmp_path, check=True
    )
    web_line = procfile("web")
    with (tmp_path / "web.log").open("wb") as log:
        web = subprocess.Popen(
            web_line, shell=True, cwd=tmp_path, env=env, stderr=log, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, web)
        sent = quote_until_both_workers_served(url, directory)
        assert_scrapes_add_up(url, sent)
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(10)
    assert directory.is_dir()  # the operator's directory is left as it is
