"""The Redis topologies of ``tests.support.redis_topology`` are what the store tests on them assume they are.

Checked with plain redis-py (its Sentinel and cluster clients), not the gateway's client: a Sentinel group whose
master is found through the sentinels and is replaced by its replica when killed, a restarted old master that
rejoins as a replica, a second replica that follows the new master, a cluster whose slots are spread over three
masters and that refuses a script across two slots, and the password variants of both, which refuse a client
without the password.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    ClusterCrossSlotError,
    ReadOnlyError,
    RedisClusterException,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.support.redis_topology import Address, ClusterGroup, SentinelGroup, start_cluster, start_sentinel_group

PASSWORD = "topology-pw"
TIMEOUT = 1.0  # seconds, to connect and to answer: every node is local
# Write both keys and read them back in one script: only possible when both live in one slot.
TWO_KEY_SCRIPT = (
    "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); "
    "return redis.call('MGET', KEYS[1], KEYS[2])"
)


@asynccontextmanager
async def direct(address: Address, password: str | None = None) -> AsyncIterator[Redis]:
    """A plain client on one node, bypassing the sentinels and the cluster's routing; no retries (redis-py counts
    a refused password as a connection error and would retry it with back-off for seconds)."""
    client = Redis(
        host=address[0], port=address[1], password=password, decode_responses=True, retry=Retry(NoBackoff(), 0),
        socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
    )  # fmt: skip
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def cluster_client(cluster: ClusterGroup, password: str | None = None) -> AsyncIterator[RedisCluster]:
    nodes = [ClusterNode(host, port) for host, port in cluster.nodes]
    client = RedisCluster(
        startup_nodes=nodes, password=password, decode_responses=True, socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
    )  # fmt: skip
    try:
        yield client
    finally:
        await client.aclose()


def sentinel_client(group: SentinelGroup, password: str | None = None) -> Redis:
    """``master_for`` as a long-lived store client uses it: one immediate retry, then the error (so a write loop
    sees the outage as it is, not hidden behind redis-py's default back-off)."""
    timeouts = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT}
    sentinels = Sentinel(group.sentinel_addresses, sentinel_kwargs={"password": password, **timeouts})
    client: Redis = sentinels.master_for(
        group.service, password=password, decode_responses=True, retry=Retry(NoBackoff(), 1),
        socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
    )  # fmt: skip
    return client


def other_data_node(group: SentinelGroup, address: Address) -> Address:
    (other,) = (node.address for node in group.data_nodes if node.address != address)
    return other


def owner(client: RedisCluster, key: str) -> Address:
    """The master that serves ``key``'s slot, as the cluster client routes it."""
    node = client.get_node_from_key(key)
    assert node is not None
    return (node.host, int(node.port))


