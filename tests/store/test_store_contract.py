"""The receipt-store contract (gateway/storage/receipts/contract.py), run against SQLite and a real Redis.

docs/threat-model.md: T1 (same proof twice), T2 (concurrent race with one payment), T11 (charged for a failure:
resume an unserved payment without paying again), T12 (never broadcast twice), T17 (store outage: fail closed,
recover), T26 (one transfer pays once: the effect key taken with the payment).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

import pytest

from gateway.errors import PaymentInFlight, PaymentReplayed, StoreUnavailable
from gateway.storage import ClaimState, ReceiptStore
from gateway.storage.receipts import Effect
from tests.store.conftest import SERVER_BACKENDS

if TYPE_CHECKING:
    from tests.store.conftest import Backend

LEASE = 30.0
TX = "0x" + "ab" * 32
TX2 = "0x" + "cd" * 32


def new_key() -> str:
    return f"exact:8453:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913:0x{uuid.uuid4().hex:0>40}:0x{uuid.uuid4().hex}"


@pytest.fixture
def now() -> float:
    # Real epoch time: Redis garbage-collects by wall clock, so logical times must be near it.
    return time.time()


async def consume(store: ReceiptStore, key: str, now: float, owner: str = "a", expires_at: float | None = None) -> None:
    await store.claim(key, owner, now=now, lease=LEASE, expires_at=expires_at)
    await store.mark_paid(key, owner, TX, now=now, lease=LEASE)
    await store.finish(key, owner, served=True, now=now, expires_at=expires_at)


async def test_store_satisfies_the_protocol(store: ReceiptStore) -> None:
    assert isinstance(store, ReceiptStore)
    await store.ping()


async def test_first_claim_wins_and_second_is_in_flight(store: ReceiptStore, now: float) -> None:
    key = new_key()
    rec = await store.claim(key, "a", now=now, lease=LEASE, expires_at=now + 3600)
    assert rec.state is ClaimState.PENDING
    assert (rec.key, rec.owner, rec.tx_hash, rec.resumed) == (key, "a", None, False)
    assert rec.lease_until == now + LEASE
    assert rec.expires_at == now + 3600
    with pytest.raises(PaymentInFlight):
        await store.claim(key, "b", now=now + 1, lease=LEASE, expires_at=now + 3600)
    # Even the same owner cannot claim twice: owners may be shared by a process's concurrent requests.
    with pytest.raises(PaymentInFlight):
        await store.claim(key, "a", now=now + 1, lease=LEASE, expires_at=now + 3600)
    got = await store.get(key, now=now + 1)
    assert got is not None and got.owner == "a" and got.state is ClaimState.PENDING


async def test_consumed_payment_is_a_replay_forever(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await consume(store, key, now)
    for later in (now + 1, now + LEASE * 10, now + 10 * 365 * 86400):
        with pytest.raises(PaymentReplayed):
            await store.claim(key, "b", now=later, lease=LEASE, expires_at=None)
    rec = await store.get(key, now=now + 10 * 365 * 86400)
    assert rec is not None and rec.state is ClaimState.CONSUMED and rec.tx_hash == TX and rec.expires_at is None


async def test_released_claim_can_be_claimed_again(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await store.claim(key, "a", now=now, lease=LEASE, expires_at=None)
    await store.release(key, "a")
    assert await store.get(key, now=now) is None
    rec = await store.claim(key, "b", now=now + 1, lease=LEASE, expires_at=None)
    assert rec.state is ClaimState.PENDING and rec.owner == "b" and not rec.resumed


async def test_release_by_a_loser_or_after_payment_changes_nothing(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await store.claim(key, "a", now=now, lease=LEASE, expires_at=None)
    await store.release(key, "b")  # not the owner
    assert (await store.get(key, now=now)) is not None
    await store.mark_paid(key, "a", TX, now=now, lease=LEASE)
    await store.release(key, "a")  # the money moved: a PAID claim is never deleted
    rec = await store.get(key, now=now)
    assert rec is not None and rec.state is ClaimState.PAID


async def test_unserved_payment_resumes_without_paying_again(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await store.claim(key, "a", now=now, lease=LEASE, expires_at=None)
    await store.record_tx(key, "a", TX, now=now, lease=LEASE)
    await store.mark_paid(key, "a", None, now=now, lease=LEASE)  # None keeps the recorded hash
    await store.finish(key, "a", served=False, now=now, expires_at=None)  # upstream failed
    rec = await store.get(key, now=now)
    assert rec is not None and rec.state is ClaimState.UNSERVED
    # The lease of an unserved payment does not matter: the retry resumes at once, already PAID.
    resumed = await store.claim(key, "b", now=now + 1, lease=LEASE, expires_at=None)
    assert resumed.state is ClaimState.PAID and resumed.resumed and resumed.owner == "b" and resumed.tx_hash == TX
    with pytest.raises(PaymentInFlight):  # and only one retry at a time
        await store.claim(key, "c", now=now + 2, lease=LEASE, expires_at=None)
    await store.finish(key, "b", served=True, now=now + 2, expires_at=None)
    with pytest.raises(PaymentReplayed):
        await store.claim(key, "c", now=now + 3, lease=LEASE, expires_at=None)


@pytest.mark.parametrize("paid", [False, True], ids=["pending", "paid"])
async def test_lapsed_lease_is_taken_over_and_flagged_resumed(store: ReceiptStore, now: float, paid: bool) -> None:
    key = new_key()
    await store.claim(key, "dead", now=now, lease=LEASE, expires_at=None)
    await store.record_tx(key, "dead", TX, now=now, lease=LEASE)
    if paid:
        await store.mark_paid(key, "dead", None, now=now, lease=LEASE)
    with pytest.raises(PaymentInFlight):  # the lease is still live
        await store.claim(key, "b", now=now + LEASE - 1, lease=LEASE, expires_at=None)
    rec = await store.claim(key, "b", now=now + LEASE + 1, lease=LEASE, expires_at=None)
    # Same state, new owner, the hash kept so the new owner reconciles instead of broadcasting again.
    assert rec.state is (ClaimState.PAID if paid else ClaimState.PENDING)
    assert rec.owner == "b" and rec.resumed and rec.tx_hash == TX
    assert rec.lease_until == now + 2 * LEASE + 1
    with pytest.raises(PaymentInFlight):
        await store.claim(key, "c", now=now + LEASE + 2, lease=LEASE, expires_at=None)


async def test_record_tx_refused_after_losing_the_claim(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await store.claim(key, "slow", now=now, lease=LEASE, expires_at=None)
    await store.claim(key, "b", now=now + LEASE + 1, lease=LEASE, expires_at=None)  # took over
    # The slow gateway must not broadcast: its record_tx is refused and the hash is not written.
    with pytest.raises(PaymentInFlight):
        await store.record_tx(key, "slow", TX2, now=now + LEASE + 2, lease=LEASE)
    rec = await store.get(key, now=now + LEASE + 2)
    assert rec is not None and rec.owner == "b" and rec.tx_hash is None
    # Nor on a claim that is gone or already paid (a second broadcast for money already moved).
    with pytest.raises(PaymentInFlight):
        await store.record_tx(new_key(), "slow", TX2, now=now, lease=LEASE)
    await store.mark_paid(key, "b", TX, now=now + LEASE + 2, lease=LEASE)
    with pytest.raises(PaymentInFlight):
        await store.record_tx(key, "b", TX2, now=now + LEASE + 3, lease=LEASE)


async def test_record_tx_renews_the_lease(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await store.claim(key, "a", now=now, lease=LEASE, expires_at=None)
    await store.record_tx(key, "a", TX, now=now + LEASE - 1, lease=LEASE)
    with pytest.raises(PaymentInFlight):
        await store.claim(key, "b", now=now + LEASE + 1, lease=LEASE, expires_at=None)


async def test_mark_paid_refused_after_losing_the_claim(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await store.claim(key, "slow", now=now, lease=LEASE, expires_at=None)
    await store.claim(key, "b", now=now + LEASE + 1, lease=LEASE, expires_at=None)
    with pytest.raises(PaymentInFlight):
        await store.mark_paid(key, "slow", TX, now=now + LEASE + 2, lease=LEASE)
    with pytest.raises(PaymentInFlight):
        await store.mark_paid(new_key(), "a", TX, now=now, lease=LEASE)
    # Repeating mark_paid as the owner is harmless (a retried call cannot turn success into an error).
    await store.mark_paid(key, "b", TX, now=now + LEASE + 2, lease=LEASE)
    await store.mark_paid(key, "b", None, now=now + LEASE + 3, lease=LEASE)
    rec = await store.get(key, now=now + LEASE + 3)
    assert rec is not None and rec.state is ClaimState.PAID and rec.tx_hash == TX


async def test_finish_after_losing_the_claim_changes_nothing(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await store.claim(key, "slow", now=now, lease=LEASE, expires_at=None)
    await store.mark_paid(key, "slow", TX, now=now, lease=LEASE)
    await store.claim(key, "b", now=now + LEASE + 1, lease=LEASE, expires_at=None)
    await store.finish(key, "slow", served=True, now=now + LEASE + 2, expires_at=None)  # no error
    rec = await store.get(key, now=now + LEASE + 2)
    assert rec is not None and rec.state is ClaimState.PAID and rec.owner == "b"
    await store.finish(new_key(), "slow", served=False, now=now, expires_at=None)  # absent: no error either
    # finish needs PAID: a PENDING claim (money not seen to move) cannot be marked consumed.
    pending = new_key()
    await store.claim(pending, "a", now=now, lease=LEASE, expires_at=None)
    await store.finish(pending, "a", served=True, now=now, expires_at=None)
    rec = await store.get(pending, now=now)
    assert rec is not None and rec.state is ClaimState.PENDING


async def test_expired_record_behaves_as_absent(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await consume(store, key, now, expires_at=now + 60)
    with pytest.raises(PaymentReplayed):
        await store.claim(key, "b", now=now + 59, lease=LEASE, expires_at=now + 120)
    assert await store.get(key, now=now + 61) is None
    rec = await store.claim(key, "b", now=now + 61, lease=LEASE, expires_at=now + 120)
    assert rec.state is ClaimState.PENDING and not rec.resumed and rec.tx_hash is None
    assert rec.expires_at == now + 120


async def test_finish_sets_the_expiry(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await store.claim(key, "a", now=now, lease=LEASE, expires_at=now + 60)
    await store.mark_paid(key, "a", TX, now=now, lease=LEASE)
    await store.finish(key, "a", served=True, now=now, expires_at=None)  # keep for ever
    with pytest.raises(PaymentReplayed):
        await store.claim(key, "b", now=now + 10**6, lease=LEASE, expires_at=None)


async def test_live_claim_does_not_expire_under_its_lease(store: ReceiptStore, now: float) -> None:
    # An expiry shorter than the lease must not let a second request claim money that may be moving.
    key = new_key()
    await store.claim(key, "a", now=now, lease=LEASE, expires_at=now + 5)
    await store.record_tx(key, "a", TX, now=now + 1, lease=LEASE)
    with pytest.raises(PaymentInFlight):
        await store.claim(key, "b", now=now + 10, lease=LEASE, expires_at=now + 5)
    rec = await store.get(key, now=now + 10)
    assert rec is not None and rec.owner == "a" and rec.tx_hash == TX
    await store.mark_paid(key, "a", None, now=now + 10, lease=LEASE)
    # Once its lease lapses (the owner died) an expired claim is gone like any other expired record.
    assert await store.get(key, now=now + 10 + LEASE + 1) is None


async def test_takeover_never_shortens_the_expiry(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await store.claim(key, "a", now=now, lease=LEASE, expires_at=None)
    rec = await store.claim(key, "b", now=now + LEASE + 1, lease=LEASE, expires_at=now + 100)
    assert rec.resumed and rec.expires_at is None


async def test_keys_are_independent(store: ReceiptStore, now: float) -> None:
    a, b, c = new_key(), new_key(), new_key()
    await consume(store, a, now)
    await store.claim(b, "x", now=now, lease=LEASE, expires_at=None)
    rec = await store.claim(c, "y", now=now, lease=LEASE, expires_at=None)
    assert rec.state is ClaimState.PENDING
    await store.release(c, "y")
    with pytest.raises(PaymentReplayed):
        await store.claim(a, "z", now=now, lease=LEASE, expires_at=None)
    with pytest.raises(PaymentInFlight):
        await store.claim(b, "z", now=now, lease=LEASE, expires_at=None)
    # Keys differing only in the nonce are different payments.
    await store.claim(a + "0", "z", now=now, lease=LEASE, expires_at=None)


async def test_concurrent_claims_have_exactly_one_winner(backend: Backend, now: float) -> None:
    stores = [backend.make() for _ in range(10)]  # separate connections (SQLite: separate threads too)
    for s in stores:
        await s.ping()  # connect before the race, so the race is the claim itself
    key = new_key()
    go = asyncio.Event()

    async def attempt(i: int) -> str:
        await go.wait()
        try:
            await stores[i % len(stores)].claim(key, f"owner-{i}", now=now, lease=LEASE, expires_at=None)
        except PaymentInFlight:
            return "in_flight"
        return "won"

    tasks = [asyncio.create_task(attempt(i)) for i in range(50)]
    await asyncio.sleep(0)
    go.set()
    results = await asyncio.gather(*tasks)
    assert results.count("won") == 1
    assert results.count("in_flight") == 49
    rec = await stores[0].get(key, now=now)
    assert rec is not None and rec.state is ClaimState.PENDING


async def test_concurrent_resumes_of_an_unserved_payment_have_exactly_one_winner(backend: Backend, now: float) -> None:
    stores = [backend.make() for _ in range(5)]
    key = new_key()
    await stores[0].claim(key, "a", now=now, lease=LEASE, expires_at=None)
    await stores[0].mark_paid(key, "a", TX, now=now, lease=LEASE)
    await stores[0].finish(key, "a", served=False, now=now, expires_at=None)
    outcomes = await asyncio.gather(
        *(s.claim(key, f"o{i}", now=now + 1, lease=LEASE, expires_at=None) for i, s in enumerate(stores * 4)),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(winners) == 1 and winners[0].resumed and winners[0].state is ClaimState.PAID
    assert all(isinstance(o, PaymentInFlight) for o in outcomes if isinstance(o, BaseException))


def new_effect() -> str:
    return f"tx:8453:0x{uuid.uuid4().hex}{uuid.uuid4().hex}:3"


async def test_the_effect_is_taken_with_the_payment_and_refuses_a_second_presentation(
    store: ReceiptStore, now: float
) -> None:
    key, effect = new_key(), new_effect()
    await store.claim(key, "a", now=now, lease=LEASE, expires_at=now + 3600)
    await store.mark_paid(key, "a", TX, now=now, lease=LEASE, effects=(Effect(effect, now + 7200),))
    await store.mark_paid(key, "a", TX, now=now, lease=LEASE, effects=(Effect(effect, now + 7200),))  # idempotent
    held = await store.get(effect, now=now)
    assert held is not None and held.state is ClaimState.CONSUMED and held.expires_at == now + 7200
    with pytest.raises(PaymentReplayed):  # the same transfer presented by its hash
        await store.claim(effect, "b", now=now, lease=LEASE, expires_at=None)


@pytest.mark.parametrize("holder", ["tx-hash proof", "earlier claim of the same payment"])
async def test_a_payment_whose_transfer_already_paid_is_consumed_not_paid(
    store: ReceiptStore, now: float, holder: str
) -> None:
    key, effect = new_key(), new_effect()
    if holder == "tx-hash proof":
        await store.claim(effect, "proof", now=now, lease=LEASE, expires_at=None)
    else:  # the record of the first claim is gone (expired or lost); the effect it took is not
        await store.claim(key, "first", now=now, lease=LEASE, expires_at=now + 3600)
        await store.mark_paid(key, "first", TX, now=now, lease=LEASE, effects=(Effect(effect, None),))
        await store.finish(key, "first", served=True, now=now, expires_at=now - 1)
    await store.claim(key, "again", now=now, lease=LEASE, expires_at=now + 3600)
    with pytest.raises(PaymentReplayed):
        await store.mark_paid(key, "again", TX, now=now, lease=LEASE, effects=(Effect(effect, None),))
    rec = await store.get(key, now=now)
    assert rec is not None and rec.state is ClaimState.CONSUMED
    with pytest.raises(PaymentReplayed):
        await store.claim(key, "third", now=now, lease=LEASE, expires_at=now + 3600)


async def test_several_effects_are_taken_all_or_none(store: ReceiptStore, now: float) -> None:
    """A payment that spent several things on chain (its transfer, its transaction slot) takes them in one step:
    when one is already held, the payment is consumed and none of the others is taken, so they stay free for
    whatever they really pay."""
    held, free_one, free_two = new_effect(), new_effect(), new_effect()
    await store.claim(held, "proof", now=now, lease=LEASE, expires_at=None)
    key = new_key()
    await store.claim(key, "a", now=now, lease=LEASE, expires_at=now + 3600)
    effects = (Effect(free_one, now + 600), Effect(held, now + 600), Effect(free_two, now + 600))
    with pytest.raises(PaymentReplayed):
        await store.mark_paid(key, "a", TX, now=now, lease=LEASE, effects=effects)
    assert await store.get(free_one, now=now) is None and await store.get(free_two, now=now) is None
    rec = await store.get(key, now=now)
    assert rec is not None and rec.state is ClaimState.CONSUMED

    other = new_key()
    await store.claim(other, "b", now=now, lease=LEASE, expires_at=now + 3600)
    both = (Effect(free_one, now + 600), Effect(free_two, now + 900))
    await store.mark_paid(other, "b", TX, now=now, lease=LEASE, effects=both)
    await store.mark_paid(other, "b", TX, now=now, lease=LEASE, effects=both)  # idempotent
    for effect in both:
        taken = await store.get(effect.key, now=now)
        assert taken is not None and taken.state is ClaimState.CONSUMED and taken.expires_at == effect.expires_at
    third = new_key()
    await store.claim(third, "c", now=now, lease=LEASE, expires_at=now + 3600)
    with pytest.raises(PaymentReplayed):  # either one, alone, is already spent
        await store.mark_paid(third, "c", TX, now=now, lease=LEASE, effects=(Effect(free_two, None),))


async def test_a_payment_and_a_proof_of_its_transfer_racing_have_one_winner(backend: Backend, now: float) -> None:
    stores = [backend.make() for _ in range(6)]
    for s in stores:
        await s.ping()
    go = asyncio.Event()
    outcomes: list[str] = []

    async def by_authorization(i: int, store: ReceiptStore, effect: str) -> None:
        key = new_key()
        await store.claim(key, "x", now=now, lease=LEASE, expires_at=now + 3600)
        await go.wait()
        try:
            await store.mark_paid(key, "x", TX, now=now, lease=LEASE, effects=(Effect(effect, None),))
            outcomes.append(f"{effect}:paid")
        except PaymentReplayed:
            outcomes.append(f"{effect}:replayed")

    async def by_hash(store: ReceiptStore, effect: str) -> None:
        await go.wait()
        try:
            await store.claim(effect, "proof", now=now, lease=LEASE, expires_at=None)
            outcomes.append(f"{effect}:paid")
        except (PaymentReplayed, PaymentInFlight):
            outcomes.append(f"{effect}:replayed")

    effects = [new_effect() for _ in range(20)]
    tasks = []
    for i, effect in enumerate(effects):
        tasks.append(asyncio.create_task(by_authorization(i, stores[i % 6], effect)))
        tasks.append(asyncio.create_task(by_hash(stores[(i + 3) % 6], effect)))
    await asyncio.sleep(0.2)
    go.set()
    await asyncio.gather(*tasks)
    for effect in effects:
        assert sorted(o.rsplit(":", 1)[1] for o in outcomes if o.startswith(effect + ":")) == ["paid", "replayed"]


async def test_a_live_claim_is_taken_over_only_from_the_holder_named(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await store.claim(key, "dead.1", now=now, lease=LEASE, expires_at=None)
    await store.record_tx(key, "dead.1", TX, now=now, lease=LEASE)
    with pytest.raises(PaymentInFlight) as refused:
        await store.claim(key, "b", now=now + 1, lease=LEASE, expires_at=None)
    assert refused.value.holder == "dead.1"
    with pytest.raises(PaymentInFlight):  # naming anyone else changes nothing
        await store.claim(key, "b", now=now + 1, lease=LEASE, expires_at=None, take_over_from="other.1")
    rec = await store.claim(key, "b", now=now + 1, lease=LEASE, expires_at=None, take_over_from="dead.1")
    assert rec.resumed and rec.owner == "b" and rec.tx_hash == TX and rec.state is ClaimState.PENDING
    with pytest.raises(PaymentInFlight):  # the old owner can no longer act on it
        await store.mark_paid(key, "dead.1", TX, now=now + 2, lease=LEASE)


async def test_a_lapsed_claim_is_taken_over_at_once_by_the_next_presentation(store: ReceiptStore, now: float) -> None:
    key = new_key()
    await store.claim(key, "a", now=now, lease=LEASE, expires_at=None)
    await store.record_tx(key, "a", TX, now=now, lease=LEASE)
    await store.lapse(key, "someone else", now=now)  # only the owner can end its lease
    with pytest.raises(PaymentInFlight):
        await store.claim(key, "b", now=now + 1, lease=LEASE, expires_at=None)
    await store.lapse(key, "a", now=now + 1)
    rec = await store.claim(key, "b", now=now + 2, lease=LEASE, expires_at=None)
    assert rec.resumed and rec.owner == "b" and rec.tx_hash == TX


async def test_an_instance_is_alive_until_its_heartbeat_lapses(store: ReceiptStore) -> None:
    instance = uuid.uuid4().hex
    assert not await store.alive(instance, now=time.time())
    await store.heartbeat(instance, now=time.time(), ttl=0.5)
    assert await store.alive(instance, now=time.time())
    await asyncio.sleep(0.7)
    assert not await store.alive(instance, now=time.time())


@pytest.mark.parametrize("backend", SERVER_BACKENDS, indirect=True)
async def test_claims_survive_restart(backend: Backend, store: ReceiptStore, now: float) -> None:
    consumed, pending, unserved = new_key(), new_key(), new_key()
    await consume(store, consumed, now)
    await store.claim(pending, "a", now=now, lease=LEASE, expires_at=None)
    await store.record_tx(pending, "a", TX, now=now, lease=LEASE)
    await store.claim(unserved, "a", now=now, lease=LEASE, expires_at=None)
    await store.mark_paid(unserved, "a", TX2, now=now, lease=LEASE)
    await store.finish(unserved, "a", served=False, now=now, expires_at=None)

    await store.aclose()
    backend.restart()
    after = backend.make()

    with pytest.raises(PaymentReplayed):
        await after.claim(consumed, "b", now=now + 1, lease=LEASE, expires_at=None)
    with pytest.raises(PaymentInFlight):
        await after.claim(pending, "b", now=now + 1, lease=LEASE, expires_at=None)
    rec = await after.claim(pending, "b", now=now + LEASE + 1, lease=LEASE, expires_at=None)
    assert rec.resumed and rec.tx_hash == TX  # reconcile by hash, never broadcast twice
    rec = await after.claim(unserved, "b", now=now + 1, lease=LEASE, expires_at=None)
    assert rec.resumed and rec.state is ClaimState.PAID and rec.tx_hash == TX2


async def test_closed_store_fails_closed(store: ReceiptStore, now: float) -> None:
    await store.aclose()
    with pytest.raises(StoreUnavailable):
        await store.claim(new_key(), "a", now=now, lease=LEASE, expires_at=None)
    await store.aclose()  # idempotent
