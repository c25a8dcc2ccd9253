"""CORS for browser agents: the headers the app answers, and a browser's view end to end.

Unit level (Flask test client): preflights on the x402 endpoints allow the headers an x402
client sends, the 402 exposes PAYMENT-REQUIRED, and CORS_ORIGINS decides which origins get
an Access-Control-Allow-Origin at all.

End to end: ``tests/node/browser_pay.mjs`` pays a running ``relay serve`` on the local chain
with the stock npm ``@x402/fetch``, through a fetch that does what a browser does for a
cross-origin request (preflight first, Access-Control-* checks, only exposed headers
readable). Two small self-tests against a stub server show that this emulation refuses what
a browser refuses, so a pass against the relay means something.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from relay.app import create_app
from relay.dev.chain import DevChain
from relay.services import build_services
from relay.settings import Settings
from tests.conftest import Wallet, new_wallet
from tests.fake_gemini import FAKE_API_KEY, FakeGemini
from tests.fake_sinch import FakeSinch
from tests.processes import REPO, RelayProcess
from tests.test_e2e_send import (
    FUNDS,
    NODE_TIMEOUT,
    PASSWORD,
    SINCH_FROM,
    SINCH_PLAN,
    SINCH_TOKEN,
    US,
    Stack,
    assert_node_payer_paid,
    moderation_calls,
    snapshot,
)

ORIGIN = "https://agent.example"
OTHER = "https://other.example"
BODY = {"message": "Your order has shipped", "to": US}
SCRIPT = str(Path("tests") / "node" / "browser_pay.mjs")
# What a browser lists in Access-Control-Request-Headers for the x402 requests of
# tests/node/browser_pay.mjs (lowercased, sorted): the unpaid POST, then the paid retry of
# the stock @x402/fetch, which also sets Access-Control-Expose-Headers as a *request* header
# (node_modules/@x402/fetch/dist/esm/index.mjs, wrapFetchWithPayment).
UNPAID_HEADERS = ("content-type", "x-pay-password")
STOCK_PAID_HEADERS = (
    "access-control-expose-headers",
    "content-type",
    "payment-signature",
    "x-pay-password",
)
V1_PAID_HEADERS = ("content-type", "x-pay-password", "x-payment")


def parse_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def preflight_refusal(response: Any, origin: str, method: str, names: tuple[str, ...]) -> str:
    """Why a browser would refuse this preflight response ("" when it would not): the
    Fetch standard's CORS-preflight checks, for a request without credentials."""
    allow_origin = response.headers.get("Access-Control-Allow-Origin")
    if allow_origin not in ("*", origin):
        return f"Access-Control-Allow-Origin is {allow_origin!r}"
    if not 200 <= response.status_code <= 299:
        return f"status {response.status_code}"
    methods = parse_list(response.headers.get("Access-Control-Allow-Methods"))
    if method not in ("GET", "HEAD", "POST") and method not in methods and "*" not in methods:
        return f"method {method} not allowed"
    allowed = {n.lower() for n in parse_list(response.headers.get("Access-Control-Allow-Headers"))}
    missing = [n for n in names if n not in allowed and "*" not in allowed]
    return f"headers not allowed: {missing}" if missing else ""


def preflight(
    client: FlaskClient, path: str, origin: str, names: tuple[str, ...], method: str = "POST"
) -> Any:
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": ",".join(names),
        },
    )


def app_client(settings: Settings) -> FlaskClient:
    return create_app(services=build_services(settings)).test_client()


# Unit level: the Flask app ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/send", "/api/quote"])
def test_preflight_allows_the_x402_request_headers(
    make_settings: Callable[..., Settings], path: str
) -> None:
    client = app_client(make_settings())
    for names in (UNPAID_HEADERS, ("content-type", "payment-signature", "x-pay-password")):
        response = preflight(client, path, ORIGIN, names)
        assert preflight_refusal(response, ORIGIN, "POST", names) == ""
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in parse_list(response.headers["Access-Control-Allow-Methods"])
        assert int(response.headers["Access-Control-Max-Age"]) > 0
        assert "Access-Control-Allow-Credentials" not in response.headers
    response = preflight(client, path, ORIGIN, V1_PAID_HEADERS)
    assert preflight_refusal(response, ORIGIN, "POST", V1_PAID_HEADERS) == ""


