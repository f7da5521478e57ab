"""Real Redis topologies for tests: a Sentinel group and a Redis Cluster, each a set of ``redis-server`` processes.

Usage::

    with start_sentinel_group(tmp_path) as group:      # master + replica + three sentinels, all on 127.0.0.1
        old = group.master_address()
        killed_at = group.kill_master()                 # SIGKILL: no shutdown, no last write
        new = group.wait_for_failover(old)              # the sentinels promoted the replica
        group.restart(old)                              # comes back as a master, is demoted by the sentinels

    with start_cluster(tmp_path, masters=3) as cluster:
        cluster.url                                     # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,.../

    tls = make_tls_files(tmp_path / "tls")              # a throwaway CA, a server and a client certificate
    with start_sentinel_group(tmp_path, tls=tls) as group:
        group.url                                       # rediss+sentinel://...?ssl_ca_certs=<tls.ca>

The fixtures at the bottom (``sentinel_group``, ``redis_cluster``, ``cluster_url``) are imported by the conftest of
each test folder that needs them. Every node lives in its own directory under the caller's ``workdir``, with its
config file (sentinels and demoted masters rewrite theirs) and its log; a topology that does not come up in time
fails with what it was waiting for and the tail of every log. Nothing persists (``save ''``, no AOF): a failover
that loses the writes the replica had not received yet is exactly what tests of these topologies look at.

The helpers block (plain redis-py, short timeouts); an async test runs the long waits in a thread
(``await asyncio.to_thread(group.wait_for_failover, old)``) so that its own clients keep their event loop.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar
from urllib.parse import quote, urlencode

import pytest
import redis

from gateway.dev.processes import free_port, reap, spawn, wait_until

__all__ = [
    "Address",
    "ClusterGroup",
    "RedisProcess",
    "SentinelGroup",
    "TlsFiles",
    "TopologyError",
    "cluster_url",
    "make_tls_files",
    "redis_cluster",
    "sentinel_group",
    "start_cluster",
    "start_sentinel_group",
]

Address = tuple[str, int]
T = TypeVar("T")
HOST = "127.0.0.1"
CLUSTER_SLOTS = 16384
READY_TIMEOUT = 30.0  # seconds for a whole topology to come up; two shared cores can be slow


class TopologyError(RuntimeError):
    """A topology did not start or did not reach the state a helper waited for; the message has every log's tail."""


# ------------------------------------------------------------------------------------------------------------ TLS


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A throwaway CA and the certificates it signed (:func:`make_tls_files`), and whether the nodes require a
    client certificate (``tls-auth-clients``). The server certificate is also the one a node presents as a client
    (a replica to its master, a sentinel to the nodes, a cluster node to the bus), so it serves both purposes."""

    ca: Path
    cert: Path  # the nodes': CN and SAN IP 127.0.0.1, serverAuth and clientAuth
    key: Path
    client_cert: Path  # the gateway's, for mutual TLS
    client_key: Path
    auth_clients: bool = False

    def node_config(self) -> list[str]:
        """redis.conf lines for a node (data node, sentinel, cluster node) that speaks TLS only, also to the others
        (``tls-replication``); the caller sets ``port 0`` and ``tls-port``."""
        return [
            f"tls-cert-file {_quoted(str(self.cert))}",
            f"tls-key-file {_quoted(str(self.key))}",
            f"tls-ca-cert-file {_quoted(str(self.ca))}",
            f"tls-auth-clients {'yes' if self.auth_clients else 'no'}",
            "tls-replication yes",
        ]

    def client_options(self) -> dict[str, Any]:
        """redis-py's keyword arguments for a helper's own connections (the client certificate is offered; a node
        that does not ask for one never sees it)."""
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.client_cert),
            "ssl_keyfile": str(self.client_key),
        }

    def query(self) -> str:
        """A store URL's TLS query: the CA, and the client certificate when the nodes require one."""
        pairs = [("ssl_ca_certs", str(self.ca))]
        if self.auth_clients:
            pairs += [("ssl_certfile", str(self.client_cert)), ("ssl_keyfile", str(self.client_key))]
        return urlencode(pairs, safe="/")


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise TopologyError(f"openssl {args[0]} exited with {done.returncode}:\n{done.stderr.decode(errors='replace')}")


