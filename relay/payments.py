"""x402 payments (SPEC §9): the 402 challenge, payment headers, verification and settlement.

The one place the server uses the x402 SDK and the chain: ``Payments`` (challenge, parse,
match, verify, settle, confirm) and ``Refunder`` (USDC back to a payer). The rest of the app sees
``ParsedPayment``, ``Settlement``, header strings and ``RelayError``s; it only passes the SDK's
``PaymentRequirements`` back in.

Two SDK behaviours shape this module:

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

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, Protocol, TypedDict, TypeVar

import httpx
import requests
import rlp
from eth_account import Account
from eth_typing import HexStr
from pydantic import BaseModel
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound
from web3.types import Nonce, TxParams, TxReceipt
from x402 import (
    AssetAmount,
    FacilitatorClientSync,
    PaymentPayload,
    PaymentPayloadV1,
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
    extract_and_validate_payment_identifier,
)
from x402.http import (
    FacilitatorConfig,
    HTTPFacilitatorClientSync,
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.mechanisms.evm import FacilitatorEvmSigner, FacilitatorWeb3Signer
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
    TX_STATUS_SUCCESS,
)
from x402.mechanisms.evm.data_suffix import append_data_suffix
from x402.mechanisms.evm.exact import ExactEvmServerScheme, register_exact_evm_facilitator
from x402.mechanisms.evm.types import TransactionReceipt

from relay.abi import load_abi
from relay.errors import (
    ChainUnavailable,
    InternalError,
    InvalidInput,
    PaymentSettlementFailed,
    PaymentVerifyFailed,
    RelayError,
    SettlementPending,
)
from relay.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEME = "exact"
MAX_TIMEOUT_SECONDS = 300
#: How long one settle waits for its receipt; the SDK retries the wait once, so a settlement
#: answers ``settlement_pending`` after about twice this.
RECEIPT_TIMEOUT_SECONDS = 15.0
PING_CACHE_SECONDS = 10.0
RECEIPT_POLL_SECONDS = 0.25
LOG_WINDOW_BLOCKS = 10_000  # hours on Base, and within common RPC log-range limits
HTTP_TIMEOUT_SECONDS = 60.0
RETRY_AFTER_SECONDS = 5
MAX_HEADER_CHARS = 16 * 1024
V2_HEADER, V1_HEADER = "PAYMENT-SIGNATURE", "X-PAYMENT"
V2_RESPONSE_HEADER, V1_RESPONSE_HEADER = "PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE"
PAYMENT_HEADERS = (V2_HEADER, V1_HEADER)
REQUIREMENTS_MISMATCH = "requirements_mismatch"
#: A validBefore may lie this much beyond the advertised maxTimeoutSeconds (clock skew).
VALIDITY_ALLOWANCE_SECONDS = 60
VALIDITY_TOO_LONG = "authorization_validity_too_long"
#: The authorization was used on-chain, but its own Transfer did not pay this relay.
NOT_PAID = "authorization_used_without_payment"
BLOCK_CACHE_SECONDS = 5.0
AUTHORIZATION_USED = Web3.keccak(text="AuthorizationUsed(address,bytes32)").to_0x_hex()
AUTHORIZATION_CANCELED = Web3.keccak(text="AuthorizationCanceled(address,bytes32)").to_0x_hex()
TRANSFER = Web3.keccak(text="Transfer(address,address,uint256)").to_0x_hex()

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
_NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
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


@dataclass(frozen=True)
class Settlement:
    """A confirmed on-chain settlement."""

    transaction: str
    log_index: int
    payer: str
    network: str
    raw: SettleResponse


@dataclass(frozen=True)
class AuthorizationFate:
    """What the chain says of an authorization: unused, used (by ``transaction``), canceled
    by the payer, or used with no log found (settled-unknown: never treated as failed)."""

    state: Literal["unused", "used", "canceled", "unknown"]
    transaction: str | None = None


def as_json(model: BaseModel) -> dict[str, Any]:
    """An SDK model as JSON-ready data with its wire (camelCase) names."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def build_facilitator(
    settings: Settings,
    *,
    nonces: NonceStore | None = None,
    http_timeout: float = HTTP_TIMEOUT_SECONDS,
    signer: FacilitatorEvmSigner | None = None,
) -> FacilitatorClientSync:
    """The facilitator of FACILITATOR: in-process over RPC_URL (local) or FACILITATOR_URL."""
    if settings.facilitator == "remote":
        config = FacilitatorConfig(url=settings.facilitator_url, timeout=http_timeout)
        return HTTPFacilitatorClientSync(config)
    return local_facilitator(settings.x402_network, signer or settler_signer(settings, nonces))


