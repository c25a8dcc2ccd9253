"""Sinch webhooks (SPEC §10): delivery reports, inbound texts and opt-out keywords read from
Sinch's callbacks, and their HMAC signatures checked; pure functions, no I/O."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

SIGNATURE_TOLERANCE_SECONDS = 300
DeliveryStatus = Literal["dispatched", "delivered", "failed"]
OptOutAction = Literal["stop", "start"]


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
