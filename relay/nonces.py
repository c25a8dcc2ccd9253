"""Transaction nonces shared by every process that signs with one key (settlements, refunds)."""

from __future__ import annotations

import time
from typing import Protocol

from eth_typing import ChecksumAddress
from web3 import Web3


class NonceStore(Protocol):
    """Hands out an account's transaction nonces across processes."""

    def reserve_nonce(self, address: str, pending: int, latest: int, now: float) -> int: ...

    def touch_nonce(self, address: str, nonce: int, now: float) -> None: ...

    def release_nonce(self, address: str, nonce: int) -> None: ...


def reserve_nonce(w3: Web3, nonces: NonceStore, address: ChecksumAddress) -> int:
    """The next nonce of ``address`` from the shared store, given what the chain counts."""
    pending = w3.eth.get_transaction_count(address, "pending")
    latest = w3.eth.get_transaction_count(address, "latest")
    return nonces.reserve_nonce(address, pending, latest, time.time())