class NonceStore(Protocol):
    """Hands out an account's transaction nonces across processes."""

    def reserve_nonce(self, address: str, pending: int, latest: int, now: float) -> int: ...

    def touch_nonce(self, address: str, nonce: int, now: float) -> None: ...

    def release_nonce(self, address: str, nonce: int) -> None: ...


#: Called with a settlement transaction's hash and target after signing, before broadcast.
_on_broadcast: ContextVar[Callable[[str, str], None] | None] = ContextVar(
    "relay_on_broadcast", default=None
)


@contextmanager
def recording_broadcasts(record: Callable[[str, str], None]) -> Iterator[None]:
    """Within the block, every settlement transaction is passed to ``record(hash, to)``
    (which stores it) before it is broadcast, so a crash or a lost answer never loses its
    hash."""
    token = _on_broadcast.set(record)
    seen = _receipts.set({})
    try:
        yield
    finally:
        _on_broadcast.reset(token)
        _receipts.reset(seen)


#: Receipts the signer waited for within recording_broadcasts, by transaction hash, so the
#: settlement is checked without asking the chain for the same receipt again.
_receipts: ContextVar[dict[str, Any] | None] = ContextVar("relay_receipts", default=None)


class SharedNonceSigner(FacilitatorWeb3Signer):
    """The SDK's web3 signer with its per-process nonce lock replaced by a shared store, and
    each transaction's hash recorded before it is broadcast.

    Several processes (or hosts) may settle with one key; the SDK only coordinates nonces
    within a process, so reservations go through the database instead.
    """

    def __init__(self, private_key: str, rpc_url: str, nonces: NonceStore, **options: Any) -> None:
        super().__init__(private_key, rpc_url, **options)
        self._nonces = nonces

    def wait_for_transaction_receipt(self, tx_hash: str) -> TransactionReceipt:
        """The SDK's receipt wait, polling less often: many settlements wait at once."""
        tx = tx_hash if tx_hash.startswith("0x") else "0x" + tx_hash
        receipt = self._w3.eth.wait_for_transaction_receipt(
            HexStr(tx),
            timeout=self._confirmation_timeout_seconds,
            poll_latency=RECEIPT_POLL_SECONDS,
        )
        seen = _receipts.get()
        if seen is not None:
            seen[tx.lower()] = receipt
        return TransactionReceipt(
            status=TX_STATUS_SUCCESS if receipt["status"] == 1 else 0,
            block_number=receipt["blockNumber"],
            tx_hash=tx,
            logs=list(receipt.get("logs") or []),
        )

    def write_contract(
        self,
        address: str,
        abi: list[dict[str, Any]],
        function_name: str,
        *args: Any,
        data_suffix: str | None = None,
    ) -> str:
        """The SDK's contract call, recording the hash before broadcast."""
        contract = self._w3.eth.contract(address=Web3.to_checksum_address(address), abi=abi)
        call = getattr(contract.functions, function_name)(*args)

        def build(params: dict[str, Any]) -> dict[str, Any]:
            tx = dict(call.build_transaction(params))
            if data_suffix:
                data = tx["data"]
                if isinstance(data, bytes | bytearray):
                    data = "0x" + bytes(data).hex()
                tx["data"] = append_data_suffix(data, data_suffix)
            return tx

        return self._broadcast(build)

    def send_transaction(self, to: str, data: bytes) -> str:
        """The SDK's raw call, recording the hash before broadcast."""
        target = Web3.to_checksum_address(to)
        return self._broadcast(lambda params: {**params, "to": target, "data": data})

    def _broadcast(self, build: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
        """Reserve a nonce last (after every other chain call), build and sign; a nonce
        that is never broadcast is given back at once."""
        sender = self._account.address
        params = {"from": sender, "gas": self._gas_limit, "gasPrice": self._w3.eth.gas_price}
        params["nonce"] = nonce = self._reserve_nonce()
        try:
            tx = build(params)
            signed = self._account.sign_transaction(tx)
        except BaseException:
            self._nonces.release_nonce(sender, nonce)
            raise
        tx_hash = str(signed.hash.to_0x_hex())
        record = _on_broadcast.get()
        if record is not None:
            record(tx_hash, str(tx.get("to") or ""))
        # The reservation's age counts from here: it is broadcast now, not abandoned.
        self._nonces.touch_nonce(self._account.address, int(tx["nonce"]), time.time())
        self._w3.eth.send_raw_transaction(signed.raw_transaction)
        return tx_hash

    def _reserve_nonce(self) -> int:
        address = self._account.address
        pending = self._w3.eth.get_transaction_count(address, "pending")
        latest = self._w3.eth.get_transaction_count(address, "latest")
        return self._nonces.reserve_nonce(address, pending, latest, time.time())


def settler_signer(settings: Settings, nonces: NonceStore | None = None) -> FacilitatorWeb3Signer:
    """The web3 signer that pays settlement gas from SETTLER_PRIVATE_KEY."""
    if not settings.settler_private_key:
        raise ValueError("SETTLER_PRIVATE_KEY is required with FACILITATOR=local")
    timeout = settings.settlement_timeout_seconds
    if nonces is None:
        return FacilitatorWeb3Signer(
            settings.settler_private_key, settings.rpc_url, confirmation_timeout_seconds=timeout
        )
    return SharedNonceSigner(
        settings.settler_private_key,
        settings.rpc_url,
        nonces,
        confirmation_timeout_seconds=timeout,
    )


def local_facilitator(
    network: str, signer: FacilitatorEvmSigner, *, simulate_in_settle: bool = True
) -> x402FacilitatorSync:
    """An in-process exact-EVM facilitator: v2 on ``network``, v1 on the legacy names.

    Simulating inside settle means a replay fails before broadcast instead of as a
    reverted transaction that costs gas.
    """
    facilitator = x402FacilitatorSync()
    register_exact_evm_facilitator(
        facilitator, signer, network, simulate_in_settle=simulate_in_settle
    )
    return facilitator


class Payments:
    """Challenge, parse, match, verify and settle x402 payments for one network."""

    def __init__(
        self,
        settings: Settings,
        facilitator: FacilitatorClientSync | None = None,
        *,
        nonces: NonceStore | None = None,
    ) -> None:
        self._settings = settings
        self._facilitator = facilitator or build_facilitator(settings, nonces=nonces)
        self._server = x402ResourceServerSync(self._facilitator)
        # The SDK's scheme class is untyped and declares payment_flows loosely.
        scheme = ExactEvmServerScheme()  # type: ignore[no-untyped-call]
        self._server.register(settings.x402_network, scheme)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._ready = False
        self._w3: Web3 | None = None
        self._pinged_at = float("-inf")
        self._ping_failed = False
        self._block: tuple[float, int] | None = None

    # ------------------------------------------------------------------ the 402 challenge

    def requirements(self, amount_atomic: int) -> PaymentRequirements:
        """The exact-USDC requirements for one request of ``amount_atomic`` units.

        Raises ChainUnavailable while the facilitator cannot be reached.
        """
        if amount_atomic <= 0:
            raise ValueError("amount_atomic must be positive")
        self._ensure_ready()
        s = self._settings
        name, version = s.usdc_eip712
        price = AssetAmount(
            amount=str(amount_atomic),
            asset=Web3.to_checksum_address(s.usdc_address),
            extra={"name": name, "version": version},
        )
        config = ResourceConfig(
            scheme=SCHEME,
            network=s.x402_network,
            pay_to=Web3.to_checksum_address(s.pay_to_address),
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
    ) -> tuple[str, dict[str, Any]]:
        """The PAYMENT-REQUIRED header value and the v1 fields of the 402 JSON body."""
        resource = ResourceInfo(
            url=resource_url, description=description, mime_type="application/json"
        )
        extensions = {PAYMENT_IDENTIFIER: declare_payment_identifier_extension()}
        required = self._server.create_payment_required_response([req], resource, error, extensions)
        v1 = {"x402Version": 1, "accepts": [as_json(self._v1_requirements(req, resource))]}
        return encode_payment_required_header(required), v1

    def _v1_requirements(
        self, req: PaymentRequirements, resource: ResourceInfo
    ) -> PaymentRequirementsV1:
        return PaymentRequirementsV1(
            scheme=req.scheme,
            network=self._settings.v1_network,
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
            matched = (payload.scheme, payload.network) == (req.scheme, self._settings.v1_network)
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

    def settle(self, parsed: ParsedPayment, req: PaymentRequirements) -> Settlement:
        """Settle on-chain and wait for the receipt.

        Raises PaymentSettlementFailed (details.reason, details.transaction); SettlementPending
        when it may have been broadcast but is unconfirmed (details.transaction: the hash, or
        None when a remote facilitator's answer was lost); ChainUnavailable when nothing was
        sent. After either of the last two, retry with the same payment, never a new one.
        """
        self._ensure_ready()
        payload = _as_v2(parsed, req)
        result = self._call(
            lambda: self._server.settle_payment(payload, req, phase="before-handler"),
            settling=True,
        )
        if not result.success:
            self._settle_failed(result)
        settlement = self.confirm(parsed, req, result.transaction)
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
        seen = _receipts.get() or {}
        receipt = seen.get(transaction.lower()) or self._receipt(transaction)
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
        parsed = self.parse_payment({V1_HEADER if version == 1 else V2_HEADER: header})
        assert parsed is not None
        return parsed

    def block_number(self) -> int | None:
        """The chain's height (cached a few seconds, so possibly a little lower); None when
        the chain cannot be asked. A settlement after a claim is never below it."""
        now = time.monotonic()
        cached = self._block
        if cached is not None and now - cached[0] < BLOCK_CACHE_SECONDS:
            return cached[1]
        try:
            number = int(self._web3().eth.block_number)
        except Exception as exc:
            log.warning("block number lookup failed: %s", type(exc).__name__)
            return None
        self._block = (now, number)
        return number

    def fate(self, parsed: ParsedPayment, from_block: int | None) -> AuthorizationFate:
        """What the chain did with this payment's authorization, searching its logs from
        ``from_block`` (the payment's claim; without it, the last LOG_WINDOW_BLOCKS).

        An authorization used but with no log found is "unknown", never a failure: money may
        have moved. Raises ChainUnavailable when the chain cannot be asked.
        """
        token = self._token()
        payer = Web3.to_checksum_address(parsed.payer)
        nonce = bytes.fromhex(parsed.nonce[2:])
        try:
            if not token.functions.authorizationState(payer, nonce).call():
                return AuthorizationFate("unused")
            latest = int(self._web3().eth.block_number)
            start = max(0, latest - LOG_WINDOW_BLOCKS if from_block is None else from_block)
            found = self._authorization_logs(parsed, start, latest)
        except Exception as exc:
            log.warning("authorization lookup failed: %s", type(exc).__name__)
            raise _chain_unavailable() from exc
        if found is None:
            log.warning("authorization of %s used without a log found", parsed.payer)
            return AuthorizationFate("unknown")
        kind, transaction = found
        return AuthorizationFate(kind, transaction)

    def _authorization_logs(
        self, parsed: ParsedPayment, start: int, latest: int
    ) -> tuple[Literal["used", "canceled"], str] | None:
        """The AuthorizationUsed or AuthorizationCanceled log of (payer, nonce), searched in
        windows of LOG_WINDOW_BLOCKS (common RPC limits) from ``start``."""
        payer_topic = "0x" + parsed.payer.lower().removeprefix("0x").rjust(64, "0")
        topics: Any = [[AUTHORIZATION_USED, AUTHORIZATION_CANCELED], payer_topic, parsed.nonce]
        asset = Web3.to_checksum_address(self._settings.usdc_address)
        for low in range(start, latest + 1, LOG_WINDOW_BLOCKS):
            high = min(low + LOG_WINDOW_BLOCKS - 1, latest)
            logs = self._web3().eth.get_logs(
                {"address": asset, "fromBlock": low, "toBlock": high, "topics": topics}
            )
            for entry in logs:
                used = _hex(entry["topics"][0]) == AUTHORIZATION_USED
                return ("used" if used else "canceled"), _hex(entry["transactionHash"])
        return None

    def _token(self) -> Any:
        return self._web3().eth.contract(
            address=Web3.to_checksum_address(self._settings.usdc_address), abi=load_abi("USDC")
        )

    def reverted(self, transaction: str) -> bool:
        """Whether ``transaction`` was mined and reverted (so it moved nothing)."""
        receipt = self._receipt(transaction)
        return receipt is not None and receipt["status"] != 1

    def response_header(self, settlement: Settlement, version: int) -> tuple[str, str]:
        """The PAYMENT-RESPONSE (v2) or X-PAYMENT-RESPONSE (v1) header of a settlement."""
        if version == 1:
            v1 = settlement.raw.model_copy(update={"network": self._settings.v1_network})
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
                raise _chain_unavailable()
            return
        ready = False
        try:
            if self._is_remote():
                self._ensure_ready()
            elif not self._chain_up():
                raise _chain_unavailable()
            ready = True
        finally:
            self._pinged_at, self._ping_failed = time.monotonic(), not ready

    def close(self) -> None:
        """Release the facilitator's HTTP connections (remote mode)."""
        if isinstance(self._facilitator, HTTPFacilitatorClientSync):
            self._facilitator.close()

    # ------------------------------------------------------------------ failures

    def _settle_failed(self, result: SettleResponse) -> NoReturn:
        reason = result.error_reason or "settlement_failed"
        tx = result.transaction or None
        if reason == ERR_SETTLEMENT_PENDING and tx:
            raise settlement_pending(tx)
        if tx is None:
            self._raise_if_chain_down(reason)
        log.warning("settlement failed: reason=%s tx=%s", reason, tx)
        raise _settlement_failed(reason, tx)

    def _receipt(self, transaction: str) -> TxReceipt | None:
        try:
            return self._web3().eth.get_transaction_receipt(HexStr(transaction))
        except TransactionNotFound:
            return None
        except Exception as exc:
            log.warning("receipt lookup failed: %s", type(exc).__name__)
            raise _chain_unavailable() from exc

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
        if settling and self._is_remote() and not _never_sent(exc):
            return settlement_pending(None)
        return _chain_unavailable()

    def _raise_if_chain_down(self, reason: str) -> None:
        """The local facilitator reports some RPC failures as payment failures: tell apart."""
        if reason in _MAYBE_RPC_FAILURE and not self._is_remote() and not self._chain_up():
            raise _chain_unavailable()

    def _chain_up(self) -> bool:
        try:
            return self._web3().eth.chain_id == self._settings.chain_id
        except Exception:
            return False

    def _web3(self) -> Web3:
        if self._w3 is None:
            provider = Web3.HTTPProvider(self._settings.rpc_url, request_kwargs={"timeout": 10})
            self._w3 = Web3(provider)
        return self._w3

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
                raise _chain_unavailable() from exc
            if self._server.get_supported_kind(2, self._settings.x402_network, SCHEME) is None:
                raise InternalError(
                    f"The facilitator does not support {self._settings.x402_network}."
                )
            self._ready = True


RefundState = Literal["confirmed", "reverted", "pending", "replaced"]
#: Blocks a refund's nonce must have been passed by before its transaction counts as
#: replaced (and a new refund may be signed).
REPLACED_DEPTH = 12


class Refunder:
    """Sends a payer's USDC back from REFUND_PRIVATE_KEY (SPEC §11: x402 has no way back).

    Its transaction nonces are reserved through the same shared store as the settler's, so
    any number of processes may refund at once (and a refund key equal to the settler key
    shares the settler's reservations).
    """

    def __init__(
        self,
        rpc_url: str,
        private_key: str,
        usdc_address: str,
        nonces: NonceStore,
        *,
        receipt_timeout: float = RECEIPT_TIMEOUT_SECONDS,
    ) -> None:
        self._w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 10}))
        self._account = Account.from_key(private_key)
        token = Web3.to_checksum_address(usdc_address)
        self._token = self._w3.eth.contract(address=token, abi=load_abi("USDC"))
        self._receipt_timeout = receipt_timeout
        self._nonces = nonces

    @classmethod
    def from_settings(cls, settings: Settings, nonces: NonceStore) -> Refunder | None:
        """A refunder when REFUND_PRIVATE_KEY is set, else None."""
        if not settings.refund_private_key:
            return None
        return cls(
            settings.rpc_url,
            settings.refund_private_key,
            settings.usdc_address,
            nonces,
            receipt_timeout=settings.settlement_timeout_seconds,
        )

    @property
    def address(self) -> str:
        """The refund wallet, which needs USDC and gas."""
        return str(self._account.address)

    def sign(self, payer: str, amount_atomic: int) -> SignedRefund:
        """A signed USDC transfer back to ``payer``, not yet broadcast.

        The caller records it before broadcasting, so that a crash or a lost answer can only
        ever lead to the same transaction being sent again, never a second refund.
        Raises InternalError if the transfer would revert, ChainUnavailable if the chain
        cannot be asked.
        """
        sender = self._account.address
        call = self._token.functions.transfer(Web3.to_checksum_address(payer), amount_atomic)
        try:
            gas = call.estimate_gas({"from": sender})
        except ContractLogicError as exc:
            log.warning("refund would revert")
            raise InternalError("The refund would revert.") from exc
        except Exception as exc:
            log.warning("refund not prepared: %s", type(exc).__name__)
            raise _chain_unavailable() from exc
        try:
            pending = self._w3.eth.get_transaction_count(sender, "pending")
            latest = self._w3.eth.get_transaction_count(sender, "latest")
            nonce = self._nonces.reserve_nonce(sender, pending, latest, time.time())
        except Exception as exc:
            log.warning("refund not prepared: %s", type(exc).__name__)
            raise _chain_unavailable() from exc
        try:
            params: TxParams = {"from": sender, "nonce": Nonce(nonce), "gas": gas * 5 // 4}
            signed = self._account.sign_transaction(call.build_transaction(params))
        except Exception as exc:
            self._nonces.release_nonce(sender, nonce)
            log.warning("refund not prepared: %s", type(exc).__name__)
            raise _chain_unavailable() from exc
        return SignedRefund(signed.hash.to_0x_hex(), signed.raw_transaction.to_0x_hex(), nonce)

    def send(self, refund: SignedRefund) -> RefundState:
        """Broadcast (again) and wait: "confirmed", "reverted", "pending", or "replaced"
        when another transaction took its nonce (sign a new refund then).

        Sending the same signed transaction twice is harmless: it can be mined only once.
        """
        if refund.nonce is not None:
            self._nonces.touch_nonce(self._account.address, refund.nonce, time.time())
        try:
            self._w3.eth.send_raw_transaction(HexStr(refund.raw))
        except Exception as exc:  # already known, or the node is away: the receipt decides
            log.info("refund broadcast: %s", type(exc).__name__)
        try:
            receipt = self._w3.eth.wait_for_transaction_receipt(
                HexStr(refund.tx_hash), timeout=self._receipt_timeout, poll_latency=0.25
            )
        except Exception as exc:
            log.warning("refund %s unconfirmed: %s", refund.tx_hash, type(exc).__name__)
            return self._unconfirmed(refund)
        return "confirmed" if receipt["status"] == 1 else "reverted"

    def _unconfirmed(self, refund: SignedRefund) -> RefundState:
        """Pending, unless the account's nonce was passed REPLACED_DEPTH blocks ago (any
        node has its receipts by then) and still no receipt of ours exists."""
        nonce = refund.nonce if refund.nonce is not None else raw_nonce(refund.raw)
        try:
            settled = max(0, int(self._w3.eth.block_number) - REPLACED_DEPTH)
            mined = self._w3.eth.get_transaction_count(self._account.address, settled)
            if nonce is None or mined <= nonce:
                return "pending"
            self._w3.eth.get_transaction(HexStr(refund.tx_hash))  # the node knows it: not replaced
            receipt = self._w3.eth.get_transaction_receipt(HexStr(refund.tx_hash))
        except TransactionNotFound:
            log.warning("refund %s replaced: its nonce was used elsewhere", refund.tx_hash)
            return "replaced"
        except Exception as exc:
            log.warning("refund %s unchecked: %s", refund.tx_hash, type(exc).__name__)
            return "pending"
        return "confirmed" if receipt["status"] == 1 else "reverted"


def raw_nonce(raw: str) -> int | None:
    """The nonce of a signed transaction (legacy or typed), None if it cannot be read: for
    refunds recorded before their nonce was."""
    try:
        data = bytes.fromhex(raw.removeprefix("0x"))
        fields = rlp.decode(data[1:] if data and data[0] < 0x7F else data)
        value = fields[1] if data and data[0] < 0x7F else fields[0]
        return int.from_bytes(value, "big")
    except Exception:
        return None


@dataclass(frozen=True)
class SignedRefund:
    """A refund transaction: its hash, raw signed bytes (hex) and account nonce."""

    tx_hash: str
    raw: str
    nonce: int | None = None


def gas_balance(rpc_url: str, address: str, timeout: float) -> int:
    """The wei ``address`` holds to pay gas, asked once: a short time-out and no retries,
    so a dead RPC costs one time-out."""
    with requests.Session() as session:
        provider = Web3.HTTPProvider(
            rpc_url,
            request_kwargs={"timeout": timeout},
            session=session,
            exception_retry_configuration=None,
        )
        return int(Web3(provider).eth.get_balance(Web3.to_checksum_address(address)))


# ---------------------------------------------------------------------- decoding


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
    """The EIP-3009 authorization fields, validated and normalised (lowercase hex)."""
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
    return isinstance(value, str) and Web3.is_address(value)


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
    """The payment-identifier extension's id (v2 only); InvalidInput if malformed."""
    if not isinstance(payload, PaymentPayload):
        return None
    payment_id, validation = extract_and_validate_payment_identifier(payload)
    if not validation.valid:
        raise InvalidInput(
            "The payment-identifier extension is not valid: " + "; ".join(validation.errors),
            details={"field": PAYMENT_IDENTIFIER, "problem": "; ".join(validation.errors)},
        )
    return payment_id


def _as_v2(parsed: ParsedPayment, req: PaymentRequirements) -> PaymentPayload:
    """The payload as v2: a v1 authorization is the same signature under ``req``."""
    if isinstance(parsed.payload, PaymentPayload):
        return parsed.payload
    return PaymentPayload(x402_version=2, payload=parsed.payload.payload, accepted=req)


# ---------------------------------------------------------------------- receipts


def _hex(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if hasattr(value, "to_0x_hex"):
        return str(value.to_0x_hex())
    text = str(value).lower()
    return text if text.startswith("0x") else "0x" + text


def _topic_address(topic: Any) -> str:
    return "0x" + _hex(topic)[-40:]


def _is_event(entry: Any, token: str, topic: str, count: int) -> bool:
    topics = entry["topics"]
    return (
        str(entry["address"]).lower() == token.lower()
        and len(topics) == count
        and _hex(topics[0]) == topic
    )


def authorization_log(logs: list[Any], token: str, parsed: ParsedPayment) -> int | None:
    """The position in ``logs`` of the AuthorizationUsed log of this payment's (payer, nonce)."""
    for position, entry in enumerate(logs):
        if (
            _is_event(entry, token, AUTHORIZATION_USED, 3)
            and _topic_address(entry["topics"][1]) == parsed.payer.lower()
            and _hex(entry["topics"][2]) == parsed.nonce.lower()
        ):
            return position
    return None


def paying_transfer(logs: list[Any], token: str, parsed: ParsedPayment, pay_to: str) -> int | None:
    """The log index of the Transfer that this payment's own authorization produced, if it
    paid ``pay_to`` exactly the amount from the payer; None otherwise.

    The token emits AuthorizationUsed(payer, nonce) and then that call's Transfer as the next
    log: any other Transfer in the transaction (a batch of several authorizations) pays for
    something else.
    """
    position = authorization_log(logs, token, parsed)
    if position is None or position + 1 >= len(logs):
        return None
    transfer = logs[position + 1]
    if not _is_event(transfer, token, TRANSFER, 3):
        return None
    topics = transfer["topics"]
    data = _hex(transfer["data"]).removeprefix("0x")
    paid = (
        _topic_address(topics[1]) == parsed.payer.lower()
        and _topic_address(topics[2]) == pay_to.lower()
        and len(data) == 64
        and int(data, 16) == parsed.value
    )
    return int(transfer["logIndex"]) if paid else None


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


def _chain_unavailable() -> ChainUnavailable:
    return ChainUnavailable(retry_after=RETRY_AFTER_SECONDS)


def _never_sent(exc: Exception) -> bool:
    """Whether a failed facilitator request certainly never reached it."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


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
