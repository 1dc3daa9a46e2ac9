"""Strict JSON for every file fedmeta writes: no NaN or Infinity, which strict parsers refuse.

Python's ``json`` writes ``NaN`` by default, and many readers (JavaScript, Go, jq, Python with
``parse_constant`` refusing them) reject the file. :func:`dumps_strict` writes a non-finite number
as ``null`` and lists where and why under ``"null_values"`` at the top level, so a reader knows a
value is missing rather than zero; anything else unserialisable is an error, not a string.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

NULLS_KEY = "null_values"


def to_strict(obj: Any, path: str = "$", nulls: list[dict[str, str]] | None = None) -> Any:
    """``obj`` with every non-finite float replaced by None (recorded in ``nulls``), tuples as lists,
    numpy scalars and arrays as Python values, and paths as strings."""
    nulls = [] if nulls is None else nulls
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):
        obj = obj.tolist()  # a numpy scalar becomes a Python number, an array a (nested) list
    if isinstance(obj, float) and not math.isfinite(obj):
        nulls.append({"path": path, "reason": f"{obj!r}: no finite value (e.g. a mean over nothing)"})
        return None
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if str(k) in out:  # {1: ..., "1": ...} would silently keep one of the two
                raise ValueError(f"{path}: keys {k!r} and {str(k)!r} collide once written as JSON strings.")
            out[str(k)] = to_strict(v, f"{path}.{k}", nulls)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_strict(v, f"{path}[{i}]", nulls) for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`to_strict` (``allow_nan=False``); nulls listed under ``"null_values"``."""
    nulls: list[dict[str, str]] = []
    strict = to_strict(obj, "$", nulls)
    if nulls:
        if not isinstance(strict, dict) or NULLS_KEY in strict:
            raise ValueError(f"{len(nulls)} non-finite value(s) (first at {nulls[0]['path']}) and no room for "
                             f"the top-level {NULLS_KEY!r} record that explains them.")
        strict[NULLS_KEY] = nulls
    return json.dumps(strict, allow_nan=False, **kwargs)


def write_json(path: Path | str, obj: Any) -> Path:
    """Writes ``obj`` as indented strict JSON with sorted keys; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_strict(obj, indent=2, sort_keys=True) + "\n")
    return path


def loads_strict(text: str) -> Any:
    """Parses JSON, refusing NaN and Infinity as a strict parser would."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON; the file was not written by a strict writer.")

    return json.loads(text, parse_constant=refuse)


__all__ = ["NULLS_KEY", "dumps_strict", "loads_strict", "to_strict", "write_json"]
