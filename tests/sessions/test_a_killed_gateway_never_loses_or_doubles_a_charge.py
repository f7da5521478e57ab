"""Chaos on the money invariant of sessions: a real ``x402-gateway serve`` process is killed (SIGKILL) at random
moments while official x402 clients pay voucher after voucher on their channels, and is started again on the same
store each time. Afterwards (docs/sessions.md, "State kept per channel" and "Failure cases"):

* every request a client saw served (a 2xx with ``PAYMENT-RESPONSE``) is charged, once: the cumulatives a client
  saw on its channel rise by the price at each step, and the store's ``charged`` is at least the last of them;
* a charge nobody saw served is a request the upstream served and whose answer died with the process after its
  charge was committed: each is matched by a client attempt that ended in a broken connection, at most one per
  channel per kill, and shows as a skipped step in the client's cumulatives (it resynchronised from the
  corrective 402);
* nothing is charged that the upstream did not serve, and no request reaches the upstream twice;
* every channel resumes after each restart, and no payer deposits again once its channel is open; whatever a
  payer deposited (a deposit whose answer died may be made again) is in its channel on chain;
* once claimed and swept, each channel's ``totalClaimed`` on chain is what the store charged on it, and ``payTo``
  gained exactly their sum.

The kills land anywhere, a few milliseconds after the upstream answered a request (while the gateway reads the
answer, commits its charge and sends it), or a few milliseconds after the gateway broadcast a transaction (a
deposit, a claim, a sweep). A failure prints the seed of its kill delays: ``X402_CHAOS_SEED=<seed>`` replays them
(what each lands on still varies with the scheduling).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from eth_account import Account
from x402 import x402Client
from x402.http.clients import x402_httpx_transport
from x402.http.clients.httpx import PaymentError

from gateway.dev.chain import DevChain, RedisServer, set_eth_balance
from gateway.storage.channels.redis import PREFIX
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from tests.sessions.rpc_proxy import SEND_METHODS, RpcProxy
from tests.sessions.test_a_client_that_lost_its_state_resynchronises import Wire, fresh_client
from tests.sessions.test_official_client_sessions import wait_for
from tests.support.gateway import AUTHORIZER_KEY
from tests.support.processes import ROOT, free_port
from tests.support.servers import Behaviour, RecordingUpstream, serve_asgi

PRICE = 1_000  # $0.001 a request
CLIENTS = 3  # one channel each, paying concurrently
KILLS = 5  # serve, kill at a random moment, serve again on the same store


def config_text(*, port: int, upstream_url: str, store_url: str, rpc_url: str, pay_to: str) -> str:
    return f"""
[server]
listen = "127.0.0.1:{port}"

[upstream]
url = "{upstream_url}"
read_timeout = 10.0

[store]
url = "{store_url}"
heartbeat_seconds = 3.0

[payment]
pay_to = "{pay_to}"
relayer_key_env = "TEST_RELAYER_KEY"

[rate_limits]
enabled = false

[networks.base]
rpc_urls = ["{rpc_url}"]
receipt_poll_interval = 0.02

[sessions]
authorizer_key_env = "TEST_AUTHORIZER_KEY"
withdraw_delay = 900
min_deposit = "1.00"
claim_interval = 0.3
claim_after = 1.0
settle_interval = 0.5

[[routes]]
route = "GET /session"
price = "0.001"
schemes = ["batch-settlement"]
"""


class Trigger:
    """A one-shot action, armed by the test and fired (in a thread of its own) by whatever sees the moment."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._action: Callable[[], None] | None = None

    def arm(self, action: Callable[[], None]) -> None:
        with self._lock:
            self._action = action

    def fire(self) -> None:
        with self._lock:
            action, self._action = self._action, None
        if action is not None:
            threading.Thread(target=action, daemon=True).start()