def _signed(directory: Path, name: str, subject: str, extensions: list[str]) -> None:
    """``name.key`` and ``name.crt`` in ``directory``: a P-256 key and a certificate the CA there signed."""
    (directory / f"{name}.ext").write_text("\n".join(extensions) + "\n")
    _openssl("req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip


def make_tls_files(directory: Path, *, auth_clients: bool = False) -> TlsFiles:
    """A throwaway CA (valid two days) under ``directory``, a server certificate for 127.0.0.1 (SAN IP, so that a
    client checking the host name accepts it) and a client certificate, all made with ``openssl``. The extensions
    are the ones strict verifiers ask for (CA basic constraints and key usage, key identifiers)."""
    if shutil.which("openssl") is None:
        raise TopologyError("openssl not found: install it (apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=x402 gateway test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)  # fmt: skip
    leaf = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
            "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid,issuer"]  # fmt: skip
    server = [*leaf, f"subjectAltName=IP:{HOST}", "extendedKeyUsage=serverAuth,clientAuth"]
    _signed(directory, "server", f"/CN={HOST}", server)
    _signed(directory, "client", "/CN=x402-gateway", [*leaf, "extendedKeyUsage=clientAuth"])
    return TlsFiles(
        ca=directory / "ca.crt",
        cert=directory / "server.crt",
        key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        auth_clients=auth_clients,
    )


# ------------------------------------------------------------------------------------------------------- one node


def _binary(name: str) -> str:
    """``redis-server`` (``X402_REDIS_BIN`` overrides, as for the dev kit's single server) or ``redis-cli``, which
    is looked for next to that ``redis-server`` first so that a custom build uses its own cli."""
    server = shutil.which(os.environ.get("X402_REDIS_BIN") or "redis-server") or ""
    if name == "redis-server":
        found = server
    else:
        sibling = Path(server).with_name(name) if server else None
        found = str(sibling) if sibling is not None and sibling.exists() else shutil.which(name) or ""
    if not found:
        raise TopologyError(f"{name} not found: install it (apt-get install redis-server) or set X402_REDIS_BIN")
    return found


def _quoted(value: str) -> str:
    """A redis.conf string argument: double quotes keep an empty value and a password with spaces or quotes."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (the kernel may hand the same ephemeral port to two quick probes)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(HOST)
        if port not in ports:
            ports.append(port)
    return ports


class RedisProcess:
    """One ``redis-server`` process (a data node, a sentinel or a cluster node) on a fixed port, with its own
    directory, config file and log, so that it can be killed and started again exactly as it was configured (plus
    whatever the sentinels rewrote in its config meanwhile). ``call`` and ``info`` talk to it directly."""

    def __init__(
        self, name: str, port: int, directory: Path, config: list[str], *, password: str | None,
        tls: TlsFiles | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.port = port
        self.password = password
        self.tls = tls
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "redis.conf"
        self.log_path = self.dir / "redis.log"
        # With TLS, the port speaks TLS only (``port 0``: no plain listener at all).
        listen = [f"port {port}"] if tls is None else ["port 0", f"tls-port {port}", *tls.node_config()]
        base = [*listen, f"bind {HOST}", "protected-mode no", "daemonize no", f"dir {_quoted(str(self.dir))}"]
        self.config_path.write_text("\n".join([*base, *config]) + "\n")
        self._sentinel = name.startswith("sentinel")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> Address:
        return (HOST, self.port)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        argv = [_binary("redis-server"), str(self.config_path)] + (["--sentinel"] if self._sentinel else [])
        self._close_log()
        self._log = self.log_path.open("ab")
        self._proc = spawn(argv, self._log)
        try:
            wait_until(self.ping, self._proc, f"{self.name} on port {self.port}", self.log_path, timeout)
        except RuntimeError as exc:  # exited (a port taken meanwhile, a config it refused) or never answered
            raise TopologyError(str(exc)) from exc

    def client(self, timeout: float = 1.0) -> redis.Redis:
        tls = self.tls.client_options() if self.tls is not None else {}
        return redis.Redis(
            HOST, self.port, password=self.password, socket_timeout=timeout, socket_connect_timeout=timeout,
            decode_responses=True, **tls,
        )  # fmt: skip

    def call(self, *args: Any) -> Any:
        """One command on a fresh connection (the node may have been killed and restarted since the last one)."""
        with self.client() as conn:
            return conn.execute_command(*args)

    def ping(self) -> bool:
        try:
            return bool(self.call("PING"))
        except redis.RedisError:
            return False

    def info(self, section: str) -> dict[str, Any]:
        """``INFO section`` as a dict, empty when the node does not answer."""
        try:
            with self.client() as conn:
                return dict(conn.info(section))
        except redis.RedisError:
            return {}

    def kill(self) -> float:
        """SIGKILL, as a crash or an OOM kill would: the time of the kill (``time.monotonic()``)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise TopologyError(f"{self.name} on port {self.port} is not running")
        proc.kill()
        killed_at = time.monotonic()
        proc.wait()
        reap(proc)  # forget it: the dev kit's exit hook must not try to stop it again
        self._proc = None
        return killed_at

    def signal_stop(self) -> None:
        """SIGTERM without waiting, so that a topology's processes all shut down at once."""
        if self.running and self._proc is not None:
            self._proc.terminate()

    def stop(self) -> None:
        """SIGTERM (then SIGKILL after 5 s) and wait for the exit: the port is free again once this returns."""
        if self._proc is not None:
            reap(self._proc)
            self._proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 15) -> str:
        try:
            text = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            text = "(no log)"
        state = "running" if self.running else "stopped"
        return f"--- {self.name} {HOST}:{self.port} ({state}), {self.log_path}:\n{text}"


