"""The chain-chaos rig: a real ``x402-gateway serve`` over a real anvil reached through a JSON-RPC proxy that
misbehaves on demand, a few concurrent payers, and the money invariant checked on chain afterwards.

* :class:`RpcProxy`: the gateway's only RPC URL. It forwards to whichever anvil is current (anvil may be killed and
  restarted from a state dump behind it) and injects, per request, what an RPC provider does on a bad day: a delay,
  a dropped answer (the request reached the node, the answer never came back), a duplicated request, HTTP 429/503,
  a batch answered partially or out of order, or every request held until released.
* :class:`Served`: one ``serve`` process (its config written here), killable with SIGKILL and restartable on the
  same port, store and config.
* :class:`Load`: payers that each pay fresh authorizations one after the other and, like real clients, retry the same
  payment on 503/409/no answer until it is served or refused. Every attempt's status, reason and duration is kept.
* :func:`check_money`: every served request paid exactly once on chain (its ``AuthorizationUsed`` once, one
  ``Transfer`` to pay-to for it), nothing paid that was not served, no 402 for a payment that pays, no attempt that
  hung past its bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from coincurve import PrivateKey
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.chain import abi
from gateway.chain.rpc import RpcError
from gateway.chain.transactions import sign_eip1559
from gateway.client.exact import Option, choose_requirement, parse_challenge, sign_exact_payment
from gateway.dev.anvil import Anvil
from gateway.dev.chain import DevChain
from tests.e2e.helpers import decode_payment
from tests.support.processes import config_text, free_port

ROOT = Path(__file__).resolve().parents[2]
PRICE = 100_000
SETTLE_TIMEOUT = 8.0
RPC_TIMEOUT = 3.0
# The longest a single attempt may take: its chain reads (a few RPC timeouts at worst), the upstream, and the
# settlement wait (settle_timeout). An attempt that takes longer hung.
ATTEMPT_BOUND = SETTLE_TIMEOUT + 4 * RPC_TIMEOUT + 5.0


# ------------------------------------------------------------------------------------------------ the RPC proxy


@dataclass
class Faults:
    """What the proxy does to each request (probabilities per request; all off by default)."""

    delay: float = 0.0  # seconds before forwarding
    delay_rate: float = 0.0
    drop_rate: float = 0.0  # forwarded, then the connection closed without an answer
    duplicate_rate: float = 0.0  # forwarded twice, the second answer returned (batch items doubled)
    status_rate: float = 0.0  # answered with HTTP 429 or 503, not forwarded
    partial_rate: float = 0.0  # a batch answer with one item missing
    shuffle_rate: float = 0.0  # a batch answer in another order
    hold: bool = False  # every request waits (not forwarded) until hold is off
    # Per request, given its JSON-RPC methods: "refuse" (HTTP 503, not forwarded), "reset" (the connection closed
    # before forwarding: the node never sees it) or None (the faults above apply).
    rule: Callable[[list[str]], str | None] | None = None


class RpcProxy:
    """A JSON-RPC proxy on a port of its own, in a thread of its own (see the module docstring)."""

    def __init__(self, target: str, *, seed: int = 0) -> None:
        self.target = target
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.port = free_port()
        self.counts: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rpc-proxy")
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RpcProxy:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def calm(self) -> None:
        self.faults = Faults()

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length)
                answer = await self._answer(body)
                if answer is None:  # dropped: the node may have acted on it, the caller never hears
                    writer.transport.abort()
                    return
                status, payload = answer
                reason = {200: b"OK", 429: b"Too Many Requests", 503: b"Service Unavailable"}.get(status, b"X")
                writer.write(
                    b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                    % (status, reason, len(payload))
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, body: bytes) -> tuple[int, bytes] | None:
        f = self.faults
        while self.faults.hold:
            await asyncio.sleep(0.05)
        rng = self.rng
        if f.rule is not None:
            with contextlib.suppress(ValueError):
                doc = json.loads(body)
                methods = [
                    str(i.get("method")) for i in (doc if isinstance(doc, list) else [doc]) if isinstance(i, dict)
                ]
                verdict = f.rule(methods)
                if verdict == "refuse":
                    self._count("refuse")
                    return 503, b'{"error":"unavailable"}'
                if verdict == "reset":
                    self._count("reset")
                    return None
        if f.delay and rng.random() < f.delay_rate:
            self._count("delay")
            await asyncio.sleep(f.delay)
        if rng.random() < f.status_rate:
            self._count("status")
            return rng.choice((429, 503)), b'{"error":"slow down"}'
        forwarded = await self._forward(body)
        if forwarded is None:
            return None  # the node did not answer (stopped, killed): so does the proxy
        if rng.random() < f.duplicate_rate:
            self._count("duplicate")
            again = await self._forward(body)
            forwarded = again if again is not None else forwarded
        if rng.random() < f.drop_rate:
            self._count("drop")
            return None
        status, payload = forwarded
        try:
            doc = json.loads(payload)
        except ValueError:
            return status, payload
        if isinstance(doc, list) and len(doc) > 1:
            if rng.random() < f.partial_rate:
                self._count("partial")
                doc.pop(rng.randrange(len(doc)))
            if rng.random() < f.shuffle_rate:
                self._count("shuffle")
                rng.shuffle(doc)
            if rng.random() < f.duplicate_rate:
                doc = doc + [dict(item) for item in doc[: rng.randrange(1, len(doc) + 1)]]
            payload = json.dumps(doc).encode()
        return status, payload

    async def _forward(self, body: bytes) -> tuple[int, bytes] | None:
        host, _, port = self.target.removeprefix("http://").partition(":")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 30)
        except (OSError, TimeoutError):
            return None
        try:
            writer.write(
                b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % (host.encode(), len(body)) + body
            )
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 60)
        except (OSError, TimeoutError):
            return None
        finally:
            writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        if not head:
            return None
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            payload = _dechunk(payload)
        return status, payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


# ------------------------------------------------------------------------------------------- anvil, restarted


def restart_anvil(chain: DevChain, proxy: RpcProxy) -> None:
    """Kill the chain's anvil and start another from its state dump (blocks, accounts, clock), behind the proxy.
    The node's mempool does not survive (a node restart loses it too); the proxy holds every request meanwhile."""
    proxy.faults.hold = True
    try:
        state = chain.rpc("anvil_dumpState")
        old = chain.anvil
        new = Anvil(chain_id=old.chain_id, block_time=old.block_time).start()
        new.rpc("anvil_loadState", [state])
        chain.anvil = new
        old.stop()
        proxy.target = new.url
    finally:
        proxy.faults.hold = False


