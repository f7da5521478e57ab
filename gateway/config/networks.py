"""``[networks.NAME]``: the chains payments are accepted on, their RPC endpoints and who verifies and settles."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.config.table import Defaults, Table
from gateway.config.values import address, expand_env, http_url
from gateway.errors import ConfigError
from gateway.networks import KNOWN_NETWORKS
from gateway.secrets import Secret, redact_url

__all__ = ["FacilitatorConfig", "NetworkConfig", "parse_networks"]


@dataclass(frozen=True, slots=True)
class FacilitatorConfig:
    url: Secret  # may embed an API key
    timeout: float = 30.0  # a facilitator's /settle waits for the receipt: allow for a block or two
    auth: Literal["none", "cdp"] = "none"
    cdp_key_id_env: str = "CDP_API_KEY_ID"
    cdp_key_secret_env: str = "CDP_API_KEY_SECRET"  # noqa: S105 - the NAME of an environment variable


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    name: str
    chain_id: int
    rpc_urls: tuple[Secret, ...]  # providers put API keys in them
    usdc: str
    eip712_name: str
    eip712_version: str = "2"  # the USDC contract's EIP-712 domain version
    confirmations: int = 1
    receipt_poll_interval: float = 0.1
    rpc_timeout: float = 10.0
    finality: Literal["latest", "safe", "finalized"] = "latest"  # tx-hash proofs: block tag they must be under
    verifier: Literal["local", "facilitator"] = "local"  # who verifies and settles x402 exact payments
    facilitator: FacilitatorConfig | None = None
    # Up to this many settlements share one transaction through Multicall3 when the chain has it (1: one each).
    settlement_batch: int = 50

    @property
    def caip2(self) -> str:
        return f"eip155:{self.chain_id}"


_NETWORK = Defaults(NetworkConfig)
_FACILITATOR = Defaults(FacilitatorConfig)


def parse_networks(t: Table, env: Mapping[str, str]) -> dict[str, NetworkConfig]:
    networks = {name: _network(name, t.table(name), env) for name in list(t.data)}
    t.done()
    if not networks:
        raise ConfigError("networks", "configure at least one network")
    chain_ids = [n.chain_id for n in networks.values()]
    if len(set(chain_ids)) != len(chain_ids):
        # Payments name their network by chain id (CAIP-2): two entries for one chain would be ambiguous.
        raise ConfigError("networks", "two networks share one chain_id")
    return networks


def _network(name: str, t: Table, env: Mapping[str, str]) -> NetworkConfig:
    known = KNOWN_NETWORKS.get(name)
    raw_urls = t.require("rpc_urls", list)
    if not raw_urls:
        raise ConfigError(t.key("rpc_urls"), "needs at least one URL")
    urls = []
    for i, raw in enumerate(raw_urls):
        key = f"{t.key('rpc_urls')}[{i}]"
        if not isinstance(raw, str):
            raise ConfigError(key, "expected a string")
        url = http_url(expand_env(raw, key, env), key)
        urls.append(Secret(url, redact_url(url)))
    chain_id = t.get("chain_id", int, known.chain_id if known else None)
    usdc = t.get("usdc", str, known.usdc if known else None)
    eip712_name = t.get("eip712_name", str, known.eip712_name if known else None)
    eip712_version = t.get("eip712_version", str, known.eip712_version if known else None)
    for key, value in (("chain_id", chain_id), ("usdc", usdc), ("eip712_name", eip712_name)):
        if value is None:
            raise ConfigError(t.key(key), f"is required for a network the gateway does not know ({name!r})")
    cfg = NetworkConfig(
        name=name,
        chain_id=chain_id,
        rpc_urls=tuple(urls),
        usdc=address(usdc, t.key("usdc")),
        eip712_name=eip712_name,
        eip712_version=eip712_version or _NETWORK.eip712_version,
        confirmations=t.integer("confirmations", _NETWORK.confirmations, minimum=0),
        receipt_poll_interval=t.number("receipt_poll_interval", _NETWORK.receipt_poll_interval, minimum=0.01),
        rpc_timeout=t.number("rpc_timeout", _NETWORK.rpc_timeout, minimum=0.1),
        finality=t.choice("finality", ("latest", "safe", "finalized"), _NETWORK.finality),
        verifier=t.choice("verifier", ("local", "facilitator"), _NETWORK.verifier),
        facilitator=_facilitator(t, env),
        settlement_batch=max(1, min(t.integer("settlement_batch", _NETWORK.settlement_batch, minimum=1), 200)),
    )
    if cfg.verifier == "facilitator" and cfg.facilitator is None:
        raise ConfigError(t.key("facilitator"), 'verifier = "facilitator" needs a [networks.NAME.facilitator] table')
    t.done()
    return cfg


def _facilitator(parent: Table, env: Mapping[str, str]) -> FacilitatorConfig | None:
    raw = parent.get("facilitator", dict, None)
    if raw is None:
        return None
    t = Table(raw, parent.key("facilitator"))
    url = http_url(expand_env(t.require("url", str), t.key("url"), env), t.key("url")).rstrip("/")
    cfg = FacilitatorConfig(
        url=Secret(url, redact_url(url)),
        timeout=t.number("timeout", _FACILITATOR.timeout, minimum=0.5),
        auth=t.choice("auth", ("none", "cdp"), _FACILITATOR.auth),
        cdp_key_id_env=t.get("cdp_key_id_env", str, _FACILITATOR.cdp_key_id_env),
        cdp_key_secret_env=t.get("cdp_key_secret_env", str, _FACILITATOR.cdp_key_secret_env),
    )
    t.done()
    return cfg
