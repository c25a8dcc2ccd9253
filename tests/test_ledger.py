"""The ledger on SQLite and on the local PostgreSQL."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from relay.ledger import NONCE_GAP_SECONDS, Conflict, Ledger, SchemaMissing


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    yield request.getfixturevalue("pg_url")


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    book = Ledger.from_url(url)
    book.upgrade()
    yield book
    book.engine.dispose()


def test_workers_upgrading_a_new_database_at_once(url: str) -> None:
    ledgers = [Ledger.from_url(url) for _ in range(6)]
    barrier = threading.Barrier(len(ledgers))

    def upgrade(book: Ledger) -> int:
        barrier.wait()
        return book.upgrade()

    with ThreadPoolExecutor(len(ledgers)) as pool:
        assert list(pool.map(upgrade, ledgers)) == [1] * len(ledgers)
    for book in ledgers:
        book.engine.dispose()


def test_open_existing_refuses_a_database_without_schema(tmp_path: Path) -> None:
    with pytest.raises(SchemaMissing):
        Ledger.open_existing(f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()
    Ledger.from_url(f"sqlite:///{tmp_path / 'empty.db'}").ping()
    with pytest.raises(SchemaMissing):
        Ledger.open_existing(f"sqlite:///{tmp_path / 'empty.db'}")


def test_nonces_are_unique_under_concurrency(ledger: Ledger) -> None:
    with ThreadPoolExecutor(12) as pool:
        nonces = list(pool.map(lambda _: ledger.reserve_nonce("0xabc", 7, 7, 100.0), range(40)))
    assert sorted(nonces) == list(range(7, 47))


def test_nonce_follows_the_chain_when_it_is_ahead(ledger: Ledger) -> None:
    assert ledger.reserve_nonce("0xabc", 3, 3, 100.0) == 3
    assert ledger.reserve_nonce("0xabc", 10, 10, 100.0) == 10
    assert ledger.reserve_nonce("0xabc", 10, 10, 100.0) == 11


def test_nonce_gap_falls_back_to_the_chain(ledger: Ledger) -> None:
    for expected in (5, 6, 7):
        assert ledger.reserve_nonce("0xabc", 5, 5, 100.0) == expected
    assert ledger.reserve_nonce("0xabc", 6, 5, 100.0 + NONCE_GAP_SECONDS + 1) == 8
    later = 100.0 + 3 * NONCE_GAP_SECONDS
    assert ledger.reserve_nonce("0xabc", 6, 6, later) == 6


def test_nonce_reset_chain_starts_over(ledger: Ledger) -> None:
    for _ in range(3):
        ledger.reserve_nonce("0xabc", 400, 400, 100.0)
    assert ledger.reserve_nonce("0xabc", 0, 0, 100.0) == 0


def payment(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": secrets.token_hex(12),
        "payment_key": secrets.token_hex(32),
        "payment_identifier": None,
        "quote_id": "quote-1",
        "payer": "0xpayer",
        "nonce": "0x" + "11" * 32,
        "amount_atomic": 50_000,
        "network": "eip155:84532",
        "asset": "0xasset",
        "pay_to": "0xpayto",
        "destination": "+13012576365",
        "segments": 1,
        "body": "hi",
        "version": 2,
        "state": "settling",
        "payload": {"amount": 1},
        "requirements": {},
        "created_at": 1.0,
        "updated_at": 1.0,
    }
    row.update(changes)
    return row


@pytest.mark.parametrize(
    ("second", "kind"),
    [
        ({"payment_key": "same"}, "same_payment"),
        ({"payment_identifier": "pay_1", "quote_id": "q2", "nonce": "0x2"}, "identifier"),
        ({"quote_id": "q2"}, "authorization"),
        ({"nonce": "0x" + "22" * 32}, "quote"),
    ],
)
def test_claim_conflicts_say_what_was_taken(
    ledger: Ledger, second: dict[str, Any], kind: str
) -> None:
    ledger.claim_payment(payment(payment_key="same", payment_identifier="pay_1"))
    with pytest.raises(Conflict) as info:
        ledger.claim_payment(payment(**second))
    assert info.value.kind == kind
    assert info.value.existing is not None


def test_transition_only_from_the_expected_state(ledger: Ledger) -> None:
    row = payment()
    ledger.claim_payment(row)
    assert ledger.transition(row["id"], ("settling",), "settled", 2.0, tx_hash="0xt")
    assert not ledger.transition(row["id"], ("settling",), "settled", 3.0)
    stored = ledger.payment(row["id"])
    assert stored is not None and stored["state"] == "settled" and stored["tx_hash"] == "0xt"


def test_verdict_cache_keeps_the_first(ledger: Ledger) -> None:
    ledger.put_verdict("k", {"approved": True}, 1.0)
    ledger.put_verdict("k", {"approved": False}, 2.0)
    assert ledger.get_verdict("k") == {"approved": True}


def test_opt_out_registry(ledger: Ledger) -> None:
    ledger.set_opt_out("+13012576365", True, 1.0)
    assert ledger.is_opted_out("+13012576365")
    ledger.set_opt_out("+13012576365", False, 2.0)
    assert not ledger.is_opted_out("+13012576365")
