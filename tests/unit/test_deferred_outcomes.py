"""gateway/engine/deferred.py: claim outcomes a store outage interrupted are applied once the store answers, in order,
in the background or at once on a new presentation; never after the claim's lease, never past a lost claim.
(End to end with a real Redis stopped mid-request: tests/e2e/test_store_outage.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.engine.deferred import DeferredOutcomes, Step
from gateway.errors import PaymentInFlight, StoreUnavailable


class FlakyStore:
    """Stands for the store's answer: unavailable until ``up``; records the operations that went through."""

    def __init__(self) -> None:
        self.up = False
        self.applied: list[str] = []

    def step(self, name: str) -> Step:
        async def run() -> None:
            if not self.up:
                raise StoreUnavailable("down")
            self.applied.append(name)

        return run


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


async def test_an_outcome_is_applied_in_the_background_in_order_once_the_store_answers() -> None:
    store = FlakyStore()
    deferred = DeferredOutcomes(first_delay=0.01, max_delay=0.05)
    deferred.add("k", "owner", [store.step("mark_paid"), store.step("unserved")], within=60)
    await asyncio.sleep(0.1)
    assert store.applied == [] and len(deferred) == 1
    store.up = True
    await until(lambda: len(deferred) == 0)
    assert store.applied == ["mark_paid", "unserved"]
    await deferred.aclose()


async def test_a_new_presentation_applies_the_outcome_at_once_and_only_for_its_own_payment() -> None:
    store = FlakyStore()
    deferred = DeferredOutcomes(first_delay=60, max_delay=60)  # the background task would not run in this test
    deferred.add("k", "owner", [store.step("release k")], within=60)
    deferred.add("other", "owner", [store.step("release other")], within=60)
    assert await deferred.flush("k") is False  # still down: kept
    store.up = True
    assert await deferred.flush("k") is True
    assert store.applied == ["release k"] and len(deferred) == 1
    assert await deferred.flush("k") is False  # nothing left for it
    await deferred.aclose()


async def test_a_later_outcome_of_the_same_request_goes_after_the_earlier_one() -> None:
    store = FlakyStore()
    deferred = DeferredOutcomes(first_delay=60, max_delay=60)
    deferred.add("k", "owner", [store.step("mark_paid"), store.step("unserved")], within=60)
    deferred.add("k", "owner", [store.step("release")], within=60)
    store.up = True
    assert await deferred.flush("k") is True
    assert store.applied == ["mark_paid", "unserved", "release"]
    await deferred.aclose()


async def test_a_claim_no_longer_ours_ends_the_outcome_without_its_remaining_steps() -> None:
    store = FlakyStore()
    store.up = True

    async def lost() -> None:
        raise PaymentInFlight("another request holds it now")

    deferred = DeferredOutcomes(first_delay=60, max_delay=60)
    deferred.add("k", "owner", [lost, store.step("unserved")], within=60)
    assert await deferred.flush("k") is False
    assert store.applied == [] and len(deferred) == 0
    await deferred.aclose()


async def test_nothing_is_applied_after_the_claims_lease_has_lapsed() -> None:
    store = FlakyStore()
    now = [0.0]
    deferred = DeferredOutcomes(first_delay=60, max_delay=60, clock=lambda: now[0])
    deferred.add("k", "owner", [store.step("release")], within=150)
    now[0] = 151.0
    store.up = True
    assert await deferred.flush("k") is False
    assert store.applied == [] and len(deferred) == 0
    await deferred.aclose()


async def test_closing_stops_the_retries() -> None:
    store = FlakyStore()
    deferred = DeferredOutcomes(first_delay=0.01, max_delay=0.01)
    deferred.add("k", "owner", [store.step("release")], within=60)
    await deferred.aclose()
    store.up = True
    await asyncio.sleep(0.05)
    assert store.applied == [] and len(deferred) == 0
    deferred.add("k", "owner", [store.step("release")], within=60)
    assert len(deferred) == 0


async def test_an_unexpected_error_keeps_the_outcome_for_later_and_never_reaches_the_presenting_request() -> None:
    store = FlakyStore()
    store.up = True
    failures = [RuntimeError("a library bug")]

    async def fragile() -> None:
        if failures:
            raise failures.pop()
        store.applied.append("release")

    deferred = DeferredOutcomes(first_delay=60, max_delay=60)
    deferred.add("k", "owner", [fragile], within=60)
    assert await deferred.flush("k") is False  # no exception escapes to the request that presented the payment
    assert len(deferred) == 1
    assert await deferred.flush("k") is True
    assert store.applied == ["release"]
    await deferred.aclose()
