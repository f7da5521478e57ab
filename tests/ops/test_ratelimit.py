"""Rate limits (docs/threat-model.md T20): challenge flooding is cut off per client IP, paid hammering per payer, with
429 + Retry-After, bounded state, and nothing consumed by a limited request."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import redis
from eth_account import Account

from gateway.config import RateLimitConfig
from gateway.dev.chain import DevChain, RedisServer
from gateway.ops.ratelimit import RateLimiter
from tests.ops.support import samples, value
from tests.support.gateway import running_gateway, sqlite_url

ROUTES = [
    {"route": "GET /cheap", "price": "0.01"},
    {"route": "GET /dear", "price": "1.00", "rate_limit_challenge": "2/minute"},
    {"route": "POST /paid", "price": "0.10", "rate_limit_paid": "1/minute"},
]


def memory_keys(limiter: RateLimiter | None) -> int:
    assert limiter is not None
    return len(limiter.storage.storage)  # type: ignore[attr-defined]  # MemoryStorage's counters


def test_a_burst_of_unpaid_requests_beyond_the_limit_gets_429_with_retry_after(
    base_chain: DevChain, tmp_path: Path
) -> None:
    limits = {"challenge": "5/minute"}
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, rate_limits=limits) as gw,
        gw.client() as c,
    ):
        statuses = [c.get("/cheap") for _ in range(20)]
        assert [r.status_code for r in statuses] == [402] * 5 + [429] * 15
        limited = statuses[-1]
        assert limited.json()["error"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert "payment-required" not in limited.headers  # no challenge was built for it
        keys_after_20 = memory_keys(gw.app.limiter)
        for _ in range(200):
            c.get("/cheap")
        # No state per request: one client on one route is a couple of window counters, however many requests.
        assert memory_keys(gw.app.limiter) == keys_after_20 <= 2
        assert gw.upstream.requests == []
        m = samples(c.get("/metrics").text)
        assert value(m, "x402_gateway_rate_limited_total", route="GET /cheap", kind="challenge") == 215


def test_a_route_override_sets_its_own_challenge_limit(base_chain: DevChain, tmp_path: Path) -> None:
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, rate_limits={"enabled": True}) as gw,
        gw.client() as c,
    ):
        assert [c.get("/dear").status_code for _ in range(3)] == [402, 402, 429]
        assert c.get("/cheap").status_code == 402  # default 60/minute, and a bucket of its own


def test_the_challenge_limit_is_per_client_ip(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, rate_limits={"enabled": True}
    ) as gw:
        with gw.client() as a:
            assert [a.get("/dear").status_code for _ in range(3)] == [402, 402, 429]
        other_ip = httpx.HTTPTransport(local_address="127.0.0.2")  # another loopback address: another client
        with gw.client(transport=other_ip) as b:
            assert b.get("/dear").status_code == 402


def test_paid_requests_are_limited_per_payer_and_a_limited_payment_is_not_consumed(
    base_chain: DevChain, tmp_path: Path, redis_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    limits = {"storage_url": redis_url}
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, rate_limits=limits) as gw,
        gw.client() as c,
    ):
        before = gw.balance(payer.address)
        first = gw.sign(payer, c.post("/paid"))
        second = gw.sign(payer, c.post("/paid"))
        assert c.post("/paid", headers=dict([first])).status_code == 200
        limited = c.post("/paid", headers=dict([second]))
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert len(gw.upstream.requests) == 1
        assert gw.balance(payer.address) == before - 100_000  # the limited payment was not settled
        redis.Redis.from_url(redis_url).flushall()  # the window passes
        assert c.post("/paid", headers=dict([second])).status_code == 200  # ... and the same payment still works
        assert gw.balance(payer.address) == before - 200_000


def test_a_redis_storage_shares_the_counters_between_gateway_instances(
    base_chain: DevChain, tmp_path: Path, redis_url: str
) -> None:
    limits = {"storage_url": redis_url, "challenge": "3/minute"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path / "a"), routes=ROUTES, rate_limits=limits) as a,
        running_gateway(base_chain, store_url=sqlite_url(tmp_path / "b"), routes=ROUTES, rate_limits=limits) as b,
        a.client() as ca,
        b.client() as cb,
    ):
        assert [ca.get("/cheap").status_code for _ in range(2)] == [402, 402]
        assert [cb.get("/cheap").status_code for _ in range(2)] == [402, 429]


def test_a_down_rate_limit_storage_lets_requests_through(
    base_chain: DevChain, tmp_path: Path, redis_server: RedisServer, redis_url: str
) -> None:
    """Rate limiting protects capacity, not money: its outage must not become the gateway's outage."""
    limits = {"storage_url": redis_url, "challenge": "1/minute"}
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, rate_limits=limits) as gw,
        gw.client() as c,
    ):
        assert c.get("/cheap").status_code == 402
        redis_server.stop()
        try:
            assert [c.get("/cheap").status_code for _ in range(3)] == [402] * 3
        finally:
            redis_server.start()


def test_rate_limits_can_be_turned_off(base_chain: DevChain, tmp_path: Path) -> None:
    limits = {"enabled": False, "challenge": "1/minute"}
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, rate_limits=limits) as gw,
        gw.client() as c,
    ):
        assert gw.app.limiter is None
        assert [c.get("/dear").status_code for _ in range(5)] == [402] * 5


