"""Signed delivery callbacks: a local receiver verifies every event with the PyPI
`standardwebhooks` library and refuses the first attempts; the worker retries with the same
event id until it is taken. Callback URLs into private networks are refused, both when
given and when an event is sent."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, update
from standardwebhooks import Webhook, WebhookVerificationError

import relay.callbacks
import relay.ledger
from relay.app import create_app
from relay.callbacks import (
    CallbackFailed,
    CallbackPolicy,
    CallbackSender,
    Delivery,
    event_body,
    new_secret,
)
from relay.flows.notifying import EVENT_BACKOFF, deliver_events
from relay.flows.reconciling import reconcile
from relay.records import EventRecord
from relay.schema import webhook_events
from relay.services import Services, build_services
from relay.settings import Settings
from tests.conftest import (
    SINCH_PLAN,
    SINCH_TOKEN,
    Wallet,
    services_of,
    sinch_overrides,
)
from tests.fake_sinch import FakeSinch, delivery_report, signature_headers
from tests.processes import REPO
from tests.x402_helpers import pay

US = "+13012576365"


class Receiver:
    """An agent's endpoint: answers 500 to the first ``refuse`` requests, then 204; keeps
    what it got."""

    def __init__(self, refuse: int = 0, delay: float = 0.0) -> None:
        self.refuse = refuse
        self.delay = delay
        self.got: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                refused = len(receiver.got) <= receiver.refuse
                time.sleep(receiver.delay)
                self.send_response(500 if refused else 204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/sms"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def verified(self, secret: str) -> list[dict[str, Any]]:
        """Every event received, each checked with the standardwebhooks library."""
        hook = Webhook(secret)
        return [hook.verify(body, headers) for headers, body in self.got]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver(refuse=2)
    yield found
    found.close()


def send_paid(app: Flask, body: dict[str, Any], key: str) -> Any:
    client = app.test_client()
    challenge = client.post("/api/send", json=body)
    assert challenge.status_code == 402, challenge.get_data(as_text=True)
    signature = pay(challenge.headers["PAYMENT-REQUIRED"], key)
    return client.post("/api/send", json=body, headers={"PAYMENT-SIGNATURE": signature})


def run_worker_until_quiet(services: Services, rounds: int = 20) -> list[dict[str, str]]:
    """Worker passes until nothing is due, each retry brought forward to now (the waits
    between attempts are the backoff's, checked below; signatures need the real time)."""
    passes = []
    for _ in range(rounds):
        results = deliver_events(services)
        if not results:
            break
        passes.append(results)
        with services.ledger.begin() as conn:
            pending = webhook_events.c.state == "pending"
            waits = conn.execute(
                select(webhook_events.c.next_attempt_at - webhook_events.c.updated_at).where(
                    pending
                )
            ).scalars()
            assert all(0 <= wait <= EVENT_BACKOFF.cap for wait in waits)
            conn.execute(update(webhook_events).where(pending).values(next_attempt_at=0.0))
    return passes


def test_events_are_signed_retried_and_delivered_once_taken(
    paid_settings: Callable[..., Settings], payer: Wallet, receiver: Receiver
) -> None:
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        settings = paid_settings(**sinch_overrides(fake.base_url), allow_private_callbacks=True)
        app = create_app(services=build_services(settings))
        body = {"message": "Tell my webhook", "to": US, "callback_url": receiver.url}
        answer = send_paid(app, body, payer.key)
        assert answer.status_code == 200, answer.get_data(as_text=True)
        webhook = answer.get_json()["webhook"]
        assert webhook["url"] == receiver.url and webhook["secret"].startswith("whsec_")
        message_id = answer.get_json()["message_id"]
        report = delivery_report(message_id, US, "DELIVERED")
        hook = f"/webhooks/sinch/{settings.sinch_callback_secret}"
        assert app.test_client().post(hook, json=report).status_code == 200
        assert app.test_client().post(hook, json=report).status_code == 200  # a repeat
    services = services_of(app)
    passes = run_worker_until_quiet(services)
    assert passes[0] == {
        f"evt_{payment_id(services)}_dispatched": "retrying",
        f"evt_{payment_id(services)}_delivered": "retrying",
    }
    assert set(passes[-1].values()) == {"delivered"}
    events = receiver.verified(webhook["secret"])
    kinds = [event["type"] for event in events]
    assert sorted(set(kinds)) == ["message.delivered", "message.dispatched"]
    ids = {headers["webhook-id"] for headers, _ in receiver.got}
    assert len(ids) == 2  # retries carry the same id: at least once, stable id
    delivered = next(event for event in events if event["type"] == "message.delivered")
    assert delivered["data"]["message_id"] == message_id
    assert delivered["data"]["status"] == "delivered" and US not in json.dumps(delivered)
    with pytest.raises(WebhookVerificationError):  # another message's secret does not verify
        Receiver.verified(receiver, "whsec_" + "QUFB" * 11)


def payment_id(services: Services) -> str:
    (payment,) = services.ledger.list_payments()
    return payment.id


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/hook", "scheme"),
        ("https://127.0.0.1/hook", "private_address"),
        ("https://10.1.2.3/hook", "private_address"),
        ("https://169.254.169.254/latest/meta-data", "private_address"),
        ("https://[::1]/hook", "private_address"),
        ("https://[fd00:ec2::254]/hook", "private_address"),
        ("https://100.64.0.1/hook", "private_address"),
        ("https://localhost/hook", "private_address"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("ftp://example.com/hook", "scheme"),
        ("https://" + "a" * 2050 + ".com/", "too_long"),
    ],
)
def test_callback_urls_into_private_networks_are_refused_before_payment(
    paid_settings: Callable[..., Settings], url: str, reason: str
) -> None:
    app = create_app(services=build_services(paid_settings()))
    answer = app.test_client().post(
        "/api/send", json={"message": "Hook", "to": US, "callback_url": url}
    )
    assert answer.status_code == 400, answer.get_data(as_text=True)
    error = answer.get_json()
    assert error["error"] == "invalid_input"
    assert error["details"]["field"] == "callback_url"
    assert error["details"]["reason"] in (reason, "unresolvable")


