"""The real SinchSender against a real local fake of Sinch, and the pure webhook helpers
(relay.sinch_webhooks)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.configs import SinchConfig
from relay.phone import mask
from relay.settings import Settings, SettingsError
from relay.sinch import SendResult, SinchSender, SmsDispatchError, compose_body
from relay.sinch_webhooks import (
    DeliveryReport,
    DeliveryStatus,
    InboundMessage,
    opt_out_action,
    parse_callback,
    sign_callback,
    verify_signature,
)
from tests.fake_sinch import PLAN_ID, SENDER, TOKEN, FakeSinch, signature_headers

TO = "+14155550123"
TEXT = "Your parcel arrives at 4pm"
CALLBACK_SECRET = "cb-secret-7f3a9d"
ROOT = Path(__file__).resolve().parent.parent


def make_config(base_url: str, **changes: Any) -> SinchConfig:
    values: dict[str, Any] = {
        "sinch_service_plan_id": PLAN_ID,
        "sinch_api_token": TOKEN,
        "sinch_from": SENDER,
        "sinch_base_url": base_url,
        "public_base_url": "https://relay.example",
        "sinch_callback_secret": CALLBACK_SECRET,
    }
    values.update(changes)
    return Settings(**values).sinch()


@pytest.fixture
def fake() -> Iterator[FakeSinch]:
    with FakeSinch() as server:
        yield server


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def sender(fake: FakeSinch, sleeps: list[float]) -> Iterator[SinchSender]:
    with SinchSender(make_config(fake.base_url), read_timeout=0.5, sleep=sleeps.append) as client:
        yield client


def body() -> str:
    return compose_body(TEXT, "Reply STOP to opt out")


# Sending


def test_send_posts_exactly_the_expected_batch(fake: FakeSinch, sender: SinchSender) -> None:
    result = sender.send(TO, body(), "msg-1")

    assert result == SendResult(message_id=fake.batches[0]["id"], provider="sinch")
    assert len(result.message_id) == 26
    (request,) = fake.requests
    assert request.authorized
    assert request.path == f"/xms/v1/{PLAN_ID}/batches"
    assert request.json == {
        "from": SENDER,
        "to": [TO],
        "body": "Your parcel arrives at 4pm\nReply STOP to opt out",
        "delivery_report": "per_recipient",
        "callback_url": f"https://relay.example/webhooks/sinch/{CALLBACK_SECRET}",
        "client_reference": "msg-1",
    }


def test_no_callback_url_without_a_public_base_url(fake: FakeSinch) -> None:
    config = make_config(fake.base_url, public_base_url=None)
    with SinchSender(config) as client:
        client.send(TO, body(), "msg-2")
    assert "callback_url" not in fake.requests[0].json


def test_missing_credentials_are_refused_before_a_sender_exists() -> None:
    with pytest.raises(SettingsError, match="SINCH_API_TOKEN"):
        make_config("http://127.0.0.1:9", sinch_api_token=None)


def test_compose_body_appends_the_opt_out_line() -> None:
    assert compose_body("Hi", "Reply STOP to opt out") == "Hi\nReply STOP to opt out"


# Failures that must not be retried


def test_scripted_400_is_not_retried(fake: FakeSinch, sender: SinchSender) -> None:
    fake.script({"status": 400, "code": "syntax_invalid_parameter_format", "text": "bad to"})

    with pytest.raises(SmsDispatchError) as caught:
        sender.send(TO, body(), "msg-3")

    error = caught.value
    assert (error.status, error.provider_code) == (400, "syntax_invalid_parameter_format")
    assert not error.retryable and not error.maybe_sent
    assert fake.create_attempts() == 1
    assert fake.batches == []


def test_fake_validates_the_batch_like_sinch(fake: FakeSinch, sender: SinchSender) -> None:
    with pytest.raises(SmsDispatchError) as caught:
        sender.send("12", body(), "msg-4")
    assert caught.value.provider_code == "syntax_invalid_parameter_format"
    assert fake.create_attempts() == 1


def test_wrong_token_is_401_and_not_retried(fake: FakeSinch) -> None:
    config = make_config(fake.base_url, sinch_api_token="wrong-token")
    with (
        SinchSender(config, sleep=lambda _: None) as client,
        pytest.raises(SmsDispatchError) as caught,
    ):
        client.send(TO, body(), "msg-5")
    assert (caught.value.status, caught.value.provider_code) == (401, "unauthorized")
    assert not caught.value.retryable
    assert fake.create_attempts() == 1
    assert not fake.requests[0].authorized


def test_wrong_plan_id_is_401(fake: FakeSinch) -> None:
    config = make_config(fake.base_url, sinch_service_plan_id="someone-elses-plan")
    with SinchSender(config) as client, pytest.raises(SmsDispatchError) as caught:
        client.send(TO, body(), "msg-6")
    assert caught.value.status == 401


# Failures that are retried


def test_429_then_201_succeeds_after_honouring_retry_after(
    fake: FakeSinch, sender: SinchSender, sleeps: list[float]
) -> None:
    fake.script({"status": 429, "retry_after": 2})

    result = sender.send(TO, body(), "msg-7")

    assert result.message_id == fake.batches[0]["id"]
    assert fake.create_attempts() == 2
    assert sleeps == [2.0]


def test_retry_after_is_capped(fake: FakeSinch, sleeps: list[float]) -> None:
    fake.script({"status": 429, "retry_after": 3600})
    with SinchSender(make_config(fake.base_url), max_wait_seconds=7, sleep=sleeps.append) as s:
        s.send(TO, body(), "msg-8")
    assert sleeps == [7.0]


def test_a_500_is_looked_up_once_and_never_posted_again(
    fake: FakeSinch, sender: SinchSender, sleeps: list[float]
) -> None:
    """A 5xx may come after Sinch created the batch, and its list may lag: a missing batch
    is no proof, so the message is reported as maybe sent (the reconciler looks again later
    before any second hand-over), never posted twice here."""
    fake.script(*[{"status": 500}] * 3)

    with pytest.raises(SmsDispatchError) as caught:
        sender.send(TO, body(), "msg-9")

    error = caught.value
    assert (error.status, error.retryable, error.maybe_sent) == (500, True, True)
    assert fake.create_attempts() == 1
    assert sleeps == [0.5]  # the whole first wait, for Sinch's list to catch up
    assert fake.batches == []


def test_500_after_creation_is_reconciled(fake: FakeSinch, sender: SinchSender) -> None:
    fake.script({"status": 500, "record": True})

    result = sender.send(TO, body(), "msg-10")

    assert [b["id"] for b in fake.batches] == [result.message_id]
    assert fake.create_attempts() == 1


def test_connection_refused_is_retryable(sleeps: list[float]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = make_config(f"http://127.0.0.1:{port}")

    with (
        SinchSender(config, sleep=sleeps.append) as client,
        pytest.raises(SmsDispatchError) as caught,
    ):
        client.send(TO, body(), "msg-11")

    error = caught.value
    assert error.retryable and not error.maybe_sent and error.status is None
    # Three attempts, no lookup: nothing can have been created. The waits are jittered.
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0


# Read timeouts: the batch may or may not exist


def test_read_timeout_after_creation_reconciles_instead_of_resending(
    fake: FakeSinch, sender: SinchSender
) -> None:
    fake.script({"hang": 5, "record": True})

    result = sender.send(TO, body(), "msg-12")

    assert len(fake.batches) == 1
    assert result.message_id == fake.batches[0]["id"]
    assert fake.create_attempts() == 1
    lookups = [r for r in fake.requests if r.method == "GET"]
    assert lookups[0].query["client_reference"] == ["msg-12"]


def test_read_timeout_with_nothing_listed_is_reported_not_resent(
    fake: FakeSinch, sender: SinchSender
) -> None:
    fake.script({"hang": 5, "record": False})

    with pytest.raises(SmsDispatchError) as caught:
        sender.send(TO, body(), "msg-13")

    assert caught.value.maybe_sent
    assert fake.batches == []
    assert fake.create_attempts() == 1


def test_keep_alive_runs_before_each_attempt_and_can_stop_it(
    fake: FakeSinch, sender: SinchSender
) -> None:
    fake.script({"status": 429}, {"status": 429})
    calls: list[int] = []

    def keep_alive() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise LookupError("lease lost")

    with pytest.raises(LookupError):
        sender.send(TO, body(), "msg-15", keep_alive=keep_alive)
    assert fake.create_attempts() == 1  # the second attempt never went out
    assert fake.batches == []


def test_lookup_failure_reports_the_sms_may_have_been_sent(fake: FakeSinch) -> None:
    fake.script({"hang": 5, "record": True})
    config = make_config(fake.base_url)

    def sinch_goes_away(_: float) -> None:
        fake.stop()

    with (
        SinchSender(config, read_timeout=0.5, sleep=sinch_goes_away) as client,
        pytest.raises(SmsDispatchError) as caught,
    ):
        client.send(TO, body(), "msg-14")

    assert caught.value.maybe_sent and not caught.value.retryable


def test_lookup_finds_only_the_matching_reference(fake: FakeSinch, sender: SinchSender) -> None:
    sent = [sender.send(TO, body(), f"ref-{i}") for i in range(3)]

    assert sender.lookup("ref-1") == sent[1]
    assert sender.lookup("ref-unknown") is None


# Logging


def test_logs_hold_no_secret_body_or_full_number(
    fake: FakeSinch, sender: SinchSender, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.script({"status": 429}, {"hang": 5, "record": True})
    sender.send(TO, body(), "msg-15")
    fake.script({"status": 400, "text": f"Invalid recipient {TO}"})
    with pytest.raises(SmsDispatchError) as caught:
        sender.send(TO, body(), "msg-16")

    logged = caplog.text + str(caught.value)
    for secret in (TOKEN, CALLBACK_SECRET, TEXT, TO, TO.lstrip("+")):
        assert secret not in logged
    assert mask(TO) in caplog.text


# Webhooks


def report(status: str, **extra: Any) -> dict[str, Any]:
    payload = {
        "type": "recipient_delivery_report_sms",
        "batch_id": "01FC66621XXXXX119Z8PMV1QPQ",
        "recipient": "14155550123",
        "status": status,
        "code": 0,
        "at": "2024-05-01T10:00:00.000Z",
        "client_reference": "msg-1",
    }
    return payload | extra


@pytest.mark.parametrize(
    ("status", "ours"),
    [
        ("Delivered", "delivered"),
        ("DELIVERED", "delivered"),
        ("delivered", "delivered"),
        ("Dispatched", "dispatched"),
        ("Queued", "dispatched"),
        ("Unknown", "dispatched"),
        ("Failed", "failed"),
        ("Aborted", "failed"),
        ("Rejected", "failed"),
        ("Expired", "failed"),
        ("Cancelled", "failed"),
        ("Deleted", "failed"),
    ],
)
def test_delivery_report_statuses(status: str, ours: DeliveryStatus) -> None:
    assert parse_callback(report(status)) == DeliveryReport(
        batch_id="01FC66621XXXXX119Z8PMV1QPQ",
        recipient="+14155550123",
        status=ours,
        provider_status=status,
        code=0,
        at="2024-05-01T10:00:00.000Z",
        client_reference="msg-1",
    )


def test_inbound_text() -> None:
    payload = {
        "type": "mo_text",
        "id": "01FC66621XXXXX119Z8PMV1AHY",
        "from": "14155550123",
        "to": "12025550100",
        "body": "STOP",
        "received_at": "2024-05-01T10:00:00.000Z",
    }
    assert parse_callback(payload) == InboundMessage(
        message_id="01FC66621XXXXX119Z8PMV1AHY",
        sender="+14155550123",
        to="12025550100",
        body="STOP",
        received_at="2024-05-01T10:00:00.000Z",
    )


@pytest.mark.parametrize(
    "payload",
    [
        report("Bogus"),
        report("Delivered", batch_id=None),
        report("Delivered", recipient=7),
        {"type": "delivery_report_sms", "batch_id": "x", "statuses": []},
        {"type": "mo_binary", "from": "1", "to": "2", "body": "AAE=", "udh": "00"},
        {"type": "mo_text", "from": "14155550123", "to": "12025550100"},
        {"type": "mystery"},
        {},
    ],
)
def test_callbacks_we_do_not_understand_are_none(payload: dict[str, Any]) -> None:
    assert parse_callback(payload) is None


def test_non_integer_code_is_dropped() -> None:
    parsed = parse_callback(report("Failed", code=True))
    assert isinstance(parsed, DeliveryReport) and parsed.code is None


@pytest.mark.parametrize(
    ("text", "action"),
    [
        *[(w, "stop") for w in ("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT")],
        *[(w, "start") for w in ("START", "UNSTOP", "YES")],
        ("stop", "stop"),
        ("  Stop \n", "stop"),
        ("StopAll", "stop"),
        ("STOP.", "stop"),
        ("yes!", "start"),
        ("Start", "start"),
        ("STOP please", None),
        ("don't stop", None),
        ("STOPPED", None),
        ("YESTERDAY", None),
        ("", None),
        ("Hello", None),
    ],
)
def test_opt_out_keywords(text: str, action: str | None) -> None:
    assert opt_out_action(text) == action


# Callback signatures

NOW = 1_714_557_600
RAW = json.dumps(report("Delivered")).encode()


def test_signature_matches_the_independent_oracle() -> None:
    headers = signature_headers(CALLBACK_SECRET, RAW, "nonce-1", NOW)
    assert (
        sign_callback(CALLBACK_SECRET, RAW, "nonce-1", str(NOW))
        == headers["x-sinch-webhook-signature"]
    )
    assert verify_signature(CALLBACK_SECRET, RAW, headers, now=NOW + 10)


def test_signature_headers_are_case_insensitive() -> None:
    headers = signature_headers(CALLBACK_SECRET, RAW, "n", NOW)
    upper = {k.upper(): v for k, v in headers.items()}
    assert verify_signature(CALLBACK_SECRET, RAW, upper, now=NOW)


@pytest.mark.parametrize(
    ("secret", "raw", "now"),
    [
        ("another-secret", RAW, NOW),
        (CALLBACK_SECRET, RAW + b" ", NOW),
        (CALLBACK_SECRET, RAW, NOW + 301),
        (CALLBACK_SECRET, RAW, NOW - 301),
        ("", RAW, NOW),
    ],
    ids=["wrong-secret", "tampered-body", "stale", "from-the-future", "no-secret"],
)
def test_bad_signatures_fail(secret: str, raw: bytes, now: float) -> None:
    headers = signature_headers(CALLBACK_SECRET, RAW, "nonce-1", NOW)
    assert not verify_signature(secret, raw, headers, now=now)


@pytest.mark.parametrize(
    "drop",
    [
        "x-sinch-webhook-signature",
        "x-sinch-webhook-signature-nonce",
        "x-sinch-webhook-signature-timestamp",
    ],
)
def test_missing_signature_headers_fail(drop: str) -> None:
    headers = signature_headers(CALLBACK_SECRET, RAW, "nonce-1", NOW)
    del headers[drop]
    assert not verify_signature(CALLBACK_SECRET, RAW, headers, now=NOW)


def test_iso_timestamps_and_garbage() -> None:
    iso = "2024-05-01T10:00:00Z"
    good = {
        "x-sinch-webhook-signature": sign_callback(CALLBACK_SECRET, RAW, "n", iso),
        "x-sinch-webhook-signature-nonce": "n",
        "x-sinch-webhook-signature-timestamp": iso,
    }
    assert verify_signature(CALLBACK_SECRET, RAW, good, now=NOW)
    garbage = good | {"x-sinch-webhook-signature-timestamp": "yesterday"}
    assert not verify_signature(CALLBACK_SECRET, RAW, garbage, now=NOW)
    non_ascii = good | {"x-sinch-webhook-signature": "é"}
    assert not verify_signature(CALLBACK_SECRET, RAW, non_ascii, now=NOW)


# The fake's callbacks, end to end through parse_callback and verify_signature


class _Inbox(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]]

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(({k: v for k, v in self.headers.items()}, raw))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def inbox() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    received: list[tuple[dict[str, str], bytes]] = []
    handler = type("Inbox", (_Inbox,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()
    thread.join()


def test_fake_delivery_report_round_trip(
    fake: FakeSinch, inbox: tuple[str, list[tuple[dict[str, str], bytes]]]
) -> None:
    url, received = inbox
    config = make_config(fake.base_url, public_base_url=url)
    with SinchSender(config) as client:
        sent = client.send(TO, body(), "msg-17")

    assert fake.deliver(sent.message_id, "Delivered", signing_secret="hmac-key") == 204

    (raw_headers, raw) = received[0]
    headers = {k.lower(): v for k, v in raw_headers.items()}
    parsed = parse_callback(json.loads(raw))
    assert isinstance(parsed, DeliveryReport)
    assert (parsed.batch_id, parsed.recipient, parsed.status) == (sent.message_id, TO, "delivered")
    assert parsed.client_reference == "msg-17"
    now = float(headers["x-sinch-webhook-signature-timestamp"])
    assert verify_signature("hmac-key", raw, headers, now=now)


def test_fake_inbound_stop_round_trip(
    fake: FakeSinch, inbox: tuple[str, list[tuple[dict[str, str], bytes]]]
) -> None:
    url, received = inbox
    answer = httpx.post(
        f"{fake.base_url}/_fake/inbound", json={"url": url, "from": TO, "body": " Stop "}
    )
    assert answer.json() == {"callback_status": 204}

    parsed = parse_callback(json.loads(received[0][1]))
    assert isinstance(parsed, InboundMessage)
    assert (parsed.sender, parsed.to) == (TO, SENDER.lstrip("+"))
    assert opt_out_action(parsed.body) == "stop"


# The fake as a separate process, driven through its admin API


def test_fake_runs_as_a_process_with_an_admin_api() -> None:
    command = [sys.executable, "-m", "tests.fake_sinch", "--port", "0"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            base = f"http://127.0.0.1:{int(process.stdout.readline())}"
            with httpx.Client() as admin:
                admin.post(f"{base}/_fake/script", json={"actions": [{"status": 429}]})
                with SinchSender(make_config(base), sleep=lambda _: None) as client:
                    sent = client.send(TO, body(), "msg-18")
                batches = admin.get(f"{base}/_fake/batches").json()["batches"]
                seen = admin.get(f"{base}/_fake/requests").json()["requests"]
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert [b["id"] for b in batches] == [sent.message_id]
    assert [r["method"] for r in seen] == ["POST", "POST"]  # a 429 created nothing
    assert process.returncode == 0
