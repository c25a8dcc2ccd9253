"""The payment state machine: the table in relay/states.py is complete and enforced."""

from __future__ import annotations

import dataclasses

import pytest

from relay.flows.sending import STEPS
from relay.ledger import Ledger
from relay.states import (
    FINAL_STATES,
    INITIAL,
    TRANSITIONS,
    UNFINISHED,
    PaymentState,
    check_move,
)
from tests.test_ledger import payment


def reachable(start: PaymentState = INITIAL) -> set[PaymentState]:
    seen, todo = {start}, [start]
    while todo:
        for state in TRANSITIONS[todo.pop()]:
            if state not in seen:
                seen.add(state)
                todo.append(state)
    return seen


def test_every_state_is_reachable_and_every_path_ends() -> None:
    assert reachable() == set(PaymentState)
    for state in PaymentState:  # from anywhere, some final state can be reached
        assert reachable(state) & set(FINAL_STATES), state


def test_the_reconciler_handles_every_state_that_is_not_final() -> None:
    assert reachable() - set(FINAL_STATES) == set(UNFINISHED)  # what reconcile() walks
    assert set(STEPS) == set(UNFINISHED)  # and each of them has a step that carries it on


def test_final_states_never_move() -> None:
    for state in FINAL_STATES:
        assert TRANSITIONS[state] == frozenset()
        with pytest.raises(ValueError):
            check_move((state,), PaymentState.SETTLING)


def test_the_ledger_refuses_a_move_the_table_does_not_name(settings_url: str) -> None:
    ledger = Ledger.from_url(settings_url)
    ledger.upgrade()
    row = payment()
    ledger.claim_payment(row)
    with pytest.raises(ValueError, match="from settling to dispatched"):
        ledger.transition(row.id, ("settling",), "dispatched", 2.0)
    with pytest.raises(ValueError):
        ledger.transition(row.id, ("settling",), "no-such-state", 2.0)
    assert ledger.transition(row.id, ("settling",), PaymentState.SETTLED, 2.0)
    assert ledger.payment(row.id) == dataclasses.replace(row, state="settled", updated_at=2.0)
    ledger.engine.dispose()


@pytest.fixture
def settings_url(tmp_path: object) -> str:
    return f"sqlite:///{tmp_path}/states.db"