def _wait_for(check: Callable[[], bool], what: str, deadline: float, nodes: list[RedisProcess]) -> None:
    """Until ``check()``; past ``deadline`` a :class:`TopologyError` naming ``what`` with every node's log tail."""
    while not check():
        if time.monotonic() > deadline:
            tails = "\n".join(node.tail() for node in nodes)
            raise TopologyError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.05)


def _stop_all(processes: list[RedisProcess]) -> None:
    """All at once: a master stopped alone waits for its replicas to catch up (up to 10 s), and a sentinel left
    running while the data nodes go would start failovers on its way out."""
    for process in processes:
        process.signal_stop()
    for process in processes:
        process.stop()


def _in_sync(node: RedisProcess) -> bool:
    return node.info("replication").get("master_link_status") == "up"


def _data_config(password: str | None) -> list[str]:
    """No persistence, and every address a client learns is 127.0.0.1; the password guards the node and is the one
    it offers its master (a master becomes a replica after a failover, so both have both). A full sync starts at
    once (the default waits 5 s for more replicas to share it), so a replica is in sync within a second."""
    lines = ["save ''", "appendonly no", "repl-diskless-sync-delay 0", f"replica-announce-ip {HOST}"]
    if password is not None:
        lines += [f"requirepass {_quoted(password)}", f"masterauth {_quoted(password)}"]
    return lines


# --------------------------------------------------------------------------------------------------- Sentinel


# Sentinel's internal periods (SENTINEL DEBUG, not settable in its config file), in milliseconds.
# - info-period (default 10000) and publish-period (the hellos to the other sentinels, 2000) decide how soon a
#   sentinel notices a replica, another sentinel, a restarted old master or a failover's outcome, not what it decides
#   then: shorter, a group is ready in about a second and a restarted master is demoted within seconds, not twenty.
# - ping-period (1000) must be well under down-after-milliseconds: a sentinel pings a master it has just switched to
#   one ping-period after the switch, and with both at 1000 ms it sometimes judged the new master down before its
#   first answer; all three agreed, and failed over again to the old master restarted with nothing (2 runs in 20).
_SENTINEL_PERIODS = ("info-period", "1000", "publish-period", "500", "ping-period", "250")


