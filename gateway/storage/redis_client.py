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
  collection, set :data:`GC_SLACK` seconds after its logical expiry, so that clock skew between a gateway and Redis
  cannot delete a record the gateway still considers live.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.errors import StoreUnavailable
from gateway.secrets import redact_url  # masks the password of redis://, rediss:// and unix:// URLs

__all__ = [
    "CONNECT_TIMEOUT",
    "GC_SLACK",
    "POOL_SIZE",
    "SOCKET_TIMEOUT",
    "RedisClient",
    "RedisStore",
    "connect",
    "redact_url",
    "script_number",
]

POOL_SIZE = 64  # connections per store object; a burst beyond waits for one (up to connect_timeout)
SOCKET_TIMEOUT = 2.0  # seconds; short, so that a hung server fails closed quickly
CONNECT_TIMEOUT = 2.0
GC_SLACK = 300.0  # seconds between a record's logical expiry and Redis deleting it


def connect(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int = POOL_SIZE,
    decode_responses: bool = True,
    blocking_pool: bool = True,
) -> Redis:
    """A client on a *blocking* pool. redis-py's default pool (100 connections) raises ``MaxConnectionsError`` at
    once when a burst needs a 101st, which turned >100 concurrent paid requests into 503s; a blocking pool makes
    the burst wait its turn and still fails closed (``ConnectionError``) if no connection frees up in time.

    ``blocking_pool=False`` keeps redis-py's default pool (``max_connections`` is then ignored); the idempotency
    store has always used it."""
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        # At most one immediate retry, on a connection error only: replaces a connection the server
        # closed; a server that is down fails after two refused connects, not after a back-off ladder.
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "decode_responses": decode_responses,
    }
    pool: ConnectionPool
    if blocking_pool:
        pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=connect_timeout, **common)
    else:
        pool = ConnectionPool.from_url(url, **common)
    return Redis.from_pool(pool)


def script_number(value: float) -> str:
    """A time or duration as a script argument: ``repr`` of a float round-trips exactly through Lua's
    ``tonumber``, so the script compares the very instants the caller meant."""
    return repr(float(value))


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
            self.redis: Redis = connect(
                url,
                socket_timeout=socket_timeout,
                connect_timeout=connect_timeout,
                decode_responses=decode_responses,
                blocking_pool=blocking_pool,
            )
        except (ValueError, RedisError) as exc:
            raise StoreUnavailable(f"invalid redis url {self.redacted!r}: {type(exc).__name__}") from exc
        self._closed = False

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
        except (RedisError, OSError) as exc:
            raise self.unavailable(exc) from exc

    async def run_script(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        with self.guard():
            return await script(keys=list(keys), args=list(args))

    async def ping(self) -> None:
        with self.guard():
            await self.redis.ping()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RedisError, OSError):  # closing a dead connection: nothing to do
            await self.redis.aclose()


class RedisStore:
    """What every store on Redis shares: a :class:`RedisClient` named for it, its key prefix, a repr that never
    shows a password, ping and close. A subclass names itself (``WHAT``), sets its ``PREFIX`` and registers its
    scripts in :meth:`_register`."""

    WHAT: ClassVar[str]
    PREFIX: ClassVar[str]
    CLIENT_OPTIONS: ClassVar[dict[str, bool]] = {}  # e.g. decode_responses / blocking_pool for one store

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        socket_timeout: float = SOCKET_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._prefix = self.PREFIX if prefix is None else prefix
        self._client = RedisClient(
            url,
            what=self.WHAT,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            **self.CLIENT_OPTIONS,
        )
        self._register()

    def _register(self) -> None:
        """Register this store's Lua scripts on ``self._client``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self._client.redacted!r}, prefix={self._prefix!r})"

    async def ping(self) -> None:
        await self._client.ping()

    async def aclose(self) -> None:
        await self._client.aclose()
