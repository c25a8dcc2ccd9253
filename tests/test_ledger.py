"""The ledger on SQLite and on the local PostgreSQL."""

from __future__ import annotations

import dataclasses
import importlib.util
import secrets
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from relay.ledger import (
    NONCE_GAP_SECONDS,
    SCHEMA_VERSION,
    Conflict,
    Ledger,
    SchemaMissing,
    settler_nonces,
)
from relay.records import PaymentRecord

REPO = Path(__file__).resolve().parent.parent
#: The last release whose schema was version 1.
SCHEMA_1_COMMIT = "654eca80f138cc31d0f1cef93be36ab69b67ed6c"


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
        assert list(pool.map(upgrade, ledgers)) == [SCHEMA_VERSION] * len(ledgers)
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


def test_a_late_reading_of_the_chain_never_reuses_a_nonce_in_the_mempool(ledger: Ledger) -> None:
    assert ledger.reserve_nonce("0xabc", 5, 5, 100.0) == 5  # broadcast: pending is 6 now
    assert ledger.reserve_nonce("0xabc", 6, 5, 100.1) == 6
    assert ledger.reserve_nonce("0xabc", 5, 5, 100.2) == 7  # read the chain before 5 arrived


def test_a_reservation_never_broadcast_is_reused_under_steady_traffic(ledger: Ledger) -> None:
    """Nonce 5 is reserved and never broadcast (a crash); later reservations, one a
    second, queue behind it on the chain. Nonce 5 is handed out again once its own
    reservation is older than NONCE_GAP_SECONDS, however recent the others are."""
    gap = int(NONCE_GAP_SECONDS)
    assert ledger.reserve_nonce("0xabc", 5, 5, 100.0) == 5
    handed = [ledger.reserve_nonce("0xabc", 5, 5, 100.0 + t) for t in range(1, gap + 3)]
    assert handed[: gap - 1] == list(range(6, 5 + gap))
    assert 5 in handed[gap - 1 :]
    # once the chain has mined it, the queue behind it moves on
    assert ledger.reserve_nonce("0xabc", 20, 20, 200.0) == 20


def test_a_transaction_dropped_from_the_mempool_frees_its_nonce(ledger: Ledger) -> None:
    for expected in (5, 6, 7):
        assert ledger.reserve_nonce("0xabc", 5, 5, 100.0) == expected
    assert ledger.reserve_nonce("0xabc", 8, 8, 101.0) == 8  # 5-7 mined
    # 8 was dropped from the mempool: the chain is back at 8 and 9 waits behind it
    assert ledger.reserve_nonce("0xabc", 8, 8, 101.5) == 9
    assert ledger.reserve_nonce("0xabc", 8, 8, 101.0 + NONCE_GAP_SECONDS + 1) == 8


def test_nonce_reset_chain_starts_over(ledger: Ledger) -> None:
    for _ in range(3):
        ledger.reserve_nonce("0xabc", 400, 400, 100.0)
    assert ledger.reserve_nonce("0xabc", 0, 0, 100.0) == 0
    assert ledger.reserve_nonce("0xabc", 0, 0, 100.1) == 1  # and goes on from there


def test_one_holder_of_a_fleet_lease_at_a_time(ledger: Ledger) -> None:
    assert ledger.acquire_lease("reconciler", "a", 100.0, 30.0)
    assert not ledger.acquire_lease("reconciler", "b", 110.0, 30.0)
    assert ledger.acquire_lease("reconciler", "a", 120.0, 30.0)  # renewed
    assert not ledger.acquire_lease("reconciler", "b", 149.0, 30.0)
    assert ledger.acquire_lease("reconciler", "b", 150.0, 30.0)  # a's lease ran out
    ledger.release_lease("reconciler", "b")
    assert ledger.acquire_lease("reconciler", "a", 151.0, 30.0)


def test_payment_leases_belong_to_their_holder(ledger: Ledger) -> None:
    row = payment(lease_until=130.0, lease_holder="request")
    ledger.claim_payment(row)
    assert ledger.take(row.id, 120.0, 30.0) is None
    forced = ledger.take(row.id, 120.0, 30.0, force=True)
    assert forced is not None
    ledger.release(row.id, "request")  # the old holder cannot end the new lease
    assert ledger.take(row.id, 149.0, 30.0) is None
    assert not ledger.renew(row.id, "request", 149.0, 30.0)
    assert ledger.renew(row.id, forced, 149.0, 30.0)
    assert ledger.take(row.id, 170.0, 30.0) is None  # renewed until 179
    assert not ledger.transition(row.id, ("settling",), "settled", 171.0, holder="request")
    ledger.release(row.id, forced)
    taken = ledger.take(row.id, 171.0, 30.0)
    assert taken is not None and taken != forced
    assert ledger.transition(row.id, ("settling",), "settled", 172.0, holder=taken)


