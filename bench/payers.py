"""Payments prepared before the clock starts: signed EIP-3009 authorizations, tx-hash proofs, official payloads,
session channels (opened by the official client's deposit) and their vouchers.

Payers are spread over a pool of fresh wallets (``payers`` of them) so that no single payer trips the gateway's
per-payer rate limit (``rate_limits.paid``, default 600/minute) — the benchmark runs with the default limits on.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak

from gateway.client.exact import choose_requirement, parse_challenge, sign_exact_payment
from gateway.client.session import sign_voucher
from gateway.client.txhash import tx_proof_headers
from gateway.dev.chain import MINTER_KEY, DevChain, set_eth_balance
from gateway.x402.codec import decode_header, encode_header
from gateway.x402.sessions import channel_id, parse_config

from .load import Call

_TRANSFER = keccak(text="transfer(address,uint256)")[:4]
_MINT = keccak(text="mint(address,uint256)")[:4]  # TestUSDC: open to anyone, sent by the dev kit's minter
_BODY = b'{"prompt":"benchmark"}'
_JSON = {"content-type": "application/json"}


def challenge(url: str, method: str = "POST") -> tuple[dict[str, str], bytes]:
    """Headers and body of the 402 that ``url`` answers an unpaid request with."""
    req = urllib.request.Request(url, data=_BODY if method == "POST" else None, method=method, headers=_JSON)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raise RuntimeError(f"{url} answered HTTP {resp.status} to an unpaid request, not 402")
    except urllib.error.HTTPError as exc:
        if exc.code != 402:
            raise RuntimeError(f"{url} answered HTTP {exc.code} to an unpaid request, not 402") from None
        return {k.lower(): v for k, v in exc.headers.items()}, exc.read()


class _Node:
    """JSON-RPC to a local anvil over one kept-alive connection (set-up traffic: thousands of small calls)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
        self._ids = itertools.count(1)

    def call(self, method: str, *params: Any) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params)})
        self._conn.request("POST", "/", body, _JSON)
        answer = json.loads(self._conn.getresponse().read())
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def close(self) -> None:
        self._conn.close()


def send_all(chain: DevChain, txs: list[tuple[LocalAccount, str, bytes]]) -> list[str]:
    """Sign and send ``(sender, to, calldata)`` transactions, each sender's in order, and wait until all are mined;
    returns their hashes. One at a time on purpose: anvil's pool can park a sender's later nonces for ever when
    they arrive concurrently (see ``Relayer.max_batch`` in gateway/chain/relayer.py)."""
    node = _Node(chain.url)
    try:
        base_fee = int(node.call("eth_getBlockByNumber", "latest", False)["baseFeePerGas"], 16)
        nonces: dict[str, int] = {}
        hashes = []
        for sender, to, data in txs:
            if sender.address not in nonces:
                nonces[sender.address] = int(node.call("eth_getTransactionCount", sender.address, "pending"), 16)
            tx = {
                "chainId": chain.chain_id,
                "nonce": nonces[sender.address],
                "to": to,
                "data": "0x" + data.hex(),
                "value": 0,
                "gas": 120_000,
                "maxFeePerGas": 4 * base_fee + 10**9,
                "maxPriorityFeePerGas": 10**9,
                "type": 2,
            }
            nonces[sender.address] += 1
            hashes.append(node.call("eth_sendRawTransaction", sender.sign_transaction(tx).raw_transaction.to_0x_hex()))
        last = {sender.address: h for (sender, _, _), h in zip(txs, hashes, strict=True)}
        deadline = time.monotonic() + 120
        for h in last.values():
            while (receipt := node.call("eth_getTransactionReceipt", h)) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"benchmark set-up transaction {h} was not mined")
                time.sleep(0.05)
            if int(receipt["status"], 16) != 1:
                raise RuntimeError(f"benchmark set-up transaction {h} reverted")
        return hashes
    finally:
        node.close()


def new_payers(chain: DevChain, count: int, usdc_each: int) -> list[LocalAccount]:
    """``count`` fresh wallets holding ``usdc_each`` atomic units, minted by the dev kit's minter in one go."""
    minter = Account.from_key(MINTER_KEY)
    wallets = [Account.create() for _ in range(count)]
    send_all(
        chain,
        [(minter, chain.usdc, _MINT + abi_encode(["address", "uint256"], [w.address, usdc_each])) for w in wallets],
    )
    return wallets


def exact_calls(base_url: str, path: str, payers: list[LocalAccount], n: int) -> list[Call]:
    """``n`` paid calls of ``POST path``, each with its own authorization, signed by our client
    (:func:`gateway.client.exact.sign_exact_payment`) from the gateway's real 402."""
    headers, body = challenge(base_url + path)
    option = choose_requirement(parse_challenge(headers, body))
    calls = []
    for i in range(n):
        name, value = sign_exact_payment(payers[i % len(payers)], option)
        calls.append(Call("POST", path, {name: value, **_JSON}, _BODY))
    return calls


