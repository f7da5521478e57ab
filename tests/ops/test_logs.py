"""Structured logs: one JSON line per request, and no secret in any log line (docs/threat-model.md T19)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import itertools
import json
import logging
import os
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

import gateway.ops.health
from gateway.dev.chain import DevChain
from gateway.http.context import new_request_id
from gateway.ops.events import RequestRecord
from gateway.ops.logs import (
    REDACTOR,
    AccessLog,
    BufferedHandler,
    JsonFormatter,
    SecretRedactor,
    TextFormatter,
    _ms,
    _sole_json_handler,
    access_fields,
    config_secrets,
    configure_logging,
    install_redaction,
)
from gateway.ops.metrics import LOG_DROPS, PrometheusMetrics
from tests.ops.support import RpcRelay, samples, serve_gateway, value
from tests.support.gateway import gateway_config, sqlite_url
from tests.support.servers import Behaviour, serve_asgi

API_KEY = "UPSTREAM-APIKEY-7f3a9c2e51"
RPC_KEY = "SECRETRPCKEY"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every record reaching the root logger, formatted as the served process would (JSON lines)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_a_full_payment_leaves_no_secret_and_no_payment_header_in_any_log(
    base_chain: DevChain,
    tmp_path: Path,
    captured: io.StringIO,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(gateway.ops.health, "CACHE_SECONDS", 0.0)
    payer = base_chain.new_payer(1_000_000)
    relay = RpcRelay(base_chain.url)
    headers_sent: list[str] = []
    with serve_asgi(relay) as relay_url:
        networks = {"base": {"rpc_urls": [f"{relay_url}/v2/{RPC_KEY}"], "receipt_poll_interval": 0.02}}
        with (
            serve_gateway(
                base_chain,
                store_url=sqlite_url(tmp_path),
                networks=networks,
                upstream={"headers": {"X-API-Key": API_KEY}},
            ) as gw,
            gw.client() as c,
        ):
            assert c.get("/readyz").status_code == 200
            challenge = c.post("/paid", json={"q": 1})
            assert challenge.status_code == 402
            name, header = gw.sign(payer, challenge)
            headers_sent.append(header)
            paid = c.post("/paid", json={"q": 1}, headers={name: header})
            assert paid.status_code == 200, paid.text
            assert gw.upstream.requests[-1].header("x-api-key") == API_KEY  # the key was really in use
            assert c.post("/paid", json={"q": 1}, headers={name: header}).status_code == 402  # replay
            assert c.post("/paid", headers={"X-PAYMENT": "eyJub3QiOiJ2YWxpZCJ9"}).status_code in (400, 402)
            # An upstream failure and an RPC outage: the paths where errors (and their URLs) get logged.
            gw.upstream.reset(Behaviour(status=502))
            name2, header2 = gw.sign(payer, c.post("/paid", json={}))
            headers_sent.append(header2)
            assert c.post("/paid", json={}, headers={name2: header2}).status_code == 502
            relay.mode = "down"
            name3, header3 = gw.sign(payer, c.post("/paid", json={}))
            headers_sent.append(header3)
            assert c.post("/paid", json={}, headers={name3: header3}).status_code == 503
            assert c.get("/readyz").status_code == 503
            relay.mode = "forward"
            relayer_key = gw.config.payment.relayer_key
            assert relayer_key is not None

    out, err = capfd.readouterr()
    everything = "\n".join([captured.getvalue(), caplog.text, out, err, *(repr(r.__dict__) for r in caplog.records)])
    assert relay.paths and all(p == f"/v2/{RPC_KEY}" for p in relay.paths)  # the credential path was used
    key_hex = relayer_key.reveal().removeprefix("0x")
    for secret in (key_hex, key_hex.lower(), key_hex.upper(), API_KEY, RPC_KEY):
        assert secret not in everything
    for header in headers_sent:
        assert header not in everything
        assert header[:48] not in everything  # not even a prefix of the base64 payment header

    access = [json.loads(line) for line in captured.getvalue().splitlines() if '"logger":"gateway.access"' in line]
    paid_line = next(a for a in access if a["outcome"] == "paid")
    assert paid_line["status"] == 200
    assert paid_line["route"] == "POST /paid"
    assert paid_line["network"] == "base"
    assert paid_line["payer"].lower() == payer.address.lower()
    assert paid_line["tx_hash"].startswith("0x") and len(paid_line["tx_hash"]) == 66
    assert paid_line["amount"] == 100_000
    assert paid_line["settle_ms"] > 0 and paid_line["total_ms"] >= paid_line["settle_ms"]
    assert len(paid_line["request_id"]) >= 16
    outcomes = [a["outcome"] for a in access]
    assert {"challenge", "paid", "refused", "unserved", "error"} <= set(outcomes)


def test_the_redactor_masks_secrets_in_messages_arguments_extras_and_tracebacks(base_chain: DevChain) -> None:
    config = gateway_config(
        [base_chain],
        upstream_url="http://user:upstream-pass-123@127.0.0.1:9000",
        store_url="redis://:store-pass-456@127.0.0.1:6379/0",
        pay_to="0x" + "11" * 20,
        networks={"base": {"rpc_urls": ["https://base-mainnet.example.com/v2/ALCHEMYKEY123?apikey=querykey987"]}},
        upstream={"headers": {"Authorization": "Bearer tok-abcdef-123456"}},
    )
    stream = io.StringIO()
    logger = logging.getLogger("tests.ops.redaction")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    redactor = SecretRedactor()
    handler.addFilter(redactor)
    handle = redactor.add(config_secrets(config))
    key = config.payment.relayer_key
    assert key is not None
    try:
        logger.warning("rpc %s failed", "https://base-mainnet.example.com/v2/ALCHEMYKEY123?apikey=querykey987")
        logger.warning("token %s and key %s", "tok-abcdef-123456", key.reveal())
        logger.warning("nested", extra={"ctx": {"url": "redis://:store-pass-456@127.0.0.1:6379/0"}})
        logger.warning("some other key: %s", "0x" + "cd" * 32)  # any 32-byte hex after a key-ish word
        try:
            raise ValueError("connect to http://user:upstream-pass-123@127.0.0.1:9000 failed (ALCHEMYKEY123)")
        except ValueError:
            logger.exception("boom")
        logger.info("tx_hash=%s nonce=%s", "0x" + "ab" * 32, "0x" + "ef" * 32)  # public values stay readable
    finally:
        logger.removeHandler(handler)
        redactor.remove(handle)
    text = stream.getvalue()
    for secret in (
        "ALCHEMYKEY123",
        "querykey987",
        "tok-abcdef-123456",
        key.reveal().removeprefix("0x"),
        "store-pass-456",
        "upstream-pass-123",
        "cd" * 32,
    ):
        assert secret not in text, secret
    assert "base-mainnet.example.com" not in text or "***" in text
    assert "ab" * 32 in text and "ef" * 32 in text
    assert text.count("***") >= 7
    lines = [json.loads(line) for line in text.splitlines()]
    assert "exception" in lines[4] and "ValueError" in lines[4]["exception"]


def test_install_redaction_reaches_handlers_that_already_exist_and_can_be_undone(base_chain: DevChain) -> None:
    config = gateway_config(
        [base_chain],
        upstream_url="http://127.0.0.1:9000",
        store_url="sqlite:///x.db",
        pay_to="0x" + "11" * 20,
        upstream={"headers": {"X-API-Key": "install-test-key-42"}},
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        undo = install_redaction(config)
        assert REDACTOR in handler.filters
        logging.getLogger("tests.ops.install").error("key is %s", "install-test-key-42")
        undo()
        logging.getLogger("tests.ops.install").error("after undo %s", "install-test-key-42")
    finally:
        root.removeHandler(handler)
        handler.removeFilter(REDACTOR)
    first, second = stream.getvalue().splitlines()
    assert "install-test-key-42" not in first
    assert second.endswith("install-test-key-42")


def test_text_format_puts_the_access_fields_after_the_message() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    handler = configure_logging("info", json=False, stream=stream)  # replaces the root's handlers
    try:
        assert root.handlers == [handler]
        assert isinstance(handler.formatter, TextFormatter)
        logging.getLogger("gateway.access").info("GET /x 402 challenge", extra={"access": {"status": 402}})
    finally:
        root.removeHandler(handler)
        handler.close()  # writes what its buffer holds
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    assert stream.getvalue().rstrip().endswith("gateway.access GET /x 402 challenge status=402")


# ------------------------------------------------------------------- a slow log reader never slows the gateway


def _pipe_stream() -> tuple[IO[str], int]:
    """A text stream into a pipe nobody reads (yet): its write end, and the read end's descriptor."""
    read_fd, write_fd = os.pipe()
    return os.fdopen(write_fd, "w", encoding="utf-8"), read_fd


