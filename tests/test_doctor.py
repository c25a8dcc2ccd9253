"""`relay doctor` against a real anvil chain, the Gemini and Sinch fakes and real databases."""

from __future__ import annotations

import dataclasses
import io
import re
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from alembic import command
from eth_account import Account
from sqlalchemy import text

from relay import doctor, migrations
from relay.app import create_app
from relay.dev.chain import DevChain, load_artifact
from relay.ledger import Ledger
from relay.services import build_services
from relay.settings import Settings
from tests.conftest import new_wallet
from tests.fake_facilitator import FakeFacilitator
from tests.fake_gemini import FAKE_API_KEY, FakeGemini
from tests.fake_sinch import PLAN_ID, SENDER, TOKEN, FakeSinch

NAMES = [
    "configuration",
    "providers",
    "database",
    "rpc",
    "token",
    "payTo",
    "facilitator",
    "refund wallet",
    "gemini",
    "sinch",
    "rate limits",
    "proxies",
]
PAY_PASSWORD = "pay-password-do-not-print"
CALLBACK_SECRET = "callback-secret-do-not-print"
ROW = re.compile(r"^(?P<name>\S.*?)\s{2,}(?P<status>PASS|FAIL|SKIP)\s{2,}(?P<detail>.*)$")


@pytest.fixture(scope="module")
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini() as fake:
        yield fake


@pytest.fixture(scope="module")
def sinch() -> Iterator[FakeSinch]:
    with FakeSinch() as fake:
        yield fake


@pytest.fixture
def green(
    paid_settings: Callable[..., Settings], chain: DevChain, gemini: FakeGemini, sinch: FakeSinch
) -> Callable[..., Settings]:
    """Production-shaped settings where every check passes, with overrides."""

    def make(**overrides: object) -> Settings:
        refund = new_wallet(chain, usdc_atomic=5_000_000)
        chain.set_eth_balance(refund.address, 10**18)
        base: dict[str, object] = dict(
            moderation_provider="gemini",
            gemini_api_key=FAKE_API_KEY,
            gemini_base_url=gemini.url,
            sms_provider="sinch",
            sinch_service_plan_id=PLAN_ID,
            sinch_api_token=TOKEN,
            sinch_from=SENDER,
            sinch_base_url=sinch.base_url,
            sinch_callback_secret=CALLBACK_SECRET,
            refund_private_key=refund.key,
            pay_password=PAY_PASSWORD,
        )
        base.update(overrides)
        return paid_settings(**base)

    return make


def run(settings: Settings, *, dev: bool = False) -> tuple[int, str, dict[str, tuple[str, str]]]:
    """Exit status, the printed table and {check: (status, detail)}; asserts no secret leaked."""
    out = io.StringIO()
    status = doctor.main(settings, out, dev=dev)
    text = out.getvalue()
    assert_no_secrets(text, settings)
    rows = {}
    for line in text.splitlines()[1:]:
        if not line:
            break
        match = ROW.match(line)
        assert match, f"not a table row: {line!r}"
        rows[match["name"]] = (match["status"], match["detail"])
    assert list(rows) == NAMES
    return status, text, rows


def assert_no_secrets(text: str, settings: Settings) -> None:
    secrets = settings.secrets()
    for secret in filter(None, secrets):
        assert secret.removeprefix("0x").lower() not in text.lower()


def free_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def failed(rows: dict[str, tuple[str, str]]) -> list[str]:
    return [name for name, (status, _) in rows.items() if status == "FAIL"]


# --- everything right --------------------------------------------------------------------


def test_all_green_configuration_passes_every_check(
    green: Callable[..., Settings], gemini: FakeGemini, sinch: FakeSinch
) -> None:
    gemini_calls, sinch_calls = gemini.request_count, len(sinch.requests)
    status, text, rows = run(green())
    assert status == 0, text
    assert {s for s, _ in rows.values()} == {"PASS"}, text
    assert "chain 84532" in rows["rpc"][1]
    assert "name 'USDC', version '2', 6 decimals" in rows["token"][1]
    assert f"schema revision {migrations.head()} (head)" in rows["database"][1]
    assert "an account without code" in rows["payTo"][1]
    assert "local; settler" in rows["facilitator"][1]
    assert "5 USDC" in rows["refund wallet"][1]
    assert text.splitlines()[-1] == "all 12 checks passed (0 skipped)"
    # One tiny Gemini call with the key; one authorised Sinch listing, nothing sent.
    assert gemini.request_count == gemini_calls + 1
    assert gemini.requests[-1].headers["x-goog-api-key"] == FAKE_API_KEY
    assert gemini.requests[-1].generation_config["max_output_tokens"] == 1
    listing = sinch.requests[sinch_calls:]
    assert [(r.method, r.query, r.authorized) for r in listing] == [
        ("GET", {"page_size": ["1"]}, True)
    ]
    assert sinch.batches == []


