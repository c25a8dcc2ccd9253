"""relay.client against a real relay over HTTP, paying on the local chain."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from werkzeug.serving import make_server

from relay.app import create_app
from relay.client import POLL_FIRST_SECONDS, RelayClient, poll_until_final
from relay.dev.chain import DevChain
from relay.errors import (
    MessageTooLong,
    NotFound,
    PaymentTermsMismatch,
    PriceLimitExceeded,
    RateLimited,
    Rejected,
    RelayError,
)
from relay.services import Services, build_services
from relay.settings import Settings
from tests.conftest import SINCH_PLAN, SINCH_TOKEN, Wallet, sinch_overrides
from tests.fake_sinch import FakeSinch, delivery_report

US = "+13012576365"
PRICE = 50_000


class Served:
    """The real app on a local port, with its services."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.server = make_server("127.0.0.1", 0, create_app(services=services), threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve(paid_settings: Callable[..., Settings]) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(**overrides: object) -> Served:
        started.append(Served(build_services(paid_settings(**overrides))))
        return started[-1]

    yield start
    for served in started:
        served.stop()


class Recorder(httpx.Client):
    """An HTTP client that remembers every answer (to count the paid retries)."""

    def __init__(self) -> None:
        super().__init__(event_hooks={"response": [self._remember]})
        self.answers: list[tuple[str, int, str | None]] = []

    def _remember(self, response: httpx.Response) -> None:
        signature = response.request.headers.get("PAYMENT-SIGNATURE")
        self.answers.append((str(response.request.url), response.status_code, signature))


@pytest.fixture
def http() -> Iterator[Recorder]:
    with Recorder() as recorder:
        yield recorder


def test_send_pays_once_and_returns_the_receipt(
    serve: Callable[..., Served], chain: DevChain, payer: Wallet, http: Recorder
) -> None:
    served = serve()
    client = RelayClient(served.url, payer.key, http=http)
    result = client.send("Hello from the client", US, max_price_usd=Decimal("0.10"))
    assert result["sent"] is True
    assert result["paid_by"] == payer.address.lower()
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE
    assert [(url.rsplit("/", 1)[-1], code) for url, code, _ in http.answers] == [
        ("quote", 200),
        ("send", 402),
        ("send", 200),
    ]


def test_settlement_pending_is_retried_with_the_same_payment(
    serve: Callable[..., Served], chain: DevChain, payer: Wallet, http: Recorder
) -> None:
    served = serve(settlement_timeout_seconds=0.3)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        chain.mine()

    client = RelayClient(served.url, payer.key, http=http, sleep=sleep)
    chain.set_automine(False)
    try:
        result = client.send("Slow chain ahead", US, max_price_usd="0.10")
    finally:
        chain.set_automine(True)
    paid = [(code, signature) for _, code, signature in http.answers if signature]
    assert [code for code, _ in paid] == [202, 200]
    assert paid[0][1] == paid[1][1]
    assert waits == [5]
    assert result["transaction"].startswith("0x")
    assert chain.usdc_balance(payer.address) == 10_000_000 - PRICE


def test_price_cap_is_checked_before_signing(
    serve: Callable[..., Served], chain: DevChain, payer: Wallet, http: Recorder
) -> None:
    served = serve()
    client = RelayClient(served.url, payer.key, http=http)
    with pytest.raises(PriceLimitExceeded) as info:
        client.send("Too dear", US, max_price_usd="0.049999")
    assert info.value.details == {"price_atomic": "50000", "max_atomic": "49999"}
    assert [url.rsplit("/", 1)[-1] for url, _, _ in http.answers] == ["quote"]
    assert chain.usdc_balance(payer.address) == 10_000_000


class Tampering(Recorder):
    """A man in the middle (or a relay gone wrong) that changes the first requirement of
    every 402's PAYMENT-REQUIRED before the client reads it."""

    def __init__(self, change: dict[str, Any]) -> None:
        super().__init__()
        self.event_hooks["response"].insert(0, self._tamper)
        self._change = change

    def _tamper(self, response: httpx.Response) -> None:
        if response.status_code == 402 and "PAYMENT-REQUIRED" in response.headers:
            required = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
            required["accepts"][0].update(self._change)
            encoded = base64.b64encode(json.dumps(required).encode()).decode()
            response.headers["PAYMENT-REQUIRED"] = encoded


