"""Stopping a background loop (a sweeper, a heartbeat, a poller) without letting it hold a shutdown.

``task.cancel()`` then ``await task`` waits for ever when the cancellation is lost: a library that catches the
``CancelledError`` inside a store call (or turns it into an error the loop handles and goes on) leaves the loop
running, and the shutdown that awaits it never ends (seen with redis-py: the jobs runner's heartbeat loop kept
sleeping after its cancel). :func:`stop` cancels again while the task runs, and gives up after ``timeout`` with a
warning instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger("gateway.tasks")

__all__ = ["stop", "stop_all"]

_RECANCEL = 0.25  # seconds between cancellations of a task that has not ended


async def stop(task: asyncio.Task[object] | None, *, timeout: float = 5.0) -> None:
    """Cancel ``task`` and wait until it ended, cancelling it again while it runs, for at most ``timeout``
    seconds. Its outcome (a result, an error, the cancellation) is retrieved and dropped: a loop being stopped
    has nothing more to say."""
    await stop_all((task,), timeout=timeout)


async def stop_all(tasks: Iterable[asyncio.Task[object] | None], *, timeout: float = 5.0) -> None:
    """:func:`stop` for several tasks at once: all cancelled together, all given the same ``timeout``."""
    running = {t for t in tasks if t is not None}
    if not running:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        left_running = {t for t in running if not t.done()}
        if not left_running:
            break
        for task in left_running:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            for task in left_running:
                log.warning(
                    "a background task did not stop when cancelled: left running", extra={"task": task.get_name()}
                )
            break
        await asyncio.wait(left_running, timeout=min(_RECANCEL, left))
    for task in running:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: never "Task exception was never retrieved"