def txhash_calls(
    chain: DevChain, base_url: str, path: str, network: str, pay_to: str, price: int, senders: int, n: int
) -> list[Call]:
    """``n`` tx-hash proofs: each a real ``USDC.transfer(pay_to, price)`` sent and mined before the clock starts,
    bound to ``POST base_url+path`` by its sender (the binding signature of :mod:`gateway.client.txhash`)."""
    wallets = new_payers(chain, senders, price * (n // senders + 1))
    for w in wallets:
        set_eth_balance(chain.anvil, w.address, 10**20)
    data = _TRANSFER + abi_encode(["address", "uint256"], [pay_to, price])
    plan = [(wallets[i % senders], chain.usdc, data) for i in range(n)]
    hashes = send_all(chain, plan)
    resource = base_url + path
    return [
        Call("POST", path, {**tx_proof_headers(w, h.lower(), network, "POST", resource), **_JSON}, _BODY)
        for (w, _, _), h in zip(plan, hashes, strict=True)
    ]


def official_calls(base_url: str, path: str, payers: list[LocalAccount], n: int) -> list[Call]:
    """``n`` paid calls signed by the official ``x402`` client (``create_payment_payload`` +
    ``encode_payment_signature_header``) from the official server's real 402."""
    from x402 import x402Client
    from x402.http import x402HTTPClient
    from x402.mechanisms.evm.exact import register_exact_evm_client
    from x402.mechanisms.evm.signers import EthAccountSigner

    headers, body = challenge(base_url + path)
    clients = []
    for payer in payers:
        client = x402Client()
        register_exact_evm_client(client, EthAccountSigner(payer))
        clients.append((client, x402HTTPClient(client)))
    required = clients[0][1].get_payment_required_response(lambda name: headers.get(name.lower()), body)

    async def sign_all() -> list[Call]:
        out = []
        for i in range(n):
            client, http = clients[i % len(clients)]
            payload = await client.create_payment_payload(required)
            out.append(Call("POST", path, {**http.encode_payment_signature_header(payload), **_JSON}, _BODY))
        return out

    return asyncio.run(sign_all())


@dataclass
class SessionChannel:
    """A ``batch-settlement`` channel that the official client opened with one real deposit; :meth:`vouchers`
    continues it with vouchers signed ahead of time, each for the cumulative of one more request at the price."""

    payer: LocalAccount
    chain_id: int
    price: int
    channel_id: str
    template: dict[str, Any]  # the official client's PAYMENT-SIGNATURE document; its payload is replaced per voucher
    config: dict[str, Any]  # channelConfig, as the official client wrote it
    cumulative: int  # maxClaimableAmount of the last voucher signed (the deposit's voucher paid its request)
    deposit_tx: str

    def vouchers(self, path: str, n: int) -> list[Call]:
        """The channel's next ``n`` requests, in order: voucher k covers ``cumulative + k * price``. Signed with
        :func:`gateway.client.session.sign_voucher` (~0.2 ms each here; the official client's signer ~0.3 ms): the
        same bytes as the official client's voucher, checked on the deposit's."""
        calls = []
        for _ in range(n):
            self.cumulative += self.price
            voucher = sign_voucher(self.payer, self.channel_id, self.cumulative, self.chain_id)
            payload = {"type": "voucher", "channelConfig": self.config, "voucher": voucher}
            header = encode_header({**self.template, "payload": payload})
            calls.append(Call("POST", path, {"payment-signature": header, **_JSON}, _BODY))
        return calls


def open_session_channels(
    chain: DevChain, base_url: str, path: str, payers: list[LocalAccount]
) -> list[SessionChannel]:
    """One channel per payer, each opened as the official ``x402`` client opens one: its
    ``BatchSettlementEvmScheme`` answers the gateway's real 402 with a deposit (of the offer's ``minDeposit``) and
    the first voucher, sent here one payer at a time; the gateway has the deposit mined before it serves."""
    from x402 import x402Client
    from x402.http import x402HTTPClient
    from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
    from x402.mechanisms.evm.signers import EthAccountSigner

    headers, body = challenge(base_url + path)
    channels = []
    for payer in payers:
        client = x402Client()
        client.register(chain.network, BatchSettlementEvmScheme(EthAccountSigner(payer)))
        http = x402HTTPClient(client)
        required = http.get_payment_required_response(lambda name: headers.get(name.lower()), body)
        payload = asyncio.run(client.create_payment_payload(required))
        signature = http.encode_payment_signature_header(payload)
        doc = decode_header(next(iter(signature.values())))
        raw = doc["payload"]
        if raw.get("type") != "deposit":
            raise RuntimeError(f"the official client did not open a channel with a deposit: {raw.get('type')!r}")
        req = urllib.request.Request(base_url + path, data=_BODY, method="POST", headers={**signature, **_JSON})
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            receipt = decode_header(resp.headers["payment-response"])
        voucher = raw["voucher"]
        cid = channel_id(parse_config(raw["channelConfig"]), chain.chain_id)
        cumulative = int(voucher["maxClaimableAmount"])
        ours = sign_voucher(payer, cid, cumulative, chain.chain_id)
        if (voucher["channelId"].lower(), voucher["signature"].lower()) != (cid, ours["signature"].lower()):
            raise RuntimeError("the benchmark's voucher differs from the official client's for the same amount")
        template = {k: v for k, v in doc.items() if k != "payload"}
        channels.append(
            SessionChannel(
                payer,
                chain.chain_id,
                int(doc["accepted"]["amount"]),
                cid,
                template,
                raw["channelConfig"],
                cumulative,
                str(receipt.get("transaction") or ""),
            )
        )
    return channels


def fresh_address() -> str:
    return str(Account.create().address)
