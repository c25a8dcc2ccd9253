"""Contract calls encoded directly with eth_abi, for the settler's hot path.

web3's contract objects normalise and validate every argument through generic layers that
cost more than the encoding itself. A function whose arguments are all plain (addresses as
hex strings, integers, bytes, booleans, strings) is encoded here from its ABI: the selector
and the argument types worked out once per ABI, the values checked for their types, the
bytes produced by eth_abi, as web3 would. Anything else (tuples, arrays, an overloaded
name, a value of another type) is left to web3.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from eth_abi.abi import encode
from eth_typing import ChecksumAddress
from eth_utils.abi import function_abi_to_4byte_selector
from eth_utils.address import is_hex_address, to_checksum_address

_INTEGER = re.compile(r"u?int\d+")
_FIXED_BYTES = re.compile(r"bytes(\d+)")
#: What each plain ABI type accepts: only what web3 takes as it is (its normalisers would
#: change or refuse anything else, so that is left to them).
_PLAIN: dict[str, Callable[[Any], bool]] = {
    "address": lambda value: _is_address(value),
    "bool": lambda value: isinstance(value, bool),
    "string": lambda value: isinstance(value, str),
    "bytes": lambda value: isinstance(value, bytes),
}


@lru_cache(maxsize=4096)
def checksum(address: str) -> ChecksumAddress:
    """``address`` in its checksummed form (worked out once per address)."""
    return to_checksum_address(address)


def _is_address(value: Any) -> bool:
    """An address as web3 takes one: ``0x`` and its checksummed form. Anything else (lower
    case, no prefix, a broken checksum) is left to web3, which refuses it."""
    if not isinstance(value, str) or len(value) != 42 or not is_hex_address(value):
        return False
    return checksum(value) == value


def _check_for(abi_type: str) -> Callable[[Any], bool] | None:
    if abi_type in _PLAIN:
        return _PLAIN[abi_type]
    if _INTEGER.fullmatch(abi_type):
        return lambda value: isinstance(value, int) and not isinstance(value, bool)
    if sized := _FIXED_BYTES.fullmatch(abi_type):
        size = int(sized[1])
        return lambda value: isinstance(value, bytes) and len(value) == size
    return None  # tuples, arrays, fixed-point: web3's


@dataclass(frozen=True)
class PlainFunction:
    """A function of plain arguments: ``function(args)`` is its call data."""

    selector: bytes
    types: tuple[str, ...]
    checks: tuple[Callable[[Any], bool], ...]
    #: Whether it returns anything (a caller decoding results leaves those to web3).
    returns: bool

    def accepts(self, args: Sequence[Any]) -> bool:
        return len(args) == len(self.types) and all(
            check(value) for check, value in zip(self.checks, args, strict=True)
        )

    def __call__(self, args: Sequence[Any]) -> bytes:
        return self.selector + encode(self.types, list(args))


MAX_FUNCTIONS = 256
#: By (id of the ABI list, function name): the ABI itself (so that its id is never reused
#: while it is here) and its function, or None when web3 is to encode it.
_functions: dict[tuple[int, str], tuple[list[dict[str, Any]], PlainFunction | None]] = {}


def plain_function(
    abi: list[dict[str, Any]], name: str, args: Sequence[Any]
) -> PlainFunction | None:
    """The function ``name`` of ``abi`` if it is one of plain arguments that ``args`` fit."""
    key = (id(abi), name)
    known = _functions.get(key)
    if known is None or known[0] is not abi:
        if len(_functions) >= MAX_FUNCTIONS:  # ABIs built anew for each call: start over
            _functions.clear()
        known = (abi, _plain(abi, name))
        _functions[key] = known
    function = known[1]
    return function if function is not None and function.accepts(args) else None


def _plain(abi: list[dict[str, Any]], name: str) -> PlainFunction | None:
    entries = [e for e in abi if e.get("type", "function") == "function" and e.get("name") == name]
    if len(entries) != 1:  # absent or overloaded
        return None
    entry = entries[0]
    types = tuple(str(i["type"]) for i in entry.get("inputs", []))
    checks = tuple(_check_for(t) for t in types)
    if any(check is None for check in checks):
        return None
    return PlainFunction(
        function_abi_to_4byte_selector(entry),  # type: ignore[arg-type]
        types,
        tuple(c for c in checks if c is not None),
        bool(entry.get("outputs")),
    )
