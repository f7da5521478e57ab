"""Store URLs for one Redis, a Sentinel-managed master and a Redis Cluster: each form read the one way, every mistake
a ConfigError that names it, and no password in any repr or message (docs/scaling.md)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.ops.ratelimit import open_storage
from gateway.secrets import redact_url
from gateway.storage.backend import RedisBackend, open_backend
from gateway.storage.redis_topology import parse_redis_url
from tests.unit.test_config import ENV, minimal


def test_a_sentinel_url_names_its_sentinels_service_database_and_credentials() -> None:
    t = parse_redis_url("rediss+sentinel://app:s3cret@h1:26379,h2,h3:26380/mymaster/2")
    assert t.kind == "sentinel"
    assert t.nodes == (("h1", 26379), ("h2", 26379), ("h3", 26380))
    assert (t.service, t.db, t.username, t.password, t.tls) == ("mymaster", 2, "app", "s3cret", True)
    # the sentinels use the data nodes' credentials unless told otherwise
    assert (t.sentinel_username, t.sentinel_password) == ("app", "s3cret")
    own = parse_redis_url("redis+sentinel://:pw@h1/mymaster?sentinel_password=other")
    assert (own.db, own.password, own.sentinel_password, own.tls) == (0, "pw", "other", False)


def test_a_cluster_url_names_its_seed_nodes_and_database_zero_only() -> None:
    t = parse_redis_url("redis+cluster://user:pw@10.0.0.1:7000,10.0.0.2:7001/")
    assert (t.kind, t.nodes, t.username, t.password) == (
        "cluster",
        (("10.0.0.1", 7000), ("10.0.0.2", 7001)),
        "user",
        "pw",
    )
    with pytest.raises(ValueError, match="only database 0"):
        parse_redis_url("redis+cluster://h:7000/3")


def test_replica_acknowledgements_come_from_the_query_and_never_reach_redis_py() -> None:
    t = parse_redis_url("redis://h:6379/1?min_replicas_acked=1&replica_ack_timeout_ms=250&socket_keepalive=true")
    assert (t.min_replicas_acked, t.ack_timeout_ms) == (1, 250)
    assert t.client_url == "redis://h:6379/1?socket_keepalive=true"
    assert parse_redis_url("redis+cluster://h:7000/?min_replicas_acked=2").min_replicas_acked == 2


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h1:26379/", "names its service"),
        ("redis+sentinel://h1:26379/mymaster/x", "must be a number"),
        ("redis+sentinel://h1:26379,,h2/mymaster", "empty host"),
        ("redis+sentinel://h1:notaport/mymaster", "malformed port"),
        ("redis+cluster://h1:7000/?db=3", "unknown query"),
        ("redis://h:6379/0?min_replicas_acked=many", "min_replicas_acked must be an integer"),
        ("redis://h:6379/0?min_replicas_acked=99", "min_replicas_acked must be an integer"),
        ("redis://h:6379/0?sentinel_password=x", r"belong in a redis\+sentinel"),
    ],
)
def test_a_malformed_topology_url_is_a_config_error_naming_the_mistake(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        open_backend(url)
    assert caught.value.key == "store.url"


def test_no_password_of_a_topology_url_shows_in_a_repr_or_an_error() -> None:
    url = "redis+sentinel://app:hunter22@h1:26379/mymaster/x?sentinel_password=alsosecret"
    with pytest.raises(ConfigError) as caught:
        open_backend(url)
    shown = str(caught.value) + redact_url(url) + repr(parse_redis_url(url.replace("/x?", "/0?")))
    assert "hunter22" not in shown and "alsosecret" not in shown
    backend = open_backend("redis+cluster://u:hunter22@h1:7000/")
    assert isinstance(backend, RedisBackend) and "hunter22" not in repr(backend)


def store_section(**over: Any) -> dict[str, Any]:
    return {"url": "redis+sentinel://:pw@s1:26379,s2:26379,s3:26379/mymaster/0", **over}


def test_store_min_replicas_acked_reaches_every_store_through_the_url() -> None:
    config = parse_config(minimal(store=store_section(min_replicas_acked=1, replica_ack_timeout_ms=200)), env=ENV)
    topology = parse_redis_url(config.store.url.reveal())
    assert (topology.kind, topology.min_replicas_acked, topology.ack_timeout_ms) == ("sentinel", 1, 200)
    assert "pw" not in repr(config.store)


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ({"url": "sqlite:///x.db", "min_replicas_acked": 1}, "needs a Redis store"),
        (store_section(url="redis://h/0?min_replicas_acked=1", min_replicas_acked=1), "say it in one place"),
        (store_section(min_replicas_acked=-1), ">= 0"),
        ({"url": "redis+cluster://h1:7000/5"}, "only database 0"),
    ],
)
def test_a_store_section_that_cannot_be_honoured_is_refused_at_load(store: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        config = parse_config(minimal(store=store), env=ENV)
        open_backend(config.store.url.reveal())


def test_rate_limits_share_a_sentinel_or_a_cluster_like_the_stores() -> None:
    for url, kind in (
        ("redis+sentinel://:pw@s1:26379,s2:26379/mymaster/0", "RedisSentinelStorage"),
        ("redis+cluster://h1:7000,h2:7001/", "RedisClusterStorage"),
    ):
        config = parse_config(minimal(rate_limits={"storage_url": url}), env=ENV)
        assert type(open_storage(config.rate_limits.storage_url.reveal())).__name__ == kind


def test_the_config_bounds_a_replica_wait_as_the_stores_do() -> None:
    from gateway.config import store as store_config
    from gateway.storage import redis_topology

    assert store_config.MAX_ACK_TIMEOUT_MS == redis_topology.MAX_ACK_TIMEOUT_MS
    with pytest.raises(ConfigError, match="replica_ack_timeout_ms"):
        parse_config(minimal(store=store_section(min_replicas_acked=1, replica_ack_timeout_ms=1500)), env=ENV)


@pytest.mark.parametrize(
    ("url", "client_url", "acks"),
    [
        ("redis://h:6379?db=3", "redis://h:6379?db=3", 0),
        ("redis://h:6379?min_replicas_acked=1", "redis://h:6379", 1),
        ("redis+cluster://h:7000?min_replicas_acked=2", "", 2),
        ("unix:///run/redis.sock?db=2&min_replicas_acked=1", "unix:///run/redis.sock?db=2", 1),
    ],
)
def test_the_query_of_a_url_without_a_path_is_read(url: str, client_url: str, acks: int) -> None:
    t = parse_redis_url(url)
    assert (t.client_url, t.min_replicas_acked) == (client_url, acks)


# ---------------------------------------------------------------------------------------------------------- TLS
# A private CA (self-hosted TLS, managed services with their own bundle) must be nameable in the Sentinel and
# Cluster forms too; the options reach every connection (tests/topology/test_tls.py proves it on real TLS).


@pytest.mark.parametrize(
    "url",
    [
        "rediss+sentinel://:hunter22@s1:26379,s2:26379/mymaster/0?ssl_ca_certs=/etc/x402/ca.pem"
        "&ssl_certfile=/etc/x402/client.crt&ssl_keyfile=/etc/x402/client.key",
        "rediss+cluster://:hunter22@n1:7000,n2:7001/?ssl_ca_certs=%2Fetc%2Fx402%2Fca.pem"
        "&ssl_certfile=/etc/x402/client.crt&ssl_keyfile=/etc/x402/client.key&min_replicas_acked=1",
    ],
)
def test_a_tls_topology_url_carries_its_ca_and_client_certificate_to_every_connection(url: str) -> None:
    t = parse_redis_url(url)
    assert t.tls_options() == {
        "ssl": True,
        "ssl_ca_certs": "/etc/x402/ca.pem",
        "ssl_certfile": "/etc/x402/client.crt",
        "ssl_keyfile": "/etc/x402/client.key",
        "ssl_cert_reqs": "required",
    }
    shown = repr(t)  # paths tell an operator which files are used; they are no secret, the password is
    assert "/etc/x402/ca.pem" in shown and "hunter22" not in shown


def test_certificates_are_checked_unless_the_url_says_none() -> None:
    assert parse_redis_url("rediss+cluster://n1:7000/").tls_options() == {"ssl": True, "ssl_cert_reqs": "required"}
    unchecked = parse_redis_url("rediss+sentinel://s1/mymaster?ssl_cert_reqs=NONE")
    assert unchecked.tls_options() == {"ssl": True, "ssl_cert_reqs": "none"}
    assert parse_redis_url("redis+cluster://n1:7000/").tls_options() == {}  # a plain connection takes no ssl_*


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:hunter22@s1:26379/mymaster/0?ssl_ca_certs=/secret-dir/ca.pem",
        "redis+cluster://:hunter22@n1:7000/?ssl_certfile=/secret-dir/c.pem",
        "redis+cluster://:hunter22@n1:7000/?ssl_cert_reqs=none",
        "redis://:hunter22@h:6379/0?ssl_ca_certs=/secret-dir/ca.pem",
        "unix:///secret-dir/redis.sock?db=0&ssl_ca_certs=/secret-dir/ca.pem",
    ],
)
def test_tls_options_on_a_plain_url_are_refused_at_start_quoting_nothing_of_it(url: str) -> None:
    # redis-py would hand them to a plain connection, which fails on the first payment (TypeError), not at start.
    with pytest.raises(ValueError, match="need a TLS URL") as caught:
        parse_redis_url(url)
    assert "hunter22" not in str(caught.value) and "secret-dir" not in str(caught.value)
    with pytest.raises(ConfigError, match="need a TLS URL"):
        open_backend(url)


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("ssl_ca_certs=", "ssl_ca_certs must name a file"),
        ("ssl_certfile=&ssl_keyfile=/k.pem", "ssl_certfile must name a file"),
        ("ssl_keyfile=/k.pem", "give ssl_certfile too"),
        ("ssl_cert_reqs=optional", "required .* or none"),
        ("ssl_check_hostname=false", "unknown query parameter"),
    ],
)
def test_a_tls_option_that_cannot_be_honoured_is_refused_naming_the_mistake(query: str, says: str) -> None:
    for base in ("rediss+sentinel://s1:26379/mymaster/0", "rediss+cluster://n1:7000/"):
        with pytest.raises(ValueError, match=says):
            parse_redis_url(f"{base}?{query}")


def test_rate_limits_reach_a_tls_sentinel_or_cluster_with_the_urls_ca() -> None:
    sentinel = open_storage("rediss+sentinel://:pw@s1:26379/mymaster/0?ssl_ca_certs=/etc/x402/ca.pem")
    cluster = open_storage("rediss+cluster://n1:7000/?ssl_ca_certs=/etc/x402/ca.pem&ssl_cert_reqs=none")
    # the data nodes, and the sentinels (asked for the master) alike
    assert sentinel.options["ssl_ca_certs"] == "/etc/x402/ca.pem"  # type: ignore[attr-defined]
    assert sentinel.sentinel_kwargs["ssl_ca_certs"] == "/etc/x402/ca.pem"  # type: ignore[attr-defined]
    assert cluster.options["ssl_cert_reqs"] == "none"  # type: ignore[attr-defined]
