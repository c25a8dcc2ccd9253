"""`relay doctor`'s checks of the chain: the RPC, the token, payTo, the settler or remote
facilitator, and the refund wallet."""

from __future__ import annotations

import re
from decimal import ROUND_DOWN, Decimal

from eth_account import Account
from eth_typing import ChecksumAddress
from web3 import Web3

from relay.abi import load_abi
from relay.chain import web3_for
from relay.doctor.probe import HTTP_TIMEOUT_SECONDS, Problem, Status, origin
from relay.facilitator import remote_facilitator
from relay.settings import Settings

#: A settlement (transferWithAuthorization) costs well under this much gas.
SETTLEMENT_GAS = 100_000
#: The settler and the refund wallet should afford at least this many transactions.
MIN_TRANSACTIONS = 20
USDC_DECIMALS = 6
ZERO_ADDRESS = "0x" + "0" * 40


# --- 3. RPC -------------------------------------------------------------------------------


def check_rpc(settings: Settings) -> tuple[Status, str]:
    """The RPC answers and serves the chain of X402_NETWORK."""
    expected = _expected_chain_id(settings)
    w3 = _web3(settings.rpc_url)
    chain_id, block = w3.eth.chain_id, w3.eth.block_number
    where = origin(settings.rpc_url)
    if chain_id != expected:
        return "FAIL", (
            f"{where} serves chain {chain_id}, but X402_NETWORK={settings.x402_network} "
            f"needs chain {expected}"
        )
    return "PASS", f"{where}: chain {chain_id}, block {block}"


def _expected_chain_id(settings: Settings) -> int:
    try:
        return settings.chain().chain_id
    except (ValueError, IndexError):
        raise Problem(f"X402_NETWORK={settings.x402_network!r} is not eip155:<chain id>") from None


def _web3(rpc_url: str) -> Web3:
    """A Web3 client with a short timeout and no retries: a quick answer either way."""
    if not rpc_url:
        raise Problem("RPC_URL is not set")
    return web3_for(rpc_url, timeout=HTTP_TIMEOUT_SECONDS, retries=False)


# --- 4. token -----------------------------------------------------------------------------


def check_token(settings: Settings) -> tuple[Status, str]:
    """USDC_ADDRESS holds a token with the EIP-712 domain the payments are signed for."""
    address = _address(settings.usdc_address, "USDC_ADDRESS")
    w3 = _web3(settings.rpc_url)
    if not w3.eth.get_code(address):
        return "FAIL", f"no contract at {address} on chain {w3.eth.chain_id}"
    token = w3.eth.contract(address=address, abi=load_abi("USDC"))
    name = str(token.functions.name().call())
    version = str(token.functions.version().call())
    decimals = int(token.functions.decimals().call())
    found = f"{address}: name {name[:40]!r}, version {version[:20]!r}, {decimals} decimals"
    want_name, want_version = settings.chain().usdc_eip712
    if (name, version) != (want_name, want_version):
        return "FAIL", f"{found}; payments are signed for {want_name!r} version {want_version!r}"
    if decimals != USDC_DECIMALS:
        return "FAIL", f"{found}; prices assume {USDC_DECIMALS} decimals"
    return "PASS", found


# --- 5. payTo -----------------------------------------------------------------------------


def check_pay_to(settings: Settings) -> tuple[Status, str]:
    """PAY_TO_ADDRESS is a valid, non-zero address; what lives there is reported."""
    address = _address(settings.pay_to_address, "PAY_TO_ADDRESS")
    if address == ZERO_ADDRESS:
        return "FAIL", "PAY_TO_ADDRESS is the zero address: payments would be burnt"
    usdc = settings.usdc_address
    if Web3.is_address(usdc) and address == Web3.to_checksum_address(usdc):
        return "FAIL", "PAY_TO_ADDRESS is the token contract itself"
    try:
        code = bytes(_web3(settings.rpc_url).eth.get_code(address))
    except Exception:  # a valid address whose code could not be looked at: not a PASS
        return (
            "SKIP",
            f"{address}: code not checked (RPC_URL={origin(settings.rpc_url)} unavailable)",
        )
    return "PASS", f"{address} ({_account_kind(code)})"


def _account_kind(code: bytes) -> str:
    if not code:
        return "an account without code"
    if code.startswith(b"\xef\x01\x00"):
        return "an account delegating to a contract (EIP-7702)"
    return f"a contract ({len(code)} bytes of code): make sure it can move USDC"


# --- 6. facilitator -----------------------------------------------------------------------


