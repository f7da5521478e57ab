"""A background loop is stopped even when its cancellation is lost, and a stuck one never holds a shutdown
(gateway/tasks.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from gateway.tasks import stop, stop_all


async def test_a_loop_that_swallows_its_cancellation_is_stopped_all_the_same() -> None:
    rounds = 0

    async def loop() -> None:  # a store call that eats the CancelledError, then the loop goes on sleeping
        nonlocal rounds
        while True:
            rounds += 1
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    t0 = time.monotonic()
    await stop(task, timeout=5.0)
    assert task.done() and time.monotonic() - t0 < 2.0


async def test_a_task_that_never_ends_is_left_after_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    released = False

    async def stubborn() -> None:
        while not released:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    t0 = time.monotonic()
    await stop(task, timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 2.0
    assert not task.done()
    assert any("did not stop" in r.getMessage() for r in caplog.records)
    released = True
    await asyncio.wait({task}, timeout=2)
    assert task.done()


async def test_an_ended_task_or_none_is_a_no_op_and_its_error_is_retrieved() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await stop(task)
    await stop(None)
    assert task.done()


async def test_several_loops_are_stopped_together_swallowed_cancellations_and_errors_included() -> None:
    async def swallows() -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.05)

    async def sleeps() -> None:
        await asyncio.sleep(3600)

    async def fails() -> None:
        raise RuntimeError("boom")

    tasks = [asyncio.create_task(f()) for f in (swallows, sleeps, fails)]
    await asyncio.sleep(0.01)
    await stop_all([*tasks, None], timeout=5.0)
    assert all(t.done() for t in tasks)
    assert tasks[1].cancelled() and isinstance(tasks[2].exception(), RuntimeError)