def test_preflight_allows_every_header_the_stock_fetch_client_sends(
    make_settings: Callable[..., Settings],
) -> None:
    """The paid retry of the stock @x402/fetch carries Access-Control-Expose-Headers as a
    request header (not a forbidden header name: browsers send it, so it is preflighted)."""
    client = app_client(make_settings())
    response = preflight(client, "/api/send", ORIGIN, STOCK_PAID_HEADERS)
    assert preflight_refusal(response, ORIGIN, "POST", STOCK_PAID_HEADERS) == ""


def test_the_challenge_exposes_payment_required(
    paid_settings: Callable[..., Settings],
) -> None:
    client = app_client(paid_settings())
    response = client.post("/api/send", json=BODY, headers={"Origin": ORIGIN})
    assert response.status_code == 402, response.get_data(as_text=True)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    exposed = {n.lower() for n in parse_list(response.headers["Access-Control-Expose-Headers"])}
    assert {"payment-required", "payment-response", "x-payment-response"} <= exposed
    challenge = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
    assert challenge["x402Version"] == 2
    # Preflight-only headers stay on preflights.
    assert "Access-Control-Allow-Headers" not in response.headers


def test_errors_are_readable_cross_origin(make_settings: Callable[..., Settings]) -> None:
    """A refused request (here 401 without X-Pay-Password) still tells the page why."""
    client = app_client(make_settings(pay_password=PASSWORD))
    response = client.post("/api/send", json=BODY, headers={"Origin": ORIGIN})
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.get_json()["error"] == "unauthorized"


def test_listed_origins_only(make_settings: Callable[..., Settings]) -> None:
    client = app_client(make_settings(cors_origins=f" {ORIGIN}/ , https://app.example"))
    names = ("content-type", "payment-signature")

    for origin in (ORIGIN, "https://app.example"):
        response = preflight(client, "/api/send", origin, names)
        assert preflight_refusal(response, origin, "POST", names) == ""
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in response.headers["Vary"]
        quoted = client.post("/api/quote", json=BODY, headers={"Origin": origin})
        assert quoted.status_code == 200, quoted.get_data(as_text=True)
        assert quoted.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in quoted.headers["Vary"]

    for origin in (OTHER, "http://agent.example", "https://agent.example:8443", "null"):
        response = preflight(client, "/api/send", origin, names)
        assert preflight_refusal(response, origin, "POST", names) != ""
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Access-Control-Allow-Headers" not in response.headers
        quoted = client.post("/api/quote", json=BODY, headers={"Origin": origin})
        assert quoted.status_code == 200
        assert "Access-Control-Allow-Origin" not in quoted.headers
        assert "Access-Control-Expose-Headers" not in quoted.headers


def test_no_origins_means_no_cors(make_settings: Callable[..., Settings]) -> None:
    client = app_client(make_settings(cors_origins=""))
    names = ("content-type",)
    response = preflight(client, "/api/send", ORIGIN, names)
    assert preflight_refusal(response, ORIGIN, "POST", names) != ""
    quoted = client.post("/api/quote", json=BODY, headers={"Origin": ORIGIN})
    assert quoted.status_code == 200
    for answer in (response, quoted):
        assert not [h for h, _ in answer.headers.items() if h.lower().startswith("access-control-")]


def test_same_origin_requests_get_no_cors_headers(make_settings: Callable[..., Settings]) -> None:
    quoted = app_client(make_settings()).post("/api/quote", json=BODY)
    assert quoted.status_code == 200
    assert "Access-Control-Allow-Origin" not in quoted.headers


# The browser emulation, checked against a stub server ---------------------------------------


@dataclass
class NodeRun:
    """One run of browser_pay.mjs: exit code, its JSON line, stderr."""

    returncode: int
    result: dict[str, Any]
    stderr: str

    def exchanges(self) -> list[tuple[str, str, int | None]]:
        return [(e["phase"], e["method"], e["status"]) for e in self.result["cors"]]


