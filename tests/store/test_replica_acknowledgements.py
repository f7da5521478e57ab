"""``min_replicas_acked``: a money-critical write that too few replicas acknowledged is refused, and what the master
kept of it is undone so that it matches what happened — nothing served (docs/scaling.md).

The session's Redis has no replica, so every WAIT answers 0: a store asking for one acknowledgement meets the
shortfall on every replicated write, while a store on the same server asking for none shows what the master kept.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.errors import StoreReplicasBehind, StoreUnavailable
from gateway.storage import RedisReceiptStore
from gateway.storage.channels.redis import RedisChannelStore
from gateway.storage.receipts import ClaimState
from tests.store.test_channel_store_contract import begin, new_channel

ACKS = "?min_replicas_acked=1&replica_ack_timeout_ms=50"


@pytest.fixture
async def receipts(redis_url: str) -> AsyncIterator[tuple[RedisReceiptStore, RedisReceiptStore]]:
    plain, strict = RedisReceiptStore(redis_url), RedisReceiptStore(redis_url + ACKS)
    yield plain, strict
    await plain.aclose()
    await strict.aclose()


async def test_a_claim_no_replica_acknowledged_is_refused_and_given_back(
    receipts: tuple[RedisReceiptStore, RedisReceiptStore],
) -> None:
    plain, strict = receipts
    key, now = f"exact:{uuid.uuid4().hex}", time.time()
    with pytest.raises(StoreReplicasBehind) as caught:
        await strict.claim(key, "a", now=now, lease=60, expires_at=now + 600)
    assert isinstance(caught.value, StoreUnavailable) and caught.value.status == 503
    assert caught.value.reason == "store_replicas_behind"
    assert await plain.get(key, now=now) is None  # given back: the next presentation is not "in flight"
    assert (await plain.claim(key, "b", now=now, lease=60, expires_at=now + 600)).owner == "b"
    topology = strict.topology()
    assert (topology.kind, topology.min_replicas_acked, topology.replicas_acked) == ("server", 1, 0)
    assert topology.ack_shortfalls == 1


async def test_a_consumed_write_no_replica_acknowledged_leaves_the_payment_paid_but_unserved(
    receipts: tuple[RedisReceiptStore, RedisReceiptStore],
) -> None:
    plain, strict = receipts
    key, now = f"exact:{uuid.uuid4().hex}", time.time()
    await plain.claim(key, "a", now=now, lease=60, expires_at=now + 600)
    await plain.mark_paid(key, "a", "0x" + "ab" * 32, now=now, lease=60)
    with pytest.raises(StoreReplicasBehind):
        await strict.finish(key, "a", served=True, now=now + 1, expires_at=now + 600)
    record = await plain.get(key, now=now + 1)
    assert record is not None and record.state == ClaimState.UNSERVED  # a retry is served, never charged again
    # a write that needs no acknowledgement is not held back
    assert await strict.finish(key, "x", served=False, now=now + 2, expires_at=now + 600) is False


async def test_a_payment_the_replicas_acknowledged_is_never_undone(
    receipts: tuple[RedisReceiptStore, RedisReceiptStore],
) -> None:
    plain, _ = receipts
    key, now = f"exact:{uuid.uuid4().hex}", time.time()
    await plain.claim(key, "a", now=now, lease=60, expires_at=now + 600)
    await plain.mark_paid(key, "a", None, now=now, lease=60)
    assert await plain.finish(key, "a", served=True, now=now + 1, expires_at=now + 600)
    record = await plain.get(key, now=now + 1)
    assert record is not None and record.state == ClaimState.CONSUMED


async def test_a_channel_lock_no_replica_acknowledged_is_released(redis_url: str) -> None:
    plain, strict = RedisChannelStore(redis_url), RedisChannelStore(redis_url + ACKS)
    try:
        now = time.time()
        ch = await plain.open(new_channel(), now=now)
        with pytest.raises(StoreReplicasBehind):
            await begin(strict, ch, "a", now)
        stored = await plain.get(ch.channel_id)
        assert stored is not None and not stored.holder and stored.charged == 0
        assert (await begin(plain, ch, "b", now + 1)).holder == "b"  # not busy: the refused lock is gone
    finally:
        await plain.aclose()
        await strict.aclose()
