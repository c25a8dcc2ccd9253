"""The bounded memo behind every in-process cache of a hot path."""

from __future__ import annotations

from relay.memo import Memo


def test_least_recently_used_go_first_beyond_the_bound() -> None:
    memo: Memo[str, int] = Memo(max_entries=2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # a is now the most recently used
    memo.put("c", 3)
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == (1, None, 3)
    assert len(memo) == 2


def test_entries_older_than_max_age_are_gone() -> None:
    now = [100.0]
    memo: Memo[str, bool] = Memo(max_age=5.0, clock=lambda: now[0])
    memo.put("+13012576365", False)
    now[0] += 5.0
    assert memo.get("+13012576365") is False  # a stored False is an answer, not a miss
    now[0] += 0.1
    assert memo.get("+13012576365") is None
    assert len(memo) == 0


def test_keep_first_returns_what_is_stored_and_forget_drops_it() -> None:
    memo: Memo[str, str] = Memo()
    assert memo.put("k", "first", keep_first=True) == "first"
    assert memo.put("k", "second", keep_first=True) == "first"
    assert memo.put("k", "third") == "third"
    memo.forget("k")
    assert memo.get("k") is None
    made: list[int] = []
    assert memo.get_or_make("n", lambda: made.append(1) or 7) == 7
    assert memo.get_or_make("n", lambda: made.append(1) or 8) == 7
    assert made == [1]
