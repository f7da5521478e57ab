"""Clients written from the seeds' descriptions alone (docs/jobs.md, "Sources"), against a paid gateway on anvil:
what they send at the edges (unicode their own language produces, metadata near its documented size, the
fields the seed says are always there) is answered in the seed's words, and never costs them a job they do not
get."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.client import AsyncX402Client
from gateway.dev.chain import DevChain
from tests.e2e.helpers import Balances
from tests.jobs.helpers import PRICE, STATUS, bearer, jobs_gateway, pay, poll, signed
from tests.support.gateway import sqlite_url
from tests.support.jobs_upstreams import FakeJobsApi, SlowAgent

JOBS = "/api/messaging/jobs"
SUBMIT_PATH = {"agent": "/agent/prompt", "messaging": JOBS}
JSON = {"content-type": "application/json"}

# A JavaScript client that keeps a prompt within "10,000 characters" with prompt.slice(0, 10000) counts UTF-16
# units, so it may cut an emoji in half; JSON.stringify then writes the lone half as an escape.
CUT_EMOJI = "\\ud83d"


def _raw_bodies(style: str) -> list[bytes]:
    """Submit bodies, each with an unpaired surrogate escape in one field the job keeps."""
    if style == "agent":
        return [
            b'{"prompt": "price of ETH ' + CUT_EMOJI.encode() + b'"}',
            b'{"prompt": "price of ETH", "threadId": "thr_' + CUT_EMOJI.encode() + b'"}',
        ]
    return [
        b'{"userId": "u-1", "content": "price of ETH ' + CUT_EMOJI.encode() + b'"}',
        b'{"userId": "u-' + CUT_EMOJI.encode() + b'", "content": "price of ETH"}',
        b'{"userId": "u-1", "content": "price of ETH", "agentId": "a-' + CUT_EMOJI.encode() + b'"}',
        b'{"userId": "u-1", "content": "price of ETH", "metadata": {"note": "' + CUT_EMOJI.encode() + b'"}}',
    ]


@pytest.mark.parametrize("style", ["agent", "messaging"])
def test_a_runner_submit_holding_an_unpaired_surrogate_is_a_400_that_costs_nothing(
    base_chain: DevChain, store_url: str, style: str
) -> None:
    """Such a body used to pass validation, settle the payment, then fail to be recorded (500): the payer was
    charged for a job that never existed."""
    payer = base_chain.new_payer(1_000_000)
    with (
        jobs_gateway(base_chain, store_url=store_url, upstream=SlowAgent(), mode="runner", style=style) as gw,
        gw.client() as c,
    ):
        money = Balances(gw, payer.address)
        for raw in _raw_bodies(style):
            r = pay(gw, c, payer, "POST", SUBMIT_PATH[style], content=raw, headers=JSON)
            money.assert_unchanged()
            assert r.status_code == 400, (raw, r.status_code, r.text)
            assert r.json()["error"] == "Invalid request" and "surrogate" in r.json()["message"], r.text
            assert "x-job-token" not in r.headers
        # The same text with the emoji whole is a job like any other, charged once.
        whole = {"prompt": "price of ETH \U0001f600"} if style == "agent" else {"userId": "u-1", "content": "😀"}
        r = pay(gw, c, payer, "POST", SUBMIT_PATH[style], json=whole)
        assert r.status_code in (201, 202), r.text
        doc = poll(c, STATUS[style].format(r.json()["jobId"]), bearer(r))
        assert (doc["status"], doc["prompt"]) == ("completed", whole.get("prompt") or whole["content"])
        money.assert_charged_once(PRICE)


def test_style_b_metadata_is_measured_in_utf8_bytes_of_its_json(base_chain: DevChain, tmp_path: Path) -> None:
    """Seed 004: metadata of at most 10,000 bytes of JSON. 4,000 "é" are 8,011 bytes of UTF-8 JSON; they were
    counted as Python's ``\\u00e9`` escapes (24,011) and refused."""
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent()
    with (
        jobs_gateway(
            base_chain, store_url=sqlite_url(tmp_path), upstream=agent, mode="runner", style="messaging"
        ) as gw,
        gw.client() as c,
    ):
        money = Balances(gw, payer.address)
        fits = {"note": "é" * 4_000}
        assert len(json.dumps(fits, separators=(",", ":"), ensure_ascii=False).encode()) == 8_011
        r = pay(gw, c, payer, "POST", JOBS, json={"userId": "u-1", "content": "hi", "metadata": fits})
        assert r.status_code == 201, r.text
        doc = poll(c, f"{JOBS}/{r.json()['jobId']}", bearer(r))
        assert (doc["status"], doc["metadata"]) == ("completed", fits)
        money.assert_charged_once(PRICE)
        too_big = {"note": "é" * 5_000}  # 10,011 bytes
        r = pay(gw, c, payer, "POST", JOBS, json={"userId": "u-1", "content": "hi", "metadata": too_big})
        assert r.status_code == 400 and r.json()["error"] == "Invalid request", r.text
        money.assert_charged_once(PRICE)
        assert len(agent.calls) == 1