@pytest.mark.parametrize(
    "change",
    [
        {"amount": "100000"},  # the cap, not the quoted price
        {"payTo": "0x000000000000000000000000000000000000dEaD"},
        {"network": "eip155:8453"},  # Base mainnet, real USDC
        {"asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"},
        {"maxTimeoutSeconds": 10**9},  # an authorization good for thirty years
        {"scheme": "upto"},
    ],
)
def test_a_402_unlike_the_quote_is_never_signed(
    serve: Callable[..., Served], chain: DevChain, payer: Wallet, change: dict[str, Any]
) -> None:
    """The client signs only the requirement that is exactly its quote's (price, network,
    asset, payee) for a bounded time; anything else is refused before signing, within the
    caller's cap or not."""
    served = serve()
    with Tampering(change) as http:
        client = RelayClient(served.url, payer.key, http=http)
        with pytest.raises(PaymentTermsMismatch):
            client.send("Hello from the client", US, max_price_usd=Decimal("0.10"))
    assert [signature for _, _, signature in http.answers] == [None, None]
    assert chain.usdc_balance(payer.address) == 10_000_000


def test_errors_are_typed(serve: Callable[..., Served], payer: Wallet) -> None:
    with RelayClient(serve().url, payer.key) as client:
        with pytest.raises(Rejected) as rejected:
            client.send("Verify your account at bit.ly/x", US, max_price_usd="1")
        assert rejected.value.extra["approved"] is False
        with pytest.raises(MessageTooLong):
            client.send("a" * 1600, US, max_price_usd="1")


def test_wait_polls_until_the_delivery_report_arrives(
    serve: Callable[..., Served], chain: DevChain, payer: Wallet
) -> None:
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        served = serve(**sinch_overrides(fake.base_url))
        waits: list[float] = []
        client = RelayClient(served.url, payer.key, sleep=waits.append)
        message_id = client.send("Tell me when it lands", US, max_price_usd="0.10")["message_id"]
        report = delivery_report(message_id, US, "DELIVERED")

        def deliver_on_third_poll(seconds: float) -> None:
            waits.append(seconds)
            if len(waits) == 2:  # the report comes in while the client waits
                url = (
                    f"{served.url}/webhooks/sinch/{served.services.settings.sinch_callback_secret}"
                )
                assert httpx.post(url, json=report).status_code == 200

        waiting = RelayClient(served.url, sleep=deliver_on_third_poll)
        waits.clear()
        found = waiting.wait(message_id, timeout=60)
    assert found["status"] == "delivered"
    assert [event["status"] for event in found["events"]] == ["queued", "delivered"]
    assert len(waits) == 2 and waits[0] <= POLL_FIRST_SECONDS and waits[1] <= 2 * POLL_FIRST_SECONDS


def test_wait_gives_up_at_its_timeout_with_the_last_status(
    serve: Callable[..., Served], chain: DevChain, payer: Wallet
) -> None:
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        served = serve(**sinch_overrides(fake.base_url))
        message_id = RelayClient(served.url, payer.key).send(
            "No report comes", US, max_price_usd="0.10"
        )["message_id"]
        started = time.monotonic()
        found = RelayClient(served.url).wait(message_id, timeout=2.5)
    assert found["status"] == "queued"
    assert 2.4 <= time.monotonic() - started <= 6.0  # polled until the deadline, not past it


def test_wait_honours_retry_after_of_a_busy_relay() -> None:
    answers: list[dict[str, Any] | RelayError] = [
        RateLimited(retry_after=7),
        {"status": "dispatched"},
        RateLimited(retry_after=3),
        {"status": "failed"},
    ]
    waits: list[float] = []

    def fetch() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, RelayError):
            raise answer
        return answer

    assert poll_until_final(fetch, 60, sleep=waits.append)["status"] == "failed"
    assert waits[0] == 7 and waits[2] == 3 and waits[1] <= 2 * POLL_FIRST_SECONDS
    with pytest.raises(NotFound):  # an answer that will not change is not waited on
        poll_until_final(lambda: (_ for _ in ()).throw(NotFound()), 60, sleep=waits.append)
