"""The contract ABIs and compiled artefacts the relay ships, read with importlib.resources
so that an installed wheel finds them wherever it lives.

``USDC.abi.json`` is the USDC subset the service calls (valid for real USDC);
``TestUSDC.json`` and ``Multicall3.json`` are the local chain's compiled contracts
(``abi``, ``deployedBytecode``), written by ``npm run compile`` from ``contracts/``.
"""

from __future__ import annotations

import functools
import json
from importlib.resources import files
from typing import Any, cast


class ArtifactMissing(RuntimeError):
    """A shipped artefact is missing or malformed."""


def _read(filename: str) -> Any:
    resource = files(__name__).joinpath(filename)
    try:
        return json.loads(resource.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactMissing(f"relay/abi/{filename} is missing: run `npm run compile`") from None


@functools.cache
def load_artifact(name: str) -> dict[str, Any]:
    """A compiled artefact, e.g. ``load_artifact("TestUSDC")``: ``abi``, ``deployedBytecode``."""
    data = _read(f"{name}.json")
    if not isinstance(data, dict):
        raise ArtifactMissing(f"relay/abi/{name}.json is not a JSON object")
    return cast(dict[str, Any], data)


@functools.cache
def load_abi(name: str) -> list[dict[str, Any]]:
    """An ABI: ``load_abi("USDC")`` is the USDC subset the service calls;
    ``load_abi("TestUSDC")`` / ``load_abi("Multicall3")`` are the full ABIs."""
    if files(__name__).joinpath(f"{name}.abi.json").is_file():
        data = _read(f"{name}.abi.json")
        if not isinstance(data, list):
            raise ArtifactMissing(f"relay/abi/{name}.abi.json is not a JSON list")
        return cast(list[dict[str, Any]], data)
    return cast(list[dict[str, Any]], load_artifact(name)["abi"])
