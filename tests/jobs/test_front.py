"""Fronting an existing jobs API (both styles) through a paid gateway on anvil: billing follows the job, and
only the wallet that paid can see or cancel it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.dev.chain import DevChain
from tests.e2e.helpers import Balances, receipt_of
from tests.jobs.helpers import PRICE, bearer, jobs_gateway, pay, signed
from tests.ops.support import samples, value
from tests.support.gateway import sqlite_url
from tests.support.jobs_upstreams import API_KEY, FakeJobsApi

PROOF_HEADERS = {"authorization", "x-payer-auth", "x-job-token", "payment-signature", "x-payment"}


def test_style_a_submit_is_charged_once_and_returns_the_upstreams_202_with_a_job_token(
    base_chain: DevChain, store_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("agent")
    with (
        jobs_gateway(base_chain, store_url=store_url, upstream=api, mode="front", style="agent") as gw,
        gw.client() as c,
    ):
        money = Balances(gw, payer.address)
        r = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "price of ETH?"})
        assert r.status_code == 202, r.text
        assert r.json() == {
            "success": True,
            "jobId": "job_1",
            "threadId": "thr_1",
            "status": "pending",
            "message": "Job submitted successfully",
        }
        assert len(r.headers["x-job-token"]) == 43
        assert "x-job-token" in r.headers["access-control-expose-headers"].lower()
        assert receipt_of(r)["success"] is True
        money.assert_charged_once(PRICE)
        # polls and a cancel are free
        for _ in range(3):
            assert c.get("/agent/job/job_1", headers=bearer(r)).status_code == 200
        refused = c.post("/agent/job/job_1/cancel", headers=bearer(r))  # the fake finished it at once
        assert (refused.status_code, refused.json()) == (
            400,
            {"success": False, "error": "Job already completed", "message": "Cannot cancel a completed job"},
        )
        money.assert_charged_once(PRICE)
        assert len(api.jobs) == 1


def test_status_and_cancel_answer_the_payer_by_job_token_or_wallet_signature(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("agent", complete_after=60)
    with (
        jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=api, mode="front", style="agent") as gw,
        gw.client() as c,
    ):
        r = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "swap"})
        by_token = c.get("/agent/job/job_1", headers=bearer(r))
        assert by_token.status_code == 200
        assert by_token.json()["status"] == "processing" and by_token.json()["prompt"] == "swap"
        by_wallet = c.get("/agent/job/job_1", headers=signed(payer, "GET", "/agent/job/job_1"))
        assert by_wallet.status_code == 200 and by_wallet.json()["jobId"] == "job_1"
        cancel = c.post("/agent/job/job_1/cancel", headers=signed(payer, "POST", "/agent/job/job_1/cancel"))
        assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"
        again = c.post("/agent/job/job_1/cancel", headers=bearer(r))
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
        # the upstream got its key on every call and never our proofs
        for call in api.calls:
            assert call.headers["x-api-key"] == API_KEY
            assert not PROOF_HEADERS & set(call.headers), call.headers


def test_another_wallet_a_foreign_token_or_no_proof_gets_the_upstreams_own_404(
    base_chain: DevChain, store_url: str
) -> None:
    payer, other = base_chain.new_payer(1_000_000), base_chain.new_payer(1_000_000)
    api = FakeJobsApi("agent", complete_after=60)
    with (
        jobs_gateway(base_chain, store_url=store_url, upstream=api, mode="front", style="agent") as gw,
        gw.client() as c,
    ):
        mine = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "mine"})
        theirs = pay(gw, c, other, "POST", "/agent/prompt", json={"prompt": "theirs"})
        assert (mine.json()["jobId"], theirs.json()["jobId"]) == ("job_1", "job_2")  # sequential: guessable
        not_found = {"error": "Job not found", "message": "No job found with ID job_1"}
        attempts = [
            c.get("/agent/job/job_1"),
            c.get("/agent/job/job_1", headers=signed(other, "GET", "/agent/job/job_1")),
            c.get("/agent/job/job_1", headers=bearer(theirs)),
            c.get("/agent/job/job_1", headers=signed(payer, "GET", "/agent/job/job_2")),  # signed for another path
            c.get("/agent/job/job_1", headers={"Authorization": "Bearer " + "A" * 43}),
            c.post("/agent/job/job_1/cancel", headers=signed(other, "POST", "/agent/job/job_1/cancel")),
            c.post("/agent/job/job_1/cancel", headers=bearer(theirs)),
        ]
        for r in attempts:
            assert (r.status_code, r.json()) == (404, not_found), r.text
        unknown = c.get("/agent/job/job_9", headers=signed(payer, "GET", "/agent/job/job_9"))
        assert (unknown.status_code, unknown.json()) == (
            404,
            {"error": "Job not found", "message": "No job found with ID job_9"},
        )
        missing = c.get("/agent/job/", headers=bearer(mine))
        assert (missing.status_code, missing.json()) == (
            400,
            {"error": "Job ID required", "message": "Please provide a job ID"},
        )
        assert api.jobs["job_1"]["status"] == "processing"  # nobody cancelled it
        assert c.get("/agent/job/job_1", headers=bearer(mine)).status_code == 200


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"error": "Invalid request", "message": "prompt is required"}),
        (429, {"error": "Rate limit exceeded", "message": "Retry after 60 seconds"}),
        (503, {"error": "Unavailable", "message": "the agent is down"}),
    ],
)
def test_a_submit_the_upstream_refuses_passes_through_and_moves_no_money(
    base_chain: DevChain, tmp_path: Path, status: int, body: dict[str, str]
) -> None:
    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("agent", refuse_submit=(status, body))
    with (
        jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=api, mode="front", style="agent") as gw,
        gw.client() as c,
    ):
        money = Balances(gw, payer.address)
        r = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "x"})
        assert (r.status_code, r.json()) == (status, body)
        assert "x-job-token" not in r.headers
        money.assert_unchanged()


def test_a_2xx_submit_without_a_readable_job_id_is_refused_and_not_charged(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("agent")
    with (
        jobs_gateway(
            base_chain,
            store_url=sqlite_url(tmp_path),
            upstream=api,
            mode="front",
            style="custom",
            submit="POST /agent/prompt",
            status="GET /agent/job/{id}",
            job_id_path="data.id",
        ) as gw,
        gw.client() as c,
    ):
        money = Balances(gw, payer.address)
        r = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "x"})
        assert r.status_code == 502 and r.json()["error"] == "upstream_job_id_missing"
        money.assert_unchanged()


def test_style_b_list_shows_only_the_callers_jobs_with_total_and_filtered_for_that_caller(
    base_chain: DevChain, store_url: str
) -> None:
    alice, bob = base_chain.new_payer(1_000_000), base_chain.new_payer(1_000_000)
    api = FakeJobsApi("messaging", complete_after=60)
    path = "/api/messaging/jobs"
    with (
        jobs_gateway(base_chain, store_url=store_url, upstream=api, mode="front", style="messaging") as gw,
        gw.client() as c,
    ):
        ids = {}
        for who, payer, n in (("alice", alice, 2), ("bob", bob, 1)):
            ids[who] = []
            for i in range(n):
                r = pay(gw, c, payer, "POST", path, json={"userId": who, "content": f"{who} {i}"})
                assert r.status_code == 201, r.text
                assert set(r.json()) == {"jobId", "status", "createdAt", "expiresAt"}
                ids[who].append(r.json()["jobId"])
        listed = c.get(path, headers=signed(alice, "GET", path))
        assert listed.status_code == 200
        doc = listed.json()
        assert [j["jobId"] for j in doc["jobs"]] == ids["alice"][::-1]  # newest first
        assert (doc["total"], doc["filtered"]) == (2, 2)
        one = c.get(path + "?limit=1", headers=signed(alice, "GET", path)).json()
        assert [j["jobId"] for j in one["jobs"]] == [ids["alice"][1]] and (one["total"], one["filtered"]) == (2, 1)
        done = c.get(path + "?status=completed", headers=signed(alice, "GET", path)).json()
        assert (done["jobs"], done["total"], done["filtered"]) == ([], 2, 0)
        bobs = c.get(path, headers=signed(bob, "GET", path)).json()
        assert [j["jobId"] for j in bobs["jobs"]] == ids["bob"]
        anonymous = c.get(path)
        assert anonymous.status_code == 401 and anonymous.json()["error"] == "Authentication required"
        # status of one's own job, and health (the upstream's, free)
        own = c.get(f"{path}/{ids['bob'][0]}", headers=signed(bob, "GET", f"{path}/{ids['bob'][0]}"))
        assert own.status_code == 200 and own.json()["userId"] == "bob"
        assert (
            c.get(f"{path}/{ids['bob'][0]}", headers=signed(alice, "GET", f"{path}/{ids['bob'][0]}")).status_code == 404
        )
        health = c.get(path + "/health")
        assert health.status_code == 200 and health.json()["totalJobs"] == 3


def test_the_upstream_api_key_is_injected_and_never_reaches_the_caller(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("agent")
    with (
        jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=api, mode="front", style="agent") as gw,
        httpx.Client(base_url=gw.url, timeout=30, headers={"X-API-Key": "callers-own-guess"}) as c,
    ):
        seen: list[httpx.Response] = [c.post("/agent/prompt", json={"prompt": "x"})]
        r = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "x"})
        seen += [r, c.get("/agent/job/job_1", headers=bearer(r)), c.get("/agent/job/job_1")]
        for response in seen:
            assert API_KEY not in response.text
            assert all(API_KEY not in v for v in response.headers.values())
        assert {call.headers["x-api-key"] for call in api.calls} == {API_KEY}
        assert API_KEY not in repr(gw.app.proxy) and API_KEY not in repr(gw.config)


def test_job_paths_no_template_matches_exactly_are_refused_never_forwarded_with_the_key(
    base_chain: DevChain, tmp_path: Path
) -> None:
    """Express routes ignore case and upstreams have more endpoints than the templates: a variant forwarded free
    would reach the upstream with its API key, past the payer check (or, for the submit, past the price)."""
    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("agent", complete_after=60)
    with (
        jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=api, mode="front", style="agent") as gw,
        gw.client() as c,
    ):
        pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "mine"})
        before = len(api.calls)
        for method, path in (
            ("GET", "/AGENT/JOB/job_1"),
            ("GET", "/Agent/job/job_1"),
            ("DELETE", "/agent/job/job_1"),
            ("GET", "/agent/job/job_1/raw"),
            ("POST", "/agent/job/job_1/cancel/now"),
        ):
            r = c.request(method, path, json={"prompt": "free?"})
            assert r.status_code == 404, (method, path, r.status_code, r.text)
        # Route matching ignores case (gateway/routes.py), so the submit's case variant is the priced submit itself.
        r = c.post("/Agent/Prompt", json={"prompt": "free?"})
        assert r.status_code == 402, r.text
        assert len(api.calls) == before
        assert len(api.jobs) == 1


def test_free_job_calls_are_answered_even_when_unpriced_requests_are_refused(
    base_chain: DevChain, tmp_path: Path
) -> None:
    from tests.support.gateway import running_gateway

    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("agent", complete_after=60)
    with (
        running_gateway(
            base_chain,
            store_url=sqlite_url(tmp_path),
            routes=[{"route": "POST /agent/prompt", "price": "0.02"}],
            upstream=api,
            upstream_settings={"headers": {"X-API-Key": API_KEY}},
            server={"unpriced": "refuse"},
            jobs={"mode": "front", "style": "agent"},
        ) as gw,
        gw.client() as c,
    ):
        r = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "x"})
        assert c.get("/agent/job/job_1", headers=bearer(r)).status_code == 200
        assert c.get("/elsewhere").status_code == 404


def test_free_job_calls_are_counted_in_metrics_like_every_other_request(base_chain: DevChain, tmp_path: Path) -> None:
    # Status polls and refused job paths are answered before the payment layer; operators must still see them.
    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("agent", complete_after=60)
    with (
        jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=api, mode="front", style="agent") as gw,
        gw.client() as c,
    ):
        submitted = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "hi"})
        for _ in range(3):
            assert c.get("/agent/job/job_1", headers=bearer(submitted)).status_code == 200
        assert c.get("/agent/job/job_1").status_code == 404  # no proof
        assert c.get("/AGENT/JOB/job_1").status_code == 404  # another letter case: the same call, no proof
        assert c.get("/agent/job/job_1/raw").status_code == 404  # under a job's path: refused, never forwarded

        m = samples(c.get("/metrics").text)
        ns = "x402_gateway_requests_total"
        assert value(m, ns, route="unpriced", outcome="free", status_class="2xx") == 3
        assert value(m, ns, route="unpriced", outcome="free", status_class="4xx") == 2
        assert value(m, ns, route="unpriced", outcome="refused", status_class="4xx") == 1
