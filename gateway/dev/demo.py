"""``x402-gateway demo``: one real payment end to end on embedded defaults, narrated step by step.

A local anvil chain impersonating Base (chain id 8453, the project's test USDC at Base's canonical address),
a demo upstream, the gateway with its SQLite store, and a fresh payer wallet. Every hash and balance printed
is read from the chain.
"""

from __future__ import annotations

import contextlib
import json
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
from gateway.config import parse_config
from gateway.dev.chain import DEV_KEYS, start_dev_chain
from gateway.dev.upstream import create_app
from gateway.http.app import build_app
from gateway.money import format_usd
from gateway.x402.codec import decode_header


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
                return 0 if ok else 1
    finally:
        chain.stop()
