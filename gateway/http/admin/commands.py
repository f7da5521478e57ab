"""``x402-gateway admin ...``: the admin API from a terminal or a script (docs/operating.md, "Admin API").

    x402-gateway admin payments --payer 0xabc... --since 2025-06-01
    x402-gateway admin revenue --by day
    x402-gateway admin pending
    x402-gateway admin refund 'exact:8453:0x...'
    x402-gateway admin price 'GET /report' 0.25
    x402-gateway admin deny add 0xabc... --note "chargeback"

The token is read from the environment variable ``--token-env`` names (default ``X402_ADMIN_TOKEN``), never from an
argument (argv is visible to every process on the machine). ``--json`` prints the API's JSON answer as it is, for
scripts; otherwise a table for people. ``export`` writes CSV or JSON Lines to stdout or ``--output``.

Exit codes: 0 done; 1 the gateway refused or failed the call at run time (a payment refunded before, no such payment,
a refund that failed, the gateway unreachable); 2 usage or configuration error (no token in the environment, a bad
argument, a token the gateway does not accept or a read-only token for an action, an action it is not set up for).

This module imports nothing of the server: it is an HTTP client of the admin API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from gateway.secrets import terminal_text
from gateway.x402 import reasons

if TYPE_CHECKING:
    import httpx

__all__ = ["ADMIN_COMMANDS", "add_admin_commands", "run_admin_command"]

TOKEN_ENV = "X402_ADMIN_TOKEN"  # noqa: S105 - the name of a variable
URL_ENV = "X402_ADMIN_URL"
DEFAULT_URL = "http://127.0.0.1:9402"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ADMIN_COMMANDS = ("admin",)
_USAGE_STATUSES = (400, 401, 403, 404, 405, 501)  # what asking differently (or with another token) would fix
_RUNTIME_REASONS = ("payment_not_found",)  # a 404 about the data, not the call


class _UsageError(Exception):
    pass


class _Refused(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        reason = body.get("error") if isinstance(body, dict) else None
        message = body.get("message") if isinstance(body, dict) else None
        super().__init__(terminal_text(f"{status} {reason or 'error'}: {message or body}"))
        self.reason = reason


def add_admin_commands(sub: Any) -> None:
    """Add ``admin`` and its commands to ``sub`` (an ``add_subparsers()`` result)."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--url", help=f"the admin listener (default: ${URL_ENV}, else {DEFAULT_URL})")
    common.add_argument(
        "--token-env", default=TOKEN_ENV, metavar="NAME", help=f"variable holding the token (default {TOKEN_ENV})"
    )
    common.add_argument("--json", action="store_true", help="print the API's JSON answer (for scripts)")
    common.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for an answer (default 120)")
    filters = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    filters.add_argument("--payer", help="only this payer's payments")
    filters.add_argument("--route", help='only this route, e.g. "GET /report"')
    filters.add_argument("--tx", help="only the payment settled by this transaction")
    filters.add_argument("--since", help="from this time: epoch seconds or ISO 8601 (2025-06-01)")
    filters.add_argument("--until", help="before this time")

    admin = sub.add_parser("admin", help="the operator's API: payments, revenue, refunds, prices, the deny-list")
    cmds = admin.add_subparsers(dest="admin_command", required=True)
    payments = cmds.add_parser("payments", parents=[common, filters], help="recorded payments, newest first")
    payments.add_argument("--limit", type=int, help="at most this many (default 100)")
    payments.add_argument("--before", help="the page after a previous one: its next.before")
    payments.add_argument("--before-key", help="and its next.before_key")
    export = cmds.add_parser("export", parents=[common, filters], help="every matching payment as CSV or JSON Lines")
    export.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    export.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    revenue = cmds.add_parser("revenue", parents=[common], help="revenue net of refunds, by route, network or day")
    revenue.add_argument("--by", choices=["route", "network", "day"], default="route")
    revenue.add_argument("--since")
    revenue.add_argument("--until")
    pending = cmds.add_parser("pending", parents=[common], help="settlements not final, session charges unclaimed")
    pending.add_argument("--limit", type=int)
    jobs = cmds.add_parser("jobs", parents=[common], help="a payer's jobs")
    jobs.add_argument("--payer", required=True)
    jobs.add_argument("--limit", type=int)
    cmds.add_parser("config", parents=[common], help="the configuration in force, secrets masked")
    cmds.add_parser("routes", parents=[common], help="every route's price and pause in force")
    cmds.add_parser("store", parents=[common], help="the store's topology: Redis master, replicas, failovers seen")
    refund = cmds.add_parser("refund", parents=[common], help="send a payment's amount back to its payer (once)")
    refund.add_argument("key", metavar="KEY", help="the payment's ledger key (see `admin payments`)")
    cmds.add_parser("reload", parents=[common], help="re-read the config file (a bad file changes nothing)")
    price = cmds.add_parser("price", parents=[common], help="set a route's price on every instance")
    price.add_argument("route", metavar="ROUTE", help='the route as configured, e.g. "GET /report"')
    price.add_argument("price", metavar="USD", help='dollars, e.g. 0.25; "file" goes back to the file\'s price')
    pause = cmds.add_parser("pause", parents=[common], help="pause a route (503 before any payment) or resume it")
    pause.add_argument("route", metavar="ROUTE")
    state = pause.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="take paid requests again")
    state.add_argument("--file", action="store_true", help="back to what the config file says")
    deny = cmds.add_parser("deny", help="the deny-list: payers whose payments every instance refuses")
    deny_cmds = deny.add_subparsers(dest="deny_command", required=True)
    add = deny_cmds.add_parser("add", parents=[common], help="refuse this payer's payments (403 payer_denied)")
    add.add_argument("payer", metavar="ADDRESS")
    add.add_argument("--note", help="why (kept with the entry)")
    remove = deny_cmds.add_parser("remove", parents=[common], help="take this payer's payments again")
    remove.add_argument("payer", metavar="ADDRESS")
    deny_cmds.add_parser("list", parents=[common], help="the denied payers")
    admin.set_defaults(func=run_admin_command)


