"""Reading a session channel on chain (``channels(id)`` of the settlement contract), for a client that was given an
RPC URL: what was claimed bounds a corrective 402 from below, and the balance is the chain's, not the server's."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
from eth_utils.crypto import keccak

from gateway.client._errors import PaymentFailed, error_summary
from gateway.client._logs import hide_urls
from gateway.client._spend import chain_id_of
from gateway.secrets import redact_url
from gateway.x402.codec import loads
from gateway.x402.sessions import SETTLEMENT_CONTRACT

__all__ = ["ChannelReader", "OnchainChannel"]

log = logging.getLogger("gateway.client")

_CHANNELS = keccak(b"channels(bytes32)")[:4]


@dataclass(frozen=True, slots=True)
class OnchainChannel:
    balance: int
    total_claimed: int


class ChannelReader:
    """``eth_call`` over plain JSON-RPC; the RPC's chain id is checked once against the offer's."""

    def __init__(self, rpc_urls: Mapping[str, str], *, timeout: float = 10.0) -> None:
        self._urls = dict(rpc_urls)
        hide_urls(self._urls.values())  # httpx logs every request's URL at INFO: the path is often an API key
        self._http = httpx.AsyncClient(timeout=timeout)
        self._checked: set[int] = set()

    def url_for(self, network: str, chain_id: int) -> str | None:
        for name, url in self._urls.items():
            if name == network or chain_id_of(name) == chain_id:
                return url
        return None

    async def _call(self, url: str, method: str, params: list[object]) -> str:
        response = await self._http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        response.raise_for_status()
        doc = loads(response.content)
        result = doc.get("result") if isinstance(doc, dict) else None
        if not isinstance(result, str):
            raise ValueError(f"{method}: no result")
        return result

    async def channel(self, network: str, chain_id: int, channel_id: str) -> OnchainChannel | None:
        """The channel's state, or None: no RPC for this network, or it did not answer (the caller then trusts
        only what this wallet signed)."""
        url = self.url_for(network, chain_id)
        if url is None:
            return None
        try:
            if chain_id not in self._checked:
                if int(await self._call(url, "eth_chainId", []), 16) != chain_id:
                    # Another chain's channel with the same id does not exist: its zeros would mislead.
                    raise PaymentFailed(
                        f"the RPC configured for {network} serves another chain id", reason="rpc_chain_mismatch"
                    )
                self._checked.add(chain_id)
            data = "0x" + (_CHANNELS + bytes.fromhex(channel_id[2:])).hex()
            raw = bytes.fromhex(
                (await self._call(url, "eth_call", [{"to": SETTLEMENT_CONTRACT, "data": data}, "latest"]))[2:]
            )
        except (httpx.HTTPError, ValueError) as exc:
            # The type and status only: an httpx error's text holds the full URL, whose path may be the RPC's key.
            log.warning(
                "could not read channel %s on %s (%s): %s", channel_id, network, redact_url(url), error_summary(exc)
            )
            return None
        if len(raw) < 64:
            return None
        return OnchainChannel(balance=int.from_bytes(raw[:32], "big"), total_claimed=int.from_bytes(raw[32:64], "big"))

    async def aclose(self) -> None:
        await self._http.aclose()
