"""scepd-agent over EST and over ACME dns-01, against a real `scepd serve --https` on 127.0.0.1.

- EST: `enroll --protocol est` with a one-time challenge (cacerts pinned by the root's
  fingerprint, simpleenroll with HTTP Basic), `renew --force` by simplereenroll with the current
  certificate as TLS client certificate and a new key, a request that waits for approval
  (202 + Retry-After, polled until `scepd pending approve`), a wrong or spent challenge (the
  server's 401 reason on stderr, non-zero exit). Every certificate: `openssl verify` + key match.
- ACME dns-01: `--dns01-hook` is a shell script the test provides that writes the TXT record into
  the test DNS server (tests/acme_responders.DnsServer, the server's `[acme] dns_resolver`);
  a wildcard and its base name are issued, `clear` runs for every `set`, a renewal uses the hook
  remembered in the state, a failing hook is a one-line error.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.acme_responders import DnsServer

from .conftest import free_port, start_server, stop_server
from .test_agent import agent, current_cert, serial_of, state, wait_for
from .test_est import _start

pytestmark = pytest.mark.conformance

DNS_HOOK = Path(__file__).parent / "dns_hook.py"


def fingerprint_of(root_pem: Path) -> str:
    return hashlib.sha256(x509.load_pem_x509_certificate(root_pem.read_bytes()).public_bytes(
        serialization.Encoding.DER)).hexdigest()


def key_pem(d: Path) -> bytes:
    return (d / "key.pem").read_bytes()


@pytest.fixture(scope="module")
def est(tmp_path_factory):
    mtls = free_port()
    s = _start(tmp_path_factory.mktemp("agent-est"), SCEPD_CA_DEFAULT_VALIDITY="3m",
               SCEPD_SERVER_MTLS=f"127.0.0.1:{mtls}")
    s.mtls_url = f"https://127.0.0.1:{mtls}"
    yield s
    stop_server(s.server)


def test_agent_est_daemon_renews_runs_the_hook_and_checks_in(est, tmp_path):
    """`run` over EST: the same schedule, hook and mTLS check-in as SCEP and ACME (3-minute
    certificates, due 10 s after issuance)."""
    srv = est.server
    d, hook_log, daemon_log = tmp_path / "agent", tmp_path / "hook.log", tmp_path / "agent.log"
    out = agent("enroll", "--dir", str(d), "--protocol", "est", "--server", est.est(), "--cn", "agent-run.example",
                "--challenge", srv.new_challenge(), "--ca-fingerprint", fingerprint_of(srv.root_pem),
                "--mtls-url", est.mtls_url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "checked in over mTLS" in out.stdout
    first = srv.verify(d / "cert.pem", d / "key.pem")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--dir", str(d), "--interval", "5s", "--renew-before", "2m50s",
         "--on-renew", f'echo "$SCEPD_AGENT_SERIAL" >> {hook_log}'],
        stdout=open(daemon_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: state(d).get("renewals", 0) >= 1 and hook_log.exists()
                 and (state(d).get("last_checkin") or {}).get("serial") == hook_log.read_text().split()[-1],
                 120, "a renewal by simplereenroll, its hook and its check-in", (daemon_log, srv.log), daemon)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)
    renewed = srv.verify(d / "cert.pem", d / "key.pem")
    assert serial_of(renewed) != serial_of(first) and renewed.public_key() != first.public_key()
    assert serial_of(renewed) in hook_log.read_text().split() or state(d)["renewals"] > 1
    assert state(d)["last_checkin"]["ok"] is True
    assert "Traceback" not in daemon_log.read_text()
    assert "simplereenroll issued" in srv.log_text()


def test_agent_est_enrolls_with_a_one_time_challenge_and_renews_by_simplereenroll(est, tmp_path):
    srv = est.server
    d = tmp_path / "agent"
    challenge = srv.new_challenge()
    out = agent("enroll", "--dir", str(d), "--protocol", "est", "--server", est.est(), "--cn", "agent-est.example",
                "--san", "DNS:agent-est.example", "--challenge", challenge,
                "--ca-fingerprint", fingerprint_of(srv.root_pem))
    assert out.returncode == 0, out.stdout + out.stderr
    first = srv.verify(d / "cert.pem", d / "key.pem")
    assert first.subject.rfc4514_string() == "CN=agent-est.example"
    assert state(d)["protocol"] == "est" and state(d)["server"] == est.est()
    assert json.loads(srv.scepd("certs", "show", serial_of(first)))["protocol"] == "est"
    assert (os.stat(d / "key.pem").st_mode & 0o077) == 0
    old_key = key_pem(d)

    # renewal: simplereenroll, authenticated by the installed certificate, for a new key
    out = agent("renew", "--dir", str(d), "--force")
    assert out.returncode == 0, out.stdout + out.stderr
    second = srv.verify(d / "cert.pem", d / "key.pem")
    assert serial_of(second) != serial_of(first) and second.subject == first.subject
    assert second.public_key() != first.public_key() and key_pem(d) != old_key  # the old key is replaced
    assert state(d)["last_renewal"]["how"] == "renewed"
    assert json.loads(srv.scepd("certs", "show", serial_of(second)))["protocol"] == "est"
    assert any("EST simplereenroll issued serial=" + serial_of(second) in line
               for line in srv.log_text().splitlines())
    audit = srv.scepd("audit", "list")
    assert "certificate.renewed" in audit

    # the spent one-time challenge: the server's 401 reason, a non-zero exit, nothing installed
    other = tmp_path / "other"
    out = agent("enroll", "--dir", str(other), "--protocol", "est", "--server", est.est(), "--cn",
                "agent-est-2.example", "--challenge", challenge, "--ca-fingerprint", fingerprint_of(srv.root_pem))
    assert out.returncode != 0 and "HTTP 401" in out.stderr, out.stdout + out.stderr
    assert not (other / "cert.pem").exists()


def test_agent_est_wrong_challenge_and_wrong_fingerprint(est, tmp_path):
    srv = est.server
    out = agent("enroll", "--dir", str(tmp_path / "a"), "--protocol", "est", "--server", est.est(), "--cn",
                "wrong.example", "--challenge", "not-the-challenge", "--ca-fingerprint", fingerprint_of(srv.root_pem))
    assert out.returncode != 0, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("scepd-agent: the EST server refused simpleenroll (HTTP 401): "
                                                   "the password is invalid, expired or already used"), out.stderr
    # a challenge scoped to other names: the server's 403 and the names it refuses
    scoped = srv.new_challenge("--names", "dev-*.example")
    out = agent("enroll", "--dir", str(tmp_path / "c"), "--protocol", "est", "--server", est.est(), "--cn",
                "bank.example", "--challenge", scoped, "--ca-fingerprint", fingerprint_of(srv.root_pem))
    line = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and line.startswith("scepd-agent: the EST server refused simpleenroll (HTTP 403): ")
    assert "bank.example" in line and "Traceback" not in out.stderr
    out = agent("enroll", "--dir", str(tmp_path / "b"), "--protocol", "est", "--server", est.est(), "--cn",
                "wrong.example", "--challenge", "static-secret", "--ca-fingerprint", "00" * 32)
    assert out.returncode != 0 and "pinned fingerprint" in out.stderr, out.stdout + out.stderr
    assert not (tmp_path / "b" / "cert.pem").exists()


def test_agent_est_polls_while_the_request_waits_for_approval(tmp_path):
    srv = _start(tmp_path / "srv", SCEPD_POLICY_REQUIRE_APPROVAL="est", SCEPD_EST_RETRY_AFTER="1")
    d = tmp_path / "agent"
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "enroll", "--dir", str(d), "--protocol", "est", "--server", srv.est(),
             "--cn", "agent-pending.example", "--challenge", srv.server.new_challenge(),
             "--ca-fingerprint", fingerprint_of(srv.server.root_pem), "-v"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            pending = []
            deadline = time.monotonic() + 60
            while not pending and time.monotonic() < deadline and proc.poll() is None:
                pending = json.loads(srv.server.scepd("pending", "list", "--json"))
                time.sleep(0.5)  # a real agent polls a real server: nothing to inject here
            assert len(pending) == 1 and pending[0]["protocol"] == "est", pending
            srv.server.scepd("pending", "approve", str(pending[0]["id"]))
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert proc.returncode == 0, stdout + stderr
        assert "EST simpleenroll: pending approval, asking again in 1 s" in stderr
        srv.server.verify(d / "cert.pem", d / "key.pem")
        assert len(json.loads(srv.server.scepd("pending", "list", "--json"))) == 0
    finally:
        stop_server(srv.server)


# --- ACME dns-01 through the agent's hook -----------------------------------------------------------

HOOK_SCRIPT = """#!/bin/sh
# the operator's dns-01 hook: record what was asked, then update the test's DNS server
echo "$SCEPD_DNS01_ACTION $SCEPD_DNS01_NAME $SCEPD_DNS01_DOMAIN $SCEPD_DNS01_VALUE" >> "{log}"
case "$SCEPD_DNS01_ACTION" in
  set) op=present ;;
  clear) op=cleanup ;;
  *) echo "unknown action $SCEPD_DNS01_ACTION" >&2; exit 2 ;;