# -------------------------------------------------------------------------------------------------------- running


def run_admin_command(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    import httpx  # here, not at import: `x402-gateway --help` and the other commands do not pay for it

    out = out or sys.stdout
    url = (args.url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    try:
        token = os.environ.get(args.token_env, "").strip()
        if not token:
            raise _UsageError(f"no admin token: set {args.token_env} (or name another variable with --token-env)")
        headers = {"authorization": f"Bearer {token}", "accept": "application/json"}
        # trust_env=False: an HTTP proxy named in the environment (http_proxy, all_proxy) would see the token.
        with httpx.Client(base_url=url, headers=headers, timeout=args.timeout, trust_env=False) as client:
            if args.admin_command == "export":
                return _export(client, args, out)
            method, path, body, show = _request(args)
            answer = client.request(method, path, **body)
            doc = _decode(answer)
            already = isinstance(doc, dict) and doc.get("error") == reasons.PAYMENT_ALREADY_REFUNDED
            if answer.status_code >= 400 and not (args.admin_command == "refund" and already):
                raise _Refused(answer.status_code, doc)  # a refund still in progress is a refusal too
    except _UsageError as exc:
        print(f"x402-gateway admin: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except httpx.HTTPError as exc:
        print(f"x402-gateway admin: cannot reach the admin API at {url}: {type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILED
    except _Refused as exc:
        if args.json:  # a script reads the refusal's reason from stdout too
            out.write(json.dumps(exc.body, indent=2) + "\n")
        print(f"x402-gateway admin: {exc}", file=sys.stderr)
        usage = exc.status in _USAGE_STATUSES and exc.reason not in _RUNTIME_REASONS
        return EXIT_USAGE if usage else EXIT_FAILED
    if args.json:
        out.write(json.dumps(doc, indent=2) + "\n")
    else:
        show(doc, out)
    if answer.status_code == 409:  # a refund asked for a payment refunded before: nothing was sent
        print("x402-gateway admin: this payment was refunded before; nothing was sent", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _decode(answer: httpx.Response) -> Any:
    try:
        return answer.json()
    except ValueError:
        return {"error": "bad_answer", "message": answer.text[:200]}


Show = Callable[[Any, TextIO], None]


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any], Show]:
    """(method, path, httpx keyword arguments, how to show the answer) for the command."""
    command = args.admin_command
    if command == "payments":
        params = _params(args, ("payer", "route", "tx", "since", "until", "limit", "before", "before_key"))
        return "GET", "/admin/payments", {"params": params}, _show_payments
    if command == "revenue":
        return "GET", "/admin/revenue", {"params": _params(args, ("by", "since", "until"))}, _show_revenue
    if command == "pending":
        return "GET", "/admin/pending", {"params": _params(args, ("limit",))}, _show_pending
    if command == "jobs":
        return "GET", "/admin/jobs", {"params": _params(args, ("payer", "limit"))}, _show_jobs
    if command == "config":
        return "GET", "/admin/config", {}, _show_json
    if command == "routes":
        return "GET", "/admin/routes", {}, _show_routes
    if command == "store":
        return "GET", "/admin/store", {}, _show_json
    if command == "refund":
        return "POST", "/admin/refund", {"json": {"key": args.key}}, _show_refund
    if command == "reload":
        return "POST", "/admin/reload", {"json": {}}, _show_reload
    if command == "price":
        value = None if args.price == "file" else args.price
        return "POST", "/admin/routes/price", {"json": {"route": args.route, "price": value}}, _show_state
    if command == "pause":
        paused = None if args.file else not args.resume
        return "POST", "/admin/routes/pause", {"json": {"route": args.route, "paused": paused}}, _show_state
    if command == "deny":
        if args.deny_command == "add":
            body = {"payer": args.payer, **({"note": args.note} if args.note else {})}
            return "POST", "/admin/deny", {"json": body}, _show_deny
        if args.deny_command == "remove":
            return "DELETE", f"/admin/deny/{args.payer}", {}, _show_deny
        return "GET", "/admin/deny", {}, _show_denied
    raise _UsageError(f"unknown admin command {command!r}")


def _params(args: argparse.Namespace, names: Sequence[str]) -> dict[str, str]:
    return {name: str(getattr(args, name)) for name in names if getattr(args, name, None) is not None}


def _export(client: httpx.Client, args: argparse.Namespace, out: TextIO) -> int:
    params = _params(args, ("payer", "route", "tx", "since", "until"))
    with client.stream("GET", f"/admin/payments.{args.format}", params=params) as answer:
        if answer.status_code >= 400:
            answer.read()
            raise _Refused(answer.status_code, _decode(answer))
        if args.output:
            with open(args.output, "w", encoding="utf-8", newline="") as fh:
                for text in answer.iter_text():
                    fh.write(text)
        else:
            for text in answer.iter_text():
                out.write(text)
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------- tables


def _table(out: TextIO, head: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[int] = ()) -> None:
    # Cells hold what clients and servers sent (routes, job ids, deny notes): text, never commands to the terminal.
    cells = [[str(c) for c in head], *[["" if c is None else terminal_text(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    for row in cells:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
        out.write("  ".join(parts).rstrip() + "\n")


def _when(at: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(at))) if at is not None else ""


def _short(value: str, keep: int = 10) -> str:
    return value if len(value) <= 2 * keep + 1 else f"{value[:keep]}…{value[-4:]}"


def _show_json(doc: Any, out: TextIO) -> None:
    out.write(json.dumps(doc, indent=2) + "\n")


def _show_payments(doc: Any, out: TextIO) -> None:
    rows = [
        (_when(p["at"]), p["kind"], p["route"], p["usd"], _short(p["payer"]), _short(p["tx_hash"]), p["key"])
        for p in doc["payments"]
    ]
    _table(out, ("TIME (UTC)", "KIND", "ROUTE", "USD", "PAYER", "TX", "KEY"), rows, right=(3,))
    page = doc.get("next")
    if page:
        out.write(f"more: --before {page['before']!r} --before-key {page['before_key']!r}\n")


def _show_revenue(doc: Any, out: TextIO) -> None:
    rows = [(g["group"], g["usd"], g["payments"]) for g in doc["groups"]]
    rows.append(("total", doc["total"]["usd"], doc["total"]["payments"]))
    _table(out, (doc["by"].upper(), "USD", "PAYMENTS"), rows, right=(1, 2))


def _show_pending(doc: Any, out: TextIO) -> None:
    out.write(f"settlements not final: {len(doc['settlements'])}\n")
    rows = [(s["network"], s["status"], s["block"], s["tx_hash"], _when(s["created_at"])) for s in doc["settlements"]]
    if rows:
        _table(out, ("NETWORK", "STATUS", "BLOCK", "TX", "SINCE (UTC)"), rows)
    out.write(f"session channels owing: {len(doc['channels'])} (${doc['unclaimed']['usd']} unclaimed)\n")
    owing = [(c["network"], c["usd"], _short(c["payer"]), c["channel_id"]) for c in doc["channels"]]
    if owing:
        _table(out, ("NETWORK", "USD", "PAYER", "CHANNEL"), owing, right=(1,))


def _show_jobs(doc: Any, out: TextIO) -> None:
    rows = [(j["job_id"], j["status"], _when(j["created_at"] / 1000), j["tx_hash"] or "") for j in doc["jobs"]]
    _table(out, ("JOB", "STATUS", "CREATED (UTC)", "TX"), rows)
    out.write(f"{len(doc['jobs'])} of {doc['total']} job(s) of {doc['payer']}\n")


def _show_routes(doc: Any, out: TextIO) -> None:
    rows = [
        (r["route"], r["price_usd"], "paused" if r["paused"] else "", "override" if r["override"] else "")
        for r in doc["routes"]
    ]
    _table(out, ("ROUTE", "USD", "PAUSED", "SOURCE"), rows, right=(1,))


def _show_refund(doc: Any, out: TextIO) -> None:
    refund = doc.get("refund") or {}
    verb = "refunded" if doc.get("sent") else "already refunded"
    out.write(f"{verb}: ${refund.get('usd', '?').lstrip('-')} to {refund.get('payer')} in {refund.get('tx_hash')}\n")


def _show_reload(doc: Any, out: TextIO) -> None:
    result = doc.get("result") or {}
    out.write(f"{result.get('message', 'reloaded') if isinstance(result, dict) else result}\n")


def _show_state(doc: Any, out: TextIO) -> None:
    state = doc.get("state") or {}
    paused = " (paused)" if state.get("paused") else ""
    out.write(f"{doc['route']}: ${state.get('price_usd', '?')}{paused}\n")


def _show_deny(doc: Any, out: TextIO) -> None:
    if doc["denied"]:
        out.write(f"denied: {doc['payer']}{'' if doc.get('added') else ' (already)'}\n")
    else:
        out.write(f"allowed: {doc['payer']}{'' if doc.get('removed') else ' (was not denied)'}\n")


def _show_denied(doc: Any, out: TextIO) -> None:
    rows = [(d["payer"], _when(d["at"]), d["by"], d["note"]) for d in doc["denied"]]
    _table(out, ("PAYER", "SINCE (UTC)", "BY", "NOTE"), rows)