def test_one_transfer_log_pays_for_one_payment(ledger: Ledger) -> None:
    first, second = payment(quote_id="q1"), payment(quote_id="q2", nonce="0x" + "22" * 32)
    ledger.claim_payment(first)
    ledger.claim_payment(second)
    assert ledger.transition(first.id, ("settling",), "settled", 2.0, tx_hash="0xt", log_index=3)
    with pytest.raises(Conflict) as info:
        ledger.transition(second.id, ("settling",), "settled", 2.0, tx_hash="0xt", log_index=3)
    assert info.value.kind == "transfer"
    assert info.value.existing is not None and info.value.existing.id == first.id
    assert ledger.transition(second.id, ("settling",), "settled", 2.0, tx_hash="0xt", log_index=5)


def test_a_database_of_the_previous_release_is_upgraded(url: str, tmp_path: Path) -> None:
    """The schema-1 ledger module of the last release creates the database and a payment;
    this release's upgrade adds its columns and keeps the row."""
    source = subprocess.run(
        ["git", "show", f"{SCHEMA_1_COMMIT}:relay/ledger.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader("ledger_schema_1", loader=None)
    assert spec is not None
    old = importlib.util.module_from_spec(spec)
    exec(compile(source, "ledger_schema_1.py", "exec"), old.__dict__)
    previous = old.Ledger.from_url(url)
    assert previous.upgrade() == 1
    row = payment_row()
    del row["header"], row["claim_block"], row["lease_until"], row["lease_holder"]
    previous.claim_payment(row)
    previous.engine.dispose()

    with pytest.raises(SchemaMissing, match="schema version 1; this release needs"):
        Ledger.open_existing(url)  # the worker and operator commands wait for the upgrade
    book = Ledger.from_url(url)
    assert book.upgrade() == SCHEMA_VERSION
    assert book.upgrade() == SCHEMA_VERSION
    kept = book.payment(row["id"])
    assert kept is not None and kept.payment_key == row["payment_key"]
    assert kept.header is None and kept.log_index is None
    assert book.take(row["id"], 1.0, 30.0) is not None
    assert book.reserve_nonce("0xabc", 3, 3, 1.0) == 3
    book.engine.dispose()


def payment(**changes: Any) -> PaymentRecord:
    """A payment record with these fields (the rest as a claim makes them)."""
    empty = {f.name: None for f in dataclasses.fields(PaymentRecord)}
    return PaymentRecord.from_row({**empty, **payment_row(**changes)})


def payment_row(**changes: Any) -> dict[str, Any]:
    """A payments row as the previous releases' ledgers take it."""
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
        "header": "e30=",
        "requirements": {},
        "claim_block": 1,
        "lease_until": None,
        "lease_holder": None,
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
    assert ledger.transition(row.id, ("settling",), "settled", 2.0, tx_hash="0xt")
    assert not ledger.transition(row.id, ("settling",), "settled", 3.0)
    stored = ledger.payment(row.id)
    assert stored is not None and stored.state == "settled" and stored.tx_hash == "0xt"


def test_verdict_cache_keeps_the_first(ledger: Ledger) -> None:
    ledger.put_verdict("k", {"approved": True}, 1.0)
    ledger.put_verdict("k", {"approved": False}, 2.0)
    assert ledger.get_verdict("k") == {"approved": True}


def test_opt_out_registry(ledger: Ledger) -> None:
    ledger.set_opt_out("+13012576365", True, 1.0)
    assert ledger.is_opted_out("+13012576365")
    ledger.set_opt_out("+13012576365", False, 2.0)
    assert not ledger.is_opted_out("+13012576365")


def test_a_nonce_given_back_is_handed_out_next(ledger: Ledger) -> None:
    assert ledger.reserve_nonce("0xabc", 5, 5, 100.0) == 5
    assert ledger.reserve_nonce("0xabc", 5, 5, 100.1) == 6
    ledger.release_nonce("0xabc", 5)  # building its transaction failed
    assert ledger.reserve_nonce("0xabc", 5, 5, 100.2) == 5
    assert ledger.reserve_nonce("0xabc", 5, 5, 100.3) == 7


def test_the_high_water_mark_never_goes_down(ledger: Ledger) -> None:
    for expected in range(10, 15):
        assert ledger.reserve_nonce("0xabc", 10, 10, 100.0) == expected
    # every reservation mined; a process that read the chain late still goes forward
    assert ledger.reserve_nonce("0xabc", 12, 15, 101.0) == 15
    with ledger.begin() as conn:
        conn.execute(settler_nonces.update().values(next_nonce=3))  # a stale writer
    assert ledger.reserve_nonce("0xabc", 15, 15, 102.0) == 16
    with ledger.begin() as conn:
        mark = conn.execute(select(settler_nonces.c.next_nonce)).scalar()
    assert mark == 17