@contextlib.contextmanager
def anvil_stopped(chain: DevChain) -> Iterator[None]:
    """The node frozen (SIGSTOP): connections are accepted by the kernel, nothing is answered."""
    proc = chain.anvil._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


# ---------------------------------------------------------------------------------------- the gateway process


class Served:
    """``x402-gateway serve`` with the proxy as its RPC, restartable (same port, store and config)."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        rpc_url: str,
        relayer_key: str,
        store_url: str | None = None,
        network: dict[str, Any] | None = None,
        upstream_url: str,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pay_to = Account.create().address
        self.key = relayer_key
        self.relayer = Account.from_key(relayer_key).address
        self.logs: list[Path] = []
        self.tmp = tmp_path
        doc: dict[str, dict[str, Any]] = {
            "server": {"listen": f"127.0.0.1:{self.port}"},
            "upstream": {"url": upstream_url, "read_timeout": 5.0},
            "store": {"url": store_url or f"sqlite:///{tmp_path / 'receipts.db'}", "heartbeat_seconds": 3.0},
            "payment": {
                "pay_to": self.pay_to,
                "relayer_key_env": "TEST_RELAYER_KEY",
                "settle_timeout": SETTLE_TIMEOUT,
            },
            "rate_limits": {"enabled": False},
            "networks.base": {
                "rpc_urls": [rpc_url],
                "receipt_poll_interval": 0.05,
                "rpc_timeout": RPC_TIMEOUT,
                "settlement_check_interval": 0.3,
                "settlement_finality": "depth",
                "settlement_depth": 30,
                **(network or {}),
            },
        }
        self.config = tmp_path / "gateway.toml"
        self.config.write_text(config_text(doc, [{"route": "POST /paid", "price": "0.10"}]))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Served:
        log = self.tmp / f"gateway-{len(self.logs)}.log"
        self.logs.append(log)
        env = dict(os.environ, TEST_RELAYER_KEY=self.key, PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "-c", str(self.config), "--log-format", "text"]
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 40
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            assert time.monotonic() < deadline, self.log_text()[-3000:]
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, as a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


# ------------------------------------------------------------------------------------------------ paid load


@dataclass
class Attempt:
    status: int  # 0: no answer (connection refused or reset, or the client's own timeout)
    reason: str
    seconds: float
    at: float


@dataclass
class Payment:
    payer: str
    nonce: str
    header: tuple[str, str]
    attempts: list[Attempt] = field(default_factory=list)
    final: int | None = None  # 200 served, or the status it was refused with for good

    @property
    def served(self) -> bool:
        return self.final == 200


class Load:
    """``payers`` concurrent payers, each paying one payment after the other until ``stop`` (see the module)."""

    def __init__(self, url: str, chain: DevChain, payers: int) -> None:
        self.url = url
        self.chain = chain
        self.accounts: list[LocalAccount] = [chain.new_payer(10_000 * PRICE) for _ in range(payers)]
        for _ in range(8):  # funded deeper than any reorg a test makes: the payers' money is not what it drops
            chain.rpc("evm_mine")
        self.payments: list[Payment] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._option: Option | None = None
        self.served_event = threading.Event()

    def option(self) -> Option:
        if self._option is None:
            challenge = httpx.post(self.url + "/paid", timeout=30)
            assert challenge.status_code == 402, challenge.text
            self._option = choose_requirement(parse_challenge(challenge.headers, challenge.content))
        return self._option

    def sign(self, payer: LocalAccount) -> Payment:
        header = sign_exact_payment(payer, self.option())
        authorization, _, _ = decode_payment(header[1])
        payment = Payment(payer.address, authorization["nonce"], header)
        with self._lock:
            self.payments.append(payment)
        return payment

    def start(self) -> Load:
        self.option()
        for account in self.accounts:
            thread = threading.Thread(target=self._payer, args=(account,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """No new payments; the ones in progress go on until answered for good (or ``timeout``)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        stuck = [
            (
                p.payer,
                p.nonce,
                [(a.status, a.reason, round(a.seconds, 1), round(a.at, 1)) for a in p.attempts][:8],
                len(p.attempts),
            )
            for p in self.payments
            if p.final is None
        ]
        assert not any(t.is_alive() for t in self._threads), f"payments never answered for good: {stuck}"

    def served(self) -> int:
        return sum(p.served for p in self.payments)

    def wait_served(self, more: int, timeout: float = 30.0) -> bool:
        """Until ``more`` payments more than now are served."""
        target = self.served() + more
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.served() >= target:
                return True
            time.sleep(0.05)
        return False

    def _payer(self, account: LocalAccount) -> None:
        with httpx.Client(timeout=ATTEMPT_BOUND + 20) as http:
            while not self._stop.is_set():
                payment = self.sign(account)
                pay_until_final(http, self.url, payment, deadline=time.monotonic() + 120)
                time.sleep(0.05)