esac
SCEPD_TEST_DNS_RECORDS="{records}" exec python3 "{hook}" "$op" "$SCEPD_DNS01_NAME" "$SCEPD_DNS01_VALUE"
"""


def test_agent_acme_dns01_hook_issues_a_wildcard_and_always_clears(tmp_path):
    records, hook_log = tmp_path / "dns-records.json", tmp_path / "hook.log"
    hook = tmp_path / "dns01-hook.sh"
    hook.write_text(HOOK_SCRIPT.format(log=hook_log, records=records, hook=DNS_HOOK))
    hook.chmod(0o755)
    https = free_port()
    with DnsServer(records) as dns:
        server = start_server(tmp_path / "server", {
            "SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}", "SCEPD_ACME_DNS_RESOLVER": f"127.0.0.1:{dns.port}",
            # no http-01 port is reachable: only the hook can prove the names
            "SCEPD_ACME_HTTP01_PORT": str(free_port()), "SCEPD_ACME_RESOLVE": "*=127.0.0.1"})
        try:
            directory = f"https://127.0.0.1:{https}/acme/directory"
            d = tmp_path / "agent"
            out = agent("enroll", "--dir", str(d), "--protocol", "acme", "--server", directory,
                        "--cn", "dnsagent.lab.test", "--san", "DNS:*.dnsagent.lab.test",
                        "--ca-fingerprint", fingerprint_of(server.root_pem), "--dns01-hook", str(hook), timeout=180)
            assert out.returncode == 0, out.stdout + out.stderr
            cert = server.verify(d / "cert.pem", d / "key.pem")
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.DNSName)
            assert sorted(sans) == ["*.dnsagent.lab.test", "dnsagent.lab.test"]
            calls = [line.split() for line in hook_log.read_text().splitlines()]
            # one record per authorization (the base name and the wildcard share a name), each cleared
            assert sorted(c[0] for c in calls) == ["clear", "clear", "set", "set"], calls
            assert {c[1] for c in calls} == {"_acme-challenge.dnsagent.lab.test."}
            assert {c[2] for c in calls} == {"dnsagent.lab.test"}
            sets = sorted(c[3] for c in calls if c[0] == "set")
            assert sets == sorted(c[3] for c in calls if c[0] == "clear") and len(set(sets)) == 2
            assert "_acme-challenge.dnsagent.lab.test" in dns.queries  # the server's validator asked
            assert json.loads(records.read_text()) == {"_acme-challenge.dnsagent.lab.test": []}  # cleared
            assert state(d)["acme"]["dns01_hook"] == str(hook)

            # renewal with the hook remembered in the state
            first = current_cert(d)
            out = agent("renew", "--dir", str(d), "--force", timeout=180)
            assert out.returncode == 0, out.stdout + out.stderr
            second = server.verify(d / "cert.pem", d / "key.pem")
            assert serial_of(second) != serial_of(first)
            calls = hook_log.read_text().split("\n")
            assert sum(line.startswith("set ") for line in calls) == sum(line.startswith("clear ") for line in calls)

            # a failing hook: a one-line error naming the action and record, and still a clear
            hook_log.write_text("")
            failing = tmp_path / "failing-hook.sh"
            failing.write_text(f'#!/bin/sh\necho "$SCEPD_DNS01_ACTION" >> "{hook_log}"\n'
                               '[ "$SCEPD_DNS01_ACTION" = clear ] && exit 0\necho "provider API said no" >&2\nexit 3\n')
            failing.chmod(0o755)
            out = agent("enroll", "--dir", str(tmp_path / "failing"), "--protocol", "acme", "--server", directory,
                        "--cn", "other.lab.test", "--ca-fingerprint", fingerprint_of(server.root_pem),
                        "--dns01-hook", str(failing), timeout=180)
            assert out.returncode != 0
            assert ("dns-01 hook (set _acme-challenge.other.lab.test.) exited with status 3: provider API said no"
                    in out.stderr), out.stderr
            assert hook_log.read_text().split() == ["set", "clear"]
            assert not (tmp_path / "failing" / "cert.pem").exists()
        finally:
            stop_server(server)
