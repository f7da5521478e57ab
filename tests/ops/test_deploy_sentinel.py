"""deploy/'s Sentinel profile (compose.sentinel.yaml + gateway.sentinel.compose.toml, and the k8s/sentinel overlay),
checked as tests/ops/test_deploy.py checks the rest of deploy/: no Docker engine or cluster here.

What would break it silently: sentinels watching a host or port no data node has, a quorum that one lost sentinel
defeats, a gateway whose store URL misses a sentinel or names another service, min_replicas_acked above the
replicas there are (every paid request refused), a data node without an fsynced append-only file, compose and
Kubernetes drifting apart, an overlay naming files that do not exist. And the start script, which decides each
data node's role: it is run here with real redis-server processes, through a failover.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import pytest
import redis
import yaml

from gateway.config import GatewayConfig, parse_config
from gateway.dev.processes import free_port, reap, spawn
from gateway.storage.backend import open_backend

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAY = K8S / "sentinel"
ENV = {
    "X402_RELAYER_KEY": "0x" + "ab" * 32,
    "UPSTREAM_API_KEY": "k",
    "BASE_RPC_URL": "https://rpc.example/v2/key",
}
CONF_DIR = "/etc/x402-redis"
SCRIPT = f"{CONF_DIR}/start.sh"


@dataclass(frozen=True)
class Monitor:
    """A ``sentinel monitor <name> <host> <port> <quorum>`` line."""

    name: str
    host: str
    port: int
    quorum: int


@dataclass(frozen=True)
class SentinelUrl:
    """The parts of a ``redis+sentinel://`` store URL, read here without the gateway's parser."""

    scheme: str
    sentinels: tuple[str, ...]  # host:port
    service: str
    db: int


def monitor_of(sentinel_conf: str) -> Monitor:
    (line,) = [ln for ln in sentinel_conf.splitlines() if ln.startswith("sentinel monitor ")]
    name, host, port, quorum = line.split()[2:]
    return Monitor(name, host, int(port), int(quorum))


def directives(redis_conf: str) -> dict[str, str]:
    """A Redis config file as {directive: value}, comments and blank lines left out (the last one wins, as in
    Redis)."""
    out = {}
    for raw in redis_conf.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


def sentinel_url(url: str) -> SentinelUrl:
    scheme, _, rest = url.partition("://")
    netloc, _, path = rest.partition("/")
    service, _, db = path.partition("?")[0].partition("/")
    hosts = netloc.rpartition("@")[2].split(",")
    return SentinelUrl(scheme, tuple(hosts), unquote(service), int(db.strip("/") or 0))


def load_toml(text: str) -> GatewayConfig:
    return parse_config(tomllib.loads(text), env=ENV, base_dir=ROOT)


# ----------------------------------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.sentinel.yaml").read_text())
    return loaded


def compose_config(name: str) -> str:
    """An inline config as the container sees it: compose turns "$$" into "$"."""
    return str(compose()["configs"][name]["content"]).replace("$$", "$")


def redis_services(role: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items() if s.get("environment", {}).get("ROLE") == role}


def compose_store_toml() -> dict[str, Any]:
    return tomllib.loads((DEPLOY / "gateway.sentinel.compose.toml").read_text())


