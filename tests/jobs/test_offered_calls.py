"""Which job calls each setup offers, and that a missing one is said, not a bare 404: ``check`` warns about it,
the gateway names it (``job_call_not_offered``), and the SDK and CLI say what is missing (docs/jobs.md, "Which
calls exist")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.client import ApiError, AsyncX402Client
from gateway.config.jobs import jobs_warnings
from gateway.dev.chain import DevChain
from tests.jobs.helpers import bearer, jobs_gateway, pay
from tests.jobs.test_contract_units import config
from tests.support.gateway import sqlite_url
from tests.support.jobs_upstreams import FakeJobsApi

MESSAGING_ROUTES = [{"route": "POST /api/messaging/jobs", "price": "0.02"}]


@pytest.mark.parametrize(
    ("jobs", "routes", "said"),
    [
        ({"mode": "front", "style": "agent"}, None, ["no list call", "the seeds' agent API has no list call"]),
        (
            {"mode": "runner", "style": "agent", "runner_upstream_path": "/run"},
            None,
            ["no list call", 'add list = "GET /agent/jobs"'],
        ),
        ({"mode": "front", "style": "messaging"}, MESSAGING_ROUTES, ["no cancel call", "messaging API has none"]),
        ({"mode": "runner", "style": "messaging", "runner_upstream_path": "/run"}, MESSAGING_ROUTES, []),
        ({"mode": "front", "style": "agent", "list": "GET /agent/jobs"}, None, []),
        (
            {"mode": "front", "style": "agent", "list": "GET /agent/jobs"},
            [{"route": "POST /agent/prompt", "price": "0.10", "settlement": "before"}],
            ['settles "before"', "the upstream refuses (4xx/5xx) has been paid", "stays usable for a retry"],
        ),
        (
            {"mode": "runner", "style": "messaging", "runner_upstream_path": "/run"},
            [{"route": "POST /api/messaging/jobs", "price": "0.02", "settlement": "before"}],
            ["the runner refuses (400, 503) has been paid"],
        ),
    ],
)
def test_check_warns_about_each_call_a_jobs_setup_does_not_offer_and_what_before_costs(
    jobs: dict[str, Any], routes: list[dict[str, Any]] | None, said: list[str]
) -> None:
    cfg = config(jobs, routes)
    warnings = " | ".join(jobs_warnings(cfg.jobs, cfg.routes))
    for words in said:
        assert words in warnings, warnings
    if not said:
        assert warnings == ""


async def test_a_fronted_messaging_api_has_no_cancel_and_the_sdk_says_so(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("messaging", complete_after=60)
    with jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=api, mode="front", style="messaging") as gw:
        with gw.client() as c:
            r = pay(gw, c, payer, "POST", "/api/messaging/jobs", json={"userId": "u", "content": "x"})
            assert r.status_code == 201, r.text
            job_id = r.json()["jobId"]
            raw = c.post(f"/api/messaging/jobs/{job_id}/cancel", headers=bearer(r))
            assert raw.status_code == 404
            assert raw.json()["reason"] == "job_call_not_offered"
        async with AsyncX402Client(gw.url, account=payer, style="messaging") as client:
            with pytest.raises(ApiError) as caught:
                await client.cancel_job(job_id, token=r.headers["x-job-token"])
            assert (caught.value.status, caught.value.reason) == (404, "not_supported")
            assert "fronted style messaging API has none" in caught.value.message
            assert (await client.get_job_status(job_id, token=r.headers["x-job-token"])).status == "processing"
        assert not [call for call in api.calls if call.path.endswith("/cancel")]  # never reached the upstream


async def test_a_fronted_agent_api_has_no_list_and_the_sdk_says_what_to_configure(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with jobs_gateway(
        base_chain, store_url=sqlite_url(tmp_path), upstream=FakeJobsApi("agent"), mode="front", style="agent"
    ) as gw:
        async with AsyncX402Client(gw.url, account=payer) as client:
            with pytest.raises(ApiError) as caught:
                await client.list_jobs()
    # The path went on to the upstream, which has no such call (and, without the key, says 401): not a refusal
    # of the caller's proof, which the gateway would have named (payer_auth_*).
    assert caught.value.reason == "not_supported" and caught.value.status in (401, 404)
    assert 'list = "GET /agent/jobs"' in caught.value.message


@pytest.mark.parametrize("mode", ["front", "runner"])
@pytest.mark.parametrize("path", ["/agent/prompt", "/agent/job/job_1"])
def test_a_browsers_preflight_of_a_job_call_goes_on_like_any_preflight(
    base_chain: DevChain, tmp_path: Path, mode: str, path: str
) -> None:
    """A CORS preflight (OPTIONS + Origin + Access-Control-Request-Method) of a job call is no job call: it goes
    to the upstream like any preflight (on the priced submit unpriced and bodiless, docs/threat-model.md T38),
    never refused as a call the jobs API does not offer (404 job_call_not_offered)."""
    api = FakeJobsApi("agent")
    with (
        jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=api, mode=mode, style="agent") as gw,
        gw.client() as c,
    ):
        method = "POST" if path == "/agent/prompt" else "GET"
        r = c.options(path, headers={"Origin": "https://app.example", "Access-Control-Request-Method": method})
    assert "job_call_not_offered" not in r.text and "payment-required" not in r.headers
    if method == "POST":  # the priced submit: its answer never carries a body
        assert r.content == b""
    assert [(call.method, call.path) for call in api.calls] == [("OPTIONS", path)]