class SentinelGroup:
    """A master, its replica (or ``replicas`` of them) and three sentinels (quorum 2) on 127.0.0.1, as
    ``start_sentinel_group`` leaves them.

    With a password, the data nodes and the sentinels all require it: a ``redis+sentinel://:pw@...`` URL means the
    same password for both unless it says otherwise.

    One replica is the topology the failover tests need; a second one keeps a replica behind the new master after
    the failover, for writes that wait for a replica's acknowledgement (``WAIT 1``) to go on without a restart.
    """

    def __init__(
        self, workdir: Path, *, service: str, password: str | None, replicas: int = 1, tls: TlsFiles | None = None
    ) -> None:
        if replicas < 1:
            raise ValueError("a Sentinel group needs a replica to promote")
        self.service = service
        self.password = password
        self.tls = tls
        master_port, *ports = _free_ports(1 + replicas + 3)
        replica_ports, sentinel_ports = ports[:replicas], ports[replicas:]
        config = _data_config(password)
        master = RedisProcess(
            "master", master_port, workdir / f"master-{master_port}", config, password=password, tls=tls
        )
        replica_config = [*config, f"replicaof {HOST} {master_port}"]
        # As started: which one is the master now, ask master_address().
        self.data_nodes = [master] + [
            RedisProcess(f"replica-{i}", port, workdir / f"replica-{port}", replica_config, password=password, tls=tls)
            for i, port in enumerate(replica_ports, 1)
        ]
        self.sentinels = [
            RedisProcess(
                f"sentinel-{i}",
                port,
                workdir / f"sentinel-{port}",
                self._sentinel_config(master_port),
                password=password,
                tls=tls,
            )
            for i, port in enumerate(sentinel_ports, 1)
        ]

    def _sentinel_config(self, master_port: int) -> list[str]:
        # Fast failure detection and failover so that a test waits seconds, not the default minutes.
        name = self.service
        lines = [
            f"sentinel announce-ip {HOST}",
            f"sentinel monitor {name} {HOST} {master_port} 2",
            f"sentinel down-after-milliseconds {name} 1000",
            f"sentinel failover-timeout {name} 5000",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.password is not None:
            pw = _quoted(self.password)
            # auth-pass: to the data nodes; requirepass: our clients; sentinel-pass: the other sentinels.
            lines += [f"sentinel auth-pass {name} {pw}", f"requirepass {pw}", f"sentinel sentinel-pass {pw}"]
        return lines

    @property
    def processes(self) -> list[RedisProcess]:
        """Every process of the group: the data nodes, then the three sentinels."""
        return [*self.data_nodes, *self.sentinels]

    @property
    def sentinel_addresses(self) -> list[Address]:
        return [node.address for node in self.sentinels]

    @property
    def url(self) -> str:
        """``redis+sentinel://[:password@]127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/<service>/0``; with TLS
        ``rediss+sentinel://...?ssl_ca_certs=...`` (and the client certificate when the nodes require one)."""
        userinfo = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinel_addresses)
        url = f"redis+sentinel://{userinfo}{hosts}/{quote(self.service, safe='')}/0"
        return url if self.tls is None else "rediss" + url.removeprefix("redis") + "?" + self.tls.query()

    def start(self, timeout: float = READY_TIMEOUT) -> Self:
        """Start every node, then wait until each replica is in sync and every sentinel knows the replicas and both
        other sentinels: before that, a failover could find no replica to promote or no quorum to agree."""
        deadline = time.monotonic() + timeout
        for node in self.processes:
            node.start()
        for sentinel in self.sentinels:
            sentinel.call("SENTINEL", "DEBUG", *_SENTINEL_PERIODS)
        for replica in self.data_nodes[1:]:
            _wait_for(
                partial(_in_sync, replica),
                f"{replica.name} {replica.address} to sync with the master",
                deadline,
                self.processes,
            )
        for sentinel in self.sentinels:
            _wait_for(
                partial(self._knows_the_group, sentinel),
                f"{sentinel.name} to know the replicas and the two other sentinels",
                deadline,
                self.processes,
            )
        return self

    def _knows_the_group(self, sentinel: RedisProcess) -> bool:
        try:
            with sentinel.client() as conn:
                replicas = conn.sentinel_slaves(self.service)
                sentinels = conn.sentinel_sentinels(self.service)
        except redis.RedisError:
            return False
        wanted = {node.address for node in self.data_nodes[1:]}
        known = {(r["ip"], int(r["port"])) for r in replicas if not (r["is_sdown"] or r["is_disconnected"])}
        others = {(s["ip"], int(s["port"])) for s in sentinels}
        return wanted <= known and others == set(self.sentinel_addresses) - {sentinel.address}

    def _answers(self) -> list[Address]:
        """The master each running sentinel names (a sentinel that does not answer names none)."""
        out: list[Address] = []
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            try:
                with sentinel.client() as conn:
                    host, port = conn.sentinel_get_master_addr_by_name(self.service)
            except (redis.RedisError, TypeError):  # TypeError: None, the sentinel does not know the service
                continue
            out.append((host, int(port)))
        return out

    def master_address(self) -> Address:
        """The master the first answering sentinel names (``SENTINEL GET-MASTER-ADDR-BY-NAME``)."""
        answers = self._answers()
        if not answers:
            raise TopologyError(f"no sentinel names a master for {self.service!r}\n" + self._tails())
        return answers[0]

    def node(self, address: Address) -> RedisProcess:
        """The data node at ``address``."""
        for node in self.data_nodes:
            if node.address == tuple(address):
                return node
        raise TopologyError(f"{address} is not a data node of this group ({[n.address for n in self.data_nodes]})")

    def kill_master(self) -> float:
        """SIGKILL the data node the sentinels name as master; returns ``time.monotonic()`` at the kill."""
        return self.node(self.master_address()).kill()

    def wait_for_failover(self, old: Address, timeout: float = 30.0) -> Address:
        """The new master, once every running sentinel names the same node other than ``old`` and that node
        answers as a master (the sentinels switch their answer before the promoted replica has left read-only)."""
        deadline = time.monotonic() + timeout
        found: list[Address] = []

        def promoted() -> bool:
            answers = set(self._answers())
            if len(answers) != 1 or tuple(old) in answers:
                return False
            (new,) = answers
            found[:] = [new]
            return self.node(new).info("replication").get("role") == "master"

        _wait_for(promoted, f"the sentinels to replace the master {old}", deadline, self.processes)
        return found[0]

    def restart(self, address: Address) -> None:
        """Start a killed data node again on its port with its config: an old master comes back *as a master*
        (with nothing, as nothing persists) until the sentinels demote it to a replica of the new one."""
        self.node(address).start()

    def wait_for_replica(self, address: Address, timeout: float = 30.0) -> None:
        """Until the data node at ``address`` is a replica of the current master with its link up (the sentinels
        demote a restarted old master only some seconds after they see it again)."""
        node = self.node(address)

        def replicating() -> bool:
            info, masters = node.info("replication"), self._answers()
            return (
                bool(masters)
                and info.get("role") == "slave"
                and (info.get("master_host"), info.get("master_port")) == masters[0]
                and info.get("master_link_status") == "up"
            )

        _wait_for(
            replicating, f"{node.name} {address} to replicate the master", time.monotonic() + timeout, self.processes
        )

    def stop(self) -> None:
        """Stop every process (the directories and logs stay, for a failed test to show)."""
        _stop_all(self.processes)

    def _tails(self) -> str:
        return "\n".join(node.tail() for node in self.processes)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def start_sentinel_group(
    workdir: Path,
    *,
    service: str = "mymaster",
    password: str | None = None,
    replicas: int = 1,
    tls: TlsFiles | None = None,
) -> SentinelGroup:
    """A running :class:`SentinelGroup` under ``workdir``, ready for a failover; stopped again if it fails to start.
    ``tls``: every node and sentinel speaks TLS only, to clients and to each other.

    Use it as a context manager (``with start_sentinel_group(tmp_path) as group:``) to stop it at the end."""
    group = SentinelGroup(workdir, service=service, password=password, replicas=replicas, tls=tls)
    try:
        return group.start()
    except BaseException:
        group.stop()
        raise


