"""wrk runs for bench/compare.py.

Every run gets a Lua script that counts the HTTP status of each answer (per wrk thread,
summed in ``done``), so a path answering something else than expected fails loudly rather
than being timed. A request may ask for a distinct body every time: the text
``{unique}`` in its body is replaced, per request, by ``<run>-<thread>-<counter>``.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

UNIQUE = "{unique}"

_STATUS_COUNTERS = """
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_id", #threads)
end
statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + n
    end
  end
  for status, n in pairs(total) do
    io.write(string.format("status %d %d\\n", status, n))
  end
end
"""

_UNIQUE_BODIES = """
local counter = 0
function request()
  counter = counter + 1
  local body = BODY_HEAD .. RUN .. "-" .. thread_id .. "-" .. counter .. BODY_TAIL
  return wrk.format(nil, nil, nil, body)
end
"""


@dataclass(frozen=True)
class Request:
    """What wrk sends, and the status every answer must have."""

    method: str
    path: str
    body: str | None  # JSON; may hold UNIQUE once
    expect: int


@dataclass(frozen=True)
class Result:
    """One wrk run: requests per second, requests answered, statuses seen, socket errors."""

    rate: float
    count: int
    statuses: dict[int, int]
    socket_errors: str | None


class UnexpectedAnswers(RuntimeError):
    """A path answered something else than its expected status."""


def lua_string(text: str) -> str:
    """``text`` as a Lua long string (no escaping needed)."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def script(request: Request) -> str:
    """The Lua script of one run."""
    lines = [f'wrk.method = "{request.method}"']
    if request.body is not None:
        lines.append('wrk.headers["Content-Type"] = "application/json"')
        if UNIQUE in request.body:
            head, tail = request.body.split(UNIQUE, 1)
            lines.append(f"BODY_HEAD = {lua_string(head)}")
            lines.append(f"BODY_TAIL = {lua_string(tail)}")
            lines.append(f'RUN = "{time.time_ns():x}"')
            lines.append(_UNIQUE_BODIES)
        else:
            lines.append(f"wrk.body = {lua_string(request.body)}")
    lines.append(_STATUS_COUNTERS)
    return "\n".join(lines)


def run(url: str, request: Request, seconds: int, connections: int) -> Result:
    """One wrk run against ``url`` + the request's path; raises UnexpectedAnswers when any
    answer's status differs from the expected one."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script(request))
        lua.flush()
        command = [
            *("wrk", "-t2", f"-c{connections}", f"-d{seconds}s"),
            *("-s", lua.name, url + request.path),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = parse(out)
    wrong = {status: n for status, n in result.statuses.items() if status != request.expect}
    if wrong or not result.statuses:
        raise UnexpectedAnswers(
            f"{request.method} {url}{request.path}: expected only {request.expect}, "
            f"got {result.statuses or 'no answers'}"
        )
    return result


def parse(out: str) -> Result:
    """The figures of wrk's printout."""
    rate = float(_find(r"Requests/sec:\s+([\d.]+)", out))
    count = int(_find(r"(\d+) requests in", out))
    statuses = {int(s): int(n) for s, n in re.findall(r"^status (\d+) (\d+)$", out, re.M)}
    errors = re.search(r"Socket errors: (.*)", out)
    return Result(rate, count, statuses, errors.group(1) if errors else None)


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"wrk printed no {pattern!r}:\n{text}")
    return match.group(1)
