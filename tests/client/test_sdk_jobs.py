"""The SDK's jobs calls against a real paid gateway (runner mode, anvil): prompt, poll with live updates, cancel,
list, batch. Every job is paid exactly once, whatever becomes of it."""

from __future__ import annotations

import itertools
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.client import (
    ApiError,
    AsyncX402Client,
    Job,
    JobCancelled,
    JobFailed,
    SpendControls,
    StatusUpdate,
    X402Client,
    X402ClientError,
)
from gateway.client._client import poll_waits
from gateway.dev.chain import DevChain
from tests.client.conftest import POLL, STEPS
from tests.e2e.helpers import Balances
from tests.jobs.helpers import PRICE, jobs_gateway
from tests.support.gateway import GatewayUnderTest, sqlite_url
from tests.support.jobs_upstreams import SlowAgent, wait_until


async def test_prompt_and_wait_completes_and_on_update_sees_every_status_update_exactly_once(
    agent_gateway: GatewayUnderTest, base_chain: DevChain
) -> None:
    gw = agent_gateway
    payer = base_chain.new_payer(1_000_000)
    money = Balances(gw, payer.address)
    updates: list[StatusUpdate] = []
    polls: list[Job] = []

    async def on_update(update: StatusUpdate) -> None:  # async callbacks are awaited
        updates.append(update)

    async with AsyncX402Client(gw.url, account=payer) as client:
        job = await client.prompt_and_wait(
            "What is the price of ETH?", on_update=on_update, on_poll=polls.append, **POLL
        )
        assert client.spent == PRICE

    assert (job.status, job.response) == ("completed", "Answer: What is the price of ETH?")
    assert job.rich_data == ({"type": "echo", "words": 6},)
    assert [u.message for u in updates] == list(STEPS)
    assert list(job.status_updates) == updates
    assert all(u.timestamp is not None for u in updates)
    # polled far more often than there were updates: the same update was read many times, reported once
    assert len(polls) > 2 * len(STEPS)
    sub = job.submission
    assert sub is not None and sub.job_id == job.job_id and sub.token and sub.thread_id == job.thread_id
    assert sub.network == "eip155:8453" and sub.payer == payer.address.lower()
    mined = base_chain.rpc("eth_getTransactionReceipt", [sub.tx_hash])
    assert int(mined["status"], 16) == 1
    money.assert_charged_once(PRICE)


