"""Sinch SMS: the SmsSender protocol, a thin REST client, and pure webhook helpers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import requests
from urllib3.exceptions import NewConnectionError

from relay.ledger import Ledger
from relay.phone import mask
from relay.settings import Settings

log = logging.getLogger(__name__)

PROVIDER = "sinch"
SIGNATURE_TOLERANCE_SECONDS = 300
DeliveryStatus = Literal["dispatched", "delivered", "failed"]
OptOutAction = Literal["stop", "start"]

_LOOKUP_PAGE_SIZE = 100
_LOOKUP_MARGIN_SECONDS = 300  # clock skew between us and Sinch
_LOOKUP_MAX_PAGES = 3  # one client_reference holds one batch; bounded time under a lease


@dataclass(frozen=True)
class SendResult:
    """A message the provider accepted; message_id is the Sinch batch id."""

    message_id: str
    provider: str


class SmsSender(Protocol):
    """Anything that can hand one SMS to a carrier network."""

    def send(
        self,
        to: str,
        body: str,
        client_reference: str,
        keep_alive: Callable[[], None] | None = None,
    ) -> SendResult: ...

    def lookup(self, client_reference: str, since: float | None = None) -> SendResult | None: ...


class SmsDispatchError(Exception):
    """Sinch did not take the message. The message never holds a token, body or full number.

    retryable: sending again later may work (429, 5xx, network).
    maybe_sent: Sinch may hold the batch although it could not be confirmed; call
    SinchSender.lookup(client_reference) before any resend or refund.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        provider_code: str | None = None,
        retryable: bool = False,
        maybe_sent: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.provider_code = provider_code
        self.retryable = retryable
        self.maybe_sent = maybe_sent
        self.retry_after = retry_after


def compose_body(text: str, opt_out_line: str) -> str:
    """The body actually sent: the text, then the opt-out line on its own line."""
    return f"{text}\n{opt_out_line}" if opt_out_line else text