def test_table_columns_are_aligned(green: Callable[..., Settings]) -> None:
    _, text, _ = run(green())
    lines = text.splitlines()
    table = lines[: lines.index("")]
    assert table[0].split() == ["CHECK", "RESULT", "DETAIL"]
    result_column = table[0].index("RESULT")
    detail_column = table[0].index("DETAIL")
    for line in table[1:]:
        assert line[result_column : result_column + 4] in ("PASS", "FAIL", "SKIP")
        assert line[result_column - 2 : result_column] == "  "
        assert line[detail_column - 2 : detail_column] == "  " and line[detail_column] != " "


def test_development_modes_are_skipped_not_failed(
    paid_settings: Callable[..., Settings], gemini: FakeGemini
) -> None:
    settings = paid_settings()  # rules moderation, outbox SMS, no refund key
    calls = gemini.request_count
    status, text, rows = run(settings)
    assert status == 1 and failed(rows) == ["providers"], text  # loudly, without --dev
    assert rows["providers"][1].startswith("MODERATION_PROVIDER=rules and SMS_PROVIDER=outbox")
    status, text, rows = run(settings, dev=True)
    assert status == 0, text
    assert rows["providers"][1].endswith("accepted with --dev")
    assert rows["gemini"][0] == rows["sinch"][0] == rows["refund wallet"][0] == "SKIP"
    assert failed(rows) == []
    assert gemini.request_count == calls
    assert text.splitlines()[-1] == "all 9 checks passed (3 skipped)"


def test_render_is_a_plain_table() -> None:
    checks = [
        doctor.Check("configuration", True, "no problems found"),
        doctor.Check("refund wallet", True, "not set", skipped=True),
        doctor.Check("rpc", False, "connection refused"),
    ]
    assert doctor.render(checks) == (
        "CHECK          RESULT  DETAIL\n"
        "configuration  PASS    no problems found\n"
        "refund wallet  SKIP    not set\n"
        "rpc            FAIL    connection refused\n"
        "\n"
        "1 of 3 checks failed: rpc\n"
    )


# --- one thing wrong at a time -----------------------------------------------------------


def test_wrong_chain_id_fails_rpc_and_token(green: Callable[..., Settings]) -> None:
    # Base mainnet against the 84532 anvil: USDC defaults to mainnet's address, which has no code.
    status, text, rows = run(green(x402_network="eip155:8453"))
    assert status == 1
    assert failed(rows) == ["rpc", "token", "refund wallet"], text
    assert "serves chain 84532" in rows["rpc"][1] and "needs chain 8453" in rows["rpc"][1]
    assert "no contract at 0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913" in rows["token"][1]


def test_rpc_with_nothing_listening_fails_without_showing_the_url_path(
    green: Callable[..., Settings],
) -> None:
    key_in_path = "k3y" * 12
    rpc_url = f"http://127.0.0.1:{free_port()}/v2/{key_in_path}"
    started = time.monotonic()
    status, text, rows = run(green(rpc_url=rpc_url))
    assert time.monotonic() - started < 10
    assert status == 1
    assert failed(rows) == ["rpc", "token", "facilitator", "refund wallet"], text
    origin = rpc_url.rsplit("/v2/", 1)[0]
    assert rows["rpc"][1] == f"RPC_URL={origin}/v2/***: connection refused"  # named, key masked
    assert rows["payTo"] == (
        "SKIP",  # a valid address whose code was not looked at is not a PASS
        f"{rows['payTo'][1].split(':')[0]}: code not checked (RPC_URL={origin} unavailable)",
    )
    assert key_in_path not in text


def test_usdc_address_without_code_fails(green: Callable[..., Settings], chain: DevChain) -> None:
    empty = new_wallet(chain).address
    status, text, rows = run(green(usdc_address=empty))
    assert status == 1
    assert failed(rows) == ["token", "refund wallet"], text
    assert rows["token"][1] == f"no contract at {empty} on chain 84532"


def test_token_with_another_eip712_domain_fails(
    green: Callable[..., Settings], chain: DevChain
) -> None:
    # The test token at an address the network does not know: payments would be signed for
    # "USD Coin" (the fallback domain) while the contract says "USDC".
    other = new_wallet(chain).address
    chain.rpc("anvil_setCode", other, load_artifact("TestUSDC")["deployedBytecode"])
    status, text, rows = run(green(usdc_address=other))
    assert status == 1
    assert failed(rows) == ["token", "refund wallet"], text
    assert "payments are signed for 'USD Coin' version '2'" in rows["token"][1]


