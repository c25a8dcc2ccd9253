"""x402 payment headers (SPEC §9): PAYMENT-SIGNATURE (v2) and X-PAYMENT (v1) decoded into a
``ParsedPayment`` with its EIP-3009 authorization checked for shape; nothing here asks the
chain or a facilitator."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from pydantic import BaseModel
from x402 import PaymentPayload, PaymentPayloadV1
from x402.extensions.payment_identifier import (
    PAYMENT_IDENTIFIER,
    extract_payment_identifier,
    validate_payment_identifier,
)
from x402.http import decode_payment_signature_header

from relay.errors import InvalidInput

MAX_HEADER_CHARS = 16 * 1024
V2_HEADER, V1_HEADER = "PAYMENT-SIGNATURE", "X-PAYMENT"
PAYMENT_HEADERS = (V2_HEADER, V1_HEADER)

_NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
#: The declared schema's rule for a payment-identifier's id, matched whole (a ``$`` would
#: let a trailing newline through).
_PAYMENT_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
_HEX = re.compile(r"0x[0-9a-fA-F]+")
_UINT = re.compile(r"[0-9]{1,78}")


class _Authorization(TypedDict):
    payer: str
    pay_to: str
    nonce: str
    value: int
    valid_after: int
    valid_before: int


@dataclass(frozen=True)
class ParsedPayment:
    """A decoded PAYMENT-SIGNATURE / X-PAYMENT header and its EIP-3009 authorization."""

    version: Literal[1, 2]
    payload: PaymentPayload | PaymentPayloadV1
    header: str
    payer: str
    pay_to: str
    nonce: str
    value: int
    valid_after: int
    valid_before: int
    payment_key: str
    payment_identifier: str | None

    def as_dict(self) -> dict[str, Any]:
        """The payload as JSON-ready data (for the ledger)."""
        return as_json(self.payload)


def as_json(model: BaseModel) -> dict[str, Any]:
    """An SDK model as JSON-ready data with its wire (camelCase) names."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def parse_payment(headers: Mapping[str, str]) -> ParsedPayment | None:
    """The payment in PAYMENT-SIGNATURE (v2) or X-PAYMENT (v1); None without either.

    Raises InvalidInput (details.field = the header) when it cannot be decoded.
    """
    found = _payment_header(headers)
    if found is None:
        return None
    name, raw = found
    payload = _decode(name, raw)
    auth = _authorization(name, payload.payload)
    return ParsedPayment(
        version=1 if isinstance(payload, PaymentPayloadV1) else 2,
        payload=payload,
        header=raw,
        payment_key=_payment_key(payload),
        payment_identifier=_payment_identifier(payload),
        **auth,
    )


def parse_stored(header: str, version: int) -> ParsedPayment:
    """A payment the ledger kept, parsed again from the header exactly as it arrived."""
    parsed = parse_payment({V1_HEADER if version == 1 else V2_HEADER: header})
    assert parsed is not None
    return parsed


def _payment_header(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """(name, value) of the payment header, preferring v2; header names are case-insensitive."""
    upper = {key.upper(): value for key, value in headers.items()}
    for name in PAYMENT_HEADERS:
        if name in upper:
            return name, upper[name]
    return None


def _malformed(field: str, problem: str) -> InvalidInput:
    return InvalidInput(
        f"The {field} header is not a valid x402 payment: {problem}.",
        details={"field": field, "problem": problem},
    )


def _decode(name: str, raw: str) -> PaymentPayload | PaymentPayloadV1:
    if len(raw) > MAX_HEADER_CHARS:
        raise _malformed(name, f"longer than {MAX_HEADER_CHARS} characters")
    try:
        payload = decode_payment_signature_header(raw.strip())
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise _malformed(name, "expected base64 of an x402 payment payload (JSON)") from exc
    if payload.x402_version != (1 if isinstance(payload, PaymentPayloadV1) else 2):
        raise _malformed(name, f"unsupported x402Version {payload.x402_version!r}")
    return payload


def _authorization(name: str, inner: dict[str, Any]) -> _Authorization:
    """The EIP-3009 authorization fields, validated and normalised (lowercase hex). Nothing
    else may come with them: the SDK would pay by a Permit2 authorization beside them, and
    the relay would check and search the chain for the one it does not use."""
    if set(inner) - {"authorization", "signature"}:
        raise _malformed(name, "the payload may hold only an EIP-3009 authorization and signature")
    auth, signature = inner.get("authorization"), inner.get("signature")
    if (
        not isinstance(auth, dict)
        or not isinstance(signature, str)
        or not _HEX.fullmatch(signature)
    ):
        raise _malformed(name, "expected an EIP-3009 authorization and signature")
    payer, pay_to, nonce = auth.get("from"), auth.get("to"), auth.get("nonce")
    if not (_is_address(payer) and _is_address(pay_to)):
        raise _malformed(name, "authorization.from and .to must be addresses")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise _malformed(name, "authorization.nonce must be 32 bytes of hex")
    numbers = {
        key: _uint(name, key, auth.get(key)) for key in ("value", "validAfter", "validBefore")
    }
    return _Authorization(
        payer=str(payer).lower(),
        pay_to=str(pay_to).lower(),
        nonce=nonce.lower(),
        value=numbers["value"],
        valid_after=numbers["validAfter"],
        valid_before=numbers["validBefore"],
    )


def _is_address(value: Any) -> bool:
    """``0x`` and 40 hex digits, in any case (what is signed is the 20 bytes)."""
    return isinstance(value, str) and _ADDRESS.fullmatch(value) is not None


def _uint(name: str, key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _UINT.fullmatch(value):
        return int(value)
    raise _malformed(name, f"authorization.{key} must be a non-negative integer")


def _payment_key(payload: PaymentPayload | PaymentPayloadV1) -> str:
    """SHA-256 of the canonical payload JSON: the same payment always has the same key."""
    canonical = json.dumps(as_json(payload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _payment_identifier(payload: PaymentPayload | PaymentPayloadV1) -> str | None:
    """The payment-identifier extension's id (v2 only); InvalidInput if malformed.

    A payer echoes the extension back with the JSON Schema the 402 declared, but any schema
    it sends is its own: running it would let a payer pick the rules (and the cost) of its
    own check. The SDK's checks without it are the declared schema's rules (a boolean
    ``required``, an id of 16 to 128 letters, digits, hyphens and underscores).
    """
    if not isinstance(payload, PaymentPayload) or not payload.extensions:
        return None
    extension = payload.extensions.get(PAYMENT_IDENTIFIER)
    if not extension:
        return None
    if isinstance(extension, dict):
        extension = {key: value for key, value in extension.items() if key != "schema"}
    validation = validate_payment_identifier(extension)
    identifier = extract_payment_identifier(payload, validate=False)
    errors = list(validation.errors)
    if validation.valid and identifier is not None and not _PAYMENT_ID.fullmatch(identifier):
        errors.append("the id must be 16 to 128 letters, digits, hyphens and underscores")
    if errors:
        raise InvalidInput(
            "The payment-identifier extension is not valid: " + "; ".join(errors),
            details={"field": PAYMENT_IDENTIFIER, "problem": "; ".join(errors)},
        )
    return identifier