@dataclass
class TriggeringUpstream(RecordingUpstream):
    """A recording upstream that keeps the query of every request it answered to the end (``answered``), and fires
    ``on_answer`` once it has."""

    on_answer: Trigger = field(default_factory=Trigger)
    answered: list[str] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return

        async def sent(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.answered.append(scope["query_string"].decode())
                self.on_answer.fire()

        await super().__call__(scope, receive, sent)


@dataclass
class Gateway:
    """One ``serve`` process at a time, on one port and config: killed and started again on the same store."""

    config: Path
    port: int
    relayer_key: str
    logs: Path
    proc: subprocess.Popen[bytes] | None = None
    lives: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.lives += 1
        env = dict(
            os.environ, TEST_RELAYER_KEY=self.relayer_key, TEST_AUTHORIZER_KEY=AUTHORIZER_KEY, PYTHONPATH=str(ROOT)
        )
        log = self.logs / f"gateway-{self.lives}.log"
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "-c", str(self.config)],
                cwd=ROOT,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 40
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"gateway never became ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)

    def killer(self, delay: float, fired: threading.Event) -> Callable[[], None]:
        """An action that kills this life of the process ``delay`` seconds after it is fired."""
        assert self.proc is not None
        pid = self.proc.pid

        def kill() -> None:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            fired.set()

        return kill

    def reap(self) -> None:
        assert self.proc is not None
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@dataclass
class Payer:
    """One official client on its own channel, and what it saw."""

    index: int
    client: x402Client
    address: str
    served: list[tuple[str, int]] = field(default_factory=list)  # (request id, cumulative) seen served, in order
    broken: list[str] = field(default_factory=list)  # request ids whose attempt ended in a broken connection
    errors: list[str] = field(default_factory=list)  # attempts the client failed for any other reason
    refused: list[str] = field(default_factory=list)  # the answers that were neither served nor a connection error
    wire: list[httpx.Response] = field(default_factory=list)  # every answer to a paid attempt (402s included)

    def cumulatives(self) -> list[int]:
        return [c for _, c in self.served]


async def pay_until(payer: Payer, url: str, stop: threading.Event) -> None:
    """Voucher after voucher until ``stop``, each attempt with a request id of its own; a broken connection or a
    refusal is noted and the next attempt follows (a gateway being restarted refuses connections for a while)."""
    n = 0
    transport = x402_httpx_transport(payer.client, Wire(payer.wire))
    async with httpx.AsyncClient(transport=transport, timeout=30) as http:
        while not stop.is_set():
            n += 1
            rid = f"{payer.index}-{n}"
            try:
                r = await http.get(url + "/session", params={"rid": rid})
            except (httpx.TransportError, PaymentError) as exc:
                # the official client wraps what broke its paid attempt: a broken connection, or anything else
                cause: BaseException | None = exc
                while cause is not None and not isinstance(cause, httpx.TransportError):
                    cause = cause.__cause__
                (payer.broken if cause is not None else payer.errors).append(rid if cause else f"{rid}: {exc!r}")
                await asyncio.sleep(0.1)
                continue
            if r.status_code == 200 and "payment-response" in r.headers:
                if json.loads(r.content)["query"] != f"rid={rid}":  # the whole answer, and this request's
                    payer.errors.append(f"{rid}: answered {r.text[:200]}")
                receipt = decode_header(r.headers["payment-response"])
                payer.served.append((rid, int(receipt["extra"]["channelState"]["chargedCumulativeAmount"])))
                continue
            required = r.headers.get("payment-required")
            payer.refused.append(str(decode_header(required).get("error")) if required else str(r.status_code))
            await asyncio.sleep(0.05)


def run_payers(payers: list[Payer], url: str, stop: threading.Event) -> threading.Thread:
    async def all_of_them() -> None:
        await asyncio.gather(*(pay_until(p, url, stop) for p in payers))

    thread = threading.Thread(target=lambda: asyncio.run(all_of_them()), daemon=True, name="payers")
    thread.start()
    return thread


def stored_channels(store_url: str) -> dict[str, tuple[str, int]]:
    """Every channel's (payer, charged) as the store holds it, by channel id (read from the file or the server
    directly: no gateway code in between)."""
    if store_url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(store_url.removeprefix("sqlite:///"))) as conn:
            rows = conn.execute("SELECT channel_id, payer, charged FROM channels").fetchall()
        return {str(cid): (str(payer).lower(), int(charged)) for cid, payer, charged in rows}
    client = redis.Redis.from_url(store_url, decode_responses=True)
    try:
        out: dict[str, tuple[str, int]] = {}
        for key in client.scan_iter(match=PREFIX + "c:*"):
            h = client.hgetall(key)
            out[str(h["channel_id"])] = (str(h["payer"]).lower(), int(h["charged"]))
        return out
    finally:
        client.close()


