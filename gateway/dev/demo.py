"""``x402-gateway demo``: one real payment end to end on embedded defaults, narrated step by step.

A local anvil chain impersonating Base (chain id 8453, the project's test USDC at Base's canonical address),
a demo upstream, the gateway with its SQLite store, and a fresh payer wallet. Every hash and balance printed
is read from the chain.

``x402-gateway demo --jobs`` (:func:`run_jobs_demo`): the same chain and store, the gateway's job runner in front
of the demo upstream's slow agent (``POST /run``): a paid submit, its progress polled live to completion for free
with the job token, the payer's wallet signature opening the job and its list, and a stranger refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from gateway.client.exact import choose_requirement, parse_challenge, sign_exact_payment
from gateway.client.jobauth import job_token_headers, payer_auth_headers
from gateway.config import parse_config
from gateway.dev.chain import DEV_KEYS, DevChain, start_dev_chain
from gateway.dev.upstream import RUN_STEPS, create_app
from gateway.http.app import build_app
from gateway.money import format_usd
from gateway.x402.codec import decode_header
from gateway.x402.payer_auth import payer_auth_message


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the demo's own thread owns signals
        yield


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a background thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _QuietServer(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        if thread.is_alive():  # a connection that will not close: stop waiting for it (the demo is ending)
            server.force_exit = True
            thread.join(5)
        sock.close()


def demo_config(rpc_url: str, upstream: str, store_path: Path, pay_to: str) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream},
        "store": {"url": f"sqlite:///{store_path}"},
        "payment": {"pay_to": pay_to, "relayer_key_env": "X402_DEMO_RELAYER_KEY"},
        "networks": {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}},
        "routes": [
            {
                "route": "POST /agent/prompt",
                "price": "0.10",
                "description": "Submit a prompt to the demo agent",
                "settlement": "after",
            },
            {"route": "GET /weather", "price": "0.01", "description": "Weather forecast"},
        ],
    }


def run_demo(out: Any = None) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    from eth_account import Account

    say("x402 gateway demo — one USDC payment end to end on a local chain\n")
    chain = start_dev_chain(8453)
    try:
        say(f"[1/7] local chain  anvil, chain id {chain.chain_id} (Base), RPC {chain.url}")
        say(f"      test USDC    {chain.usdc} (Base's canonical USDC address, EIP-712 'USD Coin' v2)")
        pay_to = Account.from_key(DEV_KEYS[1]).address
        payer = chain.new_payer(5_000_000)
        with tempfile.TemporaryDirectory() as tmp, serve_in_thread(create_app()) as upstream:
            say(f"[2/7] upstream     demo API at {upstream}")
            env = dict(os.environ, X402_DEMO_RELAYER_KEY=chain.relayer_key)
            config = parse_config(demo_config(chain.url, upstream, Path(tmp) / "receipts.db", pay_to), env=env)
            with serve_in_thread(build_app(config)) as gw, httpx.Client(base_url=gw, timeout=30) as http:
                say(f"[3/7] gateway      {gw}  store sqlite  route 'POST /agent/prompt' costs $0.10")
                before = (chain.balance(payer.address), chain.balance(pay_to))
                say(f"[4/7] balances     payer {payer.address} {format_usd(before[0])} USDC")
                say(f"                   pay-to {pay_to} {format_usd(before[1])} USDC")
                body = {"prompt": "What is the price of ETH?"}
                first = http.post("/agent/prompt", json=body)
                options = parse_challenge(first.headers, first.content)
                option = choose_requirement(options)
                req = option.requirement
                say(
                    f"[5/7] unpaid call  -> HTTP {first.status_code} {first.json()['error']}; "
                    f"{len(options)} option(s), x402 v{option.version}: {req['scheme']} on {req['network']}, "
                    f"{option.amount} atomic units to {req['payTo']}"
                )
                name, value = sign_exact_payment(payer, option)
                auth = decode_header(value)["payload"]["authorization"]
                say(
                    f"[6/7] signed       EIP-3009 authorization nonce {auth['nonce'][:18]}…, "
                    f"valid before {auth['validBefore']}; retrying with {name}"
                )
                t0 = time.perf_counter()
                paid = http.post("/agent/prompt", json=body, headers={name: value})
                elapsed = (time.perf_counter() - t0) * 1000
                receipt = decode_header(paid.headers["payment-response"]) if "payment-response" in paid.headers else {}
                tx = receipt.get("transaction", "")
                if paid.status_code >= 400 or not tx:
                    say(f"      FAILED: HTTP {paid.status_code} {paid.text}")
                    return 1
                mined = chain.rpc("eth_getTransactionReceipt", [tx])
                say(f"      verified + settled in {elapsed:.0f} ms: tx {tx} (block {int(mined['blockNumber'], 16)})")
                say(f"      upstream answered HTTP {paid.status_code}: {json.dumps(paid.json())}")
                after = (chain.balance(payer.address), chain.balance(pay_to))
                say(
                    f"[7/7] balances     payer {format_usd(before[0])} -> {format_usd(after[0])} USDC, "
                    f"pay-to {format_usd(before[1])} -> {format_usd(after[1])} USDC"
                )
                again = http.post("/agent/prompt", json=body, headers={name: value})
                say(f"      same payment again -> HTTP {again.status_code} {again.json().get('error')}")
                ok = after[0] == before[0] - option.amount and after[1] == before[1] + option.amount
                ok = ok and again.status_code == 402
                say("\nOK: paid once, served once, replay refused." if ok else "\nFAILED: balances do not add up")
                say("A job billed once and polled for free: x402-gateway demo --jobs")
                return 0 if ok else 1
    finally:
        chain.stop()


# ------------------------------------------------------------------------------------------------- demo --jobs

JOB_PRICE = "0.10"
POLL_INTERVAL = 0.25


def jobs_demo_config(rpc_url: str, upstream: str, store_path: Path, pay_to: str) -> dict[str, Any]:
    """Runner mode, style agent (docs/jobs.md): the gateway serves the job API and calls ``POST <upstream>/run``."""
    return {
        "upstream": {"url": upstream},
        "store": {"url": f"sqlite:///{store_path}"},
        "payment": {"pay_to": pay_to, "relayer_key_env": "X402_DEMO_RELAYER_KEY"},
        "networks": {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}},
        "routes": [{"route": "POST /agent/prompt", "price": JOB_PRICE, "description": "Ask the demo agent (a job)"}],
        "jobs": {
            "mode": "runner",
            "style": "agent",
            "runner_upstream_path": "/run",
            "list": "GET /agent/jobs",
            "shutdown_grace_seconds": 0,
        },
    }


class _Check:
    """The demo's verdict: every expectation that failed, said once at the end."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failed.append(what)
        return ok


