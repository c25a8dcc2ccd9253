import pytest

from relay.errors import RateLimited, RelayError, all_error_classes, error_for_code

EXPECTED = {
    "unauthorized": 401,
    "invalid_input": 400,
    "quote_content_mismatch": 400,
    "quote_expired": 400,
    "payment_required": 402,
    "payment_verify_failed": 402,
    "payment_settlement_failed": 402,
    "rejected": 422,
    "sinch_send_failed_after_payment": 502,
    "quote_already_used": 409,
    "request_in_progress": 409,
    "idempotency_key_reused": 409,
    "settlement_pending": 202,
    "recipient_opted_out": 422,
    "unsupported_destination": 422,
    "message_too_long": 422,
    "rate_limited": 429,
    "moderation_unavailable": 503,
    "chain_unavailable": 503,
    "storage_unavailable": 503,
    "delivery_report_too_early": 503,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "internal_error": 500,
    "price_limit_exceeded": 402,
    "payment_terms_mismatch": 402,
    "budget_exceeded": 402,
}


def test_every_code_has_its_fixed_status() -> None:
    assert {cls.code: cls.status for cls in all_error_classes()} == EXPECTED


@pytest.mark.parametrize("cls", all_error_classes())
def test_body_shape(cls: type[RelayError]) -> None:
    body = cls().body()
    assert set(body) == {"error", "message", "retryable", "retry_after_seconds", "details"}
    assert body["error"] == cls.code
    assert body["message"]


def test_retry_after_header_and_extra_fields() -> None:
    error = RateLimited(retry_after=7, extra={"approved": False})
    assert error.response_headers() == {"Retry-After": "7"}
    assert error.body()["retry_after_seconds"] == 7
    assert error.body()["approved"] is False
    assert error.body()["retryable"] is True


def test_error_for_code_round_trips() -> None:
    for cls in all_error_classes():
        assert error_for_code(cls.code) is cls
    assert error_for_code("something_new") is RelayError
