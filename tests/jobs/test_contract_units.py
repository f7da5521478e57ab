"""Sans-IO pieces of the jobs feature: the runner's stream contract, the wire styles, route matching, [jobs]."""

from __future__ import annotations

import os
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.jobs.api import Kind
from gateway.jobs.front import find_job_id
from gateway.jobs.model import RUNNER_LOST, Job, JobStatus, overdue
from gateway.jobs.stream import (
    Failure,
    LineSplitter,
    Progress,
    Result,
    SSEParser,
    body_answer,
    framing,
    http_failure,
    ndjson_events,
    sse_events,
)
from gateway.jobs.wire import agent_details, messaging_details, shown_status, statuses_shown_as

T0 = 1_705_314_600_000  # 2024-01-15T10:30:00Z


def test_ndjson_lines_split_across_chunks_become_progress_then_the_result() -> None:
    splitter = LineSplitter()
    stream = b'{"status": "Checking balance..."}\r\n{"sta' + b'tus": "Finding route"}\n\nnot json\n{"x": 1}\n'
    events = []
    for i in range(0, len(stream), 7):
        events += ndjson_events(splitter.feed(stream[i : i + 7]))
    events += ndjson_events(splitter.feed(b'{"response": "done", "richData": [{"type": "chart"}]}'))
    events += ndjson_events(splitter.flush())
    assert events == [
        Progress("Checking balance..."),
        Progress("Finding route"),
        Result("done", rich_data=[{"type": "chart"}]),
    ]


def test_a_line_longer_than_the_cap_is_refused() -> None:
    splitter = LineSplitter(max_line=10)
    with pytest.raises(ValueError, match="exceeds"):
        splitter.feed(b"x" * 11)


def test_sse_data_lines_are_joined_per_event_and_comments_and_done_markers_ignored() -> None:
    parser = SSEParser()
    payloads = parser.feed(b': keep-alive\nevent: progress\ndata: {"status":\ndata: "step 1"}\n\ndata: [DONE]\n\n')
    payloads += parser.feed(b'data: {"error": "boom"}')
    payloads += parser.flush()
    assert payloads == ['{"status":\n"step 1"}', "[DONE]", '{"error": "boom"}']
    assert sse_events(payloads) == [Progress("step 1"), Failure("boom")]


def test_a_whole_body_answer_is_a_result_a_failure_or_the_text_itself() -> None:
    assert body_answer(b'{"response": "hi", "transactions": [{"hash": "0x1"}]}') == Result(
        "hi", transactions=[{"hash": "0x1"}]
    )
    assert body_answer(b'{"error": "no funds"}') == Failure("no funds")
    assert body_answer(b'{"answer": 42}') == Result('{"answer": 42}')
    assert body_answer(b'"plain string"') == Result("plain string")
    assert body_answer(b"just text") == Result("just text")
    assert http_failure(503, b'{"message": "overloaded"}') == Failure("upstream answered 503: overloaded")
    assert http_failure(500, b"<html>") == Failure("upstream answered 500")
    assert (framing("application/x-ndjson; charset=utf-8"), framing("text/event-stream"), framing(None)) == (
        "ndjson",
        "sse",
        "body",
    )


def job(**kw: Any) -> Job:
    base: dict[str, Any] = {"job_id": "j", "payer": "0x" + "a" * 40, "status": JobStatus.PENDING, "created_at": T0}
    return Job(**{**base, **kw})


def test_each_style_shows_only_statuses_its_clients_stop_polling_on() -> None:
    timed_out = job(status=JobStatus.TIMEOUT, error="Job timed out after 1000 ms", completed_at=T0 + 1000)
    cancelled = job(status=JobStatus.CANCELLED, cancelled_at=T0 + 500)
    assert shown_status("agent", timed_out) == "failed"
    assert agent_details(timed_out)["error"] == "Job timed out after 1000 ms"
    assert shown_status("messaging", timed_out) == "timeout"
    assert shown_status("messaging", cancelled) == "failed"
    assert messaging_details(cancelled)["error"] == "Job cancelled"
    assert agent_details(cancelled)["cancelledAt"] == "2024-01-15T10:30:00.500Z"
    assert statuses_shown_as("agent", "failed") == {JobStatus.FAILED, JobStatus.TIMEOUT}
    assert statuses_shown_as("messaging", "failed") == {JobStatus.FAILED, JobStatus.CANCELLED}
    assert statuses_shown_as("agent", "timeout") == frozenset()
    assert statuses_shown_as("messaging", "bogus") == frozenset()


def test_style_a_renders_seed_002s_completed_example_field_for_field() -> None:
    done = job(
        job_id="abc123",
        thread_id="thr_XYZ789",
        status=JobStatus.COMPLETED,
        prompt="what is the price of ETH?",
        completed_at=T0 + 3000,
        response="ETH is currently trading at $3,245.67",
        rich_data=[],
    )
    assert agent_details(done) == {
        "success": True,
        "jobId": "abc123",
        "threadId": "thr_XYZ789",
        "status": "completed",
        "prompt": "what is the price of ETH?",
        "createdAt": "2024-01-15T10:30:00.000Z",
        "completedAt": "2024-01-15T10:30:03.000Z",
        "processingTime": 3000,
        "response": "ETH is currently trading at $3,245.67",
        "richData": [],
        "cancellable": False,
    }


