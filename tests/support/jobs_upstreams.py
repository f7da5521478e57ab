"""Demo upstreams for the jobs features: a jobs API of either style, and a slow synchronous agent.

    api = FakeJobsApi("agent")                 # style A: POST /agent/prompt, GET /agent/job/{id}, .../cancel
    api = FakeJobsApi("messaging")             # style B: POST/GET /api/messaging/jobs[/{id}|/health]
    agent = SlowAgent()                        # POST /run: NDJSON progress lines, then the answer

Both check ``X-API-Key`` (401 ``Authentication required`` otherwise) and record every request (thread-safe), so
tests can assert that the gateway injected the key and never forwarded the caller's proofs. ``FakeJobsApi``
hands out *sequential* ids (``job_1``, ``job_2``…): guessable on purpose, the payer check must not rely on them
being secret. ``SlowAgent`` obeys directives in the prompt:

    "sleep 5"     one progress line, then 5 s of silence (watching for the client going away), then the answer
    "fail"        a progress line, then {"error": "the agent failed"}
    "sse"         the same lines as server-sent events
    "plain"       no stream: one application/json answer
    "status 503"  that HTTP status with a JSON error body
    anything else NDJSON: the ``steps`` as progress, then {"response": "Answer: <prompt>", "richData": [...]}
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.support.servers import _disconnected_within, read_body

API_KEY = "upstream-api-key-7f3c9e"

Send = Callable[..., Any]


@dataclass
class Call:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lowercase names; last value wins
    body: bytes


async def _json(send: Send, status: int, doc: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(doc).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class _Recorder:
    api_key: str = API_KEY  # what the x-api-key header must say (the fakes' own field overrides it)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[Call] = []

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def record(self, scope: dict[str, Any], body: bytes) -> Call:
        call = Call(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
            body=body,
        )
        with self._lock:
            self._calls.append(call)
        return call

    async def accept(self, scope: dict[str, Any], receive: Callable[..., Any], send: Send) -> bytes | None:
        """What every fake upstream does first: serve the lifespan, read and record the request, check the API
        key. The request's body, or None when it was answered here."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return None
        body = await read_body(receive)
        self.record(scope, body)
        headers = {k.lower(): v for k, v in scope["headers"]}
        if headers.get(b"x-api-key", b"").decode("latin-1") != self.api_key:
            await _json(send, 401, {"error": "Authentication required", "message": "API key is missing or invalid"})
            return None
        return body


