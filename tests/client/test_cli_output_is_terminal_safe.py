"""What a server sends (a job's answer, its id and status, an error message) reaches the operator's terminal as
text, never as a command to the terminal: ESC sequences, a carriage return that overwrites a line, the one-character
C1 CSI are shown escaped; ``--json`` stays JSON that reads back to exactly what the server sent."""

from __future__ import annotations

import argparse
import io
import json
import re

import pytest

from gateway.client import ApiError
from gateway.client._commands import _print_job, _print_json, _report
from gateway.client._models import Job, StatusUpdate
from gateway.http.admin.commands import _table
from gateway.secrets import terminal_text

HOSTILE = "done\x1b]0;pwned\x07\x1b[2J\rfake ok\x9b31m\x7f"
OBEYED = re.compile("[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")  # every control character but newline and tab


def test_a_jobs_fields_are_shown_with_their_control_characters_escaped() -> None:
    job = Job(
        job_id="job\x1b[1A",
        status="completed\r",
        prompt="p",
        response=HOSTILE + "\nsecond line\tend",
        status_updates=(StatusUpdate(message="step\x1b[K"),),
        error="e\x9b2J",
    )
    out = io.StringIO()
    _print_job(job, out)
    text = out.getvalue()
    assert not OBEYED.search(text), repr(text)
    assert "\\x1b[2J" in text and "\\x0dfake ok" in text and "\\x9b31m" in text
    assert "second line\tend" in text  # newline and tab are text


def test_a_servers_error_message_is_shown_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(json=False)
    _report(args, ApiError("bad\x1b[31m thing\r", status=400, reason="r\x1b"), 1)
    err = capsys.readouterr().err
    assert not OBEYED.search(err.rstrip("\n")), repr(err)
    assert "bad\\x1b[31m thing\\x0d" in err


def test_json_output_escapes_every_control_character_and_reads_back_the_same(
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = {"response": HOSTILE, "text": "naïve 日本語"}
    _print_json(doc)
    out = capsys.readouterr().out
    assert not OBEYED.search(out), repr(out)
    assert json.loads(out) == doc
    assert "naïve 日本語" in out  # readable text stays as it is


def test_plain_text_is_shown_unchanged() -> None:
    assert terminal_text("job_1: completed — 3 tokens\n\tok") == "job_1: completed — 3 tokens\n\tok"


def test_the_operators_tables_show_what_clients_sent_as_text() -> None:
    out = io.StringIO()
    _table(out, ["route", "job"], [("POST /agent/prompt", "job\x1b]8;;http://evil\x07click\x1b]8;;\x07"), ("x", None)])
    assert not OBEYED.search(out.getvalue()), repr(out.getvalue())
    assert "job\\x1b]8;;http://evil\\x07click" in out.getvalue()
