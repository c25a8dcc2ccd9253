"""The x402 facilitator that verifies and settles: a remote one over HTTP (FACILITATOR_URL),
or one in this process paying gas from SETTLER_PRIVATE_KEY through ``SettlerSigner``.

Several processes (or hosts) may settle with one key; the SDK only coordinates nonces within
a process, so ``SettlerSigner`` reserves them through the shared ``NonceStore`` instead, and
records each transaction's hash before broadcasting it, so a crash or a lost answer never
loses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from web3.middleware import ExtraDataToPOAMiddleware
from x402 import FacilitatorClientSync, x402FacilitatorSync
from x402.http import FacilitatorConfig, HTTPFacilitatorClientSync
from x402.mechanisms.evm import FacilitatorEvmSigner, FacilitatorWeb3Signer
from x402.mechanisms.evm.constants import TX_STATUS_SUCCESS
from x402.mechanisms.evm.data_suffix import append_data_suffix
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.mechanisms.evm.exact.facilitator import ExactEvmScheme, ExactEvmSchemeConfig
from x402.mechanisms.evm.types import TransactionReceipt
from x402.pending_settlement_store import InMemoryPendingSettlementStore

from relay.calldata import checksum, plain_function
from relay.chain import receipt_watcher, web3_for
from relay.configs import ChainConfig, PaymentConfig
from relay.memo import Memo
from relay.nonces import NonceStore, NonceTakenOver, fill_gap, reserve_nonce

HTTP_TIMEOUT_SECONDS = 60.0
#: A nonce reserved this recently needs no new timestamp when it is broadcast.
FRESH_RESERVATION_SECONDS = 1.0
#: How long a payer's code, read by verify, serves the settle that follows.
CODE_MEMO_SECONDS = 2.0

#: Called with a settlement transaction's hash and target after signing, before broadcast.
_on_broadcast: ContextVar[Callable[[str, str], None] | None] = ContextVar(
    "relay_on_broadcast", default=None
)
#: Set while settling a payment this request has just verified (and simulated).
_verified: ContextVar[bool] = ContextVar("relay_verified", default=False)
#: Receipts the signer waited for within recording_broadcasts, by transaction hash, so the
#: settlement is checked without asking the chain for the same receipt again.
_receipts: ContextVar[dict[str, Any] | None] = ContextVar("relay_receipts", default=None)


def build_facilitator(config: PaymentConfig, nonces: NonceStore) -> FacilitatorClientSync:
    """The facilitator of FACILITATOR: in-process over RPC_URL (local) or FACILITATOR_URL."""
    if config.facilitator == "remote":
        return remote_facilitator(config.facilitator_url)
    if not config.settler_private_key:
        raise ValueError("SETTLER_PRIVATE_KEY is required with FACILITATOR=local")
    signer = SettlerSigner(config.settler_private_key, config.chain, nonces)
    return SimulatingFacilitator(config.chain.network, signer)


def remote_facilitator(
    url: str, timeout: float = HTTP_TIMEOUT_SECONDS
) -> HTTPFacilitatorClientSync:
    """The SDK's HTTP client of the facilitator at ``url``; close() it after use."""
    return HTTPFacilitatorClientSync(FacilitatorConfig(url=url, timeout=timeout))


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


class SimulatingFacilitator(x402FacilitatorSync):
    """The in-process exact-EVM facilitator (v2) whose settle simulates the transfer before
    broadcasting it, except within ``just_verified()``: the same request's verify simulated
    it a moment ago, and a second simulation would only repeat it. Both ways share one
    pending-settlement store, so a settle retried after a pending one finds its transaction."""

    def __init__(self, network: str, signer: SettlerSigner) -> None:
        super().__init__()
        pending = InMemoryPendingSettlementStore()

        def scheme(simulate: bool) -> ExactEvmScheme:
            config = ExactEvmSchemeConfig(simulate_in_settle=simulate)
            return ExactEvmScheme(signer, config, pending_store=pending)

        self.signer = signer
        self.register([network], scheme(True))
        self._unsimulated = x402FacilitatorSync()
        self._unsimulated.register([network], scheme(False))

    def settle(self, payload: Any, requirements: Any, *args: Any, **kwargs: Any) -> Any:
        if _verified.get():
            return self._unsimulated.settle(payload, requirements, *args, **kwargs)
        return super().settle(payload, requirements, *args, **kwargs)


@contextmanager
def just_verified() -> Iterator[None]:
    """Within the block, the local facilitator settles without simulating again."""
    token = _verified.set(True)
    try:
        yield
    finally:
        _verified.reset(token)


@contextmanager
def recording_broadcasts(record: Callable[[str, str], None]) -> Iterator[None]:
    """Within the block, every settlement transaction is passed to ``record(hash, to)``
    (which stores it) before it is broadcast, so a crash or a lost answer never loses its
    hash. When ``record`` raises, that transaction is not broadcast (its nonce is given
    back) and the block ends with record's exception, whatever the SDK made of it."""
    refused: list[BaseException] = []

    def recorded(tx_hash: str, to: str) -> None:
        try:
            record(tx_hash, to)
        except BaseException as exc:
            refused.append(exc)
            raise

    token = _on_broadcast.set(recorded)
    seen = _receipts.set({})
    try:
        yield
    except BaseException:
        if refused:
            raise refused[0] from None
        raise
    finally:
        _on_broadcast.reset(token)
        _receipts.reset(seen)
    if refused:  # the SDK returned as if nothing was refused: the refusal stands anyway
        raise refused[0]


