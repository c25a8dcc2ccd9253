"""Transaction nonces shared by every process that signs with one key (settlements, refunds)."""

from __future__ import annotations

import logging
import time
from typing import NamedTuple, Protocol

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.types import Nonce, RPCEndpoint, TxParams, Wei

log = logging.getLogger(__name__)

#: The nodes (RPC URLs) of this process that refused a batch request.
_UNBATCHED: set[str] = set()


class NonceStore(Protocol):
    """Hands out an account's transaction nonces across processes."""

    def reserve_nonce(self, address: str, pending: int, latest: int, now: float) -> int: ...

    def touch_nonce(
        self, address: str, nonce: int, now: float, *, reserved_at: float | None = None
    ) -> bool: ...

    def release_nonce(self, address: str, nonce: int, reserved_at: float) -> None: ...

    def nonce_gap(self, address: str, pending: int, latest: int, now: float) -> bool: ...


class NonceTakenOver(RuntimeError):
    """The nonce's reservation aged out and another process took it over: this process
    must not broadcast with it."""


class Reservation(NamedTuple):
    """A nonce reserved in the shared store, the gas price read with it, and the time the
    reservation was stamped with (what says it is still this process's)."""

    nonce: int
    gas_price: int
    at: float


def reserve_nonce(w3: Web3, nonces: NonceStore, address: ChecksumAddress) -> Reservation:
    """The next nonce of ``address`` from the shared store, given what the chain counts,
    and the chain's gas price."""
    pending, latest, gas_price = _chain_counts(w3, address)
    now = time.time()
    return Reservation(nonces.reserve_nonce(address, pending, latest, now), gas_price, now)


def fill_gap(w3: Web3, nonces: NonceStore, account: LocalAccount) -> str | None:
    """Use up a nonce the account reserved and never got onto the chain (a process died
    between reserving and broadcasting, or its broadcast was lost) while its later
    transactions wait behind it, with a transfer of nothing to itself: they are mined then,
    with no new payment needed to fill the gap. Its hash; None when there is no gap."""
    address = account.address
    pending, latest, gas_price = _chain_counts(w3, address)
    now = time.time()
    if not nonces.nonce_gap(address, pending, latest, now):
        return None
    nonce = nonces.reserve_nonce(address, pending, latest, now)
    if nonce != pending:  # filled meanwhile by another process: nothing to send
        nonces.release_nonce(address, nonce, now)
        return None
    transfer: TxParams = {
        "from": address,
        "to": address,
        "value": Wei(0),
        "gas": 21_000,
        "gasPrice": Wei(gas_price),
        "nonce": Nonce(nonce),
        "chainId": w3.eth.chain_id,
    }
    signed = account.sign_transaction(transfer)  # type: ignore[arg-type]
    w3.eth.send_raw_transaction(signed.raw_transaction)
    tx_hash = str(signed.hash.to_0x_hex())
    log.warning("nonce %d of %s was a gap; filled by %s", nonce, address, tx_hash)
    return tx_hash


def _chain_counts(w3: Web3, address: ChecksumAddress) -> tuple[int, int, int]:
    """The account's pending and mined transaction counts and the gas price, in one batch
    request; one by one from a node that takes no batches (asked once, then remembered)."""
    node = str(getattr(w3.provider, "endpoint_uri", ""))
    refused = False
    if node not in _UNBATCHED:
        calls = [
            (RPCEndpoint("eth_getTransactionCount"), [address, "pending"]),
            (RPCEndpoint("eth_getTransactionCount"), [address, "latest"]),
            (RPCEndpoint("eth_gasPrice"), []),
        ]
        try:
            # Three plain numbers: asked of the provider itself, past web3's formatters.
            answers = w3.provider.make_batch_request(calls)  # type: ignore[attr-defined]
            if not isinstance(answers, list) or len(answers) != len(calls):
                raise ValueError(f"not an answer to the batch: {str(answers)[:200]}")
            pending, latest, gas_price = (_quantity(answer["result"]) for answer in answers)
            return pending, latest, gas_price
        except Exception as exc:
            log.info("batch request failed, asking one by one: %s", type(exc).__name__)
            refused = True
    pending = w3.eth.get_transaction_count(address, "pending")
    latest = w3.eth.get_transaction_count(address, "latest")
    gas_price = int(w3.eth.gas_price)
    if refused:  # the node answers single calls: it is the batch it refuses
        _UNBATCHED.add(node)
    return pending, latest, gas_price


def _quantity(value: object) -> int:
    """A JSON-RPC quantity: hex as the spec has it ("0x1a"), or a plain number as some nodes
    answer; anything else is not an answer."""
    if isinstance(value, str) and value.startswith("0x"):
        return int(value, 16)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"not a quantity: {str(value)[:40]}")
