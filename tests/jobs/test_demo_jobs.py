"""``x402-gateway demo --jobs`` as a newcomer runs it: on embedded defaults it shows a paid submit, the job's
progress live to completion, free polls by the payer (token, then wallet signature), a stranger refused, and
exits 0 only when all of it held and the payer paid exactly once."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import gateway.dev.demo as demo
from gateway.cli import build_parser
from gateway.dev.upstream import RUN_STEPS

ROOT = Path(__file__).resolve().parents[2]


def test_the_jobs_demo_command_runs_end_to_end_and_exits_0() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--jobs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert out.rstrip().endswith("OK: one job paid once, followed live for free by its payer, refused to a stranger.")
    assert re.search(r"-> HTTP 202 job job_[0-9a-f]+, settled in tx 0x[0-9a-f]{64} \(block \d+\)", out)
    # each progress message appears once, live, before the completion
    lines = out.splitlines()
    shown = [line.split("update", 1)[1].strip() for line in lines if re.match(r"^\s+[\d.]+ s  update ", line)]
    assert shown == list(RUN_STEPS)
    assert any(re.match(r"^\s+[\d.]+ s  status   completed$", line) for line in lines)
    assert "GET /agent/jobs -> HTTP 200, 1 job(s)" in out
    assert out.count("-> HTTP 404 Job not found") == 2 and "its own list      -> HTTP 200, 0 job(s)" in out
    assert "payer 5.00 -> 4.90 USDC for one job and" in out and "pay-to 0.00 -> 0.10 USDC" in out


def test_demo_takes_jobs_as_a_flag() -> None:
    assert build_parser().parse_args(["demo", "--jobs"]).jobs is True
    assert build_parser().parse_args(["demo"]).jobs is False


def test_the_jobs_demo_reports_failure_when_the_agent_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo's verdict is computed, not printed: with an agent whose jobs fail it must say so and exit 1.
    original = demo.jobs_demo_config

    def failing(*args: Any) -> dict[str, Any]:
        config = original(*args)
        config["jobs"]["runner_upstream_path"] = "/fail"
        return config

    monkeypatch.setattr(demo, "jobs_demo_config", failing)
    out = io.StringIO()
    assert demo.run_jobs_demo(out, step_delay=0.05) == 1, out.getvalue()
    assert "FAILED: the job completed; every progress message was seen once, in order" in out.getvalue()
    assert "error    upstream answered 500: the demo upstream fails on purpose" in out.getvalue()