def test_the_sentinel_profile_passes_yamllint() -> None:
    lint = [sys.executable, "-m", "yamllint", "-c", str(DEPLOY / ".yamllint.yaml"), "-f", "parsable"]
    result = subprocess.run(
        [*lint, str(DEPLOY / "compose.sentinel.yaml"), str(OVERLAY)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_sentinels_watch_the_master_service_with_a_quorum_of_two_of_three() -> None:
    nodes, sentinels = redis_services("node"), redis_services("sentinel")
    monitor = monitor_of(compose_config("sentinel-conf"))
    assert len(sentinels) == 3 and monitor.quorum == 2  # one sentinel may be lost, and two still agree
    assert monitor.host in nodes  # the master service, by its compose name
    assert int(nodes[monitor.host]["environment"]["PORT"]) == monitor.port
    assert len(nodes) == 2
    everyone = [f"{name}:{s['environment']['PORT']}" for name, s in sentinels.items()]
    for name, service in {**nodes, **sentinels}.items():
        env = service["environment"]
        assert env["ANNOUNCE_HOST"] == name  # the name the others reach it by
        assert sorted(env["SENTINELS"].split()) == sorted(everyone)
    for name, service in sentinels.items():
        assert service["healthcheck"]["test"][-3:] == ["-p", service["environment"]["PORT"], "ping"], name
        assert service["depends_on"][monitor.host]["condition"] == "service_started"


def test_compose_gateway_store_url_names_every_sentinel_and_the_monitored_service() -> None:
    store = compose_store_toml()["store"]
    url = sentinel_url(store["url"])
    sentinels = redis_services("sentinel")
    monitor = monitor_of(compose_config("sentinel-conf"))
    assert url.scheme == "redis+sentinel"
    assert sorted(url.sentinels) == sorted(f"{n}:{s['environment']['PORT']}" for n, s in sentinels.items())
    assert url.service == monitor.name
    # Every money-critical write waits for the one replica; more could never be acknowledged.
    assert store["min_replicas_acked"] == len(redis_services("node")) - 1 == 1
    # The rate-limit counters follow the same sentinels, in a database of their own.
    limits = sentinel_url(compose_store_toml()["rate_limits"]["storage_url"])
    assert (limits.sentinels, limits.service) == (url.sentinels, url.service) and limits.db != url.db
    gateway = compose()["services"]["gateway"]
    assert "./gateway.sentinel.compose.toml:/etc/x402/gateway.toml:ro" in gateway["volumes"]
    for name in [*sentinels, *redis_services("node")]:
        assert gateway["depends_on"][name]["condition"] == "service_healthy"


def test_compose_data_nodes_fsync_every_write_to_a_volume_and_sentinels_keep_nothing() -> None:
    conf = directives(compose_config("redis-conf"))
    assert (conf["appendonly"], conf["appendfsync"]) == ("yes", "always")
    # An isolated master stops taking writes; asking for more replicas than there are would stop it for good.
    assert 1 <= int(conf["min-replicas-to-write"]) <= len(redis_services("node")) - 1
    declared = set(compose()["volumes"])
    for name, node in redis_services("node").items():
        (volume,) = node["volumes"]
        source, target = volume.split(":")
        assert target == "/data" and source in declared, name
    for name, sentinel in redis_services("sentinel").items():
        assert sentinel["tmpfs"] == ["/data"] and "volumes" not in sentinel, name


def test_compose_redis_processes_run_the_start_script_unprivileged_on_a_read_only_root() -> None:
    main = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["gateway"]
    services = compose()["services"]
    gateway = services["gateway"]
    for key in ("build", "image", "env_file", "read_only", "tmpfs", "security_opt", "cap_drop", "stop_grace_period"):
        assert gateway[key] == main[key], key
    for name, service in {**redis_services("node"), **redis_services("sentinel")}.items():
        assert service["command"] == ["sh", SCRIPT], name
        assert {c["target"] for c in service["configs"]} == {
            f"{CONF_DIR}/redis.conf",
            f"{CONF_DIR}/sentinel.conf",
            SCRIPT,
        }, name
        assert service["user"] not in ("root", "0"), name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
    assert set(services) == {*redis_services("node"), *redis_services("sentinel"), "gateway", "upstream"}


def test_compose_configs_hold_no_dollar_that_compose_would_interpolate() -> None:
    # A lone "$" in an inline config is a compose variable: "$me" would reach the script as "" without a word.
    for name, config in compose()["configs"].items():
        assert "$" not in str(config["content"]).replace("$$", ""), name


def test_the_sentinel_compose_config_loads_with_the_project_loader() -> None:
    config = load_toml((DEPLOY / "gateway.sentinel.compose.toml").read_text())
    assert config.store.url.reveal().startswith("redis+sentinel://sentinel-1:26379,")
    assert config.store.min_replicas_acked == 1
    open_backend(config.store.url.reveal())  # what `serve` opens the stores with: a ConfigError would say why
    assert config.rate_limits.storage_url.reveal().startswith("redis+sentinel://sentinel-1:26379,")
    assert config.server.listen_host == "0.0.0.0"
    assert urlsplit(config.upstream.url).hostname in compose()["services"]


# -------------------------------------------------------------------------------------------------- Kubernetes


def overlay_objects() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(OVERLAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    return loaded


def statefulset(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(StatefulSet spec, its one container)."""
    spec = overlay_objects()[("StatefulSet", name)]["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    return spec, container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def pod_names(spec: dict[str, Any], name: str, port: int) -> list[str]:
    """The stable DNS names a StatefulSet's pods get from its headless Service."""
    return [f"{name}-{i}.{spec['serviceName']}:{port}" for i in range(spec["replicas"])]


def k8s_config(key: str) -> str:
    return str(overlay_objects()[("ConfigMap", "x402-redis-sentinel-config")]["data"][key])


def overlay_gateway_toml() -> str:
    return str(overlay_objects()[("ConfigMap", "x402-gateway-config")]["data"]["gateway.toml"])


def test_k8s_sentinels_watch_the_first_data_node_with_a_quorum_of_two_of_three() -> None:
    objs = overlay_objects()
    nodes, node = statefulset("x402-redis-node")
    sentinels, sentinel = statefulset("x402-redis-sentinel")
    monitor = monitor_of(k8s_config("sentinel.conf"))
    assert sentinels["replicas"] == 3 and monitor.quorum == 2
    assert nodes["replicas"] == 2
    assert f"{monitor.host}:{monitor.port}" == pod_names(nodes, "x402-redis-node", monitor.port)[0]
    assert node["ports"][0]["containerPort"] == monitor.port == int(env_of(node)["PORT"])
    everyone = pod_names(sentinels, "x402-redis-sentinel", sentinel["ports"][0]["containerPort"])
    for spec, container, role in ((nodes, node, "node"), (sentinels, sentinel, "sentinel")):
        env = env_of(container)
        assert env["ROLE"] == role
        assert env["ANNOUNCE_HOST"] == f"$(POD_NAME).{spec['serviceName']}"
        assert env["SENTINELS"].split() == everyone
        assert int(env["PORT"]) == container["ports"][0]["containerPort"]
        service = objs[("Service", spec["serviceName"])]["spec"]
        # Headless, and resolvable before ready: the pods find each other while they start.
        assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True
        assert service["selector"].items() <= spec["template"]["metadata"]["labels"].items()
        assert spec["podManagementPolicy"] == "Parallel"


def test_k8s_gateway_store_url_names_every_sentinel_and_the_monitored_service() -> None:
    store = tomllib.loads(overlay_gateway_toml())["store"]
    url = sentinel_url(store["url"])
    sentinels, sentinel = statefulset("x402-redis-sentinel")
    nodes, _ = statefulset("x402-redis-node")
    assert url.scheme == "redis+sentinel"
    assert list(url.sentinels) == pod_names(sentinels, "x402-redis-sentinel", sentinel["ports"][0]["containerPort"])
    assert url.service == monitor_of(k8s_config("sentinel.conf")).name
    assert store["min_replicas_acked"] == nodes["replicas"] - 1 == 1
    limits = sentinel_url(tomllib.loads(overlay_gateway_toml())["rate_limits"]["storage_url"])
    assert (limits.sentinels, limits.service) == (url.sentinels, url.service) and limits.db != url.db


def test_k8s_data_nodes_fsync_every_write_to_a_claimed_volume() -> None:
    conf = directives(k8s_config("redis.conf"))
    assert (conf["appendonly"], conf["appendfsync"]) == ("yes", "always")
    nodes, node = statefulset("x402-redis-node")
    assert 1 <= int(conf["min-replicas-to-write"]) <= nodes["replicas"] - 1
    mounts = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
    assert mounts["/data"] in {t["metadata"]["name"] for t in nodes["volumeClaimTemplates"]}
    sentinels, sentinel = statefulset("x402-redis-sentinel")
    volumes = {v["name"]: v for v in sentinels["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[{m["mountPath"]: m["name"] for m in sentinel["volumeMounts"]}["/data"]]


def test_k8s_redis_pods_run_the_start_script_non_root_on_a_read_only_root() -> None:
    for name in ("x402-redis-node", "x402-redis-sentinel"):
        spec, container = statefulset(name)
        pod = spec["template"]["spec"]
        assert container["command"] == ["sh", SCRIPT], name
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts[CONF_DIR]["readOnly"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts[CONF_DIR]["name"]]["configMap"]["name"] == "x402-redis-sentinel-config"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert not container["image"].endswith(":latest") and ":" in container["image"]
        assert {"requests", "limits"} <= set(container["resources"])


def test_the_overlay_gateway_config_differs_from_the_base_only_in_its_redis_urls() -> None:
    base = yaml.safe_load((K8S / "base" / "configmap.yaml").read_text())["data"]["gateway.toml"]
    ours, theirs = tomllib.loads(overlay_gateway_toml()), tomllib.loads(base)
    for section in (ours, theirs):
        section.pop("store")
        section["rate_limits"].pop("storage_url")
    assert ours == theirs  # a key changed in ../base/configmap.yaml must change in gateway-config.yaml too
    config = load_toml(overlay_gateway_toml())
    assert config.store.min_replicas_acked == 1
    open_backend(config.store.url.reveal())


def test_the_kustomization_names_only_files_that_exist_and_every_base_manifest_but_the_single_redis() -> None:
    k = kustomization()
    paths = [*k["resources"], *(p["path"] for p in k.get("patches", []) if "path" in p)]
    assert all((OVERLAY / p).exists() for p in paths), [p for p in paths if not (OVERLAY / p).exists()]
    # the gateway from ../base, and the single Redis of deploy/k8s (redis.yaml) nowhere
    assert [p for p in k["resources"] if p.startswith("../")] == ["../base"]
    local = {p.name for p in OVERLAY.glob("*.yaml")} - {"kustomization.yaml"}
    assert local == {p for p in paths if "/" not in p}  # no manifest here that the overlay leaves out
    # The patch targets the base's gateway ConfigMap, and the base's single Redis is nowhere.
    assert yaml.safe_load((K8S / "base" / "configmap.yaml").read_text())["metadata"]["name"] == "x402-gateway-config"
    assert not any(name == "x402-redis" for _, name in overlay_objects())


def test_kustomize_builds_the_overlay_into_the_gateway_on_sentinels() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlay's file references are checked above without it")
    result = subprocess.run(
        [kubectl, "kustomize", str(OVERLAY)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}
    assert ("Deployment", "x402-gateway") in built and ("StatefulSet", "x402-redis") not in built
    toml_text = built[("ConfigMap", "x402-gateway-config")]["data"]["gateway.toml"]
    assert tomllib.loads(toml_text)["store"]["url"].startswith("redis+sentinel://")


# ------------------------------------------------------------------------------------- compose = Kubernetes


def test_compose_and_k8s_run_the_same_script_and_configs_but_for_the_master_name() -> None:
    assert compose_config("start-sh") == k8s_config("start.sh")
    assert compose_config("redis-conf") == k8s_config("redis.conf")
    theirs, ours = compose_config("sentinel-conf"), k8s_config("sentinel.conf")
    assert monitor_of(theirs).name == monitor_of(ours).name
    assert re.sub(r"(?m)^sentinel monitor .*$", "", theirs) == re.sub(r"(?m)^sentinel monitor .*$", "", ours)


def test_the_start_script_is_posix_sh() -> None:
    result = subprocess.run(["sh", "-n"], input=k8s_config("start.sh"), capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------- the start script, with real processes


def redis_bin_dir() -> str:
    binary = os.environ.get("X402_REDIS_BIN") or shutil.which("redis-server")
    if not binary or not (Path(binary).parent / "redis-cli").exists():
        pytest.fail("redis-server and redis-cli not found: apt-get install redis-server (or set X402_REDIS_BIN)")
    return str(Path(binary).parent)


class Store:
    """The shipped start script and configs running two data nodes and three sentinels on this machine, each on
    its own port. They are all called "localhost": a name, as in compose and Kubernetes, which the sentinels
    resolve and announce."""

    def __init__(self, root: Path) -> None:
        self.root = root
        ports: set[int] = set()
        while len(ports) < 5:  # free_port() may hand out a port it handed out a moment ago
            ports.add(free_port())
        self.nodes = sorted(ports)[:2]
        self.sentinels = sorted(ports)[2:]
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self._path = f"{redis_bin_dir()}:{os.environ.get('PATH', '')}"
        conf = root / "conf"
        conf.mkdir()
        (conf / "start.sh").write_text(k8s_config("start.sh"))
        (conf / "redis.conf").write_text(k8s_config("redis.conf") + "bind 127.0.0.1 -::1\n")
        first_master = f"localhost {self.nodes[0]}"
        sentinel_conf = re.sub(
            r"(?m)^(sentinel monitor \S+) \S+ \S+", rf"\1 {first_master}", k8s_config("sentinel.conf")
        )
        (conf / "sentinel.conf").write_text(sentinel_conf + "bind 127.0.0.1 -::1\n")
        self.name = monitor_of(sentinel_conf).name

    def dir(self, port: int) -> Path:
        return self.root / str(port)

    def start(self, role: str, port: int) -> None:
        """Start a process the way compose and the StatefulSets do: ``sh start.sh`` with its environment."""
        self.dir(port).mkdir(exist_ok=True)
        env = {
            "PATH": self._path,
            "ROLE": role,
            "PORT": str(port),
            "ANNOUNCE_HOST": "localhost",
            "SENTINELS": " ".join(f"localhost:{p}" for p in self.sentinels),
            "CONF_DIR": str(self.root / "conf"),
            "DATA_DIR": str(self.dir(port)),
        }
        log = (self.dir(port) / "log").open("ab")
        self._logs.append(log)
        argv = ["env", *(f"{k}={v}" for k, v in env.items()), "sh", str(self.root / "conf" / "start.sh")]
        self._procs[port] = spawn(argv, log)
        eventually(answers(lambda: bool(self.client(port).ping())), f"{role} on port {port} answers")

    def crash(self, port: int) -> None:
        proc = self._procs.pop(port)
        proc.kill()  # no shutdown: a machine lost
        proc.wait()
        reap(proc)

    def stop(self, port: int) -> None:
        reap(self._procs.pop(port))

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, decode_responses=True)

    def written(self, port: int, name: str) -> str:
        """What the start script wrote to DATA_DIR (the process runs with it)."""
        return (self.dir(port) / name).read_text()

    def close(self) -> None:
        for port in list(self._procs):
            self.stop(port)
        for log in self._logs:
            log.close()


def eventually(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


def answers(check: Callable[[], bool]) -> Callable[[], bool]:
    """``check``, with a process that does not answer (yet) counted as "not yet"."""

    def guarded() -> bool:
        try:
            return check()
        except (redis.RedisError, OSError):
            return False

    return guarded


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path)
    try:
        yield s
    finally:
        s.close()


def test_the_start_script_follows_a_failover_and_brings_the_old_master_back_as_a_replica(store: Store) -> None:
    master, replica = store.nodes
    for port in store.nodes:
        store.start("node", port)
    # First start, no sentinel to ask: the roles sentinel.conf names.
    assert "replicaof" not in directives(store.written(master, "redis.conf"))
    assert directives(store.written(replica, "redis.conf"))["replicaof"] == f"localhost {master}"
    eventually(
        answers(lambda: store.client(replica).info("replication")["master_link_status"] == "up"),
        "the replica follows the master",
    )
    for port in store.sentinels:
        store.start("sentinel", port)

    def sentinels_see_everyone() -> bool:
        views: list[Any] = [store.client(p).sentinel_master(store.name) for p in store.sentinels]
        return all(v["num-slaves"] == 1 and v["num-other-sentinels"] == 2 for v in views)

    eventually(answers(sentinels_see_everyone), "every sentinel knows the replica and the two other sentinels")

    # A money-critical write as min_replicas_acked = 1 makes it: counted once the replica acknowledged it.
    client = store.client(master)
    client.set("x402:claim", "consumed")
    assert client.wait(1, 2000) == 1

    store.crash(master)

    def promoted() -> bool:
        seen: list[Any] = [store.client(p).sentinel_get_master_addr_by_name(store.name) for p in store.sentinels]
        return all(tuple(address) == ("localhost", replica) for address in seen)

    eventually(answers(promoted), "every sentinel names the replica as master")
    assert store.client(replica).get("x402:claim") == "consumed"  # the acknowledged write outlived its master

    # The old master comes back as the new master's replica, never as a second master.
    store.start("node", master)
    assert directives(store.written(master, "redis.conf"))["replicaof"] == f"localhost {replica}"
    eventually(
        answers(lambda: store.client(master).info("replication")["master_link_status"] == "up"),
        "the old master replicates from the new one",
    )
    assert store.client(master).get("x402:claim") == "consumed"

    # A sentinel that restarts monitors the current master from the start, as the other sentinels told it,
    # not the one sentinel.conf names (it logs "+monitor master <name> <host> <port>" as it loads its config).
    restarted = store.sentinels[0]
    store.stop(restarted)
    (store.dir(restarted) / "log").unlink()
    store.start("sentinel", restarted)
    eventually(lambda: "+monitor master" in store.written(restarted, "log"), "the sentinel loaded its config")
    (loaded,) = re.findall(r"\+monitor master (\S+) (\S+) (\d+)", store.written(restarted, "log"))
    assert loaded == (store.name, "localhost", str(replica))