def run_browser_payer(url: str, key: str, origin: str, body: dict[str, Any], **env: str) -> NodeRun:
    done = subprocess.run(
        ["node", SCRIPT, url, json.dumps(body)],
        cwd=REPO,
        env={**os.environ, "PAYER_PRIVATE_KEY": key, "ORIGIN": origin, **env},
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    assert done.returncode in (0, 1), f"{done.stdout}\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"{done.stdout}\n{done.stderr}"
    return NodeRun(done.returncode, json.loads(lines[0]), done.stderr)


class StubHandler(BaseHTTPRequestHandler):
    """Answers preflights permissively and every POST with a 402 whose CORS headers the
    test chooses (server.actual_headers); records (method, Origin) of each request."""

    server: StubServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_OPTIONS(self) -> None:
        self.server.seen.append(("OPTIONS", self.headers.get("Origin")))
        self._answer(
            204,
            {
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": "*",
            },
        )

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append(("POST", self.headers.get("Origin")))
        challenge = {"x402Version": 2, "resource": {"url": "x"}, "accepts": []}
        headers = {
            "Content-Type": "application/json",
            "PAYMENT-REQUIRED": base64.b64encode(json.dumps(challenge).encode()).decode(),
            **self.server.actual_headers,
        }
        self._answer(402, headers, b"{}")


class StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.seen: list[tuple[str, str | None]] = []
        self.actual_headers: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api/send"


@pytest.fixture
def stub() -> Iterator[StubServer]:
    server = StubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


STUB_KEY = "0x" + "11" * 32


def test_emulation_refuses_a_response_without_allow_origin(stub: StubServer) -> None:
    run = run_browser_payer(stub.url, STUB_KEY, ORIGIN, BODY)
    assert run.returncode == 1, run.result
    assert run.result["error"] == "Failed to fetch"
    assert run.result["corsError"].startswith("actual POST")
    assert "no Access-Control-Allow-Origin" in run.result["corsError"]
    # The preflight went first, with what a browser sends.
    assert stub.seen == [("OPTIONS", ORIGIN), ("POST", ORIGIN)]
    first = run.result["cors"][0]
    assert (first["requestMethod"], first["requestHeaders"]) == ("POST", ["content-type"])


def test_emulation_hides_unexposed_headers(stub: StubServer) -> None:
    """Allowed, but PAYMENT-REQUIRED not exposed: page JavaScript cannot read the challenge,
    so the stock client cannot pay."""
    stub.actual_headers = {"Access-Control-Allow-Origin": ORIGIN}
    run = run_browser_payer(stub.url, STUB_KEY, ORIGIN, BODY)
    assert run.returncode == 1, run.result
    assert run.result["corsError"] is None
    assert "Failed to parse payment requirements" in run.result["error"]
    assert run.result["cors"][1]["visibleHeaders"] == ["content-length", "content-type"]
    assert stub.seen == [("OPTIONS", ORIGIN), ("POST", ORIGIN)]


# End to end: relay serve on the local chain ---------------------------------------------------


@dataclass
class Relays:
    """One chain, fake Gemini and fake Sinch; a relay per CORS_ORIGINS, started on demand."""

    chain: DevChain
    gemini: FakeGemini
    sinch: FakeSinch
    tmp: Path
    started: dict[str | None, Stack]

    def stack(self, cors_origins: str | None) -> Stack:
        """A running relay with CORS_ORIGINS set to this (None: unset, the default)."""
        if cors_origins in self.started:
            return self.started[cors_origins]
        index = len(self.started)
        pay_to = new_wallet(self.chain).address
        env = {
            "QUOTE_SECRET": "cors-e2e-quote-secret-0123456789",
            "PAY_TO_ADDRESS": pay_to,
            "FACILITATOR": "local",
            "RPC_URL": self.chain.rpc_url,
            "SETTLER_PRIVATE_KEY": self.chain.accounts[0].private_key,
            "MODERATION_PROVIDER": "gemini",
            "GEMINI_API_KEY": FAKE_API_KEY,
            "GEMINI_BASE_URL": self.gemini.url,
            "SMS_PROVIDER": "sinch",
            "SINCH_SERVICE_PLAN_ID": SINCH_PLAN,
            "SINCH_API_TOKEN": SINCH_TOKEN,
            "SINCH_FROM": SINCH_FROM,
            "SINCH_BASE_URL": self.sinch.base_url,
            "DATABASE_URL": f"sqlite:///{self.tmp / f'relay{index}.db'}",
            "PAY_PASSWORD": PASSWORD,
            "QUOTE_RATE_LIMIT": "1000/minute",
        }
        if cors_origins is not None:
            env["CORS_ORIGINS"] = cors_origins
        relay = RelayProcess(env, self.tmp / f"relay{index}.log")
        # Registered before start: a relay that fails to become healthy is stopped too.
        self.started[cors_origins] = Stack(self.chain, self.gemini, self.sinch, relay, pay_to)
        try:
            relay.start(timeout=60)
        except requests.Timeout:
            # RelayProcess polls /health with a 1 s read timeout and lets a ReadTimeout out
            # (it only retries ConnectionError): on a loaded machine, wait longer here.
            wait_healthy(relay, 60)
        return self.started[cors_origins]


def wait_healthy(relay: RelayProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(relay.url + "/health", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError(f"relay did not become healthy: {relay.log()}")


@pytest.fixture(scope="module")
def relays(chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relays]:
    tmp = tmp_path_factory.mktemp("e2e-cors")
    with FakeGemini() as gemini, FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as sinch:
        found = Relays(chain, gemini, sinch, tmp, {})
        try:
            yield found
        finally:
            # `relay serve` takes about 10 s to stop (RelayProcess.stop then kills it): stop
            # them all at once.
            stoppers = [threading.Thread(target=s.relay.stop) for s in found.started.values()]
            for stopper in stoppers:
                stopper.start()
            for stopper in stoppers:
                stopper.join(30)


def pay_from_browser(stack: Stack, payer: Wallet, text: str) -> NodeRun:
    return run_browser_payer(
        stack.relay.url + "/api/send",
        payer.key,
        ORIGIN,
        {"message": text, "to": "+1 301 257 6365"},
        PAY_PASSWORD=PASSWORD,
        RPC_URL=stack.chain.rpc_url,
    )


@pytest.mark.parametrize("cors_origins", [None, f"{OTHER}, {ORIGIN}"], ids=["default", "listed"])
def test_browser_agent_pays_with_the_stock_fetch_client(
    relays: Relays, cors_origins: str | None
) -> None:
    stack = relays.stack(cors_origins)
    payer = new_wallet(stack.chain, FUNDS)
    text = f"Browser agent ({cors_origins or 'any origin'}): your ticket is booked"
    before = snapshot(stack, payer)

    run = pay_from_browser(stack, payer, text)

    result = run.result
    assert run.returncode == 0, f"{result}\n{run.stderr}\n{stack.relay.log()}"
    assert result["status"] == 200, f"{result}\n{stack.relay.log()}"
    # What the browser put on the wire: a preflight before each POST, all of them allowed.
    assert run.exchanges() == [
        ("preflight", "OPTIONS", 200),
        ("actual", "POST", 402),
        ("preflight", "OPTIONS", 200),
        ("actual", "POST", 200),
    ]
    assert all(e["allowed"] for e in result["cors"])
    unpaid, challenge, paid, settled_exchange = result["cors"]
    assert unpaid["requestHeaders"] == list(UNPAID_HEADERS)
    assert {"content-type", "payment-signature", "x-pay-password"} <= set(paid["requestHeaders"])
    assert "payment-required" in challenge["visibleHeaders"]
    assert "payment-response" in settled_exchange["visibleHeaders"]
    assert "origin" in settled_exchange["requestHeaders"]

    assert_node_payer_paid(stack, result, payer, before, text)


def test_browser_agent_from_an_unlisted_origin_pays_nothing(relays: Relays) -> None:
    stack = relays.stack(OTHER)
    payer = new_wallet(stack.chain, FUNDS)
    text = "Browser agent (unlisted origin): this must never be sent"
    before = snapshot(stack, payer)

    run = pay_from_browser(stack, payer, text)

    assert run.returncode == 1, f"{run.result}\n{run.stderr}"
    assert run.result["error"] == "Failed to fetch"
    reason = run.result["corsError"]
    assert reason.startswith("preflight OPTIONS"), reason
    assert "no Access-Control-Allow-Origin" in reason
    # The preflight was refused, so the POST never left the browser.
    assert run.exchanges() == [("preflight", "OPTIONS", 200)]
    assert snapshot(stack, payer) == before
    assert moderation_calls(stack, text) == 0
