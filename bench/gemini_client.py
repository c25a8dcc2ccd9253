"""Benchmark: what one moderation call costs the relay's process, against the floors below it.

    python bench/gemini_client.py [--calls N] [--rounds R]

A quote of a new text calls Gemini once. This measures the CPU the calling process spends
per call (``time.process_time``: the fake's own work is another process's) for:

- the relay's moderator (``relay.gemini.GeminiModerator``: google-genai builds the request
  from the generation config, sends it through httpx and reads the answer into its models;
  the relay checks the answer against its schema);
- google-genai asked for the answer raw (``should_return_http_response``: the SDK builds and
  sends the request as for the moderator but leaves the answer unread by its models; the
  body is parsed with ``json.loads``): what the SDK's request side costs alone;
- the same request body, built once, posted with a kept-alive ``httpx.Client`` and the
  answer parsed with ``json.loads`` (what is left of a call without google-genai's models);
- the same with a ``urllib3`` pool (what is left without httpx).

The fake Gemini (``tests/fake_gemini.py``) runs as its own process and answers at once.
Each row prints the median over R rounds of N calls, in milliseconds of CPU per call, and
its cost relative to the moderator's. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import urllib3  # noqa: E402
from google.genai import types  # noqa: E402

from relay.configs import GeminiConfig  # noqa: E402
from relay.gemini import GEMINI_API_VERSION, GeminiModerator, user_turn  # noqa: E402
from tests.fake_gemini import FAKE_API_KEY, FakeGemini  # noqa: E402

MODEL = "gemini-2.5-flash"
TEXT = "Your order {} has shipped"


def captured_body(config: GeminiConfig) -> dict[str, object]:
    """The request body google-genai sends for one moderation (read by an in-process fake)."""
    with FakeGemini() as fake:
        moderator = GeminiModerator(GeminiConfig(**{**vars(config), "base_url": fake.url}))
        try:
            moderator.moderate(TEXT.format("warm"))
        finally:
            moderator.close()
        (request,) = fake.requests
    return request.body


def per_call(call: Callable[[int], object], calls: int) -> float:
    """Milliseconds of this process's CPU per call, over ``calls`` calls."""
    call(-1)  # connections opened, caches warm
    started = time.process_time()
    for number in range(calls):
        call(number)
    return (time.process_time() - started) * 1000 / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per round (300)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    args = parser.parse_args(argv)
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_gemini", "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None
        url = f"http://127.0.0.1:{int(fake.stdout.readline())}"
        config = GeminiConfig(FAKE_API_KEY, MODEL, url, 10.0, 1)
        body = json.dumps(captured_body(config)).encode()
        endpoint = f"{url}/{GEMINI_API_VERSION}/models/{MODEL}:generateContent"
        headers = {"content-type": "application/json", "x-goog-api-key": FAKE_API_KEY}
        moderator = GeminiModerator(config)
        plain = httpx.Client()
        pool = urllib3.PoolManager()

        def through_sdk(number: int) -> object:
            return moderator.moderate(TEXT.format(number))

        raw_answer = types.GenerateContentConfig(
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            automatic_continuation=False,
            should_return_http_response=True,
        )

        def through_sdk_raw(number: int) -> object:
            response = moderator._client.models.generate_content(
                model=MODEL, contents=user_turn(TEXT.format(number)), config=raw_answer
            )
            assert response.sdk_http_response is not None
            return json.loads(response.sdk_http_response.body or "")

        def through_httpx(_number: int) -> object:
            return json.loads(plain.post(endpoint, content=body, headers=headers).content)

        def through_urllib3(_number: int) -> object:
            return json.loads(pool.request("POST", endpoint, body=body, headers=headers).data)

        rows = [
            ("relay moderator (google-genai, httpx)", through_sdk),
            ("google-genai, the answer left raw", through_sdk_raw),
            ("the same body, httpx + json", through_httpx),
            ("the same body, urllib3 + json", through_urllib3),
        ]
        results = {
            name: [per_call(call, args.calls) for _ in range(args.rounds)] for name, call in rows
        }
        moderator.close()
        plain.close()
    finally:
        fake.terminate()
        fake.wait(timeout=10)
    base = statistics.median(results[rows[0][0]])
    print(f"{'call':<40} {'CPU ms/call':>12} {'vs moderator':>13}")
    for name, values in results.items():
        median = statistics.median(values)
        spread = f"({min(values):.2f}-{max(values):.2f})"
        print(f"{name:<40} {median:>5.2f} {spread:<13} {median / base:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