def test_settler_without_eth_fails(green: Callable[..., Settings]) -> None:
    status, text, rows = run(green(settler_private_key=Account.create().key.hex()))
    assert status == 1
    assert failed(rows) == ["facilitator"], text
    assert "holds 0 ETH" in rows["facilitator"][1]
    assert "needs at least" in rows["facilitator"][1]


def test_settler_with_too_little_eth_fails(green: Callable[..., Settings], chain: DevChain) -> None:
    poor = new_wallet(chain)
    chain.set_eth_balance(poor.address, 1000)
    status, _, rows = run(green(settler_private_key=poor.key))
    assert status == 1 and failed(rows) == ["facilitator"]


def test_refund_wallet_without_usdc_fails(green: Callable[..., Settings], chain: DevChain) -> None:
    broke = new_wallet(chain)
    chain.set_eth_balance(broke.address, 10**18)
    status, text, rows = run(green(refund_private_key=broke.key))
    assert status == 1
    assert failed(rows) == ["refund wallet"], text
    assert rows["refund wallet"][1].endswith("0 USDC; no USDC to refund with")


def test_unreachable_database_fails_without_its_password(green: Callable[..., Settings]) -> None:
    url = "postgresql://postgres:db-password-do-not-print@127.0.0.1:1/x"
    status, text, rows = run(green(database_url=url))
    assert status == 1
    assert failed(rows) == ["database"], text
    assert rows["database"][1].startswith("postgresql://postgres:***@127.0.0.1:1/x: ")
    assert "db-password-do-not-print" not in text


def test_missing_sqlite_file_fails_and_is_not_created(
    green: Callable[..., Settings], tmp_path: Path
) -> None:
    path = tmp_path / "nowhere.db"
    status, _, rows = run(green(database_url=f"sqlite:///{path}"))
    assert status == 1
    assert rows["database"] == (
        "FAIL",
        f"SQLite file {path} does not exist (run `relay db upgrade`)",
    )
    assert not path.exists()


@pytest.mark.parametrize(
    ("revision", "found"),
    [
        (None, "no schema revision, this release needs {head} (run `relay db upgrade`)"),
        ("0001", "schema revision 0001, this release needs {head} (run `relay db upgrade`)"),
        ("9999", "schema revision 9999, newer than this release's {head}"),
    ],
)
def test_database_not_at_the_head_revision_fails(
    green: Callable[..., Settings], tmp_path: Path, revision: str | None, found: str
) -> None:
    path = tmp_path / "behind.db"
    sqlite3.connect(path).close()
    if revision is not None:
        ledger = Ledger.from_url(f"sqlite:///{path}")
        with ledger.begin() as conn:
            command.upgrade(migrations.config(conn), min(revision, migrations.head()))
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
        ledger.engine.dispose()
    status, _, rows = run(green(database_url=f"sqlite:///{path}"))
    assert status == 1
    assert rows["database"][0] == "FAIL"
    assert rows["database"][1].endswith(found.format(head=migrations.head()))


def test_wrong_gemini_key_is_rejected(green: Callable[..., Settings]) -> None:
    wrong = "wrong-gemini-key-do-not-print"
    status, text, rows = run(green(gemini_api_key=wrong))
    assert status == 1
    assert failed(rows) == ["gemini"], text
    assert "key rejected (HTTP 400 INVALID_ARGUMENT)" in rows["gemini"][1]
    assert wrong not in text


def test_unreachable_gemini_fails(green: Callable[..., Settings]) -> None:
    settings = green(gemini_base_url=f"http://127.0.0.1:{free_port()}")
    status, _, rows = run(settings)
    assert status == 1 and failed(rows) == ["gemini"]
    assert rows["gemini"][1] == f"GEMINI_BASE_URL={settings.gemini_base_url}: connection refused"


def test_wrong_sinch_token_is_rejected(green: Callable[..., Settings]) -> None:
    wrong = "wrong-sinch-token-do-not-print"
    status, text, rows = run(green(sinch_api_token=wrong))
    assert status == 1
    assert failed(rows) == ["sinch"], text
    assert rows["sinch"][1].endswith("credentials rejected (HTTP 401)")
    assert wrong not in text


def test_configuration_problems_fail(green: Callable[..., Settings]) -> None:
    status, _, rows = run(dataclasses.replace(green(), quote_secret="short"))
    assert status == 1
    assert rows["configuration"] == (
        "FAIL",
        "1 problem: QUOTE_SECRET must be set to at least 16 characters",
    )


def test_run_from_environment_reports_unparsable_variables(chain: DevChain) -> None:
    environ = {
        "QUOTE_SECRET": "x" * 32,
        "PAY_TO_ADDRESS": "not-an-address",
        "MODERATION_PROVIDER": "rules",
        "SMS_PROVIDER": "outbox",
        "RPC_URL": chain.rpc_url,
        "DATABASE_URL": "sqlite:///:memory:",
    }
    out = io.StringIO()
    assert doctor.run_from_environment(out, environ=environ, env_file=None) == 1
    text = out.getvalue()
    assert "configuration  FAIL    1 problem: PAY_TO_ADDRESS must be an EVM address" in text
    assert "x" * 32 not in text


