"""Prometheus metrics: an :class:`~gateway.ops.events.Observer` over the middleware's per-request records.

Every series lives in the gateway's own ``CollectorRegistry`` (not the process-global one), so several
gateways in one process (tests, an app mounting two) never collide, and ``/metrics`` shows this gateway only.
Labels come from configuration (route patterns, network names) or from fixed vocabularies (outcome, status
class, machine-readable reasons), never from the request (no paths, no addresses): cardinality stays bounded
whatever clients send.

Metric names (all prefixed ``x402_gateway_``)::

    requests_total{route,outcome,status_class}         every HTTP request that reached the payment layer
    payment_required_total{route,reason}               402 answers, by reason (payment_required = no payment)
    payments_verified_total{network,kind}              payments that passed verification and were claimed
    payments_settled_total{network,kind}               payments whose money moved during the request
    payments_failed_total{network,kind,reason}         payment attempts refused or failed
    revenue_atomic_total{network}                      USDC collected, atomic units (1 USDC = 1e6)
    rate_limited_total{route,kind}                     429 answers
    store_errors_total{reason}                         requests failed by the receipt store
    rpc_errors_total{network,reason}                   requests failed by the chain's RPC
    verify_seconds{network,kind}                       histogram: verification (parse, claim, chain preflight)
    settle_seconds{network}                            histogram: settlement until the receipt is confirmed
    upstream_seconds{route}                            histogram: upstream time to response headers
    request_seconds{outcome}                           histogram: whole request in the gateway
    dependency_up{check}                               gauge: 1 if the last readiness check of it passed
    jobs{status}                                       gauge: jobs by status (set_jobs, for the job runner)
    settlements_lost_total{network}                    served settlements a reorg dropped that could not be
                                                       settled again (settlement_lost, docs/threat-model.md T28)
    unbound_txhash_total{route}                        requests served on a tx-hash proof without a payer binding
                                                       (tx_hash_binding = "optional", docs/threat-model.md T43)
    session_unclaimed_atomic                           gauge: session charges not yet claimed on chain (as of the
                                                       claimer's last pass, docs/sessions.md)
    session_channels_owing                             gauge: channels with something unclaimed
    session_claim_transactions_total                   claim transactions that landed
    session_vouchers_claimed_total                     channel claims in them
    session_claimed_atomic_total                       USDC moved from channels to us by claims, atomic units
    session_claims_dropped_total                       channels left out of a batch because their claim would revert
    session_withdrawals_seen_total                     payer-initiated withdrawals the claimer reacted to
    session_sweeps_total                               sweeps of claimed USDC to pay_to
    ledger_entries_total{result}                       ledger writes: written, duplicate, failed (retried), dropped
                                                       (given up), unrecordable (docs/operating.md)
(voucher refusals by reason: payments_failed_total{kind="batch-settlement"}; session revenue: revenue_atomic_total)
    store_info{topology}                               gauge (1): the receipt store's Redis topology (the master's
                                                       address only on the admin API: GET /admin/store)
    store_failovers_total                              Sentinel master moves the receipt store followed
    store_replicas_acked                               gauge: replicas that acknowledged the last money-critical write
                                                       (min_replicas_acked > 0; docs/scaling.md)
    store_replica_ack_shortfalls_total                 writes refused because too few replicas acknowledged them
    log_dropped_total                                  log lines dropped because the log's reader fell behind
                                                       (process-wide; gateway/ops/logs.py, BufferedHandler)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.ops.events import RequestRecord
from gateway.x402 import reasons

NAMESPACE = "x402_gateway"
UNPRICED = "unpriced"
_STORE_REASONS = frozenset({reasons.STORE_UNAVAILABLE})
_RPC_REASONS = frozenset({reasons.CHAIN_UNAVAILABLE, reasons.CHAIN_ID_MISMATCH})

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_CHAIN = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
_HTTP = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def status_class(status: int) -> str:
    """``"2xx"`` ... ``"5xx"``; ``"none"`` when no response started (the client left first)."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


def effective_outcome(record: RequestRecord) -> str:
    """The record's outcome, except a priced request that was neither paid nor refused: its upstream failed
    after the payment verified (nothing charged, or a paid-but-unserved payment kept for a retry)."""
    if record.outcome == "free" and record.route is not None:
        return "unserved"
    return record.outcome


def is_rpc_reason(reason: str | None) -> bool:
    return reason is not None and (reason in _RPC_REASONS or reason.startswith("rpc_"))