def waited_receipt(transaction: str) -> Any | None:
    """The receipt of ``transaction`` if the signer waited for it within recording_broadcasts."""
    return (_receipts.get() or {}).get(transaction.lower())


class SettlerSigner(FacilitatorWeb3Signer):
    """The SDK's web3 signer on our Web3 client, its per-process nonce lock replaced by the
    shared store, each transaction's hash recorded before it is broadcast."""

    def __init__(self, private_key: str, chain: ChainConfig, nonces: NonceStore) -> None:
        timeout = chain.receipt_timeout_seconds
        super().__init__(private_key, chain.rpc_url, confirmation_timeout_seconds=timeout)
        self._w3 = web3_for(chain.rpc_url, known_chain=True)
        # As on the SDK's own client: some testnets' blocks carry a long extraData.
        self._w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
        self._nonces = nonces
        self._receipts = receipt_watcher(chain.rpc_url)
        self._codes: Memo[str, bytes] = Memo(4096, max_age=CODE_MEMO_SECONDS)

    def get_code(self, address: str) -> bytes:
        """The SDK's code look-up (an EOA or a smart wallet?), once for a payment's verify
        and its settle a moment later; the transfer's own signature check on-chain is the
        final word either way."""
        read = super().get_code
        return self._codes.get_or_make(address.lower(), lambda: read(address))

    def fill_nonce_gap(self) -> str | None:
        """Fill a gap in the settler's nonces (relay.nonces.fill_gap)."""
        return fill_gap(self._w3, self._nonces, self._account)

    def wait_for_transaction_receipt(self, tx_hash: str) -> TransactionReceipt:
        """The SDK's receipt wait, through the process's one receipt watcher."""
        tx = tx_hash if tx_hash.startswith("0x") else "0x" + tx_hash
        receipt = self._receipts.wait(tx, self._confirmation_timeout_seconds)
        seen = _receipts.get()
        if seen is not None:
            seen[tx.lower()] = receipt
        return TransactionReceipt(
            status=TX_STATUS_SUCCESS if receipt["status"] == 1 else 0,
            block_number=receipt["blockNumber"],
            tx_hash=tx,
            logs=list(receipt.get("logs") or []),
        )

    def read_contract(
        self, address: str, abi: list[dict[str, Any]], function_name: str, *args: Any
    ) -> Any:
        """The SDK's contract read; a call that returns nothing (the settlement's
        simulation) is encoded directly rather than through a web3 contract object."""
        function = plain_function(abi, function_name, args)
        if function is None or function.returns:
            return super().read_contract(address, abi, function_name, *args)
        call = {"from": self._account.address, "to": checksum(address), "data": function(args)}
        self._w3.eth.call(call)  # type: ignore[arg-type]
        return []  # what web3 answers for a function without outputs

    def write_contract(
        self,
        address: str,
        abi: list[dict[str, Any]],
        function_name: str,
        *args: Any,
        data_suffix: str | None = None,
    ) -> str:
        """The SDK's contract call, recording the hash before broadcast."""
        function = plain_function(abi, function_name, args)
        if function is not None:
            data = "0x" + function(args).hex()
        else:
            contract = self._w3.eth.contract(address=checksum(address), abi=abi)
            data = str(contract.encode_abi(function_name, args=list(args)))
        if data_suffix:
            data = append_data_suffix(data, data_suffix)
        return self.send_transaction(address, bytes.fromhex(data.removeprefix("0x")))

    def send_transaction(self, to: str, data: bytes) -> str:
        """The SDK's raw call, recording the hash before broadcast."""
        target, chain_id = checksum(to), self.get_chain_id()
        return self._broadcast(
            lambda params: {**params, "to": target, "data": data, "value": 0, "chainId": chain_id}
        )

    def _broadcast(self, build: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
        """Reserve a nonce last (after every other chain call), build and sign; a nonce
        that is never broadcast is given back at once."""
        sender = self._account.address
        taken = reserve_nonce(self._w3, self._nonces, sender)
        params = {
            "from": sender,
            "gas": self._gas_limit,
            "gasPrice": taken.gas_price,
            "nonce": taken.nonce,
        }
        try:
            tx = build(params)
            signed = self._account.sign_transaction(tx)
        except BaseException:
            self._nonces.release_nonce(sender, taken.nonce, taken.at)
            raise
        reserved_at = taken.at
        # The reservation's age counts from the broadcast (not abandoned), unless it was
        # made a moment ago (NONCE_GAP_SECONDS is far longer); one that aged out and was
        # taken over by another process is left to it.
        if time.time() - reserved_at > FRESH_RESERVATION_SECONDS:
            now = time.time()
            if not self._nonces.touch_nonce(sender, taken.nonce, now, reserved_at=reserved_at):
                raise NonceTakenOver(f"nonce {taken.nonce} was taken over by another process")
            reserved_at = now
        tx_hash = str(signed.hash.to_0x_hex())
        record = _on_broadcast.get()
        if record is not None:
            try:
                record(tx_hash, str(tx.get("to") or ""))
            except BaseException:  # not recorded, so never broadcast
                self._nonces.release_nonce(sender, taken.nonce, reserved_at)
                raise
        self._w3.eth.send_raw_transaction(signed.raw_transaction)
        return tx_hash