async def _lifespan(receive: Callable[..., Any], send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@dataclass
class FakeJobsApi(_Recorder):
    """An in-memory jobs API of style A (``"agent"``) or B (``"messaging"``) behind an X-API-Key.

    A job reads ``processing`` until ``complete_after`` seconds passed, then ``completed`` with
    ``Echo: <prompt>``. ``refuse_submit = (status, body)`` makes every submit fail that way.
    """

    style: Literal["agent", "messaging"] = "agent"
    api_key: str = API_KEY
    complete_after: float = 0.0
    refuse_submit: tuple[int, dict[str, Any]] | None = None
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    _seq: int = 0

    def __post_init__(self) -> None:
        _Recorder.__init__(self)

    def _state(self, job: dict[str, Any]) -> dict[str, Any]:
        if job["status"] in ("pending", "processing") and time.time() - job["t"] >= self.complete_after:
            job.update(status="completed", completed=time.time(), response=f"Echo: {job['prompt']}")
        return job

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Send) -> None:
        body = await self.accept(scope, receive, send)
        if body is None:
            return
        method, parts = scope["method"], [p for p in scope["path"].split("/") if p]
        if self.style == "agent":
            await self._agent(method, parts, body, send)
        else:
            await self._messaging(method, parts, scope.get("query_string", b"").decode(), body, send)

    def _new(self, prompt: str, **extra: Any) -> dict[str, Any]:
        self._seq += 1
        job_id = f"job_{self._seq}" if self.style == "agent" else str(uuid.uuid4())
        job = {"id": job_id, "prompt": prompt, "status": "processing", "t": time.time(), **extra}
        self.jobs[job_id] = job
        return job

    async def _not_found(self, send: Send, job_id: str) -> None:
        await _json(send, 404, {"error": "Job not found", "message": f"No job found with ID {job_id}"})

    async def _agent(self, method: str, parts: list[str], body: bytes, send: Send) -> None:
        if method == "POST" and parts == ["agent", "prompt"]:
            if self.refuse_submit is not None:
                await _json(send, *self.refuse_submit)
                return
            doc = json.loads(body or b"{}")
            if not isinstance(doc.get("prompt"), str):
                await _json(send, 400, {"error": "Invalid request", "message": "prompt is required"})
                return
            job = self._new(doc["prompt"])
            job["thread"] = doc.get("threadId") or f"thr_{self._seq}"
            await _json(
                send,
                202,
                {
                    "success": True,
                    "jobId": job["id"],
                    "threadId": job["thread"],
                    "status": "pending",
                    "message": "Job submitted successfully",
                },
            )
            return
        if len(parts) >= 3 and parts[:2] == ["agent", "job"]:
            job = self.jobs.get(parts[2])
            if job is None:
                await self._not_found(send, parts[2])
                return
            job = self._state(job)
            if method == "POST" and parts[3:] == ["cancel"]:
                if job["status"] in ("completed", "failed"):
                    word = job["status"]
                    await _json(
                        send,
                        400,
                        {"success": False, "error": f"Job already {word}", "message": f"Cannot cancel a {word} job"},
                    )
                    return
                job.setdefault("cancelled", time.time())
                job["status"] = "cancelled"
                await _json(
                    send,
                    200,
                    {
                        "success": True,
                        "jobId": job["id"],
                        "status": "cancelled",
                        "prompt": job["prompt"],
                        "createdAt": _iso(job["t"]),
                        "cancelledAt": _iso(job["cancelled"]),
                    },
                )
                return
            if method == "GET" and len(parts) == 3:
                out: dict[str, Any] = {
                    "success": True,
                    "jobId": job["id"],
                    "threadId": job["thread"],
                    "status": job["status"],
                    "prompt": job["prompt"],
                    "createdAt": _iso(job["t"]),
                    "cancellable": job["status"] in ("pending", "processing"),
                }
                if job["status"] == "completed":
                    out.update(
                        response=job["response"],
                        richData=[],
                        completedAt=_iso(job["completed"]),
                        processingTime=int((job["completed"] - job["t"]) * 1000),
                    )
                await _json(send, 200, out)
                return
        await _json(send, 404, {"error": "Not found", "message": "No such endpoint"})

    def _details(self, job: dict[str, Any]) -> dict[str, Any]:
        job = self._state(job)
        out: dict[str, Any] = {
            "jobId": job["id"],
            "status": job["status"],
            "agentId": job["agent"],
            "userId": job["user"],
            "prompt": job["prompt"],
            "createdAt": int(job["t"] * 1000),
            "expiresAt": int(job["t"] * 1000) + 30_000,
            "metadata": {},
        }
        if job["status"] == "completed":
            out["result"] = {
                "message": {
                    "id": str(uuid.uuid5(uuid.NAMESPACE_URL, job["id"])),
                    "content": job["response"],
                    "authorId": job["agent"],
                    "createdAt": int(job["completed"] * 1000),
                },
                "processingTimeMs": int((job["completed"] - job["t"]) * 1000),
            }
        return out

    async def _messaging(self, method: str, parts: list[str], query: str, body: bytes, send: Send) -> None:
        if parts[:3] != ["api", "messaging", "jobs"]:
            await _json(send, 404, {"error": "Not found", "message": "No such endpoint"})
            return
        rest = parts[3:]
        if method == "POST" and not rest:
            if self.refuse_submit is not None:
                await _json(send, *self.refuse_submit)
                return
            doc = json.loads(body or b"{}")
            if not isinstance(doc.get("userId"), str) or not doc.get("content"):
                await _json(send, 400, {"error": "Invalid request", "message": "Required fields: userId, content"})
                return
            job = self._new(doc["content"], user=doc["userId"], agent=doc.get("agentId") or "agent-1")
            created = int(job["t"] * 1000)
            await _json(
                send,
                201,
                {"jobId": job["id"], "status": "processing", "createdAt": created, "expiresAt": created + 30_000},
            )
            return
        if method == "GET" and rest == ["health"]:
            counts = {s: 0 for s in ("pending", "processing", "completed", "failed", "timeout")}
            for job in self.jobs.values():
                counts[self._state(job)["status"]] = counts.get(job["status"], 0) + 1
            await _json(
                send,
                200,
                {
                    "healthy": True,
                    "timestamp": int(time.time() * 1000),
                    "totalJobs": len(self.jobs),
                    "statusCounts": counts,
                    "maxJobs": 10_000,
                },
            )
            return
        if method == "GET" and not rest:
            params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
            jobs = sorted(self.jobs.values(), key=lambda j: j["t"], reverse=True)
            if params.get("status"):
                jobs = [j for j in jobs if self._state(j)["status"] == params["status"]]
            jobs = jobs[: int(params.get("limit", "50"))]
            await _json(
                send, 200, {"jobs": [self._details(j) for j in jobs], "total": len(self.jobs), "filtered": len(jobs)}
            )
            return
        if method == "GET" and len(rest) == 1:
            job = self.jobs.get(rest[0])
            if job is None:
                await self._not_found(send, rest[0])
                return
            await _json(send, 200, self._details(job))
            return
        await _json(send, 404, {"error": "Not found", "message": "No such endpoint"})


