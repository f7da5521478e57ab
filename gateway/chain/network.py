"""One configured network at run time: its RPC, its receipt watcher, and who settles there.

Either the gateway settles itself (a :class:`Relayer`, batched through Multicall3 where the chain has it, with a
:class:`FinalityTracker` that keeps served settlements paid through reorgs, docs/threat-model.md T28), or a
remote x402 facilitator verifies and settles (docs/protocol.md §3). Built once at start from the configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp

from gateway.chain import abi
from gateway.chain.batcher import SettlementBatcher
from gateway.chain.facilitator import CdpAuth, FacilitatorClient
from gateway.chain.finality import FinalityTracker, Journal, Submitter
from gateway.chain.gas import GasBook
from gateway.chain.relayer import Relayer
from gateway.chain.rpc import ChainRpc
from gateway.chain.watched import Watched
from gateway.chain.watcher import ReceiptWatcher
from gateway.config import GatewayConfig, NetworkConfig
from gateway.errors import ConfigError

log = logging.getLogger("gateway.payments")


@dataclass(slots=True)
class Network:
    config: NetworkConfig
    rpc: ChainRpc
    watcher: ReceiptWatcher
    relayer: Relayer | None  # local verification and settlement
    facilitator: FacilitatorClient | None  # or a remote x402 facilitator does both
    gas: GasBook = field(default_factory=GasBook)  # learned settlement gas (local settlement only)
    batcher: SettlementBatcher | None = None  # several settlements per transaction, where the chain has Multicall3
    finality: FinalityTracker | None = None  # served settlements and transfers, watched until final (a journal)
    # Called with (network, claim key) for each served settlement, transfer or deposit a reorg dropped beyond
    # recovery: the metrics count it, the ledger marks the payment (it is never refunded).
    settlement_lost: list[Callable[[str, str], None]] = field(default_factory=list)
    # Called with (network, channel id) while a session deposit is off the chain (a reorg), and when it is lost.
    deposit_gone: list[Callable[[str, str], Awaitable[None]]] = field(default_factory=list)
    # Whether an address is a relayer of the deployment (every gateway sharing the store): the engine's registry
    # (gateway/engine/relayers.py); None: this network's own relayer only.
    deployment_relayers: Callable[[str], Awaitable[bool]] | None = None

    async def settled_by_us(self, sender: str) -> bool:
        """Whether a transaction from ``sender`` settled a payment a gateway of this deployment collected."""
        if self.deployment_relayers is not None:
            return await self.deployment_relayers(sender)
        return self.relayer is not None and sender.lower() == self.relayer.address.lower()

    def track_settlement(self, key: str, asset: str, calldata: bytes, valid_before: int, tx_hash: str) -> None:
        """A local settlement was confirmed and its request is served: watch it until final (T28). Never waits."""
        if self.finality is not None:
            self.finality.track(key, asset, calldata, valid_before, tx_hash)

    def watch_transaction(
        self, kind: Literal["transfer", "deposit"], key: str, asset: str, tx_hash: str, what: Watched
    ) -> None:
        """A transaction nobody may send again as a new call paid for something served (a tx-hash proof's
        transfer, a session deposit): watch it until final, count it if a reorg loses it (T28). Never waits."""
        if self.finality is not None:
            self.finality.watch(kind, key, asset, tx_hash, what)

    def submitter(self) -> Submitter:
        """Where a settlement goes: the Multicall3 batcher when there is one, else the relayer."""
        assert self.relayer is not None
        return self.batcher or self.relayer

    async def start(self, session: aiohttp.ClientSession, config: GatewayConfig) -> None:
        await self.rpc.start(session)
        await self.rpc.verify_chain_id()
        if self.facilitator is not None:
            await self.facilitator.start(session)
            await self._check_facilitator(config)
        elif self.relayer is not None and self.config.settlement_batch > 1 and self.batcher is None:
            code = await self.rpc.request("eth_getCode", [abi.MULTICALL3_ADDRESS, "latest"])
            if isinstance(code, str) and len(code) > 2:
                self.batcher = SettlementBatcher(
                    self.relayer, abi.MULTICALL3_ADDRESS, max_items=self.config.settlement_batch
                )
            else:
                log.info("no Multicall3 on %s: one settlement per transaction", self.config.name)
        if self.finality is not None:
            self.finality.start()

    async def _check_facilitator(self, config: GatewayConfig) -> None:
        """Every route on a facilitator network must be one the facilitator says it supports (fail at start)."""
        assert self.facilitator is not None
        kinds = await self.facilitator.supported()
        if not FacilitatorClient.supports(kinds, version=2, scheme="exact", network=self.config.caip2):
            routes = [r.route for r in config.routes if self.config.name in r.networks]
            raise ConfigError(
                f"networks.{self.config.name}.facilitator",
                f"the facilitator does not support x402 v2 exact payments on {self.config.caip2} "
                f"(needed by {', '.join(routes) or 'no route'})",
            )

    async def aclose(self) -> None:
        if self.finality is not None:  # first: it may be handing a settlement to the relayer
            await self.finality.aclose()
        if self.batcher is not None:
            await self.batcher.aclose()
        if self.relayer is not None:
            await self.relayer.aclose()
        await self.watcher.aclose()
        await self.rpc.aclose()


def open_networks(config: GatewayConfig, journal: Callable[[], Journal] | None = None) -> dict[str, Network]:
    """Every configured network, not yet started (no I/O here). ``journal`` opens the settlement journal (one per
    network that settles locally, on the receipt store's storage); without it, settlements are not watched."""
    key = config.payment.relayer_key
    networks: dict[str, Network] = {}
    for n in config.networks.values():
        rpc = ChainRpc(
            n.name,
            n.chain_id,
            n.rpc_urls,
            timeout=n.rpc_timeout,
            hedge_after=n.rpc_hedge_after,
            probe_interval=n.rpc_probe_interval,
        )
        relayer = facilitator = None
        if n.verifier == "facilitator":
            assert n.facilitator is not None
            f = n.facilitator
            auth = CdpAuth(f.cdp_key_id_env, f.cdp_key_secret_env) if f.auth == "cdp" else None
            facilitator = FacilitatorClient(f.url, timeout=f.timeout, auth=auth, name=f"{n.name} facilitator")
        else:
            if key is None:
                raise ValueError("local settlement needs payment.relayer_key_env")
            relayer = Relayer(rpc, key)
        watcher = ReceiptWatcher(rpc, interval=n.receipt_poll_interval)
        net = networks[n.name] = Network(n, rpc, watcher, relayer, facilitator)
        if journal is not None:  # also without a relayer: tx-hash transfers are watched there too
            net.finality = FinalityTracker(
                n.name,
                rpc,
                relayer,
                net.submitter,
                journal(),
                finality=n.settlement_finality,
                depth=n.settlement_depth,
                interval=n.settlement_check_interval,
                on_lost=net.settlement_lost,
                on_deposit_gone=net.deposit_gone,
            )
    return networks
