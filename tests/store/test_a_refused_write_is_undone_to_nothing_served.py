"""Replicated money-critical writes (``min_replicas_acked``, docs/scaling.md) that fail are undone to "nothing
served", and only their own: proved on one real Redis server without a replica, where every ``WAIT 1`` answers 0 so
each replicated write meets the shortfall; and URLs whose query must not be lost.

Each test states a property the money invariant needs ("a served request is paid exactly once; nothing served for
free; nothing charged unserved; a fault of ours is a 5xx, not a 402").
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from gateway.config import parse_config
from gateway.engine.claim import Claims, PaidRequest
from gateway.engine.deferred import DeferredOutcomes
from gateway.errors import ConfigError, PaymentInFlight, StoreReplicasBehind, StoreUnavailable
from gateway.storage import RedisReceiptStore
from gateway.storage.backend import open_backend
from gateway.storage.receipts import ClaimState
from tests.unit.test_config import ENV, minimal

LEASE = 60.0
TX = "0x" + "ab" * 32
ACKS = "?min_replicas_acked=1&replica_ack_timeout_ms=50"


@pytest.fixture
async def stores(redis_url: str) -> AsyncIterator[tuple[RedisReceiptStore, RedisReceiptStore]]:
    """The same server twice: ``plain`` waits for no replica (it shows what the master kept), ``strict`` for one."""
    plain, strict = RedisReceiptStore(redis_url), RedisReceiptStore(redis_url + ACKS)
    yield plain, strict
    await plain.aclose()
    await strict.aclose()


@pytest.fixture
async def deferred() -> AsyncIterator[DeferredOutcomes]:
    outcomes = DeferredOutcomes()
    yield outcomes
    await outcomes.aclose()


async def _paid(store: RedisReceiptStore, key: str, owner: str, now: float) -> None:
    """A payment claimed by ``owner`` whose money moved (PAID), as the engine leaves it before the app answers."""
    await store.claim(key, owner, now=now, lease=LEASE, expires_at=now + 600)
    await store.mark_paid(key, owner, TX, now=now, lease=LEASE)


async def test_a_delivered_payment_whose_consumed_write_fell_short_is_never_usable_again(
    stores: tuple[RedisReceiptStore, RedisReceiptStore], deferred: DeferredOutcomes
) -> None:
    """The app acted on the payment (an ``on_paid`` hook created and launched a job bound to the payer), then the
    consumed write met a replica shortfall. ``PaidRequest.finish`` says such a payment is consumed even when its
    finish fails; the shortfall's undo (``_UNCONSUME``) makes it paid-but-unserved instead, so its retry is served
    again: one payment, two jobs."""
    plain, strict = stores
    claims = Claims(store=strict, lease=LEASE, deferred=deferred)
    key, owner, now = f"exact:{uuid.uuid4().hex}", claims.new_owner(), time.time()
    await _paid(plain, key, owner, now)
    paid: PaidRequest[Any] = PaidRequest(claims, cast(Any, None), cast(Any, None), key, owner, now + 600)
    paid.paid, paid.tx_hash = True, TX
    paid.delivered = True  # the middleware sets this once the on_paid hooks ran
    with pytest.raises(StoreReplicasBehind):
        await paid.finish(served=True)
    await deferred.flush(key)  # what the request left to apply once the store answers
    record = await plain.get(key, now=time.time())
    assert record is not None
    assert record.state == ClaimState.CONSUMED, "a payment the app acted on became usable for a second request"


async def test_a_replica_wait_longer_than_the_socket_timeout_is_refused_or_still_undoes_the_consumed_write(
    redis_url: str,
) -> None:
    """``replica_ack_timeout_ms`` is accepted without a bound by ``[store]`` (and up to 60 s in the URL) but the
    stores' socket timeout is 2 s: a WAIT that waits longer ends in a socket timeout, not a shortfall, so the
    consumed write is never undone. The request is refused (503) and the payment is consumed: charged unserved, and
    its retry is told ``payment_already_used`` (402). Either such a setting is refused at load, or the refused write
    is undone."""
    try:
        config = parse_config(
            minimal(store={"url": redis_url, "min_replicas_acked": 1, "replica_ack_timeout_ms": 3000}), env=ENV
        )
        strict = RedisReceiptStore(config.store.url.reveal())
    except (ConfigError, StoreUnavailable):
        return  # refused at load: no request can meet it
    plain = RedisReceiptStore(redis_url)
    try:
        key, now = f"exact:{uuid.uuid4().hex}", time.time()
        await _paid(plain, key, "a", now)
        with pytest.raises(StoreUnavailable):  # refused either way: nothing is served
            await strict.finish(key, "a", served=True, now=now + 1, expires_at=now + 600)
        record = await plain.get(key, now=now + 1)
        assert record is not None
        assert record.state == ClaimState.UNSERVED, "a refused request's payment was left consumed"
    finally:
        await plain.aclose()
        await strict.aclose()


async def test_a_retry_after_a_resumed_claim_fell_short_is_served_at_once(
    stores: tuple[RedisReceiptStore, RedisReceiptStore], deferred: DeferredOutcomes
) -> None:
    """A paid-but-unserved payment is presented again; its claim (UNSERVED -> PAID, resumed) meets a shortfall and
    the request gets 503. ``_GIVE_BACK`` only deletes a fresh PENDING claim, so the record stays PAID under the
    refused request's owner with a live lease: every retry of a payment the client already paid for is 409
    ``payment_in_flight`` for a whole lease (120 s by default) instead of being served."""
    plain, strict = stores
    instance = uuid.uuid4().hex
    refusing = Claims(store=strict, lease=LEASE, deferred=deferred, instance=instance)
    retrying = Claims(store=plain, lease=LEASE, deferred=deferred, instance=instance)  # the same process
    key, now = f"exact:{uuid.uuid4().hex}", time.time()
    await _paid(plain, key, "earlier", now)
    assert await plain.finish(key, "earlier", served=False, now=now, expires_at=now + 600)  # upstream failed
    with pytest.raises(StoreReplicasBehind):
        await refusing.claim(key, refusing.new_owner(), now=time.time(), expires_at=now + 600)
    try:
        record = await retrying.claim(key, retrying.new_owner(), now=time.time(), expires_at=now + 600)
    except PaymentInFlight:
        pytest.fail("the paid client's retry is 'in flight' for a whole lease after a refused resumption")
    assert record.state == ClaimState.PAID and record.resumed


def test_a_malformed_sentinel_url_never_shows_a_password_with_slashes() -> None:
    """A raw ``/`` in a password (common in base64 passwords) splits the URL early; ``redact_url`` masks it, but
    ``parse_redis_url``'s message quotes the piece it could not read, which is the password's tail."""
    secret_tail = "T0pS3cretTail"
    url = f"redis+sentinel://:k9/Zq/{secret_tail}@10.0.0.1:26379,10.0.0.2:26379/mymaster/0"
    with pytest.raises(ConfigError) as refused:
        open_backend(url)
    assert secret_tail not in str(refused.value), str(refused.value)


def _without_path(url: str) -> str:
    """``redis://host:port/0`` -> ``redis://host:port``: the form managed services and most examples print."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.partition('/')[0]}"