def run_jobs_demo(out: Any = None, *, step_delay: float = 0.5) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say("x402 gateway demo --jobs — a paid job: submit, live progress, free polls for the payer only\n")
    # One access-log line per poll would interleave with the live progress on a terminal: the narration says it.
    access = logging.getLogger("gateway.access")
    level = access.level
    access.setLevel(max(level, logging.WARNING))
    chain = start_dev_chain(8453)
    try:
        return _jobs_demo(chain, say, step_delay)
    finally:
        chain.stop()
        access.setLevel(level)


def _jobs_demo(chain: DevChain, say: Any, step_delay: float) -> int:
    from eth_account import Account

    check = _Check()
    say(f"[1/7] local chain  anvil, chain id {chain.chain_id} (Base), RPC {chain.url}")
    pay_to = Account.from_key(DEV_KEYS[1]).address
    payer = chain.new_payer(5_000_000)
    stranger = Account.create()
    with tempfile.TemporaryDirectory() as tmp, serve_in_thread(create_app(step_delay=step_delay)) as upstream:
        say(f"[2/7] upstream     demo agent at {upstream}: POST /run answers slowly, streaming NDJSON")
        say('                   {"status": ...} lines, then {"response": ...} (the runner contract, docs/jobs.md)')
        env = dict(os.environ, X402_DEMO_RELAYER_KEY=chain.relayer_key)
        config = parse_config(jobs_demo_config(chain.url, upstream, Path(tmp) / "receipts.db", pay_to), env=env)
        with serve_in_thread(build_app(config)) as gw, httpx.Client(base_url=gw, timeout=30) as http:
            say(f"[3/7] gateway      {gw}  jobs: runner mode, style agent, store sqlite")
            say(f"                   POST /agent/prompt costs ${JOB_PRICE}; GET /agent/job/{{id}},")
            say("                   POST /agent/job/{id}/cancel and GET /agent/jobs are free, for the payer only")
            before = (chain.balance(payer.address), chain.balance(pay_to))

            body = {"prompt": "What is the price of ETH?"}
            first = http.post("/agent/prompt", json=body)
            option = choose_requirement(parse_challenge(first.headers, first.content))
            name, value = sign_exact_payment(payer, option)
            submitted = http.post("/agent/prompt", json=body, headers={name: value})
            paid = submitted.headers.get("payment-response")
            tx = decode_header(paid).get("transaction", "") if paid else ""
            token = submitted.headers.get("x-job-token", "")
            if not check(submitted.status_code == 202 and bool(tx) and bool(token), "the paid submit"):
                say(f"      FAILED: HTTP {submitted.status_code} {submitted.text}")
                return 1
            job_id = submitted.json()["jobId"]
            block = int(chain.rpc("eth_getTransactionReceipt", [tx])["blockNumber"], 16)
            req = option.requirement
            say(f"[4/7] paid submit  POST /agent/prompt -> HTTP {first.status_code} {first.json()['error']}")
            say(f"                   paid {option.amount} atomic units ({req['scheme']}, {req['network']}): {name}")
            say(f"                   -> HTTP {submitted.status_code} job {job_id}, settled in tx {tx} (block {block})")
            say(f"                   X-Job-Token {token[:6]}… opens this one job (the gateway keeps its SHA-256 only)")

            polls, seen = _follow(http, job_id, job_token_headers(token), say)
            check(bool(polls) and polls[-1].get("status") == "completed", "the job completed")
            check(seen == list(RUN_STEPS), "every progress message was seen once, in order")
            _payer_wallet(http, payer, job_id, say, check)
            _stranger(http, stranger, job_id, say, check)

            after = (chain.balance(payer.address), chain.balance(pay_to))
            say(
                f"      balances     payer {format_usd(before[0])} -> {format_usd(after[0])} USDC for one job and "
                f"{len(polls) + 5} free calls; pay-to {format_usd(before[1])} -> {format_usd(after[1])} USDC"
            )
            check(after == (before[0] - option.amount, before[1] + option.amount), "paid exactly once")
    if check.failed:
        say(f"\nFAILED: {'; '.join(check.failed)}")
        return 1
    say("\nOK: one job paid once, followed live for free by its payer, refused to a stranger.")
    return 0


