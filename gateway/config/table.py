"""Reading one TOML table: typed values, every error naming its dotted key, unknown keys refused.

Defaults are written once, on the section's dataclass. A parser passes them on by reading the dataclass: an
instance made without arguments (``_DEFAULT = ServerConfig()``, then ``_DEFAULT.listen_port``) or, for a class with
required fields, :class:`Defaults` (``_DEFAULT = Defaults(NetworkConfig)``), which reads the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeAlias

from gateway.errors import ConfigError

__all__ = ["Defaults", "Table"]

ValueKind: TypeAlias = type | tuple[type, ...]  # what ``isinstance`` accepts


class Table:
    """A TOML table read key by key, so that every error names its dotted path and unknown keys are refused.

    Call :meth:`done` once every key has been read: a key never read is a typo, and a typo silently left at its
    default would be a setting the operator believes is in force.
    """

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, "must be a table")
        self.data: dict[str, Any] = data
        self.path = path
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: ValueKind, default: Any) -> Any:
        self.seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        # bool is an int subclass: ``port = true`` must not read as 1.
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _as_tuple(kind))
        if not ok:
            raise ConfigError(self.key(name), f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def require(self, name: str, kind: ValueKind) -> Any:
        if name not in self.data:
            raise ConfigError(self.key(name), "is required")
        return self.get(name, kind, None)

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        value = float(self.get(name, (int, float), default))
        if value < minimum:
            raise ConfigError(self.key(name), f"must be >= {minimum}")
        return value

    def integer(self, name: str, default: int, *, minimum: int = 0) -> int:
        value: int = self.get(name, int, default)
        if value < minimum:
            raise ConfigError(self.key(name), f"must be >= {minimum}")
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> Any:
        value = self.get(name, str, default)
        if value not in allowed:
            raise ConfigError(self.key(name), "must be one of " + ", ".join(f'"{a}"' for a in allowed))
        return value

    def table(self, name: str) -> Table:
        """The sub-table ``name``, empty when absent (every key of it then takes its default)."""
        return Table(self.get(name, dict, {}), self.key(name))

    def required_table(self, name: str) -> Table:
        return Table(self.require(name, dict), self.key(name))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


class Defaults:
    """The field defaults of a dataclass that cannot be made without arguments: ``Defaults(NetworkConfig)
    .confirmations`` is ``NetworkConfig``'s own default, read from the class, so it is written only there."""

    __slots__ = ("_cls", "_values")

    def __init__(self, cls: type) -> None:
        self._cls = cls
        self._values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                self._values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                self._values[f.name] = f.default_factory()

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{self._cls.__name__}.{name} has no default") from None


def _as_tuple(kind: ValueKind) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: ValueKind) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))