def _drain(read_fd: int) -> bytes:
    data = b""
    while chunk := os.read(read_fd, 1 << 16):
        data += chunk
    return data


def _log_from_an_event_loop(handler: logging.Handler, lines: int) -> bool:
    """Log ``lines`` access lines from a coroutine, in a thread of its own; True if it finished (it would block for
    ever on a full pipe if a write ever ran on the loop's thread)."""
    logger = logging.getLogger("tests.ops.buffered")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    async def produce() -> None:
        for i in range(lines):
            logger.info("GET /free/%d 200 free", i)
            if i % 100 == 0:
                await asyncio.sleep(0)

    thread = threading.Thread(target=asyncio.run, args=(produce(),), daemon=True)
    try:
        thread.start()
        thread.join(60)
        return not thread.is_alive()
    finally:
        logger.removeHandler(handler)


def test_a_log_reader_that_stops_reading_never_blocks_the_event_loop_and_every_dropped_line_is_counted() -> None:
    stream, read_fd = _pipe_stream()
    handler = BufferedHandler(stream, capacity=500)
    handler.setFormatter(JsonFormatter())
    dropped_before = LOG_DROPS.value
    try:
        # Far more than the pipe (64 KiB) and the buffer (500 lines) hold together: the writer thread blocks on the
        # full pipe, the loop goes on, and what does not fit is dropped.
        assert _log_from_an_event_loop(handler, 20_000), "logging blocked the event loop"
        dropped = LOG_DROPS.value - dropped_before
        assert dropped > 0
        reader = threading.Thread(target=lambda: written.append(_drain(read_fd)), daemon=True)
        written: list[bytes] = []
        reader.start()  # the reader comes back: the writer thread is unblocked and writes what it kept
        handler.close()
        stream.close()
        reader.join(30)
    finally:
        with contextlib.suppress(OSError):
            stream.close()
        os.close(read_fd)
    lines = written[0].decode().splitlines()
    assert len(lines) + dropped == 20_000  # each line either written whole or counted as dropped
    assert all(json.loads(line)["logger"] == "tests.ops.buffered" for line in lines)
    numbers = [int(json.loads(line)["message"].split("/")[2].split()[0]) for line in lines]
    assert numbers == sorted(numbers)  # in the order they were logged


