"""Rate limits on a real Redis that goes away: a 503 with Retry-After, never a 500."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from limits import parse
from limits.errors import StorageError
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from relay.app import create_app
from relay.errors import StorageUnavailable
from relay.ratelimit import Limiter, open_storage, reaching_storage
from relay.services import build_services
from relay.settings import Settings, read_settings
from tests.processes import free_port, redis_server

US = "+13012576365"
QUOTE = {"message": "Is the limit store up?", "to": US}


def test_a_redis_that_dies_and_returns(make_settings: Callable[..., Settings]) -> None:
    port = free_port()
    with redis_server(port):
        settings = make_settings(rate_limit_storage_url=f"redis://127.0.0.1:{port}/0")
        client = create_app(services=build_services(settings)).test_client()
        assert client.post("/api/quote", json=QUOTE).status_code == 200
        assert client.get("/health").get_json()["checks"]["rate_limit_storage"] == "ok"
    down = client.post("/api/quote", json=QUOTE)
    assert down.status_code == 503, down.get_data(as_text=True)
    assert down.get_json()["error"] == "storage_unavailable"
    assert down.headers["Retry-After"] == "5"
    unpaid = client.post("/api/send", json=QUOTE)
    assert (unpaid.status_code, unpaid.get_json()["error"]) == (503, "storage_unavailable")
    health = client.get("/health?strict=1")
    assert health.status_code == 503
    assert health.get_json()["checks"]["rate_limit_storage"] == "unreachable"
    assert client.get("/health").status_code == 200  # alive: the database still answers
    with redis_server(port):
        assert client.post("/api/quote", json=QUOTE).status_code == 200


def test_a_redis_that_was_never_there(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(rate_limit_storage_url=f"redis://127.0.0.1:{free_port()}/0")
    client = create_app(services=build_services(settings)).test_client()
    answer = client.post("/api/quote", json=QUOTE)
    assert (answer.status_code, answer.get_json()["error"]) == (503, "storage_unavailable")


@pytest.mark.parametrize("url", ["redsi://127.0.0.1:6379/0", "127.0.0.1:6379", "memcached://x"])
def test_a_storage_url_the_limits_cannot_use_is_a_settings_problem(url: str) -> None:
    _, problems = read_settings({"RATE_LIMIT_STORAGE_URL": url}, env_file=None)
    assert any(p.startswith("RATE_LIMIT_STORAGE_URL scheme") for p in problems), problems


def test_redis_replies_are_parsed_in_c() -> None:
    """hiredis is installed and redis-py takes it: each limit checked in Redis costs less
    CPU (bench/README.md)."""
    assert redis.utils.HIREDIS_AVAILABLE
    pool = redis.Redis.from_url("redis://127.0.0.1:6379/13").connection_pool
    connection = pool.get_connection()
    try:
        assert type(connection._parser).__name__ == "_HiredisParser"
    finally:
        pool.release(connection)
        pool.disconnect()


@pytest.mark.parametrize(
    "error",
    [
        StorageError(redis.ConnectionError("refused")),
        redis.TimeoutError("timed out"),
        redis.exceptions.RedisClusterException("Redis Cluster cannot be connected"),
        redis.exceptions.SlotNotCoveredError("All slots are not covered"),
    ],
)
def test_every_storage_error_is_a_503(error: Exception) -> None:
    """limits' wrapped errors and Redis's own, a cluster's too (not RedisError subclasses)."""
    with pytest.raises(StorageUnavailable) as info, reaching_storage():
        raise error
    assert info.value.retry_after == 5


# --- counts sent ahead of their answer (Redis) ----------------------------------------------

REDIS_URL = "redis://127.0.0.1:6379/13"


def fresh_key() -> str:
    return f"client-{secrets.token_hex(6)}"


def counted(limiter: Limiter, key: str) -> int | None:
    with limiter.counting("quote", key) as answer:
        return answer()


def test_an_early_count_agrees_with_the_usual_one() -> None:
    limiter, key = Limiter(REDIS_URL, "3/minute"), fresh_key()
    assert [counted(limiter, key), limiter.hit("quote", key), counted(limiter, key)] == [None] * 3
    refused = [counted(limiter, key), limiter.hit("quote", key)]
    assert all(wait is not None and 1 <= wait <= 60 for wait in refused)


def test_an_early_count_is_sent_before_the_block_runs() -> None:
    limiter, key = Limiter(REDIS_URL, "3/minute"), fresh_key()
    window = f"LIMITS:LIMITER/quote/{key}/3/1/minute"
    other = redis.Redis.from_url(REDIS_URL)  # another process looking at the window
    with limiter.counting("quote", key) as answer:
        deadline = time.monotonic() + 5
        while other.llen(window) == 0:
            assert time.monotonic() < deadline, "the count was not sent ahead"
            time.sleep(0.01)
        assert answer() is None
    assert other.llen(window) == 1


