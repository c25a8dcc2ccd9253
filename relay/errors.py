"""The one error tree: every failure the relay reports has a stable code and HTTP status."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class RelayError(Exception):
    """Base of every error the relay turns into a JSON response."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False
    default_message: ClassVar[str] = "Internal error."

    def __init__(
        self,
        message: str | None = None,
        *,
        details: dict[str, Any] | None = None,
        retry_after: int | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        self.details = details or {}
        self.retry_after = retry_after
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body every error response carries (SPEC §4)."""
        return ErrorBody(
            error=self.code,
            message=self.message,
            retryable=self.retryable,
            retry_after_seconds=self.retry_after,
            details=self.details,
            **self.extra,
        ).model_dump()

    def response_headers(self) -> dict[str, str]:
        """Headers to send with the error, including Retry-After when set."""
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers


class InvalidInput(RelayError):
    code, status, default_message = "invalid_input", 400, "The request is not valid."


class QuoteContentMismatch(RelayError):
    code, status = "quote_content_mismatch", 400
    default_message = "The message or destination differs from what the quote was issued for."


class QuoteExpired(RelayError):
    code, status, default_message = (
        "quote_expired",
        400,
        "The quote has expired; ask for a new one.",
    )


class Unauthorized(RelayError):
    code, status, default_message = "unauthorized", 401, "Missing or wrong X-Pay-Password header."


class PaymentRequired(RelayError):
    code, status, default_message = "payment_required", 402, "Payment required."


class PaymentVerifyFailed(RelayError):
    code, status, default_message = "payment_verify_failed", 402, "The payment did not verify."


class PaymentSettlementFailed(RelayError):
    code, status = "payment_settlement_failed", 402
    default_message = "The payment verified but could not be settled on-chain; no SMS was sent."


class NotFound(RelayError):
    code, status, default_message = "not_found", 404, "Not found."


class MethodNotAllowed(RelayError):
    code, status, default_message = "method_not_allowed", 405, "Method not allowed."


class QuoteAlreadyUsed(RelayError):
    code, status, default_message = (
        "quote_already_used",
        409,
        "This quote has already paid for an SMS.",
    )


class RequestInProgress(RelayError):
    code, status, retryable = "request_in_progress", 409, True
    default_message = "The same payment is being processed; retry shortly."


class IdempotencyKeyReused(RelayError):
    code, status = "idempotency_key_reused", 409
    default_message = "This payment identifier was already used with a different payment."


class PayloadTooLarge(RelayError):
    code, status, default_message = "payload_too_large", 413, "The request body is too large."


class Rejected(RelayError):
    code, status, default_message = "rejected", 422, "Moderation rejected the message."


class RecipientOptedOut(RelayError):
    code, status, default_message = "recipient_opted_out", 422, "The recipient has opted out."


class UnsupportedDestination(RelayError):
    code, status = "unsupported_destination", 422
    default_message = "This destination cannot receive SMS from the relay."


class MessageTooLong(RelayError):
    code, status, default_message = "message_too_long", 422, "The message has too many segments."


class RateLimited(RelayError):
    code, status, retryable = "rate_limited", 429, True
    default_message = "Too many requests; slow down."


class PriceLimitExceeded(RelayError):
    """Raised by the client, before signing, when the price is above the caller's cap."""

    code, status = "price_limit_exceeded", 402
    default_message = "The price is above the limit set for this send; nothing was signed."


class PaymentTermsMismatch(RelayError):
    """Raised by the client, before signing, when the 402 asks for other terms than the
    quote: another amount, network, asset or payee, or an authorization valid too long."""

    code, status = "payment_terms_mismatch", 402
    default_message = "The payment asked for differs from the quote; nothing was signed."


class BudgetExceeded(RelayError):
    """Raised by `relay mcp`, before signing, when a send would overspend its session budget."""

    code, status = "budget_exceeded", 402
    default_message = "This send would exceed the session budget; nothing was signed."


class InternalError(RelayError):
    """An unexpected failure; the details stay in the server log."""


class SinchSendFailedAfterPayment(RelayError):
    code, status = "sinch_send_failed_after_payment", 502
    default_message = "Payment settled on-chain but the SMS provider refused the message."


class ModerationUnavailable(RelayError):
    code, status, retryable = "moderation_unavailable", 503, True
    default_message = "Moderation is unavailable; retry shortly."


class StorageUnavailable(RelayError):
    code, status, retryable = "storage_unavailable", 503, True
    default_message = "The shared rate-limit storage is unreachable; retry shortly."


class ReportTooEarly(RelayError):
    code, status, retryable = "delivery_report_too_early", 503, True
    default_message = "The message this report is about is not recorded yet; send it again later."


class ChainUnavailable(RelayError):
    code, status, retryable = "chain_unavailable", 503, True
    default_message = "The blockchain is unreachable; retry shortly."


class SettlementPending(RelayError):
    """Not a failure: the transaction is broadcast and awaits confirmation."""

    code, status, retryable = "settlement_pending", 202, True
    default_message = "Settlement broadcast; awaiting confirmation. Retry the same request."


def error_for_code(code: str) -> type[RelayError]:
    """The error class of a stable code (the client raises these)."""
    for cls in all_error_classes():
        if cls.code == code:
            return cls
    return RelayError


def all_error_classes() -> list[type[RelayError]]:
    """Every concrete error class, for documentation and tests."""
    seen: dict[str, type[RelayError]] = {"internal_error": RelayError}
    stack = list(RelayError.__subclasses__())
    while stack:
        cls = stack.pop()
        seen.setdefault(cls.code, cls)
        stack.extend(cls.__subclasses__())
    return sorted(seen.values(), key=lambda c: (c.status, c.code))


def _every_code(schema: dict[str, Any]) -> None:
    schema["enum"] = [cls.code for cls in all_error_classes()]


class ErrorBody(BaseModel):
    """Every error has this shape; some codes add fields (see the responses)."""

    # Lax and open: an error must always be answerable; relay.wire names the added fields.
    model_config = ConfigDict(extra="allow")

    error: str = Field(
        description="Stable code; branch on this, never on message.",
        json_schema_extra=_every_code,
    )
    message: str
    retryable: bool
    retry_after_seconds: int | None = Field(
        description="Also sent as the Retry-After header when set."
    )
    details: dict[str, Any]


def unexpected(error: Exception) -> InternalError:
    """An error nothing expected: logged with its traceback, answered as a bare 500."""
    log.exception("unhandled error", exc_info=error)
    return InternalError()
