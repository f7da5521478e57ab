"""The client commands' command line (``prompt``, ``status``, ``cancel``, ``jobs``, ``session open|status|refund``):
their options, the environment they read, and the key redaction every usage error goes through. ``x402-gateway``
(gateway/cli.py) adds them to its parser; the commands themselves live in :mod:`gateway.client._commands`, loaded
only to run one (eth_account alone takes ~0.7 s to import, which a usage error should not cost), so this module
imports nothing heavy.

The wallet key is read from ``$X402_WALLET_KEY`` or ``--key-file`` only: no option takes the key itself (argv is
visible to every process on the machine and lands in shell history).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

KEY_ENV = "X402_WALLET_KEY"
URL_ENV = "X402_GATEWAY_URL"
RPC_ENV_PREFIX = "X402_RPC_URL_"
SESSIONS_ENV = "X402_GATEWAY_SESSIONS_FILE"
KEY_LIKE = re.compile(r"(0x)?[0-9a-fA-F]{64}")
CLIENT_COMMANDS = ("prompt", "status", "cancel", "jobs", "session")


def redact_keys(text: str) -> str:
    """Hide anything shaped like a private key (argparse echoes unknown arguments in its errors)."""
    return KEY_LIKE.sub("<redacted>", text)


def run_client_command(args: argparse.Namespace) -> int:
    from gateway.client._commands import run_client_command as run

    return run(args)


def add_client_commands(sub: Any) -> None:
    """Add prompt / status / cancel / jobs to ``sub`` (an ``add_subparsers()`` result); each sets ``func``."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--url", help=f"the gateway's base URL (default: ${URL_ENV})")
    common.add_argument("--style", choices=["agent", "messaging"], default="agent", help="job API style")
    common.add_argument("--key-file", metavar="PATH", help=f"file holding the wallet key (default: ${KEY_ENV})")
    common.add_argument("--max-price", metavar="USD", help="refuse to pay more than this per request (default 1.00)")
    common.add_argument(
        "--network", action="append", metavar="NAME", help="only pay on this network (repeatable; e.g. base)"
    )
    common.add_argument(
        "--pay-with",
        choices=["exact", "txhash", "auto"],
        default="exact",
        help=f"x402 signature, USDC transfer (RPC URLs from ${RPC_ENV_PREFIX}<NETWORK>), or either",
    )
    common.add_argument("--confirmations", type=int, default=1, help="blocks a transfer waits for (txhash)")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    prompt = sub.add_parser("prompt", parents=[common], help="pay, submit a prompt, show its progress and answer")
    prompt.add_argument("text", help="the prompt")
    prompt.add_argument("--thread", metavar="ID", help="continue this thread (style agent)")
    prompt.add_argument(
        "--user-id", metavar="ID", help="userId (style messaging; default: a UUID derived from the wallet address)"
    )
    prompt.add_argument("--no-wait", action="store_true", help="submit only: print the job id and exit")
    prompt.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    prompt.add_argument("--timeout", type=float, default=300.0, help="give up waiting after this (default 300)")
    status = sub.add_parser(
        "status", parents=[common], help="show a job (exit 1 if it failed, was cancelled or timed out)"
    )
    status.add_argument("job_id", metavar="JOB_ID")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a pending or processing job")
    cancel.add_argument("job_id", metavar="JOB_ID")
    jobs = sub.add_parser("jobs", parents=[common], help="list this wallet's jobs")
    jobs.add_argument("--status", help="only jobs with this status")
    jobs.add_argument("--limit", type=int, help="at most this many (default: the server's, 50)")
    for command in (prompt, status, cancel, jobs):
        command.set_defaults(func=run_client_command)
    _add_session_commands(sub)


def _add_session_commands(sub: Any) -> None:
    """``session open URL``, ``session status [URL]``, ``session refund URL``: channels kept in a local file."""
    store = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    store.add_argument(
        "--sessions-file",
        metavar="PATH",
        help=f"where channels are kept (default: ${SESSIONS_ENV}, else ~/.config/x402-gateway/sessions.json)",
    )
    store.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    paying = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    paying.add_argument("--key-file", metavar="PATH", help=f"file holding the wallet key (default: ${KEY_ENV})")
    paying.add_argument("--max-price", metavar="USD", help="refuse a price or a deposit above this (default 1.00)")
    paying.add_argument(
        "--network", action="append", metavar="NAME", help="only pay on this network (repeatable; e.g. base)"
    )
    paying.add_argument("--method", default="GET", help="the paid route's HTTP method (default GET)")
    paying.add_argument("url", metavar="URL", help="a paid URL of the server that offers sessions")

    session = sub.add_parser(
        "session",
        help="pay through a channel: one deposit, then a signed voucher per request (batch-settlement)",
        description=f"RPC URLs from ${RPC_ENV_PREFIX}<NETWORK>, if set, let the client check the server's account "
        "of a channel against the chain.",
    )
    actions = session.add_subparsers(dest="session_command", required=True)
    opening = actions.add_parser(
        "open",
        parents=[paying, store],
        help="open a channel with URL's server (one paid request at URL carries the deposit)",
    )
    opening.add_argument("--deposit", metavar="USD", help="deposit this much (default: the server's minDeposit)")
    status = actions.add_parser("status", parents=[store], help="the channels in the local store")
    status.add_argument("url", metavar="URL", nargs="?", help="only channels with this URL's server")
    refund = actions.add_parser(
        "refund", parents=[paying, store], help="get back what a channel holds beyond what was charged"
    )
    refund.add_argument("--amount", metavar="USD", help="only this much (default: all that is left)")
    session.set_defaults(func=run_client_command)
