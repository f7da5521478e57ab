"""The gateway's one exception tree.

Every refusal the gateway can make is one of these classes. Each carries the HTTP status it maps to and a
stable, machine-readable ``reason`` that goes into the response body (``error``) and the x402 challenge, plus
a human ``message`` that never contains a secret (no key, no RPC URL, no raw payment header)::

    GatewayError                      500 internal_error
    ├── ConfigError                   (start-up only: exit code 2, never an HTTP answer)
    ├── BadRequest                    400 a malformed request or payment header
    │   ├── PayloadTooLarge           413
    │   ├── HeadersTooLarge           431
    │   └── RequestTimeout            408
    ├── PaymentRequired               402 the payment is missing or does not pay for this route
    │   └── PaymentReplayed           402 payment_already_used: the money was already spent here
    ├── PaymentInFlight               409 payment_in_flight: the same payment is being used right now
    ├── ServiceUnavailable            503 a dependency cannot answer; nothing was consumed (fail closed)
    │   ├── StoreUnavailable          503 store_unavailable
    │   └── ChainUnavailable          503 chain_unavailable
    ├── BadGateway                    502 a dependency answered nonsense or not at all
    │   └── UpstreamUnreachable       502 upstream_unreachable
    ├── UpstreamTimeout               504 upstream_timeout
    └── SettlementFailed              402/5xx settlement did not complete (see ``status``)

The rule the tree encodes: a fault of ours (store, chain, upstream) is a 5xx, never a 402, so that an agent
does not pay again into a broken endpoint; a 402 always means "this payment does not pay for this".
"""

from __future__ import annotations

from typing import Any, ClassVar

from gateway.x402 import reasons


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status: ClassVar[int] = 500
    default_reason: ClassVar[str] = reasons.INTERNAL_ERROR

    def __init__(self, message: str = "", *, reason: str | None = None) -> None:
        self.reason = reason or self.default_reason
        self.message = message or self.reason.replace("_", " ")
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, message={self.message!r})"


class ConfigError(GatewayError):
    """The configuration is invalid; ``key`` names the offending key (dotted path)."""

    default_reason = reasons.INVALID_CONFIG

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class BadRequest(GatewayError):
    status = 400
    default_reason = reasons.BAD_REQUEST


class PayloadTooLarge(BadRequest):
    status = 413
    default_reason = reasons.PAYLOAD_TOO_LARGE


class HeadersTooLarge(BadRequest):
    status = 431
    default_reason = reasons.HEADERS_TOO_LARGE


class RequestTimeout(BadRequest):
    status = 408
    default_reason = reasons.REQUEST_TIMEOUT


class NotImplementedHere(GatewayError):
    """501: the request needs something the gateway does not do (a transfer coding besides ``chunked``)."""

    status = 501
    default_reason = reasons.UNSUPPORTED_TRANSFER_CODING


class PaymentRequired(GatewayError):
    """The request carries no payment, or one that does not pay for this route."""

    status = 402
    default_reason = reasons.PAYMENT_REQUIRED


class Resynchronise(PaymentRequired):
    """A payment built on a stale view of its session channel: the 402 carries, in the offer for ``scheme`` on
    ``network`` (CAIP-2), the ``extra`` keys the client resynchronises from (docs/sessions.md)."""

    def __init__(self, message: str, *, reason: str, scheme: str, network: str, extra: dict[str, Any]) -> None:
        super().__init__(message, reason=reason)
        self.scheme = scheme
        self.network = network
        self.extra = extra


class PaymentReplayed(PaymentRequired):
    default_reason = reasons.PAYMENT_ALREADY_USED


class PaymentInFlight(GatewayError):
    status = 409
    default_reason = reasons.PAYMENT_IN_FLIGHT

    def __init__(self, message: str = "", *, reason: str | None = None, holder: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.holder = holder  # the claim's current owner, when the store said who holds it


class ServiceUnavailable(GatewayError):
    status = 503
    default_reason = reasons.SERVICE_UNAVAILABLE


class StoreUnavailable(ServiceUnavailable):
    default_reason = reasons.STORE_UNAVAILABLE


class StoreReplicasBehind(StoreUnavailable):
    """A money-critical write reached the Redis master but too few replicas acknowledged it in time: a failover
    could lose it, so nothing is served on it (docs/scaling.md)."""

    default_reason = reasons.STORE_REPLICAS_BEHIND


class ChainUnavailable(ServiceUnavailable):
    default_reason = reasons.CHAIN_UNAVAILABLE


class BadGateway(GatewayError):
    status = 502
    default_reason = reasons.BAD_GATEWAY


class UpstreamUnreachable(BadGateway):
    default_reason = reasons.UPSTREAM_UNREACHABLE


class UpstreamTimeout(GatewayError):
    status = 504
    default_reason = reasons.UPSTREAM_TIMEOUT


class SettlementFailed(GatewayError):
    """Settlement did not complete.

    ``status`` is 402 when the payment itself is at fault (the authorization reverts, the payer's balance is
    gone) and 503 when the outcome is unknown or the chain could not be reached.
    """

    status = 402
    default_reason = reasons.SETTLEMENT_FAILED

    def __init__(self, message: str = "", *, reason: str | None = None, unknown: bool = False) -> None:
        super().__init__(message, reason=reason)
        self.unknown = unknown
        if unknown:
            self.status = 503  # type: ignore[misc]


__all__ = [
    "BadGateway",
    "BadRequest",
    "ChainUnavailable",
    "ConfigError",
    "GatewayError",
    "HeadersTooLarge",
    "PayloadTooLarge",
    "PaymentInFlight",
    "PaymentReplayed",
    "PaymentRequired",
    "RequestTimeout",
    "Resynchronise",
    "ServiceUnavailable",
    "SettlementFailed",
    "StoreReplicasBehind",
    "StoreUnavailable",
    "UpstreamTimeout",
    "UpstreamUnreachable",
]
