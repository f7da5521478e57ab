"""A runner job that is cancelled or passes its deadline ends, in each style, exactly as the README's table says
(and as the style's own clients know it: style A has no ``timeout``, style B no ``cancelled``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.dev.chain import DevChain
from tests.jobs.helpers import STATUS, bearer, jobs_gateway, pay, poll
from tests.support.gateway import sqlite_url
from tests.support.jobs_upstreams import SlowAgent, wait_until

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = {"agent": "/agent/prompt", "messaging": "/api/messaging/jobs"}
COLUMN = {"agent": 2, "messaging": 3}  # | a runner job that… | style agent | style messaging |


def readme_row(starts: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    (row,) = [line for line in text.splitlines() if line.strip().startswith(f"| {starts}")]
    return [cell.strip() for cell in row.strip().split("|")]


def body(style: str, prompt: str, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, **extra} if style == "agent" else {"userId": "u", "content": prompt, **extra}


@pytest.mark.parametrize("style", ["agent", "messaging"])
def test_cancel_and_deadline_end_states_are_the_readmes(base_chain: DevChain, tmp_path: Path, style: str) -> None:
    payer = base_chain.new_payer(1_000_000)
    agent = SlowAgent()
    with (
        jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=agent, mode="runner", style=style) as gw,
        gw.client() as c,
    ):
        late = pay(gw, c, payer, "POST", SUBMIT[style], json=body(style, "sleep 20", timeoutMs=1000))
        timed_out = poll(c, STATUS[style].format(late.json()["jobId"]), bearer(late), timeout=10)

        stopped = pay(gw, c, payer, "POST", SUBMIT[style], json=body(style, "sleep 20"))
        path = STATUS[style].format(stopped.json()["jobId"])
        poll(c, path, bearer(stopped), until=lambda d: d["status"] == "processing")
        answer = c.post(path + "/cancel", headers=bearer(stopped))
        assert answer.status_code == 200, answer.text
        cancelled = c.get(path, headers=bearer(stopped)).json()
        assert wait_until(lambda: stopped.json()["jobId"] in agent.aborted, 15)

    deadline_cell = readme_row("passes its deadline")[COLUMN[style]]
    cancel_cell = readme_row("is cancelled")[COLUMN[style]]
    assert timed_out["error"] == "Job timed out after 1000 ms"
    if style == "agent":
        assert (timed_out["status"], cancelled["status"]) == ("failed", "cancelled")
        assert deadline_cell.startswith("`failed`") and '"Job timed out after 30000 ms"' in deadline_cell
        assert cancel_cell.startswith("`cancelled`") and "cancelledAt" in cancel_cell
        assert cancelled["cancelledAt"] and "error" not in cancelled
    else:
        assert (timed_out["status"], cancelled["status"], cancelled["error"]) == ("timeout", "failed", "Job cancelled")
        assert deadline_cell.startswith("`timeout`")
        assert cancel_cell.startswith('`failed`, `error: "Job cancelled"`, `cancelledAt`')
        assert cancelled["cancelledAt"] is not None