# --- remote facilitator ------------------------------------------------------------------


def test_remote_facilitator_supporting_the_network_passes(
    green: Callable[..., Settings], chain: DevChain
) -> None:
    with FakeFacilitator(chain.rpc_url, chain.accounts[1].private_key) as facilitator:
        status, text, rows = run(green(facilitator="remote", facilitator_url=facilitator.url))
    assert status == 0, text
    assert rows["facilitator"] == (
        "PASS",
        f"remote {facilitator.url}: supports exact on eip155:84532",
    )


def test_remote_facilitator_not_listening_fails(green: Callable[..., Settings]) -> None:
    url = f"http://127.0.0.1:{free_port()}/facilitator"
    status, _, rows = run(green(facilitator="remote", facilitator_url=url))
    assert status == 1 and failed(rows) == ["facilitator"]
    assert rows["facilitator"][1] == f"FACILITATOR_URL={url}: connection refused"


# --- the checks themselves never raise or hang ---------------------------------------------


def test_a_hung_or_crashing_check_is_a_fail_without_its_message(
    green: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = green()

    def hangs(_settings: Settings) -> tuple[doctor.Status, str]:
        time.sleep(30)
        return "PASS", "never"

    def crashes(_settings: Settings) -> NoReturn:
        raise ValueError(f"boom with {settings.gemini_api_key}")

    monkeypatch.setattr(doctor, "PROBES", (("hangs", hangs), ("crashes", crashes)))
    started = time.monotonic()
    checks = doctor.run_checks(settings, timeout=0.5)
    assert time.monotonic() - started < 3
    assert [(c.name, c.status, c.detail) for c in checks] == [
        ("configuration", "PASS", "no problems found"),
        ("providers", "PASS", "gemini, sinch"),
        ("hangs", "FAIL", "no answer within 0.5 s"),
        ("crashes", "FAIL", "unexpected error (ValueError)"),
    ]


def test_a_secret_in_a_detail_is_masked(
    green: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = green()

    def leaks(s: Settings) -> tuple[doctor.Status, str]:
        return "FAIL", f"token {s.sinch_api_token} and key {s.settler_private_key}"

    monkeypatch.setattr(doctor, "PROBES", (("leaks", leaks),))
    (_, _, leak) = doctor.run_checks(settings)
    assert leak.detail == "token *** and key ***"


def test_requests_through_an_untrusted_proxy_fail_the_proxies_check(
    green: Callable[..., Settings],
) -> None:
    settings = green()
    _, _, rows = run(settings)
    assert rows["proxies"][0] == "PASS"
    app = create_app(services=build_services(settings))
    client = app.test_client()
    assert client.get("/health", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 200
    status, _text, rows = run(settings)
    assert status == 1
    assert rows["proxies"][0] == "FAIL"
    assert "TRUSTED_PROXY_HOPS" in rows["proxies"][1]
    trusted = dataclasses.replace(settings, trusted_proxy_hops=1)
    assert run(trusted)[2]["proxies"] == ("PASS", "TRUSTED_PROXY_HOPS=1")


def test_a_dead_or_misspelt_rate_limit_storage_fails(green: Callable[..., Settings]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    status, text, rows = run(green(rate_limit_storage_url=url))
    assert status == 1 and failed(rows) == ["rate limits"], text
    assert rows["rate limits"][1].startswith(f"RATE_LIMIT_STORAGE_URL={url}: ")
    misspelt = dataclasses.replace(green(), rate_limit_storage_url="redsi://127.0.0.1:6379/0")
    status, text, rows = run(misspelt)
    assert status == 1
    assert failed(rows) == ["configuration", "rate limits"], text
    assert rows["rate limits"][1] == "RATE_LIMIT_STORAGE_URL scheme 'redsi' is not supported"
    live = dataclasses.replace(green(), rate_limit_storage_url="redis://127.0.0.1:6379/0")
    assert run(live)[2]["rate limits"] == ("PASS", "redis://127.0.0.1:6379 answers")


def test_a_database_the_ledger_cannot_use_is_named(green: Callable[..., Settings]) -> None:
    settings = dataclasses.replace(green(), database_url="mysql://root:pw-hidden@127.0.0.1/relay")
    status, text, rows = run(settings)
    assert status == 1
    assert failed(rows) == ["configuration", "database"], text
    assert rows["database"][1] == (
        "DATABASE_URL=mysql://root:***@127.0.0.1/relay: scheme 'mysql' is not supported "
        "(sqlite or postgresql)"
    )