def _payer_wallet(http: httpx.Client, payer: Any, job_id: str, say: Any, check: _Check) -> None:
    """The payer without the token: its wallet's signature opens the job and lists its jobs."""
    path = f"/agent/job/{job_id}"
    signed = payer_auth_headers(payer, "GET", path)
    timestamp = int(signed["X-Payer-Auth"].split(".", 1)[0])
    mine = http.get(path, headers=signed)
    listed = http.get("/agent/jobs", headers=payer_auth_headers(payer, "GET", "/agent/jobs"))
    ids = [j["jobId"] for j in listed.json().get("jobs", [])] if listed.status_code == 200 else []
    say(f"[6/7] payer wallet no token: X-Payer-Auth: {timestamp}.0x<signature> where the signature is")
    text = json.dumps(payer_auth_message("GET", path, timestamp))
    say(f"                   {payer.address}'s personal_sign of {text}")
    say(f"                   GET {path} -> HTTP {mine.status_code} {mine.json().get('status')}")
    say(f"                   GET /agent/jobs -> HTTP {listed.status_code}, {len(ids)} job(s): {', '.join(ids)}")
    check(mine.status_code == 200 and mine.json().get("status") == "completed", "the payer's signed poll")
    check(ids == [job_id], "the payer's list")


def _stranger(http: httpx.Client, stranger: Any, job_id: str, say: Any, check: _Check) -> None:
    """Another wallet knows the job id: no proof, or its own signature, gets the 404 of an unknown job."""
    path = f"/agent/job/{job_id}"
    bare = http.get(path)
    foreign = http.get(path, headers=payer_auth_headers(stranger, "GET", path))
    theirs = http.get("/agent/jobs", headers=payer_auth_headers(stranger, "GET", "/agent/jobs"))
    total = theirs.json().get("total")
    say(f"[7/7] a stranger   {stranger.address}, who knows the job id")
    say(f"                   no proof          -> HTTP {bare.status_code} {bare.json().get('error')}")
    say(f"                   its own signature -> HTTP {foreign.status_code} {foreign.json().get('error')}")
    say(f"                   its own list      -> HTTP {theirs.status_code}, {total} job(s)")
    check(bare.status_code == foreign.status_code == 404, "the stranger's polls are refused")
    check(theirs.status_code == 200 and total == 0, "the stranger's list is empty")


def _follow(
    http: httpx.Client, job_id: str, headers: dict[str, str], say: Any, *, timeout: float = 60.0
) -> tuple[list[dict[str, Any]], list[str]]:
    """Poll the job with its token until it is final, printing each new status and progress message as it comes:
    (every answer, the progress messages seen)."""
    say(f"[5/7] polling      GET /agent/job/{job_id} with Authorization: Bearer <token>, every {POLL_INTERVAL} s")
    polls: list[dict[str, Any]] = []
    seen: list[str] = []
    status = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        answer = http.get(f"/agent/job/{job_id}", headers=headers)
        if answer.status_code != 200:
            say(f"      FAILED: HTTP {answer.status_code} {answer.text}")
            break
        doc = answer.json()
        polls.append(doc)
        elapsed = time.monotonic() - t0
        if doc["status"] != status:
            status = doc["status"]
            say(f"      {elapsed:5.2f} s  status   {status}")
        for update in doc.get("statusUpdates", [])[len(seen) :]:
            seen.append(update["message"])
            say(f"      {elapsed:5.2f} s  update   {update['message']}")
        if status in ("completed", "failed", "cancelled"):
            tail = doc.get("response") if status == "completed" else doc.get("error")
            say(f"      {elapsed:5.2f} s  {'response' if status == 'completed' else 'error':<8} {tail}")
            break
        time.sleep(POLL_INTERVAL)
    say(f"      {len(polls)} polls, none of them paid")
    return polls, seen
