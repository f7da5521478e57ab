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

TLS (``rediss+sentinel://`` and ``rediss+cluster://``; a one-server ``rediss://`` URL leaves its query to redis-py,
which reads the same names): ``ssl_ca_certs=/path/ca.pem`` is the CA that signed the nodes' certificates (a private
CA, a managed service's bundle; without it the system's trust store), ``ssl_certfile`` / ``ssl_keyfile`` a client
certificate for servers that require one (mutual TLS), ``ssl_cert_reqs=none`` turns certificate checks off. They
apply to the data nodes and the sentinels alike. A ``redis+``/``redis://``/``unix://`` URL refuses them: redis-py
would hand them to a plain socket connection and fail on the first request, not at start.

Two query parameters, on every Redis URL, ask for replicated writes (docs/scaling.md):
``min_replicas_acked=N`` makes every money-critical write wait (Redis ``WAIT``) until N replicas acknowledged it,
and refuses the request (503) when they do not within ``replica_ack_timeout_ms`` (default 500).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

__all__ = [
    "DEFAULT_ACK_TIMEOUT_MS",
    "MAX_ACK_TIMEOUT_MS",
    "TOPOLOGY_SCHEMES",
    "RedisTopology",
    "parse_redis_url",
    "refuse_raw_userinfo",
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
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_TLS_OPTIONS = (*_TLS_FILES, "ssl_cert_reqs")
# Fixed text: the message quotes nothing of the URL (not even a parameter's name, which is the URL's text too).
_NEEDS_TLS = (
    "TLS options (ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs) need a TLS URL: "
    "rediss://, rediss+sentinel:// or rediss+cluster://"
)

# Fixed text too: a raw "/", "?", "#" or "@" in a password moves where the URL seems to split, so any piece of it quoted
# (a "host", a "port", a "query parameter") could be the password's head or tail.
_RAW_USERINFO = (
    "the user info (user:password@) of a Redis URL holds a raw '/', '?', '#' or '@': percent-encode the password "
    "('/' as %2F, '?' as %3F, '#' as %23, '@' as %40, '%' as %25)"
)
# What precedes the first "/", "?" or "#" when an "@" further on is in the path or the query, not after a user
# info: nothing (unix:///path), or a host list (h1[:port],h2[:port], IPv6 in brackets).
_HOST = r"(?:\[[0-9A-Fa-f:.]*\]|[A-Za-z0-9._~%!$&'()*+;=-]+)(?::[0-9]*)?"
_HOSTS = re.compile(rf"(?:{_HOST}(?:,{_HOST})*)?")

Kind = Literal["server", "sentinel", "cluster"]
CertReqs = Literal["required", "none"]


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
    # TLS, Sentinel and Cluster ("server": redis-py reads them from client_url). File paths, not secrets.
    ssl_ca_certs: str | None = None  # the CA bundle that signed the nodes' certificates; None: the system's
    ssl_certfile: str | None = None  # a client certificate (mutual TLS), with its key unless ssl_keyfile has it
    ssl_keyfile: str | None = None
    ssl_cert_reqs: CertReqs = "required"  # "none": no certificate check at all (anyone on the path can listen)
    min_replicas_acked: int = 0
    ack_timeout_ms: int = DEFAULT_ACK_TIMEOUT_MS

    def __repr__(self) -> str:
        shown = ",".join(f"{h}:{p}" for h, p in self.nodes)
        tls = ""
        if self.tls:
            given = ((k, getattr(self, k)) for k in _TLS_FILES)
            tls = ", tls=True" + "".join(f", {k}={v!r}" for k, v in given if v is not None)
            tls += ", ssl_cert_reqs='none'" if self.ssl_cert_reqs == "none" else ""
        return f"RedisTopology(kind={self.kind!r}, nodes={shown!r}, service={self.service!r}, db={self.db}{tls})"

    def tls_options(self) -> dict[str, Any]:
        """redis-py's keyword arguments for this Sentinel or Cluster topology's TLS (``ssl=True`` and the options
        the URL gave), the same for the data nodes, the sentinels and the rate-limit storage; empty without TLS (a
        plain connection refuses every ``ssl_*`` argument)."""
        if not self.tls:
            return {}
        given = {k: getattr(self, k) for k in _TLS_FILES if getattr(self, k) is not None}
        return {"ssl": True, **given, "ssl_cert_reqs": self.ssl_cert_reqs}


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
        except ValueError:
            raise ValueError("a malformed port in the host list") from None
        if not parsed.hostname:
            raise ValueError("a host without a name in the host list")
        out.append((parsed.hostname, port))
    return tuple(out)


def _tls(query: dict[str, str]) -> dict[str, Any]:
    """The TLS options of a ``rediss+`` URL's query as :class:`RedisTopology` fields, checked: a URL that names an
    empty file or a key without its certificate is a mistake to report at start, not a TLS error on the first
    payment. Whether the files exist is left to the connection (it fails closed)."""
    given: dict[str, Any] = {k: query[k] for k in _TLS_OPTIONS if k in query}
    for name in _TLS_FILES:
        if name in given and not given[name]:
            raise ValueError(f"{name} must name a file")
    if "ssl_keyfile" in given and "ssl_certfile" not in given:
        raise ValueError("ssl_keyfile is the key of a client certificate: give ssl_certfile too")
    if "ssl_cert_reqs" in given:
        given["ssl_cert_reqs"] = given["ssl_cert_reqs"].lower()
        if given["ssl_cert_reqs"] not in ("required", "none"):
            raise ValueError("ssl_cert_reqs must be required (the default) or none")
    return given


def refuse_raw_userinfo(url: str) -> None:
    """``ValueError`` (a fixed message) when ``url``'s user info holds a raw ``/``, ``?``, ``#`` or ``@``. The first
    three end the host part for every URL parser (ours, urllib's, redis-py's, ``limits``'), which then reads the
    rest of the password as a port, a path or a query and quotes it in its errors; on a raw ``@`` the parsers
    disagree (urllib splits at the last one, ``limits`` at the first), so one of them reads a piece of the password
    as the host and quotes it."""
    rest = url.partition("://")[2]
    head, at, _ = rest.partition("@")
    if not at:
        return
    authority = re.split(r"[/?#]", head, maxsplit=1)[0]
    if authority != head:
        after = head[len(authority) :]  # from the first "/", "?" or "#" to the "@"
        if not _HOSTS.fullmatch(authority) or "#" in after:
            raise ValueError(_RAW_USERINFO)
        tcp = url.partition("://")[0].lower() != "unix"
        if tcp and "?" not in after:
            raise ValueError(_RAW_USERINFO)  # the path of a TCP URL is a database number: "user:123/x@h" is a password
        if "?" in after and "=" not in re.split(r"[?&]", after)[-1]:
            raise ValueError(_RAW_USERINFO)  # an "@" in a query parameter's name is a password's
    # Otherwise the first "@" ends the user info, or is in the path or the query (a socket or certificate file's
    # name) and the URL has no user info at all.
    if re.split(r"[/?#]", rest, maxsplit=1)[0].count("@") > 1:
        raise ValueError(_RAW_USERINFO)


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
    refuse_raw_userinfo(url)
    # The query first, from the whole remainder: ``redis://host:6379?db=3`` has no path but a query.
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    query = dict(parse_qsl(query_text, keep_blank_values=True))
    acks = _int(query, "min_replicas_acked", 0, 0, MAX_REPLICAS)
    ack_ms = _int(query, "replica_ack_timeout_ms", DEFAULT_ACK_TIMEOUT_MS, 1, MAX_ACK_TIMEOUT_MS)
    if scheme in ("redis", "rediss", "unix"):
        if "sentinel_username" in query or "sentinel_password" in query:
            raise ValueError("sentinel_username/sentinel_password belong in a redis+sentinel:// URL")
        if scheme != "rediss" and any(k.lower().startswith("ssl") for k in query):
            raise ValueError(_NEEDS_TLS)
        kept = urlencode([(k, v) for k, v in parse_qsl(query_text, keep_blank_values=True) if k not in _OURS])
        base = url.partition("?")[0]
        return RedisTopology(
            "server", base + ("?" + kept if kept else ""), min_replicas_acked=acks, ack_timeout_ms=ack_ms
        )
    if scheme not in TOPOLOGY_SCHEMES:
        raise ValueError(
            "unsupported scheme: use redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, "
            "redis+cluster:// or rediss+cluster://"
        )
    tls = scheme.startswith("rediss")
    if not tls and any(k.lower().startswith("ssl") for k in query):
        raise ValueError(_NEEDS_TLS)
    unknown = sorted(set(query) - set(_OURS) - set(_TLS_OPTIONS))
    if unknown:
        raise ValueError(
            "unknown query parameter(s): a Sentinel or Cluster URL takes min_replicas_acked, replica_ack_timeout_ms, "
            "sentinel_username, sentinel_password and the TLS options (ssl_ca_certs, ssl_certfile, ssl_keyfile, "
            "ssl_cert_reqs) only"
        )
    tls_options = _tls(query)
    username, password = _credentials(netloc)
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
            **tls_options,
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
        **tls_options,
    )
