"""Build real x402 payment headers in tests with the SDK's own client side.

``pay(challenge, key)`` is what a stock x402 v2 client sends for a PAYMENT-REQUIRED header;
``pay_v1(body, key)`` what a v1 client sends for the 402 JSON body; ``signed(...)`` builds a
v2 payload whose signed authorization differs from what it claims to accept (underpaid,
wrong recipient, expired), for the failure paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from eth_account import Account
from x402 import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequired,
    PaymentRequiredV1,
    PaymentRequirements,
    x402ClientSync,
)
from x402.extensions.payment_identifier import append_payment_identifier_to_extensions
from x402.http import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import ExactEvmClientScheme, register_exact_evm_client


def client_for(private_key: str) -> x402ClientSync:
    """A sync x402 client paying exact-EVM (v2 and v1) with an eth-account key."""
    client = x402ClientSync()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(private_key)))
    return client


def pay_payload(
    challenge: str, private_key: str, *, payment_id: str | None = None
) -> PaymentPayload:
    """The v2 payload a stock client signs for a PAYMENT-REQUIRED header value."""
    required = decode_payment_required_header(challenge)
    assert isinstance(required, PaymentRequired)
    extensions = None
    if payment_id is not None:
        extensions = append_payment_identifier_to_extensions(
            dict(required.extensions or {}), payment_id
        )
    payload = client_for(private_key).create_payment_payload(required, extensions=extensions)
    assert isinstance(payload, PaymentPayload)
    return payload


def pay(challenge: str, private_key: str, *, payment_id: str | None = None) -> str:
    """The PAYMENT-SIGNATURE header value a stock v2 client sends for ``challenge``."""
    return header(pay_payload(challenge, private_key, payment_id=payment_id))


def pay_v1(body: Mapping[str, Any], private_key: str) -> str:
    """The X-PAYMENT header value a v1 client sends for a 402 body with v1 ``accepts``."""
    required = PaymentRequiredV1.model_validate(dict(body))
    payload = client_for(private_key).create_payment_payload(required)
    assert isinstance(payload, PaymentPayloadV1)
    return header(payload)


def signed(req: PaymentRequirements, private_key: str, **signed_terms: Any) -> PaymentPayload:
    """A v2 payload that accepts ``req`` but signs ``req`` with ``signed_terms`` changed.

    ``signed_terms`` are PaymentRequirements fields: ``amount``, ``pay_to``,
    ``max_timeout_seconds`` (1 gives an authorization that expires at once).
    """
    terms = req.model_copy(update=signed_terms)
    scheme = ExactEvmClientScheme(Account.from_key(private_key))
    inner = scheme.create_payment_payload(terms)
    return PaymentPayload(x402_version=2, payload=inner, accepted=req)


def header(payload: PaymentPayload | PaymentPayloadV1) -> str:
    """A payload encoded as the PAYMENT-SIGNATURE / X-PAYMENT header value."""
    return encode_payment_signature_header(payload)
