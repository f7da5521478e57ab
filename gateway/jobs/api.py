"""Which requests belong to the job API: the presets of both styles and the matcher (sans-IO).

A job API has five calls; status and cancel name the job in their one ``{param}`` segment::

    submit   the priced call (must match a [[routes]] entry)
    status   free, payer only            cancel  free, payer only (optional)
    list     free, the caller's jobs (optional)    health  free, counts only (optional)

Matching runs on the same decoded, dot-segment-resolved path as the payment middleware's route matching, and
``health`` is tried before ``status``: ``/api/messaging/jobs/health`` also fits ``/api/messaging/jobs/{id}``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from gateway.routes import RoutePattern, normalise_path

__all__ = ["PRESETS", "JobRoutes", "Kind", "preset"]


class Kind(enum.Enum):
    SUBMIT = "submit"
    STATUS = "status"
    CANCEL = "cancel"
    LIST = "list"
    HEALTH = "health"


FREE_KINDS = frozenset({Kind.STATUS, Kind.CANCEL, Kind.LIST, Kind.HEALTH})

# Style A (seeds 000-003) and style B (seed 004). "" = the call does not exist. The runner also serves a cancel
# for style B (its clients see a cancelled job as failed, see wire.py); a fronted style B upstream has none.
PRESETS: Mapping[str, Mapping[str, str]] = {
    "agent": {
        "submit": "POST /agent/prompt",
        "status": "GET /agent/job/{id}",
        "cancel": "POST /agent/job/{id}/cancel",
        "list": "",
        "health": "",
    },
    "messaging": {
        "submit": "POST /api/messaging/jobs",
        "status": "GET /api/messaging/jobs/{id}",
        "cancel": "",
        "list": "GET /api/messaging/jobs",
        "health": "GET /api/messaging/jobs/health",
    },
}
RUNNER_MESSAGING_CANCEL = "POST /api/messaging/jobs/{id}/cancel"


def preset(style: str, mode: str) -> dict[str, str]:
    """The default templates of ``style`` ("custom": none) in ``mode``."""
    out = dict(PRESETS.get(style, {}))
    if style == "messaging" and mode == "runner":
        out["cancel"] = RUNNER_MESSAGING_CANCEL
    return out


def parse_template(kind: Kind, text: str) -> RoutePattern:
    """``"METHOD /path"`` with exactly one method; one ``{param}`` for status/cancel, none for the others."""
    pattern = RoutePattern.parse(text)
    if pattern.methods is None or len(pattern.methods) != 1:
        raise ValueError('name exactly one method, e.g. "GET /agent/job/{id}"')
    if "*" in text:
        raise ValueError("wildcards are not allowed in a job API template")
    want = 1 if kind in (Kind.STATUS, Kind.CANCEL) else 0
    if len(pattern.params) != want:
        raise ValueError("must contain exactly one {id} segment" if want else "must not contain a {param} segment")
    return pattern


def example_path(pattern: RoutePattern) -> str:
    """A concrete path the template matches (``{id}`` -> ``x``): to check it against the priced routes."""
    path = pattern.text.split(" ", 1)[1].strip()
    for name in pattern.params:
        path = path.replace("{" + name + "}", "x")
    return path


@dataclass(frozen=True, slots=True)
class Match:
    kind: Kind
    job_id: str | None  # status/cancel: the decoded {id} segment ("" when missing)
    path: str  # the normalised path that matched


@dataclass(frozen=True, slots=True)
class JobRoutes:
    submit: RoutePattern
    status: RoutePattern
    cancel: RoutePattern | None = None
    listing: RoutePattern | None = None
    health: RoutePattern | None = None

    _order: tuple[tuple[Kind, RoutePattern], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        order = (  # health before status: /jobs/health fits /jobs/{id}
            (Kind.HEALTH, self.health),
            (Kind.SUBMIT, self.submit),
            (Kind.LIST, self.listing),
            (Kind.CANCEL, self.cancel),
            (Kind.STATUS, self.status),
        )
        object.__setattr__(self, "_order", tuple((k, p) for k, p in order if p is not None))

    def _ordered(self) -> tuple[tuple[Kind, RoutePattern], ...]:
        return self._order

    def match(self, method: str, raw_path: str) -> Match | None:
        path = normalise_path(raw_path)
        for kind, pattern in self._ordered():
            params = pattern.match(method, path)
            if params is not None:
                job_id = next(iter(params.values())) if params else None
                return Match(kind, job_id, path)
        for kind, with_id in ((Kind.STATUS, self.status), (Kind.CANCEL, self.cancel)):
            if with_id is not None and _missing_id(with_id, method, path):
                return Match(kind, "", path)
        return None

    def shadowed(self, raw_path: str) -> bool:
        """Does a path that matched no template still fall in the job API: another letter case of a call
        (``/AGENT/JOB/x``: Express routes ignore case), or anything under a job's own path (``/agent/job/x/raw``,
        another method on ``/agent/job/x``)? Such requests are refused, never forwarded: forwarded, they would
        reach the upstream with its API key and without the payer check (or, for the submit, without a price)."""
        path = normalise_path(raw_path).lower().rstrip("/")
        for _, pattern in self._ordered():
            template = pattern.text.split(" ", 1)[1].strip().lower()
            if pattern.params:
                if path.startswith(template.split("{", 1)[0]):
                    return True
            elif path == template.rstrip("/"):
                return True
        return False

    def path_of(self, kind: Kind, job_id: str) -> str:
        """The path of ``kind`` for ``job_id`` (``job_id`` percent-encoded as one segment)."""
        pattern = {Kind.STATUS: self.status, Kind.CANCEL: self.cancel}[kind]
        assert pattern is not None
        path = pattern.text.split(" ", 1)[1].strip()
        return path.replace("{" + pattern.params[0] + "}", quote(job_id, safe=""))


def _missing_id(pattern: RoutePattern, method: str, path: str) -> bool:
    """``GET /agent/job/`` (the id segment left empty): seed 002's 400 ``Job ID required``."""
    template = pattern.text.split(" ", 1)[1].strip()
    placeholder = "{" + pattern.params[0] + "}"
    empty = normalise_path(template.replace(placeholder, "")).rstrip("/")
    methods = pattern.methods or frozenset()
    return method in methods and path.rstrip("/") == empty and template.endswith(placeholder)
