"""Canonical JSON: the byte form in which Strongroom signs and hashes small documents.

Sorted keys, no insignificant white space, ASCII only. Parsing accepts only a JSON object.
"""

from __future__ import annotations

import json
from typing import Any

from strongroom.errors import FormatError


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def loads_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object, raising FormatError (naming `what`) for anything else."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:  # also a number of more than 4,300 digits
        raise FormatError(f"{what} is not valid JSON") from e
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is not a JSON object")
    return obj
