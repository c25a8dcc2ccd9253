"""Rate limits on a real Redis that goes away: a 503 with Retry-After, never a 500."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from limits.errors import StorageError

from relay.app import create_app
from relay.errors import StorageUnavailable
from relay.ratelimit import reaching_storage
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
