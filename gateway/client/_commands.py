"""The client commands of ``x402-gateway``: ``prompt``, ``status``, ``cancel``, ``jobs``, ``session
open|status|refund`` (options in :mod:`gateway.client._arguments`, wired in gateway/cli.py).

Secrets: the wallet key comes from ``X402_WALLET_KEY`` or ``--key-file`` only, never from an argument value
(argv is visible to every process on the machine and lands in shell history); no message ever echoes it.

Job tokens: a paid submit's ``X-Job-Token`` is kept in a small JSON file (``$X402_GATEWAY_JOBS_FILE``, else
``~/.config/x402-gateway/jobs.json``, mode 0600) so ``status`` and ``cancel`` in a later run can open the job
without the wallet; for a job not in the file they sign with the wallet (``X-Payer-Auth``) instead.

Session channels: kept in a JSON file (``--sessions-file``, else ``$X402_GATEWAY_SESSIONS_FILE``, else
``~/.config/x402-gateway/sessions.json``, mode 0600): it holds each channel's salt, without which its money cannot
be named again, so it is never pruned.

Exit codes: 0 the call did what was asked (``prompt``: the job completed; ``status``: the job is pending,
processing or completed; ``cancel``: the job is cancelled, also when it already was; ``jobs``: listed; ``session``:
opened, listed, refunded), 1 the job ended failed / cancelled / timed out (``prompt``, ``status``) or the server
refused the call (``cancel`` of a finished job, a refund with nothing to return, no channel to refund), 2 usage or
configuration error (also a call the gateway does not offer: reason ``not_supported``; a URL that asks no
payment), 3 payment refused (by the spend controls or the server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TextIO

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.client._arguments import KEY_ENV, KEY_LIKE, RPC_ENV_PREFIX, URL_ENV, redact_keys
from gateway.client._channels import FileSessionStore, SessionChannel
from gateway.client._client import AsyncX402Client
from gateway.client._config import SessionSettings, TxHashPayments
from gateway.client._errors import JobError, PaymentFailed, PaymentRefused, X402ClientError
from gateway.client._models import Job, StatusUpdate, SubmitResult
from gateway.client._sessions import origin_of
from gateway.client._spend import SpendControls
from gateway.client._tokens import FileTokenStore
from gateway.money import format_usd, parse_usd
from gateway.secrets import json_for_terminal, terminal_text

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_PAYMENT", "EXIT_USAGE", "run_client_command"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PAYMENT = 0, 1, 2, 3


class UsageError(Exception):
    """A usage or configuration problem: exit 2 with this message."""


# ---------------------------------------------------------------------------------------------------- settings


def load_account(key_file: str | None, *, required: bool) -> LocalAccount | None:
    if key_file:
        try:
            raw = Path(key_file).expanduser().read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the key file {key_file}: {type(exc).__name__}") from None
        source = f"the key file {key_file}"
    else:
        raw = os.environ.get(KEY_ENV, "").strip()
        source = f"${KEY_ENV}"
        if not raw:
            if required:
                raise UsageError(f"no wallet: set {KEY_ENV} or pass --key-file PATH")
            return None
    try:
        account: LocalAccount = Account.from_key(raw)
    except Exception:  # eth_account raises several types; none of their messages may be shown (they hold the key)
        raise UsageError(f"{source} does not hold a valid private key (64 hex digits)") from None
    return account


def _spend(args: argparse.Namespace) -> SpendControls:
    if args.max_price is None:
        max_price: Decimal | None = Decimal("1.00")
    else:
        try:
            max_price = Decimal(args.max_price.strip().removeprefix("$"))
        except InvalidOperation:
            raise UsageError(f"--max-price must be a dollar amount such as 0.10, not {args.max_price!r}") from None
        if not max_price.is_finite() or max_price < 0:
            raise UsageError("--max-price must be a non-negative dollar amount")
    try:
        return SpendControls(max_per_payment=max_price, networks=args.network)
    except ValueError as exc:
        raise UsageError(f"--max-price: {exc}") from None


def _rpc_urls() -> dict[str, str]:
    return {
        name.removeprefix(RPC_ENV_PREFIX).lower().replace("_", "-"): value
        for name, value in os.environ.items()
        if name.startswith(RPC_ENV_PREFIX) and value
    }


def _tx_settings(args: argparse.Namespace) -> TxHashPayments | None:
    urls = _rpc_urls()
    if args.pay_with == "exact":
        return None
    if not urls:
        raise UsageError(f"--pay-with {args.pay_with} needs RPC URLs: set {RPC_ENV_PREFIX}BASE=https://...")
    return TxHashPayments(rpc_urls=urls, confirmations=args.confirmations)


@contextlib.asynccontextmanager
async def _client(args: argparse.Namespace, *, key_required: bool) -> AsyncIterator[AsyncX402Client]:
    url = args.url or os.environ.get(URL_ENV)
    if not url:
        raise UsageError(f"no gateway URL: pass --url or set {URL_ENV}")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url must be an http(s) URL, not {url!r}")
    spend, tx_hash = _spend(args), _tx_settings(args)
    client = AsyncX402Client(
        url,
        account=load_account(args.key_file, required=key_required),
        spend=spend,
        pay_with=args.pay_with,
        tx_hash=tx_hash,
        style=args.style,
        tokens=FileTokenStore(),
        user_id=getattr(args, "user_id", None),
    )
    try:
        yield client
    finally:
        await client.aclose()


def run_client_command(args: argparse.Namespace) -> int:
    """Run ``args.command`` (prompt, status, cancel, jobs) and map its outcome to the exit code."""
    commands: dict[str, Callable[[argparse.Namespace], Any]] = {
        "prompt": cmd_prompt,
        "status": cmd_status,
        "cancel": cmd_cancel,
        "jobs": cmd_jobs,
        "session": cmd_session,
    }
    return _run(commands[args.command], args)


def _run(command: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    try:
        code: int = asyncio.run(command(args))
    except UsageError as exc:
        print(f"x402-gateway: {redact_keys(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("x402-gateway: interrupted", file=sys.stderr)
        return 130
    except (PaymentRefused, PaymentFailed) as exc:
        return _report(args, exc, EXIT_PAYMENT)
    except JobError as exc:
        return _report(args, exc, EXIT_FAILED, exc.job)
    except X402ClientError as exc:
        usage = exc.reason in (
            "job_credentials_missing",
            "wallet_required",
            "not_supported",
            "not_a_paid_route",
            "session_store_unreadable",
        )
        return _report(args, exc, EXIT_USAGE if usage else EXIT_FAILED)
    return code


def _report(args: argparse.Namespace, exc: X402ClientError, code: int, job: Job | None = None) -> int:
    label = {EXIT_PAYMENT: "payment refused", EXIT_USAGE: "error"}.get(code, "failed")
    status = f" (HTTP {exc.status})" if exc.status else ""
    print(f"x402-gateway: {label}{status}: [{terminal_text(exc.reason)}] {terminal_text(exc.message)}", file=sys.stderr)
    if args.json:
        doc: dict[str, Any] = {"error": exc.reason, "message": exc.message, "status": exc.status, "jobId": exc.job_id}
        if job is not None:
            doc["job"] = _job_doc(job)
        _print_json(doc)
    elif job is not None:
        _print_job(job, sys.stdout)
    return code


# ---------------------------------------------------------------------------------------------------- output


def _print_json(doc: Any) -> None:
    print(json_for_terminal(json.dumps(doc, indent=2, default=str, ensure_ascii=False)))


def _payment_doc(sub: SubmitResult | None) -> dict[str, Any] | None:
    if sub is None:
        return None
    return {"txHash": sub.tx_hash, "network": sub.network, "payer": sub.payer}


def _job_doc(job: Job) -> dict[str, Any]:
    doc = dict(job.raw)
    doc["status"] = job.status
    if job.submission is not None:
        doc["payment"] = _payment_doc(job.submission)
    return doc


def _print_job(job: Job, out: TextIO) -> None:
    print(f"job:      {terminal_text(job.job_id)}", file=out)
    print(f"status:   {terminal_text(job.status)}", file=out)
    if job.prompt:
        print(f"prompt:   {terminal_text(job.prompt)}", file=out)
    for update in job.status_updates:
        print(f"update:   {terminal_text(update.message)}", file=out)
    if job.error:
        print(f"error:    {terminal_text(job.error)}", file=out)
    if job.response is not None:
        print(f"response: {terminal_text(job.response)}", file=out)
    if job.rich_data:
        print("rich data:", file=out)
        print(terminal_text(json.dumps(list(job.rich_data), indent=2, ensure_ascii=False)), file=out)
    if job.submission is not None and job.submission.tx_hash:
        print(f"tx:       {terminal_text(job.submission.tx_hash)} ({terminal_text(job.submission.network)})", file=out)


class Progress:
    """Live status on stderr: a spinner line on a terminal, plain lines when piped (one per change)."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.status = "submitting"
        self._shown_status: str | None = None
        self._started = time.monotonic()
        self._frames = itertools.cycle(self.FRAMES)
        self._ticker: asyncio.Task[None] | None = None

    def _clear(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K")

    def _draw(self) -> None:
        if self.tty:
            elapsed = time.monotonic() - self._started
            self.stream.write(f"\r\x1b[2K{next(self._frames)} {self.status}  {elapsed:4.1f}s")
            self.stream.flush()

    def line(self, text: str) -> None:
        self._clear()
        self.stream.write(text + "\n")
        self._draw()
        self.stream.flush()

    def on_update(self, update: StatusUpdate) -> None:
        self.line(f"update: {terminal_text(update.message)}")

    def on_poll(self, job: Job) -> None:
        self.status = terminal_text(job.status)
        if not self.tty and job.status != self._shown_status:
            self.line(f"status: {self.status}")
        self._shown_status = job.status
        self._draw()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        async def tick() -> None:
            while True:
                self._draw()
                await asyncio.sleep(0.1)

        if self.tty:
            self._ticker = asyncio.get_running_loop().create_task(tick())
        try:
            yield
        finally:
            if self._ticker is not None:
                self._ticker.cancel()
            self._clear()
            self.stream.flush()


# -------------------------------------------------------------------------------------------------- commands


async def cmd_prompt(args: argparse.Namespace) -> int:
    if KEY_LIKE.fullmatch(args.text.strip()):
        # Most likely a key pasted in the wrong place: sending it to a server as a prompt would leak it.
        raise UsageError("the prompt looks like a private key; refusing to send it (keys go in $X402_WALLET_KEY)")
    async with _client(args, key_required=True) as client:
        progress = Progress(sys.stderr)
        if args.json:
            progress.tty = False
        with progress.running():
            submitted = await client.prompt(args.text, thread_id=args.thread)
            paid = f"paid: tx {submitted.tx_hash} on {submitted.network}" if submitted.tx_hash else "submitted"
            progress.line(f"{paid}; job {submitted.job_id} ({submitted.status}); spent ${format_usd(client.spent)}")
            if args.no_wait:
                job = None
            else:
                job = await client._poll(
                    submitted.job_id,
                    interval=args.interval,
                    max_attempts=max(1, int(args.timeout / max(args.interval, 0.01)) + 1),
                    timeout=args.timeout,
                    on_update=progress.on_update,
                    on_poll=progress.on_poll,
                    token=submitted.token,
                    submission=submitted,
                )
    if job is None:
        if args.json:
            _print_json({**submitted.raw, "payment": _payment_doc(submitted)})
        else:
            print(terminal_text(submitted.job_id))
        return EXIT_OK
    if args.json:
        _print_json(_job_doc(job))
        return EXIT_OK
    # The answer as the server gave it when it goes to a file or a pipe; on a terminal, never a command to it.
    print(terminal_text(job.response or "") if sys.stdout.isatty() else job.response or "")
    if job.rich_data:
        print("rich data:")
        print(terminal_text(json.dumps(list(job.rich_data), indent=2, ensure_ascii=False)))
    if submitted.tx_hash:
        print(f"tx: {terminal_text(submitted.tx_hash)} ({terminal_text(submitted.network)})")
    return EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
    async with _client(args, key_required=False) as client:
        job = await client.get_job_status(args.job_id)
    if args.json:
        _print_json(_job_doc(job))
    else:
        _print_job(job, sys.stdout)
    return EXIT_FAILED if job.terminal and job.status != "completed" else EXIT_OK


async def cmd_cancel(args: argparse.Namespace) -> int:
    async with _client(args, key_required=False) as client:
        job = await client.cancel_job(args.job_id)
    if args.json:
        _print_json(_job_doc(job))
    else:
        print(f"{terminal_text(job.job_id)}: {terminal_text(job.status)}")
    return EXIT_OK


async def cmd_jobs(args: argparse.Namespace) -> int:
    async with _client(args, key_required=True) as client:
        listed = await client.list_jobs(status=args.status, limit=args.limit)
    if args.json:
        _print_json({"jobs": [_job_doc(j) for j in listed.jobs], "total": listed.total, "filtered": listed.filtered})
        return EXIT_OK
    for job in listed.jobs:
        created = job.created_at.isoformat(timespec="seconds") if job.created_at else "-"
        prompt = job.prompt if len(job.prompt) <= 60 else job.prompt[:57] + "..."
        print(f"{terminal_text(job.job_id)}  {terminal_text(job.status):<10}  {created}  {terminal_text(prompt)}")
    print(f"{listed.filtered} of {listed.total} job(s)", file=sys.stderr)
    return EXIT_OK


# -------------------------------------------------------------------------------------------------- sessions


def _usd_option(value: str | None, option: str) -> int | None:
    if value is None:
        return None
    try:
        atomic = parse_usd(value)
    except ValueError:
        raise UsageError(f"{option} must be a dollar amount such as 1.00, not {value!r}") from None
    if atomic <= 0:
        raise UsageError(f"{option} must be more than zero")
    return atomic


def _session_store(args: argparse.Namespace) -> FileSessionStore:
    return FileSessionStore(args.sessions_file)  # None: $X402_GATEWAY_SESSIONS_FILE, else ~/.config/...


@contextlib.asynccontextmanager
async def _session_client(args: argparse.Namespace) -> AsyncIterator[AsyncX402Client]:
    if not args.url.startswith(("http://", "https://")):
        raise UsageError(f"the URL must be an http(s) URL, not {args.url!r}")
    client = AsyncX402Client(
        account=load_account(args.key_file, required=True),
        spend=_spend(args),
        pay_with="session",
        sessions=SessionSettings(rpc_urls=_rpc_urls()),
        session_store=_session_store(args),
    )
    try:
        yield client
    finally:
        await client.aclose()


def _channel_line(ch: SessionChannel) -> str:
    where = "  ".join(terminal_text(v) for v in (ch.channel_id, ch.origin, ch.network))
    return (
        f"{where}  balance ${format_usd(ch.balance)}  charged ${format_usd(ch.charged)}  "
        f"remaining ${format_usd(ch.remaining)}"
    )


async def cmd_session(args: argparse.Namespace) -> int:
    if args.session_command == "status":
        return _session_status(args)
    option = "deposit" if args.session_command == "open" else "amount"
    amount = _usd_option(getattr(args, option), f"--{option}")
    async with _session_client(args) as client:
        if args.session_command == "open":
            channel = await client.open_session(args.url, deposit=amount, method=args.method)
            if args.json:
                _print_json(channel.wire())
            else:
                print(_channel_line(channel))
            return EXIT_OK
        refund = await client.refund_session(args.url, amount=amount, method=args.method)
    if args.json:
        _print_json({"amount": str(refund.amount), "txHash": refund.tx_hash, "channel": refund.channel.wire()})
    else:
        print(f"refunded ${format_usd(refund.amount)} in {refund.tx_hash}")
        print(_channel_line(refund.channel))
    return EXIT_OK


def _session_status(args: argparse.Namespace) -> int:
    channels = _session_store(args).channels()
    if args.url:
        if not args.url.startswith(("http://", "https://")):
            raise UsageError(f"the URL must be an http(s) URL, not {args.url!r}")
        origin = origin_of(httpx.URL(args.url))
        channels = [c for c in channels if c.origin == origin]
    channels.sort(key=lambda c: c.opened_at, reverse=True)
    if args.json:
        _print_json({"channels": [c.wire() for c in channels]})
        return EXIT_OK
    for channel in channels:
        print(_channel_line(channel))
    print(f"{len(channels)} channel(s)", file=sys.stderr)
    return EXIT_OK
