"""The local dev chain: anvil + TestUSDC + Multicall3, driven directly and through the x402 SDK."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from web3 import Web3
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD
from x402 import x402ClientSync, x402FacilitatorSync, x402ResourceServerSync
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.constants import (
    ERR_INSUFFICIENT_BALANCE,
    ERR_INVALID_SIGNATURE,
    ERR_NONCE_ALREADY_USED,
    ERR_SETTLEMENT_PENDING,
    ERR_TOKEN_NAME_MISMATCH,
)
from x402.mechanisms.evm.exact import (
    register_exact_evm_client,
    register_exact_evm_facilitator,
    register_exact_evm_server,
)
from x402.mechanisms.evm.exact.eip3009_utils import diagnose_eip3009_simulation_failure
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.mechanisms.evm.types import ExactEIP3009Authorization
from x402.schemas import (
    PaymentPayload,
    PaymentRequired,
    PaymentRequirements,
    ResourceConfig,
    ResourceInfo,
)

from relay.dev.chain import (
    CHAIN_ID,
    MULTICALL3_ADDRESS,
    NETWORK,
    REPO_ROOT,
    USDC_ADDRESS,
    DevAccount,
    DevChain,
    DevChainError,
    dev_accounts,
    find_anvil,
    load_abi,
    load_artifact,
)
from tests.chain_attacks import CANCEL_TYPES, DOMAIN, TRANSFER_TYPES

RECEIVE_TYPES = {"ReceiveWithAuthorization": TRANSFER_TYPES["TransferWithAuthorization"]}
TWA_BYTES = "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
TWA_VRS = (
    "transferWithAuthorization(address,address,uint256,uint256,uint256,"
    "bytes32,uint8,bytes32,bytes32)"
)


@pytest.fixture(scope="module")
def chain() -> Iterator[DevChain]:
    with DevChain.start() as started:
        yield started


def now(chain: DevChain) -> int:
    return int(chain.w3.eth.get_block("latest")["timestamp"])


def sign(
    key: str, message: dict[str, Any], types: dict[str, Any] = TRANSFER_TYPES
) -> tuple[bytes, int, bytes, bytes]:
    signed = Account.sign_typed_data(key, DOMAIN, types, message)
    sig = bytes(signed.signature)
    return sig, signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")


def authorization(
    chain: DevChain,
    payer: DevAccount,
    payee: DevAccount,
    value: int,
    *,
    valid_after: int = 0,
    valid_before: int | None = None,
) -> dict[str, Any]:
    return {
        "from": payer.address,
        "to": payee.address,
        "value": value,
        "validAfter": valid_after,
        "validBefore": now(chain) + 600 if valid_before is None else valid_before,
        "nonce": secrets.token_bytes(32),
    }


def args(auth: dict[str, Any]) -> list[Any]:
    return [auth[k] for k in ("from", "to", "value", "validAfter", "validBefore", "nonce")]


def fresh_payer(chain: DevChain, index: int, amount: int) -> DevAccount:
    """A dev account topped up to exactly ``amount`` more USDC than it had."""
    payer = chain.accounts[index]
    chain.mint(payer.address, amount)
    return payer


# ---------------------------------------------------------------- artefacts, anvil, lifecycle


def test_artifacts_match_sources() -> None:
    for name in ("TestUSDC", "Multicall3"):
        artifact = load_artifact(name)
        source = (REPO_ROOT / "contracts" / f"{name}.sol").read_bytes()
        assert artifact["sourceSha256"] == hashlib.sha256(source).hexdigest(), (
            f"relay/abi/{name}.json is stale: run `npm run compile`"
        )
        assert artifact["deployedBytecode"].startswith("0x")
        assert artifact["compiler"]["version"].startswith("0.8.")
    usdc = json.loads((REPO_ROOT / "relay" / "abi" / "USDC.abi.json").read_text())
    assert usdc == load_abi("USDC")
    names = {(entry["type"], entry["name"]) for entry in usdc}
    for fn in (
        "transferWithAuthorization",
        "receiveWithAuthorization",
        "authorizationState",
        "balanceOf",
        "transfer",
        "name",
        "version",
        "decimals",
        "DOMAIN_SEPARATOR",
    ):
        assert ("function", fn) in names
    assert {("event", "Transfer"), ("event", "AuthorizationUsed")} <= names
    overloads = [e for e in usdc if e["name"] == "transferWithAuthorization"]
    assert len(overloads) == 2


def test_find_anvil() -> None:
    assert os.access(find_anvil(), os.X_OK)
    with pytest.raises(DevChainError, match="not an executable"):
        find_anvil(REPO_ROOT / "no-such-anvil")


def test_dev_accounts_are_anvils() -> None:
    accounts = dev_accounts(2)
    assert accounts[0].address == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    assert accounts[0].private_key == (
        "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
    )
    assert Account.from_key(accounts[1].private_key).address == accounts[1].address


def test_chain_basics(chain: DevChain) -> None:
    assert chain.running
    assert chain.rpc_url.startswith("http://127.0.0.1:")
    assert chain.w3.eth.chain_id == CHAIN_ID == 84532
    assert len(chain.accounts) == 10
    assert [Web3.to_checksum_address(a) for a in chain.w3.eth.accounts] == [
        a.address for a in chain.accounts
    ]
    assert chain.w3.eth.get_balance(chain.accounts[0].address) > 10**21
    assert len(chain.w3.eth.get_code(USDC_ADDRESS)) > 0
    assert len(chain.w3.eth.get_code(MULTICALL3_ADDRESS)) > 0
    assert chain.automine


def test_stop_ends_the_process() -> None:
    with DevChain.start(accounts=2) as chain:
        pid = chain.pid
        assert pid is not None and chain.running
        assert len(chain.accounts) == 2
        os.kill(pid, 0)  # alive
    assert not chain.running and chain.pid is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    assert not chain.log_path.exists()
    chain.stop()  # idempotent


def test_interval_mining() -> None:
    with DevChain.start(block_time=0.2, accounts=2) as chain:
        assert not chain.automine
        start = chain.w3.eth.block_number
        chain.mint(chain.accounts[1].address, 7)  # waits for the next interval block
        assert chain.usdc_balance(chain.accounts[1].address) == 7
        deadline = time.monotonic() + 10
        while chain.w3.eth.block_number < start + 2:
            assert time.monotonic() < deadline, "interval mining did not produce blocks"
            time.sleep(0.05)


# ---------------------------------------------------------------- the token


def test_token_metadata_and_domain(chain: DevChain) -> None:
    token = chain.token
    assert token.functions.name().call() == "USDC"
    assert token.functions.version().call() == "2"
    assert token.functions.symbol().call() == "USDC"
    assert token.functions.decimals().call() == 6
    expected = encode_typed_data(DOMAIN, CANCEL_TYPES, {"authorizer": USDC_ADDRESS, "nonce": b""})
    assert token.functions.DOMAIN_SEPARATOR().call() == expected.header
    # the service's ABI subset talks to the same contract
    usdc = chain.w3.eth.contract(address=USDC_ADDRESS, abi=load_abi("USDC"))
    assert usdc.functions.DOMAIN_SEPARATOR().call() == expected.header


def test_mint_and_balance(chain: DevChain) -> None:
    holder = chain.accounts[9].address
    before, supply = chain.usdc_balance(holder), chain.token.functions.totalSupply().call()
    nonces = [chain.w3.eth.get_transaction_count(a.address) for a in chain.accounts]
    receipt = chain.mint(holder, 1_234_567)
    assert chain.usdc_balance(holder) == before + 1_234_567
    assert chain.token.functions.totalSupply().call() == supply + 1_234_567
    (transfer,) = chain.token.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert transfer["args"]["from"] == "0x" + "00" * 20
    assert transfer["args"]["to"] == holder
    # minting does not move any dev account's nonce
    assert nonces == [chain.w3.eth.get_transaction_count(a.address) for a in chain.accounts]
    assert [Web3.to_checksum_address(a) for a in chain.w3.eth.accounts] == [
        a.address for a in chain.accounts
    ]


def test_erc20_transfer_and_allowance(chain: DevChain) -> None:
    a, b = chain.accounts[7], chain.accounts[8]
    chain.mint(a.address, 1000)
    start_b = chain.usdc_balance(b.address)
    chain.token.functions.transfer(b.address, 400).transact({"from": a.address})
    assert chain.usdc_balance(b.address) == start_b + 400
    chain.token.functions.approve(b.address, 100).transact({"from": a.address})
    assert chain.token.functions.allowance(a.address, b.address).call() == 100
    with pytest.raises(ContractLogicError, match="ERC20: transfer amount exceeds allowance"):
        chain.token.functions.transferFrom(a.address, b.address, 101).call({"from": b.address})
    chain.token.functions.transferFrom(a.address, b.address, 100).transact({"from": b.address})
    assert chain.token.functions.allowance(a.address, b.address).call() == 0
    with pytest.raises(ContractLogicError, match="ERC20: transfer amount exceeds balance"):
        chain.token.functions.transfer(b.address, 10**12).call({"from": a.address})


@pytest.mark.parametrize("form", ["vrs", "bytes"])
def test_transfer_with_authorization(chain: DevChain, form: str) -> None:
    payer, payee, submitter = chain.accounts[1], chain.accounts[2], chain.accounts[3]
    chain.mint(payer.address, 50_000)
    payer_before, payee_before = (
        chain.usdc_balance(payer.address),
        chain.usdc_balance(payee.address),
    )
    submitter_nonce = chain.w3.eth.get_transaction_count(submitter.address)

    auth = authorization(chain, payer, payee, 50_000)
    sig, v, r, s = sign(payer.private_key, auth)
    assert not chain.token.functions.authorizationState(payer.address, auth["nonce"]).call()
    if form == "vrs":
        call = chain.token.get_function_by_signature(TWA_VRS)(*args(auth), v, r, s)
    else:
        call = chain.token.get_function_by_signature(TWA_BYTES)(*args(auth), sig)
    tx = call.transact({"from": submitter.address})
    receipt = chain.w3.eth.wait_for_transaction_receipt(tx)
    assert receipt["status"] == 1

    assert chain.usdc_balance(payer.address) == payer_before - 50_000
    assert chain.usdc_balance(payee.address) == payee_before + 50_000
    assert chain.w3.eth.get_transaction_count(submitter.address) == submitter_nonce + 1
    assert chain.token.functions.authorizationState(payer.address, auth["nonce"]).call()
    (used,) = chain.token.events.AuthorizationUsed().process_receipt(receipt, errors=DISCARD)
    assert used["args"]["authorizer"] == payer.address
    assert used["args"]["nonce"] == auth["nonce"]
    (transfer,) = chain.token.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert transfer["args"]["from"] == payer.address
    assert transfer["args"]["to"] == payee.address
    assert transfer["args"]["value"] == 50_000

    # replaying the same authorization reverts, in a call and in a transaction
    with pytest.raises(ContractLogicError, match="FiatTokenV2: authorization is used or canceled"):
        call.call({"from": submitter.address})
    with pytest.raises(ContractLogicError, match="FiatTokenV2: authorization is used or canceled"):
        call.transact({"from": submitter.address})
    assert chain.usdc_balance(payee.address) == payee_before + 50_000


@pytest.mark.parametrize(
    ("window", "reason"),
    [
        ({"validBefore": -1}, "FiatTokenV2: authorization is expired"),
        ({"validBefore": 0}, "FiatTokenV2: authorization is expired"),
        ({"validAfter": 3600}, "FiatTokenV2: authorization is not yet valid"),
    ],
)
def test_authorization_window(chain: DevChain, window: dict[str, int], reason: str) -> None:
    payer, payee = chain.accounts[1], chain.accounts[2]
    chain.mint(payer.address, 10)
    auth = authorization(chain, payer, payee, 10)
    for key, offset in window.items():
        auth[key] = now(chain) + offset
    sig, *_ = sign(payer.private_key, auth)
    with pytest.raises(ContractLogicError, match=reason):
        chain.token.get_function_by_signature(TWA_BYTES)(*args(auth), sig).call()


def test_bad_signatures(chain: DevChain) -> None:
    payer, payee, thief = chain.accounts[1], chain.accounts[2], chain.accounts[4]
    chain.mint(payer.address, 10)
    auth = authorization(chain, payer, payee, 10)
    twa = chain.token.get_function_by_signature(TWA_BYTES)

    wrong_key, *_ = sign(thief.private_key, auth)
    with pytest.raises(ContractLogicError, match="FiatTokenV2: invalid signature"):
        twa(*args(auth), wrong_key).call()

    good, *_ = sign(payer.private_key, auth)
    tampered = dict(auth, to=thief.address)
    with pytest.raises(ContractLogicError, match="FiatTokenV2: invalid signature"):
        twa(*args(tampered), good).call()

    with pytest.raises(ContractLogicError, match="ECRecover: invalid signature length"):
        twa(*args(auth), good[:64]).call()
    with pytest.raises(ContractLogicError, match="ECRecover: invalid signature 'v' value"):
        twa(*args(auth), good[:64] + b"\x05").call()


def test_insufficient_balance(chain: DevChain) -> None:
    pauper, payee = chain.accounts[6], chain.accounts[2]
    auth = authorization(chain, pauper, payee, chain.usdc_balance(pauper.address) + 1)
    sig, *_ = sign(pauper.private_key, auth)
    with pytest.raises(ContractLogicError, match="ERC20: transfer amount exceeds balance"):
        chain.token.get_function_by_signature(TWA_BYTES)(*args(auth), sig).call()


def test_receive_with_authorization(chain: DevChain) -> None:
    payer, payee, other = chain.accounts[1], chain.accounts[5], chain.accounts[3]
    chain.mint(payer.address, 20)
    before = chain.usdc_balance(payee.address)
    auth = authorization(chain, payer, payee, 20)
    sig, v, r, s = sign(payer.private_key, auth, RECEIVE_TYPES)
    rwa = chain.token.get_function_by_signature(
        "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
    )(*args(auth), v, r, s)
    with pytest.raises(ContractLogicError, match="FiatTokenV2: caller must be the payee"):
        rwa.call({"from": other.address})
    # a receive authorization is not a transfer authorization
    with pytest.raises(ContractLogicError, match="FiatTokenV2: invalid signature"):
        chain.token.get_function_by_signature(TWA_BYTES)(*args(auth), sig).call()
    rwa.transact({"from": payee.address})
    assert chain.usdc_balance(payee.address) == before + 20


def test_cancel_authorization(chain: DevChain) -> None:
    payer, payee = chain.accounts[1], chain.accounts[2]
    chain.mint(payer.address, 10)
    auth = authorization(chain, payer, payee, 10)
    transfer_sig, *_ = sign(payer.private_key, auth)
    cancel_sig, *_ = sign(
        payer.private_key, {"authorizer": payer.address, "nonce": auth["nonce"]}, CANCEL_TYPES
    )
    cancel = chain.token.get_function_by_signature("cancelAuthorization(address,bytes32,bytes)")
    cancel(payer.address, auth["nonce"], cancel_sig).transact({"from": chain.accounts[3].address})
    assert chain.token.functions.authorizationState(payer.address, auth["nonce"]).call()
    with pytest.raises(ContractLogicError, match="FiatTokenV2: authorization is used or canceled"):
        chain.token.get_function_by_signature(TWA_BYTES)(*args(auth), transfer_sig).call()


def test_multicall3(chain: DevChain) -> None:
    mc = chain.multicall
    assert mc.functions.getChainId().call() == CHAIN_ID
    holder = chain.accounts[9].address
    calls = [
        (USDC_ADDRESS, True, chain.token.encode_abi("balanceOf", [holder])),
        (USDC_ADDRESS, True, chain.token.encode_abi("name")),
        (USDC_ADDRESS, True, chain.token.encode_abi("transfer", [holder, 10**30])),
    ]
    (ok_balance, balance), (ok_name, _), (ok_transfer, _) = mc.functions.aggregate3(calls).call()
    assert ok_balance and ok_name and not ok_transfer
    assert int.from_bytes(balance, "big") == chain.usdc_balance(holder)
    assert mc.functions.getEthBalance(holder).call() == chain.w3.eth.get_balance(holder)


# ---------------------------------------------------------------- the x402 SDK against the chain


def requirements(payee: DevAccount, amount: int, name: str = "USDC") -> PaymentRequirements:
    return PaymentRequirements(
        scheme="exact",
        network=NETWORK,
        asset=USDC_ADDRESS,
        amount=str(amount),
        pay_to=payee.address,
        max_timeout_seconds=300,
        extra={"name": name, "version": "2"},
    )


def pay(payer: DevAccount, req: PaymentRequirements) -> PaymentPayload:
    client = register_exact_evm_client(
        x402ClientSync(), EthAccountSigner(Account.from_key(payer.private_key))
    )
    payload = client.create_payment_payload(PaymentRequired(accepts=[req]))
    assert isinstance(payload, PaymentPayload)
    return payload


def facilitator_for(
    chain: DevChain, settler: DevAccount, *, timeout: float = 10
) -> tuple[x402FacilitatorSync, FacilitatorWeb3Signer]:
    signer = FacilitatorWeb3Signer(
        private_key=settler.private_key,
        rpc_url=chain.rpc_url,
        confirmation_timeout_seconds=timeout,
    )
    facilitator = register_exact_evm_facilitator(
        x402FacilitatorSync(), signer, networks=NETWORK, simulate_in_settle=True
    )
    return facilitator, signer


def test_x402_resource_server_verify_and_settle(chain: DevChain) -> None:
    settler, payer, payee = chain.accounts[0], chain.accounts[1], chain.accounts[2]
    chain.mint(payer.address, 50_000)
    payer_before, payee_before = (
        chain.usdc_balance(payer.address),
        chain.usdc_balance(payee.address),
    )

    facilitator, _ = facilitator_for(chain, settler)
    server = register_exact_evm_server(x402ResourceServerSync(facilitator), networks=NETWORK)
    server.initialize()
    accepts = server.build_payment_requirements(
        ResourceConfig(
            scheme="exact",
            pay_to=payee.address,
            price="$0.05",
            network=NETWORK,
            max_timeout_seconds=300,
        )
    )
    assert accepts[0].asset == USDC_ADDRESS and accepts[0].amount == "50000"
    assert accepts[0].extra == {"name": "USDC", "version": "2"}
    required = server.create_payment_required_response(
        accepts, ResourceInfo(url="http://relay.test/v1/send", description="one SMS")
    )

    client = register_exact_evm_client(
        x402ClientSync(), EthAccountSigner(Account.from_key(payer.private_key))
    )
    payload = client.create_payment_payload(required)
    assert isinstance(payload, PaymentPayload)
    matched = server.find_matching_requirements(required.accepts, payload)
    assert matched is not None

    verified = server.verify_payment(payload, matched)
    assert verified.is_valid, verified.invalid_reason
    assert verified.payer == payer.address
    settled = server.settle_payment(payload, matched)
    assert settled.success, settled.error_reason
    receipt = chain.w3.eth.get_transaction_receipt(settled.transaction)
    assert receipt["status"] == 1
    assert receipt["from"] == settler.address
    assert chain.usdc_balance(payer.address) == payer_before - 50_000
    assert chain.usdc_balance(payee.address) == payee_before + 50_000

    # A replay is refused before anything is broadcast (simulate_in_settle=True).
    settler_nonce = chain.w3.eth.get_transaction_count(settler.address)
    again = server.verify_payment(payload, matched)
    assert not again.is_valid and again.invalid_reason == ERR_NONCE_ALREADY_USED
    replay = facilitator.settle(payload, matched)
    assert not replay.success and replay.error_reason == ERR_NONCE_ALREADY_USED
    assert replay.transaction == ""
    assert chain.w3.eth.get_transaction_count(settler.address) == settler_nonce


def test_x402_invalid_payments(chain: DevChain) -> None:
    settler, payee = chain.accounts[0], chain.accounts[2]
    facilitator, signer = facilitator_for(chain, settler)

    pauper = chain.accounts[6]
    req = requirements(payee, chain.usdc_balance(pauper.address) + 1)
    result = facilitator.verify(pay(pauper, req), req)
    assert not result.is_valid and result.invalid_reason == ERR_INSUFFICIENT_BALANCE

    payer = fresh_payer(chain, 1, 10)
    wrong_domain = requirements(payee, 10, name="USD Coin")
    result = facilitator.verify(pay(payer, wrong_domain), requirements(payee, 10))
    assert not result.is_valid and result.invalid_reason == ERR_INVALID_SIGNATURE

    # The SDK's Multicall3-based diagnosis reads balanceOf/name/version/authorizationState.
    auth = ExactEIP3009Authorization(
        from_address=payer.address,
        to=payee.address,
        value="10",
        valid_after="0",
        valid_before=str(now(chain) + 600),
        nonce="0x" + secrets.token_hex(32),
    )
    diagnose = diagnose_eip3009_simulation_failure
    assert diagnose(signer, USDC_ADDRESS, auth, 10**15, "USDC", "2") == ERR_INSUFFICIENT_BALANCE
    assert diagnose(signer, USDC_ADDRESS, auth, 1, "USD Coin", "2") == ERR_TOKEN_NAME_MISMATCH


def test_x402_settlement_pending_then_mined(chain: DevChain) -> None:
    settler, payee = chain.accounts[0], chain.accounts[2]
    payer = fresh_payer(chain, 1, 30_000)
    payee_before = chain.usdc_balance(payee.address)
    facilitator, _ = facilitator_for(chain, settler, timeout=0.5)
    req = requirements(payee, 30_000)
    payload = pay(payer, req)

    chain.set_automine(False)
    try:
        pending = facilitator.settle(payload, req)
        assert not pending.success and pending.error_reason == ERR_SETTLEMENT_PENDING
        assert pending.transaction
        assert chain.usdc_balance(payee.address) == payee_before
        chain.mine()
    finally:
        chain.set_automine(True)
    # the same payload again reconciles against the broadcast transaction
    done = facilitator.settle(payload, req)
    assert done.success and done.transaction == pending.transaction
    assert chain.usdc_balance(payee.address) == payee_before + 30_000