def test_style_b_always_shows_an_agent_id_uuid_and_its_result_names_the_same_author(
    base_chain: DevChain, tmp_path: Path
) -> None:
    """Seed 004's JobDetailsResponse has ``agentId: UUID`` (not optional: the API "uses first agent if
    omitted"); a submit without one used to read back ``agentId: null``, and ``authorId: "agent"``."""
    payer = base_chain.new_payer(1_000_000)
    with (
        jobs_gateway(
            base_chain, store_url=sqlite_url(tmp_path), upstream=SlowAgent(), mode="runner", style="messaging"
        ) as gw,
        gw.client() as c,
    ):
        r = pay(gw, c, payer, "POST", JOBS, json={"userId": "u-1", "content": "hi"})
        assert r.status_code == 201, r.text
        job_id = r.json()["jobId"]
        doc = poll(c, f"{JOBS}/{job_id}", bearer(r))
        assert doc["status"] == "completed", doc
        assert isinstance(doc["agentId"], str) and str(uuid.UUID(doc["agentId"])) == doc["agentId"]
        assert doc["result"]["message"]["authorId"] == doc["agentId"]
        (listed,) = c.get(JOBS, headers=signed(payer, "GET", JOBS)).json()["jobs"]
        assert listed["agentId"] == doc["agentId"]
        # A named agent is shown as named.
        r = pay(gw, c, payer, "POST", JOBS, json={"userId": "u-1", "content": "hi", "agentId": "agent-7"})
        doc = poll(c, f"{JOBS}/{r.json()['jobId']}", bearer(r))
        assert (doc["agentId"], doc["result"]["message"]["authorId"]) == ("agent-7", "agent-7")


def test_a_fronted_style_b_list_holding_a_surrogate_escape_is_still_the_payers_json_list(
    base_chain: DevChain, tmp_path: Path
) -> None:
    """The upstream echoes a prompt with an unpaired surrogate as valid JSON (an escape); the gateway's filtered
    list used to fail re-encoding it (500 text/plain) for as long as that job was listed."""
    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("messaging")
    with (
        jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=api, mode="front", style="messaging") as gw,
        gw.client() as c,
    ):
        raw = b'{"userId": "u-1", "content": "cut ' + CUT_EMOJI.encode() + b'"}'
        r = pay(gw, c, payer, "POST", JOBS, content=raw, headers=JSON)
        assert r.status_code == 201, r.text
        job_id = r.json()["jobId"]
        listed = c.get(JOBS, headers=signed(payer, "GET", JOBS))
        assert listed.status_code == 200, listed.text
        assert listed.headers["content-type"] == "application/json"
        doc: dict[str, Any] = json.loads(listed.content)
        assert ([j["jobId"] for j in doc["jobs"]], doc["total"], doc["filtered"]) == ([job_id], 1, 1)
        assert doc["jobs"][0]["prompt"] == "cut \ud83d"


async def test_the_sdks_default_style_b_user_id_is_a_uuid_the_same_for_every_job_of_a_wallet(
    base_chain: DevChain, tmp_path: Path
) -> None:
    """Seed 004 types ``userId`` as a UUID; the SDK's default was the wallet address, which an API that checks
    the type refuses (400) on every submit."""
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent()
    with jobs_gateway(
        base_chain, store_url=sqlite_url(tmp_path), upstream=agent, mode="runner", style="messaging"
    ) as gw:
        async with AsyncX402Client(gw.url, account=payer, style="messaging") as client:
            first = await client.prompt_and_wait("one", interval=0.05)
            second = await client.prompt_and_wait("two", interval=0.05)
    assert first.user_id is not None and str(uuid.UUID(first.user_id)) == first.user_id
    assert second.user_id == first.user_id
    sent = [json.loads(call.body)["userId"] for call in agent.calls]
    assert sent == [first.user_id, first.user_id]


def test_a_job_token_is_never_kept_by_the_idempotency_store_and_its_replay_opens_with_the_wallet(
    base_chain: DevChain, tmp_path: Path
) -> None:
    """Failed before: the submit's answer, its X-Job-Token among its headers, was kept whole for 24 h in the
    idempotency store (the SDK sends an Idempotency-Key with every submit), where docs/jobs.md promises that only
    the token's SHA-256 is stored. Now the token header is not stored; the replayed answer has none, and the
    payer opens the job with its wallet signature."""
    store_url = sqlite_url(tmp_path)
    payer = base_chain.new_payer(1_000_000)
    body = json.dumps({"prompt": "price of ETH"})
    with (
        jobs_gateway(base_chain, store_url=store_url, upstream=SlowAgent(), mode="runner", style="agent") as gw,
        gw.client() as c,
    ):
        keyed = {**JSON, "Idempotency-Key": "submit-" + uuid.uuid4().hex}
        first = c.post("/agent/prompt", content=body, headers=keyed)
        name, value = gw.sign(payer, first)
        paid = {**keyed, name: value}
        submitted = c.post("/agent/prompt", content=body, headers=paid)
        assert submitted.status_code == 202, submitted.text
        token = submitted.headers["x-job-token"]
        job_id = submitted.json()["jobId"]
        for _ in range(50):  # the answer is stored once it has gone out: until then, 409 and Retry-After
            replayed = c.post("/agent/prompt", content=body, headers=paid)
            if replayed.status_code != 409:
                break
            time.sleep(0.1)
        assert replayed.headers.get("idempotent-replayed") == "true", replayed.text
        assert replayed.json()["jobId"] == job_id and "x-job-token" not in replayed.headers
        status = c.get(STATUS["agent"].format(job_id), headers=signed(payer, "GET", STATUS["agent"].format(job_id)))
        assert status.status_code == 200, status.text
    path = store_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        kept = b"".join(str(row).encode() for table in tables for row in conn.execute(f"SELECT * FROM {table}"))
    assert b"content-type" in kept  # the answer was stored (the check below is not vacuous)
    assert token.encode() not in kept
