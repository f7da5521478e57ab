"""Several ``x402-gateway serve`` processes on one Redis take turns on one channel: whichever process gets the
request, the cumulative is one sequence; two requests racing on the same voucher through two processes are served
once; the claims of both processes' claimers add up to exactly the sum charged. A process killed (SIGKILL) while
it holds a channel's lock does not block the payer for the lease: once its heartbeat is gone, the next request (on
another process) takes the lock over (docs/threat-model.md T31).

Three processes for the module (one of them is killed by the last test), a recording upstream in this process.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from eth_account import Account

from gateway.dev.chain import DevChain, RedisServer, set_eth_balance
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from tests.e2e.helpers import HookedUpstream
from tests.sessions.crafted import CraftedChannel, session_offer
from tests.sessions.test_official_client_sessions import wait_for
from tests.support.concurrency import fire_together
from tests.support.gateway import AUTHORIZER_KEY
from tests.support.processes import ServeProcess, serve_processes
from tests.support.servers import serve_asgi

PRICE = 1_000
DEPOSIT = 100_000


def config_text(*, upstream_url: str, store_url: str, chain: DevChain, pay_to: str) -> str:
    return f"""
[upstream]
url = "{upstream_url}"
read_timeout = 60.0

[store]
url = "{store_url}"
heartbeat_seconds = 1.0
lease_seconds = 600.0

[payment]
pay_to = "{pay_to}"
relayer_key_env = "TEST_RELAYER_KEY"

[rate_limits]
enabled = false

[networks.base]
rpc_urls = ["{chain.url}"]
receipt_poll_interval = 0.02

[sessions]
authorizer_key_env = "TEST_AUTHORIZER_KEY"
withdraw_delay = 900
min_deposit = "0.10"
claim_interval = 0.5
claim_after = 1.0
settle_interval = 0.5

[[routes]]
route = "GET /session"
price = "0.001"
schemes = ["batch-settlement"]
"""


@dataclass
class Fleet:
    procs: list[ServeProcess]
    upstream: HookedUpstream
    pay_to: str
    offer: dict[str, Any]

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.procs]


@pytest.fixture(scope="module")
def fleet(base_chain: DevChain, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    tmp = tmp_path_factory.mktemp("fleet")
    upstream = HookedUpstream()
    pay_to = Account.create().address
    keys = []
    for _ in range(3):  # a relayer of its own per process (deposits, claims, sweeps)
        relayer = Account.create()
        set_eth_balance(base_chain.anvil, relayer.address, 10**19)
        keys.append(relayer.key.to_0x_hex())
    with serve_asgi(upstream) as upstream_url, pytest.MonkeyPatch.context() as env:
        env.setenv("TEST_AUTHORIZER_KEY", AUTHORIZER_KEY)
        config = tmp / "gateway.toml"
        config.write_text(
            config_text(upstream_url=upstream_url, store_url=redis_server.url, chain=base_chain, pay_to=pay_to)
        )
        with serve_processes(config, tmp / "logs", keys) as procs:
            offer = session_offer(httpx.get(procs[0].url + "/session"))
            yield Fleet(procs, upstream, pay_to, offer)


def cumulative(r: httpx.Response) -> int:
    return int(decode_header(r.headers["payment-response"])["extra"]["channelState"]["chargedCumulativeAmount"])


def error_of(r: httpx.Response) -> str:
    return str(decode_header(r.headers["payment-required"])["error"])


def opened(fleet: Fleet, chain: DevChain, via: str) -> CraftedChannel:
    ch = CraftedChannel.from_offer(chain.new_payer(1_000_000), fleet.offer)
    r = httpx.get(via + "/session", headers=ch.header(ch.deposit(DEPOSIT, voucher_max=PRICE)), timeout=30)
    assert r.status_code == 200, r.text
    return ch


def test_two_processes_on_one_redis_keep_one_cumulative_serve_once_and_claim_exactly(
    fleet: Fleet, base_chain: DevChain
) -> None:
    a, b = fleet.urls[:2]
    served_before = len(fleet.upstream.requests)
    paid_before = base_chain.balance(fleet.pay_to)
    ch = opened(fleet, base_chain, a)
    charged = PRICE
    for n in range(6):  # alternating: every process continues the other's cumulative
        url = (b, a)[n % 2]
        r = httpx.get(url + "/session", headers=ch.header(ch.paying(charged + PRICE)), timeout=30)
        assert r.status_code == 200, r.text
        charged += PRICE
        assert cumulative(r) == charged
    for _ in range(6):  # the same next voucher through both processes at once: one of them serves it
        served = len(fleet.upstream.requests)
        answers = fire_together([a, b], "GET", "/session", ch.header(ch.paying(charged + PRICE)), 2)
        ok = [r for r in answers if r.status_code == 200]
        assert len(ok) == 1, [(r.status_code, r.text[:200]) for r in answers]
        loser = next(r for r in answers if r.status_code != 200)
        assert loser.status_code == 402, loser.text
        assert error_of(loser) in (reasons.SESSION_CHANNEL_BUSY, reasons.SESSION_CUMULATIVE_MISMATCH)
        assert len(fleet.upstream.requests) == served + 1  # served once
        charged += PRICE
        assert cumulative(ok[0]) == charged
    assert len(fleet.upstream.requests) - served_before == charged // PRICE
    # Both processes' claimers claim and sweep (claims are idempotent): the receiver gets exactly the sum charged.
    wait_for(lambda: base_chain.balance(fleet.pay_to) - paid_before == charged, timeout=30)
    state = ch.onchain(base_chain)
    assert (state.balance, state.total_claimed) == (DEPOSIT, charged)


def test_a_killed_process_holding_a_channel_lock_is_taken_over_once_its_heartbeat_is_gone(
    fleet: Fleet, base_chain: DevChain
) -> None:
    survivor, doomed = fleet.procs[0], fleet.procs[2]
    ch = opened(fleet, base_chain, survivor.url)
    arrived, release = threading.Event(), threading.Event()

    def hold() -> None:
        arrived.set()
        release.wait(60)

    nxt = ch.header(ch.paying(2 * PRICE))
    fleet.upstream.on_request = hold

    def doomed_request() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(doomed.url + "/session", headers=nxt, timeout=60)

    threading.Thread(target=doomed_request, daemon=True).start()
    try:
        assert arrived.wait(30)  # the doomed process holds the channel's lock and waits for the upstream
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
        refusals: list[str] = []
        served = None
        deadline = time.monotonic() + 30  # far below the 600 s lease: only the lapsed heartbeat can free it
        while time.monotonic() < deadline:
            r = httpx.get(survivor.url + "/session", headers=nxt, timeout=30)
            if r.status_code == 200:
                served = r
                break
            assert r.status_code == 402, r.text
            refusals.append(error_of(r))
            time.sleep(0.2)
        assert served is not None, refusals[-3:]
        assert set(refusals) <= {reasons.SESSION_CHANNEL_BUSY}
        assert cumulative(served) == 2 * PRICE  # the dead request charged nothing
    finally:
        release.set()
    r = httpx.get(survivor.url + "/session", headers=ch.header(ch.paying(3 * PRICE)), timeout=30)
    assert r.status_code == 200 and cumulative(r) == 3 * PRICE