def test_a_live_job_whose_runner_lease_lapsed_is_lost_and_one_past_its_deadline_times_out() -> None:
    live = job(status=JobStatus.PROCESSING, runner_lease_until=T0 + 10_000, expires_at=T0 + 5_000, timeout_ms=5_000)
    assert overdue(live, T0 + 6_000, grace_ms=2_000) is None  # within the grace the runner decides
    assert overdue(live, T0 + 7_001, grace_ms=2_000) == (JobStatus.TIMEOUT, "Job timed out after 5000 ms")
    assert overdue(live, T0 + 10_001, grace_ms=2_000) == (JobStatus.FAILED, RUNNER_LOST)
    assert overdue(job(status=JobStatus.PENDING, purge_at=T0), T0 + 10**9, grace_ms=0) is None  # front binding


def test_job_ids_are_read_from_the_configured_path_and_must_be_sane() -> None:
    assert find_job_id({"jobId": "job_1"}, ("jobId",)) == "job_1"
    assert find_job_id({"data": {"jobs": [{"id": 7}]}}, ("data", "jobs", "0", "id")) == "7"
    for bad in ({"jobId": ""}, {"jobId": True}, {"jobId": "x" * 201}, {"jobId": "a\nb"}, {"other": 1}, []):
        assert find_job_id(bad, ("jobId",)) is None


def config(jobs: dict[str, Any], routes: list[dict[str, Any]] | None = None) -> Any:
    doc = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "payment": {"pay_to": "0x" + "1" * 40},
        "networks": {"base": {"rpc_urls": ["http://127.0.0.1:8545"]}},
        "routes": routes if routes is not None else [{"route": "POST /agent/prompt", "price": "0.10"}],
        "jobs": jobs,
    }
    return parse_config(doc, env={**os.environ, "X402_RELAYER_KEY": "11" * 32})


def test_jobs_config_presets_and_their_routes() -> None:
    cfg = config({"mode": "front", "style": "agent"}).jobs
    assert cfg.routes.match("GET", "/agent/job/abc").kind == Kind.STATUS
    assert cfg.routes.match("POST", "/agent/job/abc/cancel").kind == Kind.CANCEL
    assert cfg.routes.match("GET", "/agent/job/x/../abc").job_id == "abc"
    runner = config(
        {"mode": "runner", "style": "messaging", "runner_upstream_path": "/run"},
        [{"route": "POST /api/messaging/jobs", "price": "0.02"}],
    ).jobs
    assert runner.wire == "messaging"
    assert runner.routes.match("GET", "/api/messaging/jobs/health").kind == Kind.HEALTH  # not a job called "health"
    assert runner.routes.match("POST", "/api/messaging/jobs/abc/cancel").kind == Kind.CANCEL
    assert runner.routes.match("GET", "/api/messaging/jobs").kind == Kind.LIST
    no_jobs = dict(upstream={"url": "http://127.0.0.1:9"}, payment={"pay_to": "0x" + "1" * 40})
    no_jobs["networks"] = {"base": {"rpc_urls": ["http://127.0.0.1:8545"]}}
    assert parse_config(no_jobs, env={**os.environ, "X402_RELAYER_KEY": "11" * 32}).jobs is None


@pytest.mark.parametrize(
    ("jobs", "routes", "key"),
    [
        ({"mode": "front", "style": "agent"}, [{"route": "POST /other", "price": "0.10"}], "jobs.submit"),
        ({"mode": "front", "style": "agent"}, [{"route": "* /agent/**", "price": "0.10"}], "jobs.status"),
        ({"mode": "runner", "style": "agent"}, None, "jobs.runner_upstream_path"),
        ({"mode": "runner", "style": "custom"}, None, "jobs.style"),
        ({"mode": "front", "style": "custom", "submit": "POST /agent/prompt"}, None, "jobs.status"),
        ({"mode": "front", "style": "agent", "status": "GET /agent/job"}, None, "jobs.status"),
        ({"mode": "front", "style": "agent", "token_header": "Authorization"}, None, "jobs.token_header"),
        ({"mode": "front", "style": "agent", "bogus": 1}, None, "jobs.bogus"),
        ({"mode": "batch", "style": "agent"}, None, "jobs.mode"),
    ],
)
def test_a_bad_jobs_section_fails_at_start_naming_the_key(
    jobs: dict[str, Any], routes: list[dict[str, Any]] | None, key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config(jobs, routes)
    assert info.value.key == key, info.value.message


def test_the_example_config_documents_every_jobs_key_and_its_jobs_block_is_valid() -> None:
    import dataclasses
    import re
    import tomllib
    from pathlib import Path

    from gateway.config.jobs import JobsConfig

    text = (Path(__file__).parents[2] / "gateway.example.toml").read_text()
    block = text[text.index("# [jobs]") :]
    documented = set(re.findall(r"^# ([a-z_]+) = ", block, re.M))
    keys = {f.name for f in dataclasses.fields(JobsConfig)} - {"routes", "wire"}
    assert keys | {"submit", "status", "cancel", "list", "health"} <= documented
    uncommented = "\n".join(line[2:] for line in block.splitlines() if re.match(r"^# (\[jobs\]|[a-z_]+ = )", line))
    jobs = tomllib.loads(uncommented)["jobs"]
    assert config(jobs).jobs.runner_upstream_path == "/run"