def test_dropped_log_lines_show_in_the_metrics() -> None:
    metrics = PrometheusMetrics()
    shown_before = value(samples(metrics.render()[0].decode()), "x402_gateway_log_dropped_total")
    counted_before = LOG_DROPS.value
    stream, read_fd = _pipe_stream()
    handler = BufferedHandler(stream, capacity=10)
    handler.setFormatter(JsonFormatter())
    try:
        assert _log_from_an_event_loop(handler, 5_000)
    finally:
        os.close(read_fd)  # the reader is gone for good: what the writer holds is lost too, and counted
        handler.close()
        with contextlib.suppress(OSError):
            stream.close()
    shown = value(samples(metrics.render()[0].decode()), "x402_gateway_log_dropped_total") - shown_before
    assert shown == LOG_DROPS.value - counted_before
    assert shown >= 5_000 - 10 - 65_536 // 100  # at most the buffer and a pipe's worth of lines got out


def test_every_line_reaches_a_reader_that_keeps_up_in_order_and_whole() -> None:
    stream, read_fd = _pipe_stream()
    written: list[bytes] = []
    reader = threading.Thread(target=lambda: written.append(_drain(read_fd)), daemon=True)
    reader.start()
    handler = BufferedHandler(stream)
    handler.setFormatter(JsonFormatter())
    dropped_before = LOG_DROPS.value
    try:
        assert _log_from_an_event_loop(handler, 5_000)
        handler.close()
        stream.close()
        reader.join(30)
    finally:
        os.close(read_fd)
    assert LOG_DROPS.value == dropped_before
    messages = [json.loads(line)["message"] for line in written[0].decode().splitlines()]
    assert messages == [f"GET /free/{i} 200 free" for i in range(5_000)]


