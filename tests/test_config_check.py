"""`scepd config check`: one line per problem, exit 1; OK and exit 0 for a good directory."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from scepd.cli import main

ROOT_ENV = {"SCEPD_ROOT_KEY_PASSPHRASE": "root secret"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cfg") / "state"
    result = CliRunner().invoke(main, ["init", "--state-dir", str(d)], env=ROOT_ENV)
    assert result.exit_code == 0, result.output
    return d


@pytest.fixture
def state(pristine, tmp_path) -> Path:
    d = tmp_path / "state"
    shutil.copytree(pristine, d)
    return d


def check(d: Path, env: dict | None = None):
    return CliRunner().invoke(main, ["config", "check", "--state-dir", str(d)], env=env or {})


def _append(d: Path, text: str) -> None:
    """Replace sections of the generated file by appending a fresh file with only `text`."""
    (d / "scepd.toml").write_text(text)


def test_a_fresh_directory_is_ok(state):
    result = check(state)
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_every_problem_on_its_own_line(state):
    _append(state, """
[server]
https = "nohost"
log_format = "xml"
base_url = "ftp://x"
[ca]
default_validity = "9x"
[scep]
profile = "bogus"
[policy]
subject = "weird"
require_approval = "maybe"
csr_check_command = "/nonexistent/check"
[limits]
acme_new_orders_per_account = "many"
""")
    result = check(state)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    expected = ["[server] https", "[server] base_url", "[server] log_format", "[ca] default_validity",
                "[scep] profile", "[policy] subject", "[policy] require_approval",
                "[limits] acme_new_orders_per_account", "[policy] csr_check_command"]
    for prefix in expected:
        assert sum(line.startswith(prefix) for line in lines) == 1, (prefix, lines)
    assert lines[-1].startswith(f"scepd: {len(expected)} problem(s)")
    assert "Traceback" not in result.output


def test_unknown_key_and_bad_toml(state):
    _append(state, "[server]\nhtpp = \"127.0.0.1:8080\"\n")
    result = check(state)
    assert result.exit_code == 1 and "unknown key [server] htpp" in result.output
    _append(state, "[server\n")
    result = check(state)
    assert result.exit_code == 1 and "not valid TOML" in result.output


def test_key_mode_and_missing_ca(state):
    (state / "ca" / "ca.key").chmod(0o644)
    result = check(state)
    assert result.exit_code == 1
    assert "ca.key: readable by group or others (mode 644)" in result.output
    shutil.rmtree(state / "ca")
    result = check(state)
    assert result.exit_code == 1 and "no CA here" in result.output


def test_unreachable_database(state):
    # a port nothing listens on (bound and closed just before)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = check(state, {"SCEPD_DATABASE_URL": f"postgresql+asyncpg://nobody@127.0.0.1:{port}/x"})
    assert result.exit_code == 1
    assert "[database] url: cannot reach the database" in result.output
    result = check(state, {"SCEPD_DATABASE_URL": f"sqlite+aiosqlite:///{state}/missing-dir/x.db"})
    assert result.exit_code == 1 and "does not exist" in result.output


def test_reachable_postgresql(state, postgres_cluster):
    url = postgres_cluster.create_database("scepd_config_check")
    result = check(state, {"SCEPD_DATABASE_URL": url})
    assert result.exit_code == 0, result.output


def test_admin_listener_address_and_metrics_on_admin(state):
    _append(state, '[server]\nhttps = "127.0.0.1:8443"\nadmin = "127.0.0.1"\n')
    result = check(state)
    assert result.exit_code == 1 and "[server] admin: expected host:port, got '127.0.0.1'" in result.output
    _append(state, '[server]\nhttps = "127.0.0.1:8443"\nmetrics_on_admin = true\n')
    result = check(state)
    assert result.exit_code == 1 and "[server] metrics_on_admin: needs [server] admin" in result.output
    _append(state, '[server]\nhttps = "127.0.0.1:8443"\nadmin = "127.0.0.1:8443"\n')
    result = check(state)
    assert result.exit_code == 1 and "[server] admin: 127.0.0.1:8443 is also [server] https" in result.output
    _append(state, '[server]\nhttps = "127.0.0.1:8443"\nadmin = "127.0.0.1:8445"\nmetrics_on_admin = true\n')
    result = check(state)
    assert result.exit_code == 0, result.output


def test_log_level_is_checked(state):
    _append(state, '[server]\nlog_level = "chatty"\n')
    result = check(state)
    assert result.exit_code == 1 and "[server] log_level must be one of debug, info, warning, error" in result.output
