"""A small upstream API for the demo and the tests: what an operator would put behind the gateway.

* ``GET /weather``, ``POST /agent/prompt``, ``/fail``: plain endpoints to price (the ``demo``).
* ``POST /run``: a slow synchronous agent for the gateway's job runner (``demo --jobs``, deploy/'s jobs profile).
  It follows the runner upstream contract of docs/jobs.md: it reads ``{jobId, prompt, payer, ...}`` and streams
  NDJSON, one ``{"status": ...}`` line per step, then ``{"response": ..., "richData": [...]}``; a prompt starting
  with ``fail`` ends with ``{"error": ...}`` instead. It stops working when the gateway closes the connection
  (a cancel, or the job's deadline).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

RUN_STEPS = ("Reading the prompt...", "Looking up the answer...", "Writing the answer...")


async def weather(request: Request) -> JSONResponse:
    city = request.query_params.get("city", "Lisbon")
    return JSONResponse({"city": city, "forecast": "sunny", "temperatureC": 21})


async def prompt(request: Request) -> JSONResponse:
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "Invalid request", "message": "Body must be JSON"}, status_code=400)
    text = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text:
        return JSONResponse({"error": "Invalid request", "message": "prompt is required"}, status_code=400)
    return JSONResponse(
        {
            "success": True,
            "jobId": f"job_{uuid.uuid4().hex[:12]}",
            "threadId": body.get("threadId") or f"thr_{uuid.uuid4().hex[:8]}",
            "status": "pending",
            "message": "Job submitted successfully",
            "receivedAt": int(time.time() * 1000),
        },
        status_code=202,
    )


async def fail(request: Request) -> JSONResponse:
    return JSONResponse({"error": "Upstream failure", "message": "the demo upstream fails on purpose"}, status_code=500)


def _line(obj: dict[str, object]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def runner(step_delay: float) -> Route:
    async def run(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        text = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text:
            return JSONResponse({"error": "Invalid request", "message": "prompt is required"}, status_code=400)

        async def lines() -> AsyncIterator[bytes]:
            for step in RUN_STEPS:
                yield _line({"status": step})
                await asyncio.sleep(step_delay)  # cancelled when the gateway goes away: the work stops here
            if text.lower().startswith("fail"):
                yield _line({"error": "the demo agent failed on purpose"})
                return
            words = len(text.split())
            yield _line({"response": f"Demo answer to: {text}", "richData": [{"type": "echo", "words": words}]})

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return Route("/run", run, methods=["POST"])


def create_app(*, step_delay: float = 0.5) -> Starlette:
    """The demo upstream; ``step_delay``: seconds between the progress lines of ``POST /run``."""
    return Starlette(
        routes=[
            Route("/weather", weather, methods=["GET"]),
            Route("/agent/prompt", prompt, methods=["POST"]),
            Route("/fail", fail, methods=["GET", "POST"]),
            runner(step_delay),
        ]
    )