def test_a_name_that_turns_private_after_the_check_is_not_called(receiver: Receiver) -> None:
    """DNS rebinding: public when the URL was given, loopback when the event goes out."""
    answers = iter([["93.184.215.14"], ["127.0.0.1"]])
    policy = CallbackPolicy(resolver=lambda _host, _port: next(answers))
    url = f"https://hooks.example.com:{receiver.server.server_port}/sms"
    assert policy.check(url) == url
    sender = CallbackSender(policy)
    with pytest.raises(CallbackFailed, match="private_address"):
        sender.send(url, "whsec_" + "QUFB" * 11, Delivery("evt_1", 1.0, "{}"))
    sender.close()
    assert receiver.got == []


def test_the_readme_typescript_verification_accepts_our_events(receiver: Receiver) -> None:
    """The README's TypeScript snippet (npm standardwebhooks) verifies what the relay sends."""
    receiver.refuse = 0
    policy = CallbackPolicy(allow_private=True)
    secret = new_secret()
    body = event_body("message.delivered", 1.0, {"message_id": "m-1", "status": "delivered"})
    CallbackSender(policy).send(
        receiver.url, secret, Delivery("evt_m-1_delivered", time.time(), body)
    )
    ((headers, received),) = receiver.got
    script = Path(__file__).parent / "node" / "verify_webhook.mjs"

    def verify(text: str) -> subprocess.CompletedProcess[str]:
        data = {"secret": secret, "body": text, "headers": headers}
        return subprocess.run(
            ["node", str(script)], input=json.dumps(data), capture_output=True, text=True, cwd=REPO
        )

    ok = verify(received.decode())
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "message.delivered"
    assert verify(received.decode().replace("delivered", "failed")).returncode != 0


