"""Route patterns: ``"POST /agent/prompt"``, ``"GET /agent/job/{id}"``, ``"GET|HEAD /files/*"``, ``"* /api/**"``.

A ``{name}`` matches one path segment, a trailing ``*`` one segment, a trailing ``**`` the rest of the path
(possibly empty). Matching runs on the *decoded, dot-segment-resolved* path, so ``/a/../paid`` and
``/%70aid`` cannot slip past a priced pattern (the proxy forwards the same resolved path).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Generic, TypeVar

_METHOD = re.compile(r"^[A-Z]+\Z")
_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")


def normalise_path(path: str) -> str:
    """Resolve ``.`` and ``..`` segments and collapse empty ones; never climbs above ``/``."""
    out: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    trailing = "/" if path.endswith("/") and out else ""
    return "/" + "/".join(out) + trailing


@dataclass(frozen=True, slots=True)
class RoutePattern:
    text: str
    methods: frozenset[str] | None  # None: any method
    regex: re.Pattern[str]
    params: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> RoutePattern:
        method_part, sep, path = text.strip().partition(" ")
        path = path.strip()
        if not sep or not path.startswith("/"):
            raise ValueError('expected "METHOD /path", e.g. "POST /agent/prompt"')
        methods: frozenset[str] | None = None
        if method_part != "*":
            names = method_part.upper().split("|")
            if not all(_METHOD.match(m) for m in names):
                raise ValueError(f"bad method list {method_part!r}")
            methods = frozenset(names)
        parts: list[str] = []
        params: list[str] = []
        segments = path.strip("/").split("/") if path.strip("/") else []
        for i, seg in enumerate(segments):
            last = i == len(segments) - 1
            if seg == "**" and last:
                parts.append(r"(?:/.*)?")
                continue
            if seg == "*" and last:
                parts.append(r"/[^/]+")
                continue
            m = _PARAM.match(seg)
            if m:
                params.append(m.group(1))
                parts.append(f"/(?P<{m.group(1)}>[^/]+)")
            elif "*" in seg or "{" in seg or "}" in seg:
                raise ValueError(f"bad path segment {seg!r}: use {{name}}, a final * or a final **")
            else:
                parts.append("/" + re.escape(seg))
        body = "".join(parts) or ""
        # Case-insensitive on purpose: many upstreams (Express, IIS, ASP.NET) ignore path case, and a priced
        # route must not be reachable for free as /AGENT/PROMPT. Matching more paths can only cost more, not less.
        regex = re.compile("^" + body + ("/?" if body else "/") + r"\Z", re.IGNORECASE)
        return cls(text=text.strip(), methods=methods, regex=regex, params=tuple(params))

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if self.methods is not None and method not in self.methods and not (method == "HEAD" and "GET" in self.methods):
            return None
        m = self.regex.match(path)
        return m.groupdict() if m else None


T = TypeVar("T")


class RouteTable(Generic[T]):
    """First matching entry wins, in configuration order."""

    def __init__(self, entries: list[tuple[RoutePattern, T]]) -> None:
        self._entries = entries

    def match(self, method: str, path: str) -> tuple[T, dict[str, str]] | None:
        for pattern, value in self._entries:
            params = pattern.match(method, path)
            if params is not None:
                return value, params
        return None