@contextlib.contextmanager
def store_for(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'receipts.db'}"
        return
    server = RedisServer(persistent=True).start()  # a server of its own: never the shared one
    try:
        yield server.url
    finally:
        server.cleanup()


def summary(payers: list[Payer], channels: dict[str, tuple[str, int]]) -> str:
    lines = []
    for p in payers:
        cs = [c // PRICE for c in p.cumulatives()]
        skipped = [(a, b) for a, b in pairwise(cs) if b - a != 1]
        charged = [c // PRICE for payer, c in channels.values() if payer == p.address.lower()]
        corrective = [
            decode_header(r.headers["payment-required"]).get("error")
            for r in p.wire
            if r.status_code == 402 and "payment-required" in r.headers
        ]
        # a broken attempt whose 200 and PAYMENT-RESPONSE arrived (the body did not): the client advanced
        headers_only = sorted(set(p.broken) & {r.request.url.params.get("rid") for r in p.wire if r.status_code == 200})
        lines.append(
            f"payer {p.index}: served {len(p.served)} (last cumulative {cs[-1] if cs else None}, skipped {skipped}),"
            f" charged {charged}, broken {len(p.broken)} (headers only {headers_only}),"
            f" refused {dict(collections.Counter(p.refused))},"
            f" paid attempts refused {dict(collections.Counter(corrective))}, errors {p.errors[:3]}"
        )
    return "\n".join(lines)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_gateway_killed_at_random_moments_never_loses_or_doubles_a_charge(
    base_chain: DevChain, tmp_path: Path, store: str
) -> None:
    seed = int(os.environ.get("X402_CHAOS_SEED") or random.SystemRandom().getrandbits(32))
    rng = random.Random(seed)
    upstream = TriggeringUpstream(Behaviour(delay=0.005))  # a little time with the channel locked
    rpc = RpcProxy(base_chain.url)
    sent = Trigger()
    rpc.fault = lambda call: sent.fire() if call.get("method") in SEND_METHODS else None
    pay_to = Account.create().address
    relayer = Account.create()  # a relayer of its own: a killed process's nonces touch no other test's
    set_eth_balance(base_chain.anvil, relayer.address, 10**19)
    paid_before = base_chain.balance(pay_to)
    with store_for(store, tmp_path) as store_url, serve_asgi(upstream) as upstream_url, serve_asgi(rpc) as rpc_url:
        config = tmp_path / "gateway.toml"
        port = free_port()
        config.write_text(
            config_text(port=port, upstream_url=upstream_url, store_url=store_url, rpc_url=rpc_url, pay_to=pay_to)
        )
        (tmp_path / "logs").mkdir()
        gw = Gateway(config, port, relayer.key.to_0x_hex(), tmp_path / "logs")
        payers = []
        funded: dict[str, int] = {}
        for i in range(CLIENTS):
            account = base_chain.new_payer(5_000_000)
            funded[account.address] = base_chain.balance(account.address)
            payers.append(Payer(i, fresh_client(account, base_chain.url), account.address))
        stop = threading.Event()
        kills: list[str] = []
        deposited: dict[str, int] = {}  # each payer's balance once its channel is open
        context = f"X402_CHAOS_SEED={seed} store={store} logs={tmp_path / 'logs'}"
        gw.start()
        worker = run_payers(payers, gw.url, stop)
        try:
            for n in range(KILLS):
                fired = threading.Event()
                if n % 3 == 0:  # the first time a deposit (the channels are being opened), then a claim or a sweep
                    sent.arm(gw.killer(rng.uniform(0.0, 0.01), fired))
                    kills.append("after a transaction left")
                elif n % 3 == 1:
                    time.sleep(rng.uniform(0.0, 0.3))
                    upstream.on_answer.arm(gw.killer(rng.uniform(0.0, 0.004), fired))
                    kills.append("after the upstream answered")
                else:
                    gw.killer(rng.uniform(0.02, 0.6), fired)()
                    kills.append("anywhere")
                assert fired.wait(30), f"no moment to kill at: {kills} {context}"
                gw.reap()
                gw.start()
                if n == 0:
                    wait_for(lambda: all(p.served for p in payers), timeout=30)  # every channel open
                    deposited.update({p.address: base_chain.balance(p.address) for p in payers})
            served_before = [len(p.served) for p in payers]
            # Every channel resumes after the last restart (by the corrective 402 where the store was ahead).
            wait_for(lambda: all(len(p.served) > k + 2 for p, k in zip(payers, served_before, strict=True)), 30)
        finally:
            stop.set()
            worker.join(30)
            gw.stop()
        assert not worker.is_alive()

        channels = stored_channels(store_url)
        context += "\n" + summary(payers, channels) + f"\nkills: {kills}"
        rids = [r.query.decode().removeprefix("rid=") for r in upstream.requests]
        assert len(rids) == len(set(rids)), context  # no request reached the upstream twice
        answered = {query.removeprefix("rid=") for query in upstream.answered}
        assert sorted(payer for payer, _ in channels.values()) == sorted(p.address.lower() for p in payers), context
        allowed = {reasons.SESSION_CUMULATIVE_MISMATCH, reasons.SESSION_CHANNEL_BUSY}
        for p in payers:
            assert p.served and not p.errors and set(p.refused) <= allowed, context
            (cid,) = [cid for cid, (payer, _) in channels.items() if payer == p.address.lower()]
            charged = channels[cid][1]
            cumulatives = p.cumulatives()
            assert charged % PRICE == 0 and charged >= cumulatives[-1], context  # every served request charged
            assert charged // PRICE - len(p.served) <= len(kills), context  # at most one lost answer a kill
            upstream_served = {rid for rid in answered if rid.startswith(f"{p.index}-")}
            assert {rid for rid, _ in p.served} <= upstream_served, context
            # Between two requests seen served, the cumulative rises by the price, and by more only for answers
            # lost with a process: each such charge is an attempt of that interval that broke, and that the
            # upstream served (nothing is charged twice, nor for a request the upstream did not serve).
            seen = [attempt(rid) for rid, _ in p.served]
            broken = [attempt(rid) for rid in p.broken]
            lost = [attempt(rid) for rid in upstream_served - {rid for rid, _ in p.served}]
            bounds = pairwise([0, *seen, sys.maxsize])
            levels = pairwise([0, *cumulatives, charged + PRICE])  # the last interval ends above what was charged
            for (lo, hi), (below, above) in zip(bounds, levels, strict=True):
                unseen = (above - below) // PRICE - 1  # charges between the two requests seen served
                assert (above - below) % PRICE == 0 and unseen >= 0, f"between attempts {lo} and {hi}: {context}"
                assert unseen <= sum(lo < n < hi for n in broken), f"between attempts {lo} and {hi}: {context}"
                assert unseen <= sum(lo < n < hi for n in lost), f"between attempts {lo} and {hi}: {context}"
            assert base_chain.balance(p.address) == deposited[p.address], context  # no deposit once open
            loss = funded[p.address] - base_chain.balance(p.address)
            assert base_chain.channel(bytes.fromhex(cid[2:])).balance == loss, context  # every deposit in it

        # A gateway on the same store claims every channel and sweeps: payTo gains exactly what the store charged.
        gw.start()
        try:
            total = sum(charged for _, charged in channels.values())
            wait_for(lambda: base_chain.balance(pay_to) - paid_before == total, timeout=30)
            for cid, (_, charged) in channels.items():
                assert base_chain.channel(bytes.fromhex(cid[2:])).total_claimed == charged, context
            assert stored_channels(store_url) == channels, context  # nothing charged without a request
        finally:
            gw.stop()
        print(context)


def attempt(rid: str) -> int:
    """The attempt number of a request id (``<payer>-<attempt>``)."""
    return int(rid.partition("-")[2])
