"""deploy/: no Docker engine or cluster here, so the files are linted and their load-bearing fields checked.

What would break a deployment silently: probes on paths or ports the gateway does not serve, a container that
runs as root or writes its root filesystem, a Redis without persistence (a consumed payment forgotten by a
restart can be presented again), a config that does not load, a Docker build context missing package data.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import GatewayConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"  # the gateway; deploy/k8s adds one Redis to it, deploy/k8s/sentinel a Sentinel group
ENV = {
    "X402_RELAYER_KEY": "0x" + "ab" * 32,
    "UPSTREAM_API_KEY": "k",
    "BASE_RPC_URL": "https://rpc.example/v2/key",
}


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted([*K8S.glob("*.yaml"), *BASE.glob("*.yaml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def load_toml(text: str) -> GatewayConfig:
    return parse_config(tomllib.loads(text), env=ENV, base_dir=ROOT)


def test_every_yaml_file_passes_yamllint() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "-c", str(DEPLOY / ".yamllint.yaml"), "-f", "parsable", str(DEPLOY)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_lists_every_manifest() -> None:
    for folder, extra in ((K8S, {"base"}), (BASE, set())):
        listed = set(yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"])
        assert listed == {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"} | extra, folder


# ------------------------------------------------------------------------------------------------ Kubernetes


def gateway_container(objs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (container,) = objs[("Deployment", "x402-gateway")]["spec"]["template"]["spec"]["containers"]
    return container


def test_k8s_probes_hit_the_configured_health_paths_on_the_listening_port() -> None:
    objs = k8s_objects()
    config = load_toml(objs[("ConfigMap", "x402-gateway-config")]["data"]["gateway.toml"])
    c = gateway_container(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == config.server.listen_port == 8402
    assert config.server.listen_host == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"] == {"path": config.server.ready_path, "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": config.server.health_path, "port": "http"}
    # The readiness checks must finish before the kubelet gives up on the probe.
    assert c["readinessProbe"]["timeoutSeconds"] > config.server.ready_timeout
    annotations = objs[("Deployment", "x402-gateway")]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == config.server.metrics_path
    assert annotations["prometheus.io/port"] == str(config.server.listen_port)


def test_k8s_gateway_runs_non_root_read_only_without_privileges() -> None:
    objs = k8s_objects()
    pod = objs[("Deployment", "x402-gateway")]["spec"]["template"]["spec"]
    c = gateway_container(objs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= set(c["resources"])
    assert not c["image"].endswith(":latest") and ":" in c["image"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/x402"]["readOnly"] is True
    assert "/tmp" in mounts  # the only writable place


def test_k8s_secrets_feed_every_environment_reference_of_the_config() -> None:
    objs = k8s_objects()
    toml_text = objs[("ConfigMap", "x402-gateway-config")]["data"]["gateway.toml"]
    secret = objs[("Secret", "x402-gateway-secrets")]
    c = gateway_container(objs)
    assert c["envFrom"] == [{"secretRef": {"name": "x402-gateway-secrets"}}]
    wanted = set(re.findall(r"\$\{([A-Z0-9_]+)\}", toml_text))
    wanted.add(tomllib.loads(toml_text)["payment"]["relayer_key_env"])
    assert wanted <= set(secret["stringData"])
    config = load_toml(toml_text)
    assert config.upstream.headers  # the upstream's key is injected from the Secret, not written in the ConfigMap
    assert "REPLACE" not in str(config.networks)


def test_k8s_service_and_autoscaler_point_at_the_deployment() -> None:
    objs = k8s_objects()
    labels = objs[("Deployment", "x402-gateway")]["spec"]["template"]["metadata"]["labels"]
    service = objs[("Service", "x402-gateway")]["spec"]
    assert service["selector"].items() <= labels.items()
    assert service["ports"][0]["targetPort"] == "http"
    hpa = objs[("HorizontalPodAutoscaler", "x402-gateway")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x402-gateway"}
    assert hpa["minReplicas"] >= 2
    pdb = objs[("PodDisruptionBudget", "x402-gateway")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_redis_persists_every_write_and_is_the_store_the_config_names() -> None:
    objs = k8s_objects()
    sts = objs[("StatefulSet", "x402-redis")]["spec"]
    (redis,) = sts["template"]["spec"]["containers"]
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always"
    assert {m["mountPath"] for m in redis["volumeMounts"]} == {"/data"}
    assert sts["volumeClaimTemplates"][0]["metadata"]["name"] == redis["volumeMounts"][0]["name"]
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True
    assert sts["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    config = load_toml(objs[("ConfigMap", "x402-gateway-config")]["data"]["gateway.toml"])
    store_host = urlsplit(config.store.url.reveal()).hostname
    assert store_host == sts["serviceName"]
    assert ("Service", store_host) in objs
    assert urlsplit(config.rate_limits.storage_url.reveal()).hostname == store_host


# ----------------------------------------------------------------------------------------------------- compose


def test_compose_runs_gateway_redis_and_upstream_with_the_mounted_config() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"gateway", "redis", "upstream"}
    gw = services["gateway"]
    assert "./gateway.compose.toml:/etc/x402/gateway.toml:ro" in gw["volumes"]
    assert gw["env_file"][0]["path"] == "relayer.env"
    assert (DEPLOY / "relayer.env.example").exists()
    assert gw["read_only"] is True
    assert gw["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert gw["depends_on"]["redis"]["condition"] == "service_healthy"

    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "always"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert "redis-data" in compose["volumes"]
    upstream_cmd = " ".join(services["upstream"]["command"])
    assert "gateway.dev.upstream" in upstream_cmd and "port=9000" in upstream_cmd

    config = load_toml((DEPLOY / "gateway.compose.toml").read_text())
    assert f"{config.server.listen_port}:{config.server.listen_port}" in gw["ports"]
    assert urlsplit(config.store.url.reveal()).hostname in services
    assert urlsplit(config.upstream.url).hostname in services
    assert urlsplit(config.upstream.url).port == 9000


def test_the_compose_demo_upstream_command_is_valid_python() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    cmd = compose["services"]["upstream"]["command"]
    assert cmd[:2] == ["python", "-c"]
    compile(cmd[2], "<compose upstream>", "exec")


# ------------------------------------------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_dockerfile_is_slim_non_root_with_a_healthcheck() -> None:
    steps = dockerfile()
    froms = [arg for ins, arg in steps if ins == "FROM"]
    assert froms == ["python:3.11-slim"]
    assert all(":" in f and not f.endswith(":latest") for f in froms)
    users = [arg for ins, arg in steps if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [arg for ins, arg in steps if ins == "HEALTHCHECK"]
    assert "/healthz" in health and "urllib" in health and "curl" not in health
    assert ("EXPOSE", "8402") in steps
    cmd = [arg for ins, arg in steps if ins == "CMD"][-1]
    assert yaml.safe_load(cmd) == ["x402-gateway", "serve", "-c", "/etc/x402/gateway.toml"]
    assert any(ins == "RUN" and "pip install ." in arg for ins, arg in steps)


def test_dockerfile_copies_everything_the_wheel_needs_and_dockerignore_lets_it_through() -> None:
    steps = dockerfile()
    copied = {shlex.split(arg)[0] for ins, arg in steps if ins == "COPY" for _ in [0]} | {
        src for ins, arg in steps if ins == "COPY" for src in shlex.split(arg)[:-1]
    }
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = (
        set(wheel["packages"])
        | set(wheel.get("force-include", {}))
        | {"pyproject.toml", pyproject["project"]["readme"]}
    )
    assert needed <= copied
    assert all((ROOT / src).exists() for src in copied)
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # deny by default: no .venv, .git, local keys or databases in the build context
    for src in needed:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, src


@pytest.mark.parametrize("path", ["deploy/gateway.compose.toml"])
def test_shipped_configs_load(path: str) -> None:
    config = load_toml((ROOT / path).read_text())
    assert config.store.url.reveal().startswith("redis://")
    assert config.server.listen_host == "0.0.0.0"
