"""``x402-gateway demo`` (the README's first command, ``make demo``) as a newcomer runs it: one payment on embedded
defaults, paid once, served once, the replay refused, narrated for a person (no log lines in between)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_command_pays_once_serves_once_refuses_the_replay_and_exits_0() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout + run.stderr
    assert "OK: paid once, served once, replay refused." in out
    assert re.search(r"verified \+ settled in \d+ ms: tx 0x[0-9a-f]{64} \(block \d+\)", out)
    assert "payer 5.00 -> 4.90 USDC, pay-to 0.00 -> 0.10 USDC" in out
    assert "same payment again -> HTTP 402 payment_already_used" in out
    assert not re.search(r"\b(INFO|DEBUG)\b", out), out  # the narration is not interleaved with log lines
