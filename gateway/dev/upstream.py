"""A small upstream API for the demo and the tests: what an operator would put behind the gateway."""

from __future__ import annotations

import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


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


def create_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/weather", weather, methods=["GET"]),
            Route("/agent/prompt", prompt, methods=["POST"]),
            Route("/fail", fail, methods=["GET", "POST"]),
        ]
    )
