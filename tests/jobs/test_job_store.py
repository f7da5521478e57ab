"""The job store contract, on SQLite and on Redis: what the runner and the payer checks rely on."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.jobs.model import ACTIVE, RUNNER_LOST, Job, JobExists, JobStatus, JobStoreFull, StatusUpdate
from gateway.storage.jobs import JobStore, open_job_store
from tests.jobs.conftest import JobBackend

PAYER = "0x" + "a" * 40
OTHER = "0x" + "b" * 40
T0 = 1_700_000_000_000


def job(job_id: str, *, payer: str = PAYER, created: int = T0, status: JobStatus = JobStatus.PENDING, **kw: Any) -> Job:
    return Job(job_id=job_id, payer=payer, status=status, created_at=created, prompt=f"prompt {job_id}", **kw)


async def test_a_record_reads_back_field_for_field(job_store: JobStore) -> None:
    original = job(
        "j1",
        thread_id="thr_1",
        agent_id="agent",
        user_id="user",
        metadata={"k": [1, "ü"]},
        timeout_ms=30_000,
        expires_at=T0 + 30_000,
        token_hash="ab" * 32,
        tx_hash="0x" + "c" * 64,
        network="eip155:8453",
        runner_lease_until=T0 + 15_000,
        runner="0f3a9c",
    )
    await job_store.create(original, max_jobs=10)
    assert await job_store.get("j1") == original
    assert await job_store.get("nope") is None


async def test_a_job_id_is_recorded_once_so_a_reused_id_cannot_move_a_job_to_another_payer(job_store: JobStore) -> None:
    await job_store.create(job("j1"), max_jobs=10)
    with pytest.raises(JobExists):
        await job_store.create(job("j1", payer=OTHER), max_jobs=10)
    got = await job_store.get("j1")
    assert got is not None and got.payer == PAYER


async def test_transition_is_compare_and_set_so_cancel_racing_completion_has_one_winner(
    job_backend: JobBackend,
) -> None:
    stores = [job_backend.make() for _ in range(4)]
    for i in range(8):
        await stores[0].create(job(f"race{i}", status=JobStatus.PROCESSING), max_jobs=100)
    for i in range(8):
        # 32 contenders released together: half complete, half cancel, through four store objects
        contenders = [
            stores[k % 4].transition(
                f"race{i}",
                when=ACTIVE,
                to=JobStatus.COMPLETED if k % 2 else JobStatus.CANCELLED,
                changes={"completed_at": T0 + 5} if k % 2 else {"cancelled_at": T0 + 5},
            )
            for k in range(32)
        ]
        results = await asyncio.gather(*contenders)
        winners = [r for r in results if r[0]]
        assert len(winners) == 1
        final = await stores[0].get(f"race{i}")
        assert final is not None and final.status == winners[0][1].status  # type: ignore[union-attr]
        assert all(r[1] is not None and r[1].status == final.status for r in results if not r[0])


async def test_transition_of_an_absent_job_applies_nothing(job_store: JobStore) -> None:
    assert await job_store.transition("nope", when=ACTIVE, to=JobStatus.FAILED, changes={}) == (False, None)


async def test_status_updates_append_in_order_only_while_live_and_up_to_the_cap(job_store: JobStore) -> None:
    await job_store.create(job("j1"), max_jobs=10)
    for i in range(5):
        appended = await job_store.append_update("j1", StatusUpdate(f"step {i}", T0 + i), limit=3)
        assert appended == (i < 3)
    await job_store.transition("j1", when=ACTIVE, to=JobStatus.COMPLETED, changes={"completed_at": T0 + 10})
    assert not await job_store.append_update("j1", StatusUpdate("late", T0 + 20), limit=10)
    got = await job_store.get("j1")
    assert got is not None
    assert [u.message for u in got.status_updates] == ["step 0", "step 1", "step 2"]


async def test_max_jobs_drops_the_oldest_terminal_records_first_and_never_a_live_one(job_store: JobStore) -> None:
    await job_store.create(job("live-old", created=T0), max_jobs=4)
    await job_store.create(job("done-1", created=T0 + 1, status=JobStatus.COMPLETED, purge_at=T0 + 10**9), max_jobs=4)
    await job_store.create(job("done-2", created=T0 + 2, status=JobStatus.FAILED, purge_at=T0 + 10**9), max_jobs=4)
    await job_store.create(job("live-new", created=T0 + 3), max_jobs=4)
    await job_store.create(job("extra-1", created=T0 + 4), max_jobs=4)
    assert await job_store.get("done-1") is None
    assert await job_store.get("done-2") is not None
    assert await job_store.get("live-old") is not None
    await job_store.create(job("extra-2", created=T0 + 5), max_jobs=4)
    assert await job_store.get("done-2") is None
    with pytest.raises(JobStoreFull):
        await job_store.create(job("extra-3", created=T0 + 6), max_jobs=4)
    assert (await job_store.stats()).total == 4


async def test_list_for_payer_is_newest_first_filtered_limited_and_counts_only_that_payer(job_store: JobStore) -> None:
    for i in range(6):
        status = JobStatus.COMPLETED if i % 2 else JobStatus.PENDING
        await job_store.create(job(f"mine{i}", created=T0 + i, status=status), max_jobs=100)
        await job_store.create(job(f"theirs{i}", payer=OTHER, created=T0 + i), max_jobs=100)
    jobs, total = await job_store.list_for_payer(PAYER, statuses=None, limit=4)
    assert [j.job_id for j in jobs] == ["mine5", "mine4", "mine3", "mine2"]
    assert total == 6
    jobs, total = await job_store.list_for_payer(PAYER, statuses=frozenset({JobStatus.COMPLETED}), limit=50)
    assert [j.job_id for j in jobs] == ["mine5", "mine3", "mine1"]
    assert total == 6
    jobs, total = await job_store.list_for_payer("0x" + "c" * 40, statuses=None, limit=50)
    assert (jobs, total) == ([], 0)


async def test_stale_finds_live_jobs_whose_runner_lease_lapsed_or_deadline_passed(job_store: JobStore) -> None:
    now = T0 + 100_000
    await job_store.create(job("lost", status=JobStatus.PROCESSING, runner_lease_until=now - 1), max_jobs=10)
    await job_store.create(
        job("late", status=JobStatus.PROCESSING, runner_lease_until=now + 10_000, expires_at=now - 5_000), max_jobs=10
    )
    await job_store.create(
        job("fine", status=JobStatus.PROCESSING, runner_lease_until=now + 10_000, expires_at=now + 1), max_jobs=10
    )
    await job_store.create(job("front", status=JobStatus.PENDING, purge_at=now + 10), max_jobs=10)  # no runner
    await job_store.create(
        job("done", status=JobStatus.FAILED, runner_lease_until=now - 1, error=RUNNER_LOST, purge_at=now + 10),
        max_jobs=10,
    )
    found = await job_store.stale(now, grace_ms=2_000, limit=100)
    assert sorted(j.job_id for j in found) == ["late", "lost"]


async def test_purge_deletes_only_records_past_their_purge_time(job_store: JobStore) -> None:
    await job_store.create(job("old", status=JobStatus.COMPLETED, purge_at=T0 + 10), max_jobs=10)
    await job_store.create(job("young", status=JobStatus.COMPLETED, purge_at=T0 + 1_000), max_jobs=10)
    await job_store.create(job("live"), max_jobs=10)
    assert await job_store.purge(T0 + 500) == 1
    assert await job_store.get("old") is None
    assert await job_store.get("young") is not None
    jobs, total = await job_store.list_for_payer(PAYER, statuses=None, limit=10)
    assert total == 2 and {j.job_id for j in jobs} == {"young", "live"}


async def test_stats_count_by_status_and_sum_processing_time_of_completed_jobs(job_store: JobStore) -> None:
    await job_store.create(job("a", created=T0), max_jobs=10)
    await job_store.create(job("b", created=T0), max_jobs=10)
    await job_store.create(job("c", created=T0), max_jobs=10)
    await job_store.transition("a", when=ACTIVE, to=JobStatus.COMPLETED, changes={"completed_at": T0 + 1_000})
    await job_store.transition("b", when=ACTIVE, to=JobStatus.COMPLETED, changes={"completed_at": T0 + 3_000})
    await job_store.transition("c", when=ACTIVE, to=JobStatus.TIMEOUT, changes={"completed_at": T0 + 9_000})
    stats = await job_store.stats()
    assert stats.count(JobStatus.COMPLETED) == 2
    assert stats.count(JobStatus.TIMEOUT) == 1
    assert stats.total == 3
    assert stats.completed_ms_total == 4_000
    await job_store.transition("a", when=frozenset({JobStatus.COMPLETED}), to=None, changes={"purge_at": T0})
    await job_store.purge(T0 + 1)
    assert (await job_store.stats()).completed_ms_total == 3_000


async def test_records_survive_a_new_store_object_on_the_same_storage(job_backend: JobBackend) -> None:
    first = job_backend.make()
    await first.create(job("kept", status=JobStatus.PROCESSING, runner_lease_until=T0), max_jobs=10)
    await first.append_update("kept", StatusUpdate("working", T0 + 1), limit=10)
    await first.aclose()
    second = job_backend.make()
    got = await second.get("kept")
    assert got is not None and got.status == JobStatus.PROCESSING
    assert got.status_updates == (StatusUpdate("working", T0 + 1),)


async def test_a_runner_is_alive_to_every_store_object_from_its_first_heartbeat_until_its_process_stops(
    job_backend: JobBackend,
) -> None:
    # Another instance fails a job "runner lost" only once its runner is not alive (docs/jobs.md): that answer
    # must come from the storage, never from comparing the two gateways' clocks.
    reader = job_backend.make()
    runner = open_job_store(job_backend.url)
    try:
        assert not await reader.alive("runner-1")  # never beat here: no proof of life, the lease alone decides
        await runner.heartbeat("runner-1", ttl=1.0)
        assert await reader.alive("runner-1") and await runner.alive("runner-1")
        assert not await reader.alive("runner-2")
        for _ in range(3):  # renewed before it lapses, each time: alive throughout (1.8 s in all, past the TTL)
            await asyncio.sleep(0.6)
            await runner.heartbeat("runner-1", ttl=1.0)
            assert await reader.alive("runner-1")
    finally:
        await runner.aclose()  # SQLite: its process's lock file is let go, as when the process dies
    if job_backend.name != "sqlite":
        await asyncio.sleep(1.1)  # Redis: the server expires the last heartbeat
    assert not await reader.alive("runner-1")


async def test_a_reader_sees_every_change_another_store_object_made_and_never_a_stale_copy(
    job_backend: JobBackend,
) -> None:
    # SQLite answers reads on the event loop over a connection of its own: it must see each commit at once.
    reader, writer = job_backend.make(), job_backend.make()
    assert await reader.get("late") is None  # before the writer created anything (SQLite: before the table)
    await writer.create(job("late"), max_jobs=10)
    for step in range(3):
        await writer.append_update("late", StatusUpdate(f"step {step}", T0 + step), limit=10)
        got = await reader.get("late")
        assert got is not None and len(got.status_updates) == step + 1


async def test_a_read_waits_for_nobody_while_another_connection_holds_the_write_lock(tmp_path: Path) -> None:
    store = open_job_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        await store.create(job("j"), max_jobs=10)
        other = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE jobs SET doc = doc WHERE job_id = 'j'")
        got = await asyncio.wait_for(store.get("j"), 1.0)  # WAL: readers never wait for the writer
        other.execute("ROLLBACK")
        other.close()
        assert got == job("j")
    finally:
        await store.aclose()
