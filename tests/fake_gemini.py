"""A local fake of the Gemini REST API (generateContent), for driving the real google-genai SDK.

Start it in-process (``with FakeGemini() as fake: ...``, then point ``GEMINI_BASE_URL`` at
``fake.url``) or as a process: ``python -m tests.fake_gemini --port 0`` prints the port.

What each request gets, first match wins:

1. the next reply queued with ``fake.enqueue(...)``;
2. a marker in the message text: ``[[approve]]``, ``[[reject:CATEGORY]]``, ``[[blocked]]``,
   ``[[safety]]``, ``[[malformed]]``, ``[[429]]``, ``[[503]]``, ``[[slow:SECONDS]]``;
3. ``fake.default`` (an approval unless changed).
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.http_thread import ServedInBackground

FAKE_API_KEY = "fake-gemini-key"
DEFAULT_USAGE = {"promptTokenCount": 412, "candidatesTokenCount": 144, "thoughtsTokenCount": 57}

_PATH = re.compile(r"^/(v1|v1beta)/models/([A-Za-z0-9._-]+):generateContent$")
_MARKER = re.compile(r"\[\[(\w+)(?::([\w.]+))?\]\]")
_TOP_LEVEL_KEYS = {
    "contents", "model", "systemInstruction", "generationConfig", "safetySettings", "tools",
    "toolConfig", "cachedContent", "labels",
}  # fmt: skip
_GENERATION_CONFIG_KEYS = {
    "temperature", "topP", "topK", "candidateCount", "maxOutputTokens", "stopSequences",
    "responseMimeType", "responseSchema", "responseJsonSchema", "thinkingConfig", "seed",
    "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs",
    "responseModalities", "mediaResolution", "speechConfig", "imageConfig",
}  # fmt: skip


@dataclass(frozen=True)
class Reply:
    """One scripted HTTP answer: status, JSON body (or raw text), headers and a delay."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    # usageMetadata added to a 200 JSON body: True for the fake's, a dict for these, False for none
    usage: dict[str, int] | bool = True


@dataclass(frozen=True)
class RecordedRequest:
    """What the fake received: path, headers (lower-cased names) and the JSON body."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def model(self) -> str:
        """The model named in the URL."""
        match = _PATH.match(self.path)
        return match.group(2) if match else ""

    @property
    def generation_config(self) -> dict[str, Any]:
        """generationConfig with every key in snake_case, whichever case the client sent."""
        config: dict[str, Any] = _snake_keys(_get(self.body, "generationConfig") or {})
        return config

    @property
    def system_instruction(self) -> str:
        """The text of the system instruction ('' when none was sent)."""
        return _parts_text(_get(self.body, "systemInstruction") or {})

    @property
    def user_text(self) -> str:
        """The text of every part of every content, joined."""
        return "\n".join(_parts_text(c) for c in self.body.get("contents", []))

    @property
    def safety_settings(self) -> list[dict[str, Any]]:
        """safetySettings with snake_case keys."""
        return [_snake_keys(s) for s in _get(self.body, "safetySettings") or []]


# --- scripted replies ---------------------------------------------------------------------


def answer(payload: Any, *, finish_reason: str = "STOP", model: str = "gemini-2.5-flash") -> Reply:
    """A 200 whose single candidate's text is ``payload`` (JSON-encoded unless a str)."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    candidate = {
        "content": {"parts": [{"text": text}], "role": "model"},
        "finishReason": finish_reason,
        "index": 0,
    }
    return Reply(body={"candidates": [candidate], "modelVersion": model, "responseId": "fake"})


def approve(reason: str = "Ordinary transactional message.", confidence: float = 0.97) -> Reply:
    """The model approves."""
    return answer({"approved": True, "category": "ok", "confidence": confidence, "reason": reason})


def reject(category: str, reason: str | None = None, confidence: float = 0.93) -> Reply:
    """The model rejects with ``category``."""
    why = reason or f"Looks like {category} under carrier A2P policy."
    return answer(
        {"approved": False, "category": category, "confidence": confidence, "reason": why}
    )


def cut_short() -> Reply:
    """The answer stopped at the per-request token limit, with the token that would continue
    it in another request."""
    reply = answer('{"reason": "Ordinary transac', finish_reason="CONTINUATION")
    reply.body["candidates"][0]["continuationToken"] = "bW9yZQ=="
    return reply


def blocked(reason: str = "SAFETY") -> Reply:
    """The prompt itself is blocked: promptFeedback.blockReason and no candidates."""
    feedback = {"blockReason": reason, "safetyRatings": []}
    return Reply(body={"promptFeedback": feedback, "modelVersion": "gemini-2.5-flash"})


def safety_stop() -> Reply:
    """A candidate stopped for SAFETY with no text."""
    candidate = {"finishReason": "SAFETY", "index": 0, "safetyRatings": []}
    return Reply(body={"candidates": [candidate], "modelVersion": "gemini-2.5-flash"})


def malformed() -> Reply:
    """A candidate whose text is not JSON."""
    return answer('{"approved": true, "category": "ok", "confidence": 0.9, "reason": "cut')


def error(status: int, state: str, message: str, **extra: Any) -> Reply:
    """A Google-style error body: {"error": {"code", "message", "status", ...}}."""
    body = {"error": {"code": status, "message": message, "status": state, **extra}}
    return Reply(status=status, body=body, usage=False)


def rate_limited(retry_after: int | None = None) -> Reply:
    """429 RESOURCE_EXHAUSTED, with RetryInfo and a Retry-After header when given."""
    message = "Resource has been exhausted (e.g. check quota)."
    if retry_after is None:
        return error(429, "RESOURCE_EXHAUSTED", message)
    info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after}s"}
    reply = error(429, "RESOURCE_EXHAUSTED", message, details=[info])
    return replace(reply, headers={"Retry-After": str(retry_after)})


