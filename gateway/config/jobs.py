"""``[jobs]``: the job API the gateway fronts or serves, validated into a frozen :class:`JobsConfig`.

Parsed once the routes are known, because the submit call must be a priced route and the free calls must not be.
Every key and its default is documented in ``gateway.example.toml``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gateway.config.routes import RouteConfig
from gateway.config.table import Defaults, Table
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.jobs.api import JobRoutes, Kind

__all__ = ["JobsConfig", "jobs_warnings", "parse_jobs"]

_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_RESERVED_HEADERS = frozenset({"authorization", "x-payer-auth", "content-type", "content-length", "host"})


@dataclass(frozen=True, slots=True)
class JobsConfig:
    mode: Literal["front", "runner"]
    style: Literal["agent", "messaging", "custom"]
    routes: JobRoutes
    wire: Literal["agent", "messaging"] = "agent"  # the runner's answers: style A or B
    job_id_path: tuple[str, ...] = ("jobId",)
    token_header: str = "X-Job-Token"  # noqa: S105 - a header name, not a secret
    max_jobs: int = 10_000
    retention_seconds: float = 3600.0
    auth_max_skew_seconds: int = 300
    sweep_interval_seconds: float = 10.0
    max_submit_response_bytes: int = 64 * 1024
    runner_upstream_path: str = ""
    default_timeout_ms: int = 30_000
    max_timeout_ms: int = 300_000
    runner_lease_seconds: float = 15.0
    shutdown_grace_seconds: float = 10.0
    max_result_bytes: int = 1024 * 1024
    max_status_updates: int = 100


_DEFAULT = Defaults(JobsConfig)


def parse_jobs(t: Table, priced: Sequence[RouteConfig]) -> JobsConfig:
    mode = t.require("mode", str)
    if mode not in ("front", "runner"):
        raise ConfigError(t.key("mode"), 'must be "front" or "runner"')
    style = t.require("style", str)
    if style not in ("agent", "messaging", "custom"):
        raise ConfigError(t.key("style"), 'must be "agent", "messaging" or "custom"')
    if mode == "runner" and style == "custom":
        raise ConfigError(t.key("style"), 'the runner serves style "agent" or "messaging" (templates may be changed)')
    routes = _routes(t, mode, style)
    _check_pricing(t, routes, priced)
    raw_path = t.get("job_id_path", str, ".".join(_DEFAULT.job_id_path))
    path = tuple(raw_path.split("."))
    if not all(path):
        raise ConfigError(t.key("job_id_path"), 'must be a dotted path such as "jobId" or "data.job.id"')
    token_header = t.get("token_header", str, _DEFAULT.token_header)
    if not _HEADER_NAME.match(token_header) or token_header.lower() in _RESERVED_HEADERS:
        raise ConfigError(t.key("token_header"), "must be a plain header name (letters, digits, '-')")
    runner_path = t.get("runner_upstream_path", str, _DEFAULT.runner_upstream_path)
    if mode == "runner" and not runner_path.startswith("/"):
        raise ConfigError(t.key("runner_upstream_path"), 'is required in runner mode: the upstream path, e.g. "/run"')
    max_timeout_ms = t.integer("max_timeout_ms", _DEFAULT.max_timeout_ms, minimum=1_000)
    default_timeout_ms = t.integer("default_timeout_ms", _DEFAULT.default_timeout_ms, minimum=1_000)
    if default_timeout_ms > max_timeout_ms:
        raise ConfigError(t.key("default_timeout_ms"), "must not exceed max_timeout_ms")
    cfg = JobsConfig(
        mode=mode,
        style=style,
        routes=routes,
        wire="messaging" if style == "messaging" else "agent",
        job_id_path=path,
        token_header=token_header,
        max_jobs=t.integer("max_jobs", _DEFAULT.max_jobs, minimum=1),
        retention_seconds=t.number("retention_seconds", _DEFAULT.retention_seconds, minimum=1.0),
        auth_max_skew_seconds=t.integer("auth_max_skew_seconds", _DEFAULT.auth_max_skew_seconds, minimum=1),
        sweep_interval_seconds=t.number("sweep_interval_seconds", _DEFAULT.sweep_interval_seconds, minimum=0.05),
        max_submit_response_bytes=t.integer(
            "max_submit_response_bytes", _DEFAULT.max_submit_response_bytes, minimum=256
        ),
        runner_upstream_path=runner_path,
        default_timeout_ms=default_timeout_ms,
        max_timeout_ms=max_timeout_ms,
        runner_lease_seconds=t.number("runner_lease_seconds", _DEFAULT.runner_lease_seconds, minimum=0.3),
        shutdown_grace_seconds=t.number("shutdown_grace_seconds", _DEFAULT.shutdown_grace_seconds, minimum=0.0),
        max_result_bytes=t.integer("max_result_bytes", _DEFAULT.max_result_bytes, minimum=1024),
        max_status_updates=t.integer("max_status_updates", _DEFAULT.max_status_updates, minimum=0),
    )
    t.done()
    return cfg


# gateway.jobs imports JobsConfig from here, and importing gateway.jobs.api first runs gateway/jobs/__init__.py:
# the job API vocabulary is imported when a [jobs] section is parsed, not when gateway.config is, so that neither
# package needs the other half-initialised.


def _template(t: Table, kind: Kind, defaults: dict[str, str], *, required: bool) -> str:
    name = kind.value
    text: str = t.get(name, str, defaults.get(name, ""))
    if required and not text:
        raise ConfigError(t.key(name), 'is required with style = "custom"')
    return text


def _routes(t: Table, mode: str, style: str) -> JobRoutes:
    from gateway.jobs.api import JobRoutes, Kind, parse_template, preset

    defaults = preset(style, mode)
    parsed = {}
    for kind in Kind:
        text = _template(t, kind, defaults, required=kind in (Kind.SUBMIT, Kind.STATUS))
        if not text:
            continue
        try:
            parsed[kind] = parse_template(kind, text)
        except ValueError as exc:
            raise ConfigError(t.key(kind.value), str(exc)) from None
    return JobRoutes(
        submit=parsed[Kind.SUBMIT],
        status=parsed[Kind.STATUS],
        cancel=parsed.get(Kind.CANCEL),
        listing=parsed.get(Kind.LIST),
        health=parsed.get(Kind.HEALTH),
    )


def _check_pricing(t: Table, routes: JobRoutes, priced: Sequence[RouteConfig]) -> None:
    """The submit must be priced (else jobs run unpaid); the free calls must not be (they are answered before
    the payment middleware, so a price on them would be silently ignored)."""
    from gateway.jobs.api import Kind, example_path

    for kind, pattern in (
        (Kind.SUBMIT, routes.submit),
        (Kind.STATUS, routes.status),
        (Kind.CANCEL, routes.cancel),
        (Kind.LIST, routes.listing),
        (Kind.HEALTH, routes.health),
    ):
        if pattern is None:
            continue
        method = next(iter(pattern.methods or {"GET"}))
        path = example_path(pattern)
        hit = next((r for r in priced if r.pattern.match(method, path) is not None), None)
        if kind == Kind.SUBMIT and hit is None:
            raise ConfigError(t.key("submit"), f"{pattern.text!r} must be a priced route: add it to [[routes]]")
        if kind != Kind.SUBMIT and hit is not None:
            raise ConfigError(
                t.key(kind.value),
                f"{pattern.text!r} is matched by the priced route {hit.route!r}: status, cancel, list and health"
                " are free (only the payer's own jobs are shown)",
            )


def jobs_warnings(jobs: JobsConfig, priced: Sequence[RouteConfig]) -> list[str]:
    """What a valid ``[jobs]`` section does not offer, or charges for, that its users may expect (``x402-gateway
    check`` prints these): the calls the client commands would get a 404 for, and what ``settlement = "before"``
    on the submit means for a refused submit."""
    from gateway.jobs.api import example_path

    out: list[str] = []
    if jobs.routes.listing is None:
        if jobs.mode == "runner":
            how = f'add list = "GET {_list_path(jobs)}" and the gateway serves it from its job store'
        else:
            how = (
                'the seeds\' agent API has no list call; name one (list = "GET /path") only if the upstream has it'
                if jobs.style == "agent"
                else 'name the upstream\'s list call (list = "GET /path") if it has one'
            )
        out.append(f"[jobs] offers no list call: `x402-gateway jobs` and the SDK's list_jobs() get a 404 here; {how}")
    if jobs.routes.cancel is None:
        why = " (the seeds' messaging API has none; runner mode adds one)" if jobs.style == "messaging" else ""
        out.append(f"[jobs] offers no cancel call{why}: `x402-gateway cancel` and cancel_job() get a 404 here")
    submit = jobs.routes.submit
    method = next(iter(submit.methods or {"POST"}))
    route = next((r for r in priced if r.pattern.match(method, example_path(submit)) is not None), None)
    if route is not None and route.settlement == "before":
        refused = "the upstream refuses (4xx/5xx)" if jobs.mode == "front" else "the runner refuses (400, 503)"
        out.append(
            f'the job submit route {route.route!r} settles "before": a submit {refused} has been paid (the same '
            'payment stays usable for a retry until a submit succeeds with it); with "after" (the default) a '
            "refused submit costs nothing"
        )
    return out


def _list_path(jobs: JobsConfig) -> str:
    return "/agent/jobs" if jobs.wire == "agent" else "/api/messaging/jobs"
