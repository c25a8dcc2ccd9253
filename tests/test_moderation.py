"""The real google-genai SDK against a local fake Gemini server; the rules, layers and cache."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from relay.errors import ModerationUnavailable, StorageUnavailable
from relay.gemini import (
    SYSTEM_INSTRUCTION,
    GeminiModerator,
    gemini_client,
    generation_config,
    user_turn,
)
from relay.moderation import (
    CATEGORIES,
    POLICY_VERSION,
    Moderator,
    Verdict,
    admitted,
    cache_key,
    verdict_id_for,
)
from relay.phishing_rules import LayeredModerator, RulesModerator
from relay.ratelimit import Limiter
from relay.services import build_moderator
from relay.settings import Settings
from relay.verdict_cache import CachingModerator, MemoryVerdictCache, RedisVerdictCache
from tests import fake_gemini as fg
from tests.processes import free_port, redis_server

REJECT_CATEGORIES = [c for c in CATEGORIES if c != "ok"]


_SLEEPS: list[float] = []


@pytest.fixture(scope="module")
def server() -> Iterator[fg.FakeGemini]:
    with fg.FakeGemini() as running:
        yield running


@pytest.fixture(scope="module")
def settings(server: fg.FakeGemini) -> Settings:
    return Settings(
        gemini_api_key=fg.FAKE_API_KEY,
        gemini_base_url=server.url,
        gemini_timeout_seconds=0.5,
        gemini_max_attempts=3,
    )


@pytest.fixture(scope="module")
def shared_gemini(settings: Settings) -> Iterator[GeminiModerator]:
    # One client for the module: building one costs ~0.2 s (TLS contexts), even for plain HTTP.
    moderator = GeminiModerator(settings.gemini(), backoff_seconds=0.01, sleep=_SLEEPS.append)
    yield moderator
    moderator.close()


@pytest.fixture
def fake(server: fg.FakeGemini) -> fg.FakeGemini:
    server.reset()
    return server


@pytest.fixture
def sleeps() -> list[float]:
    _SLEEPS.clear()
    return _SLEEPS


@pytest.fixture
def gemini(
    shared_gemini: GeminiModerator, fake: fg.FakeGemini, sleeps: list[float]
) -> GeminiModerator:
    return shared_gemini


def unavailable(moderator: Moderator, text: str = "hello") -> ModerationUnavailable:
    with pytest.raises(ModerationUnavailable) as info:
        moderator.moderate(text)
    return info.value


# --- GeminiModerator: answers ---------------------------------------------------------------


def test_approval_carries_the_usage_and_a_stable_id(
    gemini: GeminiModerator, fake: fg.FakeGemini
) -> None:
    verdict = gemini.moderate("Your table for two is ready.")

    assert verdict.approved and verdict.category == "ok"
    assert verdict.confidence == pytest.approx(0.97)
    assert verdict.reason == "Ordinary transactional message."
    assert verdict.model == "gemini-2.5-flash"
    assert (verdict.input_tokens, verdict.output_tokens, verdict.thinking_tokens) == (412, 144, 57)
    assert not verdict.cached
    assert verdict.verdict_id == verdict_id_for("Your table for two is ready.", "gemini-2.5-flash")
    assert fake.request_count == 1


@pytest.mark.parametrize("category", REJECT_CATEGORIES)
def test_each_rejection_category(
    gemini: GeminiModerator, fake: fg.FakeGemini, category: str
) -> None:
    fake.enqueue(fg.reject(category, reason="  Not allowed.  "))

    verdict = gemini.moderate("some text")

    assert (verdict.approved, verdict.category, verdict.reason) == (False, category, "Not allowed.")
    assert verdict.confidence == pytest.approx(0.93)


@pytest.mark.parametrize("category", REJECT_CATEGORIES)
def test_rejection_by_marker_in_the_text(gemini: GeminiModerator, category: str) -> None:
    verdict = gemini.moderate(f"win big [[reject:{category}]]")

    assert not verdict.approved and verdict.category == category


def test_usage_is_whatever_gemini_reports(gemini: GeminiModerator, fake: fg.FakeGemini) -> None:
    fake.enqueue(replace(fg.approve(), usage={"promptTokenCount": 30}))

    verdict = gemini.moderate("hi")

    assert (verdict.input_tokens, verdict.output_tokens, verdict.thinking_tokens) == (30, 0, 0)


@pytest.mark.parametrize(
    ("answer", "category"),
    [
        ({"approved": True, "category": "spam", "confidence": 0.6, "reason": "r"}, "spam"),
        ({"approved": False, "category": "ok", "confidence": 0.6, "reason": "r"}, "other"),
    ],
)
def test_contradictory_answers_are_rejections(
    gemini: GeminiModerator, fake: fg.FakeGemini, answer: dict[str, Any], category: str
) -> None:
    fake.enqueue(fg.answer(answer))

    verdict = gemini.moderate("text")

    assert not verdict.approved and verdict.category == category


def test_request_shape(gemini: GeminiModerator, fake: fg.FakeGemini) -> None:
    gemini.moderate("Dentist tomorrow at 9.")

    (request,) = fake.requests
    config = request.generation_config
    schema = config["response_schema"]
    assert request.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert request.headers["x-goog-api-key"] == fg.FAKE_API_KEY
    assert config["temperature"] == 0
    assert config["thinking_config"] == {"thinking_budget": 0}
    assert config["response_mime_type"] == "application/json"
    assert config["candidate_count"] == 1
    assert set(schema["properties"]) == {"approved", "category", "confidence", "reason"}
    assert set(schema["required"]) == {"approved", "category", "confidence", "reason"}
    assert schema["properties"]["category"]["enum"] == list(CATEGORIES)
    assert schema["properties"]["confidence"] == {"type": "NUMBER", "minimum": 0, "maximum": 1}
    assert request.system_instruction == SYSTEM_INSTRUCTION
    assert "Dentist tomorrow at 9." in request.user_text
    assert {s["threshold"] for s in request.safety_settings} == {"BLOCK_NONE"}


def test_each_request_is_the_one_the_sdk_writes_for_the_generation_config(
    gemini: GeminiModerator, fake: fg.FakeGemini, settings: Settings
) -> None:
    """The config converted once and sent with every request: each body is the very body
    google-genai writes when handed the whole generation config on that call, and a
    second call carries nothing left over from the first."""
    with httpx.Client() as http:
        plain = gemini_client(settings.gemini(), http)
        for text in ("Dentist tomorrow at 9.", "Your parcel is on its way."):
            gemini.moderate(text)
            plain.models.generate_content(
                model=gemini.model, contents=user_turn(text), config=generation_config(gemini.model)
            )
    first, first_plain, second, second_plain = fake.requests
    assert first.body == first_plain.body and second.body == second_plain.body
    assert first.body != second.body
    assert first.path == first_plain.path and first.headers["x-goog-api-key"] == fg.FAKE_API_KEY


def test_system_instruction_states_the_carrier_policy() -> None:
    for phrase in ("A2P", "SHAFT", "phishing", "fraud", "harassment", "illegal", "political"):
        assert phrase in SYSTEM_INSTRUCTION


# --- GeminiModerator: failing closed -----------------------------------------------------------

OFF_SCHEMA = [
    {"approved": True, "category": "ok", "confidence": 0.9},
    {"approved": True, "category": "ok", "confidence": 1.5, "reason": "r"},
    {"approved": True, "category": "ok", "confidence": -0.1, "reason": "r"},
    {"approved": True, "category": "ok", "confidence": "0.9", "reason": "r"},
    {"approved": True, "category": "ok", "confidence": True, "reason": "r"},
    {"approved": "true", "category": "ok", "confidence": 0.9, "reason": "r"},
    {"approved": True, "category": "fine", "confidence": 0.9, "reason": "r"},
    {"approved": True, "category": "ok", "confidence": 0.9, "reason": 7},
    {"approved": True, "category": "ok", "confidence": 0.9, "reason": "r", "extra": 1},
    [{"approved": True, "category": "ok", "confidence": 0.9, "reason": "r"}],
    '{"approved": true, "category": "ok", "confidence": NaN, "reason": "r"}',
    "",
]


@pytest.mark.parametrize(
    ("reply", "cause"),
    [
        (fg.blocked(), "blocked"),
        (fg.blocked("PROHIBITED_CONTENT"), "blocked"),
        (fg.safety_stop(), "blocked"),
        (fg.answer({"approved": True}, finish_reason="MAX_TOKENS"), "incomplete"),
        (fg.cut_short(), "incomplete"),  # never continued by the SDK: one call
        (fg.malformed(), "invalid_answer"),
        *[(fg.answer(a), "invalid_answer") for a in OFF_SCHEMA],
        (fg.Reply(body="<html>not json</html>"), "invalid_response"),
        (fg.error(400, "INVALID_ARGUMENT", "Bad request."), "upstream_error"),
    ],
)
def test_no_clear_answer_is_unavailable_and_not_retried(
    gemini: GeminiModerator, fake: fg.FakeGemini, reply: fg.Reply, cause: str
) -> None:
    fake.enqueue(reply)

    exc = unavailable(gemini)

    assert exc.details == {"cause": cause}
    assert exc.retry_after == 5 and exc.status == 503 and exc.retryable
    assert fake.request_count == 1


def test_blocked_prompt_by_marker(gemini: GeminiModerator) -> None:
    assert unavailable(gemini, "[[blocked]]").details == {"cause": "blocked"}


def test_rate_limit_then_success_within_the_attempts(
    gemini: GeminiModerator, fake: fg.FakeGemini, sleeps: list[float]
) -> None:
    fake.enqueue(fg.rate_limited(), fg.unavailable())

    assert gemini.moderate("hi").approved
    assert fake.request_count == 3
    assert len(sleeps) == 2  # jittered waits, each within its doubling bound
    assert 0 <= sleeps[0] <= 0.01 and 0 <= sleeps[1] <= 0.02


def test_a_short_retry_after_is_honoured(
    gemini: GeminiModerator, fake: fg.FakeGemini, sleeps: list[float]
) -> None:
    fake.enqueue(fg.rate_limited(retry_after=2))

    assert gemini.moderate("hi").approved
    assert sleeps == [2.0]


def test_a_long_retry_after_is_passed_on_at_once(
    gemini: GeminiModerator, fake: fg.FakeGemini, sleeps: list[float]
) -> None:
    fake.enqueue(fg.rate_limited(retry_after=30))

    exc = unavailable(gemini)

    assert exc.retry_after == 30 and exc.details == {"cause": "rate_limited"}
    assert fake.request_count == 1 and sleeps == []


def test_retry_info_without_header_is_read(gemini: GeminiModerator, fake: fg.FakeGemini) -> None:
    reply = fg.rate_limited(retry_after=17)
    fake.enqueue(replace(reply, headers={}))

    assert unavailable(gemini).retry_after == 17


@pytest.mark.parametrize("attempts", [1, 2, 3, 5])
def test_persistent_503_gives_up_after_exactly_max_attempts(
    settings: Settings, fake: fg.FakeGemini, attempts: int
) -> None:
    fake.default = fg.unavailable()
    sleeps: list[float] = []
    config = replace(settings.gemini(), max_attempts=attempts)
    moderator = GeminiModerator(config, backoff_seconds=0.01, sleep=sleeps.append)

    exc = unavailable(moderator)
    moderator.close()

    assert exc.details == {"cause": "upstream_error"} and exc.retry_after == 5
    assert fake.request_count == attempts
    assert len(sleeps) == attempts - 1
    assert all(0 <= wait <= 0.01 * 2**i for i, wait in enumerate(sleeps))


def test_persistent_503_with_real_sleeps(settings: Settings, fake: fg.FakeGemini) -> None:
    moderator = GeminiModerator(settings.gemini(), backoff_seconds=0.01)

    unavailable(moderator, "[[503]]")
    moderator.close()

    assert fake.request_count == 3


def test_slow_answer_times_out_within_the_timeout(
    gemini: GeminiModerator, fake: fg.FakeGemini
) -> None:
    fake.enqueue(fg.slow(5))
    started = time.monotonic()

    exc = unavailable(gemini)

    assert exc.details == {"cause": "timeout"}
    assert 0.4 < time.monotonic() - started < 2.0
    assert fake.request_count == 1  # a timeout is not retried


@pytest.mark.parametrize("backend", [None, "httpx2"])
def test_unreachable_server_is_retried_then_unavailable(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch, backend: str | None
) -> None:
    """The SDK sends through our httpx client even when its environment variable asks for
    another library, so its transport errors are always the ones we classify."""
    if backend is not None:
        monkeypatch.setenv("GOOGLE_GENAI_HTTP_CLIENT", backend)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(gemini_api_key="k", gemini_base_url=f"http://127.0.0.1:{port}")
    moderator = GeminiModerator(settings.gemini(), backoff_seconds=0.01, sleep=sleeps.append)

    exc = unavailable(moderator)
    moderator.close()

    assert exc.details == {"cause": "transport_error"}
    assert len(sleeps) == settings.gemini_max_attempts - 1


def test_wrong_api_key_is_unavailable(settings: Settings, fake: fg.FakeGemini) -> None:
    moderator = GeminiModerator(replace(settings.gemini(), api_key="wrong"))

    exc = unavailable(moderator)
    moderator.close()

    assert exc.details == {"cause": "upstream_error"}
    assert fake.request_count == 1


def test_message_bodies_are_never_logged(
    gemini: GeminiModerator, fake: fg.FakeGemini, caplog: pytest.LogCaptureFixture
) -> None:
    # A part of the body no port, timestamp or id in a DEBUG line can contain by chance.
    part = "door-Zq4417"
    secret = f"Meet me at the blue {part}"
    caplog.set_level(logging.DEBUG)
    fake.enqueue(fg.unavailable(), fg.approve(), fg.malformed())

    gemini.moderate(secret)
    unavailable(gemini, secret)

    assert caplog.records and secret not in caplog.text and part not in caplog.text


# --- the fake itself ---------------------------------------------------------------------------


def post(url: str, body: Any, key: str | None = fg.FAKE_API_KEY) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} | ({"x-goog-api-key": key} if key else {})
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


SNAKE_BODY = {
    "contents": [{"role": "user", "parts": [{"text": "hi [[reject:fraud]]"}]}],
    "system_instruction": {"parts": [{"text": "policy"}]},
    "generation_config": {"response_mime_type": "application/json", "thinking_config": {}},
}


@pytest.mark.parametrize("version", ["v1", "v1beta"])
def test_fake_accepts_both_paths_and_snake_case(fake: fg.FakeGemini, version: str) -> None:
    status, body = post(f"{fake.url}/{version}/models/gemini-2.5-flash:generateContent", SNAKE_BODY)

    assert status == 200
    assert json.loads(body["candidates"][0]["content"]["parts"][0]["text"])["category"] == "fraud"
    assert body["usageMetadata"]["totalTokenCount"] == 412 + 144 + 57
    (request,) = fake.requests
    assert request.generation_config == {
        "response_mime_type": "application/json",
        "thinking_config": {},
    }
    assert request.system_instruction == "policy" and request.model == "gemini-2.5-flash"


@pytest.mark.parametrize(
    ("path", "body", "key", "status", "state"),
    [
        ("/v1beta/models/m:generateContent", SNAKE_BODY, None, 403, "PERMISSION_DENIED"),
        ("/v1beta/models/m:generateContent", SNAKE_BODY, "nope", 400, "INVALID_ARGUMENT"),
        ("/v1beta/models/m:countTokens", SNAKE_BODY, fg.FAKE_API_KEY, 404, "NOT_FOUND"),
        ("/v1beta/models/m:generateContent", {"contents": []}, fg.FAKE_API_KEY, 400, None),
        (
            "/v1beta/models/m:generateContent",
            {**SNAKE_BODY, "generationConfig": {"thinkingBudget": 0}},
            fg.FAKE_API_KEY,
            400,
            "INVALID_ARGUMENT",
        ),
    ],
)
def test_fake_refuses_like_google(
    fake: fg.FakeGemini, path: str, body: Any, key: str | None, status: int, state: str | None
) -> None:
    got, answer = post(fake.url + path, body, key)

    assert got == status
    assert answer["error"]["code"] == status
    assert state is None or answer["error"]["status"] == state


def test_fake_runs_as_a_process() -> None:
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "tests.fake_gemini", "--port", "0"]
    with subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            port = int(process.stdout.readline())
            settings = Settings(
                gemini_api_key=fg.FAKE_API_KEY, gemini_base_url=f"http://127.0.0.1:{port}"
            )
            moderator = GeminiModerator(settings.gemini())
            verdict = moderator.moderate("cheap pills [[reject:illegal]]")
            moderator.close()
        finally:
            process.terminate()
            process.wait(timeout=5)

    assert not verdict.approved and verdict.category == "illegal"


# --- rules -------------------------------------------------------------------------------------

PHISHING = [
    "Your parcel is waiting: bit.ly/3xYz",
    "Claim your refund https://tinyurl.com/abc123",
    "see t.co/xyz",
    "More at HTTPS://CUTT.LY/q",
    "Visit goo.gl/maps/abc.",
    "rebrand.ly/offer and is.gd/x",
    "Log in at http://192.168.4.20/bank",
    "go to 45.33.12.9/login now",
    "http://[2001:db8::1]/x",
    "http://3232235777/x",
    "Verify now: https://paypal-secure-login.com",
    "https://xn--pypal-4ve.com/account",
    "https://www.amazon.com@evil.example/",
    "Your account has been suspended. Restore it at https://example.com/r",
    "Unusual sign-in activity detected, check www.example.com",
    "Hi, I sent you a code by mistake, can you send me the code?",
    "please text me your password",
    "Reply with your PIN to continue",
    "what's your social security number?",
    "Send us your 6-digit verification code",
    "forward me that code",
    "Tell me your mother's maiden name",
]
BENIGN = [
    "Your verification code is 123456. Never share this code.",
    "Never share your code with anyone, not even us.",
    "Don't send your password to anyone.",
    "Your appointment is tomorrow at 3pm. Details: https://clinic.example.com/appt/123",
    "Send your friends the code SAVE10 for 10% off",
    "Send me the pin of your location",
    "Your order shipped. Track: https://www.ups.com/track?num=1Z999",
    "We moved our sign-in page to https://login.example.com",
    "Call me at 555.123.4567",
    "Version 1.2.3.4 is out",
    "Enter your code on the website to finish signing up",
    "Please confirm your appointment by replying YES",
    "Dinner at 8? 🍝",
    "",
]


@pytest.mark.parametrize("text", PHISHING)
def test_rules_reject_phishing(text: str) -> None:
    verdict = RulesModerator().check(text)

    assert verdict is not None
    assert (verdict.approved, verdict.category, verdict.model) == (False, "phishing", "rules")
    assert (verdict.input_tokens, verdict.output_tokens, verdict.thinking_tokens) == (0, 0, 0)
    assert verdict.reason and verdict.verdict_id == verdict_id_for(text, "rules")
    assert RulesModerator().moderate(text) == verdict


@pytest.mark.parametrize("text", BENIGN)
def test_rules_have_no_objection_to_ordinary_texts(text: str) -> None:
    rules = RulesModerator()

    assert rules.check(text) is None
    verdict = rules.moderate(text)
    assert (verdict.approved, verdict.category, verdict.model) == (True, "ok", "rules")
    assert verdict.input_tokens == verdict.output_tokens == verdict.thinking_tokens == 0


def test_layered_rules_reject_without_calling_gemini(
    gemini: GeminiModerator, fake: fg.FakeGemini
) -> None:
    layered = LayeredModerator(RulesModerator(), gemini)

    assert layered.moderate("Claim now bit.ly/x").model == "rules"
    assert fake.request_count == 0
    assert layered.moderate("See you at noon").model == "gemini-2.5-flash"
    assert fake.request_count == 1


# --- cache -------------------------------------------------------------------------------------


def test_cache_calls_gemini_once_per_text(gemini: GeminiModerator, fake: fg.FakeGemini) -> None:
    moderator = CachingModerator(gemini, MemoryVerdictCache(), gemini.model)

    first = moderator.moderate("Lunch at 1?")
    second = moderator.moderate("Lunch at 1?")

    assert fake.request_count == 1
    assert not first.cached and second.cached
    assert second == Verdict(**{**first.to_dict(), "cached": True})
    moderator.moderate("Lunch at 2?")
    assert fake.request_count == 2


def test_rejections_are_cached(gemini: GeminiModerator, fake: fg.FakeGemini) -> None:
    moderator = CachingModerator(gemini, MemoryVerdictCache(), gemini.model)

    first = moderator.moderate("Buy now [[reject:spam]]")
    second = moderator.moderate("Buy now [[reject:spam]]")

    assert fake.request_count == 1
    assert (second.approved, second.category, second.cached) == (False, "spam", True)
    assert second.input_tokens == first.input_tokens == 412


def test_errors_are_not_cached(gemini: GeminiModerator, fake: fg.FakeGemini) -> None:
    cache = MemoryVerdictCache()
    moderator = CachingModerator(gemini, cache, gemini.model)
    fake.enqueue(fg.error(400, "INVALID_ARGUMENT", "Bad request."), fg.blocked())

    unavailable(moderator)
    unavailable(moderator)
    assert len(cache) == 0
    assert not moderator.moderate("hello").cached
    assert moderator.moderate("hello").cached

    assert fake.request_count == 3


def test_cache_key_separates_model_and_policy() -> None:
    keys = {
        cache_key("hi", "gemini-2.5-flash"),
        cache_key("hi", "gemini-2.5-flash-lite"),
        cache_key("hi", "gemini-2.5-flash", "other-policy"),
        cache_key("hi!", "gemini-2.5-flash"),
    }
    assert len(keys) == 4
    assert cache_key("hi", "m") == cache_key("hi", "m", POLICY_VERSION)
    assert verdict_id_for("hi", "m") == verdict_id_for("hi", "m")
    assert verdict_id_for("hi", "m") != verdict_id_for("hi", "n")


def _verdict(reason: str = "r", **changes: Any) -> Verdict:
    return Verdict(**{"approved": True, "category": "ok", "confidence": 0.9, "reason": reason,
                      "model": "m", **changes})  # fmt: skip


def test_memory_cache_is_a_bounded_lru() -> None:
    cache = MemoryVerdictCache(max_entries=2)
    cache.put("a", _verdict("a"))
    cache.put("b", _verdict("b"))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", _verdict("c"))

    assert cache.get("b") is None
    assert [cache.get(k).reason for k in "ac"] == ["a", "c"]  # type: ignore[union-attr]
    cache.put("a", _verdict("other"))
    assert cache.get("a") == _verdict("a")  # the first verdict stored wins


def test_memory_cache_is_thread_safe() -> None:
    cache = MemoryVerdictCache(max_entries=50)

    def work(n: int) -> None:
        for i in range(500):
            cache.put(f"{n}-{i}", _verdict())
            cache.get(f"{n}-{i - 1}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(cache) == 50


# --- serialisation and wiring ----------------------------------------------------------------


def test_verdict_round_trips_through_json() -> None:
    verdict = Verdict(False, "spam", 1, "r", "gemini-2.5-flash", 412, 144, 57, True, "vrd_x")

    again = Verdict.from_dict(json.loads(json.dumps(verdict.to_dict())))

    assert again == verdict and isinstance(again.confidence, float)
    assert Verdict.from_dict({k: v for k, v in verdict.to_dict().items() if k != "cached"}) == (
        Verdict(False, "spam", 1.0, "r", "gemini-2.5-flash", 412, 144, 57, False, "vrd_x")
    )


@pytest.mark.parametrize(
    "change",
    [{"approved": None}, {"approved": 1}, {"input_tokens": True}, {"confidence": "0.5"}],
)
def test_verdict_from_dict_rejects_bad_fields(change: dict[str, Any]) -> None:
    data = {**_verdict().to_dict(), **change}
    with pytest.raises(ValueError):
        Verdict.from_dict({k: v for k, v in data.items() if v is not None})


def test_build_moderator_rules_mode() -> None:
    moderator = build_moderator(Settings(moderation_provider="rules"), MemoryVerdictCache())

    assert isinstance(moderator, RulesModerator)
    assert moderator.moderate("hello").approved


def test_build_moderator_layers_rules_gemini_and_cache(
    settings: Settings, fake: fg.FakeGemini
) -> None:
    cache = MemoryVerdictCache()
    moderator = build_moderator(settings, cache)

    assert moderator.moderate("Claim now bit.ly/x").model == "rules"
    assert fake.request_count == 0
    assert not moderator.moderate("See you at noon").cached
    assert moderator.moderate("See you at noon").cached
    assert fake.request_count == 1
    assert cache.get(cache_key("See you at noon", settings.gemini_model)) is not None


# --- the verdict cache in Redis (several processes) -------------------------------------------

REDIS_URL = "redis://127.0.0.1:6379/12"


def redis_cache() -> tuple[RedisVerdictCache, redis.Redis]:
    """A cache on a connection of its own, as another process has."""
    client = redis.Redis.from_url(REDIS_URL)
    return RedisVerdictCache(client), client


def test_redis_cache_shares_verdicts_and_claims_between_processes() -> None:
    (here, client), (there, _) = redis_cache(), redis_cache()
    key = f"text-{secrets.token_hex(8)}"
    first, second = _verdict("first"), _verdict("second")
    assert here.get(key) is None
    assert here.claim(key, "a", 30.0) is True
    assert there.claim(key, "b", 30.0) is False  # another process computes meanwhile
    assert here.claim(key, "a", 30.0) is True  # its own claim, renewed
    here.put(key, first, releasing="a")
    assert there.get(key) == first
    assert there.claim(key, "b", 30.0) == first  # the verdict, and nothing claimed
    stored, claim = (f"relay:{kind}:{{{key_digest(key)}}}" for kind in ("verdict", "verdict-claim"))
    assert client.exists(stored) == 1 and client.exists(claim) == 0
    there.put(key, second)  # lost: the first verdict stored for a text stays
    assert redis_cache()[0].get(key) == first
    assert 0 < client.ttl(stored) <= RedisVerdictCache.VERDICT_SECONDS
    client.delete(stored)
    assert here.get(key) == first  # read or stored once: served from memory
    decoding = RedisVerdictCache(redis.Redis.from_url(REDIS_URL, decode_responses=True))
    there.put(key, first)
    assert decoding.claim(key, "c", 30.0) == first  # a client that decodes replies to text


def test_redis_claims_are_given_up_by_their_holder_or_run_out() -> None:
    (here, _), (there, _) = redis_cache(), redis_cache()
    key = f"text-{secrets.token_hex(8)}"
    assert here.claim(key, "a", 30.0) is True
    there.release(key, "b")  # not b's to give up
    assert there.claim(key, "b", 30.0) is False
    here.release(key, "a")
    assert there.claim(key, "b", 0.05) is True
    time.sleep(0.1)  # its holder died: the claim runs out on its own
    assert here.claim(key, "a", 30.0) is True


def test_moderators_of_two_processes_on_redis_call_the_model_once(
    gemini: GeminiModerator, fake: fg.FakeGemini
) -> None:
    moderators = [
        CachingModerator(gemini, redis_cache()[0], gemini.model, poll_seconds=0.01)
        for _ in range(2)
    ]
    text = f"Meet at {secrets.token_hex(4)} [[slow:0.2]]"  # well under the 0.5 s timeout
    ready = threading.Barrier(8)

    def moderate(i: int) -> Verdict:
        ready.wait()
        return moderators[i % 2].moderate(text)

    with ThreadPoolExecutor(8) as pool:
        verdicts = list(pool.map(moderate, range(8)))
    assert fake.request_count == 1
    assert {v.cached for v in verdicts} == {False}  # every first quote priced alike
    assert len({v.verdict_id for v in verdicts}) == 1
    assert moderators[1].moderate(text).cached


def test_a_redis_that_cannot_be_reached_is_storage_unavailable_before_any_model_call(
    gemini: GeminiModerator, fake: fg.FakeGemini
) -> None:
    client = Limiter(f"redis://127.0.0.1:{free_port()}/0", "10/minute").redis()
    assert client is not None  # the limits' own client, as the relay wires it
    moderator = CachingModerator(gemini, RedisVerdictCache(client), gemini.model)
    with pytest.raises(StorageUnavailable) as info:
        moderator.moderate("Nobody keeps the verdicts")
    assert info.value.retry_after == 5
    assert fake.request_count == 0


def test_a_redis_that_dies_while_a_text_is_moderated(
    gemini: GeminiModerator, fake: fg.FakeGemini
) -> None:
    """Redis goes away between the claim and the verdict: a 503 (nothing stored, nothing
    approved); back again, the text is moderated afresh."""
    port = free_port()
    text = "Dinner at 8?"

    class KillingRedisFirst:
        """Gemini, asked only after Redis is gone: the claim is held, the verdict unstorable."""

        def moderate(self, text: str, admit: Callable[[], None] = admitted) -> Verdict:
            server.kill()
            server.wait()
            return gemini.moderate(text, admit)

    with redis_server(port) as server:
        client = Limiter(f"redis://127.0.0.1:{port}/0", "10/minute").redis()
        assert client is not None
        cache = RedisVerdictCache(client)
        with pytest.raises(StorageUnavailable):
            CachingModerator(KillingRedisFirst(), cache, gemini.model).moderate(text)
    assert fake.request_count == 1
    moderator = CachingModerator(gemini, cache, gemini.model)  # the same store, memory and all
    with redis_server(port):
        assert not moderator.moderate(text).cached
        assert moderator.moderate(text).cached
    assert fake.request_count == 2


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:48]


def test_a_refusal_before_the_call_costs_no_model_call(
    gemini: GeminiModerator, fake: fg.FakeGemini
) -> None:
    """``admit`` (the caller's rate limit) refuses: Gemini is not asked, whether called
    directly, behind the rules or behind the cache."""

    def refuse() -> None:
        raise ModerationUnavailable(details={"cause": "refused"})

    moderators: list[Moderator] = [
        gemini,
        LayeredModerator(RulesModerator(), gemini),
        CachingModerator(gemini, MemoryVerdictCache(), gemini.model),
    ]
    for moderator in moderators:
        with pytest.raises(ModerationUnavailable):
            moderator.moderate(f"Lunch at {secrets.token_hex(3)}?", refuse)
    assert fake.request_count == 0
