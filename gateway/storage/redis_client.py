"""The Redis client plumbing shared by the Redis receipt, job and idempotency stores.

Why each rule exists:

* Fail closed (a store that cannot answer cannot tell a first presentation from a replay), quickly: socket and
  connect timeouts are short, and every Redis or socket error becomes :class:`gateway.errors.StoreUnavailable`.
  The message names the failure, never the URL (which may carry a password); :func:`redact_url` is what logs and
  reprs show instead.
* At most one immediate retry, on a connection error only, without back-off: it replaces a connection the server
  closed (e.g. across a Redis restart); a server that is down fails after two refused connects, not after a
  back-off ladder. Nothing is cached between calls, so once Redis answers again the same store object works again.
* A *blocking* connection pool (:func:`connect`): redis-py's default pool (100 connections) raises
  ``MaxConnectionsError`` at once when a burst needs a 101st, which turned >100 concurrent paid requests into 503s;
  a blocking pool makes the burst wait its turn and still fails closed if no connection frees up in time.
* Scripts are registered once and called by EVALSHA (redis-py loads them again after a ``NOSCRIPT``, e.g. after a
  restart).
* Time comes from the caller (``now``), never from the Redis host's clock. A record's Redis TTL is only garbage
  collection, and it is always *relative* (:data:`GC_EXPIRE`: ``PEXPIRE`` by ``expires_at - now`` plus
  :data:`GC_SLACK`), never an absolute ``PEXPIREAT`` computed from the gateway's clock: Redis counts a relative TTL
  down by its own clock, so the key goes :data:`GC_SLACK` seconds after the logical expiry *by the gateway's clock*
  however far the gateway's and the Redis host's clocks disagree. (An absolute instant from a gateway whose clock is
  behind the Redis host's by more than the slack had Redis delete records the gateway still considered live: a
  consumed payment became new again.) What remains is the skew *between gateways* sharing a record, which the slack
  absorbs up to :data:`GC_SLACK` seconds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import StoreReplicasBehind, StoreUnavailable
from gateway.secrets import redact_url  # masks the password of every store URL
from gateway.storage.redis_topology import RedisTopology, parse_redis_url

__all__ = [
    "CONNECT_TIMEOUT",
    "GC_EXPIRE",
    "GC_SLACK",
    "POOL_SIZE",
    "SOCKET_TIMEOUT",
    "AnyRedis",
    "RedisClient",
    "RedisStore",
    "StoreTopology",
    "connect",
    "redact_url",
    "script_number",
]

log = logging.getLogger("gateway.store")

POOL_SIZE = 64  # connections per store object; a burst beyond waits for one (up to connect_timeout)
# redis-py's cluster client has no blocking pool: a command beyond a node's max_connections fails at once. So each
# store object may open this many connections per cluster node, well above any burst a gateway lets through (Redis
# accepts 10,000 clients by default).
CLUSTER_POOL_SIZE = 1024
SOCKET_TIMEOUT = 2.0  # seconds; short, so that a hung server fails closed quickly
CONNECT_TIMEOUT = 2.0
GC_SLACK = 300.0  # seconds between a record's logical expiry and Redis deleting it

# The one rule for a key's Redis TTL, a Lua function for every store's scripts (prepend it to the script's source):
# ``gc_expire(key, expires_at, now, slack)`` gives ``key`` the lifetime ``max(expires_at - now, 0) + slack`` seconds,
# ``expires_at`` and ``now`` both by the caller's clock (numbers), as a relative PEXPIRE that Redis counts down by its
# own clock. Never PEXPIREAT/EXPIREAT/PXAT/EXAT with an instant from the gateway's clock: Redis would read that
# instant by the Redis host's clock. An expiry already past keeps the key ``slack`` seconds (never deletes it at once).
GC_EXPIRE = """
local function gc_expire(key, expires_at, now, slack)
  local ttl = math.max(expires_at - now, 0) + slack
  redis.call('PEXPIRE', key, string.format('%.0f', math.max(math.ceil(ttl * 1000), 1)))