async def test_a_failed_job_raises_job_failed_with_the_final_job_and_its_payment_attached(
    agent_gateway: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    money = Balances(agent_gateway, payer.address)
    async with AsyncX402Client(agent_gateway.url, account=payer) as client:
        with pytest.raises(JobFailed) as caught:
            await client.prompt_and_wait("fail now", **POLL)
    err = caught.value
    assert (err.reason, err.job_id, err.status) == ("job_failed", err.job.job_id, None)
    assert (err.job.status, err.job.error) == ("failed", "the agent failed")
    assert err.job.submission is not None and err.job.submission.tx_hash
    money.assert_charged_once(PRICE)  # charged once per job at submission, whatever its final status


def test_cancel_stops_a_running_job_is_idempotent_and_a_finished_job_cannot_be_cancelled(
    agent_gateway: GatewayUnderTest, base_chain: DevChain
) -> None:
    gw = agent_gateway
    agent: SlowAgent = gw.upstream
    payer = base_chain.new_payer(1_000_000)
    with X402Client(gw.url, account=payer) as client:
        sub = client.prompt("sleep 20")
        assert sub.status == "pending" and sub.token
        assert wait_until(lambda: client.get_job_status(sub.job_id).status == "processing", 10)
        first = client.cancel_job(sub.job_id)
        assert (first.job_id, first.status) == (sub.job_id, "cancelled") and first.cancelled_at is not None
        again = client.cancel_job(sub.job_id)
        assert (again.status, again.cancelled_at) == ("cancelled", first.cancelled_at)
        assert wait_until(lambda: sub.job_id in agent.aborted, 15), "the upstream call was not closed"
        with pytest.raises(JobCancelled) as caught:
            client.poll_job(sub.job_id, interval=0.02)
        assert caught.value.job.status == "cancelled" and caught.value.job_id == sub.job_id

        done = client.prompt_and_wait("quick one", **POLL)
        with pytest.raises(ApiError) as refused:
            client.cancel_job(done.job_id)
        assert (refused.value.status, refused.value.reason, refused.value.job_id) == (
            400,
            "Job already completed",
            done.job_id,
        )
        assert client.spent == 2 * PRICE

    # A client without the job token (a new process) cancels with the wallet's signature instead...
    with X402Client(gw.url, account=payer) as fresh:
        assert fresh.cancel_job(sub.job_id).status == "cancelled"
    # ...and another wallet learns nothing about the job.
    with X402Client(gw.url, account=base_chain.new_payer(0)) as stranger:
        with pytest.raises(ApiError) as hidden:
            stranger.get_job_status(sub.job_id)
        assert (hidden.value.status, hidden.value.reason) == (404, "Job not found")


async def test_list_jobs_shows_only_this_wallets_jobs_with_status_filter_and_limit(
    agent_gateway: GatewayUnderTest, base_chain: DevChain
) -> None:
    alice, bob = base_chain.new_payer(1_000_000), base_chain.new_payer(1_000_000)
    async with (
        AsyncX402Client(agent_gateway.url, account=alice) as a,
        AsyncX402Client(agent_gateway.url, account=bob) as b,
    ):
        mine = [(await a.prompt_and_wait(f"alice {i}", **POLL)).job_id for i in range(2)]
        await b.prompt_and_wait("bob", **POLL)
        listed = await a.list_jobs()
        assert sorted(j.job_id for j in listed.jobs) == sorted(mine)
        assert (listed.total, listed.filtered) == (2, 2)
        assert {j.status for j in listed.jobs} == {"completed"}
        newest = await a.list_jobs(status="completed", limit=1)
        assert [j.job_id for j in newest.jobs] == [mine[-1]] and newest.total == 2
        assert (await a.list_jobs(status="failed")).jobs == ()


async def test_a_batch_of_50_prompts_completes_in_order_with_exactly_50_payments(
    agent_gateway: GatewayUnderTest, base_chain: DevChain
) -> None:
    gw = agent_gateway
    payer = base_chain.new_payer(2_000_000)
    money = Balances(gw, payer.address)
    prompts = [f"question {i}" for i in range(50)]
    # The budget is exactly 50 jobs: one extra payment anywhere would be refused.
    spend = SpendControls(max_per_payment=Decimal("0.02"), budget=Decimal("1.00"))
    async with AsyncX402Client(gw.url, account=payer, spend=spend) as client:
        results = await client.batch_prompts(prompts, concurrency=8, interval=0.05, timeout=60)
        assert client.spent == 50 * PRICE and client.remaining_budget == 0
    jobs = [r for r in results if isinstance(r, Job)]
    assert len(jobs) == 50, [r for r in results if not isinstance(r, Job)]
    assert [j.response for j in jobs] == [f"Answer: {p}" for p in prompts]
    hashes = [j.submission.tx_hash if j.submission else None for j in jobs]
    assert None not in hashes  # every job names its settlement (several may share one Multicall3 batch)
    for tx_hash in set(hashes):
        assert int(base_chain.rpc("eth_getTransactionReceipt", [tx_hash])["status"], 16) == 1
    money.assert_charged_once(50 * PRICE)


async def test_messaging_style_jobs_parse_into_the_same_job_type(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent(steps=STEPS[:2], step_delay=0.02)
    with jobs_gateway(
        base_chain, store_url=sqlite_url(tmp_path), upstream=agent, mode="runner", style="messaging"
    ) as gw:
        async with AsyncX402Client(gw.url, account=payer, style="messaging", user_id="user-7") as client:
            seen: list[str] = []
            job = await client.prompt_and_wait("2+2?", on_update=lambda u: seen.append(u.message), **POLL)
            assert (job.status, job.response, job.user_id) == ("completed", "Answer: 2+2?", "user-7")
            assert job.processing_time_ms is not None and job.completed_at is not None
            assert seen == list(STEPS[:2])
            sub = await client.prompt("sleep 20")
            cancelled = await client.cancel_job(sub.job_id)
            assert cancelled.status == "cancelled"  # style B shows it as failed + cancelledAt
            listed = await client.list_jobs()
            statuses: dict[str, Any] = {j.job_id: j.status for j in listed.jobs}
            assert statuses == {job.job_id: "completed", sub.job_id: "cancelled"}


async def test_get_jobs_health_reads_style_b_counts_and_a_style_a_client_has_no_such_call(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent(steps=STEPS[:1], step_delay=0.02)
    with jobs_gateway(
        base_chain, store_url=sqlite_url(tmp_path), upstream=agent, mode="runner", style="messaging"
    ) as gw:
        async with AsyncX402Client(gw.url, account=payer, style="messaging") as client:
            assert (await client.get_jobs_health()).total_jobs == 0
            await client.prompt_and_wait("one", **POLL)
            with pytest.raises(JobFailed):
                await client.prompt_and_wait("fail", **POLL)
            health = await client.get_jobs_health()
        async with AsyncX402Client(gw.url, style="messaging") as anonymous:  # free, public: counts only
            assert (await anonymous.get_jobs_health()).status_counts == health.status_counts
        with X402Client(gw.url, style="agent") as wrong_style:
            with pytest.raises(X402ClientError) as caught:
                wrong_style.get_jobs_health()
            assert caught.value.reason == "not_supported"
    assert (health.healthy, health.total_jobs, health.max_jobs) == (True, 2, 10_000)
    assert (health.status_counts["completed"], health.status_counts["failed"]) == (1, 1)
    assert health.metrics["successRate"] == health.metrics["failureRate"] == 0.5
    assert health.timestamp is not None and health.raw["statusCounts"] == dict(health.status_counts)


def test_poll_waits_grow_by_the_backoff_up_to_the_cap_and_bad_settings_fail_at_once() -> None:
    waits = poll_waits(0.5, 1.5, 5.0)
    assert [round(next(waits), 4) for _ in range(8)] == [0.5, 0.75, 1.125, 1.6875, 2.5312, 3.7969, 5.0, 5.0]
    fixed = poll_waits(2.0)
    assert [next(fixed) for _ in range(3)] == [2.0, 2.0, 2.0]  # the seeds' fixed 2 s by default
    for bad in ((1.0, 0.5, None), (-1.0, 1.0, None), (1.0, 2.0, -1.0)):
        with pytest.raises(ValueError):
            poll_waits(*bad)


async def test_poll_job_with_backoff_waits_longer_between_polls_and_still_sees_every_update(
    agent_gateway: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    polled: list[float] = []
    updates: list[str] = []
    async with AsyncX402Client(agent_gateway.url, account=payer) as client:
        sub = await client.prompt("backoff please")
        job = await client.poll_job(
            sub.job_id,
            interval=0.02,
            backoff=2.0,
            max_interval=0.3,
            timeout=20,
            on_poll=lambda _: polled.append(time.monotonic()),
            on_update=lambda u: updates.append(u.message),
        )
    assert job.status == "completed" and updates == list(STEPS)
    gaps = [b - a for a, b in itertools.pairwise(polled)]
    expected = [min(0.02 * 2**i, 0.3) for i in range(len(gaps))]
    # Lower bounds only (a poll's own round trip adds to each gap): the waits grow as asked, up to the cap.
    assert all(gap >= want - 0.005 for gap, want in zip(gaps, expected, strict=True)), (gaps, expected)
    assert len(gaps) >= 4  # the job took ~0.9 s: the schedule was walked up to the cap
