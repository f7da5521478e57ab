"""Route patterns: ``"POST /agent/prompt"``, ``"GET /agent/job/{id}"``, ``"GET|HEAD /files/*"``, ``"* /api/**"``.

A ``{name}`` matches one path segment, a trailing ``*`` one segment, a trailing ``**`` the rest of the path
(possibly empty). Matching runs on the *decoded, dot-segment-resolved* path, so ``/a/../paid`` and
``/%70aid`` cannot slip past a priced pattern (the proxy forwards the same resolved path).

Upstream frameworks do not all read one raw path the same way (docs/threat-model.md T33): Starlette routes on the
decoded path, where ``%2F`` is a separator; aiohttp and Express route on the raw path, where it is part of a segment;
Tomcat drops ``;params``; IIS reads ``\\`` as ``/`` and drops a segment's trailing dots and spaces; some decode twice or
fold Unicode compatibility forms (U+FF0F, the fullwidth solidus). :func:`path_readings` lists every such reading of a
request path and :meth:`RouteTable.match_request` prices the request by the one priced route any of them reaches, so no
reading an upstream may make is free while another is priced; two different priced routes, control characters, bytes
that are not UTF-8 and IIS ``%u`` escapes have no one meaning and are refused (:class:`AmbiguousPath`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import unquote_to_bytes

_METHOD = re.compile(r"^[A-Z]+\Z")
_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")
# A path every framework reads alike: no escapes, no ';' path parameters, no '\\', nothing outside printable ASCII.
_PLAIN = re.compile(r"[!$&'()*+,\-./0-9:=@A-Z_a-z~]*\Z")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_IIS_ESCAPE = re.compile(r"%u[0-9A-Fa-f]{4}", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A segment ending in dots or spaces that is not a dot-segment ("cheap.", "a..", "cheap "): IIS and Windows file
# names drop them.
_TRAILING_DOTS = re.compile(r"(?<=[^/. ])[. ]+(?=/|\Z)")


def _trailing_dots(path: str) -> bool:
    """Whether a segment of ``path`` ends in a dot or space (a cheap test first: most paths have neither)."""
    return ("./" in path or " /" in path or path.endswith((".", " "))) and _TRAILING_DOTS.search(path) is not None


_ENCODED_SLASH = re.compile(r"%2f", re.IGNORECASE)
# An encoded '/' read as part of its segment (aiohttp, Express). NUL itself is refused, so it occurs nowhere else.
_IN_SEGMENT_SLASH = "\x00"


class AmbiguousPath(ValueError):
    """The request path has no single meaning across upstream frameworks: refused, never priced or forwarded."""


def _decoded(text: str) -> str:
    try:
        out = unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        # Upstreams disagree on what invalid UTF-8 means (replacement character, Latin-1, overlong '/').
        raise AmbiguousPath("percent-encoded bytes that are not UTF-8") from None
    if _CONTROL.search(out):
        # NUL ends the path for C-based upstreams; CR/LF/TAB are stripped or split on by others.
        raise AmbiguousPath("control character in the path")
    return out


def _without_path_params(path: str) -> str:
    return "/".join(seg.partition(";")[0] for seg in path.split("/"))


def path_readings(raw_path: str) -> list[str]:
    """Every way an upstream may read ``raw_path`` (as on the request line, escapes intact), each decoded and
    dot-segment resolved; the first is the gateway's own (the decoded path, ``%2F`` a separator).

    Raises :class:`AmbiguousPath` for a path no reading makes safe.
    """
    if _PLAIN.match(raw_path) and not _trailing_dots(raw_path):
        return [normalise_path(raw_path)]
    if not raw_path.isascii() or _CONTROL.search(raw_path) or " " in raw_path or _IIS_ESCAPE.search(raw_path):
        raise AmbiguousPath("the path is not plain ASCII with percent-escapes")
    first = _decoded(raw_path)
    bases = [first]
    if _ENCODED_SLASH.search(raw_path):  # the raw-path routers: %2F stays inside its segment
        bases.append("/".join(_decoded(seg).replace("/", _IN_SEGMENT_SLASH) for seg in raw_path.split("/")))
    if _ESCAPE.search(first):  # decoded twice (%252F -> %2F -> /)
        bases.append(_decoded(first))
    readings: dict[str, None] = {}
    for base in bases:
        variants = [base]
        if "\\" in base:  # IIS and Windows-minded path handling: a backslash separates
            variants += [v.replace("\\", "/") for v in variants]
        if ";" in base:  # Tomcat, Jetty, Spring: ";name=value" path parameters are not part of the route
            variants += [_without_path_params(v) for v in variants]
        if not base.isascii():  # NFKC folding: fullwidth solidus, ligatures, superscripts
            variants += [unicodedata.normalize("NFKC", v) for v in variants]
        # IIS: "cheap." and "cheap%20" are "cheap"
        variants += [_TRAILING_DOTS.sub("", v) for v in variants if _trailing_dots(v)]
        for variant in variants:
            readings.setdefault(normalise_path(variant))
    return list(readings)


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


# match_request's answers, per table: requests repeat a few paths, and reading and normalising one costs more than
# looking it up. Bounded in entries and in the length of the paths kept; a table is replaced, never changed.
_CACHED_ANSWERS = 1024
_CACHED_PATH_LENGTH = 256


class RouteTable(Generic[T]):
    """First matching entry wins, in configuration order."""

    def __init__(self, entries: list[tuple[RoutePattern, T]]) -> None:
        self._entries = list(entries)
        # (method, raw path) -> match_request's answer, or the AmbiguousPath message it raised
        self._answers: dict[tuple[str, str], tuple[T, dict[str, str]] | str | None] = {}

    def match(self, method: str, path: str) -> tuple[T, dict[str, str]] | None:
        for pattern, value in self._entries:
            params = pattern.match(method, path)
            if params is not None:
                return value, params
        return None

    def match_request(self, method: str, raw_path: str) -> tuple[T, dict[str, str]] | None:
        """The entry for a request path as received (escapes intact), whichever way an upstream reads it: the
        one entry any reading (:func:`path_readings`) reaches, the first reading's values preferred.

        Raises :class:`AmbiguousPath` when readings reach different entries: an upstream could route the request
        to either, and only one of them would have been priced.
        """
        if len(raw_path) > _CACHED_PATH_LENGTH:
            return self._match_request(method, raw_path)
        key = (method, raw_path)
        answer: tuple[T, dict[str, str]] | str | None
        if key in self._answers:
            answer = self._answers[key]
        else:
            try:
                answer = self._match_request(method, raw_path)
            except AmbiguousPath as exc:
                answer = str(exc)
            if len(self._answers) >= _CACHED_ANSWERS:
                self._answers.clear()
            self._answers[key] = answer
        if answer is None:
            return None
        if isinstance(answer, str):
            raise AmbiguousPath(answer)
        return answer[0], dict(answer[1])  # the caller's own values

    def _match_request(self, method: str, raw_path: str) -> tuple[T, dict[str, str]] | None:
        readings = path_readings(raw_path)
        found = self.match(method, readings[0])
        for path in readings[1:]:
            hit = self.match(method, path)
            if hit is None or (found is not None and hit[0] is found[0]):
                continue
            if found is not None:
                raise AmbiguousPath("the path reaches different priced routes depending on how it is decoded")
            found = hit
        if found is None or len(readings) == 1:
            return found
        return found[0], {k: v.replace(_IN_SEGMENT_SLASH, "/") for k, v in found[1].items()}
