"""Where a client keeps its session channels: what it needs to go on paying through one, in a later process too.

A channel's record holds its configuration (with the random salt: without it the channel's id, and so the money in
it, cannot be named again), the balance this client knows of, the cumulative the server confirmed (``charged``) and
the highest voucher this wallet signed (``signed_max``: all the server can ever claim). The client writes the
record *before* it sends a deposit, so a crash after the deposit still leaves the salt on disk.

:class:`MemorySessionStore` lasts as long as the client (the default); :class:`FileSessionStore` is a JSON file
(mode 0600), which the CLI uses and which several processes can share (each write is atomic, under a lock; the
server's corrective 402 settles any disagreement between them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.client._errors import X402ClientError
from gateway.client._paths import state_file
from gateway.x402.sessions import ChannelConfig

__all__ = ["FileSessionStore", "MemorySessionStore", "SessionChannel", "SessionStore", "default_sessions_file"]

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_BYTES32 = re.compile(r"0x[0-9a-fA-F]{64}")


def _hex(value: Any, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"not a {'salt' if pattern is _BYTES32 else 'address'}: {value!r}")
    return value.lower()


def _config(doc: Any) -> ChannelConfig:
    if not isinstance(doc, dict):
        raise ValueError("channelConfig is not an object")
    return ChannelConfig(
        payer=_hex(doc["payer"], _ADDRESS),
        payer_authorizer=_hex(doc["payerAuthorizer"], _ADDRESS),
        receiver=_hex(doc["receiver"], _ADDRESS),
        receiver_authorizer=_hex(doc["receiverAuthorizer"], _ADDRESS),
        token=_hex(doc["token"], _ADDRESS),
        withdraw_delay=int(doc["withdrawDelay"]),
        salt=_hex(doc["salt"], _BYTES32),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionChannel:
    """One channel as this client knows it; amounts in atomic units."""

    channel_id: str  # 0x + 64 lower-case hex
    origin: str  # the server it pays: scheme://host[:port]
    network: str  # as the server's offer names it (CAIP-2)
    chain_id: int
    config: ChannelConfig
    balance: int = 0  # what the channel holds on chain, as far as this client knows
    charged: int = 0  # the cumulative the server confirmed: the next voucher is charged + price
    signed_max: int = 0  # the highest voucher this wallet signed on this channel
    deposited: int = 0  # every deposit this client saw land
    refunded: int = 0  # every refund this client saw
    opened_at: float = 0.0
    updated_at: float = 0.0

    @property
    def remaining(self) -> int:
        """What the channel can still pay for."""
        return max(self.balance - self.charged, 0)

    @property
    def payer(self) -> str:
        return self.config.payer

    @property
    def pay_to(self) -> str:
        return self.config.receiver

    @property
    def asset(self) -> str:
        return self.config.token

    def wire(self) -> dict[str, Any]:
        """The JSON form (the file store's, and the CLI's ``--json``)."""
        return {
            "channelId": self.channel_id,
            "origin": self.origin,
            "network": self.network,
            "chainId": self.chain_id,
            "channelConfig": self.config.wire(),
            "balance": str(self.balance),
            "charged": str(self.charged),
            "remaining": str(self.remaining),
            "signedMax": str(self.signed_max),
            "deposited": str(self.deposited),
            "refunded": str(self.refunded),
            "openedAt": self.opened_at,
            "updatedAt": self.updated_at,
        }

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> SessionChannel:
        """Raises ValueError (or KeyError/TypeError) for a record that is not one."""
        return cls(
            channel_id=_hex(doc["channelId"], _BYTES32),
            origin=str(doc["origin"]),
            network=str(doc["network"]),
            chain_id=int(doc["chainId"]),
            config=_config(doc["channelConfig"]),
            balance=int(doc.get("balance", 0)),
            charged=int(doc.get("charged", 0)),
            signed_max=int(doc.get("signedMax", 0)),
            deposited=int(doc.get("deposited", 0)),
            refunded=int(doc.get("refunded", 0)),
            opened_at=float(doc.get("openedAt", 0.0)),
            updated_at=float(doc.get("updatedAt", 0.0)),
        )

    def replace(self, **changes: Any) -> SessionChannel:
        return dataclasses.replace(self, **changes)


class SessionStore(Protocol):
    def channels(self) -> list[SessionChannel]: ...

    def get(self, channel_id: str) -> SessionChannel | None: ...

    def put(self, channel: SessionChannel) -> None: ...


class MemorySessionStore:
    """Channels for the life of the client (the default): a new process opens new channels."""

    def __init__(self) -> None:
        self._channels: dict[str, SessionChannel] = {}
        self._lock = threading.Lock()

    def channels(self) -> list[SessionChannel]:
        with self._lock:
            return list(self._channels.values())

    def get(self, channel_id: str) -> SessionChannel | None:
        with self._lock:
            return self._channels.get(channel_id)

    def put(self, channel: SessionChannel) -> None:
        with self._lock:
            self._channels[channel.channel_id] = channel


def default_sessions_file() -> Path:
    """``$X402_GATEWAY_SESSIONS_FILE``, else ``$XDG_CONFIG_HOME/x402-gateway/sessions.json`` (``~/.config``)."""
    return state_file("X402_GATEWAY_SESSIONS_FILE", "sessions.json")


class FileSessionStore:
    """A JSON file ``{"channels": {channel_id: record}}``, mode 0600. Records are never dropped: a channel's
    salt is what names its money."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_sessions_file()
        self._cache: tuple[tuple[int, int, int], dict[str, dict[str, Any]]] | None = None

    def __repr__(self) -> str:
        return f"FileSessionStore({str(self.path)!r})"

    def _read(self, *, cached: bool = True) -> dict[str, dict[str, Any]]:
        """The records, parsed again when the file looks changed (another process may write it at any time). A
        write never relies on that look (a file rewritten within one clock tick may look the same): it reads."""
        try:
            st = self.path.stat()
            version = (st.st_ino, st.st_mtime_ns, st.st_size)
            if cached and self._cache is not None and self._cache[0] == version:
                return dict(self._cache[1])
            doc: Any = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError) as exc:
            # Overwriting a damaged file would lose the salts it holds: refuse, and say where it is.
            raise X402ClientError(
                f"the session store {self.path} is not valid JSON ({exc}); move it aside",
                reason="session_store_unreadable",
            ) from None
        channels = doc.get("channels") if isinstance(doc, dict) else None
        records = {str(k): v for k, v in channels.items() if isinstance(v, dict)} if isinstance(channels, dict) else {}
        self._cache = (version, records)
        return dict(records)

    def channels(self) -> list[SessionChannel]:
        out = []
        for record in self._read().values():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                out.append(SessionChannel.from_wire(record))
        return out

    def get(self, channel_id: str) -> SessionChannel | None:
        record = self._read().get(channel_id)
        if record is None:
            return None
        try:
            return SessionChannel.from_wire(record)
        except (KeyError, TypeError, ValueError):
            return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def put(self, channel: SessionChannel) -> None:
        with self._locked():
            records = self._read(cached=False)
            before = records.get(channel.channel_id)
            record = channel.wire()
            if before is not None:
                # Another process on this file may have sent a higher voucher since this one read the record: the
                # highest ever signed is what the server may hold (gateway/client/_sessions.py, SessionCall).
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    record["signedMax"] = str(max(int(before["signedMax"]), channel.signed_max))
            records[channel.channel_id] = record
            # A new channel (its salt) and a money movement must survive a crash; a lost voucher update costs only
            # a corrective 402, so it skips the fsync (~2 ms a write on ext4).
            durable = before is None or any(before.get(k) != record[k] for k in ("balance", "deposited", "refunded"))
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".sessions-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump({"channels": records}, fh, indent=1)
                    if durable:
                        fh.flush()
                        os.fsync(fh.fileno())
                os.replace(tmp, self.path)  # mkstemp made it 0600
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
