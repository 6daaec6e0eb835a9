"""ACME orders through the one enrollment pipeline, with lego 4.9.1 and certbot 2.1 against a real
`scepd serve` whose `[policy]` has an external CSR check and approval for ACME:
- an order the check denies fails in the client with the check's reason (the finalize problem);
- an order waits `processing` (Retry-After) until `scepd pending approve ID`, run by the test
  from another process while the client polls; the client then gets its certificate. lego polls
  for `--cert.timeout` seconds (default 30); certbot 2.1 polls every second for 90 seconds,
  ignoring Retry-After, then gives up."""
from __future__ import annotations

import json
import stat
import subprocess
import time

import pytest

from .conftest import free_port, require, start_server, stop_server
from .test_acme import HOOK, _clean_env, _sans

CHECK = """#!/bin/sh
payload=$(cat)
case "$payload" in
  *denied.example.test*) echo "denied.example.test is not in the CMDB"; exit 1;;
esac
exit 0
"""


@pytest.fixture(scope="module")
def policy_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("acme-policy")
    check = tmp / "check.sh"
    check.write_text(CHECK)
    check.chmod(check.stat().st_mode | stat.S_IXUSR)
    https, http01 = free_port(), free_port()
    s = start_server(tmp, {
        "SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}", "SCEPD_ACME_HTTP01_PORT": str(http01),
        "SCEPD_ACME_RESOLVE": "*=127.0.0.1", "SCEPD_POLICY_CSR_CHECK_COMMAND": str(check),
        "SCEPD_POLICY_REQUIRE_APPROVAL": "acme"})
    s.directory = f"https://127.0.0.1:{https}/acme/directory"
    s.http01 = http01
    yield s
    stop_server(s)


def _lego_cmd(srv, tmp_path, domain: str) -> tuple[list, dict]:
    binary = require("lego")
    # lego polls a `processing` order for --cert.timeout seconds (default 30)
    cmd = [binary, "--server", srv.directory, "--accept-tos", "--email", "ops@example.test",
           "--domains", domain, "--http", "--http.port", f":{srv.http01}", "--path", str(tmp_path / "lego"),
           "--cert.timeout", "150", "run"]
    return cmd, _clean_env(LEGO_CA_CERTIFICATES=str(srv.root_pem), EXEC_PATH=str(HOOK))


def test_lego_order_denied_by_the_external_check_shows_its_reason(policy_server, tmp_path):
    cmd, env = _lego_cmd(policy_server, tmp_path, "denied.example.test")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "denied.example.test is not in the CMDB" in text, text
    assert "urn:ietf:params:acme:error:unauthorized" in text, text
    assert json.loads(policy_server.scepd("pending", "list", "--json")) == []  # denied before approval


def _certbot_cmd(srv, tmp_path, domain: str) -> tuple[list, dict]:
    binary = require("certbot")
    cmd = [binary, "certonly", "--standalone", "--http-01-port", str(srv.http01), "-d", domain,
           "--register-unsafely-without-email", "--agree-tos", "--server", srv.directory,
           "--config-dir", str(tmp_path / "cb"), "--work-dir", str(tmp_path / "cb"), "--logs-dir",
           str(tmp_path / "cb"), "--non-interactive"]
    return cmd, _clean_env(REQUESTS_CA_BUNDLE=str(srv.root_pem))


def test_certbot_order_denied_by_the_external_check_shows_its_reason(policy_server, tmp_path):
    cmd, env = _certbot_cmd(policy_server, tmp_path, "denied.example.test")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    assert out.returncode != 0
    # certbot 2.1 trips over its own error handling (AttributeError) when it reports a finalize
    # problem, so the problem is read from its debug log
    log = (tmp_path / "cb" / "letsencrypt.log").read_text()
    assert "urn:ietf:params:acme:error:unauthorized" in log and "denied.example.test is not in the CMDB" in log


@pytest.mark.parametrize("client", ["lego", "certbot"])
def test_order_waits_for_pending_approve(policy_server, tmp_path, client):
    srv = policy_server
    domain = f"approved-{client}.example.test"
    cmd, env = (_lego_cmd if client == "lego" else _certbot_cmd)(srv, tmp_path, domain)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=env)
    try:
        pending = []
        deadline = time.monotonic() + 120
        while not pending and time.monotonic() < deadline and proc.poll() is None:
            # certbot's CSR has no CN: the subject is empty; one client at a time waits here
            pending = [p for p in json.loads(srv.scepd("pending", "list", "--json")) if p["protocol"] == "acme"]
            if not pending:
                time.sleep(0.5)  # polling another process's progress: nothing to wait on instead
        said = proc.stdout.read() if proc.poll() is not None else "(still running)"
        assert pending, f"no pending request appeared; {client} said: {said}"
        assert proc.poll() is None  # the client is still polling the `processing` order
        assert "issued serial" in srv.scepd("pending", "approve", str(pending[0]["id"]))
        output, _ = proc.communicate(timeout=170)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    if client == "lego":
        where = tmp_path / "lego" / "certificates"
        files = where / f"{domain}.crt", where / f"{domain}.key"
    else:
        where = tmp_path / "cb" / "live" / domain
        files = where / "cert.pem", where / "privkey.pem"
    cert = srv.verify(*files)
    assert _sans(cert) == [domain]
    record = {c["serial"]: c for c in json.loads(srv.scepd("certs", "list", "--json"))}[
        format(cert.serial_number, "x")]
    assert (record["protocol"], record["profile"]) == ("acme", "server")