def unavailable() -> Reply:
    """503 UNAVAILABLE, as Gemini answers when the model is overloaded."""
    return error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")


def slow(seconds: float, then: Reply | None = None) -> Reply:
    """``then`` (an approval by default), sent after ``seconds``."""
    return replace(then or approve(), delay=seconds)


def _from_marker(text: str) -> Reply | None:
    match = _MARKER.search(text)
    if match is None:
        return None
    name, arg = match.groups()
    simple = {"approve": approve, "blocked": blocked, "safety": safety_stop, "malformed": malformed}
    if name in simple:
        return simple[name]()
    if name == "reject":
        return reject(arg or "other")
    if name == "slow":
        return slow(float(arg or "5"))
    return {"429": rate_limited(), "503": unavailable()}.get(name)


# --- the server ----------------------------------------------------------------------------


class FakeGemini(ServedInBackground):
    """A threaded HTTP server on 127.0.0.1 speaking Gemini's generateContent protocol."""

    def __init__(
        self, api_key: str | None = FAKE_API_KEY, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.api_key = api_key  # None accepts any key
        self.usage: dict[str, int] = dict(DEFAULT_USAGE)
        self.default: Reply = approve()
        self._queue: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        server = _Server((host, port), _Handler)
        server.fake = self
        super().__init__(server, poll_interval=0.02)  # url: HttpOptions.base_url, GEMINI_BASE_URL

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every generateContent request received so far."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """How many generateContent requests arrived, whatever the answer."""
        with self._lock:
            return len(self._requests)

    def enqueue(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order."""
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        """Forget requests and queued replies; restore the default reply and usage."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()
            self.default = approve()
            self.usage = dict(DEFAULT_USAGE)

    def stopping(self) -> None:
        """Wake slow replies."""
        self._closing.set()

    def _respond(self, request: RecordedRequest) -> Reply:
        with self._lock:
            self._requests.append(request)
        problem = _auth_problem(request, self.api_key) or _shape_problem(request.body)
        return problem or self._finish(self._next_reply(request))

    def _next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        return _from_marker(request.user_text) or self.default

    def _finish(self, reply: Reply) -> Reply:
        if self._closing.wait(reply.delay):
            return error(503, "UNAVAILABLE", "The fake is shutting down.")
        if reply.status != 200 or reply.usage is False or not isinstance(reply.body, dict):
            return reply
        counts = self.usage if reply.usage is True else reply.usage
        usage = {**counts, "totalTokenCount": sum(counts.values())}
        return replace(reply, body={**reply.body, "usageMetadata": usage})


class _Server(ThreadingHTTPServer):
    #: Fifty concurrent quotes open more connections than socketserver's backlog of 5.
    request_queue_size = 128
    fake: FakeGemini

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up on a slow reply closes its socket: not an error here.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

    def log_message(self, format: str, *args: Any) -> None:
        pass  # stay quiet; tests inspect fake.requests instead

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not _PATH.match(self.path):
            self._send(error(404, "NOT_FOUND", f"Unknown path {self.path}."))
            return
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._send(error(400, "INVALID_ARGUMENT", "Invalid JSON payload received."))
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        self._send(self.server.fake._respond(RecordedRequest(self.path, headers, body)))

    def do_GET(self) -> None:
        self._send(error(404, "NOT_FOUND", "Only generateContent is faked."))

    def _send(self, reply: Reply) -> None:
        raw = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
        data = raw.encode()
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except ConnectionError:
            pass  # the client timed out and went away


# --- request checks and helpers -----------------------------------------------------------


def _auth_problem(request: RecordedRequest, api_key: str | None) -> Reply | None:
    key = request.headers.get("x-goog-api-key")
    if not key:
        return error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.")
    if api_key not in (None, key):
        return error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
    return None


def _shape_problem(body: dict[str, Any]) -> Reply | None:
    if not body.get("contents"):
        return error(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: is required.")
    unknown = [k for k in body if _camel(k) not in _TOP_LEVEL_KEYS]
    config = _get(body, "generationConfig") or {}
    unknown += [
        f"generation_config.{k}" for k in config if _camel(k) not in _GENERATION_CONFIG_KEYS
    ]
    if unknown:
        message = f'Invalid JSON payload received. Unknown name "{unknown[0]}": Cannot find field.'
        return error(400, "INVALID_ARGUMENT", message)
    return None


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _snake_keys(value: Any) -> Any:
    if isinstance(value, list):
        return [_snake_keys(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = _snake(key)
        if name == "properties" and isinstance(item, dict):  # user field names stay as they are
            out[name] = {prop: _snake_keys(schema) for prop, schema in item.items()}
        else:
            out[name] = _snake_keys(item)
    return out


def _get(body: dict[str, Any], camel_key: str) -> Any:
    return body.get(camel_key, body.get(_snake(camel_key)))


def _parts_text(content: dict[str, Any]) -> str:
    return "".join(str(p.get("text", "")) for p in content.get("parts", []))


def main(argv: list[str] | None = None) -> None:
    """Run the fake until interrupted; print the port on the first line of stdout."""
    parser = argparse.ArgumentParser(description="A local fake of the Gemini REST API.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=FAKE_API_KEY, help='"" accepts any key')
    args = parser.parse_args(argv)
    fake = FakeGemini(api_key=args.api_key or None, port=args.port)
    print(fake.port, flush=True)
    fake.serve_forever()


if __name__ == "__main__":
    main()
