"""JSON from the other side (a client, an upstream, a server our SDK calls, a facilitator, an RPC) is read by one
function, :func:`gateway.x402.codec.loads`, which refuses a document nested deeper than ``MAX_NESTING``.

What it protects: the process. The JSON parser recurses once per nesting level on the C stack, and a dependency
(py_ecc, imported by eth_account) raises Python's recursion limit to 100,000 for the whole process, so a document a
few hundred kilobytes long, nested that deep, overflowed the stack and killed the process (a gateway behind a
metered route; an SDK user calling a malicious server) instead of raising an error. The deep cases run in a child
process: without the guard they crash it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import httpx
import pytest

from gateway.x402.codec import MAX_NESTING, loads

DEEP = 200_000  # levels: far past where the C stack overflowed (65,000-99,000 on an 8 MB stack)


def _in_a_child(code: str) -> subprocess.CompletedProcess[str]:
    prelude = "import eth_account, sys\nassert sys.getrecursionlimit() >= 100_000  # what py_ecc does to a process\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_document_nested_too_deep_is_refused_not_parsed_into_a_crash() -> None:
    child = _in_a_child(
        f"""
        from gateway.x402.codec import loads
        for doc in (b"[" * {DEEP} + b"]" * {DEEP}, '{{"a":' * {DEEP} + "1" + "}}" * {DEEP}):
            try:
                loads(doc)
            except ValueError as exc:
                print("refused:", exc)
            else:
                print("parsed")
        """
    )
    assert child.returncode == 0, child.stderr[-2000:]  # -11 (SIGSEGV) without the guard
    assert child.stdout.splitlines() == ["refused: JSON nested too deep"] * 2


def test_our_sdk_survives_a_server_answering_with_a_document_nested_too_deep() -> None:
    child = _in_a_child(
        f"""
        import asyncio, httpx
        from gateway.client import AsyncX402Client
        from gateway.client.exact import parse_challenge

        body = b"[" * {DEEP} + b"]" * {DEEP}
        try:
            parse_challenge({{}}, body)
        except ValueError:
            print("challenge refused")

        async def app(scope, receive, send):
            await send({{"type": "http.response.start", "status": 402,
                        "headers": [(b"content-type", b"application/json")]}})
            await send({{"type": "http.response.body", "body": body}})

        async def main():
            transport = httpx.ASGITransport(app=app)
            from eth_account import Account
            account = Account.from_key("0x" + "11" * 32)
            async with AsyncX402Client("http://server", account=account, transport=transport) as client:
                try:
                    await client.get("/paid")
                except Exception as exc:  # what the SDK makes of it; the process survives
                    print("call failed:", type(exc).__name__)
                else:
                    print("call answered")

        asyncio.run(main())
        """
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.splitlines()[0] == "challenge refused"


@pytest.mark.parametrize("as_text", [False, True])
def test_documents_within_the_bound_read_as_json_whatever_brackets_their_strings_hold(as_text: bool) -> None:
    def given(doc: str) -> bytes | str:
        return doc if as_text else doc.encode()

    at_bound = "[" * MAX_NESTING + "]" * MAX_NESTING
    assert loads(given(at_bound)) is not None
    with pytest.raises(ValueError, match="nested too deep"):
        loads(given("[" + at_bound + "]"))
    brackets_in_strings = '{"a": "' + "[{" * 5_000 + '", "b": ["\\"[", "\\\\"]}'
    assert loads(given(brackets_in_strings)) == {"a": "[{" * 5_000, "b": ['"[', "\\"]}
    with pytest.raises(ValueError):
        loads(given('{"a": "' + "[" * 5_000))  # an unterminated string is still not JSON
    with pytest.raises(ValueError):
        loads(b"\xff\xfe\x00")  # not UTF-8 either: a ValueError like any other


def test_what_the_sdk_reads_goes_through_the_bounded_reader() -> None:
    from gateway.client._paying import json_doc

    deep = httpx.Response(402, content=b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1))
    assert json_doc(deep) is None
    assert json_doc(httpx.Response(402, content=b'{"error": "x"}')) == {"error": "x"}


def test_a_document_holding_an_unpaired_surrogate_is_written_as_json_that_reads_back_the_same() -> None:
    # JSON lets the other side escape half an emoji; Python reads it, and writing it as UTF-8 raised (a 500 in
    # whatever answer echoed it).
    from gateway.x402.codec import dumps

    doc = loads(b'{"prompt": "price of ETH \\ud83d", "ok": "caf\\u00e9"}')
    written = dumps(doc)
    assert loads(written) == doc
    assert dumps({"ok": "café"}) == '{"ok":"café"}'.encode()  # UTF-8 as before when it can be