async def first_write(client: Redis, key: str, timeout: float) -> float:
    """Write ``key`` until it succeeds: ``time.monotonic()`` at the first success."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.set(key, "1")
            return time.monotonic()
        except (RedisConnectionError, RedisTimeoutError, ReadOnlyError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------------- Sentinel


async def test_a_write_on_the_master_is_read_through_master_for(sentinel_group: SentinelGroup) -> None:
    group = sentinel_group
    master = group.master_address()
    async with direct(master) as node:
        await node.set("written-on-the-master", "1")
    client = sentinel_client(group)
    try:
        assert await client.get("written-on-the-master") == "1"
        assert (await client.info("server"))["tcp_port"] == master[1]
    finally:
        await client.aclose()
    hosts = ",".join(f"127.0.0.1:{port}" for _, port in group.sentinel_addresses)
    assert group.url == f"redis+sentinel://{hosts}/mymaster/0"


async def test_a_killed_master_is_replaced_by_its_replica_and_master_for_follows(
    sentinel_group: SentinelGroup, record_property: Callable[[str, object], None]
) -> None:
    group = sentinel_group
    client = sentinel_client(group)
    try:
        await client.set("acknowledged-before-the-crash", "1")
        assert await client.wait(1, 5000) == 1  # the replica holds it: the failover must keep it
        old = group.master_address()
        replica = other_data_node(group, old)

        killed_at = group.kill_master()
        # The sentinels' view and a client writing all along, side by side: each measured from the kill.
        failover = asyncio.create_task(asyncio.to_thread(lambda: (group.wait_for_failover(old), time.monotonic())))
        written_at = await first_write(client, "written-after-the-failover", timeout=30)
        new, agreed_at = await failover

        assert new == replica
        assert (await client.info("server"))["tcp_port"] == new[1]
        assert (await client.role())[0] == "master"
        assert await client.get("acknowledged-before-the-crash") == "1"
    finally:
        await client.aclose()
    promoted, writable = agreed_at - killed_at, written_at - killed_at
    record_property("failover_seconds", round(promoted, 2))
    record_property("first_write_seconds", round(writable, 2))
    print(
        f"\nfailover to {new}: sentinels agreed {promoted:.2f} s and master_for wrote {writable:.2f} s after the kill"
    )


async def test_a_restarted_old_master_rejoins_as_a_replica_of_the_new_one(sentinel_group: SentinelGroup) -> None:
    group = sentinel_group
    old = group.master_address()
    group.kill_master()
    new = await asyncio.to_thread(group.wait_for_failover, old)

    group.restart(old)
    await asyncio.to_thread(group.wait_for_replica, old)

    async with direct(new) as master, direct(old) as rejoined:
        await master.set("written-after-the-rejoin", "1")
        assert await master.wait(1, 5000) == 1
        role = await rejoined.role()
        assert (role[0], role[1], role[2]) == ("slave", new[0], new[1])
        assert await rejoined.get("written-after-the-rejoin") == "1"


async def test_with_two_replicas_the_new_master_still_has_a_replica_after_a_failover(tmp_path: Path) -> None:
    with start_sentinel_group(tmp_path, replicas=2) as group:
        old = group.master_address()
        group.kill_master()
        new = await asyncio.to_thread(group.wait_for_failover, old)
        async with direct(new) as master:
            await master.set("acknowledged-after-the-failover", "1")
            assert await master.wait(1, 10_000) == 1  # the other replica follows the new master


async def test_a_password_group_serves_its_password_and_refuses_clients_without_it(tmp_path: Path) -> None:
    with start_sentinel_group(tmp_path, password=PASSWORD) as group:
        hosts = ",".join(f"127.0.0.1:{port}" for _, port in group.sentinel_addresses)
        assert group.url == f"redis+sentinel://:{PASSWORD}@{hosts}/mymaster/0"
        client = sentinel_client(group, PASSWORD)
        try:
            await client.set("written-with-the-password", "1")
            assert await client.get("written-with-the-password") == "1"
        finally:
            await client.aclose()

        # Neither the sentinels nor the data nodes answer a client without the password.
        async with direct(group.sentinel_addresses[0]) as anonymous:
            with pytest.raises(AuthenticationError):
                await anonymous.sentinel_get_master_addr_by_name(group.service)
        with pytest.raises(MasterNotFoundError):
            await Sentinel(group.sentinel_addresses, sentinel_kwargs={"socket_timeout": TIMEOUT}).discover_master(
                group.service
            )
        async with direct(group.master_address()) as anonymous:
            with pytest.raises(AuthenticationError):
                await anonymous.ping()


# ----------------------------------------------------------------------------------------------------- Cluster


async def test_keys_in_three_slots_are_stored_on_three_different_masters(
    redis_cluster: ClusterGroup, cluster_url: str
) -> None:
    assert cluster_url == "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for _, port in redis_cluster.nodes) + "/"
    owners: dict[Address, str] = {}
    async with cluster_client(redis_cluster) as client:
        await client.initialize()
        for i in range(100):
            owners.setdefault(owner(client, f"key-{i}"), f"key-{i}")
        for key in owners.values():
            await client.set(key, "1")

    assert sorted(owners) == redis_cluster.masters()  # one key per master, and three masters
    for master, key in owners.items():
        async with direct(master) as plain:
            assert await plain.keys("*") == [key]


async def test_a_script_on_one_hash_tag_runs_and_one_across_two_slots_is_refused(
    redis_cluster: ClusterGroup, cluster_url: str
) -> None:
    async with cluster_client(redis_cluster) as client:
        assert await client.eval(TWO_KEY_SCRIPT, 2, "{t}:a", "{t}:b", "v") == ["v", "v"]

        here, there = "{t}:c", "{u}:d"
        assert key_slot(here.encode()) != key_slot(there.encode())
        with pytest.raises(RedisClusterException, match="same key slot"):  # redis-py refuses before sending
            await client.eval(TWO_KEY_SCRIPT, 2, here, there, "v")
        here_owner = owner(client, here)

    # The server refuses it too, without running any of it, even on the node that owns one of the keys.
    async with direct(here_owner) as node:
        with pytest.raises(ClusterCrossSlotError):  # the server's CROSSSLOT error
            await node.eval(TWO_KEY_SCRIPT, 2, here, there, "v")
        assert await node.exists(here) == 0


async def test_a_password_cluster_serves_its_password_and_refuses_clients_without_it(tmp_path: Path) -> None:
    # With a replica per master: replicas that sync only if the password is also the one they offer their master.
    with start_cluster(tmp_path, replicas_per_master=1, password=PASSWORD) as cluster:
        assert cluster.url.startswith(f"redis+cluster://:{PASSWORD}@127.0.0.1:")
        assert len(cluster.masters()) == 3 and len(cluster.nodes) == 6
        async with cluster_client(cluster, PASSWORD) as client:
            await client.set("written-with-the-password", "1")
            assert await client.get("written-with-the-password") == "1"

        with pytest.raises(RedisClusterException) as refused:
            async with cluster_client(cluster) as anonymous:
                await anonymous.set("written-without-it", "1")
        assert isinstance(refused.value.__cause__, AuthenticationError)
        async with direct(cluster.nodes[0]) as node:
            with pytest.raises(AuthenticationError):
                await node.ping()
