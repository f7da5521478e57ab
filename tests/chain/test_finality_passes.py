"""The finality tracker journals every settlement at once but checks the chain once per interval, however many
settlements arrive: under load a pass per settlement (a lease renewal on every entry, the chain asked about every
height) cost more than the writes it preceded, and made nothing final sooner."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

from gateway.chain.finality import FinalityTracker
from gateway.storage.settlements import SQLiteSettlementJournal

INTERVAL = 1.0


async def test_settlements_are_journalled_at_once_and_checked_once_per_interval(tmp_path: Path) -> None:
    journal = SQLiteSettlementJournal(str(tmp_path / "journal.db"))
    none = cast(Any, None)  # the chain is never asked: the pass itself is counted instead
    tracker = FinalityTracker("base", none, none, lambda: none, journal, finality="depth", depth=3, interval=INTERVAL)
    passes: list[float] = []

    async def counted_pass() -> None:
        passes.append(time.monotonic())
        await tracker._flush_inbox()

    tracker.check = counted_pass  # type: ignore[method-assign]
    try:
        tracker.start()
        await asyncio.sleep(0.1)  # the first pass runs at start
        for n in range(5):
            tracker.track(f"exact:8453:{n}", "0x" + "cc" * 20, b"\x01", 2**40, "0x" + f"{n:064x}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        journalled = await journal.pending("base", limit=10)
        assert sorted(e.key for e in journalled) == [f"exact:8453:{n}" for n in range(5)]  # each written at once
        assert len(passes) == 1  # and no extra pass for any of them
        deadline = time.monotonic() + 5 * INTERVAL
        while len(passes) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(passes) == 2  # the next pass still comes, an interval after the first
        assert passes[1] - passes[0] >= INTERVAL * 0.9
    finally:
        await tracker.aclose()
        await journal.aclose()
