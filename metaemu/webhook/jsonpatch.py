"""JSON Patch (RFC 6902) operations and the JSON Pointers (RFC 6901) they address.

Owns escaping (``~`` is ``~0`` and ``/`` is ``~1`` inside a reference token, RFC 6901 §3: an
annotation key such as ``metaemu.dev/injected`` is the token ``metaemu.dev~1injected``) and the
wire form the API server applies. Not owned here: deciding what to patch (``injection``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal


def escape(token: str) -> str:
    """One reference token: ``~`` first, so an escaped ``/`` (``~1``) is not escaped again (RFC 6901 §4)."""
    return token.replace("~", "~0").replace("/", "~1")


def pointer(*tokens: str | int) -> str:
    """The JSON Pointer of ``tokens`` (``pointer("spec", "containers", 0, "env")``); ``"-"`` is the
    end of an array (RFC 6901 §4, RFC 6902 §4.1)."""
    return "".join("/" + escape(str(token)) for token in tokens)


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """One operation. ``add`` of a path whose parent does not exist fails (RFC 6902 §4.1), so a
    caller adds a missing array or object whole, with its first elements as ``value``."""

    op: Literal["add", "replace", "test"]
    path: str
    value: Any

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "path": self.path, "value": self.value}


def encode(operations: Sequence[Operation]) -> bytes:
    """The patch document: a JSON array of operation objects (RFC 6902 §3), compact, keys in a fixed
    order so the same decision always yields the same bytes."""
    return json.dumps([o.to_json() for o in operations], separators=(",", ":")).encode()
