"""Redis store URLs and the topology they name: one server, a Sentinel-managed master, or a Redis Cluster.

The one place that reads a Redis URL's shape (``gateway.storage.backend`` calls it to validate ``[store].url``;
``gateway.storage.redis_client`` to connect)::

    redis://[user:password@]host:port/db    rediss://...    unix:///path/to/redis.sock?db=0
    redis+sentinel://[user:password@]h1:26379,h2:26379,h3:26379/<service>[/<db>]    rediss+sentinel://...
    redis+cluster://[user:password@]h1:7000,h2:7001,h3:7002/                     rediss+cluster://...

Sentinel: the user and password are the data nodes' (the master's and replicas'); the sentinels use them too
unless the query gives ``sentinel_username`` / ``sentinel_password``. ``rediss+`` means TLS to the data nodes and
the sentinels alike. Cluster: the hosts are seeds; the client learns the rest of the cluster from them, and the
database is always 0.

Two query parameters, on every Redis URL, ask for replicated writes (docs/scaling.md):
``min_replicas_acked=N`` makes every money-critical write wait (Redis ``WAIT``) until N replicas acknowledged it,
and refuses the request (503) when they do not within ``replica_ack_timeout_ms`` (default 500).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

__all__ = [
    "DEFAULT_ACK_TIMEOUT_MS",
    "MAX_ACK_TIMEOUT_MS",
    "TOPOLOGY_SCHEMES",
    "RedisTopology",
    "parse_redis_url",
]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
TOPOLOGY_SCHEMES = SENTINEL_SCHEMES + CLUSTER_SCHEMES
DEFAULT_ACK_TIMEOUT_MS = 500
MAX_REPLICAS = 16  # a bound that no real deployment reaches; a larger number is a typo
# A WAIT's answer is read under the stores' socket timeout (2 s): a longer wait would end as a dropped connection,
# not as an answer. Half of it leaves room for the round trip.
MAX_ACK_TIMEOUT_MS = 1000
_OURS = ("min_replicas_acked", "replica_ack_timeout_ms", "sentinel_username", "sentinel_password")

Kind = Literal["server", "sentinel", "cluster"]


@dataclass(frozen=True, slots=True, repr=False)
class RedisTopology:
    """What a Redis store URL names. ``client_url`` is the URL left for redis-py (one server); the credentials are
    secrets, so the repr shows none of them."""

    kind: Kind
    client_url: str  # "server": the URL redis-py reads (our own query parameters removed); else ""
    nodes: tuple[tuple[str, int], ...] = ()  # the sentinels, or the cluster's seed nodes
    service: str = ""  # the Sentinel service (master) name
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    min_replicas_acked: int = 0
    ack_timeout_ms: int = DEFAULT_ACK_TIMEOUT_MS

    def __repr__(self) -> str:
        shown = ",".join(f"{h}:{p}" for h, p in self.nodes)
        return f"RedisTopology(kind={self.kind!r}, nodes={shown!r}, service={self.service!r}, db={self.db})"


def _int(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _nodes(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = netloc.rpartition("@")[2]
    out: list[tuple[str, int]] = []
    for part in hosts.split(","):
        if not part:
            raise ValueError("an empty host in the host list")
        parsed = urlsplit("//" + part)
        try:
            port = parsed.port or default_port
        except ValueError as exc:
            raise ValueError("a malformed port in the host list") from exc
        if not parsed.hostname:
            raise ValueError("a host without a name in the host list")
        out.append((parsed.hostname, port))
    return tuple(out)


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    if "@" not in netloc:
        return None, None
    userinfo = netloc.rpartition("@")[0]
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def parse_redis_url(url: str) -> RedisTopology:
    """The topology ``url`` names; ``ValueError`` when it names none. The messages never quote the URL: a piece of
    it could be a password's tail (a raw ``/`` or ``@`` in a password moves where the URL seems to split)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError("not a URL")
    # The query first, from the whole remainder: ``redis://host:6379?db=3`` has no path but a query.
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    query = dict(parse_qsl(query_text, keep_blank_values=True))
    acks = _int(query, "min_replicas_acked", 0, 0, MAX_REPLICAS)
    ack_ms = _int(query, "replica_ack_timeout_ms", DEFAULT_ACK_TIMEOUT_MS, 1, MAX_ACK_TIMEOUT_MS)
    if scheme in ("redis", "rediss", "unix"):
        if "sentinel_username" in query or "sentinel_password" in query:
            raise ValueError("sentinel_username/sentinel_password belong in a redis+sentinel:// URL")
        kept = urlencode([(k, v) for k, v in parse_qsl(query_text, keep_blank_values=True) if k not in _OURS])
        base = url.partition("?")[0]
        return RedisTopology(
            "server", base + ("?" + kept if kept else ""), min_replicas_acked=acks, ack_timeout_ms=ack_ms
        )
    if scheme not in TOPOLOGY_SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}")
    unknown = sorted(set(query) - set(_OURS))
    if unknown:
        raise ValueError(f"unknown query parameter(s) {', '.join(k for k in unknown if 'pass' not in k.lower())}")
    username, password = _credentials(netloc)
    tls = scheme.startswith("rediss")
    if scheme in CLUSTER_SCHEMES:
        if path.strip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has only database 0")
        if "sentinel_username" in query or "sentinel_password" in query:
            raise ValueError("sentinel_username/sentinel_password belong in a redis+sentinel:// URL")
        return RedisTopology(
            "cluster",
            "",
            _nodes(netloc, 6379),
            username=username,
            password=password,
            tls=tls,
            min_replicas_acked=acks,
            ack_timeout_ms=ack_ms,
        )
    service, _, db_text = path.partition("/")
    if not service:
        raise ValueError("a redis+sentinel:// URL names its service: redis+sentinel://h1:26379,h2:26379/mymaster/0")
    db_text = db_text.strip("/") or "0"
    if not db_text.isdigit():
        raise ValueError("the database (after the service name) must be a number")
    return RedisTopology(
        "sentinel",
        "",
        _nodes(netloc, 26379),
        service=unquote(service),
        db=int(db_text),
        username=username,
        password=password,
        sentinel_username=query.get("sentinel_username", username),
        sentinel_password=query.get("sentinel_password", password),
        tls=tls,
        min_replicas_acked=acks,
        ack_timeout_ms=ack_ms,
    )
