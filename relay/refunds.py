"""Refunds (SPEC §11: x402 has no way back): USDC sent back to a payer from REFUND_PRIVATE_KEY,
signed and recorded before it is broadcast, so it can only ever be sent again, never twice."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import rlp
from eth_account import Account
from eth_typing import HexStr
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound
from web3.types import Nonce, TxParams

from relay.abi import load_abi
from relay.chain import chain_unavailable, receipt_watcher, web3_for
from relay.configs import RefundConfig
from relay.errors import InternalError
from relay.nonces import NonceStore, fill_gap, reserve_nonce

log = logging.getLogger(__name__)

RefundOutcome = Literal["confirmed", "reverted", "pending", "replaced"]
#: Blocks a refund's nonce must have been passed by before its transaction counts as
#: replaced (and a new refund may be signed).
REPLACED_DEPTH = 12


@dataclass(frozen=True)
class SignedRefund:
    """A refund transaction: its hash, raw signed bytes (hex) and account nonce."""

    tx_hash: str
    raw: str
    nonce: int | None = None


class Refunder:
    """Signs and sends refunds from one wallet.

    Its transaction nonces are reserved through the same shared store as the settler's, so
    any number of processes may refund at once (and a refund key equal to the settler key
    shares the settler's reservations).
    """

    def __init__(self, config: RefundConfig, nonces: NonceStore) -> None:
        self._w3 = web3_for(config.chain.rpc_url)
        self._account = Account.from_key(config.private_key)
        token = Web3.to_checksum_address(config.chain.usdc_address)
        self._token = self._w3.eth.contract(address=token, abi=load_abi("USDC"))
        self._receipt_timeout = config.chain.receipt_timeout_seconds
        self._receipts = receipt_watcher(config.chain.rpc_url)
        self._nonces = nonces

    @property
    def address(self) -> str:
        """The refund wallet, which needs USDC and gas."""
        return str(self._account.address)

    def fill_nonce_gap(self) -> str | None:
        """Fill a gap in the refund wallet's nonces (relay.nonces.fill_gap)."""
        return fill_gap(self._w3, self._nonces, self._account)

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
            raise chain_unavailable() from exc
        try:
            taken = reserve_nonce(self._w3, self._nonces, sender)
        except Exception as exc:
            log.warning("refund not prepared: %s", type(exc).__name__)
            raise chain_unavailable() from exc
        nonce = taken.nonce
        try:
            params: TxParams = {"from": sender, "nonce": Nonce(nonce), "gas": gas * 5 // 4}
            signed = self._account.sign_transaction(call.build_transaction(params))
        except Exception as exc:
            self._nonces.release_nonce(sender, nonce, taken.at)
            log.warning("refund not prepared: %s", type(exc).__name__)
            raise chain_unavailable() from exc
        return SignedRefund(signed.hash.to_0x_hex(), signed.raw_transaction.to_0x_hex(), nonce)

    def send(self, refund: SignedRefund) -> RefundOutcome:
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
            receipt = self._receipts.wait(refund.tx_hash, self._receipt_timeout)
        except Exception as exc:
            log.warning("refund %s unconfirmed: %s", refund.tx_hash, type(exc).__name__)
            return self._unconfirmed(refund)
        return "confirmed" if receipt["status"] == 1 else "reverted"

    def _unconfirmed(self, refund: SignedRefund) -> RefundOutcome:
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
