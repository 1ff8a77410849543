"""What any stored value must be, checked once where each kind of input enters.

PostgreSQL cannot store a NUL character in ``text`` or ``jsonb``, UTF-8 cannot encode a lone
surrogate, ``bigint`` ends at 2**63 - 1, and JSON has no NaN or infinity. A value that breaks one
of these would reach the database and fail there as a 500, often after other rows were written.
The API's parsers (``annotate.api.parsers``) run ``check_json`` over every request body; the
domain functions that store text from files and commands (prompts, generator names, sample text,
metadata, manifest cells) run ``clean_text``/``check_json`` themselves, so imports and the CLI get
the same refusals with the row named.
"""

from __future__ import annotations

import math
import re
from typing import Any

from annotate.errors import Invalid

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# A NUL, or a UTF-16 surrogate code point (only reachable as a lone surrogate in a Python str).
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
MAX_JSON_DEPTH = 64


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None."""
    m = _BAD_CHARS.search(value)
    if m is None:
        return None
    if m.group() == "\x00":
        return "contains a NUL character"
    return "contains a lone UTF-16 surrogate (not valid Unicode)"


def clean_text(value: Any, *, field: str, max_length: int | None = None, strip: bool = False) -> str:
    """``value`` as storable text, or ``Invalid`` naming the field."""
    if not isinstance(value, str):
        raise Invalid(f"{field}: must be a string", details={"field": field})
    problem = text_problem(value)
    if problem:
        raise Invalid(f"{field}: {problem}", details={"field": field})
    if strip:
        value = value.strip()
    if max_length is not None and len(value) > max_length:
        raise Invalid(
            f"{field}: {len(value)} characters; the limit is {max_length}",
            details={"field": field, "max_length": max_length},
        )
    return value


def json_problem(value: Any) -> tuple[str, str] | None:
    """The first (path, reason) where ``value`` cannot be stored as JSON, or None. Iterative, so a
    deeply nested body cannot exhaust the stack; nesting is capped at ``MAX_JSON_DEPTH``."""
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack:
        path, v, depth = stack.pop()
        if isinstance(v, str):
            problem = text_problem(v)
            if problem:
                return path or "(body)", problem
        elif isinstance(v, bool) or v is None:
            continue
        elif isinstance(v, int):
            if not INT64_MIN <= v <= INT64_MAX:
                return path or "(body)", "integer out of range (64-bit)"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return path or "(body)", "number is not finite"
        elif isinstance(v, dict | list):
            if depth >= MAX_JSON_DEPTH:
                return path or "(body)", f"nested deeper than {MAX_JSON_DEPTH} levels"
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, item in items:
                if isinstance(k, str):
                    problem = text_problem(k)
                    if problem:
                        return f"{path}.{k!r}" if path else repr(k), f"key {problem}"
                stack.append((f"{path}.{k}" if path else str(k), item, depth + 1))
    return None


def check_json(value: Any, *, field: str) -> Any:
    """``value`` unchanged when it can be stored as JSON; ``Invalid`` naming where it cannot."""
    found = json_problem(value)
    if found is not None:
        where, reason = found
        name = field if where == "(body)" else f"{field}.{where}"
        raise Invalid(f"{name}: {reason}", details={"field": name})
    return value


_ID = re.compile(r"[0-9]{1,19}")


def as_id(value: Any) -> int | None:
    """A row id from a JSON number or a string of ASCII digits, within ``bigint``; else None
    (``str.isdigit`` also accepts "²", which ``int`` refuses)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and _ID.fullmatch(value):
        value = int(value)
    if isinstance(value, int) and 0 <= value <= INT64_MAX:
        return value
    return None
