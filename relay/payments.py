"""x402 payments (SPEC §9): the 402 challenge, verification and settlement.

``Payments`` is the one place the server asks the facilitator (``relay.facilitator``): it
builds the challenge, matches a payment (``relay.payment_headers``) to it, verifies and settles
it, and confirms the settlement from the chain (``relay.chain``). The rest of the app sees
``ParsedPayment``, ``Settlement``, header strings and ``RelayError``s; it only passes the SDK's
``PaymentRequirements`` back in.

Three SDK behaviours shape this module:

- With ``paymentFlow: "upfront"`` the resource server's ``verify_payment`` returns valid without
  asking the facilitator (the upfront flow verifies inside settle), so ``verify`` asks the
  facilitator itself: a bad payment is ``payment_verify_failed`` before anything is claimed.
- The SDK's v1 settle loses the transaction hash when the receipt wait times out, so a v1
  ``X-PAYMENT`` is verified and settled as the equivalent v2 payload (same EIP-3009
  authorization, ``accepted`` = this request's requirements); a timeout is then always
  ``settlement_pending`` with its hash.
- The local facilitator reports an unreachable RPC as an invalid signature; such verdicts are
  checked against the chain and become ``chain_unavailable``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from web3 import Web3
from x402 import (
    AssetAmount,
    PaymentPayload,
    PaymentRequirements,
    PaymentRequirementsV1,
    ResourceConfig,
    ResourceInfo,
    SettleResponse,
    x402FacilitatorSync,
    x402ResourceServerSync,
)
from x402.extensions.payment_identifier import (
    PAYMENT_IDENTIFIER,
    declare_payment_identifier_extension,
)
from x402.http import (
    HTTPFacilitatorClientSync,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.mechanisms.evm.constants import (
    ERR_AUTHORIZATION_VALUE_MISMATCH,
    ERR_FAILED_TO_VERIFY_SIGNATURE,
    ERR_INSUFFICIENT_BALANCE,
    ERR_INVALID_SIGNATURE,
    ERR_NONCE_ALREADY_USED,
    ERR_RECIPIENT_MISMATCH,
    ERR_SETTLEMENT_PENDING,
    ERR_TRANSACTION_FAILED,
    ERR_TRANSACTION_SIMULATION_FAILED,
    ERR_VALID_BEFORE_EXPIRED,
)
from x402.mechanisms.evm.exact import ExactEvmServerScheme

from relay.chain import (
    RETRY_AFTER_SECONDS,
    AuthorizationFate,
    ChainReader,
    authorization_log,
    chain_unavailable,
    paying_transfer,
)
from relay.configs import PaymentConfig
from relay.errors import (
    ChainUnavailable,
    InternalError,
    PaymentSettlementFailed,
    PaymentVerifyFailed,
    RelayError,
    SettlementPending,
)
from relay.facilitator import (
    SimulatingFacilitator,
    build_facilitator,
    just_verified,
    waited_receipt,
)
from relay.memo import Memo
from relay.nonces import NonceStore
from relay.payment_headers import ParsedPayment, as_json, parse_payment, parse_stored
from relay.transport import never_sent

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEME = "exact"
MAX_TIMEOUT_SECONDS = 300
PING_CACHE_SECONDS = 10.0
V2_RESPONSE_HEADER, V1_RESPONSE_HEADER = "PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE"
REQUIREMENTS_MISMATCH = "requirements_mismatch"
#: A validBefore may lie this much beyond the advertised maxTimeoutSeconds (clock skew).
VALIDITY_ALLOWANCE_SECONDS = 60
VALIDITY_TOO_LONG = "authorization_validity_too_long"
#: The authorization was used on-chain, but its own Transfer did not pay this relay.
NOT_PAID = "authorization_used_without_payment"

# Reasons the local facilitator also reports when the RPC fails rather than the payment.
_MAYBE_RPC_FAILURE = {
    ERR_FAILED_TO_VERIFY_SIGNATURE,
    ERR_TRANSACTION_SIMULATION_FAILED,
    ERR_TRANSACTION_FAILED,
}
_HINTS = {
    ERR_INSUFFICIENT_BALANCE: "The payer's USDC balance is too low (testnet: faucet.circle.com).",
    ERR_AUTHORIZATION_VALUE_MISMATCH: "The authorization is not for the required amount.",
    ERR_RECIPIENT_MISMATCH: "The authorization pays someone other than this relay.",
    VALIDITY_TOO_LONG: "The authorization stays valid longer than maxTimeoutSeconds allows.",
    ERR_VALID_BEFORE_EXPIRED: "The authorization has expired; sign a new payment.",
    ERR_INVALID_SIGNATURE: "The payment signature is not valid for this payer and token.",
    ERR_NONCE_ALREADY_USED: "This authorization has already been used.",
    REQUIREMENTS_MISMATCH: "The payment is for other terms than this request requires.",
}
_HTTP_FAILURE = re.compile(r"^Facilitator (?:verify|settle) failed \((\d{3})\): (.*)$", re.S)


@dataclass(frozen=True)
class Settlement:
    """A confirmed on-chain settlement."""

    transaction: str
    log_index: int
    payer: str
    network: str
    raw: SettleResponse


class Payments:
    """Challenge, parse, match, verify and settle x402 payments for one network."""

    def __init__(self, config: PaymentConfig, nonces: NonceStore) -> None:
        self._config = config
        self._chain = ChainReader(config.chain)
        self._facilitator = build_facilitator(config, nonces)
        self._server = x402ResourceServerSync(self._facilitator)
        # The SDK's scheme class is untyped and declares payment_flows loosely.
        scheme = ExactEvmServerScheme()  # type: ignore[no-untyped-call]
        self._server.register(config.chain.network, scheme)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._ready = False
        self._pinged_at = float("-inf")
        self._ping_failed = False
        self._requirements: Memo[int, PaymentRequirements] = Memo(4096)

    # ------------------------------------------------------------------ the 402 challenge

    def requirements(self, amount_atomic: int) -> PaymentRequirements:
        """The exact-USDC requirements for one request of ``amount_atomic`` units.

        Raises ChainUnavailable while the facilitator cannot be reached.
        """
        if amount_atomic <= 0:
            raise ValueError("amount_atomic must be positive")
        self._ensure_ready()
        return self._requirements.get_or_make(amount_atomic, lambda: self._build(amount_atomic))

    def _build(self, amount_atomic: int) -> PaymentRequirements:
        """Built once per amount and process: they never change while the process lives."""
        chain = self._config.chain
        name, version = chain.usdc_eip712
        price = AssetAmount(
            amount=str(amount_atomic),
            asset=Web3.to_checksum_address(chain.usdc_address),
            extra={"name": name, "version": version},
        )
        config = ResourceConfig(
            scheme=SCHEME,
            network=chain.network,
            pay_to=Web3.to_checksum_address(self._config.pay_to_address),
            price=price,
            max_timeout_seconds=MAX_TIMEOUT_SECONDS,
            extra={"paymentFlow": "upfront"},
        )
        return self._server.build_payment_requirements(config)[0]

    def challenge(
        self,
        req: PaymentRequirements,
        *,
        resource_url: str,
        description: str,
        error: str | None = None,
        discovery: dict[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """The PAYMENT-REQUIRED header value and the v1 fields of the 402 JSON body;
        ``discovery``: extensions that describe the resource to catalogues (Bazaar)."""
        resource = ResourceInfo(
            url=resource_url, description=description, mime_type="application/json"
        )
        extensions = {
            PAYMENT_IDENTIFIER: declare_payment_identifier_extension(),
            **(discovery or {}),
        }
        required = self._server.create_payment_required_response([req], resource, error, extensions)
        v1 = {"x402Version": 1, "accepts": [as_json(self._v1_requirements(req, resource))]}
        return encode_payment_required_header(required), v1

    def _v1_requirements(
        self, req: PaymentRequirements, resource: ResourceInfo
    ) -> PaymentRequirementsV1:
        return PaymentRequirementsV1(
            scheme=req.scheme,
            network=self._config.chain.v1_network,
            max_amount_required=req.amount,
            resource=resource.url,
            description=resource.description,
            mime_type=resource.mime_type,
            pay_to=req.pay_to,
            max_timeout_seconds=req.max_timeout_seconds,
            asset=req.asset,
            extra=dict(req.extra),
        )

    # ------------------------------------------------------------------ the paid request

    def parse_payment(self, headers: Mapping[str, str]) -> ParsedPayment | None:
        """The payment in PAYMENT-SIGNATURE (v2) or X-PAYMENT (v1); None without either.

        Raises InvalidInput (details.field = the header) when it cannot be decoded.
        """
        return parse_payment(headers)

    def match(
        self, parsed: ParsedPayment, req: PaymentRequirements, now: float
    ) -> PaymentRequirements:
        """The requirements ``parsed`` pays for; PaymentVerifyFailed unless exactly ``req``
        and valid no longer than the challenge's maxTimeoutSeconds (plus clock skew) from
        ``now``, so a payment left unsettled cannot stay pending for days."""
        payload = parsed.payload
        if isinstance(payload, PaymentPayload):
            matched = self._server.find_matching_requirements([req], payload) is not None
        else:
            matched = (payload.scheme, payload.network) == (
                req.scheme,
                self._config.chain.v1_network,
            )
        if not matched:
            raise _verify_failed(REQUIREMENTS_MISMATCH)
        if parsed.pay_to.lower() != req.pay_to.lower():
            raise _verify_failed(ERR_RECIPIENT_MISMATCH)
        if parsed.value != int(req.amount):
            raise _verify_failed(ERR_AUTHORIZATION_VALUE_MISMATCH)
        if parsed.valid_before > now + req.max_timeout_seconds + VALIDITY_ALLOWANCE_SECONDS:
            raise _verify_failed(VALIDITY_TOO_LONG)
        return req

    def verify(self, parsed: ParsedPayment, req: PaymentRequirements) -> str:
        """Ask the facilitator; the payer's address (lowercase) if the payment is good.

        Raises PaymentVerifyFailed (details.reason = the facilitator's reason) or
        ChainUnavailable.
        """
        payload = _as_v2(parsed, req)
        result = self._call(lambda: self._facilitator.verify(payload, req), settling=False)
        if not result.is_valid:
            reason = result.invalid_reason or "invalid_payment"
            self._raise_if_chain_down(reason)
            raise _verify_failed(reason)
        return (result.payer or parsed.payer).lower()

    def settle(
        self, parsed: ParsedPayment, req: PaymentRequirements, *, verified: bool = False
    ) -> Settlement:
        """Settle on-chain and wait for the receipt.

        The local facilitator simulates the transfer before broadcasting it (a replay or a
        spent balance fails before any gas is spent) unless ``verified``: this request's
        ``verify`` has just simulated it. A remote facilitator verifies inside its own settle.

        Raises PaymentSettlementFailed (details.reason, details.transaction); SettlementPending
        when it may have been broadcast but is unconfirmed (details.transaction: the hash, or
        None when a remote facilitator's answer was lost); ChainUnavailable when nothing was
        sent. After either of the last two, retry with the same payment, never a new one.
        """
        self._ensure_ready()
        payload = _as_v2(parsed, req)
        settling: AbstractContextManager[None] = just_verified() if verified else nullcontext()
        with settling:
            result = self._call(
                lambda: self._server.settle_payment(payload, req, phase="before-handler"),
                settling=True,
            )
        if not result.success:
            self._settle_failed(result.error_reason or "settlement_failed", result.transaction)
        try:
            settlement = self.confirm(parsed, req, result.transaction)
        except ChainUnavailable:  # settled, by the facilitator's word: pending, never lost
            raise settlement_pending(result.transaction) from None
        if settlement is None:  # a remote facilitator's node may be ahead of ours
            raise settlement_pending(result.transaction)
        return settlement

    def confirm(
        self, parsed: ParsedPayment, req: PaymentRequirements, transaction: str
    ) -> Settlement | None:
        """The outcome of a transaction that may have settled this payment.

        A Settlement when it is mined and this payment's own authorization produced the
        Transfer that paid (from the payer, to payTo, exactly the amount); None while it is
        not mined (pending or dropped). Raises PaymentSettlementFailed when it reverted,
        ``NOT_PAID`` when it used the authorization without paying, and ChainUnavailable.
        """
        receipt = waited_receipt(transaction) or self._chain.receipt(transaction)
        if receipt is None:
            return None
        if receipt["status"] != 1:
            raise _settlement_failed(ERR_TRANSACTION_FAILED, transaction)
        index = paying_transfer(list(receipt["logs"]), req.asset, parsed, req.pay_to)
        if index is None:
            used = authorization_log(list(receipt["logs"]), req.asset, parsed) is not None
            raise _settlement_failed(NOT_PAID if used else ERR_TRANSACTION_FAILED, transaction)
        return self.settlement_of(parsed, req, transaction, index)

    def settlement_of(
        self, parsed: ParsedPayment, req: PaymentRequirements, transaction: str, log_index: int
    ) -> Settlement:
        """The Settlement of a payment the ledger already knows as settled by ``transaction``."""
        raw = SettleResponse(
            success=True, transaction=transaction, network=req.network, payer=parsed.payer
        )
        return Settlement(transaction, log_index, parsed.payer, req.network, raw)

    def stored(self, header: str, version: int) -> ParsedPayment:
        """A payment the ledger kept, parsed again from the header exactly as it arrived."""
        return parse_stored(header, version)

    def fill_nonce_gap(self) -> str | None:
        """With the local facilitator, fill a gap in the settler's nonces that holds its
        later settlements back (relay.nonces.fill_gap): the fill's hash, or None."""
        if not isinstance(self._facilitator, SimulatingFacilitator):
            return None
        return self._facilitator.signer.fill_nonce_gap()

    def block_number(self) -> int | None:
        """The chain's height (cached a few seconds, so possibly a little lower); None when
        the chain cannot be asked. A settlement after a claim is never below it."""
        return self._chain.block_number()

    def fate(self, parsed: ParsedPayment, from_block: int | None) -> AuthorizationFate:
        """What the chain did with this payment's authorization, searching its logs from
        ``from_block`` (the payment's claim); ChainUnavailable when it cannot be asked."""
        return self._chain.fate(parsed, from_block)

    def reverted(self, transaction: str) -> bool:
        """Whether ``transaction`` was mined and reverted (so it moved nothing)."""
        return self._chain.reverted(transaction)

    def has_code(self, address: str) -> bool:
        """Whether ``address`` holds code (a contract wallet, or an account delegating to
        one); ChainUnavailable when the chain cannot be asked."""
        return self._chain.has_code(address)

    def response_header(self, settlement: Settlement, version: int) -> tuple[str, str]:
        """The PAYMENT-RESPONSE (v2) or X-PAYMENT-RESPONSE (v1) header of a settlement."""
        if version == 1:
            v1 = settlement.raw.model_copy(update={"network": self._config.chain.v1_network})
            return V1_RESPONSE_HEADER, encode_payment_response_header(v1)
        return V2_RESPONSE_HEADER, encode_payment_response_header(settlement.raw)

    def ping(self) -> None:
        """Raise unless payments can be taken now: the chain (local) or facilitator answers.

        The answer, ready or not, is cached for a few seconds so health checks never hammer
        the RPC, nor wait for its time-out on every call while it is down.
        """
        now = time.monotonic()
        if now - self._pinged_at < PING_CACHE_SECONDS:
            if self._ping_failed:  # a dead RPC costs one timeout per PING_CACHE_SECONDS
                raise chain_unavailable()
            return
        ready = False
        try:
            if self._is_remote():
                self._ensure_ready()
            elif not self._chain.up():
                raise chain_unavailable()
            ready = True
        finally:
            self._pinged_at, self._ping_failed = time.monotonic(), not ready

    def close(self) -> None:
        """Release the facilitator's HTTP connections (remote mode)."""
        if isinstance(self._facilitator, HTTPFacilitatorClientSync):
            self._facilitator.close()

    # ------------------------------------------------------------------ failures

    def _settle_failed(self, reason: str, transaction: str | None) -> NoReturn:
        tx = transaction or None
        if reason == ERR_SETTLEMENT_PENDING and tx:
            raise settlement_pending(tx)
        if tx is None:
            self._raise_if_chain_down(reason)
        log.warning("settlement failed: reason=%s tx=%s", reason, tx)
        raise _settlement_failed(reason, tx)

    def _call(self, call: Callable[[], T], *, settling: bool) -> T:
        """Run a facilitator call, translating its transport failures."""
        try:
            return call()
        except Exception as exc:
            log.warning(
                "facilitator %s failed: %s", "settle" if settling else "verify", type(exc).__name__
            )
            raise self._translate(exc, settling) from exc

    def _translate(self, exc: Exception, settling: bool) -> RelayError:
        match = _HTTP_FAILURE.match(str(exc)) if isinstance(exc, ValueError) else None
        if match and 400 <= int(match.group(1)) < 500:
            reason = _reason_in(match.group(2)) or f"facilitator_http_{match.group(1)}"
            return _settlement_failed(reason, None) if settling else _verify_failed(reason)
        if settling and self._is_remote() and not never_sent(exc):
            return settlement_pending(None)
        return chain_unavailable()

    def _raise_if_chain_down(self, reason: str) -> None:
        """The local facilitator reports some RPC failures as payment failures: tell apart."""
        if reason in _MAYBE_RPC_FAILURE and not self._is_remote() and not self._chain.up():
            raise chain_unavailable()

    @property
    def records_broadcasts(self) -> bool:
        """Whether each settlement transaction is passed to recording_broadcasts' ``record``
        before it is sent (the local facilitator); a remote one broadcasts out of sight."""
        return not self._is_remote()

    def _is_remote(self) -> bool:
        return not isinstance(self._facilitator, x402FacilitatorSync)

    def _ensure_ready(self) -> None:
        """Load the facilitator's supported kinds once; retried until it answers."""
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            try:
                self._server.initialize()
            except Exception as exc:
                log.warning("facilitator unavailable: %s", type(exc).__name__)
                raise chain_unavailable() from exc
            network = self._config.chain.network
            if self._server.get_supported_kind(2, network, SCHEME) is None:
                raise InternalError(f"The facilitator does not support {network}.")
            self._ready = True


def _as_v2(parsed: ParsedPayment, req: PaymentRequirements) -> PaymentPayload:
    """The payload as v2: a v1 authorization is the same signature under ``req``."""
    if isinstance(parsed.payload, PaymentPayload):
        return parsed.payload
    return PaymentPayload(x402_version=2, payload=parsed.payload.payload, accepted=req)


# ---------------------------------------------------------------------- errors


def _verify_failed(reason: str) -> PaymentVerifyFailed:
    return PaymentVerifyFailed(
        _HINTS.get(reason), details={"reason": reason}, extra={"reason": reason}
    )


def _settlement_failed(reason: str, tx: str | None) -> PaymentSettlementFailed:
    return PaymentSettlementFailed(
        details={"reason": reason, "transaction": tx}, extra={"reason": reason, "transaction": tx}
    )


def settlement_pending(tx: str | None) -> SettlementPending:
    """202: broadcast (or possibly broadcast), not confirmed; repeat the same request."""
    return SettlementPending(
        details={"transaction": tx},
        extra={"transaction": tx},
        retry_after=RETRY_AFTER_SECONDS,
    )


def _reason_in(body: str) -> str | None:
    """The verdict reason of a facilitator's non-2xx JSON body, if it carries one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    for key in ("invalidReason", "errorReason", "error"):
        if isinstance(data.get(key), str):
            return str(data[key])
    return None