def test_closing_the_log_at_exit_never_hangs_on_a_reader_that_stopped_reading() -> None:
    stream, read_fd = _pipe_stream()
    handler = BufferedHandler(stream, capacity=1_000)
    handler.setFormatter(JsonFormatter())
    counted_before = LOG_DROPS.value
    try:
        assert _log_from_an_event_loop(handler, 5_000)
        closing = threading.Thread(target=handler.close, daemon=True)
        closing.start()
        closing.join(30)
        assert not closing.is_alive(), "close() waited for a reader that never reads"
        assert handler._lines == collections.deque()  # nothing left behind uncounted
        assert LOG_DROPS.value - counted_before > 0
    finally:
        os.close(read_fd)  # the stuck writer thread gets EPIPE and ends
        with contextlib.suppress(OSError):
            stream.close()


# ------------------------------------------------------------------- the access line, handed over directly


def _access_records() -> list[RequestRecord]:
    free = RequestRecord(new_request_id(), "GET", "/free/hello", "127.0.0.1", status=200, total_seconds=0.000456)
    paid = RequestRecord("client-id_1", "POST", '/paid/ünï"\\\n' + "x" * 600, "::1", route="POST /paid/**", status=200)
    paid.outcome, paid.kind, paid.payer, paid.network = "paid", "exact", "0x" + "ab" * 20, "base"
    paid.tx_hash, paid.amount, paid.resumed, paid.unbound = "0x" + "cd" * 32, 100_000, True, True
    paid.verify_seconds, paid.settle_seconds, paid.upstream_seconds = 0.0123456, 1.5, 2e-7
    paid.total_seconds = 3.0049999
    refused = RequestRecord("r", "GET", f"/x/{API_KEY}/y", None, route="GET /x/**", status=402)
    refused.outcome, refused.reason = "challenge", "payment_required"
    unserved = RequestRecord("u", "GET", "/x", "10.0.0.1", route="GET /x", status=0)  # priced, upstream failed
    return [free, paid, refused, unserved]


_LOGGERS = itertools.count()


