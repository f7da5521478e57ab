"""Stores over real TLS: one server, a Sentinel group and a Redis Cluster whose every port speaks TLS only, with
certificates from a throwaway CA that no system trust store knows (the private-CA case of self-hosted TLS and of
managed services with their own bundle).

What is protected: the CA, the client certificate and ``ssl_cert_reqs`` that a ``rediss+sentinel://`` or
``rediss+cluster://`` URL names reach every connection the client makes (the sentinels, the master, each cluster
node) and the rate-limit storage; and a certificate that cannot be verified fails closed (``StoreUnavailable``:
nothing claimed, nothing served) with neither the URL nor its password in the message (docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.dev.processes import free_port
from gateway.errors import StoreUnavailable
from gateway.ops.ratelimit import open_storage
from gateway.storage import RedisReceiptStore
from tests.support.redis_topology import (
    HOST,
    ClusterGroup,
    RedisProcess,
    SentinelGroup,
    TlsFiles,
    make_tls_files,
    start_cluster,
    start_sentinel_group,
)

PASSWORD = "tls-store-pw"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(tmp_path: Path, tls: TlsFiles) -> Iterator[RedisProcess]:
    """One password-protected redis-server with a TLS port and no plain one, not asking for client certificates."""
    config = ["save ''", "appendonly no", f'requirepass "{PASSWORD}"']
    server = RedisProcess("tls-server", free_port(HOST), tmp_path / "server", config, password=PASSWORD, tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_group(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[SentinelGroup]:
    """A password-protected master, replica and three sentinels, TLS only (replication and sentinels too)."""
    with start_sentinel_group(tmp_path_factory.mktemp("sentinel"), password=PASSWORD, tls=tls) as group:
        yield group


@pytest.fixture(scope="module")
def mtls_cluster(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[ClusterGroup]:
    """A three-master cluster, TLS only (the bus too), that refuses a client without a certificate from the CA."""
    with start_cluster(tmp_path_factory.mktemp("cluster"), tls=dataclasses.replace(tls, auth_clients=True)) as c:
        yield c


async def claim_once(url: str) -> RedisReceiptStore:
    """A store on ``url`` after it claimed one new payment (the caller reads its topology, then closes it)."""
    store = RedisReceiptStore(url)
    try:
        now = time.time()
        record = await store.claim(f"exact:{uuid.uuid4().hex}", "a", now=now, lease=60, expires_at=None)
        assert record.owner == "a"
    except BaseException:
        await store.aclose()
        raise
    return store


async def refused(url: str) -> str:
    """The message of the ``StoreUnavailable`` a claim on ``url`` fails with (it must fail)."""
    store = RedisReceiptStore(url)
    try:
        now = time.time()
        with pytest.raises(StoreUnavailable) as caught:
            await store.claim(f"exact:{uuid.uuid4().hex}", "a", now=now, lease=60, expires_at=None)
        return str(caught.value)
    finally:
        await store.aclose()


def without_query(url: str) -> str:
    return url.partition("?")[0]


async def counts_and_refuses(url: str, without_tls_options: str) -> None:
    """Rate-limit counters on ``url`` count; a storage on ``without_tls_options`` cannot even answer a PING."""
    key = f"tls-{uuid.uuid4().hex}"
    good, bad = open_storage(url), open_storage(without_tls_options)
    try:
        assert (await good.incr(key, 60), await good.incr(key, 60)) == (1, 2)
        assert not await bad.check()
    finally:
        for storage in (good, bad):  # as RateLimiter.aclose does: limits has no close of its own
            client = getattr(getattr(storage, "bridge", None), "storage", None)
            if client is not None:
                await client.aclose()


# ------------------------------------------------------------------------------------------------------ one server


async def test_a_tls_server_serves_claims_with_the_ca_the_url_names(tls_server: RedisProcess, tls: TlsFiles) -> None:
    store = await claim_once(f"rediss://:{PASSWORD}@{HOST}:{tls_server.port}/0?ssl_ca_certs={tls.ca}")
    await store.aclose()


async def test_a_tls_server_whose_certificate_cannot_be_verified_fails_closed_naming_no_url_or_password(
    tls_server: RedisProcess,
) -> None:
    # Without the CA the system trust store is used, which does not know the throwaway CA.
    url = f"rediss://:{PASSWORD}@{HOST}:{tls_server.port}/0"
    message = await refused(url)
    assert PASSWORD not in message and "rediss://" not in message
    # and the port speaks TLS only: a plain client is refused too, so the claim above did go over TLS
    await refused(url.replace("rediss://", "redis://"))


# ------------------------------------------------------------------------------------------------------- Sentinel


async def test_a_tls_sentinel_group_serves_claims_and_replicates_them_with_the_urls_ca(
    tls_group: SentinelGroup,
) -> None:
    # The CA must reach the sentinels (asked for the master) and the master; WAIT 1 answered means the replica
    # received the write over TLS replication.
    assert "ssl_ca_certs=" in tls_group.url and tls_group.url.startswith("rediss+sentinel://")
    store = await claim_once(tls_group.url + "&min_replicas_acked=1")
    try:
        assert store.topology().master == "{}:{}".format(*tls_group.master_address())
        assert store.topology().replicas_acked == 1
    finally:
        await store.aclose()


async def test_a_tls_sentinel_group_fails_closed_without_the_ca_naming_no_url_or_password(
    tls_group: SentinelGroup,
) -> None:
    message = await refused(without_query(tls_group.url))
    assert PASSWORD not in message and "sentinel://" not in message
    # the sentinels and data nodes speak TLS only: a plain URL reaches nothing
    await refused(without_query(tls_group.url).replace("rediss+", "redis+"))


async def test_ssl_cert_reqs_none_reaches_the_sentinels_and_the_master(tls_group: SentinelGroup) -> None:
    # Unsafe (no certificate check) and documented so; with no CA given, only an unchecked connection gets through.
    store = await claim_once(without_query(tls_group.url) + "?ssl_cert_reqs=none")
    await store.aclose()


async def test_rate_limit_counters_reach_a_tls_sentinel_group_with_the_urls_ca(tls_group: SentinelGroup) -> None:
    await counts_and_refuses(tls_group.url, without_query(tls_group.url))


async def test_a_sentinel_group_requiring_client_certificates_gets_the_urls_certificate_everywhere(
    tmp_path: Path, tls: TlsFiles
) -> None:
    # Sentinels and data nodes both refuse a client without a certificate: a claim through them proves that the
    # sentinels and the master were offered the URL's certificate.
    mutual = dataclasses.replace(tls, auth_clients=True)
    with start_sentinel_group(tmp_path / "sentinel", tls=mutual) as group:
        assert "ssl_certfile=" in group.url and "ssl_keyfile=" in group.url
        store = await claim_once(group.url)
        await store.aclose()
        await refused(f"{without_query(group.url)}?ssl_ca_certs={tls.ca}")


# -------------------------------------------------------------------------------------------------------- Cluster


async def test_a_cluster_requiring_client_certificates_serves_claims_with_the_urls_ca_and_certificate(
    mtls_cluster: ClusterGroup,
) -> None:
    assert mtls_cluster.url.startswith("rediss+cluster://") and "ssl_certfile=" in mtls_cluster.url
    store = await claim_once(mtls_cluster.url)
    await store.aclose()


# redis-py's cluster client raises RedisClusterUnreachableError (no RedisError) when no seed node answers: the
# store's guard maps it to StoreUnavailable like any other outage.
@pytest.mark.parametrize("query", ["without the client certificate", "without the CA"])
async def test_a_tls_cluster_fails_closed_without_the_certificate_or_the_ca(
    mtls_cluster: ClusterGroup, tls: TlsFiles, query: str
) -> None:
    url = without_query(mtls_cluster.url)
    await refused(f"{url}?ssl_ca_certs={tls.ca}" if query == "without the client certificate" else url)


async def test_rate_limit_counters_reach_a_tls_cluster_with_the_urls_certificate(
    mtls_cluster: ClusterGroup, tls: TlsFiles
) -> None:
    await counts_and_refuses(mtls_cluster.url, f"{without_query(mtls_cluster.url)}?ssl_ca_certs={tls.ca}")
