"""``x402-gateway prompt/status/cancel/jobs`` and ``session open/status/refund`` in a subprocess against a real
paid gateway: output, exit codes, job-token and channel storage, and the wallet key that never travels as an
argument."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount

from gateway.client._commands import Progress
from gateway.client._models import Job, StatusUpdate
from gateway.dev.chain import DevChain
from tests.client.conftest import STEPS
from tests.e2e.helpers import Balances
from tests.jobs.helpers import PRICE, jobs_gateway
from tests.support.gateway import SESSIONS, GatewayUnderTest, running_gateway, sqlite_url
from tests.support.jobs_upstreams import FakeJobsApi

ROOT = Path(__file__).resolve().parents[2]
TX = re.compile(r"tx: (0x[0-9a-f]{64})")


def key_of(account: LocalAccount) -> str:
    return "0x" + bytes(account.key).hex()


def cli_env(tmp_path: Path, gw: GatewayUnderTest | None, payer: LocalAccount | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("X402_")}
    env.update(
        HOME=str(tmp_path),
        X402_GATEWAY_JOBS_FILE=str(tmp_path / "jobs.json"),
        X402_GATEWAY_SESSIONS_FILE=str(tmp_path / "sessions.json"),
    )
    if gw is not None:
        env["X402_GATEWAY_URL"] = gw.url
    if payer is not None:
        env["X402_WALLET_KEY"] = key_of(payer)
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_prompt_pays_shows_each_update_once_as_plain_lines_and_prints_response_and_tx_hash(
    agent_gateway: GatewayUnderTest, base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    money = Balances(agent_gateway, payer.address)
    run = cli(cli_env(tmp_path, agent_gateway, payer), "prompt", "What is the price of ETH?", "--interval", "0.02")
    assert run.returncode == 0, run.stderr
    assert "Answer: What is the price of ETH?" in run.stdout
    assert '"type": "echo"' in run.stdout  # rich data
    match = TX.search(run.stdout)
    assert match, run.stdout
    assert int(base_chain.rpc("eth_getTransactionReceipt", [match.group(1)])["status"], 16) == 1
    # piped: plain lines, no spinner, each status update exactly once, in order
    assert "\r" not in run.stderr and "\x1b" not in run.stderr
    updates = [line.removeprefix("update: ") for line in run.stderr.splitlines() if line.startswith("update: ")]
    assert updates == list(STEPS)
    assert "status: completed" in run.stderr.splitlines()
    money.assert_charged_once(PRICE)


def test_cli_prompt_exits_1_when_the_job_fails(
    agent_gateway: GatewayUnderTest, base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    run = cli(cli_env(tmp_path, agent_gateway, payer), "prompt", "fail please", "--interval", "0.02", "--json")
    assert run.returncode == 1, run.stderr
    doc = json.loads(run.stdout)
    assert (doc["error"], doc["job"]["status"], doc["job"]["error"]) == ("job_failed", "failed", "the agent failed")
    assert doc["job"]["payment"]["txHash"].startswith("0x")


def test_cli_status_and_cancel_open_the_job_with_the_stored_token_or_else_the_wallet_signature(
    agent_gateway: GatewayUnderTest, base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    env = cli_env(tmp_path, agent_gateway, payer)
    submit = cli(env, "prompt", "sleep 20", "--no-wait")
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip()
    tokens = json.loads(Path(env["X402_GATEWAY_JOBS_FILE"]).read_text())
    assert set(tokens[agent_gateway.url]) == {job_id}

    no_key = {k: v for k, v in env.items() if k != "X402_WALLET_KEY"}  # the stored token is enough
    status = cli(no_key, "status", job_id, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] in ("pending", "processing")
    first = cli(no_key, "cancel", job_id)
    assert (first.returncode, first.stdout.strip()) == (0, f"{job_id}: cancelled"), first.stderr
    again = cli(no_key, "cancel", job_id, "--json")  # idempotent
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "cancelled"

    # Without the token file, the wallet's signature opens the job; without either, a usage error.
    elsewhere = {**env, "X402_GATEWAY_JOBS_FILE": str(tmp_path / "other.json")}
    signed = cli(elsewhere, "status", job_id, "--json")
    assert signed.returncode == 1, signed.stderr  # 1: the job ended cancelled
    assert json.loads(signed.stdout)["status"] == "cancelled"
    neither = cli({k: v for k, v in elsewhere.items() if k != "X402_WALLET_KEY"}, "status", job_id)
    assert neither.returncode == 2 and "job_credentials_missing" in neither.stderr


def test_cli_jobs_json_lists_this_wallets_jobs(
    agent_gateway: GatewayUnderTest, base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    env = cli_env(tmp_path, agent_gateway, payer)
    ids = []
    for text in ("one", "sleep 20"):
        run = cli(env, "prompt", text, "--no-wait", "--json")
        assert run.returncode == 0, run.stderr
        doc: dict[str, Any] = json.loads(run.stdout)
        assert doc["payment"]["txHash"].startswith("0x")
        ids.append(doc["jobId"])
    assert cli(env, "cancel", ids[1]).returncode == 0
    listed = cli(env, "jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert sorted(j["jobId"] for j in doc["jobs"]) == sorted(ids) and doc["total"] == 2
    only = json.loads(cli(env, "jobs", "--status", "cancelled", "--limit", "5", "--json").stdout)
    assert [j["jobId"] for j in only["jobs"]] == [ids[1]]
    assert {j["status"] for j in only["jobs"]} == {"cancelled"}


def test_cli_exits_3_when_the_price_is_above_max_price_and_pays_nothing(
    agent_gateway: GatewayUnderTest, base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    money = Balances(agent_gateway, payer.address)
    run = cli(cli_env(tmp_path, agent_gateway, payer), "prompt", "hello", "--max-price", "0.01")
    assert run.returncode == 3, run.stderr
    assert "amount_over_limit" in run.stderr and "$0.02" in run.stderr
    assert run.stdout == ""
    money.assert_unchanged()
    assert agent_gateway.upstream.calls == []


def test_cli_usage_and_configuration_errors_exit_2(agent_gateway: GatewayUnderTest, tmp_path: Path) -> None:
    base = cli_env(tmp_path, None, None)
    with_url = cli_env(tmp_path, agent_gateway, None)
    cases = (
        (base, [], "required"),
        (base, ["prompt"], "required: text"),
        (base, ["prompt", "hi"], "no gateway URL"),
        (with_url, ["prompt", "hi"], "no wallet"),
        (with_url, ["jobs"], "no wallet"),
        (with_url, ["prompt", "hi", "--style", "grpc"], "invalid choice"),
        (with_url, ["jobs", "--limit", "ten"], "invalid int value"),
        (with_url, ["prompt", "hi", "--max-price", "cheap"], "--max-price"),
        ({**with_url, "X402_WALLET_KEY": "0x1234"}, ["prompt", "hi"], "not hold a valid private key"),
        (with_url, ["prompt", "hi", "--key-file", str(tmp_path / "missing")], "cannot read the key file"),
    )
    with ThreadPoolExecutor(len(cases)) as pool:  # independent processes: run them side by side
        runs = list(pool.map(lambda case: cli(case[0], *case[1]), cases))
    for (_, args, said), run in zip(cases, runs, strict=True):
        assert run.returncode == 2, (args, run.stderr)
        assert said in run.stderr, (args, run.stderr)


def test_cli_never_takes_the_wallet_key_as_an_argument_and_never_echoes_it(
    agent_gateway: GatewayUnderTest, base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    money = Balances(agent_gateway, payer.address)
    key = key_of(payer)
    env = cli_env(tmp_path, agent_gateway, None)
    attempts = (
        ["prompt", "hi", "--key", key],
        ["prompt", "hi", f"--key={key}"],
        ["prompt", "hi", "--private-key", key],
        ["status", "job_1", "--wallet-key", key],
        ["prompt", "hi", "--key-file", key],  # a key where a path belongs: not read, not echoed
        ["prompt", key],  # a key pasted as the prompt is not sent anywhere
    )
    with ThreadPoolExecutor(len(attempts)) as pool:
        runs = list(pool.map(lambda args: cli(env, *args), attempts))
    for args, run in zip(attempts, runs, strict=True):
        assert run.returncode == 2, (args, run.stderr)
        assert key not in run.stdout + run.stderr and key[2:] not in run.stdout + run.stderr, args
    # the same key from a file works
    key_file = tmp_path / "wallet.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    run = cli(env, "prompt", "from a key file", "--key-file", str(key_file), "--interval", "0.02")
    assert run.returncode == 0, run.stderr
    assert key[2:] not in run.stdout + run.stderr
    money.assert_charged_once(PRICE)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_progress_is_a_spinner_line_on_a_terminal_and_plain_lines_when_piped(tty: bool) -> None:
    stream: io.StringIO = _Terminal() if tty else io.StringIO()
    progress = Progress(stream)
    for status, updates in (("pending", []), ("processing", ["Thinking..."]), ("processing", ["Thinking...", "More"])):
        job = Job(job_id="j", status=status)
        for message in updates[len(updates) - 1 :]:
            progress.on_update(StatusUpdate(message=message))
        progress.on_poll(job)
    out = stream.getvalue()
    if tty:
        assert "\r\x1b[2K" in out and any(frame in out for frame in Progress.FRAMES)
        assert "update: Thinking...\n" in out
    else:
        assert out == "status: pending\nupdate: Thinking...\nstatus: processing\nupdate: More\n"


def test_cli_output_to_a_reader_that_stopped_early_ends_without_a_traceback(tmp_path: Path) -> None:
    # `x402-gateway session status --json | head -1`: the reader is gone before the output is written.
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "session", "status", "--json"],
        cwd=ROOT,
        env=cli_env(tmp_path, None, None),
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_end)
    os.close(read_end)  # long before the child has imported the package and printed
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell reports it: none of the documented exit codes


def test_cli_cancel_exits_0_and_a_finished_job_cannot_be_cancelled_exits_1(
    agent_gateway: GatewayUnderTest, base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    env = cli_env(tmp_path, agent_gateway, payer)
    running = cli(env, "prompt", "sleep 20", "--no-wait").stdout.strip()
    cancelled = cli(env, "cancel", running)
    assert (cancelled.returncode, cancelled.stdout.strip()) == (0, f"{running}: cancelled"), cancelled.stderr
    done = cli(env, "prompt", "quick", "--json", "--interval", "0.02")
    assert done.returncode == 0, done.stderr
    finished = cli(env, "cancel", json.loads(done.stdout)["jobId"])
    assert finished.returncode == 1 and "Job already completed" in finished.stderr


def _jobs_toml(tmp_path: Path, jobs: str, route: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[upstream]
url = "http://127.0.0.1:9"
[payment]
pay_to = "0x{"1" * 40}"
relayer_key_env = "X402_TEST_RELAYER"
[networks.base]
rpc_urls = ["http://127.0.0.1:8545"]
[[routes]]
{route}
[jobs]
{jobs}
"""
    )
    return path


