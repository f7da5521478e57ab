"""What a refused job submit costs, as docs/jobs.md and the README state it: nothing under the submit route's
``settlement = "after"``; under ``"before"`` the money moved before the submit was forwarded or checked, so the
refused submit is paid, and that same payment then buys one successful submit, never a second charge."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway.dev.chain import DevChain
from tests.e2e.helpers import Balances
from tests.jobs.helpers import PRICE, bearer, jobs_gateway, poll
from tests.support.gateway import GatewayUnderTest, sqlite_url
from tests.support.jobs_upstreams import FakeJobsApi, SlowAgent

JOBS = "/api/messaging/jobs"


def _payment(gw: GatewayUnderTest, c: httpx.Client, payer: object, path: str, body: object) -> dict[str, str]:
    first = c.post(path, json=body)
    assert first.status_code == 402, first.text
    name, value = gw.sign(payer, first)  # type: ignore[arg-type]
    return {name: value}


def test_front_settle_before_charges_a_refused_submit_once_and_its_payment_buys_the_retry(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("agent", refuse_submit=(429, {"error": "Rate limit exceeded", "message": "Retry later"}))
    with (
        jobs_gateway(
            base_chain, store_url=sqlite_url(tmp_path), upstream=api, mode="front", style="agent", settlement="before"
        ) as gw,
        gw.client() as c,
    ):
        money = Balances(gw, payer.address)
        paid = _payment(gw, c, payer, "/agent/prompt", {"prompt": "x"})
        refused = c.post("/agent/prompt", json={"prompt": "x"}, headers=paid)
        assert refused.status_code == 429 and "x-job-token" not in refused.headers
        money.assert_charged_once(PRICE)  # "before": the refused submit has been paid

        api.refuse_submit = None
        retried = c.post("/agent/prompt", json={"prompt": "x"}, headers=paid)  # the same payment
        assert retried.status_code == 202, retried.text
        assert c.get(f"/agent/job/{retried.json()['jobId']}", headers=bearer(retried)).status_code == 200
        money.assert_charged_once(PRICE)  # ...and it bought this submit: never a second charge
        again = c.post("/agent/prompt", json={"prompt": "x"}, headers=paid)
        assert again.status_code == 402  # used up by the successful submit


def test_runner_settle_before_charges_an_invalid_submit_and_its_payment_buys_the_corrected_one(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent()
    with (
        jobs_gateway(
            base_chain,
            store_url=sqlite_url(tmp_path),
            upstream=agent,
            mode="runner",
            style="messaging",
            settlement="before",
        ) as gw,
        gw.client() as c,
    ):
        money = Balances(gw, payer.address)
        paid = _payment(gw, c, payer, JOBS, {"content": "no user"})
        invalid = c.post(JOBS, json={"content": "no user"}, headers=paid)
        assert (invalid.status_code, invalid.json()["error"]) == (400, "Invalid request")
        money.assert_charged_once(PRICE)
        assert agent.calls == []  # no job ran

        fixed = c.post(JOBS, json={"userId": "u", "content": "now right"}, headers=paid)
        assert fixed.status_code == 201, fixed.text
        assert poll(c, f"{JOBS}/{fixed.json()['jobId']}", bearer(fixed))["status"] == "completed"
        money.assert_charged_once(PRICE)
        assert len(agent.calls) == 1


def test_settle_after_a_refused_submit_costs_nothing_in_either_mode(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("agent", refuse_submit=(400, {"error": "Invalid request", "message": "prompt is required"}))
    (tmp_path / "front").mkdir()
    (tmp_path / "runner").mkdir()
    with (
        jobs_gateway(
            base_chain, store_url=sqlite_url(tmp_path / "front"), upstream=api, mode="front", style="agent"
        ) as gw,
        gw.client() as c,
    ):
        money = Balances(gw, payer.address)
        paid = _payment(gw, c, payer, "/agent/prompt", {"prompt": "x"})
        assert c.post("/agent/prompt", json={"prompt": "x"}, headers=paid).status_code == 400
        money.assert_unchanged()
    with (
        jobs_gateway(
            base_chain, store_url=sqlite_url(tmp_path / "runner"), upstream=SlowAgent(), mode="runner", style="agent"
        ) as gw,
        gw.client() as c,
    ):
        money = Balances(gw, payer.address)
        paid = _payment(gw, c, payer, "/agent/prompt", {"threadId": "t"})
        assert c.post("/agent/prompt", json={"threadId": "t"}, headers=paid).status_code == 400
        money.assert_unchanged()