end
"""

AnyRedis = Redis | RedisCluster  # one server or a Sentinel-managed master | a Redis Cluster


class _WatchedSentinelPool(SentinelConnectionPool):
    """redis-py's Sentinel pool (asks the sentinels for the master before each new connection, follows a failover)
    that also remembers the master it last reached and counts the moves it saw (``readyz``, metrics)."""

    master_seen: tuple[str, int] | None = None
    failovers_seen = 0

    async def get_master_address(self) -> Any:
        address = await super().get_master_address()  # type: ignore[no-untyped-call]
        seen = (str(address[0]), int(address[1]))
        if self.master_seen is not None and seen != self.master_seen:
            self.failovers_seen += 1
            log.warning(
                "the store's master moved",
                extra={"service": self.service_name, "master": f"{seen[0]}:{seen[1]}"},
            )
        self.master_seen = seen
        return address


class _BlockingSentinelPool(_WatchedSentinelPool, BlockingConnectionPool):
    """The watched Sentinel pool with the blocking pool's waiting: a burst beyond ``max_connections`` waits its
    turn instead of failing at once."""


def connect(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int = POOL_SIZE,
    decode_responses: bool = True,
    blocking_pool: bool = True,
) -> AnyRedis:
    """A client for the topology ``url`` names (:mod:`gateway.storage.redis_topology`).

    One server or a Sentinel-managed master: a *blocking* pool. redis-py's default pool (100 connections) raises
    ``MaxConnectionsError`` at once when a burst needs a 101st, which turned >100 concurrent paid requests into 503s;
    a blocking pool makes the burst wait its turn and still fails closed (``ConnectionError``) if no connection
    frees up in time. ``blocking_pool=False`` keeps redis-py's default pool (``max_connections`` is then ignored);
    the idempotency store has always used it. A cluster: redis-py's cluster client, a pool per node."""
    topology = parse_redis_url(url)
    # At most one immediate retry, on a connection error only: replaces a connection the server closed; a server
    # that is down fails after two refused connects, not after a back-off ladder.
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": retry,
        "decode_responses": decode_responses,
    }
    # TLS (rediss+): the same CA, client certificate and checks for the data nodes and the sentinels; a private CA
    # is the usual case for self-hosted TLS and for managed services that bring their own bundle.
    tls = topology.tls_options()
    if topology.kind == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in topology.nodes],
            username=topology.username,
            password=topology.password,
            max_connections=max(max_connections, CLUSTER_POOL_SIZE),
            **tls,
            **common,
        )
    if topology.kind == "sentinel":
        sentinels = Sentinel(
            topology.nodes,
            sentinel_kwargs={
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": connect_timeout,
                "username": topology.sentinel_username,
                "password": topology.sentinel_password,
                **tls,
            },
        )
        pool_class = _BlockingSentinelPool if blocking_pool else _WatchedSentinelPool
        extra: dict[str, Any] = (
            {"max_connections": max_connections, "timeout": connect_timeout} if blocking_pool else {}
        )
        client: Redis = sentinels.master_for(
            topology.service,
            redis_class=Redis,
            connection_pool_class=pool_class,
            db=topology.db,
            username=topology.username,
            password=topology.password,
            **tls,
            **extra,
            **common,
        )
        return client
    pool: ConnectionPool
    if blocking_pool:
        pool = BlockingConnectionPool.from_url(
            topology.client_url, max_connections=max_connections, timeout=connect_timeout, **common
        )
    else:
        pool = ConnectionPool.from_url(topology.client_url, **common)
    return Redis.from_pool(pool)


def script_number(value: float) -> str:
    """A time or duration as a script argument: ``repr`` of a float round-trips exactly through Lua's
    ``tonumber``, so the script compares the very instants the caller meant."""
    return repr(float(value))


@dataclass(frozen=True, slots=True)
class StoreTopology:
    """A Redis store's topology as readiness and metrics show it."""

    kind: str  # "server" | "sentinel" | "cluster"
    master: str | None  # Sentinel: the master last reached, host:port
    min_replicas_acked: int
    replicas_acked: int | None  # the last replicated write's WAIT answer (None: none yet, or not asked for)
    ack_shortfalls: int
    failovers_seen: int  # Sentinel: master moves this client followed

    def as_json(self, *, with_address: bool) -> dict[str, Any]:
        """``with_address``: include the master's address (the admin API does; the public ``/readyz`` and
        ``/metrics`` do not: where the store lives is no prober's business)."""
        return {
            "topology": self.kind,
            **({"master": self.master} if with_address else {}),
            "min_replicas_acked": self.min_replicas_acked,
            "replicas_acked": self.replicas_acked,
            "ack_shortfalls": self.ack_shortfalls,
            "failovers_seen": self.failovers_seen,
        }


