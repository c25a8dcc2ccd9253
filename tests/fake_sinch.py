"""A local fake of the Sinch SMS REST API (xms/v1) that speaks its wire protocol.

In-process: ``with FakeSinch() as sinch: ...`` (sinch.base_url, sinch.script(...),
sinch.batches, sinch.requests). As a process: ``python -m tests.fake_sinch --port 0``
prints the port, then serves; the admin API under /_fake/ scripts and inspects it:

    GET  /_fake/batches    {"batches": [...]}         every batch created, oldest first
    GET  /_fake/requests   {"requests": [...]}        every /xms request: method, path, query, json
    POST /_fake/script     {"actions": [Action...]}   answers for the next batch creations
    POST /_fake/deliver    {"batch_id", "status", "code", "signing_secret"?}  send a delivery report
    POST /_fake/inbound    {"url", "from", "to", "body", "signing_secret"?}   send an inbound text
    POST /_fake/reset      forget batches, requests and script

An Action is {"status": 201, "code": null, "text": null, "retry_after": null, "hang": 0,
"record": null}: answer with that status and Sinch error JSON {code, text}; with hang > 0,
stall that long and then drop the connection unanswered; record (default: status is 2xx)
says whether the batch is created anyway, e.g. {"hang": 5, "record": true} is "created,
but the response was lost".
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import re
import secrets
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.http_thread import ServedInBackground

PLAN_ID = "fakeplan0123456789abcdef"
TOKEN = "fake-sinch-token"
SENDER = "+12025550100"

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_MSISDN = re.compile(r"^\+?[1-9]\d{6,14}$")
_BATCH_PATH = re.compile(r"^/xms/v1/([^/]+)/batches(?:/([^/]+))?/?$")
_DELIVERY_REPORTS = {"none", "summary", "full", "per_recipient", "per_recipient_final"}
_KNOWN_FIELDS = {
    "type", "from", "to", "body", "delivery_report", "callback_url", "client_reference",
    "send_at", "expire_at", "flash_message", "feedback_enabled", "parameters",
    "max_number_of_message_parts", "truncate_concat", "from_ton", "from_npi",
}  # fmt: skip


@dataclass
class Action:
    """One scripted answer to a batch creation."""

    status: int = 201
    code: str | None = None
    text: str | None = None
    retry_after: int | None = None
    hang: float = 0.0
    record: bool | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Action:
        """An Action from its admin-API JSON; unknown keys are an error."""
        return cls(**data)

    @property
    def creates(self) -> bool:
        """Whether the batch is recorded."""
        return self.record if self.record is not None else 200 <= self.status < 300


@dataclass
class Recorded:
    """One request the fake saw on the Sinch API."""

    method: str
    path: str
    query: dict[str, list[str]]
    json: Any
    authorized: bool


class _BadRequest(Exception):
    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(text)
        self.status, self.code, self.text = status, code, text


@dataclass
class _State:
    batches: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    script: deque[Action] = field(default_factory=deque)


class FakeSinch(ServedInBackground):
    """The fake server: a ThreadingHTTPServer on 127.0.0.1 in a background thread."""

    def __init__(
        self, plan_id: str = PLAN_ID, token: str = TOKEN, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.plan_id, self.token = plan_id, token
        self._lock = threading.Lock()
        self._state = _State()
        self._stopping = threading.Event()
        server = ThreadingHTTPServer((host, port), _Handler)
        server.fake = self  # type: ignore[attr-defined]
        super().__init__(server)

    @property
    def base_url(self) -> str:
        """What to put in SINCH_BASE_URL."""
        return self.url

    def stopping(self) -> None:
        """Wake any stalled handler."""
        self._stopping.set()

    def script(self, *actions: Action | dict[str, Any]) -> None:
        """Queue answers for the next batch creations (then back to normal 201s)."""
        with self._lock:
            for action in actions:
                self._state.script.append(
                    action if isinstance(action, Action) else Action.from_json(action)
                )

    def reset(self) -> None:
        """Forget everything seen and scripted."""
        with self._lock:
            self._state = _State()

    @property
    def batches(self) -> list[dict[str, Any]]:
        """Every batch created, oldest first."""
        with self._lock:
            return [dict(b) for b in self._state.batches]

    @property
    def requests(self) -> list[Recorded]:
        """Every request seen on /xms/v1."""
        with self._lock:
            return list(self._state.requests)

    def create_attempts(self) -> int:
        """How many batch creations (POSTs) were attempted."""
        return sum(1 for r in self.requests if r.method == "POST")

    def deliver(
        self,
        batch_id: str,
        status: str = "Delivered",
        code: int = 0,
        signing_secret: str | None = None,
    ) -> int:
        """POST a recipient delivery report to the batch's callback_url; the HTTP status."""
        batch = next(b for b in self.batches if b["id"] == batch_id)
        report = delivery_report(batch_id, batch["to"][0], status, code)
        if "client_reference" in batch:
            report["client_reference"] = batch["client_reference"]
        return post_callback(batch["callback_url"], report, signing_secret)

    def inbound(
        self, url: str, sender: str, body: str, to: str = SENDER, signing_secret: str | None = None
    ) -> int:
        """POST an mo_text callback (someone texting our number) to url; the HTTP status."""
        payload = inbound_text(**{"from": sender, "to": to.lstrip("+"), "body": body})
        return post_callback(url, payload, signing_secret)

    # Request handling, called from handler threads.

    def _handle(
        self, method: str, path: str, query: dict[str, list[str]], auth: str, body: Any
    ) -> tuple[int, Any, dict[str, str], float]:
        match = _BATCH_PATH.match(path)
        if not match:
            raise _BadRequest(404, "not_found", "No such resource.")
        plan, batch_id = match.groups()
        expected = f"Bearer {self.token}".encode()
        authorized = plan == self.plan_id and hmac.compare_digest(auth.encode(), expected)
        seen = None if body is _INVALID else body
        with self._lock:
            self._state.requests.append(Recorded(method, path, query, seen, authorized))
        if not authorized:
            raise _BadRequest(401, "unauthorized", "Invalid service plan id or API token.")
        if method == "POST" and batch_id is None:
            return self._create(body)
        if method == "GET" and batch_id is None:
            return 200, self._list(query), {}, 0.0
        if method == "GET":
            return 200, self._get(batch_id), {}, 0.0
        raise _BadRequest(405, "method_not_allowed", "Method not allowed.")

    def _create(self, body: Any) -> tuple[int, Any, dict[str, str], float]:
        _validate_batch(body)
        with self._lock:
            action = self._state.script.popleft() if self._state.script else Action()
            batch = _batch(body) if action.creates else None
            if batch is not None:
                self._state.batches.append(batch)
        headers = {"Retry-After": str(action.retry_after)} if action.retry_after is not None else {}
        if action.status >= 300:
            error = {
                "code": action.code or _default_code(action.status),
                "text": action.text or "Scripted.",
            }
            return action.status, error, headers, action.hang
        return action.status, batch, headers, action.hang

    def _list(self, query: dict[str, list[str]]) -> dict[str, Any]:
        try:
            page = int(query.get("page", ["0"])[0])
            size = min(int(query.get("page_size", ["30"])[0]), 100)
        except ValueError as exc:
            raise _BadRequest(400, "syntax_invalid_parameter_format", "Bad paging.") from exc
        ref = query.get("client_reference", [None])[0]
        # As Sinch: only batches created at or after start_date (default: the last 24 hours).
        start = query.get("start_date", [None])[0]
        since = _parse_time(start) if start else datetime.now(UTC) - timedelta(hours=24)
        with self._lock:
            found = [
                b
                for b in reversed(self._state.batches)
                if (ref is None or b.get("client_reference") == ref)
                and _parse_time(b["created_at"]) >= since
            ]
        chunk = found[page * size : (page + 1) * size]
        return {"count": len(found), "page": page, "page_size": len(chunk), "batches": chunk}

    def age(self, seconds: float) -> None:
        """Move every batch's creation ``seconds`` into the past (a repair days later)."""
        with self._lock:
            for batch in self._state.batches:
                then = _parse_time(batch["created_at"]) - timedelta(seconds=seconds)
                batch["created_at"] = _format_time(then)

    def _get(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            for batch in self._state.batches:
                if batch["id"] == batch_id:
                    return dict(batch)
        raise _BadRequest(404, "not_found", "Batch not found.")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    timeout = 10
    server: ThreadingHTTPServer

    @property
    def fake(self) -> FakeSinch:
        return self.server.fake  # type: ignore[attr-defined,no-any-return]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read the recorded requests instead."""

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = _INVALID
        try:
            if url.path.startswith("/_fake/"):
                self._reply(*_admin(self.fake, method, url.path, body))
                return
            query = parse_qs(url.query)
            auth = self.headers.get("Authorization") or ""
            status, payload, headers, hang = self.fake._handle(method, url.path, query, auth, body)
        except _BadRequest as exc:
            self._reply(exc.status, {"code": exc.code, "text": exc.text})
            return
        if hang > 0:
            self.fake._stopping.wait(hang)
            self.close_connection = True  # the response is lost
            return
        self._reply(status, payload, headers)

    def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


_INVALID = object()


def _admin(fake: FakeSinch, method: str, path: str, body: Any) -> tuple[int, Any]:
    if (method, path) == ("GET", "/_fake/batches"):
        return 200, {"batches": fake.batches}
    if (method, path) == ("GET", "/_fake/requests"):
        return 200, {"requests": [asdict(r) for r in fake.requests]}
    if (method, path) == ("POST", "/_fake/reset"):
        fake.reset()
        return 200, {}
    if not isinstance(body, dict):
        raise _BadRequest(400, "syntax_invalid_json", "Admin requests need a JSON object.")
    try:
        return _admin_action(fake, method, path, body)
    except (TypeError, KeyError, StopIteration) as exc:
        raise _BadRequest(
            400, "syntax_constraint_violation", f"Bad admin request: {exc!r}"
        ) from exc


def _admin_action(fake: FakeSinch, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    if (method, path) == ("POST", "/_fake/script"):
        fake.script(*body["actions"])
        return 200, {"queued": len(body["actions"])}
    if (method, path) == ("POST", "/_fake/deliver"):
        args = {k: body[k] for k in ("status", "code", "signing_secret") if k in body}
        return 200, {"callback_status": fake.deliver(body["batch_id"], **args)}
    if (method, path) == ("POST", "/_fake/inbound"):
        extra = {k: body[k] for k in ("to", "signing_secret") if k in body}
        status = fake.inbound(body["url"], body["from"], body["body"], **extra)
        return 200, {"callback_status": status}
    raise _BadRequest(404, "not_found", "No such admin endpoint.")


def _validate_batch(body: Any) -> None:
    if body is _INVALID or not isinstance(body, dict):
        raise _BadRequest(400, "syntax_invalid_json", "The request body is not a JSON object.")
    unknown = sorted(set(body) - _KNOWN_FIELDS)
    if unknown:
        raise _BadRequest(400, "syntax_invalid_json", f"Unrecognized field {unknown[0]!r}.")
    for name in ("from", "body"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise _BadRequest(
                400, "syntax_constraint_violation", f"{name} must be a non-empty string."
            )
    _validate_recipients(body.get("to"))
    if len(body["body"]) > 2000:
        raise _BadRequest(
            400, "syntax_constraint_violation", "body is longer than 2000 characters."
        )
    if body.get("delivery_report", "none") not in _DELIVERY_REPORTS:
        raise _BadRequest(400, "syntax_invalid_parameter_format", "Unknown delivery_report.")
    callback = body.get("callback_url", "http://")
    if not isinstance(callback, str) or not callback.startswith(("http://", "https://")):
        raise _BadRequest(400, "syntax_invalid_parameter_format", "callback_url must be a URL.")
    reference = body.get("client_reference", "")
    if not isinstance(reference, str) or len(reference) > 2048:
        raise _BadRequest(400, "syntax_constraint_violation", "client_reference is too long.")


def _validate_recipients(to: Any) -> None:
    if not isinstance(to, list) or not 1 <= len(to) <= 1000:
        raise _BadRequest(400, "syntax_constraint_violation", "to must list 1 to 1000 recipients.")
    for number in to:
        if not isinstance(number, str) or not _MSISDN.match(number):
            raise _BadRequest(400, "syntax_invalid_parameter_format", "Invalid MSISDN in to.")


def _batch(body: dict[str, Any]) -> dict[str, Any]:
    now = _now()
    batch = {
        "id": batch_id(),
        "type": "mt_text",
        "from": body["from"],
        "to": list(body["to"]),
        "body": body["body"],
        "canceled": False,
        "created_at": now,
        "modified_at": now,
        "delivery_report": body.get("delivery_report", "none"),
        "flash_message": False,
        "feedback_enabled": False,
    }
    batch.update({k: body[k] for k in ("callback_url", "client_reference") if k in body})
    return batch


def batch_id() -> str:
    """A 26-character ULID-like id, as Sinch's batch ids look (01FC66621XXXXX119Z8PMV1QPQ)."""
    millis = int(time.time() * 1000)
    stamp = "".join(_CROCKFORD[(millis >> (5 * i)) & 31] for i in reversed(range(10)))
    return stamp + "".join(secrets.choice(_CROCKFORD) for _ in range(16))


def _default_code(status: int) -> str:
    return {400: "syntax_invalid_parameter_format", 401: "unauthorized", 403: "forbidden",
            429: "too_many_requests"}.get(status, "internal_error")  # fmt: skip


def _now() -> str:
    return _format_time(datetime.now(UTC))


def _format_time(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise _BadRequest(400, "syntax_invalid_parameter_format", "Bad date.") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def delivery_report(
    batch: str, recipient: str, status: str = "Delivered", code: int = 0
) -> dict[str, Any]:
    """A recipient_delivery_report_sms callback body, as Sinch sends for a batch."""
    return {
        "type": "recipient_delivery_report_sms",
        "batch_id": batch,
        "recipient": recipient.lstrip("+"),
        "status": status,
        "code": code,
        "at": _now(),
        "operator_status_at": _now(),
    }


def inbound_text(**fields: str) -> dict[str, Any]:
    """An mo_text callback body, as Sinch sends for a text to our number."""
    return {
        "type": "mo_text",
        "id": batch_id(),
        "from": fields["from"].lstrip("+"),
        "to": fields["to"],
        "body": fields["body"],
        "received_at": _now(),
        "operator_id": "31000",
    }


def signature_headers(secret: str, body: bytes, nonce: str, timestamp: int) -> dict[str, str]:
    """Sinch's callback HMAC headers for this body (an independent oracle for relay.sinch)."""
    signed = b".".join([body, nonce.encode(), str(timestamp).encode()])
    mac = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
    return {
        "x-sinch-webhook-signature": mac,
        "x-sinch-webhook-signature-nonce": nonce,
        "x-sinch-webhook-signature-timestamp": str(timestamp),
        "x-sinch-webhook-signature-algorithm": "HmacSHA256",
    }


def post_callback(url: str, payload: dict[str, Any], signing_secret: str | None = None) -> int:
    """POST a callback as Sinch would, signed when a secret is given; the HTTP status."""
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if signing_secret:
        headers |= signature_headers(signing_secret, body, secrets.token_hex(8), int(time.time()))
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def main(argv: list[str] | None = None) -> None:
    """Run the fake until interrupted, printing the bound port first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--plan-id", default=PLAN_ID)
    parser.add_argument("--token", default=TOKEN)
    args = parser.parse_args(argv)
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    with FakeSinch(args.plan_id, args.token, args.host, args.port) as fake:
        print(fake.port, flush=True)
        done.wait()


if __name__ == "__main__":
    main()