@contextlib.contextmanager
def _served_access_log() -> Iterator[tuple[logging.Logger, BufferedHandler, io.StringIO]]:
    """A logger with what ``serve`` gives the root: one BufferedHandler, JSON, the redactor."""
    stream = io.StringIO()
    handler = BufferedHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(REDACTOR)
    # A logger of its own each time: pytest adds its capture handlers to every non-propagating logger that exists
    # when a test starts, and a second handler is not serve's set-up.
    logger = logging.getLogger(f"tests.ops.access_direct.{next(_LOGGERS)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    handle = REDACTOR.add([API_KEY])
    try:
        yield logger, handler, stream
    finally:
        REDACTOR.remove(handle)
        logger.removeHandler(handler)
        handler.close()


def _lines(handler: BufferedHandler, stream: io.StringIO) -> list[dict[str, object]]:
    handler.flush()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_an_access_line_handed_straight_to_serves_handler_is_the_line_logging_would_have_written() -> None:
    records = _access_records()
    with _served_access_log() as (logger, handler, stream):
        assert _sole_json_handler(logger) is handler  # serve's set-up: the line skips logging.LogRecord
        for record in records:
            AccessLog(logger).request_done(record)
        handler.flush()
        direct = stream.getvalue().splitlines()
        stream.seek(0)
        stream.truncate()
        handler.addFilter(lambda record: True)  # any other filter: the record goes through logging again
        assert _sole_json_handler(logger) is None
        for record in records:
            AccessLog(logger).request_done(record)
        handler.flush()
        through_logging = stream.getvalue().splitlines()
        # what the access line's fields were before it had a direct path: the dict of access_fields, redacted and
        # encoded by the JSON encoder
        encoded = []
        for record in records:
            fields = access_fields(record)
            fields["path"], fields["request_id"] = REDACTOR.redact(fields["path"]), REDACTOR.redact(record.request_id)
            encoded.append(json.dumps(fields, default=str, ensure_ascii=False, separators=(",", ":")))
    assert len(direct) == len(through_logging) == len(records)
    for fast, slow, fields in zip(direct, through_logging, encoded, strict=True):
        assert API_KEY not in fast
        assert fast.endswith("," + fields[1:])
        # the same bytes but for the time (a few microseconds apart), which both write in one format
        assert fast.split('"level"', 1)[1] == slow.split('"level"', 1)[1]
        assert json.loads(fast)["time"].endswith("Z") and len(json.loads(fast)["time"]) == 24
    first = json.loads(direct[1])
    assert first["path"] == '/paid/ünï"\\\n' + "x" * (512 - len('/paid/ünï"\\\n'))  # capped, escaped, whole
    assert (first["verify_ms"], first["settle_ms"], first["upstream_ms"], first["total_ms"]) == (
        12.35,
        1500.0,
        0.0,
        3005.0,
    )
    assert json.loads(direct[2])["path"] == "/x/***/y"
    assert json.loads(direct[3])["outcome"] == "unserved"


def test_the_direct_access_line_keeps_level_filtering_and_any_other_handler_gets_the_record() -> None:
    record = _access_records()[0]
    with _served_access_log() as (logger, handler, stream):
        handler.setLevel(logging.WARNING)
        AccessLog(logger).request_done(record)
        assert _lines(handler, stream) == []
        handler.setLevel(logging.NOTSET)
        logger.setLevel(logging.WARNING)
        AccessLog(logger).request_done(record)
        assert _lines(handler, stream) == []
        logger.setLevel(logging.INFO)
        seen: list[logging.LogRecord] = []
        capture = logging.Handler()
        capture.emit = seen.append  # type: ignore[method-assign]
        logger.addHandler(capture)  # a second handler (a test's capture): both get the record, with its fields
        try:
            AccessLog(logger).request_done(record)
        finally:
            logger.removeHandler(capture)
        assert [line["request_id"] for line in _lines(handler, stream)] == [record.request_id]
        assert seen and seen[0].__dict__["access"]["status"] == 200
        assert seen[0].getMessage() == "GET /free/hello 200 free"


def test_access_durations_are_written_as_round_to_the_hundredth_of_a_millisecond_writes_them() -> None:
    rng = random.Random(7)
    values = [0.0, -0.0, 1e-9, 5e-6, 1.5e-5, 2.5e-5, 0.001005, 0.0045, 1e10 - 1e-6, 9_999_999_999.995, float("inf")]
    values += [rng.random() * 10 ** rng.randint(-9, 10) for _ in range(20_000)]
    values += [rng.randint(0, 10**7) * 5e-6 for _ in range(20_000)]  # exact halves of a hundredth, in binary or not
    values += [struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0] for _ in range(20_000)]  # any double
    encode = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":")).encode
    for seconds in values:
        assert _ms(seconds) == encode(round(seconds * 1000, 2)), seconds