def pay_until_final(http: httpx.Client, url: str, payment: Payment, *, deadline: float) -> None:
    """As a real client: the same payment again on 503, 409 and no answer, until served or refused."""
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            r = http.post(url + "/paid", json={}, headers=dict([payment.header]))
        except httpx.HTTPError as exc:
            payment.attempts.append(Attempt(0, type(exc).__name__, time.monotonic() - started, started))
            time.sleep(0.3)
            continue
        reason = ""
        with contextlib.suppress(ValueError):
            body = r.json()
            reason = str(body.get("error", "")) if isinstance(body, dict) else ""
        payment.attempts.append(Attempt(r.status_code, reason, time.monotonic() - started, started))
        if r.status_code in (503, 409, 502, 504):
            time.sleep(0.3)
            continue
        payment.final = r.status_code
        return


# ------------------------------------------------------------------------------------------- the invariant


def _logs(chain: DevChain, topic0: str, *topics: str | None) -> list[dict[str, Any]]:
    return list(
        chain.rpc(
            "eth_getLogs",
            [{"address": chain.usdc, "fromBlock": "0x0", "toBlock": "latest", "topics": [topic0, *topics]}],
        )
    )


def _padded(address: str) -> str:
    return "0x" + "0" * 24 + address.lower()[2:]


def authorization_uses(chain: DevChain) -> dict[tuple[str, str], int]:
    """(payer, nonce) -> AuthorizationUsed events on the canonical chain."""
    out: dict[tuple[str, str], int] = {}
    for entry in _logs(chain, "0x" + abi.AUTHORIZATION_USED_TOPIC.hex()):
        payer = "0x" + entry["topics"][1][-40:]
        key = (payer.lower(), entry["topics"][2].lower())
        out[key] = out.get(key, 0) + 1
    return out