@dataclass
class SlowAgent(_Recorder):
    """``POST /run``: a synchronous agent endpoint that streams progress (see the module docstring)."""

    api_key: str = API_KEY
    steps: tuple[str, ...] = ("Thinking...", "Checking sources...")
    step_delay: float = 0.05
    aborted: set[str] = field(default_factory=set)  # job ids whose caller went away before the answer
    answered: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        _Recorder.__init__(self)
        self._flags = threading.Lock()

    def _mark(self, which: set[str], job_id: str) -> None:
        with self._flags:
            which.add(job_id)

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Send) -> None:
        body = await self.accept(scope, receive, send)
        if body is None:
            return
        doc = json.loads(body)
        job_id, prompt = doc["jobId"], doc["prompt"]
        words = prompt.split()
        answer = {"response": f"Answer: {prompt}", "richData": [{"type": "echo", "words": len(words)}]}
        if words[:1] == ["status"]:
            await _json(send, int(words[1]), {"error": "Busy", "message": "the agent is overloaded"})
            return
        if words[:1] == ["plain"]:
            await _json(send, 200, answer)
            self._mark(self.answered, job_id)
            return
        sse = words[:1] == ["sse"]
        content_type = b"text/event-stream" if sse else b"application/x-ndjson"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})

        async def emit(obj: dict[str, Any]) -> None:
            line = json.dumps(obj).encode()
            data = b"event: progress\ndata: " + line + b"\n\n" if sse else line + b"\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})

        steps = self.steps
        sleep = float(words[1]) if words[:1] == ["sleep"] else 0.0
        if sleep:
            steps = steps[:1]
        for step in steps:
            await emit({"status": step})
            if await _disconnected_within(receive, self.step_delay):
                self._mark(self.aborted, job_id)
                return
        if sleep and await _disconnected_within(receive, sleep):
            self._mark(self.aborted, job_id)
            return
        await emit({"error": "the agent failed"} if words[:1] == ["fail"] else answer)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._mark(self.answered, job_id)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


async def async_wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()