def test_concurrent_burst_admits_exactly_the_limit(base_chain: DevChain, tmp_path: Path) -> None:
    limits = {"challenge": "10/minute"}
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, rate_limits=limits) as gw:

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=gw.url) as c:
                return [r.status_code for r in await asyncio.gather(*(c.get("/cheap") for _ in range(40)))]

        codes = asyncio.run(burst())
        assert codes.count(402) == 10
        assert codes.count(429) == 30


def test_behind_a_trusted_proxy_the_limit_follows_the_address_the_proxy_appended(
    base_chain: DevChain, tmp_path: Path
) -> None:
    """One bucket per real client, not one for the whole load balancer; and entries a client prepends to
    X-Forwarded-For (a fresh one per request) cannot open a fresh bucket."""
    server = {"trust_forwarded_headers": True}
    with (
        running_gateway(
            base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, rate_limits={"enabled": True}, server=server
        ) as gw,
        gw.client() as c,
    ):
        spoofed = [c.get("/dear", headers={"X-Forwarded-For": f"10.0.0.{i}, 203.0.113.7"}) for i in range(3)]
        assert [r.status_code for r in spoofed] == [402, 402, 429]
        assert c.get("/dear", headers={"X-Forwarded-For": "203.0.113.8"}).status_code == 402
        assert gw.upstream.requests == []
        c.get("/free", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.9"})
        assert gw.upstream.requests[-1].header_values("x-forwarded-for") == ["203.0.113.9"]  # and the upstream too

    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, rate_limits={"enabled": True}) as gw,
        gw.client() as c,
    ):
        # Not trusted: the header is ignored, every request is the socket's address.
        codes = [c.get("/dear", headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code for i in range(3)]
        assert codes == [402, 402, 429]


# --- invalid payments count apart from verified ones (docs/threat-model.md T41) -----------------------------------


def test_garbage_payments_from_one_address_never_lock_out_a_genuine_payer_behind_it(
    base_chain: DevChain, tmp_path: Path
) -> None:
    limits = {"paid": "3/minute", "invalid_payments": "3/minute"}
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, rate_limits=limits) as gw,
        gw.client() as c,
    ):
        challenge = c.get("/cheap")
        unfunded = Account.create()  # a well-signed authorization from a wallet without the money
        garbage = [{"X-PAYMENT": "not-a-payment"}, dict([gw.sign(unfunded, challenge)])] * 5
        codes = [c.get("/cheap", headers=h).status_code for h in garbage]
        assert all(400 <= code < 500 and code != 429 for code in codes)  # refused for what they are, every one
        payer = base_chain.new_payer(1_000_000)
        r = c.get("/cheap", headers=dict([gw.sign(payer, c.get("/cheap"))]))
        assert r.status_code == 200, r.text
        assert [u.path for u in gw.upstream.requests] == ["/cheap"]


def test_verified_payments_never_spend_their_addresss_budget(base_chain: DevChain, tmp_path: Path) -> None:
    """Many genuine payers behind one address: each is limited as a payer, none by the others' payments."""
    # Per day: a sliding-window counter forgives part of the last window once a new one starts, so a per-minute
    # limit would let the third payment through whenever the test straddles a minute boundary.
    limits = {"paid": "2/day", "invalid_payments": "1/day"}
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, rate_limits=limits) as gw,
        gw.client() as c,
    ):
        payers = [base_chain.new_payer(1_000_000) for _ in range(5)]
        for payer in payers:
            for _ in range(2):
                r = c.get("/cheap", headers=dict([gw.sign(payer, c.get("/cheap"))]))
                assert r.status_code == 200, r.text
        limited = c.get("/cheap", headers=dict([gw.sign(payers[0], c.get("/cheap"))]))
        assert limited.status_code == 429  # the per-payer limit still holds
        assert len(gw.upstream.requests) == 10


async def test_an_address_over_its_invalid_budget_is_verified_one_payment_at_a_time() -> None:
    limiter = RateLimiter(RateLimitConfig(invalid_payments="2/minute"), {})
    route = "GET /cheap"
    for _ in range(2):
        async with limiter.verifying("ip:a", route) as v:
            assert v.retry_after is None
            await v.invalid()
    inside = peak = 0

    async def verify(key: str) -> float | None:
        nonlocal inside, peak
        async with limiter.verifying(key, route) as v:
            if v.retry_after is not None:
                return v.retry_after
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.02)
            inside -= 1
            return None

    # Over budget: admitted (a genuine payer behind this address still gets through), but one at a time.
    assert await asyncio.gather(*(verify("ip:a") for _ in range(8))) == [None] * 8
    assert peak == 1
    # Another address is not held up by it.
    peak = 0
    assert await asyncio.gather(*(verify("ip:b") for _ in range(4))) == [None] * 4
    assert peak == 4
    # A queue longer than the slot keeps is refused at once with the budget's Retry-After, and nothing lingers.
    results = await asyncio.gather(*(verify("ip:a") for _ in range(40)))
    refused = [r for r in results if r is not None]
    assert len(refused) >= 40 - 17 and all(1 <= r <= 60 for r in refused)
    assert limiter._slots == {}
