"""Contract calls encoded directly (relay/calldata.py): the same bytes as web3's, and web3's
own encoding for anything that is not plain."""

from __future__ import annotations

import os
from typing import Any

import pytest
from web3 import Web3
from x402.mechanisms.evm.constants import (
    AUTHORIZATION_STATE_ABI,
    BALANCE_OF_ABI,
    X402_EXACT_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI,
)
from x402.mechanisms.evm.exact.eip3009_utils import (
    TRANSFER_WITH_AUTHORIZATION_BYTES_ABI,
    TRANSFER_WITH_AUTHORIZATION_VRS_ABI,
)

from relay import calldata
from relay.calldata import checksum, plain_function

PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
TRANSFER = "transferWithAuthorization"
w3 = Web3()


def web3_data(abi: list[dict[str, Any]], name: str, args: list[Any]) -> bytes:
    contract = w3.eth.contract(address=checksum("0x" + "11" * 20), abi=abi)
    return bytes.fromhex(contract.encode_abi(name, args=args).removeprefix("0x"))


def vrs_args(**changes: Any) -> list[Any]:
    args = {
        "from": PAYER,
        "to": PAY_TO,
        "value": 50_626,
        "after": 0,
        "before": 2**40,
        "nonce": os.urandom(32),
        "v": 27,
        "r": os.urandom(32),
        "s": os.urandom(32),
    }
    args.update(changes)
    return list(args.values())


@pytest.mark.parametrize("args", [vrs_args(), vrs_args(value=2**256 - 1, v=28)])
def test_a_transfer_with_v_r_s_is_encoded_as_web3_does(args: list[Any]) -> None:
    function = plain_function(TRANSFER_WITH_AUTHORIZATION_VRS_ABI, TRANSFER, args)
    assert function is not None and not function.returns
    assert function(args) == web3_data(TRANSFER_WITH_AUTHORIZATION_VRS_ABI, TRANSFER, args)


def test_a_transfer_with_a_signature_of_any_length_is_encoded_as_web3_does() -> None:
    for signature in (os.urandom(65), os.urandom(300), b""):
        args = [*vrs_args()[:6], signature]
        function = plain_function(TRANSFER_WITH_AUTHORIZATION_BYTES_ABI, TRANSFER, args)
        assert function is not None
        assert function(args) == web3_data(TRANSFER_WITH_AUTHORIZATION_BYTES_ABI, TRANSFER, args)


def test_reads_that_return_something_say_so() -> None:
    function = plain_function(BALANCE_OF_ABI, "balanceOf", [PAYER])
    assert function is not None and function.returns
    assert function([PAYER]) == web3_data(BALANCE_OF_ABI, "balanceOf", [PAYER])
    state = plain_function(AUTHORIZATION_STATE_ABI, "authorizationState", [PAYER, bytes(32)])
    assert state is not None and state.returns


@pytest.mark.parametrize(
    "args",
    [
        vrs_args(nonce="0x" + "ab" * 32),  # a hex string web3 would turn into bytes
        vrs_args(nonce=os.urandom(33)),  # too long for bytes32
        vrs_args(nonce=os.urandom(31)),  # too short: web3 refuses it, eth_abi would pad it
        vrs_args(to=PAY_TO.lower()),  # web3 takes checksummed addresses only
        vrs_args(to=PAY_TO[2:]),  # no 0x
        vrs_args(to=PAY_TO[2:].lower()),
        vrs_args(value=True),  # a bool is not an amount
        vrs_args(value="50626"),
        vrs_args(to=PAY_TO[:-1] + ("c" if PAY_TO[-1] == "C" else "C")),  # a broken checksum
        vrs_args(to="0x1234"),
        vrs_args()[:-1],  # one argument short
    ],
)
def test_a_value_that_is_not_plain_is_left_to_web3(args: list[Any]) -> None:
    assert plain_function(TRANSFER_WITH_AUTHORIZATION_VRS_ABI, TRANSFER, args) is None


@pytest.mark.parametrize(
    "args",
    [
        vrs_args(nonce=os.urandom(31)),
        vrs_args(to=PAY_TO.lower()),
        vrs_args(to=PAY_TO[2:]),
        vrs_args(to=PAY_TO[2:].lower()),
        vrs_args(to=PAY_TO[:-1] + ("c" if PAY_TO[-1] == "C" else "C")),
    ],
)
def test_nothing_web3_refuses_is_encoded(args: list[Any]) -> None:
    """An argument web3 would refuse must not reach the chain through the direct encoding."""
    assert plain_function(TRANSFER_WITH_AUTHORIZATION_VRS_ABI, TRANSFER, args) is None
    with pytest.raises(Exception):  # noqa: B017 - web3's own refusal, whatever its type
        web3_data(TRANSFER_WITH_AUTHORIZATION_VRS_ABI, TRANSFER, args)


def test_tuples_overloads_and_unknown_names_are_left_to_web3() -> None:
    permit = X402_EXACT_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI  # tuple arguments
    names = [entry.get("name") for entry in permit if entry.get("type") == "function"]
    assert names and all(plain_function(permit, name, []) is None for name in names)
    both = TRANSFER_WITH_AUTHORIZATION_VRS_ABI + TRANSFER_WITH_AUTHORIZATION_BYTES_ABI
    assert plain_function(both, TRANSFER, vrs_args()) is None
    assert plain_function(BALANCE_OF_ABI, "balanceOfAll", [PAYER]) is None


def test_a_new_abi_at_a_reused_address_is_read_afresh() -> None:
    """The memory of an ABI is keyed by its identity: a different list is never taken for
    one seen before."""
    for _ in range(50):
        abi = [dict(entry) for entry in BALANCE_OF_ABI]
        assert plain_function(abi, "balanceOf", [PAYER]) is not None
        other = [{**BALANCE_OF_ABI[0], "inputs": [{"name": "a", "type": "uint256[]"}]}]
        assert plain_function(other, "balanceOf", [PAYER]) is None


def test_abis_built_anew_for_every_call_are_not_kept_without_bound() -> None:
    for _ in range(3 * calldata.MAX_FUNCTIONS):
        abi = [dict(entry) for entry in BALANCE_OF_ABI]
        assert plain_function(abi, "balanceOf", [PAYER]) is not None
    assert len(calldata._functions) <= calldata.MAX_FUNCTIONS