async def _cluster_script_and_wait(
    cluster: RedisCluster, script: AsyncScript, keys: list[str], args: list[Any], replicas: int, timeout_ms: int
) -> tuple[Any, int]:
    """EVALSHA then WAIT on one connection to the primary holding ``keys`` (WAIT counts the acknowledgements of
    *this connection's* writes, so the two must share it; redis-py's cluster client would route a key-less WAIT
    elsewhere). A NOSCRIPT loads the script and tries once more; a slot that moved (MOVED/ASK: a failover, a
    resharding) or a node that is gone refreshes the slot map and fails closed: the caller answers 503 and the next
    request finds the new owner."""
    if not cluster.nodes_manager.slots_cache:
        await cluster.initialize()
    node = cluster.get_node_from_key(keys[0])
    if node is None:
        raise RedisConnectionError("no cluster node serves this key's slot")
    conn = node.acquire_connection()
    try:
        for attempt in (1, 2):
            commands = [("EVALSHA", script.sha, len(keys), *keys, *args), ("WAIT", replicas, timeout_ms)]
            await conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:  # an error reply: read the other reply before deciding
                    replies.append(exc)
            result, acked = replies
            if isinstance(result, NoScriptError) and attempt == 1:
                await conn.send_command("SCRIPT", "LOAD", script.script)
                await conn.read_response()
                continue
            if isinstance(result, ResponseError):
                raise result
            if isinstance(acked, ResponseError):
                raise acked
            return result, int(acked)
        raise ResponseError("the script could not be loaded")  # pragma: no cover - the loop returns or raises
    except BaseException as exc:
        await conn.disconnect()
        if isinstance(exc, AskError | TryAgainError | ClusterDownError | RedisConnectionError | RedisTimeoutError):
            # The slot moved (a failover, a resharding) or its node is gone: learn the cluster anew, so that the
            # next request finds the new owner; this one fails closed.
            with contextlib.suppress(RedisError, OSError):
                await cluster.nodes_manager.initialize()
        raise
    finally:
        node.release(conn)