def test_slow_endpoints_cannot_hold_back_the_workers_pass(
    make_settings: Callable[..., Settings],
) -> None:
    """A payer's callback endpoint that answers slowly (many messages, one blackhole) costs a
    worker pass at most its event budget: the reconciliation sharing the loop goes on."""
    slow = Receiver(delay=1.0)
    services = build_services(make_settings(allow_private_callbacks=True))
    now = services.clock()
    for number in range(4):
        services.ledger.enqueue_event(
            EventRecord(
                id=f"evt_slow{number}_delivered",
                payment_id=f"slow{number}",
                type="message.delivered",
                url=slow.url,
                secret=new_secret(),
                body="{}",
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
        )
    started = time.monotonic()
    first = deliver_events(services, budget_seconds=0.5)
    assert time.monotonic() - started < 3.0  # not 4 x 1 s
    assert list(first.values()) == ["delivered"]  # one attempt, the rest wait for a pass
    second = deliver_events(services, budget_seconds=10.0)
    assert sorted(first | second) == [f"evt_slow{n}_delivered" for n in range(4)]
    slow.close()


class Dripping:
    """An agent's endpoint that answers one byte at a time, every ``every`` seconds, for
    ever: from its status line (``headers_first`` False) or after a whole 200's headers,
    then an endless body. Counts the bytes it sent."""

    def __init__(self, *, headers_first: bool, every: float = 0.2) -> None:
        self.sent = 0
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hooks/sms"
        self._headers_first, self._every = headers_first, every
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(connection,), daemon=True).start()

    def _drip(self, connection: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n"
        with connection:
            connection.recv(65536)
            try:
                if self._headers_first:
                    connection.sendall(head)
                stream = b"x" * 1_000_000_000 if self._headers_first else head
                for byte in stream:
                    if self._closing.wait(self._every):
                        return
                    connection.sendall(bytes([byte]))
                    self.sent += 1
            except OSError:
                return

    def close(self) -> None:
        self._closing.set()
        self._listener.close()


def test_an_endpoint_that_answers_a_byte_at_a_time_holds_no_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A drip of one byte every 0.2 s keeps each read's timeout from ever running out.
    Dripped from the status line, the attempt ends at its deadline, failed; dripped after a
    whole 2xx head, the event is delivered and the endless body is never read."""
    monkeypatch.setattr(relay.callbacks, "DELIVERY_DEADLINE_SECONDS", 1.0)
    sender = CallbackSender(CallbackPolicy(allow_private=True))
    endpoint = Dripping(headers_first=False)
    started = time.monotonic()
    try:
        with pytest.raises(CallbackFailed, match="timed out"):
            sender.send(endpoint.url, new_secret(), Delivery("evt_drip", time.time(), "{}"))
        assert time.monotonic() - started < 4.0  # the deadline, and a loaded machine's slack
    finally:
        endpoint.close()
    monkeypatch.setattr(relay.callbacks, "DELIVERY_DEADLINE_SECONDS", 10.0)
    endpoint = Dripping(headers_first=True)
    try:
        sender.send(endpoint.url, new_secret(), Delivery("evt_drip", time.time(), "{}"))
        time.sleep(1.0)
    finally:
        sender.close()
        endpoint.close()
    assert endpoint.sent < 3  # the body was not waited for: nothing more was taken


@pytest.mark.parametrize("signing", [None, "hmac-key"])
def test_a_report_about_a_hand_over_not_yet_recorded_is_sent_again_and_applied(
    paid_settings: Callable[..., Settings],
    payer: Wallet,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    signing: str | None,
) -> None:
    """The write after Sinch took the SMS fails: none of the message, its events and the
    answer is stored. Sinch's delivery report meanwhile is answered 503 (Sinch sends it
    again), not acknowledged and dropped; once the payment's next holder has recorded the
    message (and its events, in the same write), the report sent again is applied (signed:
    the same signature is not taken for a replay of a report already applied)."""
    with FakeSinch(plan_id=SINCH_PLAN, token=SINCH_TOKEN) as fake:
        overrides = {**sinch_overrides(fake.base_url), "sinch_signing_secret": signing}
        settings = paid_settings(**overrides, allow_private_callbacks=True)
        app = create_app(services=build_services(settings))
        services, move = services_of(app), relay.ledger._move

        def crash_at_the_answer(conn: Any, payment: str, *args: Any) -> bool:
            if args[1] == "dispatched":
                raise RuntimeError("the database went away")
            return move(conn, payment, *args)

        monkeypatch.setattr(relay.ledger, "_move", crash_at_the_answer)
        body = {"message": "Tell my webhook", "to": US, "callback_url": receiver.url}
        assert send_paid(app, body, payer.key).status_code == 500
        monkeypatch.undo()
        (batch,) = fake.batches
        (row,) = services.ledger.list_payments()
        assert row.state == "dispatching" and services.ledger.list_messages() == []
        with services.ledger.begin() as conn:
            assert conn.execute(select(webhook_events.c.id)).all() == []
        report = {**delivery_report(batch["id"], US, "Delivered"), "client_reference": row.id}
        hook = f"/webhooks/sinch/{settings.sinch_callback_secret}"
        raw = json.dumps(report).encode()
        signed = {} if signing is None else signature_headers(signing, raw, "n-1", int(time.time()))
        sent = {"data": raw, "content_type": "application/json", "headers": signed}
        early = app.test_client().post(hook, **sent)
        assert early.status_code == 503
        assert early.get_json()["error"] == "delivery_report_too_early"
        assert reconcile(services) == {row.id: "dispatched"}
        assert len(fake.batches) == 1  # found at Sinch, not sent again
        assert app.test_client().post(hook, **sent).get_json() == {"ok": True}  # applied
        message = services.ledger.message(batch["id"])
        assert message is not None and message.status == "delivered"
        with services.ledger.begin() as conn:
            kept = set(conn.execute(select(webhook_events.c.type)).scalars())
        assert kept == {"message.dispatched", "message.delivered"}
        if signing is None:
            unknown = {**report, "batch_id": "01NOTOURS", "client_reference": "not-a-payment"}
            assert app.test_client().post(hook, json=unknown).status_code == 200  # not ours
