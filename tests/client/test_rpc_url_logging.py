"""An RPC URL often carries its API key (in the path, the query or the user-info), and web3 and httpx log the URLs
they reach (web3: every request at DEBUG, "Successfully disconnected from: <url>" at INFO; httpx: every request at
INFO). An SDK user who logs at INFO or DEBUG must never see the key: every record of every logger is captured at
DEBUG here, for a provider that cannot connect and for one that works and is closed, and the key is in none of them.
"""

from __future__ import annotations

import logging
import socket

import pytest

from gateway.client import PaymentRefused, TxHashPayments
from gateway.client._onchain import ChannelReader
from gateway.client._transfer import TransferSender, TxOption
from gateway.dev.chain import DevChain
from tests.client.rpc_proxy import rpc_proxy
from tests.txhash.helpers import new_tx_payer

SENTINEL = "SENTINELKEY0123456789abcdef"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _option(chain: DevChain, amount: int = 1_000) -> TxOption:
    option = TxOption.parse(
        {
            "scheme": "txhash",
            "network": "base",
            "chainId": chain.chain_id,
            "recipient": "0x" + "33" * 20,
            "asset": chain.usdc,
            "amount": str(amount),
        }
    )
    assert option is not None
    return option


@pytest.fixture(autouse=True)
def _every_library_logger_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """As an SDK user's fresh process has them: an earlier test in this process may have configured logging as
    ``serve`` does (its logger levels, ``disable_existing_loggers``), which silences httpx's and web3's loggers and
    would make these tests pass without looking."""
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("httpx", "httpcore", "web3"):
            logger = logging.getLogger(name)
            monkeypatch.setattr(logger, "disabled", False)
            monkeypatch.setattr(logger, "propagate", True)
            monkeypatch.setattr(logger, "level", logging.NOTSET)  # `serve` quiets httpx: a plain SDK user does not


def _leaks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every captured record, as any handler or formatter could render it, that shows the key."""
    return [
        r.name
        for r in caplog.records
        if SENTINEL in r.getMessage() or SENTINEL in repr(r.__dict__) or SENTINEL in (r.exc_text or "")
    ] + (["caplog.text"] if SENTINEL in caplog.text else [])


async def test_a_provider_that_cannot_connect_never_logs_its_url_key(
    base_chain: DevChain, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    url = f"http://user:{SENTINEL}@127.0.0.1:{_closed_port()}/v2/{SENTINEL}?apikey={SENTINEL}"
    sender = TransferSender(new_tx_payer(base_chain), TxHashPayments(rpc_urls={"base": url}))
    with pytest.raises(PaymentRefused) as caught:
        await sender.send(_option(base_chain))
    await sender.aclose()
    assert caught.value.reason == "rpc_unavailable" and SENTINEL not in str(caught.value)
    assert any(r.name.startswith("web3") for r in caplog.records)  # web3 did log: about this provider
    assert _leaks(caplog) == []


async def test_a_provider_that_worked_and_was_closed_never_logs_its_url_key(
    base_chain: DevChain, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with rpc_proxy(base_chain.url) as (proxy_url, _):
        url = f"{proxy_url}/v2/{SENTINEL}"
        sender = TransferSender(new_tx_payer(base_chain), TxHashPayments(rpc_urls={"base": url}, poll_interval=0.05))
        option = _option(base_chain)
        tx_hash = await sender.send(option)
        await sender.wait_final(option, tx_hash, deadline=float("inf"))
        await sender.aclose()  # web3 logs "Successfully disconnected from: <url>" at INFO
        reader = ChannelReader({"base": url})  # plain httpx: logs "HTTP Request: POST <url>" at INFO
        assert await reader.channel("base", base_chain.chain_id, "0x" + "00" * 32) is not None
        await reader.aclose()
    shown = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Successfully disconnected from: http://127.0.0.1") for m in shown), shown
    assert any(m.startswith("HTTP Request: POST http://127.0.0.1") for m in shown), shown
    assert _leaks(caplog) == []