def test_a_block_that_fails_before_asking_leaves_no_reply_on_a_connection() -> None:
    limiter, key = Limiter(REDIS_URL, "3/minute"), fresh_key()
    client = limiter.redis()
    assert client is not None
    client.ping()  # the pool's connection, opened
    # Redis holds every reply for a moment: the count's reply is still to come when the
    # next command takes the pool's connection (redis-py only sees a reply already there).
    redis.Redis.from_url(REDIS_URL).execute_command("CLIENT", "PAUSE", 300, "ALL")
    with pytest.raises(ValueError), limiter.counting("quote", key):
        raise ValueError("the request was bad")
    assert client.set(key, "mine") is True  # its own reply, not the count's
    assert client.get(key) == b"mine"
    # The failed block's count stands: two more fit in the limit of three, not three.
    assert [counted(limiter, key) is None for _ in range(3)] == [True, True, False]


def test_a_refusal_by_the_first_limit_leaves_the_others_uncounted() -> None:
    """As limits' own hit: the hour is not charged for what the minute refused."""
    limiter, key = Limiter(REDIS_URL, "2/minute;5/hour"), fresh_key()
    assert [counted(limiter, key) for _ in range(2)] == [None, None]
    assert counted(limiter, key) is not None
    hours = MovingWindowRateLimiter(open_storage(REDIS_URL))
    assert hours.get_window_stats(parse("5/hour"), "quote", key).remaining == 3


def test_a_script_redis_lost_is_counted_once_the_usual_way() -> None:
    limiter, key = Limiter(REDIS_URL, "3/minute"), fresh_key()
    window = f"LIMITS:LIMITER/quote/{key}/3/1/minute"
    client = redis.Redis.from_url(REDIS_URL)
    client.script_flush()  # as after a restart: EVALSHA finds no script
    assert counted(limiter, key) is None
    assert client.llen(window) == 1


def test_an_early_count_on_a_redis_that_is_not_there_is_a_503() -> None:
    limiter = Limiter(f"redis://127.0.0.1:{free_port()}/0", "3/minute")
    with pytest.raises(StorageUnavailable), limiter.counting("quote", fresh_key()) as answer:
        answer()


def test_a_counts_connection_goes_back_to_the_pool_once_whatever_fails_after() -> None:
    """The first limit's reply is read, then the second limit's count fails (its window
    holds something else): asked again, as a quote's end asks, the failure is repeated
    without reading the connection again (another thread may hold it by then)."""
    limiter, key = Limiter(REDIS_URL, "3/minute;5/hour"), fresh_key()
    storage = open_storage(REDIS_URL)
    assert isinstance(storage, RedisStorage)
    redis.Redis.from_url(REDIS_URL).set(
        storage.prefixed_key(parse("5/hour").key_for("quote", key)), "not a window", ex=60
    )
    client = limiter.redis()
    assert client is not None
    pool, taken, given_back = client.connection_pool, Counter[str](), Counter[str]()
    get, release = pool.get_connection, pool.release

    def getting(*args: Any, **kwargs: Any) -> Any:
        taken.update(["taken"])
        return get(*args, **kwargs)

    def releasing(connection: Any) -> None:
        given_back.update(["given back"])
        release(connection)

    pool.get_connection, pool.release = getting, releasing  # type: ignore[method-assign]
    with pytest.raises(StorageUnavailable), limiter.counting("quote", key) as answer:
        try:
            answer()
        finally:
            answer()
    # Two connections taken (the count sent ahead, limits' count of the hour), each given
    # back once; asking again neither reads nor counts anything.
    assert taken["taken"] == 2 and given_back["given back"] == 2


def test_a_reply_that_is_not_the_scripts_is_counted_again_the_usual_way() -> None:
    limiter, key = Limiter(REDIS_URL, "3/minute"), fresh_key()
    client = limiter.redis()
    assert client is not None and limiter._early is not None
    limiter._early._sha = client.script_load("return 2")  # a script that answers oddly
    window = f"LIMITS:LIMITER/quote/{key}/3/1/minute"
    assert counted(limiter, key) is None
    assert client.llen(window) == 1  # counted once, limits' own way
    assert client.set(key, "mine", ex=60) is True  # the odd reply left on no connection


def test_a_redis_that_dies_before_the_counts_reply_is_a_503() -> None:
    """The count was sent, Redis goes away before answering: the count is tried again the
    usual way, which finds no Redis either: 503, never an uncounted request let through."""
    port = free_port()
    with redis_server(port) as server:
        limiter = Limiter(f"redis://127.0.0.1:{port}/0", "3/minute")
        redis.Redis(port=port).execute_command("CLIENT", "PAUSE", 5000, "ALL")
        with pytest.raises(StorageUnavailable), limiter.counting("quote", fresh_key()) as answer:
            server.kill()
            server.wait()
            answer()