class SinchSender:
    """Sends one SMS as a Sinch batch, retrying only where that cannot send it twice."""

    def __init__(
        self,
        settings: Settings,
        *,
        session: requests.Session | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 20.0,
        max_attempts: int = 3,
        backoff_seconds: float = 0.5,
        max_wait_seconds: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        plan, token = settings.sinch_service_plan_id, settings.sinch_api_token
        if not (plan and token and settings.sinch_from):
            raise ValueError("SINCH_SERVICE_PLAN_ID, SINCH_API_TOKEN and SINCH_FROM are required")
        self._batches_url = f"{settings.sinch_base.rstrip('/')}/xms/v1/{plan}/batches"
        self._sender = settings.sinch_from
        self._callback_url = _callback_url(settings)
        self._session = session or requests.Session()
        self._session.headers.update(
            {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        )
        self._timeout = (connect_timeout, read_timeout)
        self._max_attempts = max(max_attempts, 1)
        self._backoff = backoff_seconds
        self._max_wait = max_wait_seconds
        self._sleep = sleep

    def close(self) -> None:
        """Release pooled connections."""
        self._session.close()

    def __enter__(self) -> SinchSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(
        self,
        to: str,
        body: str,
        client_reference: str,
        keep_alive: Callable[[], None] | None = None,
    ) -> SendResult:
        """Create the batch; raise SmsDispatchError once retries are spent or pointless.

        ``keep_alive`` is called before each attempt and look-up (the caller renews its
        lease there, or raises to stop).
        """
        payload = self._payload(to, body, client_reference)
        attempt = 0
        while True:
            attempt += 1
            if keep_alive is not None:
                keep_alive()
            try:
                return self._post(payload, to, client_reference)
            except SmsDispatchError as exc:
                self._log_failure(exc, to, client_reference, attempt)
                found = self._recover(exc, client_reference, attempt, keep_alive)
            if found is not None:
                return found

    def _recover(
        self,
        error: SmsDispatchError,
        client_reference: str,
        attempt: int,
        keep_alive: Callable[[], None] | None,
    ) -> SendResult | None:
        """Wait, then either find the batch a maybe-sent attempt created or give up: Sinch's
        list may lag behind its answer, so a batch missing from it is no proof that none
        was created, and a maybe-sent message is never posted again here (the reconciler
        looks once more, later, before any second hand-over or refund)."""
        last = attempt >= self._max_attempts
        if not error.retryable or (last and not error.maybe_sent):
            raise error
        self._sleep(self._delay(error, attempt))
        if not error.maybe_sent:
            return None
        if keep_alive is not None:
            keep_alive()
        found = self.lookup(client_reference)
        if found is None:
            raise error
        return found

    def _log_failure(
        self, error: SmsDispatchError, to: str, client_reference: str, attempt: int
    ) -> None:
        log.warning(
            "sinch send to %s (ref %s) attempt %d/%d failed: %s",
            mask(to),
            client_reference,
            attempt,
            self._max_attempts,
            error,
        )

    def lookup(self, client_reference: str, since: float | None = None) -> SendResult | None:
        """The batch already created under client_reference at or after ``since`` (epoch
        seconds; the payment's creation) — Sinch lists only the last 24 hours unless asked.

        Raises SmsDispatchError(maybe_sent=True) when Sinch cannot be asked.
        """
        try:
            return self._find(client_reference, since)
        except (requests.RequestException, ValueError) as exc:
            raise SmsDispatchError(
                "Sinch did not confirm the message and could not be asked; it may have been sent.",
                maybe_sent=True,
            ) from exc

    def _find(self, client_reference: str, since: float | None) -> SendResult | None:
        for page in range(_LOOKUP_MAX_PAGES):
            batches, more = self._list_page(client_reference, page, since)
            for batch in batches:
                if batch.get("client_reference") == client_reference and batch.get("id"):
                    log.info("sinch batch %s found for ref %s", batch["id"], client_reference)
                    return SendResult(message_id=str(batch["id"]), provider=PROVIDER)
            if not more:
                return None
        return None

    def _payload(self, to: str, body: str, client_reference: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "from": self._sender,
            "to": [to],
            "body": body,
            "delivery_report": "per_recipient",
            "client_reference": client_reference,
        }
        if self._callback_url:
            payload["callback_url"] = self._callback_url
        return payload

    def _post(self, payload: dict[str, Any], to: str, client_reference: str) -> SendResult:
        try:
            response = self._session.post(self._batches_url, json=payload, timeout=self._timeout)
        except requests.RequestException as exc:
            raise _transport_error(exc) from exc
        with response:
            result = _created(response)
        log.info(
            "sinch batch %s created for %s (ref %s)",
            result.message_id,
            mask(to),
            client_reference,
        )
        return result

    def _list_page(
        self, client_reference: str, page: int, since: float | None
    ) -> tuple[list[dict[str, Any]], bool]:
        params: dict[str, str | int] = {
            "client_reference": client_reference,
            "page": page,
            "page_size": _LOOKUP_PAGE_SIZE,
        }
        if since is not None:
            params["start_date"] = _iso8601(since - _LOOKUP_MARGIN_SECONDS)
        with self._session.get(self._batches_url, params=params, timeout=self._timeout) as response:
            response.raise_for_status()
            data = response.json()
        if not isinstance(data, dict) or not isinstance(data.get("batches", []), list):
            raise ValueError("unexpected batch list from Sinch")
        batches = [b for b in data.get("batches", []) if isinstance(b, dict)]
        count = data.get("count")
        more = bool(batches) and isinstance(count, int) and (page + 1) * _LOOKUP_PAGE_SIZE < count
        return batches, more

    def _delay(self, error: SmsDispatchError, attempt: int) -> float:
        wait = (
            error.retry_after
            if error.retry_after is not None
            else self._backoff * 2 ** (attempt - 1)
        )
        return min(max(wait, 0.0), self._max_wait)


def _iso8601(epoch: float) -> str:
    """Sinch's date format: YYYY-MM-DDThh:mm:ss.SSSZ (UTC)."""
    moment = datetime.fromtimestamp(max(epoch, 0.0), UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _callback_url(settings: Settings) -> str | None:
    if not (settings.public_base_url and settings.sinch_callback_secret):
        return None
    return f"{settings.public_base_url.rstrip('/')}/webhooks/sinch/{settings.sinch_callback_secret}"


def _transport_error(exc: requests.RequestException) -> SmsDispatchError:
    if _never_reached_sinch(exc):
        return SmsDispatchError("Could not connect to Sinch.", retryable=True)
    kind = "timed out" if isinstance(exc, requests.Timeout) else "broke off"
    return SmsDispatchError(f"The request to Sinch {kind}.", retryable=True, maybe_sent=True)


def _never_reached_sinch(exc: requests.RequestException) -> bool:
    """True when the connection was never made, so Sinch cannot have created the batch."""
    if isinstance(exc, requests.ConnectTimeout | requests.exceptions.SSLError):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(exc, requests.ConnectionError) and isinstance(reason, NewConnectionError)


def _created(response: requests.Response) -> SendResult:
    if response.status_code in (200, 201):
        batch_id = _json(response).get("id")
        if isinstance(batch_id, str) and batch_id:
            return SendResult(message_id=batch_id, provider=PROVIDER)
        raise SmsDispatchError(
            "Sinch answered without a batch id.", retryable=True, maybe_sent=True
        )
    raise _http_error(response)


def _http_error(response: requests.Response) -> SmsDispatchError:
    status = response.status_code
    code = _provider_code(_json(response))
    server_side = status >= 500
    return SmsDispatchError(
        f"Sinch answered HTTP {status}" + (f" ({code})." if code else "."),
        status=status,
        provider_code=code,
        retryable=server_side or status == 429,
        maybe_sent=server_side,
        retry_after=_retry_after(response.headers.get("Retry-After")),
    )


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _provider_code(data: Mapping[str, Any]) -> str | None:
    """Sinch's stable error code: {code, text}, or the newer {error: {status, ...}} shape."""
    code = data.get("code")
    if isinstance(code, str) and code:
        return code
    inner = data.get("error")
    status = inner.get("status") if isinstance(inner, dict) else None
    return status if isinstance(status, str) and status else None


def _retry_after(raw: str | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


# Webhooks: pure functions, no I/O.


@dataclass(frozen=True)
class DeliveryReport:
    """A per-recipient delivery report (type recipient_delivery_report_sms)."""

    batch_id: str
    recipient: str
    status: DeliveryStatus
    provider_status: str
    code: int | None
    at: str | None
    client_reference: str | None


@dataclass(frozen=True)
class InboundMessage:
    """A text someone sent to our number (type mo_text)."""

    message_id: str | None
    sender: str
    to: str
    body: str
    received_at: str | None


_STATUSES: dict[str, DeliveryStatus] = {
    "queued": "dispatched",
    "dispatched": "dispatched",
    "unknown": "dispatched",
    "delivered": "delivered",
    "aborted": "failed",
    "cancelled": "failed",
    "failed": "failed",
    "expired": "failed",
    "rejected": "failed",
    "deleted": "failed",
}
_STOP_WORDS = frozenset({"stop", "stopall", "unsubscribe", "cancel", "end", "quit"})
_START_WORDS = frozenset({"start", "unstop", "yes"})


def parse_callback(payload: Mapping[str, Any]) -> DeliveryReport | InboundMessage | None:
    """A Sinch callback as a DeliveryReport or InboundMessage; None for anything else."""
    if not isinstance(payload, Mapping):
        return None
    kind = payload.get("type")
    if kind == "recipient_delivery_report_sms":
        return _delivery_report(payload)
    if kind == "mo_text":
        return _inbound(payload)
    return None


def _delivery_report(payload: Mapping[str, Any]) -> DeliveryReport | None:
    batch_id, recipient, raw = (_text(payload, k) for k in ("batch_id", "recipient", "status"))
    status = _STATUSES.get(raw.casefold()) if raw else None
    if not (batch_id and recipient and raw and status):
        return None
    code = payload.get("code")
    return DeliveryReport(
        batch_id=batch_id,
        recipient=_plus(recipient),
        status=status,
        provider_status=raw,
        code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        at=_text(payload, "at"),
        client_reference=_text(payload, "client_reference"),
    )


def _inbound(payload: Mapping[str, Any]) -> InboundMessage | None:
    sender, to, body = _text(payload, "from"), _text(payload, "to"), payload.get("body")
    if not (sender and to and isinstance(body, str)):
        return None
    return InboundMessage(
        message_id=_text(payload, "id"),
        sender=_plus(sender),
        to=to,
        body=body,
        received_at=_text(payload, "received_at"),
    )


def _text(payload: Mapping[str, Any], key: str) -> str | None:
    value = payload.get(key)
    return value if isinstance(value, str) and value else None


def _plus(msisdn: str) -> str:
    """Sinch often omits the + of E.164 in callbacks; put it back."""
    return f"+{msisdn}" if msisdn.isdigit() else msisdn


def opt_out_action(body: str) -> OptOutAction | None:
    """stop or start when the whole message is an opt-out or opt-in keyword."""
    word = body.strip().rstrip(".!").strip().casefold()
    if word in _STOP_WORDS:
        return "stop"
    if word in _START_WORDS:
        return "start"
    return None


def sign_callback(secret: str, body: bytes, nonce: str, timestamp: str) -> str:
    """Sinch's callback signature: base64(HMAC-SHA256(secret, body.nonce.timestamp))."""
    signed = body + b"." + nonce.encode() + b"." + timestamp.encode()
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def verify_signature(
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    now: float,
    tolerance: float = SIGNATURE_TOLERANCE_SECONDS,
) -> bool:
    """Whether the x-sinch-webhook-signature headers sign this exact body, recently."""
    lower = {k.lower(): v for k, v in headers.items()}
    signature = lower.get("x-sinch-webhook-signature")
    nonce = lower.get("x-sinch-webhook-signature-nonce")
    timestamp = lower.get("x-sinch-webhook-signature-timestamp")
    if not (secret and signature and nonce and timestamp):
        return False
    signed_at = _epoch(timestamp)
    if signed_at is None or abs(now - signed_at) > tolerance:
        return False
    expected = sign_callback(secret, body, nonce, timestamp)
    return hmac.compare_digest(expected.encode(), signature.encode())


def _epoch(timestamp: str) -> float | None:
    """Seconds since the epoch, or an ISO-8601 instant with a zone."""
    try:
        return float(int(timestamp))
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo else None


class OutboxSender:
    """Development SMS provider: messages are stored in the database, nothing leaves."""

    def __init__(self, ledger: Ledger, clock: Callable[[], float] = time.time) -> None:
        self._ledger = ledger
        self._clock = clock

    def send(
        self,
        to: str,
        body: str,
        client_reference: str,
        keep_alive: Callable[[], None] | None = None,
    ) -> SendResult:
        """Store the message once per client reference."""
        row = {
            "message_id": "outbox-" + secrets.token_hex(10),
            "client_reference": client_reference,
            "destination": to,
            "body": body,
            "created_at": self._clock(),
        }
        stored = self._ledger.outbox_put(row)
        log.info("outbox message to %s stored", mask(to))
        return SendResult(message_id=stored["message_id"], provider="outbox")

    def lookup(self, client_reference: str, since: float | None = None) -> SendResult | None:
        """The message stored under this client reference, if any (the outbox keeps all)."""
        found = self._ledger.outbox_find(client_reference)
        return None if found is None else SendResult(found["message_id"], "outbox")


def build_sender(settings: Settings, ledger: Ledger) -> SmsSender:
    """The SMS provider chosen by SMS_PROVIDER."""
    if settings.sms_provider == "outbox":
        return OutboxSender(ledger)
    return SinchSender(settings)
