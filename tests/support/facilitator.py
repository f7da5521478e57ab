"""A real, third-party x402 facilitator for tests: the ``x402`` package's own, served over HTTP against a dev chain.

    control = FacilitatorControl()
    with run_x402_facilitator(base_chain, control=control) as base_url:   # uvicorn in a background thread
        client = FacilitatorClient(Secret(base_url))
        control.mode = "garbage"                                          # failure injection, any time

The service is a thin Starlette wrapper (``POST /verify``, ``POST /settle``, ``GET /supported``) around
``x402FacilitatorSync`` with ``register_exact_evm_facilitator`` and a ``FacilitatorWeb3Signer`` (synchronous web3),
so verify/settle run in a worker thread. Only the last path segment routes: ``{base_url}/any/prefix/verify`` works,
which lets tests put a "secret" in the base URL and check that no error message shows it.

The signer is ``DEV_KEYS[3]``: funded on anvil, and neither the gateway's relayer ([0]) nor the minter ([9]).

Failure modes (``FacilitatorControl.mode``), for every endpoint unless said otherwise:

* ``"normal"``: delegate to the x402 facilitator;
* ``"down"``: start a response, then drop the connection mid-answer (``"refused"`` needs no server: use
  :func:`refused_url`);
* ``"error"``: HTTP 503 with a JSON body;
* ``"garbage"``: HTTP 200 with an HTML body;
* ``"wrong_types"``: HTTP 200 with JSON whose fields have the wrong types (``{"isValid": "yes", ...}``);
* ``"invalid"``: verify answers ``isValid: false`` and settle ``success: false`` with ``control.reason``, with HTTP
  ``control.status`` (default 400, as some facilitators do);
* ``"canned"``: answer ``control.canned`` (any JSON value) with HTTP ``control.status``;
* ``"slow"``: sleep ``control.delay`` seconds, then delegate; a client that gives up first cancels the call, unless
  ``control.finish_after_disconnect`` (then a settle still happens after the client timed out: "outcome unknown").
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from eth_account import Account
from eth_account.signers.local import LocalAccount
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from x402 import x402FacilitatorSync
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.schemas import SchemeNotFoundError
from x402.schemas.helpers import parse_payment_payload, parse_payment_requirements

from gateway.client.exact import Option, sign_exact_payment
from gateway.dev.chain import DEV_KEYS, DevChain
from gateway.networks import KNOWN_NETWORKS
from gateway.x402.challenge import Requirement
from gateway.x402.codec import decode_header
from tests.support.servers import serve_asgi

FACILITATOR_KEY = DEV_KEYS[3]
RESOURCE = "https://api.example.com/paid"

Mode = Literal["normal", "down", "error", "garbage", "wrong_types", "invalid", "slow", "canned"]


@dataclass
class RecordedCall:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FacilitatorControl:
    """Failure injection and a record of the calls. Safe to change from the test thread at any time."""

    mode: Mode = "normal"
    delay: float = 0.0
    reason: str = "insufficient_funds"
    status: int = 400
    canned: Any = None
    finish_after_disconnect: bool = False
    _calls: list[RecordedCall] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def calls(self) -> list[RecordedCall]:
        with self._lock:
            return list(self._calls)

    def record(self, call: RecordedCall) -> None:
        with self._lock:
            self._calls.append(call)

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()
        self.mode, self.delay, self.reason, self.status, self.canned = "normal", 0.0, "insufficient_funds", 400, None
        self.finish_after_disconnect = False


def build_x402_facilitator(chain: DevChain, *, key: str = FACILITATOR_KEY, confirmation_timeout: float = 30.0) -> Any:
    """The x402 package's facilitator for ``chain``: v2 on ``eip155:<chain id>``, v1 on every legacy name."""
    signer = FacilitatorWeb3Signer(
        private_key=key, rpc_url=chain.url, confirmation_timeout_seconds=confirmation_timeout
    )
    facilitator = x402FacilitatorSync()
    register_exact_evm_facilitator(facilitator, signer, networks=[chain.network])
    return facilitator