async def test_replica_acknowledgements_asked_for_on_a_url_without_a_path_are_honoured(redis_url: str) -> None:
    """``[store] url = "redis://host:6379"`` with ``min_replicas_acked = 1``: the config appends the query to a URL
    without a path, and ``parse_redis_url`` reads the query only after a ``/`` (it takes ``host:6379?min_...`` for
    the netloc). The gateway starts, says nothing, and waits for no replica: a failover can lose a claim or a
    consumed record, which the operator turned the setting on to prevent (a tx-hash proof served twice)."""
    config = parse_config(minimal(store={"url": _without_path(redis_url), "min_replicas_acked": 1}), env=ENV)
    store = RedisReceiptStore(config.store.url.reveal())
    try:
        assert store.topology().min_replicas_acked == 1, "the URL asks for min_replicas_acked=1; the store read 0"
        now = time.time()
        with pytest.raises(StoreReplicasBehind):  # this server has no replica: the write must be refused
            await store.claim(f"exact:{uuid.uuid4().hex}", "a", now=now, lease=LEASE, expires_at=now + 600)
    finally:
        await store.aclose()


async def test_a_database_named_in_the_query_of_a_url_without_a_path_is_the_one_used(redis_url: str) -> None:
    """``redis://host:6379?db=3`` is database 3 for redis-py (and was for this gateway before the topology change,
    which gave the URL to redis-py as it was). ``parse_redis_url`` now drops the query of a URL without a path from
    ``client_url``: after an upgrade the stores open database 0, every receipt of database 3 is out of sight, and a
    consumed payment is claimable again."""
    in_query = RedisReceiptStore(_without_path(redis_url) + "?db=3")
    in_path = RedisReceiptStore(_without_path(redis_url) + "/3")
    try:
        key, now = f"tx:8453:0x{uuid.uuid4().hex}:0", time.time()
        await in_path.claim(key, "earlier", now=now, lease=LEASE, expires_at=None)
        await in_path.mark_paid(key, "earlier", None, now=now, lease=LEASE)
        assert await in_path.finish(key, "earlier", served=True, now=now, expires_at=None)  # served, for ever
        record = await in_query.get(key, now=now)
        assert record is not None and record.state == ClaimState.CONSUMED, "database 3's receipts are out of sight"
    finally:
        await in_query.aclose()
        await in_path.aclose()
