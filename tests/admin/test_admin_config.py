"""``[admin]``: off unless configured, its own listener, tokens only from the environment and never shown."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import config_warnings
from gateway.config import AdminConfig, ConfigError, parse_config
from gateway.http.admin.masked import masked_config

READ, WRITE = "r" * 32, "w" * 32
REFUND_KEY = "0x" + "5a" * 32
ENV = {"TEST_RELAYER_KEY": "0x" + "11" * 32, "ADMIN_RO": READ, "ADMIN_RW": WRITE, "REFUND": REFUND_KEY}


def doc(**admin: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "upstream": {"url": "http://127.0.0.1:9000"},
        "payment": {"pay_to": "0x" + "22" * 20, "relayer_key_env": "TEST_RELAYER_KEY"},
        "networks": {"base": {"rpc_urls": ["https://rpc.example/v2/SECRETPATHKEY123"]}},
        "routes": [{"route": "GET /x", "price": "0.01"}],
    }
    if admin:
        d["admin"] = admin
    return d


TOKENS = [{"env": "ADMIN_RO", "access": "read"}, {"env": "ADMIN_RW", "access": "write"}]


def test_the_admin_api_is_off_unless_configured(tmp_path: Path) -> None:
    assert parse_config(doc(), env=ENV, base_dir=tmp_path).admin is None


def test_tokens_come_from_the_environment_and_never_show(tmp_path: Path) -> None:
    config = parse_config(doc(tokens=TOKENS, refund_key_env="REFUND"), env=ENV, base_dir=tmp_path)
    admin = config.admin
    assert admin is not None
    assert (admin.listen_host, admin.listen_port) == ("127.0.0.1", 9402)
    assert [(t.name, t.access, t.value.reveal()) for t in admin.tokens] == [
        ("ADMIN_RO", "read", READ),
        ("ADMIN_RW", "write", WRITE),
    ]
    assert admin.audit_log == (tmp_path / "admin-audit.jsonl").resolve()
    shown = repr(config) + str(masked_config(config, more_secrets=(READ, WRITE, REFUND_KEY)))
    for secret in (READ, WRITE, REFUND_KEY, REFUND_KEY[2:], ENV["TEST_RELAYER_KEY"][2:], "SECRETPATHKEY123"):
        assert secret not in shown
    assert "ADMIN_RW" in shown  # the token's name is what identifies it


@pytest.mark.parametrize(
    ("admin", "env", "message"),
    [
        ({}, ENV, "admin.tokens: is required"),
        ({"tokens": []}, ENV, "admin.tokens: needs at least one"),
        ({"tokens": [{"env": "MISSING"}]}, ENV, "admin.tokens[0].env: environment variable MISSING is not set"),
        ({"tokens": [{"env": "SHORT"}]}, {**ENV, "SHORT": "abc"}, "shorter than 16"),
        ({"tokens": [{"env": "ADMIN_RO", "access": "all"}]}, ENV, "admin.tokens[0].access: must be one of"),
        ({"tokens": [{"env": "ADMIN_RO", "acess": "read"}]}, ENV, "admin.tokens[0].acess: unknown key"),
        ({"tokens": [{"env": "ADMIN_RO"}, {"env": "SAME"}]}, {**ENV, "SAME": READ}, "same as another token"),
        ({"tokens": TOKENS, "listen": "127.0.0.1:8402"}, ENV, "admin.listen: must differ from server.listen"),
        ({"tokens": TOKENS, "listen": "0.0.0.0:8402"}, ENV, "admin.listen: must differ from server.listen"),
        ({"tokens": TOKENS, "listen": "nowhere"}, ENV, "admin.listen: must be HOST:PORT"),
        ({"tokens": TOKENS, "audit_log": ""}, ENV, "admin.audit_log: is required"),
        ({"tokens": TOKENS, "refund_key_env": "BAD"}, {**ENV, "BAD": "0x12"}, "is not a 32-byte hex key"),
        ({"tokens": TOKENS, "tokenz": 1}, ENV, "admin.tokenz: unknown key"),
    ],
)
def test_a_bad_admin_section_is_refused_at_start(
    tmp_path: Path, admin: dict[str, Any], env: dict[str, str], message: str
) -> None:
    d = doc(**admin) if admin else {**doc(), "admin": {}}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(d, env=env, base_dir=tmp_path)


def test_the_example_file_documents_every_admin_key_with_its_default(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "gateway.example.toml").read_text()
    block = text[text.index("# [admin]") :].split("\n\n", 1)[0].splitlines()  # to the block's end
    uncommented = "\n".join(line[2:] if line.startswith("# ") else line for line in block)
    section = tomllib.loads(uncommented)["admin"]
    env = {**ENV, "X402_ADMIN_TOKEN_RO": READ, "X402_ADMIN_TOKEN_RW": WRITE}
    documented = parse_config({**doc(), "admin": section}, env=env, base_dir=tmp_path).admin
    assert documented is not None
    default = AdminConfig()
    fields = {f.name for f in dataclasses.fields(AdminConfig)} - {"tokens", "refund_key", "audit_log"}
    for name in fields:
        assert getattr(documented, name) == getattr(default, name), name
    assert documented.audit_log == (tmp_path / default.audit_log).resolve()
    keys = set(section) - {"listen", "tokens", "refund_key_env"}
    assert keys == fields - {"listen_host", "listen_port"} | {"audit_log"}


def test_check_warns_about_an_admin_listener_other_hosts_can_reach(tmp_path: Path) -> None:
    public = parse_config(doc(tokens=TOKENS, listen="0.0.0.0:9402"), env=ENV, base_dir=tmp_path)
    private = parse_config(doc(tokens=TOKENS), env=ENV, base_dir=tmp_path)
    assert any("admin.listen = 0.0.0.0:9402" in w for w in config_warnings(public))
    assert not any("admin" in w for w in config_warnings(private))
