"""The gateway's configuration as the TOML file ``x402-gateway serve -c FILE`` reads: the few shapes it needs (tables,
arrays of tables, strings, numbers, booleans, arrays of those), no dependency for it."""

from __future__ import annotations

import json
from typing import Any


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string (escapes included)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML spelling for {type(value).__name__}")


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _key(name: str) -> str:
    return name if name.replace("_", "").replace("-", "").isalnum() else json.dumps(name)


def _table(doc: dict[str, Any], path: list[str], out: list[str]) -> None:
    for name, value in doc.items():
        if not _is_table(value) and not _is_table_array(value):
            out.append(f"{_key(name)} = {_value(value)}")
    for name, value in doc.items():
        if _is_table(value):
            out += ["", "[" + ".".join(_key(p) for p in [*path, name]) + "]"]
            _table(value, [*path, name], out)
        elif _is_table_array(value):
            for item in value:
                out += ["", "[[" + ".".join(_key(p) for p in [*path, name]) + "]]"]
                _table(item, [*path, name], out)


def dumps(doc: dict[str, Any]) -> str:
    out: list[str] = []
    _table(doc, [], out)
    return "\n".join(out).lstrip("\n") + "\n"
