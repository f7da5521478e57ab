"""Jobs: billing that follows the job, payer-bound job access, and the built-in job runner.

Two modes (``[jobs].mode``), both in either API style of the seeds (``"agent"`` = style A, ``"messaging"`` =
style B; ``"custom"`` templates for a fronted API)::

    front    the upstream is a jobs API: submit is paid, status/cancel/list are free for the payer only
             (gateway.jobs.front)
    runner   the upstream answers synchronously (slowly): the gateway serves the job API itself and runs the
             upstream call in the background (gateway.jobs.serve, gateway.jobs.runner)

Modules: ``model`` (the record), ``wire`` (both styles' JSON), ``auth`` (how the payer proves it), ``api``
(presets, matching), ``stream`` (parsing the runner upstream's answers; the contract is in docs/jobs.md),
``layer`` (shared ASGI plumbing). The job stores live in :mod:`gateway.storage.jobs`, ``[jobs]`` in
:mod:`gateway.config.jobs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.config.jobs import JobsConfig
from gateway.jobs.model import Job, JobStatus

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.http.asgi import ASGIApp
    from gateway.jobs.layer import JobsLayer

__all__ = ["Job", "JobStatus", "JobsConfig", "build_jobs"]


def build_jobs(config: GatewayConfig, proxy: ASGIApp) -> JobsLayer | None:
    """The jobs layer for ``config`` (None without ``[jobs]``): wire ``outer`` before the payment middleware and
    ``inner`` after it (see :mod:`gateway.jobs.layer`)."""
    jobs = config.jobs
    if jobs is None:
        return None
    # Here, not at module level: the job stores build on gateway.jobs.model, so a module-level import would be a circle.
    from gateway.storage.jobs import open_job_store

    store = open_job_store(config.store.url.reveal())
    if jobs.mode == "front":
        from gateway.jobs.front import FrontJobs

        return FrontJobs(jobs, store, proxy)
    from gateway.jobs.runner import JobRunner
    from gateway.jobs.serve import RunnerJobs

    up = config.upstream
    runner = JobRunner(
        store,
        jobs,
        url=up.url.rstrip("/") + jobs.runner_upstream_path,
        inject_headers={name: value.reveal() for name, value in up.headers},
        connect_timeout=up.connect_timeout,
        max_connections=up.max_connections,
    )
    return RunnerJobs(jobs, store, runner, body_timeout=config.server.body_read_timeout)
