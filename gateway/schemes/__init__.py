"""Payment schemes, each behind :class:`gateway.schemes.base.Scheme`; this is where one is registered."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.chain.network import Network
from gateway.config import GatewayConfig
from gateway.schemes.base import Offering
from gateway.schemes.batch.scheme import BatchSettlementScheme
from gateway.schemes.exact.scheme import ExactScheme
from gateway.schemes.txhash.scheme import TxHashScheme


def build_schemes(config: GatewayConfig, networks: Mapping[str, Network]) -> tuple[Offering, ...]:
    """Every scheme the gateway speaks, in the order a presented payment is offered to them (the first that
    accepts it takes it; ``exact`` accepts any x402 payload, so it comes last). The 402 lists their offers in
    this order too."""
    return (TxHashScheme(config, networks), BatchSettlementScheme(), ExactScheme(config, networks))


__all__ = ["build_schemes"]
