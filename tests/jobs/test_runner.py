"""The built-in job runner through a paid gateway on anvil: the gateway serves the job API (style A and B) in
front of a slow synchronous agent, runs each paid job in the background, and keeps the records in the store."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.client.exact import choose_requirement, parse_challenge, sign_exact_payment
from gateway.dev.chain import DevChain
from gateway.jobs.auth import new_token
from gateway.jobs.model import Job, JobStatus, now_ms
from gateway.storage.jobs import open_job_store
from tests.e2e.helpers import Balances
from tests.jobs.helpers import PRICE, STATUS, bearer, jobs_gateway, pay, poll, signed
from tests.support.gateway import sqlite_url
from tests.support.jobs_upstreams import API_KEY, SlowAgent, wait_until

JOBS = "/api/messaging/jobs"


def test_style_b_answers_201_at_once_then_runs_the_paid_job_and_records_its_progress(
    base_chain: DevChain, store_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent(step_delay=0.1)
    with (
        jobs_gateway(base_chain, store_url=store_url, upstream=agent, mode="runner", style="messaging") as gw,
        gw.client() as c,
    ):
        money = Balances(gw, payer.address)
        body = {"userId": "user-1", "content": "What is 2+2?", "agentId": "agent-7", "metadata": {"source": "test"}}
        r = pay(gw, c, payer, "POST", JOBS, json=body)
        assert r.status_code == 201, r.text
        created = r.json()
        assert set(created) == {"jobId", "status", "createdAt", "expiresAt"}
        assert created["status"] == "pending"
        assert created["expiresAt"] - created["createdAt"] == 30_000
        money.assert_charged_once(PRICE)
        job_id = created["jobId"]
        doc = poll(c, f"{JOBS}/{job_id}", bearer(r))
        assert doc["status"] == "completed", doc
        assert set(doc) == {
            "jobId",
            "status",
            "agentId",
            "userId",
            "prompt",
            "createdAt",
            "expiresAt",
            "result",
            "metadata",
            "statusUpdates",
        }
        assert (doc["jobId"], doc["agentId"], doc["userId"], doc["prompt"]) == (
            job_id,
            "agent-7",
            "user-1",
            body["content"],
        )
        assert (doc["createdAt"], doc["expiresAt"], doc["metadata"]) == (
            created["createdAt"],
            created["expiresAt"],
            {"source": "test"},
        )
        message = doc["result"]["message"]
        assert set(message) == {"id", "content", "authorId", "createdAt"}
        assert (message["content"], message["authorId"]) == ("Answer: What is 2+2?", "agent-7")
        assert doc["result"]["processingTimeMs"] == message["createdAt"] - doc["createdAt"] >= 200
        assert [u["message"] for u in doc["statusUpdates"]] == ["Thinking...", "Checking sources..."]
        assert all(isinstance(u["timestamp"], int) for u in doc["statusUpdates"])
        # the agent got the gateway's key and the job, never the payment or the caller's proofs
        (call,) = agent.calls
        assert call.headers["x-api-key"] == API_KEY and call.headers["x-job-id"] == job_id
        assert not {"payment-signature", "x-payment", "authorization", "x-payer-auth"} & set(call.headers)
        sent = __import__("json").loads(call.body)
        assert sent == {
            "jobId": job_id,
            "prompt": body["content"],
            "payer": payer.address.lower(),
            "userId": "user-1",
            "agentId": "agent-7",
            "metadata": {"source": "test"},
        }
        listed = c.get(JOBS, headers=signed(payer, "GET", JOBS)).json()
        assert ([j["jobId"] for j in listed["jobs"]], listed["total"], listed["filtered"]) == ([job_id], 1, 1)
        health = c.get(f"{JOBS}/health").json()
        assert set(health) == {"healthy", "timestamp", "totalJobs", "statusCounts", "metrics", "maxJobs"}
        assert (health["healthy"], health["totalJobs"], health["maxJobs"]) == (True, 1, 10_000)
        assert health["statusCounts"] == {
            "pending": 0,
            "processing": 0,
            "completed": 1,
            "failed": 0,
            "cancelled": 0,
            "timeout": 0,
        }
        assert health["metrics"] == {
            "averageProcessingTimeMs": doc["result"]["processingTimeMs"],
            "successRate": 1.0,
            "failureRate": 0.0,
            "timeoutRate": 0.0,
        }
        money.assert_charged_once(PRICE)


def test_style_a_answers_202_and_shows_the_job_in_seed_002s_shape(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent()
    with (
        jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=agent, mode="runner", style="agent") as gw,
        gw.client() as c,
    ):
        r = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "price of ETH?"})
        assert r.status_code == 202, r.text
        sub = r.json()
        assert set(sub) == {"success", "jobId", "threadId", "status", "message"}
        assert sub["success"] is True and sub["status"] == "pending" and sub["message"] == "Job submitted successfully"
        assert sub["jobId"].startswith("job_") and sub["threadId"].startswith("thr_")
        doc = poll(c, STATUS["agent"].format(sub["jobId"]), bearer(r))
        assert set(doc) == {
            "success",
            "jobId",
            "threadId",
            "status",
            "prompt",
            "createdAt",
            "statusUpdates",
            "startedAt",
            "response",
            "richData",
            "completedAt",
            "processingTime",
            "cancellable",
        }
        assert (doc["status"], doc["response"], doc["cancellable"]) == ("completed", "Answer: price of ETH?", False)
        assert doc["richData"] == [{"type": "echo", "words": 3}]
        assert doc["createdAt"].endswith("Z") and "T" in doc["completedAt"]
        assert [u["message"] for u in doc["statusUpdates"]] == ["Thinking...", "Checking sources..."]
        assert doc["statusUpdates"][0]["timestamp"].endswith("Z")
        # the same thread continues a conversation
        r2 = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "and BTC?", "threadId": sub["threadId"]})
        assert r2.json()["threadId"] == sub["threadId"]


def test_cancel_closes_the_upstream_call_is_idempotent_and_finished_jobs_answer_seed_002s_400(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent()
    with (
        jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=agent, mode="runner", style="agent") as gw,
        gw.client() as c,
    ):
        r = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "sleep 20"})
        job_id = r.json()["jobId"]
        path = STATUS["agent"].format(job_id)
        poll(c, path, bearer(r), until=lambda d: d["status"] == "processing" and len(d.get("statusUpdates", [])) == 1)
        cancel = c.post(path + "/cancel", headers=bearer(r))
        assert cancel.status_code == 200, cancel.text
        body = cancel.json()
        assert set(body) == {"success", "jobId", "status", "prompt", "createdAt", "cancelledAt"}
        assert (body["success"], body["jobId"], body["status"], body["prompt"]) == (
            True,
            job_id,
            "cancelled",
            "sleep 20",
        )
        assert wait_until(lambda: job_id in agent.aborted, 15), "the upstream call was not closed"
        again = c.post(path + "/cancel", headers=signed(payer, "POST", path + "/cancel"))
        assert (again.status_code, again.json()) == (200, body)
        after = c.get(path, headers=bearer(r)).json()
        assert (after["status"], after["cancellable"], after["cancelledAt"]) == (
            "cancelled",
            False,
            body["cancelledAt"],
        )

        for prompt, status, error in (
            ("quick", "completed", {"error": "Job already completed", "message": "Cannot cancel a completed job"}),
            ("fail", "failed", {"error": "Job already failed", "message": "Cannot cancel a failed job"}),
        ):
            done = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": prompt})
            done_path = STATUS["agent"].format(done.json()["jobId"])
            assert poll(c, done_path, bearer(done))["status"] == status
            refused = c.post(done_path + "/cancel", headers=bearer(done))
            assert (refused.status_code, refused.json()) == (400, {"success": False, **error})


@pytest.mark.parametrize("style", ["messaging", "agent"])
def test_a_job_past_its_timeout_ms_times_out_and_its_upstream_call_is_closed(
    base_chain: DevChain, tmp_path: Path, style: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent()
    with (
        jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=agent, mode="runner", style=style) as gw,
        gw.client() as c,
    ):
        if style == "messaging":
            r = pay(gw, c, payer, "POST", JOBS, json={"userId": "u", "content": "sleep 20", "timeoutMs": 1000})
        else:
            r = pay(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "sleep 20", "timeoutMs": 1000})
        job_id = r.json()["jobId"]
        doc = poll(c, STATUS[style].format(job_id), bearer(r), timeout=10)
        # style B knows "timeout"; style A's clients stop polling on failed, so it shows failed + the reason
        assert doc["status"] == ("timeout" if style == "messaging" else "failed"), doc
        assert doc["error"] == "Job timed out after 1000 ms"
        assert wait_until(lambda: job_id in agent.aborted, 15)


def test_invalid_submits_answer_400_in_the_styles_words_and_cost_nothing(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent()
    cases: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        (
            "messaging",
            {"content": "no user"},
            {"error": "Invalid request", "message": "Required fields: userId, content"},
        ),
        (
            "messaging",
            {"userId": "u", "content": "x", "timeoutMs": 500},
            {"error": "Invalid request", "message": "timeoutMs must be an integer from 1000 to 300000"},
        ),
        (
            "messaging",
            {"userId": "u", "content": "x", "metadata": {"k": "v" * 10_001}},
            {"error": "Invalid request", "message": "metadata must be at most 10,000 bytes of JSON"},
        ),
        (
            "agent",
            {"prompt": "x" * 10_001},
            {"error": "Prompt too long", "message": "Prompt must be at most 10,000 characters"},
        ),
        (
            "agent",
            {"threadId": "t"},
            {"error": "Invalid request", "message": "prompt is required and must be a non-empty string"},
        ),
    ]
    for style in ("messaging", "agent"):
        (tmp_path / style).mkdir()
        with (
            jobs_gateway(
                base_chain, store_url=sqlite_url(tmp_path / style), upstream=agent, mode="runner", style=style
            ) as gw,
            gw.client() as c,
        ):
            money = Balances(gw, payer.address)
            for case_style, body, error in cases:
                if case_style != style:
                    continue
                path = JOBS if style == "messaging" else "/agent/prompt"
                r = pay(gw, c, payer, "POST", path, json=body)
                assert (r.status_code, r.json()) == (400, error)
            money.assert_unchanged()
    assert agent.calls == []


@pytest.mark.parametrize(
    ("prompt", "status", "error", "updates"),
    [
        ("fail", "failed", "the agent failed", ["Thinking...", "Checking sources..."]),
        ("status 503", "failed", "upstream answered 503: the agent is overloaded", None),
        ("sse stream", "completed", None, ["Thinking...", "Checking sources..."]),
        ("plain answer", "completed", None, None),
    ],
)
def test_each_upstream_answer_form_of_the_contract_ends_the_job_as_documented(
    base_chain: DevChain, tmp_path: Path, prompt: str, status: str, error: str | None, updates: list[str] | None
) -> None:
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent()
    with (
        jobs_gateway(
            base_chain, store_url=sqlite_url(tmp_path), upstream=agent, mode="runner", style="messaging"
        ) as gw,
        gw.client() as c,
    ):
        money = Balances(gw, payer.address)
        r = pay(gw, c, payer, "POST", JOBS, json={"userId": "u", "content": prompt})
        doc = poll(c, f"{JOBS}/{r.json()['jobId']}", bearer(r))
        assert doc["status"] == status, doc
        assert doc.get("error") == error
        assert [u["message"] for u in doc.get("statusUpdates", [])] == (updates or [])
        if status == "completed":
            assert doc["result"]["message"]["content"] == f"Answer: {prompt}"
        money.assert_charged_once(PRICE)  # charged per job, whatever its outcome (seed 001)


def test_another_wallet_cannot_poll_cancel_or_list_someone_elses_job(base_chain: DevChain, store_url: str) -> None:
    alice, mallory = base_chain.new_payer(1_000_000), base_chain.new_payer(1_000_000)
    agent = SlowAgent()
    with (
        jobs_gateway(base_chain, store_url=store_url, upstream=agent, mode="runner", style="agent") as gw,
        gw.client() as c,
    ):
        r = pay(gw, c, alice, "POST", "/agent/prompt", json={"prompt": "sleep 20"})
        job_id = r.json()["jobId"]
        path = STATUS["agent"].format(job_id)
        m = pay(gw, c, mallory, "POST", "/agent/prompt", json={"prompt": "mine"})
        not_found = {"error": "Job not found", "message": f"No job found with ID {job_id}"}
        for attempt in (
            c.get(path),
            c.get(path, headers=signed(mallory, "GET", path)),
            c.get(path, headers=bearer(m)),
            c.post(path + "/cancel", headers=signed(mallory, "POST", path + "/cancel")),
            c.post(path + "/cancel", headers=bearer(m)),
        ):
            assert (attempt.status_code, attempt.json()) == (404, not_found)
        assert c.get(path, headers=bearer(r)).json()["status"] in ("pending", "processing")


def test_200_concurrent_paid_jobs_all_finish_and_the_payer_pays_exactly_200_times(
    base_chain: DevChain, store_url: str
) -> None:
    n = 200
    payer = base_chain.new_payer(n * PRICE + 1)
    agent = SlowAgent(steps=("working",), step_delay=0.01)
    with jobs_gateway(
        base_chain, store_url=store_url, upstream=agent, mode="runner", style="messaging", max_jobs=1_000
    ) as gw:
        money = Balances(gw, payer.address)
        with gw.client() as c:
            option = choose_requirement(parse_challenge(*_challenge(c)))
        payments = [dict([sign_exact_payment(payer, option)]) for _ in range(n)]

        async def run() -> list[dict[str, Any]]:
            limits = httpx.Limits(max_connections=n)
            async with httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as client:
                gate = asyncio.Event()

                async def submit(i: int) -> httpx.Response:
                    await gate.wait()
                    return await client.post(JOBS, json={"userId": f"u{i}", "content": f"job {i}"}, headers=payments[i])

                tasks = [asyncio.create_task(submit(i)) for i in range(n)]
                await asyncio.sleep(0.05)
                gate.set()  # released together
                answers = await asyncio.gather(*tasks)
                assert [a.status_code for a in answers] == [201] * n, {a.status_code: a.text for a in answers}

                async def final(answer: httpx.Response) -> dict[str, Any]:
                    path = f"{JOBS}/{answer.json()['jobId']}"
                    doc: dict[str, Any] = {}
                    for _ in range(600):
                        try:
                            doc = (await client.get(path, headers=bearer(answer))).json()
                        except (httpx.RemoteProtocolError, httpx.ReadError):  # a keep-alive connection just closed
                            continue
                        if doc["status"] not in ("pending", "processing"):
                            return doc
                        await asyncio.sleep(0.05)
                    return doc

                return await asyncio.gather(*(final(a) for a in answers))

        docs = asyncio.run(run())
        assert [d["status"] for d in docs] == ["completed"] * n
        assert len({d["jobId"] for d in docs}) == n
        money.assert_charged_once(n * PRICE)
        assert len(agent.calls) == n
        with gw.client() as c:
            counts = c.get(f"{JOBS}/health").json()["statusCounts"]
        assert counts["completed"] == n


def _challenge(c: httpx.Client) -> tuple[httpx.Headers, bytes]:
    first = c.post(JOBS, json={"userId": "u", "content": "x"})
    assert first.status_code == 402
    return first.headers, first.content


def test_a_gateway_restart_mid_job_keeps_polls_answering_and_leaves_no_job_processing(
    base_chain: DevChain, store_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent()
    settings: dict[str, Any] = {"runner_lease_seconds": 1.0, "sweep_interval_seconds": 0.2}
    with (
        jobs_gateway(
            base_chain, store_url=store_url, upstream=agent, mode="runner", style="messaging", **settings
        ) as gw1,
        gw1.client() as c,
    ):
        done = pay(gw1, c, payer, "POST", JOBS, json={"userId": "u", "content": "quick"})
        assert poll(c, f"{JOBS}/{done.json()['jobId']}", bearer(done))["status"] == "completed"
        slow = [pay(gw1, c, payer, "POST", JOBS, json={"userId": "u", "content": "sleep 30"}) for _ in range(3)]
        for r in slow:
            poll(c, f"{JOBS}/{r.json()['jobId']}", bearer(r), until=lambda d: d["status"] == "processing")
    # gw1 stopped while three jobs were processing
    with (
        jobs_gateway(
            base_chain, store_url=store_url, upstream=agent, mode="runner", style="messaging", **settings
        ) as gw2,
        gw2.client() as c,
    ):
        kept = c.get(f"{JOBS}/{done.json()['jobId']}", headers=bearer(done))
        assert kept.status_code == 200 and kept.json()["result"]["message"]["content"] == "Answer: quick"
        for r in slow:
            doc = c.get(f"{JOBS}/{r.json()['jobId']}", headers=bearer(r)).json()
            assert doc["status"] == "failed" and doc["error"].startswith("runner lost"), doc
        assert {r.json()["jobId"] for r in slow} <= agent.aborted

        # a runner that died without a word (crash): the lease lapses, the next read or sweep fails the job
        token, digest = new_token()
        now = now_ms()
        crashed = [
            Job(
                job_id=f"crashed-{i}",
                payer=payer.address.lower(),
                status=JobStatus.PROCESSING,
                created_at=now,
                prompt="x",
                timeout_ms=30_000,
                expires_at=now + 30_000,
                token_hash=digest,
                runner_lease_until=now + 500,
                started_at=now,
            )
            for i in range(2)
        ]
        store = open_job_store(store_url)

        async def plant() -> None:
            for job in crashed:
                await store.create(job, max_jobs=100)

        async def read(job_id: str) -> Job | None:
            return await store.get(job_id)

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(plant())
            assert (
                c.get(f"{JOBS}/crashed-0", headers={"Authorization": f"Bearer {token}"}).json()["status"]
                == "processing"
            )
            assert wait_until(lambda: loop.run_until_complete(read("crashed-1")).status == JobStatus.FAILED, 5)  # type: ignore[union-attr]
            read_back = c.get(f"{JOBS}/crashed-0", headers={"Authorization": f"Bearer {token}"}).json()
            assert (read_back["status"], read_back["error"]) == ("failed", "runner lost")
        finally:
            loop.run_until_complete(store.aclose())
            loop.close()


def test_any_instance_answers_a_poll_and_a_cancel_reaches_the_instance_running_the_job(
    base_chain: DevChain, redis_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent()
    settings: dict[str, Any] = {"runner_lease_seconds": 0.6}
    with contextlib.ExitStack() as stack:
        gw1 = stack.enter_context(
            jobs_gateway(base_chain, store_url=redis_url, upstream=agent, mode="runner", style="agent", **settings)
        )
        gw2 = stack.enter_context(
            jobs_gateway(base_chain, store_url=redis_url, upstream=agent, mode="runner", style="agent", **settings)
        )
        c1, c2 = stack.enter_context(gw1.client()), stack.enter_context(gw2.client())
        r = pay(gw1, c1, payer, "POST", "/agent/prompt", json={"prompt": "sleep 20"})
        path = STATUS["agent"].format(r.json()["jobId"])
        assert poll(c2, path, bearer(r), until=lambda d: d["status"] == "processing")["status"] == "processing"
        assert c2.post(path + "/cancel", headers=bearer(r)).json()["status"] == "cancelled"
        assert wait_until(lambda: r.json()["jobId"] in agent.aborted, 15), "gw1 kept calling the upstream"
        assert c1.get(path, headers=bearer(r)).json()["status"] == "cancelled"
