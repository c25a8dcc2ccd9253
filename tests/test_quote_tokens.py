import pytest
from itsdangerous import URLSafeSerializer

from relay.errors import InvalidInput, QuoteContentMismatch, QuoteExpired
from relay.quote_tokens import QuoteClaims, QuoteSigner, message_sha256

NOW = 1_800_000_000


def claims(**changes: object) -> QuoteClaims:
    fields: dict[str, object] = dict(
        message_sha256=message_sha256("hello"),
        to="+13012576365",
        segments=1,
        encoding="GSM-7",
        price_atomic=50626,
        verdict_id="v1",
        smart_encoding=False,
        issued_at=NOW,
    )
    fields.update(changes)
    return QuoteClaims.new(**fields)


SIGNER = QuoteSigner("s" * 32, ttl_seconds=600)


def test_round_trip() -> None:
    original = claims()
    token = SIGNER.sign(original)
    assert SIGNER.verify(token, message="hello", to="+13012576365", now=NOW + 10) == original


def test_token_never_contains_the_text() -> None:
    token = SIGNER.sign(claims(message_sha256=message_sha256("secret words")))
    assert "secret" not in token


@pytest.mark.parametrize(("message", "to"), [("hello!", "+13012576365"), ("hello", "+13012576366")])
def test_mismatch(message: str, to: str) -> None:
    token = SIGNER.sign(claims())
    with pytest.raises(QuoteContentMismatch):
        SIGNER.verify(token, message=message, to=to, now=NOW)


def test_a_token_that_matched_once_is_still_checked_on_every_request() -> None:
    """What matched is remembered per token, message and destination, never per token: the
    same token with another text or number is refused after a match, and its expiry still
    ends it."""
    signer = QuoteSigner("s" * 32, ttl_seconds=600)
    token = signer.sign(claims())
    assert signer.verify(token, message="hello", to="+13012576365", now=NOW)
    for message, to in [("hello!", "+13012576365"), ("hello", "+13012576366")]:
        with pytest.raises(QuoteContentMismatch):
            signer.verify(token, message=message, to=to, now=NOW)
    assert signer.verify(token, message="hello", to="+13012576365", now=NOW + 600)
    with pytest.raises(QuoteExpired):
        signer.verify(token, message="hello", to="+13012576365", now=NOW + 601)


def test_expired_after_ttl() -> None:
    token = SIGNER.sign(claims())
    SIGNER.verify(token, message="hello", to="+13012576365", now=NOW + 600)
    with pytest.raises(QuoteExpired):
        SIGNER.verify(token, message="hello", to="+13012576365", now=NOW + 601)


@pytest.mark.parametrize(
    "token",
    ["", "garbage", QuoteSigner("x" * 32, 600).sign(claims()), SIGNER.sign(claims()) + "x"],
)
def test_bad_signature_is_invalid_input(token: str) -> None:
    with pytest.raises(InvalidInput) as info:
        SIGNER.verify(token, message="hello", to="+13012576365", now=NOW)
    assert info.value.details == {"field": "quote_token"}


def test_unique_quote_ids() -> None:
    assert claims().quote_id != claims().quote_id


def test_a_rotation_keeps_live_quotes_valid() -> None:
    old, new = "old-secret-0123456789", "new-secret-0123456789"
    before = QuoteSigner(old, 600).sign(claims())
    rotated = QuoteSigner(new, 600, previous=old)
    assert rotated.verify(before, message="hello", to="+13012576365", now=NOW).quote_id
    after = rotated.sign(claims())
    QuoteSigner(new, 600).verify(after, message="hello", to="+13012576365", now=NOW)
    with pytest.raises(InvalidInput):  # signed with the new secret, not the previous one
        QuoteSigner(old, 600).verify(after, message="hello", to="+13012576365", now=NOW)
    with pytest.raises(InvalidInput):  # once the previous secret is dropped
        QuoteSigner(new, 600).verify(before, message="hello", to="+13012576365", now=NOW)


def test_tokens_are_read_by_relays_that_compress_them_and_read_theirs() -> None:
    """Tokens are written without zlib (any URLSafeSerializer reads them); a token written
    compressed, as an itsdangerous URLSafeSerializer with the same key and salt does, still
    verifies: relays of either kind in one fleet accept each other's quotes."""
    compressing = URLSafeSerializer(["s" * 32], salt="relay.quote-token")
    original = claims()
    token = SIGNER.sign(original)
    assert not token.startswith(".")  # not compressed
    assert compressing.loads(token) == {"v": 1, **vars(original)}
    written_compressed = compressing.dumps({"v": 1, **vars(original)})
    assert written_compressed.startswith(".")
    assert (
        SIGNER.verify(written_compressed, message="hello", to="+13012576365", now=NOW) == original
    )