class RedisClient:
    """One store's Redis client: construction, script registration, error mapping and close.

    ``what`` names the store in errors (``"receipt store"`` -> ``"the receipt store is closed"``,
    ``"redis receipt store: ConnectionError: ..."``).
    """

    def __init__(
        self,
        url: str,
        *,
        what: str,
        socket_timeout: float = SOCKET_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        decode_responses: bool = True,
        blocking_pool: bool = True,
    ) -> None:
        self.redacted = redact_url(url)
        self._what = what
        try:
            self.topology: RedisTopology = parse_redis_url(url)
            self.redis: AnyRedis = connect(
                url,
                socket_timeout=socket_timeout,
                connect_timeout=connect_timeout,
                decode_responses=decode_responses,
                blocking_pool=blocking_pool,
            )
        except (ValueError, RedisError) as exc:
            raise StoreUnavailable(f"invalid redis url {self.redacted!r}: {type(exc).__name__}") from exc
        self._closed = False
        self.replicas_acked: int | None = None  # what the last replicated write's WAIT answered
        self.ack_shortfalls = 0  # replicated writes refused because too few replicas acknowledged them

    def register_script(self, source: str) -> AsyncScript:
        return self.redis.register_script(source)

    def unavailable(self, exc: BaseException) -> StoreUnavailable:
        # The message names the failure, never the URL (which may carry a password).
        return StoreUnavailable(f"redis {self._what}: {type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Refuse a closed store; turn every Redis or socket error inside the block into ``StoreUnavailable``."""
        if self._closed:
            raise StoreUnavailable(f"the {self._what} is closed")
        try:
            yield
        except (RedisError, RedisClusterException, OSError) as exc:  # a cluster with no node answering is the latter
            raise self.unavailable(exc) from exc

    async def run_script(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], *, replicated: bool = False
    ) -> Any:
        """Run ``script``. ``replicated``: a money-critical write (a payment's claim, its paid and consumed records,
        a channel's lock and charge). When the URL asks for ``min_replicas_acked`` it is followed by ``WAIT`` on the
        same connection, and too few acknowledgements are ``StoreReplicasBehind`` (a ``StoreUnavailable``): the write
        is on the master but a failover could lose it, so nothing may be served on it (docs/scaling.md)."""
        wanted = self.topology.min_replicas_acked if replicated else 0
        with self.guard():
            if wanted == 0:
                return await script(keys=list(keys), args=list(args))
            if isinstance(self.redis, RedisCluster):
                result, acked = await _cluster_script_and_wait(
                    self.redis, script, list(keys), list(args), wanted, self.topology.ack_timeout_ms
                )
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    await script(keys=list(keys), args=list(args), client=pipe)
                    pipe.execute_command("WAIT", wanted, self.topology.ack_timeout_ms)
                    result, acked = await pipe.execute()
        self.replicas_acked = int(acked)
        if self.replicas_acked < wanted:
            self.ack_shortfalls += 1
            raise StoreReplicasBehind(
                f"redis {self._what}: {self.replicas_acked} of {wanted} replicas acknowledged a write within "
                f"{self.topology.ack_timeout_ms} ms (a failover could lose it)"
            )
        return result

    def report(self) -> StoreTopology:
        """What readiness and metrics show of this client's topology (no URL, no credentials)."""
        master: str | None = None
        failovers = 0
        if self.topology.kind == "sentinel":
            pool = self.redis.connection_pool if isinstance(self.redis, Redis) else None
            if isinstance(pool, _WatchedSentinelPool):
                if pool.master_seen is not None:
                    master = f"{pool.master_seen[0]}:{pool.master_seen[1]}"
                failovers = pool.failovers_seen
        return StoreTopology(
            kind=self.topology.kind,
            master=master,
            min_replicas_acked=self.topology.min_replicas_acked,
            replicas_acked=self.replicas_acked,
            ack_shortfalls=self.ack_shortfalls,
            failovers_seen=failovers,
        )

    async def ping(self) -> None:
        with self.guard():
            await self.redis.ping()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RedisError, OSError):  # closing a dead connection: nothing to do
            await self.redis.aclose()
            pool = self.redis.connection_pool if isinstance(self.redis, Redis) else None
            if isinstance(pool, _WatchedSentinelPool):  # the clients that asked the sentinels for the master
                for sentinel in pool.sentinel_manager.sentinels:
                    await sentinel.aclose()


class RedisStore:
    """What every store on Redis shares: a :class:`RedisClient` named for it, its key prefix, a repr that never
    shows a password, ping and close. A subclass names itself (``WHAT``), sets its ``PREFIX`` and registers its
    scripts in :meth:`_register`."""

    WHAT: ClassVar[str]
    PREFIX: ClassVar[str]
    # The prefix on a Redis Cluster when PREFIX carries no hash tag but a script touches several keys: one tag puts
    # them in one slot (a multi-key script across slots is refused). None: PREFIX everywhere.
    CLUSTER_PREFIX: ClassVar[str | None] = None
    CLIENT_OPTIONS: ClassVar[dict[str, bool]] = {}  # e.g. decode_responses / blocking_pool for one store

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        socket_timeout: float = SOCKET_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._client = RedisClient(
            url,
            what=self.WHAT,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            **self.CLIENT_OPTIONS,
        )
        clustered = self._client.topology.kind == "cluster" and self.CLUSTER_PREFIX is not None
        self._prefix = prefix if prefix is not None else (self.CLUSTER_PREFIX if clustered else self.PREFIX) or ""
        self._register()

    def _register(self) -> None:
        """Register this store's Lua scripts on ``self._client``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self._client.redacted!r}, prefix={self._prefix!r})"

    async def ping(self) -> None:
        await self._client.ping()

    def topology(self) -> StoreTopology:
        return self._client.report()

    async def aclose(self) -> None:
        await self._client.aclose()