# ---------------------------------------------------------------------------------------------------- Cluster


class ClusterGroup:
    """A Redis Cluster of ``masters`` masters, each with ``replicas_per_master`` replicas, on 127.0.0.1.

    (Not named ``RedisCluster``: tests use redis-py's client of that name next to it.)
    """

    def __init__(
        self, workdir: Path, *, masters: int, replicas_per_master: int, password: str | None,
        tls: TlsFiles | None = None,
    ) -> None:  # fmt: skip
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.workdir = workdir
        self.replicas_per_master = replicas_per_master
        self.password = password
        self.tls = tls
        count = masters * (1 + replicas_per_master)
        ports = _free_ports(2 * count)
        # The bus port is chosen too (cluster-port): the default, port + 10000, is past 65535 for half the
        # ephemeral range.
        self.processes = [
            RedisProcess(
                f"cluster-node-{i}",
                port,
                workdir / f"node-{port}",
                [
                    "cluster-enabled yes",
                    f"cluster-config-file nodes-{port}.conf",
                    "cluster-node-timeout 2000",
                    f"cluster-port {bus}",
                    f"cluster-announce-ip {HOST}",
                    *_data_config(password),
                    *(["tls-cluster yes"] if tls is not None else []),  # the bus speaks TLS too
                ],
                password=password,
                tls=tls,
            )
            for i, (port, bus) in enumerate(zip(ports[:count], ports[count:], strict=True), 1)
        ]

    @property
    def nodes(self) -> list[Address]:
        """Every node, masters and replicas, in the order ``redis-cli --cluster create`` was given them."""
        return [node.address for node in self.processes]

    @property
    def url(self) -> str:
        """``redis+cluster://[:password@]127.0.0.1:p1,127.0.0.1:p2,.../`` with every node as a seed; with TLS
        ``rediss+cluster://...?ssl_ca_certs=...`` (and the client certificate when the nodes require one)."""
        userinfo = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        url = "redis+cluster://" + userinfo + ",".join(f"{host}:{port}" for host, port in self.nodes) + "/"
        return url if self.tls is None else "rediss" + url.removeprefix("redis") + "?" + self.tls.query()

    def start(self, timeout: float = READY_TIMEOUT) -> Self:
        """Start every node, join them with ``redis-cli --cluster create``, then wait until every node sees the
        whole cluster, all slots assigned and ``cluster_state:ok``, and every replica is in sync."""
        deadline = time.monotonic() + timeout
        for node in self.processes:
            node.start()
        self._create(max(1.0, deadline - time.monotonic()))
        for node in self.processes:
            _wait_for(partial(self._ready, node), f"{node.name} to see the cluster ready", deadline, self.processes)
        return self

    def _create(self, timeout: float) -> None:
        argv = [_binary("redis-cli"), "--cluster", "create", *(f"{h}:{p}" for h, p in self.nodes)]
        if self.tls is not None:
            argv += ["--tls", "--cacert", str(self.tls.ca), "--cert", str(self.tls.client_cert)]
            argv += ["--key", str(self.tls.client_key)]
        argv += ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        env = dict(os.environ)
        if self.password is not None:
            env["REDISCLI_AUTH"] = self.password  # redis-cli's -a, without the password in argv and its warning
        log = self.workdir / "cluster-create.log"
        try:
            done = subprocess.run(
                argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise TopologyError(f"redis-cli --cluster create did not finish within {timeout:.0f} s") from exc
        log.write_bytes(done.stdout + done.stderr)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")[-3000:]
            raise TopologyError(f"redis-cli --cluster create exited with {done.returncode}:\n{output}")

    def _ready(self, node: RedisProcess) -> bool:
        """``node`` serves every slot and sees the cluster as created: every node, the right number of masters and
        replicas (``redis-cli`` makes the replicas last, and the others learn it by gossip), none failing; and if it
        is a replica, it is in sync."""
        try:
            info = node.call("CLUSTER", "INFO")
            listing = node.call("CLUSTER", "NODES")
        except redis.RedisError:
            return False
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        if fields.get("cluster_state") != "ok" or fields.get("cluster_slots_assigned") != str(CLUSTER_SLOTS):
            return False
        rows = _cluster_nodes(listing)
        flags = [f for _, row_flags in rows for f in row_flags]
        masters = len(self.processes) // (1 + self.replicas_per_master)
        if (
            len(rows) != len(self.processes)
            or flags.count("master") != masters
            or flags.count("slave") != len(self.processes) - masters
            or any(f in flags for f in ("fail", "fail?", "handshake", "noaddr"))
        ):
            return False
        return node.info("replication").get("role") == "master" or _in_sync(node)

    def masters(self) -> list[Address]:
        """The masters now, failed ones left out, sorted (``CLUSTER NODES`` of the first node that answers)."""
        for node in self.processes:
            try:
                listing = node.call("CLUSTER", "NODES")
            except redis.RedisError:
                continue
            return sorted(a for a, flags in _cluster_nodes(listing) if "master" in flags and "fail" not in flags)
        raise TopologyError("no cluster node answers\n" + "\n".join(node.tail() for node in self.processes))

    def flushall(self) -> None:
        """Empty every master (replicas follow)."""
        for address in self.masters():
            self.node(address).call("FLUSHALL")

    def node(self, address: Address) -> RedisProcess:
        """The process at ``address`` (to kill it, start it again, or ask it something directly)."""
        for node in self.processes:
            if node.address == tuple(address):
                return node
        raise TopologyError(f"{address} is not a node of this cluster ({self.nodes})")

    def stop(self) -> None:
        """Stop every process (the directories and logs stay, for a failed test to show)."""
        _stop_all(self.processes)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _cluster_nodes(listing: str) -> list[tuple[Address, list[str]]]:
    """Each node's address and flags in a ``CLUSTER NODES`` listing (``<id> <ip:port@bus> <flags> ...``)."""
    out: list[tuple[Address, list[str]]] = []
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        host, _, port = parts[1].partition("@")[0].rpartition(":")
        out.append(((host, int(port)), parts[2].split(",")))
    return out


def start_cluster(
    workdir: Path,
    *,
    masters: int = 3,
    replicas_per_master: int = 0,
    password: str | None = None,
    tls: TlsFiles | None = None,
) -> ClusterGroup:
    """A running, ready :class:`ClusterGroup` under ``workdir``; stopped again if it fails to start. ``tls``: every
    node speaks TLS only, to clients, to its replicas and on the cluster bus.

    Use it as a context manager (``with start_cluster(tmp_path) as cluster:``) to stop it at the end."""
    cluster = ClusterGroup(
        workdir, masters=masters, replicas_per_master=replicas_per_master, password=password, tls=tls
    )
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise


# --------------------------------------------------------------------------------------------------- fixtures


def _started(start: Callable[[], T]) -> T:
    """``start()``, or a test failure with the reason (a missing binary, a topology that did not come up) instead
    of a traceback through the harness."""
    try:
        return start()
    except TopologyError as exc:
        reason = str(exc)
    pytest.fail(reason, pytrace=False)  # outside the except: the reason once, not twice as a chained exception


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A fresh master + replica + three sentinels for this test only (a failover test leaves its group changed)."""
    group = _started(lambda: start_sentinel_group(tmp_path / "sentinel"))
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterGroup]:
    """One three-master cluster for the session; tests take ``cluster_url`` to start from an empty one."""
    cluster = _started(lambda: start_cluster(tmp_path_factory.mktemp("redis-cluster")))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: ClusterGroup) -> Iterator[str]:
    """The session cluster's ``redis+cluster://`` URL, every master emptied (FLUSHALL) at the start of the test."""
    redis_cluster.flushall()
    yield redis_cluster.url