class DropCount:
    """Log lines dropped in this process (the log handler is process-wide, so is its count)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # lines are logged (and dropped) from any thread
        self.value = 0

    def add(self, lines: int) -> None:
        with self._lock:
            self.value += lines


LOG_DROPS = DropCount()


class _LogDropsCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            f"{NAMESPACE}_log_dropped", "Log lines dropped because the log's reader fell behind", value=LOG_DROPS.value
        )


class PrometheusMetrics:
    """Observer that counts; :meth:`render` gives the exposition for ``GET /metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, NAMESPACE
        r.register(_LogDropsCollector())
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.requests = Counter(
            "requests",
            "HTTP requests by priced route, outcome and status class",
            ["route", "outcome", "status_class"],
            namespace=ns,
            registry=r,
        )
        self.payment_required = Counter(
            "payment_required", "402 answers by reason", ["route", "reason"], namespace=ns, registry=r
        )
        self.payments_verified = Counter(
            "payments_verified", "Payments verified and claimed", ["network", "kind"], namespace=ns, registry=r
        )
        self.payments_settled = Counter(
            "payments_settled",
            "Payments whose money moved during the request",
            ["network", "kind"],
            namespace=ns,
            registry=r,
        )
        self.payments_failed = Counter(
            "payments_failed",
            "Payment attempts refused or failed, by reason",
            ["network", "kind", "reason"],
            namespace=ns,
            registry=r,
        )
        self.revenue = Counter(
            "revenue_atomic",
            "USDC collected in atomic units (1 USDC = 1000000)",
            ["network"],
            namespace=ns,
            registry=r,
        )
        self.rate_limited = Counter(
            "rate_limited", "Requests refused with 429", ["route", "kind"], namespace=ns, registry=r
        )
        self.store_errors = Counter(
            "store_errors",
            "Requests failed because the receipt store could not answer",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.rpc_errors = Counter(
            "rpc_errors",
            "Requests failed because the chain's RPC could not answer",
            ["network", "reason"],
            namespace=ns,
            registry=r,
        )
        self.verify_seconds = Histogram(
            "verify_seconds",
            "Payment verification: parse, claim, chain preflight",
            ["network", "kind"],
            namespace=ns,
            registry=r,
            buckets=_FAST,
        )
        self.settle_seconds = Histogram(
            "settle_seconds",
            "Settlement until the receipt is confirmed",
            ["network"],
            namespace=ns,
            registry=r,
            buckets=_CHAIN,
        )
        self.upstream_seconds = Histogram(
            "upstream_seconds",
            "Upstream time to response headers",
            ["route"],
            namespace=ns,
            registry=r,
            buckets=_HTTP,
        )
        self.request_seconds = Histogram(
            "request_seconds", "Whole request inside the gateway", ["outcome"], namespace=ns, registry=r, buckets=_HTTP
        )
        self.dependency_up = Gauge(
            "dependency_up",
            "1 if the last readiness check of this dependency passed",
            ["check"],
            namespace=ns,
            registry=r,
        )
        # Hook for the job runner (not built yet): it calls set_jobs(status, count) whenever its counts change.
        self.jobs = Gauge("jobs", "Jobs by status", ["status"], namespace=ns, registry=r)
        # Hook for each network's finality tracker (Network.settlement_lost): a served request left unpaid.
        self.settlements_lost = Counter(
            "settlements_lost",
            "Served settlements dropped by a reorg that could not be settled again",
            ["network"],
            namespace=ns,
            registry=r,
        )
        self.unbound_txhash = Counter(
            "unbound_txhash",
            "Requests served on a tx-hash proof without a payer binding (first presenter wins)",
            ["route"],
            namespace=ns,
            registry=r,
        )
        self.store_info = Gauge(
            "store_info", "The receipt store's Redis topology", ["topology"], namespace=ns, registry=r
        )
        self.store_failovers = Counter(
            "store_failovers", "Sentinel master moves the receipt store followed", namespace=ns, registry=r
        )
        self.store_replicas_acked = Gauge(
            "store_replicas_acked",
            "Replicas that acknowledged the receipt store's last money-critical write",
            namespace=ns,
            registry=r,
        )
        self.store_ack_shortfalls = Counter(
            "store_replica_ack_shortfalls",
            "Money-critical writes refused because too few replicas acknowledged them",
            namespace=ns,
            registry=r,
        )
        self._store_seen: dict[str, int] = {}
        self.session_unclaimed = Gauge(
            "session_unclaimed_atomic", "Session charges not yet claimed on chain", namespace=ns, registry=r
        )
        self.session_owing = Gauge(
            "session_channels_owing", "Session channels with something unclaimed", namespace=ns, registry=r
        )

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, namespace=ns, registry=r)

        self.session_claim_txs = counter("session_claim_transactions", "Claim transactions that landed")
        self.session_vouchers = counter("session_vouchers_claimed", "Channel claims in landed claim transactions")
        self.session_claimed = counter("session_claimed_atomic", "USDC claimed from session channels, atomic units")
        self.session_dropped = counter("session_claims_dropped", "Channels left out of a claim that would revert")
        self.session_withdrawals = counter("session_withdrawals_seen", "Payer-initiated withdrawals seen")
        self.session_sweeps = counter("session_sweeps", "Sweeps of claimed USDC to pay_to")
        self._session_seen: dict[int, int] = {}
        self.ledger_entries = Counter("ledger_entries", "Ledger writes by result", ["result"], namespace=ns, registry=r)
        self._ledger_seen: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------- Observer

    def request_done(self, record: RequestRecord) -> None:
        route = record.route or UNPRICED
        outcome = effective_outcome(record)
        key = (route, outcome, record.status)
        children = self._children.get(key)
        if children is None:  # one labels() lookup per (route, outcome, status), not two per request
            children = (
                self.requests.labels(route, outcome, status_class(record.status)),
                self.request_seconds.labels(outcome),
            )
            if len(self._children) < 4096:  # statuses are the upstream's: bound what they can make us keep
                self._children[key] = children
        children[0].inc()
        children[1].observe(record.total_seconds)
        reason = record.reason
        if record.status == 402:
            self.payment_required.labels(route, reason or reasons.PAYMENT_REQUIRED).inc()
        if record.unbound and record.outcome == "paid":
            self.unbound_txhash.labels(route).inc()
        if record.outcome == "limited":
            self.rate_limited.labels(route, "paid" if record.payer else "challenge").inc()
        network = record.network or "unknown"
        if record.kind is not None:
            if record.payer is not None:
                self.payments_verified.labels(network, record.kind).inc()
            if record.verify_seconds > 0:
                self.verify_seconds.labels(network, record.kind).observe(record.verify_seconds)
            if record.outcome in ("refused", "error"):
                self.payments_failed.labels(network, record.kind, reason or "unknown").inc()
            if record.amount > 0:
                self.payments_settled.labels(network, record.kind).inc()
        if record.amount > 0:
            self.revenue.labels(network).inc(record.amount)
        if record.settle_seconds > 0:
            self.settle_seconds.labels(network).observe(record.settle_seconds)
        if record.upstream_seconds > 0:
            self.upstream_seconds.labels(route).observe(record.upstream_seconds)
        if reason in _STORE_REASONS:
            self.store_errors.labels(reason).inc()
        elif is_rpc_reason(reason):
            self.rpc_errors.labels(network, reason).inc()

    # ----------------------------------------------------------------------------------------------- hooks

    def observe_ready(self, checks: Mapping[str, str]) -> None:
        for name, result in checks.items():
            self.dependency_up.labels(name).set(1.0 if result == "ok" else 0.0)

    def set_jobs(self, status: str, count: int) -> None:
        self.jobs.labels(status).set(count)

    def observe_sessions(self, stats: Any) -> None:
        """Copy the session claimer's counters (a :class:`gateway.engine.claimer.ClaimerStats`) at scrape time."""
        self.session_unclaimed.set(stats.unclaimed_value)
        self.session_owing.set(stats.channels_owing)
        for counter, value in (
            (self.session_claim_txs, stats.claim_transactions),
            (self.session_vouchers, stats.vouchers_claimed),
            (self.session_claimed, stats.value_claimed),
            (self.session_dropped, stats.dropped),
            (self.session_withdrawals, stats.withdrawals_seen),
            (self.session_sweeps, stats.settlements),
        ):
            seen = self._session_seen.get(id(counter), 0)
            if value > seen:
                counter.inc(value - seen)
                self._session_seen[id(counter)] = value

    def observe_ledger(self, stats: Any) -> None:
        """Copy the ledger writer's counters (a :class:`gateway.engine.ledger.LedgerStats`) at scrape time."""
        for result, value in (
            ("written", stats.written),
            ("duplicate", stats.duplicates),
            ("failed", stats.failed),
            ("dropped", stats.dropped),
            ("unrecordable", stats.unrecordable),
        ):
            seen = self._ledger_seen.get(result, 0)
            if value > seen:
                self.ledger_entries.labels(result).inc(value - seen)
                self._ledger_seen[result] = value

    def observe_store(self, topology: Any) -> None:
        """Copy a Redis store's topology (a :class:`gateway.storage.redis_client.StoreTopology`) at scrape time."""
        self.store_info.clear()
        self.store_info.labels(topology.kind).set(1)
        if topology.replicas_acked is not None:
            self.store_replicas_acked.set(topology.replicas_acked)
        for name, counter, value in (
            ("failovers", self.store_failovers, topology.failovers_seen),
            ("shortfalls", self.store_ack_shortfalls, topology.ack_shortfalls),
        ):
            seen = self._store_seen.get(name, 0)
            if value > seen:
                counter.inc(value - seen)
                self._store_seen[name] = value

    def settlement_lost(self, network: str, key: str) -> None:
        self.settlements_lost.labels(network).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type. Our names are plain ASCII, so the classic 0.0.4 type (what
        prometheus-client's own server answers by default) suits every Prometheus version."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


__all__ = ["NAMESPACE", "PrometheusMetrics", "effective_outcome", "is_rpc_reason", "status_class"]
