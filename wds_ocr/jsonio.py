"""JSON text read the one way every reader of wds-ocr reads it: integers bounded in length.

Python's ``json`` turns an integer literal of any length into an ``int``, and one of more than
4,300 digits into a bare ``ValueError`` (CPython's guard against quadratic conversion). No count,
size, coordinate or id that wds-ocr reads needs more than ``MAX_INT_DIGITS`` digits, so a longer
literal is a ``JsonNumberError`` (a ``ValueError``) that names what it found, raised before the
conversion runs; each reader turns it into its own error naming the file.
"""

from __future__ import annotations

import json
from typing import Any, Callable

# Digits of the longest integer literal accepted (2**63 has 19; a pixel coordinate a handful).
MAX_INT_DIGITS = 24


class JsonNumberError(ValueError):
    """An integer literal longer than MAX_INT_DIGITS digits."""


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise JsonNumberError(f"holds an integer of {digits} digits (at most {MAX_INT_DIGITS} are read): "
                              f"{text[:12]}...")
    return int(text)


def loads(text: str | bytes, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """``json.loads`` with bounded integers (JsonNumberError), otherwise the same errors."""
    return json.loads(text, parse_int=_parse_int, object_pairs_hook=object_pairs_hook)