def check_facilitator(settings: Settings) -> tuple[Status, str]:
    """local: the settler can pay gas; remote: the facilitator supports exact on the network."""
    if settings.facilitator == "local":
        return _check_settler(settings)
    return _check_remote_facilitator(settings)


def _check_settler(settings: Settings) -> tuple[Status, str]:
    address = _key_address(settings.settler_private_key, "SETTLER_PRIVATE_KEY")
    w3 = _web3(settings.rpc_url)
    balance, price = int(w3.eth.get_balance(address)), int(w3.eth.gas_price)
    detail = f"local; settler {address} holds {_eth(balance)} ETH" + _afford(balance, price)
    shortfall = _gas_shortfall(balance, price)
    return ("FAIL", f"{detail}; {shortfall}") if shortfall else ("PASS", detail)


def _check_remote_facilitator(settings: Settings) -> tuple[Status, str]:
    where = origin(settings.facilitator_url)
    client = remote_facilitator(settings.facilitator_url, timeout=HTTP_TIMEOUT_SECONDS)
    try:
        supported = client.get_supported()
    except ValueError as exc:
        status = re.search(r"\((\d{3})\)", str(exc))
        answer = f"HTTP {status.group(1)}" if status else "an unreadable answer"
        raise Problem(f"remote {where}: GET /supported gave {answer}") from None
    finally:
        client.close()
    listed = any(
        kind.x402_version == 2 and kind.scheme == "exact" and kind.network == settings.x402_network
        for kind in supported.kinds
    )
    if not listed:
        return "FAIL", f"remote {where} does not list exact on {settings.x402_network} (x402 v2)"
    return "PASS", f"remote {where}: supports exact on {settings.x402_network}"


# --- 7. refund wallet ---------------------------------------------------------------------


def check_refund_wallet(settings: Settings) -> tuple[Status, str]:
    """With REFUND_PRIVATE_KEY: the wallet holds gas and USDC to send back."""
    if not settings.refund_private_key:
        return "SKIP", "REFUND_PRIVATE_KEY not set: no automatic refunds"
    address = _key_address(settings.refund_private_key, "REFUND_PRIVATE_KEY")
    token_address = _address(settings.usdc_address, "USDC_ADDRESS")
    w3 = _web3(settings.rpc_url)
    balance, price = int(w3.eth.get_balance(address)), int(w3.eth.gas_price)
    token = w3.eth.contract(address=token_address, abi=load_abi("USDC"))
    usdc = int(token.functions.balanceOf(address).call())
    detail = f"{address} holds {_eth(balance)} ETH{_afford(balance, price)}, {_usdc(usdc)} USDC"
    shortfalls = [_gas_shortfall(balance, price), "" if usdc else "no USDC to refund with"]
    missing = "; ".join(s for s in shortfalls if s)
    return ("FAIL", f"{detail}; {missing}") if missing else ("PASS", detail)


# --- addresses and amounts ---------------------------------------------------------------


def _address(value: str, variable: str) -> ChecksumAddress:
    if not Web3.is_address(value):
        raise Problem(f"{variable} is not an EVM address (or its checksum is wrong)")
    return Web3.to_checksum_address(value)


def _key_address(key: str | None, variable: str) -> ChecksumAddress:
    if not key:
        raise Problem(f"{variable} is not set")
    try:
        account = Account.from_key(key)
    except Exception:
        raise Problem(f"{variable} is not a 32-byte hex private key") from None
    return Web3.to_checksum_address(account.address)


def _gas_shortfall(balance: int, gas_price: int) -> str:
    needed = MIN_TRANSACTIONS * SETTLEMENT_GAS * gas_price
    if balance > 0 and balance >= needed:
        return ""
    return f"needs at least {_eth(max(needed, 1))} ETH for {MIN_TRANSACTIONS} transactions"


def _afford(balance: int, gas_price: int) -> str:
    if gas_price <= 0:
        return " (gas price 0)"
    count = balance // (SETTLEMENT_GAS * gas_price)
    return f" (about {count} transactions at {_decimal(gas_price, 9, 4)} gwei)"


def _eth(wei: int) -> str:
    return _decimal(wei, 18, 6)


def _usdc(atomic: int) -> str:
    return _decimal(atomic, USDC_DECIMALS, USDC_DECIMALS)


def _decimal(atomic: int, decimals: int, places: int) -> str:
    value = Decimal(atomic).scaleb(-decimals).quantize(Decimal(1).scaleb(-places), ROUND_DOWN)
    if atomic > 0 and value == 0:
        return f"<{Decimal(1).scaleb(-places)}"
    text = f"{value:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
