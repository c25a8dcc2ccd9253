"""What a hostile payer does on-chain: its own EIP-3009 authorizations, batched through
Multicall3 at its canonical address, mined ahead of the relay's settlements."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from web3 import Web3

from relay.dev.chain import CHAIN_ID, USDC_ADDRESS, USDC_EIP712_NAME, USDC_EIP712_VERSION, DevChain

TRANSFER_WITH_AUTHORIZATION = (
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
)
TRANSFER_TYPES = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ]
}
CANCEL_TYPES = {
    "CancelAuthorization": [
        {"name": "authorizer", "type": "address"},
        {"name": "nonce", "type": "bytes32"},
    ]
}
DOMAIN = {
    "name": USDC_EIP712_NAME,
    "version": USDC_EIP712_VERSION,
    "chainId": CHAIN_ID,
    "verifyingContract": USDC_ADDRESS,
}


@dataclass(frozen=True)
class Authorization:
    """A signed EIP-3009 transferWithAuthorization."""

    payer: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes
    signature: bytes

    def call_data(self, chain: DevChain) -> str:
        """The token call that executes it."""
        function = chain.token.get_function_by_signature(TRANSFER_WITH_AUTHORIZATION)
        args = (
            Web3.to_checksum_address(self.payer),
            Web3.to_checksum_address(self.to),
            self.value,
            self.valid_after,
            self.valid_before,
            self.nonce,
            self.signature,
        )
        return str(function(*args)._encode_transaction_data())


def authorize(
    key: str, to: str, value: int, nonce: str | bytes | None = None, valid_for: int = 600
) -> Authorization:
    """The payer (``key``) signs a transfer of ``value`` to ``to`` with ``nonce``."""
    payer = Account.from_key(key).address
    raw = bytes.fromhex(nonce[2:]) if isinstance(nonce, str) else nonce
    message: dict[str, Any] = {
        "from": payer,
        "to": Web3.to_checksum_address(to),
        "value": value,
        "validAfter": 0,
        "validBefore": int(time.time()) + valid_for,
        "nonce": raw or secrets.token_bytes(32),
    }
    signed = Account.sign_typed_data(key, DOMAIN, TRANSFER_TYPES, message)
    return Authorization(
        payer,
        message["to"],
        value,
        0,
        message["validBefore"],
        message["nonce"],
        bytes(signed.signature),
    )


def batch(chain: DevChain, authorizations: list[Authorization]) -> str:
    """Broadcast one Multicall3 transaction executing every authorization, priced to be
    mined ahead of anything else waiting; its hash."""
    sender = chain.accounts[5].address
    chain.set_eth_balance(sender, 10**18)
    calls = [(USDC_ADDRESS, False, auth.call_data(chain)) for auth in authorizations]
    tx = chain.multicall.functions.aggregate3(calls).transact(
        {"from": sender, "gas": 1_000_000, "gasPrice": chain.w3.eth.gas_price * 10}
    )
    return str(tx.to_0x_hex())


def cancel(chain: DevChain, key: str, nonce: str) -> str:
    """The payer cancels an unused authorization (EIP-3009 cancelAuthorization), priced to
    be mined ahead of anything else waiting."""
    payer = Account.from_key(key).address
    raw = bytes.fromhex(nonce[2:])
    signed = Account.sign_typed_data(key, DOMAIN, CANCEL_TYPES, {"authorizer": payer, "nonce": raw})
    function = chain.token.get_function_by_signature("cancelAuthorization(address,bytes32,bytes)")
    sender = chain.accounts[5].address
    chain.set_eth_balance(sender, 10**18)
    tx = function(payer, raw, bytes(signed.signature)).transact(
        {"from": sender, "gas": 200_000, "gasPrice": chain.w3.eth.gas_price * 10}
    )
    return str(tx.to_0x_hex())


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Poll until ``condition()`` holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)
