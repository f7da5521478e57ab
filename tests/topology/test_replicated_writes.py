"""``min_replicas_acked`` on a Redis Cluster with a replica per master: a payment's writes wait for the replica on
the connection that made them (the cluster client would send a key-less WAIT elsewhere), and once the replicas are
gone every money-critical write is refused and given back (docs/scaling.md)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import StoreReplicasBehind, StoreUnavailable
from gateway.storage import RedisReceiptStore
from gateway.storage.receipts import ClaimState, Effect
from tests.support.redis_topology import ClusterGroup, start_cluster, start_sentinel_group


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[ClusterGroup]:
    with start_cluster(tmp_path / "cluster", masters=3, replicas_per_master=1) as cluster:
        yield cluster


async def test_cluster_writes_wait_for_a_replica_and_are_refused_without_one(replicated_cluster: ClusterGroup) -> None:
    url = replicated_cluster.url
    strict = RedisReceiptStore(url + "?min_replicas_acked=1&replica_ack_timeout_ms=200")
    plain = RedisReceiptStore(url)
    try:
        # The first call on a fresh cluster also finds its script missing on the node (NOSCRIPT -> load, again).
        keys = [f"exact:{uuid.uuid4().hex}" for _ in range(6)]
        now = time.time()
        for n, key in enumerate(keys):
            await strict.claim(key, "a", now=now, lease=60, expires_at=now + 600)
            effect = Effect(f"tx:8453:0x{n:064x}:0", now + 600)
            await strict.mark_paid(key, "a", f"0x{n:064x}", now=now, lease=60, effects=(effect,))
            assert await strict.finish(key, "a", served=True, now=now, expires_at=now + 600)
            record = await plain.get(key, now=now)
            assert record is not None and record.state == ClaimState.CONSUMED
        assert strict.topology().replicas_acked == 1 and strict.topology().ack_shortfalls == 0

        masters = set(replicated_cluster.masters())
        for address in replicated_cluster.nodes:
            if address not in masters:
                replicated_cluster.node(address).kill()

        key = f"exact:{uuid.uuid4().hex}"
        with pytest.raises(StoreReplicasBehind):
            await strict.claim(key, "a", now=now, lease=60, expires_at=now + 600)
        assert await plain.get(key, now=now) is None  # given back
        assert strict.topology().replicas_acked == 0 and strict.topology().ack_shortfalls == 1
    finally:
        await strict.aclose()
        await plain.aclose()


async def test_a_password_protected_sentinel_group_is_reached_with_the_urls_credentials_only(tmp_path: Path) -> None:
    password = "s3cr/t@:pw"
    with start_sentinel_group(tmp_path / "sentinel", password=password) as group:
        store = RedisReceiptStore(group.url)  # redis+sentinel://:<quoted password>@s1,s2,s3/mymaster/0
        anonymous = RedisReceiptStore(group.url.replace(group.url.split("//")[1].split("@")[0] + "@", ""))
        try:
            now = time.time()
            record = await store.claim(f"exact:{uuid.uuid4().hex}", "a", now=now, lease=60, expires_at=None)
            assert record.owner == "a"
            assert store.topology().master == "{}:{}".format(*group.master_address())
            with pytest.raises(StoreUnavailable) as refused:
                await anonymous.claim(f"exact:{uuid.uuid4().hex}", "a", now=now, lease=60, expires_at=None)
            assert password not in str(refused.value) and password not in repr(store)
        finally:
            await store.aclose()
            await anonymous.aclose()