def x402_facilitator_app(facilitator: Any, control: FacilitatorControl) -> Any:
    async def dispatch(request: Request) -> Response:
        op = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        raw = await request.body()
        try:
            body: Any = await request.json() if raw else None
        except ValueError:
            body = raw.decode("latin-1")
        control.record(RecordedCall(request.method, request.url.path, dict(request.headers), body))
        mode = control.mode
        if mode == "slow":
            deadline = asyncio.get_running_loop().time() + control.delay
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                if not control.finish_after_disconnect and await request.is_disconnected():
                    return Response(status_code=499)  # the client gave up: do nothing (nginx's "closed request")
                await asyncio.sleep(min(left, 0.05))
        elif mode == "error":
            return JSONResponse({"error": "maintenance"}, status_code=503)
        elif mode == "garbage":
            return Response(b"<html><body>502 Bad Gateway</body></html>", media_type="text/html")
        elif mode == "wrong_types":
            return JSONResponse({"isValid": "yes", "success": "yes", "transaction": 7, "kinds": "all"})
        elif mode == "canned":
            return JSONResponse(control.canned, status_code=control.status)
        elif mode == "invalid" and op in ("verify", "settle"):
            if op == "verify":
                return JSONResponse({"isValid": False, "invalidReason": control.reason}, status_code=control.status)
            network = (body or {}).get("paymentRequirements", {}).get("network", "")
            answer = {"success": False, "errorReason": control.reason, "transaction": "", "network": network}
            return JSONResponse(answer, status_code=control.status)
        return await _delegate(facilitator, request.method, op, body)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and control.mode == "down":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            control.record(RecordedCall(scope["method"], scope["path"], headers, None))
            # Headers promise a body that never comes: the client sees the connection close mid-answer.
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000")]})
            await send({"type": "http.response.body", "body": b'{"isVal', "more_body": True})
            raise ConnectionAbortedError("facilitator 'down' mode: dropping the connection")
        await starlette(scope, receive, send)

    starlette = Starlette(routes=[Route("/{path:path}", dispatch, methods=["GET", "POST"])])
    return app


async def _delegate(facilitator: Any, method: str, op: str, body: Any) -> Response:
    if method == "GET" and op == "supported":
        supported = facilitator.get_supported()
        return JSONResponse(supported.model_dump(by_alias=True, exclude_none=True))
    if method != "POST" or op not in ("verify", "settle"):
        return JSONResponse({"error": "not_found"}, status_code=404)
    try:
        version = body["x402Version"]
        payload = parse_payment_payload(body["paymentPayload"])
        requirements = parse_payment_requirements(version, body["paymentRequirements"])
    except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        return JSONResponse({"error": "invalid_request", "message": type(exc).__name__}, status_code=400)
    call = facilitator.verify if op == "verify" else facilitator.settle
    try:
        result = await run_in_threadpool(call, payload, requirements)
    except SchemeNotFoundError as exc:
        return JSONResponse({"error": "unsupported_scheme_or_network", "message": str(exc)}, status_code=400)
    return JSONResponse(result.model_dump(by_alias=True, exclude_none=True))


@contextlib.contextmanager
def run_x402_facilitator(
    chain: DevChain,
    *,
    control: FacilitatorControl | None = None,
    key: str = FACILITATOR_KEY,
    confirmation_timeout: float = 30.0,
) -> Iterator[str]:
    """Serve the x402 package's facilitator for ``chain`` on a free port; yield its base URL."""
    facilitator = build_x402_facilitator(chain, key=key, confirmation_timeout=confirmation_timeout)
    app = x402_facilitator_app(facilitator, control or FacilitatorControl())
    with serve_asgi(app, lifespan="off") as base_url:
        yield base_url


def refused_url() -> str:
    """``http://127.0.0.1:PORT`` where nothing listens (the port was bound, then released): connections refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------------------------------------------- payments


@dataclass
class Payment:
    """A signed payment and the server's own requirement it is checked against (wire format of ``version``)."""

    version: int
    payload: dict[str, Any]
    requirements: dict[str, Any]
    payer: LocalAccount
    pay_to: str
    amount: int


def _v1_name(chain: DevChain) -> str:
    for name, known in KNOWN_NETWORKS.items():
        if known.chain_id == chain.chain_id:
            return name
    return f"eip155:{chain.chain_id}"


def requirement(chain: DevChain, *, amount: int, pay_to: str) -> Requirement:
    return Requirement(
        network=_v1_name(chain),
        chain_id=chain.chain_id,
        asset=chain.usdc,
        amount=amount,
        pay_to=pay_to,
        max_timeout_seconds=120,
        eip712_name=chain.token_name,
        eip712_version=chain.token_version,
    )


def wire(req: Requirement, version: int) -> dict[str, Any]:
    return req.v2() if version == 2 else req.v1(RESOURCE, "a paid test resource", "application/json")


def make_payment(
    chain: DevChain, *, version: int = 2, amount: int = 10_000, signed_amount: int | None = None, funds: int = 50_000
) -> Payment:
    """A fresh payer (holding ``funds``) signs ``signed_amount`` (default ``amount``) to a fresh pay-to address."""
    pay_to = Account.create().address
    payer = chain.new_payer(funds)
    ours = wire(requirement(chain, amount=amount, pay_to=pay_to), version)
    signed = wire(requirement(chain, amount=signed_amount or amount, pay_to=pay_to), version)
    resource = {"url": RESOURCE, "description": "a paid test resource", "mimeType": "application/json"}
    option = Option(version, signed, resource if version == 2 else None)
    _, header = sign_exact_payment(payer, option)
    return Payment(version, decode_header(header), ours, payer, pay_to, amount)
