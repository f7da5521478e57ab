"""Paid load through two gateway processes while the Sentinel master dies: every payment served at most once, none
charged unserved, payments answered again within the failover, no replay afterwards (docs/scaling.md).

Real processes throughout: a master, its replica and three sentinels (``redis-server``), two ``x402-gateway serve``
instances with ``[store] min_replicas_acked = 1`` and their rate limits on the same Sentinel group, anvil, and an
upstream that records which payment each call carried. Clients behave as real ones do: a 503 or 409 is retried
with the same payment (on the other instance), a 2xx ends it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DevChain
from tests.support.gateway import GatewayUnderTest
from tests.support.processes import funded_relayer_keys, paid_route_config, serve_processes
from tests.support.redis_topology import SentinelGroup
from tests.support.servers import RecordingUpstream, serve_asgi

PRICE = 100_000  # $0.10
PAYMENTS = 48
WORKERS = 4
KILL_AFTER = 12  # served payments before the master is killed
DEADLINE = 60.0  # seconds for the whole load: a payment still unanswered by then fails the test


@dataclass
class Load:
    """What the clients saw: per payment its final status and how many answers of each kind it got."""

    urls: list[str]
    signed: list[tuple[str, str]]
    final: dict[int, int] = field(default_factory=dict)
    answers: dict[int, list[int]] = field(default_factory=dict)  # every status each payment got, in order
    served_at: list[float] = field(default_factory=list)  # monotonic time of every 2xx
    failed_at: list[float] = field(default_factory=list)  # monotonic time of every 5xx
    statuses: list[int] = field(default_factory=list)

    async def run(self, killed: asyncio.Event, kill: asyncio.Event) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(self.signed)):
            queue.put_nowait(i)
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.gather(*(self._worker(client, queue, kill) for _ in range(WORKERS)))

    async def _worker(self, client: httpx.AsyncClient, queue: asyncio.Queue[int], kill: asyncio.Event) -> None:
        stop_at = time.monotonic() + DEADLINE
        while not queue.empty():
            i = queue.get_nowait()
            name, header = self.signed[i]
            attempt = 0
            while time.monotonic() < stop_at:
                url = self.urls[(i + attempt) % len(self.urls)] + "/paid"
                attempt += 1
                try:
                    r = await client.post(url, headers={name: header, "x-load-id": str(i)})
                    status = r.status_code
                except httpx.HTTPError:
                    status = 599
                self.statuses.append(status)
                self.answers.setdefault(i, []).append(status)
                if 200 <= status < 300:
                    self.served_at.append(time.monotonic())
                    self.final[i] = status
                    if len(self.served_at) == KILL_AFTER:
                        kill.set()
                    break
                if status == 402:  # a fresh payment refused: recorded, the assertions decide
                    self.final[i] = status
                    break
                if status >= 500:
                    self.failed_at.append(time.monotonic())
                await asyncio.sleep(0.05)  # 409 (in flight elsewhere) or 5xx: the same payment again


async def paid_load_through_a_failover(
    group: SentinelGroup, load: Load, *, restart_old_master: bool
) -> tuple[float, tuple[str, int], tuple[str, int]]:
    """Run the load, kill the master once KILL_AFTER payments were served; once the sentinels promoted the replica,
    start the old master again if asked (as an orchestrator restarts a dead pod: it comes back as the new master's
    replica). Returns (kill time, old master, new master)."""
    kill, killed = asyncio.Event(), asyncio.Event()
    old = group.master_address()
    box: list[tuple[str, int] | float] = []

    async def killer() -> None:
        await kill.wait()
        box.append(group.kill_master())
        killed.set()
        box.append(await asyncio.to_thread(group.wait_for_failover, old))
        if restart_old_master:
            group.restart(old)

    await asyncio.gather(load.run(killed, kill), killer())
    killed_at, new = box
    assert isinstance(killed_at, float) and isinstance(new, tuple)
    return killed_at, old, new


@pytest.mark.parametrize("min_replicas_acked", [0, 1])
def test_paid_load_through_a_sentinel_failover_serves_each_payment_at_most_once_and_charges_only_what_it_served(
    min_replicas_acked: int, sentinel_group: SentinelGroup, base_chain: DevChain, tmp_path: Path
) -> None:
    """With ``min_replicas_acked = 1`` and one replica, the promoted replica has nobody to acknowledge its writes:
    payments wait (503 store_replicas_behind) until the old master is back as its replica. With 0 they resume as
    soon as the replica is promoted, at the risk docs/scaling.md describes."""
    upstream = RecordingUpstream()
    pay_to = Account.create().address
    with serve_asgi(upstream) as upstream_url:
        config = tmp_path / "gateway.toml"
        store = {"min_replicas_acked": min_replicas_acked, "replica_ack_timeout_ms": 1000, "heartbeat_seconds": 3.0}
        config.write_text(
            paid_route_config(
                upstream_url=upstream_url, store_url=sentinel_group.url, chain=base_chain, pay_to=pay_to, store=store
            )
        )
        with serve_processes(config, tmp_path, funded_relayer_keys(base_chain, 2)) as procs:
            urls = [p.url for p in procs]
            signer = GatewayUnderTest(url=urls[0], config=None, upstream=upstream, chains={}, pay_to=pay_to)  # type: ignore[arg-type]
            challenge = httpx.post(urls[0] + "/paid")
            assert challenge.status_code == 402
            payers: list[LocalAccount] = [base_chain.new_payer(PRICE * 12) for _ in range(PAYMENTS // 12)]
            signed = [signer.sign(payers[i % len(payers)], challenge) for i in range(PAYMENTS)]
            paid_before = base_chain.balance(pay_to)

            load = Load(urls, signed)
            killed_at, old, new = asyncio.run(
                paid_load_through_a_failover(sentinel_group, load, restart_old_master=min_replicas_acked > 0)
            )

            # Every payment answered 2xx exactly once (served at most once, and none left unserved). The upstream
            # may have answered a payment more often: when the store failed before the answer could be recorded,
            # the client got a 503 instead (nothing delivered) and its retry was served (the payment stays usable).
            assert sorted(load.final) == list(range(PAYMENTS)), Counter(load.statuses)
            assert set(load.final.values()) == {200}, load.final
            assert set(load.statuses) <= {200, 409, 503, 599}, sorted(set(load.statuses))
            calls = Counter(r.header("x-load-id") for r in upstream.requests)
            for i, answers in load.answers.items():
                assert answers.count(200) == 1, (i, answers)
                assert calls[str(i)] <= 1 + sum(a >= 500 for a in answers), (i, answers, calls[str(i)])
            # Charged exactly what was served: pay_to gained one price per payment.
            assert base_chain.balance(pay_to) - paid_before == PRICE * PAYMENTS

            # The failover window: from the kill to the first payment served after the last refusal (a request
            # in flight at the kill may still be answered just after it, from the old master).
            assert load.failed_at, "the kill went unnoticed: the test did not exercise a failover"
            after = [t for t in load.served_at if t > max(load.failed_at)]
            assert after, "no payment was served after the failover"
            gap = after[0] - killed_at
            print(f"\nfailover (min_replicas_acked={min_replicas_acked}): master {old} -> {new}; paid requests served")
            print(f"again {gap:.2f} s after the kill; {len(load.failed_at)} refused answers (5xx) in between;")
            print(f"{sum(calls.values()) - PAYMENTS} upstream answers were not delivered (their payment was retried)")

            # Replays after the failover: every served payment presented again, to both instances, is refused.
            replays = [
                httpx.post(url + "/paid", headers={name: header}).status_code for name, header in signed for url in urls
            ]
            assert set(replays) <= {402, 409}, sorted(set(replays))
            assert sum(calls.values()) == len(upstream.requests)  # no replay reached the upstream

            # Both instances report the topology; at least one followed the failover.
            stores = [httpx.get(url + "/readyz").json().get("store", {}) for url in urls]
            assert all(s.get("topology") == "sentinel" for s in stores), stores
            assert all(s.get("min_replicas_acked") == min_replicas_acked for s in stores), stores
            assert any(s.get("failovers_seen", 0) >= 1 for s in stores), stores
            assert all("master" not in s and str(new[1]) not in json.dumps(s) for s in stores)  # public: no address
            metrics = [httpx.get(url + "/metrics").text for url in urls]
            assert all('x402_gateway_store_info{topology="sentinel"} 1.0' in m for m in metrics)
            assert any("x402_gateway_store_failovers_total 1.0" in m for m in metrics), metrics[0][-2000:]
