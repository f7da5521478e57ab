"""Runner jobs across two gateway instances whose wall clocks disagree.

The runner is a real ``x402-gateway serve`` process (its own clock, its own lock files, killable with SIGKILL);
the peer is a gateway in this process whose clock is stepped ahead (``step_clock`` on :mod:`gateway.jobs.model`,
as the other clock tests do): it answers the payer's polls and sweeps the job store like any other instance.
Before a job recorded its runner's instance, the peer judged the runner's lease by its own wall clock alone:
ahead by more than ``runner_lease_seconds``, it declared a healthy paid job "runner lost" (docs/jobs.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount

import gateway.jobs.model
from gateway.client.exact import choose_requirement, parse_challenge, sign_exact_payment
from gateway.dev.chain import DevChain
from tests.clock.test_clock_jumps import BACKENDS, step_clock, store_url_on
from tests.jobs.helpers import bearer, jobs_gateway, poll
from tests.support.jobs_upstreams import API_KEY, SlowAgent, wait_until
from tests.support.processes import ServedGateway, served_gateway
from tests.support.servers import serve_asgi

JOBS = "/api/messaging/jobs"
LEASE = 2.0  # runner_lease_seconds on both instances
AHEAD = 10.0  # the peer's clock: well past the lease, well within the jobs' 30 s deadline
RUNNER: dict[str, Any] = {
    "mode": "runner",
    "style": "messaging",
    "runner_upstream_path": "/run",
    "runner_lease_seconds": LEASE,
    "sweep_interval_seconds": 0.2,
    "shutdown_grace_seconds": 0,
}


@contextlib.contextmanager
def runner_and_peer(
    chain: DevChain, tmp_path: Path, store_url: str, agent: SlowAgent, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ServedGateway, httpx.Client]]:
    """The runner process and a client of the peer (clock ``AHEAD``), both on ``store_url``."""
    with (
        serve_asgi(agent) as agent_url,
        served_gateway(
            chain,
            tmp_path,
            upstream_url=agent_url,
            routes=[{"route": f"POST {JOBS}", "price": "0.02"}],
            store={"url": store_url},
            jobs=RUNNER,
            **{"upstream.headers": {"X-API-Key": API_KEY}},
        ) as runner,
        jobs_gateway(chain, store_url=store_url, upstream=agent, **RUNNER) as peer,
        peer.client() as c,
    ):
        step_clock(monkeypatch, AHEAD, gateway.jobs.model)  # the peer's reads and sweeps, not the runner process
        yield runner, c


def submit(runner: ServedGateway, payer: LocalAccount, content: str) -> httpx.Response:
    """A paid job submitted to the runner process."""
    body = {"userId": "u", "content": content}
    first = httpx.post(runner.url + JOBS, json=body)
    assert first.status_code == 402, first.text
    name, value = sign_exact_payment(payer, choose_requirement(parse_challenge(first.headers, first.content)))
    r = httpx.post(runner.url + JOBS, json=body, headers={name: value}, timeout=30)
    assert r.status_code == 201, r.text
    return r


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_peer_whose_clock_is_ahead_leaves_a_live_runners_job_running_to_its_result(
    backend: str, base_chain: DevChain, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The payer polls another instance than the one running its job, and that instance sweeps. Its clock 10 s
    ahead, the lease (2 s, renewed every third) looks lapsed at every look. It failed the job "runner lost" at the
    first poll, and the runner, finding the job no longer processing, closed the upstream call: a paid job reported
    failed while it ran. The runner's instance is now recorded on the job and asked alive through the store."""
    agent = SlowAgent()
    payer = base_chain.new_payer(1_000_000)
    with runner_and_peer(base_chain, tmp_path, store_url_on(backend, request, tmp_path), agent, monkeypatch) as (
        runner,
        c,
    ):
        r = submit(runner, payer, "sleep 3")
        path = f"{JOBS}/{r.json()['jobId']}"
        assert wait_until(lambda: len(agent.calls) == 1)  # the runner process is calling the upstream
        doc = poll(c, path, bearer(r), timeout=20.0)  # through the peer, which sweeps meanwhile
        assert doc["status"] == "completed", doc
        assert doc["result"]["message"]["content"] == "Answer: sleep 3"
        assert r.json()["jobId"] not in agent.aborted


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_runner_killed_with_sigkill_still_has_its_job_declared_lost_within_the_lease(
    backend: str, base_chain: DevChain, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whose runner is alive is asked of the store (SQLite: a lock file the kernel lets go when the process dies;
    Redis: a key the server expires), so a runner killed without a word must still lose its job as promptly as the
    lease alone made it: the peer (clock ahead) keeps the job while its runner lives, then fails it "runner lost"
    within the lease of the kill. Before the runner was named on the job, the peer failed it before the kill."""
    agent = SlowAgent()
    payer = base_chain.new_payer(1_000_000)
    with runner_and_peer(base_chain, tmp_path, store_url_on(backend, request, tmp_path), agent, monkeypatch) as (
        runner,
        c,
    ):
        r = submit(runner, payer, "sleep 60")
        path = f"{JOBS}/{r.json()['jobId']}"
        assert wait_until(lambda: len(agent.calls) == 1)
        time.sleep(2 * LEASE)  # the peer reads and sweeps a lease that looks lapsed, its runner alive
        before = c.get(path, headers=bearer(r)).json()
        assert before["status"] == "processing", before
        os.kill(runner.pid, signal.SIGKILL)  # no clean shutdown, no last word
        killed = time.monotonic()
        doc = poll(c, path, bearer(r), timeout=10.0)
        waited = time.monotonic() - killed
        assert (doc["status"], doc.get("error")) == ("failed", "runner lost"), doc
        assert waited < LEASE + 1.0, f"declared lost {waited:.2f} s after the kill"
