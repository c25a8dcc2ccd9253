"""Benchmark: the JSON nesting pre-scan on ordinary and adversarial request bodies.

    python bench/json_scan.py [--kib N] [--repeat R]

Every request body passes `relay.inputs.parse_json_object`, which scans for bracket depth
before the C parser recurses. An attacker chooses the body, so the scan must cost the same
per byte whatever the bytes are. This prints, for bodies of N KiB (default 64, the body
limit), the best of R runs as microseconds per KiB, and each body's cost relative to an
ordinary message body, side by side.

Not part of the test suite; tests/test_inputs.py holds the correctness checks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from relay.errors import InvalidInput  # noqa: E402
from relay.inputs import parse_json_object  # noqa: E402


def bodies(size: int) -> dict[str, bytes]:
    """Bodies of about ``size`` bytes: one ordinary, the rest built to be expensive."""
    text = ("Your order has shipped — track it at example.com/t/123. " * size)[: size // 2]
    return {
        "ordinary message": json.dumps({"message": text, "to": "+13012576365"}).encode(),
        'unterminated \\" run': b'{"a": "' + b'\\"' * (size // 2),
        "escaped backslashes": b'{"a": "' + b"\\\\" * (size // 2) + b'"}',
        "quote \\ quote run": b'{"a": ' + b'"\\"' * (size // 3),
        "brackets in a string": b'{"a": "' + b"[{" * (size // 2) + b'"}',
        "open brackets": b"[" * size,
        "flat array": b"[" + b"1," * (size // 2) + b"1]",
    }


def best_of(repeat: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def parse(raw: bytes) -> object:
    try:
        return parse_json_object(raw)
    except InvalidInput as error:
        return error.details.get("reason")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    cases = bodies(args.kib * 1024)
    base = None
    print(f"{'body':24} {'KiB':>6} {'µs/KiB':>9} {'vs ordinary':>12}  outcome")
    for name, raw in cases.items():
        seconds = best_of(args.repeat, lambda raw=raw: parse(raw))
        per_kib = seconds * 1e6 / (len(raw) / 1024)
        base = base or per_kib
        outcome = parse(raw)
        shown = "parsed" if isinstance(outcome, dict) else outcome
        print(f"{name:24} {len(raw) / 1024:6.1f} {per_kib:9.1f} {per_kib / base:11.2f}x  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
