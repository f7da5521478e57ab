"""Replicated money-critical writes (``min_replicas_acked``, docs/scaling.md) over real Redis topologies: a write
whose connection drops while it waits for its replica is answered as written once (never "taken over" by itself),
and a cluster's replicated writes follow a failover to the slot's new master."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from gateway.errors import StoreUnavailable
from gateway.storage import RedisReceiptStore
from gateway.storage.receipts import ClaimState
from gateway.storage.receipts.redis import CLUSTER_PREFIX
from tests.support.redis_topology import Address, ClusterGroup, RedisProcess, start_cluster, start_sentinel_group

ATTEMPTS = 3  # a client that follows the slot map may fail once on the stale route, never every time


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[ClusterGroup]:
    with start_cluster(tmp_path / "cluster", masters=3, replicas_per_master=1) as cluster:
        yield cluster


def _owner_and_replica(cluster: ClusterGroup, slot: int) -> tuple[Address, Address]:
    """The master serving ``slot`` and its replica (``CLUSTER NODES``: id, address, flags, master id, ..., slots)."""
    listing = str(cluster.node(cluster.masters()[0]).call("CLUSTER", "NODES"))
    rows = [line.split() for line in listing.splitlines() if line.strip()]

    def address(row: list[str]) -> Address:
        host, _, port = row[1].partition("@")[0].rpartition(":")
        return host, int(port)

    def serves(row: list[str]) -> bool:
        for part in row[8:]:
            low, _, high = part.partition("-")
            if low.isdigit() and int(low) <= slot <= int(high or low):
                return True
        return False

    owner = next(row for row in rows if "master" in row[2] and serves(row))
    replica = next(row for row in rows if "slave" in row[2] and row[3] == owner[0])
    return address(owner), address(replica)


def _manual_failover(cluster: ClusterGroup, old: Address, new: Address, timeout: float = 30.0) -> None:
    """``CLUSTER FAILOVER`` on the replica: it becomes the slot's master and the old master its replica, in sync
    (so a ``WAIT 1`` on the new master is answered), with no data lost and no process killed."""
    cluster.node(new).call("CLUSTER", "FAILOVER")
    deadline = time.monotonic() + timeout
    while True:
        promoted = cluster.node(new).info("replication").get("role") == "master"
        demoted = cluster.node(old).info("replication")
        if promoted and demoted.get("role") == "slave" and demoted.get("master_link_status") == "up":
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the manual failover {old} -> {new} did not complete")
        time.sleep(0.1)


async def test_replicated_writes_follow_a_cluster_failover(replicated_cluster: ClusterGroup) -> None:
    """After the receipts' slot moves to another master (here a manual ``CLUSTER FAILOVER``, as a cluster does for a
    dead master), the replicated path (``_cluster_script_and_wait``) keeps sending EVALSHA to the old node: it
    refreshes the slot map only when ``str(MovedError)`` starts with "MOVED", and redis-py strips that code from the
    message ("7020 127.0.0.1:port"); a dead node's ``ConnectionError`` refreshes nothing either. Every payment is
    503 until some unrelated, non-replicated command on the same client happens to meet the MOVED."""
    url = replicated_cluster.url + "?min_replicas_acked=1&replica_ack_timeout_ms=1000"
    store = RedisReceiptStore(url)
    try:
        now = time.time()
        await store.claim(f"exact:{uuid.uuid4().hex}", "a", now=now, lease=60, expires_at=now + 600)  # map learned
        slot = key_slot(CLUSTER_PREFIX.encode())
        old, new = _owner_and_replica(replicated_cluster, slot)
        _manual_failover(replicated_cluster, old, new)

        errors: list[str] = []
        for _ in range(ATTEMPTS):
            now = time.time()
            try:
                await store.claim(f"exact:{uuid.uuid4().hex}", "a", now=now, lease=60, expires_at=now + 600)
            except StoreUnavailable as exc:
                errors.append(str(exc))
                continue
            break
        assert len(errors) < ATTEMPTS, f"every replicated write after the failover failed: {errors}"
    finally:
        await store.aclose()


async def _waiting_clients(master: Redis) -> set[str]:
    """The ids of the master's clients blocked in ``WAIT`` now."""
    return {str(row["id"]) for row in await master.client_list() if row.get("cmd") == "wait"}


async def _until_waiting(master: Redis, besides: set[str], deadline: float) -> str:
    while True:
        waiting = await _waiting_clients(master) - besides
        if waiting:
            return waiting.pop()
        if time.monotonic() > deadline:
            raise AssertionError("no client reached WAIT on the master")
        await asyncio.sleep(0.01)


async def test_a_consumed_write_whose_wait_lost_its_connection_never_leaves_the_payment_consumed_and_refused(
    tmp_path: Path,
) -> None:
    """A served request's consumed write is on the master; its connection dies while ``WAIT`` waits (a proxy's idle
    cut, ``CLIENT KILL``, a network blip). redis-py's pipeline retries once on a connection error and sends the
    whole pipeline again: ``_FINISH`` runs a second time, finds its own CONSUMED record and answers 'lost', the
    replica acknowledges, and ``finish`` reports the claim taken over. The middleware refuses the request (409)
    while its payment stays consumed: charged unserved, and the retry is told ``payment_already_used`` (402)."""
    with start_sentinel_group(tmp_path / "sentinel") as group:
        master_node = group.node(group.master_address())
        replica: RedisProcess = next(n for n in group.data_nodes if n is not master_node)
        replica_pid = int(replica.info("server")["process_id"])
        plain = RedisReceiptStore(group.url)
        strict = RedisReceiptStore(group.url + "?min_replicas_acked=1&replica_ack_timeout_ms=1000")
        master = Redis(host=master_node.address[0], port=master_node.address[1], decode_responses=True)
        finishing: asyncio.Task[bool] | None = None
        try:
            key, now = f"exact:{uuid.uuid4().hex}", time.time()
            await plain.claim(key, "a", now=now, lease=60, expires_at=now + 600)
            await plain.mark_paid(key, "a", "0x" + "ab" * 32, now=now, lease=60)
            deadline = time.monotonic() + 10
            os.kill(replica_pid, signal.SIGSTOP)  # the replica acknowledges nothing until SIGCONT: WAIT blocks
            try:
                finishing = asyncio.create_task(strict.finish(key, "a", served=True, now=now + 1, expires_at=now + 600))
                first = await _until_waiting(master, set(), deadline)
                await master.client_kill_filter(_id=first)  # the write is done; its reply is lost
                await _until_waiting(master, {first}, deadline)  # the retried pipeline waits on a new connection
            finally:
                os.kill(replica_pid, signal.SIGCONT)
            try:
                held = await finishing
            except StoreUnavailable:
                held = False
            record = await plain.get(key, now=now + 1)
            assert record is not None
            assert held or record.state == ClaimState.UNSERVED, (
                f"finish answered {held} (the request is refused) and the payment is {record.state.value}"
            )
        finally:
            if finishing is not None and not finishing.done():
                finishing.cancel()
            await master.aclose()
            await plain.aclose()
            await strict.aclose()
