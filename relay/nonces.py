"""Transaction nonces shared by every process that signs with one key (settlements, refunds)."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol, cast

from eth_typing import ChecksumAddress
from web3 import Web3

log = logging.getLogger(__name__)


class NonceStore(Protocol):
    """Hands out an account's transaction nonces across processes."""

    def reserve_nonce(self, address: str, pending: int, latest: int, now: float) -> int: ...

    def touch_nonce(self, address: str, nonce: int, now: float) -> None: ...

    def release_nonce(self, address: str, nonce: int) -> None: ...


def reserve_nonce(w3: Web3, nonces: NonceStore, address: ChecksumAddress) -> tuple[int, int]:
    """The next nonce of ``address`` from the shared store, given what the chain counts,
    and the chain's gas price."""
    pending, latest, gas_price = _chain_counts(w3, address)
    return nonces.reserve_nonce(address, pending, latest, time.time()), gas_price


def _chain_counts(w3: Web3, address: ChecksumAddress) -> tuple[int, int, int]:
    """The account's pending and mined transaction counts and the gas price, in one batch
    request; one by one from a node that takes no batches."""
    try:
        with w3.batch_requests() as batch:
            batch.add(w3.eth.get_transaction_count(address, "pending"))
            batch.add(w3.eth.get_transaction_count(address, "latest"))
            batch.add(w3.eth.gas_price)
            pending, latest, gas_price = (int(cast(Any, answer)) for answer in batch.execute())
        return pending, latest, gas_price
    except Exception as exc:
        log.info("batch request refused, asking one by one: %s", type(exc).__name__)
    pending = w3.eth.get_transaction_count(address, "pending")
    latest = w3.eth.get_transaction_count(address, "latest")
    return pending, latest, int(w3.eth.gas_price)
