"""The SDK's pieces without a chain: the public API, the exception tree, retries, polling, parsing, settings
(httpx.MockTransport stands in for the server)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

import gateway.client as sdk
from gateway.client import (
    ApiError,
    AsyncX402Client,
    FileTokenStore,
    Job,
    JobCancelled,
    JobError,
    JobFailed,
    JobTimedOut,
    PaymentFailed,
    PaymentRefused,
    RetryPolicy,
    SpendControls,
    TransientError,
    TxHashPayments,
    X402ClientError,
)

FAST = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.02)


def test_the_public_api_is_pinned_and_every_error_is_an_x402_client_error() -> None:
    assert sdk.__all__ == [
        "ApiError",
        "AsyncX402Client",
        "FileSessionStore",
        "FileTokenStore",
        "Job",
        "JobCancelled",
        "JobError",
        "JobFailed",
        "JobList",
        "JobPaths",
        "JobTimedOut",
        "JobsHealth",
        "MemorySessionStore",
        "MemoryTokenStore",
        "PaymentFailed",
        "PaymentReceipt",
        "PaymentRefused",
        "RetryPolicy",
        "SessionChannel",
        "SessionRefund",
        "SessionSettings",
        "SessionStore",
        "SpendControls",
        "StatusUpdate",
        "SubmitResult",
        "TokenStore",
        "TransientError",
        "TxHashPayments",
        "X402Client",
        "X402ClientError",
        "choose_requirement",
        "parse_challenge",
        "payment_receipt",
        "sign_exact_payment",
    ]
    assert all(hasattr(sdk, name) for name in sdk.__all__)
    for error in (PaymentRefused, PaymentFailed, ApiError, JobError, TransientError):
        assert issubclass(error, X402ClientError)
    for error in (JobFailed, JobCancelled, JobTimedOut):
        assert issubclass(error, JobError)
    err = ApiError("nope", status=404, reason="Job not found", job_id="job_1")
    assert (err.status, err.reason, err.job_id) == (404, "Job not found", "job_1")
    assert repr(err) == "ApiError(status=404, reason='Job not found', message='nope', job_id='job_1')"
    bare = PaymentRefused("over")
    assert (bare.status, bare.reason, bare.job_id) == (None, "payment_refused", None)


def mock_client(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> AsyncX402Client:
    return AsyncX402Client("http://gateway.test", transport=httpx.MockTransport(handler), retry=FAST, **kw)


async def test_transient_statuses_and_network_errors_are_retried_but_a_4xx_never_is() -> None:
    calls: dict[str, int] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        calls[path] = calls.get(path, 0) + 1
        if path == "/agent/job/bad":
            return httpx.Response(400, json={"error": "Job ID required", "message": "Please provide a job ID"})
        if path == "/agent/job/down":
            return httpx.Response(503, json={"error": "store_unavailable", "message": "try later"})
        if path == "/agent/job/flaky" and calls[path] == 1:
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": "Rate limit exceeded"})
        if path == "/agent/job/gone":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"success": True, "jobId": path.rsplit("/", 1)[1], "status": "pending"})

    async with mock_client(handler) as client:
        with pytest.raises(ApiError) as bad:
            await client.get_job_status("bad", token="t")
        assert (bad.value.status, bad.value.reason, bad.value.job_id) == (400, "Job ID required", "bad")
        with pytest.raises(TransientError) as down:
            await client.get_job_status("down", token="t")
        assert (down.value.status, down.value.reason) == (503, "store_unavailable")
        with pytest.raises(TransientError) as gone:
            await client.get_job_status("gone", token="t")
        assert (gone.value.status, gone.value.reason) == (None, "network_error")
        assert (await client.get_job_status("flaky", token="t")).status == "pending"
    assert calls == {"/agent/job/bad": 1, "/agent/job/down": 3, "/agent/job/gone": 3, "/agent/job/flaky": 2}


def test_retry_delays_back_off_exponentially_with_jitter_and_honour_retry_after() -> None:
    policy = RetryPolicy(attempts=5, backoff=1.0, max_backoff=4.0, max_retry_after=30.0)
    for attempt, cap in ((0, 1.0), (1, 2.0), (2, 4.0), (3, 4.0)):
        delay = policy.delay(attempt)
        assert delay is not None and cap / 2 <= delay <= cap
    assert policy.delay(4) is None  # attempts exhausted
    assert policy.delay(0, "7") == 7.0
    assert policy.delay(0, "120") is None  # longer than we are willing to wait: give up, raise
    assert policy.delay(0, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now


def _job_doc(status: str, updates: list[tuple[str, str]], **extra: Any) -> dict[str, Any]:
    return {
        "success": True,
        "jobId": "job_9",
        "status": status,
        "prompt": "p",
        "createdAt": "2025-01-26T10:00:00.000Z",
        "statusUpdates": [{"message": m, "timestamp": t} for m, t in updates],
        **extra,
    }


async def test_on_update_sees_each_new_update_once_even_when_a_message_repeats() -> None:
    a, b, a2 = (
        ("Working", "2025-01-26T10:00:01Z"),
        ("Half way", "2025-01-26T10:00:02Z"),
        ("Working", "2025-01-26T10:00:03Z"),
    )
    pages = [
        _job_doc("pending", []),
        _job_doc("processing", [a]),
        _job_doc("processing", [a]),
        _job_doc("processing", [a, b]),
        _job_doc("processing", [a, b, a2]),
        _job_doc("completed", [a, b, a2], response="done", richData=[{"type": "x"}], processingTime=3000),
    ]
    served = iter(pages)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer tok"
        return httpx.Response(200, json=next(served))

    seen: list[tuple[str, str]] = []
    async with mock_client(handler) as client:
        job = await client.poll_job(
            "job_9",
            interval=0,
            token="tok",
            on_update=lambda u: seen.append((u.message, u.raw["timestamp"])),
        )
    assert seen == [a, b, a2]
    assert (job.status, job.response, job.rich_data, job.processing_time_ms) == (
        "completed",
        "done",
        ({"type": "x"},),
        3000,
    )


@pytest.mark.parametrize(
    ("doc", "error", "reason"),
    [
        (_job_doc("failed", [], error="Insufficient balance"), JobFailed, "job_failed"),
        (_job_doc("cancelled", [], cancelledAt="2025-01-26T10:00:05Z"), JobCancelled, "job_cancelled"),
        (_job_doc("processing", []), JobTimedOut, "poll_timeout"),
    ],
)
async def test_poll_job_raises_for_a_job_that_does_not_complete_with_the_final_job(
    doc: dict[str, Any], error: type[JobError], reason: str
) -> None:
    async with mock_client(lambda request: httpx.Response(200, json=doc)) as client:
        with pytest.raises(error) as caught:
            await client.poll_job("job_9", interval=0, max_attempts=3, token="t")
    assert (caught.value.reason, caught.value.job_id, caught.value.job.status) == (reason, "job_9", doc["status"])


def test_both_styles_parse_into_one_job_type() -> None:
    style_b = {
        "jobId": "6b1f",
        "status": "completed",
        "agentId": "agent-1",
        "userId": "u",
        "prompt": "2+2?",
        "createdAt": 1_700_000_000_000,
        "expiresAt": 1_700_000_030_000,
        "result": {
            "message": {"id": "m", "content": "4", "authorId": "agent-1", "createdAt": 1_700_000_001_500},
            "processingTimeMs": 1500,
        },
        "metadata": {"k": "v"},
    }
    job = Job.parse(style_b)
    assert (job.job_id, job.status, job.response, job.processing_time_ms) == ("6b1f", "completed", "4", 1500)
    assert job.created_at is not None and job.completed_at is not None
    assert (job.completed_at - job.created_at).total_seconds() == 1.5
    assert (job.user_id, job.agent_id, job.metadata, job.raw) == ("u", "agent-1", {"k": "v"}, style_b)
    # style B shows a cancelled job as failed with cancelledAt: it reads as cancelled
    cancelled = Job.parse({"jobId": "x", "status": "failed", "error": "Job cancelled", "cancelledAt": 1})
    assert cancelled.status == "cancelled" and cancelled.terminal
    assert not Job.parse({"jobId": "x", "status": "queued-somewhere"}).terminal  # unknown: keep polling


def test_spend_controls_read_ints_as_atomic_units_and_decimals_or_strings_as_dollars() -> None:
    assert SpendControls().max_per_payment == 1_000_000  # $1.00 by default, as the official client
    assert SpendControls(max_per_payment=100_000, budget=None).max_per_payment == 100_000
    assert SpendControls(max_per_payment=Decimal("0.1")).max_per_payment == 100_000
    assert SpendControls(budget="$2.50").budget == 2_500_000
    with pytest.raises(TypeError):
        SpendControls(max_per_payment=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SpendControls(budget="0.0000001")
    controls = SpendControls(max_per_payment="0.10", networks={"base"})
    assert repr(controls) == "SpendControls(max_per_payment=$0.10, budget=None, networks=['base'], assets=None)"
    assert controls.allows_network("eip155:8453") and not controls.allows_network("eip155:137")
    usdc = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    assert controls.allows_asset("base", usdc) and not controls.allows_asset("base", "0x" + "22" * 20)
    secret = TxHashPayments(rpc_urls={"base": "https://base.example/v2/SECRETKEY"})
    assert "SECRETKEY" not in repr(secret)


def test_the_token_file_is_private_bounded_and_keyed_by_gateway(tmp_path: Path) -> None:
    store = FileTokenStore(tmp_path / "cfg" / "jobs.json", max_jobs=3)
    for i in range(5):
        store.put("http://a.test/", f"job_{i}", f"tok{i}")
    store.put("http://b.test", "job_0", "other")
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert [store.get("http://a.test", f"job_{i}") for i in range(5)] == [None, None, None, "tok3", "tok4"]
    assert store.get("http://b.test", "job_0") == "other"
    assert sum(len(v) for v in json.loads(store.path.read_text()).values()) == 3


def _challenge_handler(paid_answers: list[Any], seen: list[httpx.Request]) -> Callable[[httpx.Request], httpx.Response]:
    """A server whose 402 is the gateway's own challenge; paid attempts get ``paid_answers`` in turn (a
    Response, or an exception to raise)."""
    from gateway.x402.challenge import Requirement, build_challenge

    req = Requirement(
        network="base",
        chain_id=8453,
        asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        amount=10_000,
        pay_to="0x" + "ab" * 20,
        max_timeout_seconds=60,
        eip712_name="USD Coin",
        eip712_version="2",
    )
    challenge = build_challenge(
        (req,), resource="http://gateway.test/paid", description="", mime_type="", reason="payment_required"
    )
    answers = iter(paid_answers)

    def handler(request: httpx.Request) -> httpx.Response:
        if "payment-signature" not in request.headers:
            headers = [(k.decode(), v.decode()) for k, v in challenge.headers]
            return httpx.Response(402, headers=headers, content=challenge.body)
        seen.append(request)
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, httpx.Response)
        return answer

    return handler


def _refusal(reason: str) -> httpx.Response:
    return httpx.Response(402, json={"x402Version": 1, "error": reason, "accepts": []})


async def test_a_refused_payment_is_payment_failed_and_stays_counted_in_the_budget() -> None:
    from eth_account import Account

    account = Account.create()
    seen: list[httpx.Request] = []
    refused = _refusal("invalid_exact_evm_payload_signature")
    async with mock_client(_challenge_handler([refused], seen), account=account) as client:
        with pytest.raises(PaymentFailed) as caught:
            await client.post("/paid", json={"a": 1})
        assert (caught.value.status, caught.value.reason) == (402, "invalid_exact_evm_payload_signature")
        assert client.spent == 10_000  # the server holds the authorization: it may settle it whatever it answered
    # A first paid attempt whose fate is unknown (the connection dropped), then a refusal: the money may have
    # moved, so the budget keeps it; both attempts carried the one payment and the one Idempotency-Key.
    seen.clear()
    dropped = httpx.RemoteProtocolError("server disconnected")
    async with mock_client(_challenge_handler([dropped, _refusal("payment_already_used")], seen), account=account) as c:
        with pytest.raises(PaymentFailed) as caught:
            await c.post("/paid", json={"a": 1})
        assert caught.value.reason == "payment_already_used" and c.spent == 10_000
    assert len(seen) == 2
    assert seen[0].headers["payment-signature"] == seen[1].headers["payment-signature"]
    assert seen[0].headers["idempotency-key"] == seen[1].headers["idempotency-key"]
    assert seen[0].content == seen[1].content == b'{"a":1}'


async def test_a_402_without_an_option_this_client_can_pay_is_refused_unsigned() -> None:
    from eth_account import Account

    doc = {"x402Version": 1, "error": "payment_required", "accepts": [{"scheme": "upto", "network": "base"}]}
    async with mock_client(lambda r: httpx.Response(402, json=doc), account=Account.create()) as client:
        with pytest.raises(PaymentRefused) as caught:
            await client.get("/paid")
    assert (caught.value.status, caught.value.reason) == (402, "no_payable_option")


def test_an_authorization_signed_here_is_valid_for_a_day_at_most_whatever_the_402_asks() -> None:
    """A server holding a signed authorization can settle it any time before its ``validBefore``: a 402 asking
    for years must not get a payment it can take years later (exact, and a session's deposit)."""
    from eth_account import Account

    from gateway.client.exact import MAX_VALIDITY_SECONDS, Option, sign_exact_payment
    from gateway.client.session import SessionOffer, sign_deposit

    account, now, years = Account.create(), 1_800_000_000, 10 * 365 * 86400
    req = {
        "scheme": "exact", "network": "base", "amount": "1000", "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        "payTo": "0x" + "11" * 20, "maxTimeoutSeconds": years, "extra": {"name": "USD Coin", "version": "2"},
    }  # fmt: skip
    _, value = sign_exact_payment(account, Option(2, req, None), now=now)
    assert int(sdk_decode(value)["payload"]["authorization"]["validBefore"]) == now + MAX_VALIDITY_SECONDS
    short = {**req, "maxTimeoutSeconds": 60}
    _, value = sign_exact_payment(account, Option(2, short, None), now=now)
    assert int(sdk_decode(value)["payload"]["authorization"]["validBefore"]) == now + 60
    offer = SessionOffer.parse(
        {
            **req, "scheme": "batch-settlement",
            "extra": {"receiverAuthorizer": "0x" + "22" * 20, "withdrawDelay": 900, "name": "USD Coin", "version": "2"},
        }
    )  # fmt: skip
    assert offer is not None and offer.max_timeout == years
    deposit = sign_deposit(account, offer, "0x" + "33" * 32, 5_000, now=now)
    assert int(deposit["authorization"]["erc3009Authorization"]["validBefore"]) == now + MAX_VALIDITY_SECONDS


def sdk_decode(value: str) -> Any:
    from gateway.x402.codec import decode_header

    return decode_header(value)


def test_a_stale_record_written_by_another_process_never_lowers_the_highest_voucher_signed(tmp_path: Path) -> None:
    """Two processes on one session file: the one that read the record before the other sent a higher voucher must
    not write it back lower (a server may hold that voucher: the next call owes up to it)."""
    from gateway.client import FileSessionStore, SessionChannel
    from gateway.x402.sessions import ChannelConfig

    addr = "0x" + "11" * 20
    config = ChannelConfig(
        payer=addr, payer_authorizer=addr, receiver=addr, receiver_authorizer=addr, token=addr,
        withdraw_delay=900, salt="0x" + "22" * 32,
    )  # fmt: skip
    channel = SessionChannel(
        channel_id="0x" + "33" * 32, origin="http://gw", network="eip155:8453", chain_id=8453, config=config
    )
    store = FileSessionStore(tmp_path / "sessions.json")
    store.put(channel.replace(signed_max=3_000, charged=2_000))  # the other process: a voucher of 3,000 sent
    store.put(channel.replace(signed_max=2_000, charged=2_000))  # this one, with what it read before
    kept = store.get(channel.channel_id)
    assert kept is not None and (kept.signed_max, kept.charged) == (3_000, 2_000)
