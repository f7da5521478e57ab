"""What a job call answers for each kind of X-Payer-Auth, through a real paid gateway: the two spellings of a
signature open the job, a header that is wrong in itself gets a 401 that says how, and the payer's signature over
a commonly mistaken text gets a 401 naming the text to sign, never a silent 404 or empty list; anything that
could reveal someone else's job stays the 404 of an unknown job."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DevChain
from gateway.jobs.api import Kind, Match
from gateway.jobs.layer import JobsLayer
from gateway.jobs.model import Job, JobStatus
from gateway.x402.payer_auth import payer_auth_message
from tests.jobs.helpers import bearer, jobs_gateway, pay, poll, signed
from tests.support.gateway import GatewayUnderTest, sqlite_url
from tests.support.jobs_upstreams import SlowAgent

JOBS = "/api/messaging/jobs"


@pytest.fixture(scope="module")
def gateway(base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    store = sqlite_url(tmp_path_factory.mktemp("payer-auth"))
    with jobs_gateway(base_chain, store_url=store, upstream=SlowAgent(), mode="runner", style="messaging") as gw:
        yield gw


@pytest.fixture(scope="module")
def paid_job(gateway: GatewayUnderTest, base_chain: DevChain) -> tuple[LocalAccount, str]:
    payer = base_chain.new_payer(1_000_000)
    with gateway.client() as c:
        r = pay(gateway, c, payer, "POST", JOBS, json={"userId": "u", "content": "a question"})
        assert r.status_code == 201, r.text
        job_id = r.json()["jobId"]
        assert poll(c, f"{JOBS}/{job_id}", bearer(r))["status"] == "completed"
    return payer, job_id


def without_0x(headers: dict[str, str]) -> dict[str, str]:
    value = headers["X-Payer-Auth"]
    assert ".0x" in value
    return {"X-Payer-Auth": value.replace(".0x", ".", 1)}


def test_a_signature_without_0x_opens_the_job_and_lists_it(
    gateway: GatewayUnderTest, paid_job: tuple[LocalAccount, str]
) -> None:
    payer, job_id = paid_job
    path = f"{JOBS}/{job_id}"
    with gateway.client() as c:
        status = c.get(path, headers=without_0x(signed(payer, "GET", path)))
        assert (status.status_code, status.json()["status"]) == (200, "completed")
        listed = c.get(JOBS, headers=without_0x(signed(payer, "GET", JOBS)))
        assert listed.status_code == 200 and [j["jobId"] for j in listed.json()["jobs"]] == [job_id]


def test_the_payers_signature_over_the_path_with_its_query_is_a_401_naming_the_text_to_sign(
    gateway: GatewayUnderTest, paid_job: tuple[LocalAccount, str]
) -> None:
    payer, job_id = paid_job
    path = f"{JOBS}/{job_id}"
    with gateway.client() as c:
        r = c.get(path + "?verbose=1", headers=signed(payer, "GET", path + "?verbose=1"))
        assert r.status_code == 401, r.text
        body = r.json()
        assert (body["error"], body["reason"]) == ("Authentication required", "payer_auth_wrong_message")
        timestamp = int(signed(payer, "GET", path)["X-Payer-Auth"].split(".")[0])
        assert "the path with its query string" in body["message"]
        assert json.dumps(payer_auth_message("GET", path, timestamp))[:-12] in body["message"]  # minus the time

        # The list: a signature over the query string no longer yields a silent empty list.
        listed = c.get(JOBS, params={"limit": 5}, headers=signed(payer, "GET", f"{JOBS}?limit=5"))
        assert (listed.status_code, listed.json()["reason"]) == (401, "payer_auth_wrong_message")
        right = c.get(JOBS, params={"limit": 5}, headers=signed(payer, "GET", JOBS))
        assert right.status_code == 200 and right.json()["total"] == 1


def test_a_strangers_signatures_right_or_mistaken_reveal_nothing(
    gateway: GatewayUnderTest, paid_job: tuple[LocalAccount, str]
) -> None:
    _, job_id = paid_job
    stranger = Account.create()
    path = f"{JOBS}/{job_id}"
    with gateway.client() as c:
        for signed_path in (path, path + "?verbose=1"):
            r = c.get(path + "?verbose=1", headers=signed(stranger, "GET", signed_path))
            assert (r.status_code, r.json()["error"]) == (404, "Job not found")
        for signed_path in (JOBS, f"{JOBS}?limit=5"):
            listed = c.get(JOBS, params={"limit": 5}, headers=signed(stranger, "GET", signed_path))
            assert (listed.status_code, listed.json()["jobs"], listed.json()["total"]) == (200, [], 0)


def test_a_malformed_or_stale_header_gets_the_same_401_for_a_real_job_and_an_unknown_one(
    gateway: GatewayUnderTest, paid_job: tuple[LocalAccount, str]
) -> None:
    payer, job_id = paid_job
    now = int(time.time())
    real, unknown = f"{JOBS}/{job_id}", f"{JOBS}/00000000-0000-4000-8000-000000000000"
    with gateway.client() as c:
        for reason, headers_for in (
            ("payer_auth_malformed", lambda path: {"X-Payer-Auth": f"{now}.0xnothex"}),
            (
                "payer_auth_expired",
                lambda path: {"X-Payer-Auth": _header_at(payer, "GET", path, now - 400)},
            ),
        ):
            answers = [c.get(path, headers=headers_for(path)) for path in (real, unknown)]
            assert [a.status_code for a in answers] == [401, 401]
            assert answers[0].json()["reason"] == answers[1].json()["reason"] == reason
            bodies = [{k: v for k, v in a.json().items() if k != "message"} for a in answers]
            assert bodies[0] == bodies[1]  # nothing in the answer depends on the job
        listed = c.get(JOBS, headers={"X-Payer-Auth": "not a header"})
        assert (listed.status_code, listed.json()["reason"]) == (401, "payer_auth_malformed")
        bare = c.get(JOBS)
        assert (bare.status_code, bare.json()["reason"]) == (401, "payer_auth_required")
        # Without any X-Payer-Auth, a call on a job is still the unknown job's 404.
        assert c.get(real).status_code == 404


def test_a_valid_job_token_opens_the_job_whatever_x_payer_auth_says(
    gateway: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with gateway.client() as c:
        r = pay(gateway, c, payer, "POST", JOBS, json={"userId": "u", "content": "another"})
        headers = {**bearer(r), "X-Payer-Auth": "garbage"}
        status = c.get(f"{JOBS}/{r.json()['jobId']}", headers=headers)
        assert status.status_code == 200, status.text


def _header_at(account: LocalAccount, method: str, path: str, timestamp: int) -> str:
    from gateway.client.jobauth import payer_auth_headers

    return payer_auth_headers(account, method, path, now=timestamp)["X-Payer-Auth"]


def test_a_path_signed_as_sent_opens_a_job_whose_id_needs_percent_escapes() -> None:
    # Route matching sees the decoded path; a client signs the path it sends. Both spellings open the job.
    payer = Account.create()
    layer = JobsLayer(
        SimpleNamespace(routes=None, token_header="X-Job-Token", auth_max_skew_seconds=300),  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
    )
    job = Job(job_id="a b", payer=payer.address.lower(), status=JobStatus.COMPLETED, created_at=0)
    match = Match(Kind.STATUS, "a b", "/agent/job/a b")

    def scope(signed_path: str) -> dict[str, Any]:
        value = signed(payer, "GET", signed_path)["X-Payer-Auth"].encode()
        return {
            "method": "GET",
            "path": "/agent/job/a b",
            "raw_path": b"/agent/job/a%20b",
            "query_string": b"",
            "headers": [(b"x-payer-auth", value)],
        }

    assert layer.opens(job, scope("/agent/job/a%20b"), match)  # as sent
    assert layer.opens(job, scope("/agent/job/a b"), match)  # decoded
    assert not layer.opens(job, scope("/agent/job/a%20c"), match)


def test_the_401s_reason_reaches_the_access_log(
    gateway: GatewayUnderTest, paid_job: tuple[LocalAccount, str], caplog: pytest.LogCaptureFixture
) -> None:
    payer, job_id = paid_job
    path = f"{JOBS}/{job_id}"
    caplog.set_level(logging.INFO, logger="gateway.access")
    with gateway.client() as c:
        assert c.get(path + "?x=1", headers=signed(payer, "GET", path + "?x=1")).status_code == 401
    lines = [getattr(r, "access", {}) for r in caplog.records if r.name == "gateway.access"]
    assert any(a.get("status") == 401 and a.get("reason") == "payer_auth_wrong_message" for a in lines), lines
