"""Claim outcomes the receipt store could not take when they happened, applied as soon as it can.

When the store goes away in the middle of a paid request (Redis restarting, a failover), the request fails
closed (503, nothing served) but its claim stays as the store last saw it: PENDING or PAID with a live lease. Left
alone, every retry of the same payment is "in flight" (409) until that lease lapses, minutes later. The request
knows what should have become of its claim — given back (no money moved), or recorded paid-but-unserved (the
money moved, nothing was served) — so it leaves that outcome here, and it is applied as soon as the store answers:
by a background task, or at once when the same payment is presented again (:meth:`DeferredOutcomes.flush`).

Safe to apply late or twice: every store operation is guarded by the claim's owner (and state), so an outcome
whose lease has lapsed and whose claim another request took over changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from gateway.errors import GatewayError, StoreUnavailable
from gateway.tasks import stop

log = logging.getLogger("gateway.deferred")

Step = Callable[[], Awaitable[object]]  # what a step returns is ignored


@dataclass(slots=True)
class _Outcome:
    key: str
    steps: deque[Step]
    deadline: float  # monotonic: after this the lease has lapsed and the claim is anybody's


class DeferredOutcomes:
    """Pending claim outcomes, keyed by (payment key, owner). Lives on one event loop."""

    def __init__(
        self,
        *,
        first_delay: float = 0.25,
        max_delay: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pending: dict[tuple[str, str], _Outcome] = {}
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: str, owner: str, steps: Iterable[Step], *, within: float) -> None:
        """Apply ``steps`` in order once the store answers; give up after ``within`` seconds (the claim's lease)."""
        if self._closed:
            return
        outcome = self._pending.get((key, owner))
        if outcome is None:
            self._pending[(key, owner)] = _Outcome(key, deque(steps), self._clock() + within)
        else:
            outcome.steps.extend(steps)  # a later outcome of the same request: after the earlier one
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="deferred claim outcomes")

    async def flush(self, key: str) -> bool:
        """Apply what is pending for ``key`` now (the payment is being presented again). True if anything was."""
        applied = False
        for pending_key in [k for k in self._pending if k[0] == key]:
            applied = await self._apply(pending_key) or applied
        return applied

    async def _apply(self, pending_key: tuple[str, str]) -> bool:
        """Run one outcome's remaining steps. True when it is done with (applied, or moot: claim lost, too late)."""
        outcome = self._pending.pop(pending_key, None)  # popped while it runs: nobody else applies it meanwhile
        if outcome is None:
            return False
        if self._clock() > outcome.deadline:
            log.warning("gave up a deferred claim outcome; the claim lapses with its lease", extra={"key": outcome.key})
            return False
        try:
            while outcome.steps:
                await outcome.steps[0]()
                outcome.steps.popleft()
        except StoreUnavailable:
            self._keep(pending_key, outcome)  # still down: later
            return False
        except GatewayError:
            return False  # the claim is no longer ours: nothing left to do
        except Exception:
            log.exception("a deferred claim outcome failed; retrying later", extra={"key": outcome.key})
            self._keep(pending_key, outcome)
            return False
        except BaseException:  # cancelled (shutdown, or the presenting request went away): keep it for later
            self._keep(pending_key, outcome)
            raise
        log.info("applied a deferred claim outcome", extra={"key": outcome.key})
        return True

    def _keep(self, pending_key: tuple[str, str], outcome: _Outcome) -> None:
        newer = self._pending.get(pending_key)  # added while this one ran: it goes after what is left here
        if newer is not None:
            outcome.steps.extend(newer.steps)
        self._pending[pending_key] = outcome

    async def _run(self) -> None:
        delay = self._first_delay
        while self._pending:
            await asyncio.sleep(delay)
            progressed = False
            for pending_key in list(self._pending):
                progressed = await self._apply(pending_key) or progressed
            delay = self._first_delay if progressed else min(delay * 2, self._max_delay)

    async def aclose(self) -> None:
        """Stop retrying. What is still pending lapses with its lease, as it would have without this."""
        self._closed = True
        task, self._task = self._task, None
        await stop(task)
        self._pending.clear()


__all__ = ["DeferredOutcomes"]