@pytest.mark.parametrize(
    ("jobs", "route", "said"),
    [
        ('mode = "front"\nstyle = "agent"', 'route = "POST /agent/prompt"\nprice = "0.10"', "offers no list call"),
        (
            'mode = "front"\nstyle = "messaging"',
            'route = "POST /api/messaging/jobs"\nprice = "0.02"',
            "offers no cancel call",
        ),
        (
            'mode = "front"\nstyle = "agent"\nlist = "GET /agent/jobs"',
            'route = "POST /agent/prompt"\nprice = "0.10"\nsettlement = "before"',
            "has been paid",
        ),
    ],
)
def test_check_accepts_a_jobs_config_but_says_what_it_does_not_offer(
    tmp_path: Path, jobs: str, route: str, said: str
) -> None:
    env = {**cli_env(tmp_path, None, None), "X402_TEST_RELAYER": "0x" + "11" * 32}
    run = cli(env, "check", "-c", str(_jobs_toml(tmp_path, jobs, route)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok: 1 priced route(s)")
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and said in warnings[0], run.stderr


def test_cli_jobs_against_a_fronted_agent_api_says_what_is_missing_and_exits_2(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with jobs_gateway(
        base_chain, store_url=sqlite_url(tmp_path), upstream=FakeJobsApi("agent"), mode="front", style="agent"
    ) as gw:
        run = cli(cli_env(tmp_path, gw, payer), "jobs")
    assert run.returncode == 2, run.stderr
    assert "[not_supported] the gateway offers no job list at GET /agent/jobs" in run.stderr
    assert 'list = "GET /agent/jobs"' in run.stderr


def test_cli_cancel_against_a_fronted_messaging_api_says_it_has_none_and_exits_2(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    api = FakeJobsApi("messaging", complete_after=60)
    with jobs_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=api, mode="front", style="messaging") as gw:
        env = cli_env(tmp_path, gw, payer)
        submit = cli(env, "prompt", "hello", "--style", "messaging", "--no-wait")
        assert submit.returncode == 0, submit.stderr
        run = cli(env, "cancel", submit.stdout.strip(), "--style", "messaging")
    assert run.returncode == 2, run.stderr
    assert "fronted style messaging API has none" in run.stderr


# ---------------------------------------------------------------------------------------------------- sessions

SESSION_ROUTES = [{"route": "GET /session", "price": "0.001", "schemes": ["exact", "batch-settlement"]}]
SESSION_SETTINGS = {**SESSIONS, "min_deposit": "0.005", "claim_interval": 3600}


def test_cli_session_open_status_and_refund_keep_the_channel_in_the_sessions_file(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    env = cli_env(tmp_path, None, payer)
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), routes=SESSION_ROUTES, sessions=SESSION_SETTINGS
    ) as gw:
        url = gw.url + "/session"
        wallet = base_chain.balance(payer.address)
        opened = cli(env, "session", "open", url, "--deposit", "0.01", "--json")
        assert opened.returncode == 0, opened.stderr
        channel = json.loads(opened.stdout)
        assert (channel["origin"], channel["balance"], channel["charged"], channel["remaining"]) == (
            gw.url,
            "10000",
            "1000",
            "9000",
        )
        assert channel["channelConfig"]["payer"].lower() == payer.address.lower()
        sessions_file = Path(env["X402_GATEWAY_SESSIONS_FILE"])
        assert oct(sessions_file.stat().st_mode & 0o777) == "0o600"
        again = cli(env, "session", "open", url)  # room left: nothing paid
        assert again.returncode == 0 and channel["channelId"] in again.stdout, again.stderr
        assert len(gw.upstream.requests) == 1

        no_key = {k: v for k, v in env.items() if k != "X402_WALLET_KEY"}  # the file is enough to list
        listed = cli(no_key, "session", "status", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [c["channelId"] for c in json.loads(listed.stdout)["channels"]] == [channel["channelId"]]
        elsewhere = cli(no_key, "session", "status", "http://127.0.0.1:9/x", "--json")
        assert json.loads(elsewhere.stdout)["channels"] == []

        part = cli(env, "session", "refund", url, "--amount", "0.005", "--json")  # a partial one: minDeposit at least
        assert part.returncode == 0, part.stderr
        assert json.loads(part.stdout)["amount"] == "5000"
        rest = cli(env, "session", "refund", url, "--json")
        assert rest.returncode == 0, rest.stderr
        doc = json.loads(rest.stdout)
        assert (doc["amount"], doc["channel"]["remaining"]) == ("4000", "0") and doc["txHash"].startswith("0x")
        assert base_chain.balance(payer.address) == wallet - 1000  # everything but the one request came back
        empty = cli(env, "session", "refund", url)
        assert empty.returncode == 1 and "refund_no_balance" in empty.stderr
        text = cli(no_key, "session", "status", gw.url)
        assert text.returncode == 0 and "remaining $0.00" in text.stdout, text.stderr


def test_cli_session_refusals_and_usage_errors_exit_3_1_and_2(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    env = cli_env(tmp_path, None, payer)
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), routes=SESSION_ROUTES, sessions=SESSION_SETTINGS
    ) as gw:
        url = gw.url + "/session"
        cases = (
            (env, ["session", "open", url, "--max-price", "0.004"], 3, "amount_over_limit"),  # the 0.005 deposit
            (env, ["session", "open", url, "--deposit", "2"], 3, "max_per_payment is $1.00"),
            (env, ["session", "refund", url], 1, "session_not_found"),
            (env, ["session", "open", gw.url + "/healthz"], 2, "not_a_paid_route"),
            (env, ["session", "open", url, "--deposit", "lots"], 2, "--deposit"),
            (env, ["session", "open", "ftp://example.com/x"], 2, "http(s) URL"),
            (cli_env(tmp_path, None, None), ["session", "open", url], 2, "no wallet"),
            (env, ["session", "close", url], 2, "invalid choice"),
        )
        with ThreadPoolExecutor(len(cases)) as pool:
            runs = list(pool.map(lambda case: cli(case[0], *case[1]), cases))
        for (_, args, code, said), run in zip(cases, runs, strict=True):
            assert run.returncode == code, (args, run.stderr)
            assert said in run.stderr, (args, run.stderr)
        assert gw.upstream.requests == []
    assert not Path(env["X402_GATEWAY_SESSIONS_FILE"]).exists()  # nothing opened, nothing written
