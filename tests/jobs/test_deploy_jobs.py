"""deploy/'s jobs profile (compose.jobs.yaml + gateway.jobs.compose.toml), checked as tests/ops/test_deploy.py
checks the rest of deploy/ (no Docker engine here): it lints, its config loads with nothing `check` would warn
about, it runs the job runner against a call the demo upstream really serves, and its container is hardened like
the main gateway's."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from starlette.routing import Route

from gateway.config import GatewayConfig, parse_config
from gateway.config.jobs import jobs_warnings
from gateway.dev.upstream import create_app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ENV = {"X402_RELAYER_KEY": "0x" + "ab" * 32, "UPSTREAM_API_KEY": "k"}


def jobs_config() -> GatewayConfig:
    return parse_config(tomllib.loads((DEPLOY / "gateway.jobs.compose.toml").read_text()), env=ENV, base_dir=ROOT)


def merged_services() -> dict[str, Any]:
    """What ``docker compose -f compose.yaml -f compose.jobs.yaml`` sees: the override's services added."""
    base = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    extra = yaml.safe_load((DEPLOY / "compose.jobs.yaml").read_text())["services"]
    assert not set(base) & set(extra), "the jobs profile must add services, not change the main ones"
    return {**base, **extra}


def test_the_jobs_profile_passes_yamllint() -> None:
    lint = [sys.executable, "-m", "yamllint", "-c", str(DEPLOY / ".yamllint.yaml"), "-f", "parsable"]
    result = subprocess.run(
        [*lint, str(DEPLOY / "compose.jobs.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_jobs_config_loads_as_a_runner_that_offers_every_call_check_would_ask_for() -> None:
    config = jobs_config()
    jobs = config.jobs
    assert jobs is not None and (jobs.mode, jobs.style) == ("runner", "agent")
    assert jobs.routes.listing is not None and jobs.routes.cancel is not None  # `x402-gateway jobs` and `cancel`
    assert jobs_warnings(jobs, config.routes) == []
    (submit,) = config.routes
    assert submit.settlement == "after"  # a refused submit costs nothing
    assert config.store.url.reveal().startswith("redis://")  # every instance answers every poll
    assert config.server.listen_host == "0.0.0.0"


def test_the_runner_calls_a_path_the_demo_upstream_serves_streaming_ndjson() -> None:
    config = jobs_config()
    assert config.jobs is not None
    routes = {r.path: r.methods for r in create_app().routes if isinstance(r, Route)}
    assert "POST" in (routes.get(config.jobs.runner_upstream_path) or set())


def test_the_jobs_gateway_is_wired_and_hardened_like_the_main_one() -> None:
    services = merged_services()
    main, jobs = services["gateway"], services["gateway-jobs"]
    config = jobs_config()
    assert "./gateway.jobs.compose.toml:/etc/x402/gateway.toml:ro" in jobs["volumes"]
    host_ports = {p.split(":")[0] for s in services.values() for p in s.get("ports", [])}
    assert len(host_ports) == sum(len(s.get("ports", [])) for s in services.values())  # no host port twice
    (published,) = jobs["ports"]
    host, container = published.split(":")
    assert int(container) == config.server.listen_port
    assert config.server.public_url is not None and urlsplit(config.server.public_url).port == int(host)
    for key in ("build", "image", "env_file", "read_only", "tmpfs", "security_opt", "cap_drop", "restart"):
        assert jobs[key] == main[key], key
    assert jobs["depends_on"]["redis"]["condition"] == "service_healthy"
    assert urlsplit(config.store.url.reveal()).hostname in services
    assert urlsplit(config.rate_limits.storage_url.reveal()).hostname in services
    assert urlsplit(config.upstream.url).hostname in services
    assert urlsplit(config.upstream.url).port == 9000
    # Stopping waits for running jobs (shutdown_grace_seconds) well within compose's grace period.
    assert config.jobs is not None
    assert config.jobs.shutdown_grace_seconds < int(jobs["stop_grace_period"].rstrip("s"))
