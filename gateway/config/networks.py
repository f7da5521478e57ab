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
    # Several rpc_urls (docs/threat-model.md T42): a read the best endpoint has not answered after this long (or
    # three times its usual answer time) also goes to the next one (0: never); endpoints not in use are re-measured
    # this often while there is traffic (0: never), so a recovered one can take over again.
    rpc_hedge_after: float = 0.5
    rpc_probe_interval: float = 15.0
    finality: Literal["latest", "safe", "finalized"] = "latest"  # tx-hash proofs: block tag they must be under
    verifier: Literal["local", "facilitator"] = "local"  # who verifies and settles x402 exact payments
    facilitator: FacilitatorConfig | None = None
    # Up to this many settlements share one transaction through Multicall3 when the chain has it (1: one each).
    settlement_batch: int = 50
    # A served settlement is watched until it is final, and re-submitted if a reorg drops it (docs/threat-model.md
    # T28): final at the "safe" or "finalized" block tag, or ("depth") settlement_depth blocks deep. The depth is also
    # the fallback when a node does not serve the tag. Known chains override both (_SETTLEMENT_FINALITY).
    settlement_finality: Literal["safe", "finalized", "depth"] = "finalized"
    settlement_depth: int = 64
    settlement_check_interval: float = 2.0  # seconds between the finality tracker's passes

    @property
    def caip2(self) -> str:
        return f"eip155:{self.chain_id}"


_NETWORK = Defaults(NetworkConfig)
_FACILITATOR = Defaults(FacilitatorConfig)

# When a settlement of a known chain (by chain id) is final, unless configured (gateway.example.toml says why).
# Base (and its testnet): an OP-stack L2; only blocks the sequencer has not yet posted to L1 can be reorganised, and
# only shallowly, so the "safe" tag (derived from L1 batch data) ends the watch; 150 blocks (5 min) if it is not served.
# Polygon PoS: reorgs of many blocks have happened (up to ~150 in 2023); "finalized" follows its milestones and
# checkpoints; 256 blocks (~9 min) if it is not served.
_SETTLEMENT_FINALITY: dict[int, tuple[Literal["safe", "finalized", "depth"], int]] = {
    8453: ("safe", 150),
    84532: ("safe", 150),
    137: ("finalized", 256),
    80002: ("finalized", 256),
}


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
    confirmations = t.integer("confirmations", _NETWORK.confirmations, minimum=0)
    finality, depth = _SETTLEMENT_FINALITY.get(chain_id, (_NETWORK.settlement_finality, _NETWORK.settlement_depth))
    cfg = NetworkConfig(
        name=name,
        chain_id=chain_id,
        rpc_urls=tuple(urls),
        usdc=address(usdc, t.key("usdc")),
        eip712_name=eip712_name,
        eip712_version=eip712_version or _NETWORK.eip712_version,
        confirmations=confirmations,
        receipt_poll_interval=t.number("receipt_poll_interval", _NETWORK.receipt_poll_interval, minimum=0.01),
        rpc_timeout=t.number("rpc_timeout", _NETWORK.rpc_timeout, minimum=0.1),
        rpc_hedge_after=t.number("rpc_hedge_after", _NETWORK.rpc_hedge_after),
        rpc_probe_interval=t.number("rpc_probe_interval", _NETWORK.rpc_probe_interval),
        finality=t.choice("finality", ("latest", "safe", "finalized"), _NETWORK.finality),
        verifier=t.choice("verifier", ("local", "facilitator"), _NETWORK.verifier),
        facilitator=_facilitator(t, env),
        settlement_batch=max(1, min(t.integer("settlement_batch", _NETWORK.settlement_batch, minimum=1), 200)),
        settlement_finality=t.choice("settlement_finality", ("safe", "finalized", "depth"), finality),
        # never final before the request it paid for could be served
        settlement_depth=t.integer("settlement_depth", max(depth, confirmations), minimum=max(confirmations, 1)),
        settlement_check_interval=t.number(
            "settlement_check_interval", _NETWORK.settlement_check_interval, minimum=0.05
        ),
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