def transfers_to(chain: DevChain, pay_to: str) -> dict[str, int]:
    """payer -> Transfer events to ``pay_to`` on the canonical chain."""
    out: dict[str, int] = {}
    for entry in _logs(chain, "0x" + abi.TRANSFER_TOPIC.hex(), None, _padded(pay_to)):
        payer = ("0x" + entry["topics"][1][-40:]).lower()
        assert int(entry["data"], 16) == PRICE
        out[payer] = out.get(payer, 0) + 1
    return out


def violations(chain: DevChain, pay_to: str, payments: list[Payment], *, before: int = 0) -> list[str]:
    """Everything that breaks the money invariant or the answer rules (empty: it held)."""
    found: list[str] = []
    uses = authorization_uses(chain)
    per_payer_served: dict[str, int] = {}
    for p in payments:
        used = uses.get((p.payer.lower(), p.nonce.lower()), 0)
        if p.served:
            per_payer_served[p.payer.lower()] = per_payer_served.get(p.payer.lower(), 0) + 1
            if used != 1:
                found.append(f"served but executed {used} times on chain: {p.payer} {p.nonce}")
        elif used:
            found.append(f"paid on chain but never served (final {p.final}): {p.payer} {p.nonce} {p.attempts}")
        for a in p.attempts:
            if a.status == 402:
                found.append(f"a valid payment answered 402 {a.reason}: {p.payer} {p.nonce}")
            if a.status == 500:
                found.append(f"500 {a.reason}: {p.payer} {p.nonce}")
            if a.seconds > ATTEMPT_BOUND:
                found.append(f"an attempt hung {a.seconds:.1f} s (status {a.status} {a.reason}): {p.nonce}")
        if p.final not in (200, None) and p.final != 402:
            found.append(f"refused for good with {p.final}: {p.nonce}")
    transfers = transfers_to(chain, pay_to)
    if transfers != per_payer_served:
        found.append(f"transfers to pay-to per payer {transfers} != served per payer {per_payer_served}")
    served = sum(p.served for p in payments)
    if chain.balance(pay_to) - before != served * PRICE:
        found.append(f"pay-to gained {chain.balance(pay_to) - before}, served {served} x {PRICE}")
    return found


def settled_view(chain: DevChain, pay_to: str, payments: list[Payment], timeout: float = 30.0) -> list[str]:
    """The violations once re-submissions had ``timeout`` to land (a reorg's victims are settled again)."""
    deadline = time.monotonic() + timeout
    while True:
        found = violations(chain, pay_to, payments)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def nonce_counts(chain: DevChain, address: str) -> tuple[int, int]:
    return (
        int(chain.rpc("eth_getTransactionCount", [address, "latest"]), 16),
        int(chain.rpc("eth_getTransactionCount", [address, "pending"]), 16),
    )


def recovers(served: Served, chain: DevChain, load: Load, timeout: float = 30.0) -> list[str]:
    """After the faults: a fresh payment is served, and the relayer's sequence has no gap or stuck transaction."""
    payer = chain.new_payer(PRICE)
    load.accounts.append(payer)
    payment = load.sign(payer)
    with httpx.Client(timeout=ATTEMPT_BOUND + 20) as http:
        pay_until_final(http, served.url, payment, deadline=time.monotonic() + timeout)
    problems = [] if payment.served else [f"a payment after the faults was not served: {payment.attempts}"]
    deadline = time.monotonic() + timeout
    while nonce_counts(chain, served.relayer)[0] != nonce_counts(chain, served.relayer)[1]:
        if time.monotonic() > deadline:
            problems.append(f"relayer nonces stuck: latest/pending {nonce_counts(chain, served.relayer)}")
            break
        time.sleep(0.3)
    return problems


def foreign_transaction(chain: DevChain, key: str, *, max_fee: int | None = None, priority: int = 10**9) -> str:
    """A no-op sent with the relayer's key from outside the gateway (another process, an operator), at the key's
    pending nonce; ``max_fee`` low makes it a stuck one. Its hash, or "" when the node refused it."""
    address = Account.from_key(key).address
    nonce = int(chain.rpc("eth_getTransactionCount", [address, "pending"]), 16)
    base = int(chain.rpc("eth_getBlockByNumber", ["latest", False])["baseFeePerGas"], 16)
    fee = max_fee if max_fee is not None else base * 2 + priority
    tx_hash, raw = sign_eip1559(
        PrivateKey(bytes.fromhex(key.removeprefix("0x"))),
        chain.chain_id,
        nonce,
        address,
        b"",
        21_000,
        fee,
        min(priority, fee),
    )
    try:
        chain.rpc("eth_sendRawTransaction", [raw])
    except RpcError:
        return ""
    return tx_hash
