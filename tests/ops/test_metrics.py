"""Prometheus metrics: what operators alert on counts real events, per gateway, with bounded labels."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway.dev.chain import DevChain
from tests.ops.support import samples, value
from tests.support.gateway import running_gateway, sqlite_url
from tests.support.servers import Behaviour

NS = "x402_gateway_"


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(r.text)


def test_a_paid_request_a_challenge_and_a_replay_are_counted_once_each(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw, gw.client() as c:
        challenge = c.post("/paid", json={})
        assert challenge.status_code == 402
        name, header = gw.sign(payer, challenge)
        assert c.post("/paid", json={}, headers={name: header}).status_code == 200
        assert c.post("/paid", json={}, headers={name: header}).status_code == 402  # replay
        assert c.get("/free/thing").status_code == 200  # unpriced, proxied
        m = scrape(c)

    route = {"route": "POST /paid"}
    assert value(m, NS + "requests_total", **route, outcome="paid", status_class="2xx") == 1
    assert value(m, NS + "requests_total", **route, outcome="challenge", status_class="4xx") == 1
    assert value(m, NS + "requests_total", **route, outcome="refused", status_class="4xx") == 1
    assert value(m, NS + "requests_total", route="unpriced", outcome="free", status_class="2xx") == 1
    assert value(m, NS + "payment_required_total", **route, reason="payment_required") == 1
    assert value(m, NS + "payment_required_total", **route, reason="payment_already_used") == 1
    assert value(m, NS + "payments_verified_total", network="base", kind="exact") == 1
    assert value(m, NS + "payments_settled_total", network="base", kind="exact") == 1
    assert value(m, NS + "payments_failed_total", kind="exact", reason="payment_already_used") == 1
    assert value(m, NS + "revenue_atomic_total", network="base") == 100_000  # $0.10 in atomic units, exactly
    assert value(m, NS + "settle_seconds_count", network="base") == 1
    assert value(m, NS + "verify_seconds_count", network="base", kind="exact") == 1
    assert value(m, NS + "upstream_seconds_count", **route) == 1
    assert value(m, NS + "store_errors_total") == 0
    assert value(m, NS + "rpc_errors_total") == 0
    # Labels come from configuration and fixed vocabularies only: no path, no address, no tx hash.
    every_label_value = {v for (_, labels), _ in m.items() for _, v in labels}
    assert "/free/thing" not in every_label_value
    assert not any(v.lower().startswith("0x") for v in every_label_value)


def test_an_upstream_failure_is_unserved_and_earns_nothing(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw, gw.client() as c:
        gw.upstream.reset(Behaviour(status=502))
        challenge = c.post("/paid", json={})
        name, header = gw.sign(payer, challenge)
        assert c.post("/paid", json={}, headers={name: header}).status_code == 502
        m = scrape(c)
    assert value(m, NS + "requests_total", route="POST /paid", outcome="unserved", status_class="5xx") == 1
    assert value(m, NS + "revenue_atomic_total") == 0
    assert value(m, NS + "payments_settled_total") == 0


def test_each_gateway_has_its_own_registry(base_chain: DevChain, tmp_path: Path) -> None:
    """Two gateways in one process (tests, an app mounting two) must neither collide nor mix their counts."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path / "a")) as a,
        running_gateway(base_chain, store_url=sqlite_url(tmp_path / "b")) as b,
        a.client() as ca,
        b.client() as cb,
    ):
        for _ in range(3):
            assert ca.get("/cheap").status_code == 402
        assert cb.get("/cheap").status_code == 402
        assert value(scrape(ca), NS + "payment_required_total", route="GET /cheap") == 3
        assert value(scrape(cb), NS + "payment_required_total", route="GET /cheap") == 1


def test_readiness_results_are_exported_as_dependency_gauges(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw, gw.client() as c:
        assert c.get("/readyz").status_code == 200
        m = scrape(c)
    for check in ("store", "rpc:base", "upstream"):
        assert value(m, NS + "dependency_up", check=check) == 1


def test_the_store_outage_counter_moves_when_the_store_is_down(
    base_chain: DevChain, redis_server: object, redis_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=redis_url) as gw, gw.client() as c:
        challenge = c.post("/paid", json={})
        name, header = gw.sign(payer, challenge)
        redis_server.stop()  # type: ignore[attr-defined]
        try:
            r = c.post("/paid", json={}, headers={name: header})
        finally:
            redis_server.start()  # type: ignore[attr-defined]
        assert r.status_code == 503
        m = scrape(c)
    assert value(m, NS + "store_errors_total", reason="store_unavailable") == 1
    assert value(m, NS + "payments_failed_total", reason="store_unavailable") == 1
    assert gw.upstream.requests == []
