"""scepd-agent against a real `scepd serve` on 127.0.0.1 issuing 3-minute certificates.

One scenario, every step bounded in time:
  enroll over SCEP (pinned root) -> the daemon (`scepd-agent run --interval 5s`) renews by itself
  at least twice with no challenge, runs the hook and checks in over mTLS with each certificate
  -> `scepd ca rollover` + restart: the daemon sees GetNextCACert -> `scepd ca activate-next` +
  restart: the next renewal comes from the new CA, chain updated, check-in still accepted
  -> `scepd certs revoke`: the revoked certificate is refused at the mTLS listener (401) and cannot
  authorise a renewal.
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

from .conftest import assert_subject_kept, free_port, start_server, stop_server

pytestmark = pytest.mark.conformance

#: the subject `scepd-agent enroll --cn agent-1` requests (pyca: CN as UTF8String)
AGENT_NAME = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "agent-1")])
VALIDITY = "3m"
RENEW_BEFORE = "2m15s"  # renew 45 s after issuance: two renewals fit in ~2 minutes


def agent(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout: float, what: str, logs=(), proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                         + "\n".join(p.read_text(errors="replace")[-4000:] for p in logs))


def state(d: Path) -> dict:
    try:
        return json.loads((d / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def current_cert(d: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((d / "cert.pem").read_bytes())


def serial_of(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def run_until_two_renewals(server, d: Path, first: x509.Certificate, hook_log: Path, daemon_log: Path):
    """Start `scepd-agent run` (interval 5 s) and wait, bounded, until it has renewed twice by
    itself with the hook run each time: new keys, distinct serials. Returns (daemon, hooked serials)."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--dir", str(d), "--interval", "5s",
         "--renew-before", RENEW_BEFORE, "--on-renew", f'echo "$SCEPD_AGENT_SERIAL" >> {hook_log}'],
        stdout=open(daemon_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: state(d).get("renewals", 0) >= 2 and hook_log.exists()
                 and len(hook_log.read_text().split()) >= 2, 180, "two unattended renewals",
                 (daemon_log, server.log), daemon)
        hooked = hook_log.read_text().split()
        cert = server.verify(d / "cert.pem", d / "key.pem")
        assert serial_of(cert) != serial_of(first) and cert.public_key() != first.public_key()
        assert_subject_kept(cert, first.subject)  # renewals request the subject they hold
        assert len(set(hooked)) == len(hooked) and serial_of(first) not in hooked
        return daemon, hooked
    except BaseException:  # the caller never gets the process: stop it here
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=10)
        raise


def test_agent_enrolls_renews_unattended_follows_rollover_and_is_refused_when_revoked(tmp_path):
    mtls_port = free_port()
    # the root key passphrase: serve's first start encrypts root.key with it, rollover reads it
    env = {"SCEPD_CA_DEFAULT_VALIDITY": VALIDITY, "SCEPD_SERVER_MTLS": f"127.0.0.1:{mtls_port}",
           "SCEPD_ROOT_KEY_PASSPHRASE": "conformance root passphrase"}
    server_tmp = tmp_path / "server"
    server = start_server(server_tmp, env)
    d = tmp_path / "agent"
    hook_log = tmp_path / "hook.log"
    daemon_log = tmp_path / "agent.log"
    daemon = None
    try:
        root_der = server.root_pem.read_bytes()
        fp = hashlib.sha256(x509.load_pem_x509_certificate(root_der).public_bytes(
            serialization.Encoding.DER)).hexdigest()
        mtls_url = f"https://127.0.0.1:{mtls_port}"

        # --- first enrollment: challenge, pinned root, first check-in ---------------------------
        out = agent("enroll", "--dir", str(d), "--server", server.url, "--cn", "agent-1",
                    "--san", "DNS:agent-1.example", "--challenge", server.challenge,
                    "--ca-fingerprint", ":".join(fp[i:i + 2] for i in range(0, 64, 2)), "--mtls-url", mtls_url)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "checked in over mTLS" in out.stdout
        first = server.verify(d / "cert.pem", d / "key.pem")
        assert (os.stat(d / "key.pem").st_mode & 0o077) == 0
        assert_subject_kept(first, AGENT_NAME)  # the Name the agent's CSR carries

        # --- the daemon renews by itself, twice at least ---------------------------------------
        daemon, hooked = run_until_two_renewals(server, d, first, hook_log, daemon_log)
        # every renewal was a RenewalReq (messageType 17) the server accepted without a challenge
        server_log = server.log_text()
        for serial in hooked:
            assert any("type=17 status=SUCCESS" in line and f"serial={serial}" in line
                       for line in server_log.splitlines()), serial
        # check-in accepted with each new certificate (the check after each install checks in)
        wait_for(lambda: all(f"checked in over mTLS as serial {s}" in daemon_log.read_text() for s in hooked),
                 30, "a check-in with every renewed certificate", (daemon_log,), daemon)
        listed = json.loads(server.scepd("agents", "list", "--json"))
        assert len(listed) == 1 and listed[0]["serial"] in hooked
        out = agent("status", "--dir", str(d), "--json")
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["state"] in ("valid", "renewal-due") and report["last_check"]["result"] == "ok"

        # --- CA rollover: announced, then followed -----------------------------------------------
        out = subprocess.run([sys.executable, "-m", "scepd", "ca", "rollover", "--state-dir", str(server.state_dir)],
                             capture_output=True, text=True, timeout=120, env={**os.environ, **env})
        assert out.returncode == 0, out.stderr
        next_ca = x509.load_pem_x509_certificate((server.state_dir / "ca" / "next" / "ca.pem").read_bytes())
        stop_server(server)
        server = start_server(server_tmp, env, port=server.port)
        wait_for(lambda: (d / "next-ca.pem").exists(), 60, "GetNextCACert to be followed", (daemon_log,), daemon)
        assert x509.load_pem_x509_certificate((d / "next-ca.pem").read_bytes()) == next_ca
        out = subprocess.run([sys.executable, "-m", "scepd", "ca", "activate-next", "--state-dir",
                              str(server.state_dir)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **env})
        assert out.returncode == 0, out.stderr
        stop_server(server)
        server = start_server(server_tmp, env, port=server.port)

        def from_next_ca() -> bool:
            try:
                current_cert(d).verify_directly_issued_by(next_ca)
                return True
            except Exception:  # not yet renewed under the new CA
                return False
        wait_for(from_next_ca, 120, "a renewal under the new CA", (daemon_log, server.log), daemon)
        chain = x509.load_pem_x509_certificates((d / "chain.pem").read_bytes())
        assert chain == [next_ca]
        assert not (d / "next-ca.pem").exists()
        new_serial = serial_of(current_cert(d))
        wait_for(lambda: f"checked in over mTLS as serial {new_serial}" in daemon_log.read_text(), 30,
                 "a check-in with the certificate from the new CA", (daemon_log,), daemon)
        assert "CA rollover picked up" in daemon_log.read_text()

        # --- SIGHUP: check now; SIGTERM: a clean stop ---------------------------------------------
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: checking now" in daemon_log.read_text(), 30, "SIGHUP to be handled",
                 (daemon_log,), daemon)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
        daemon = None
        log_text = daemon_log.read_text()
        assert "Traceback" not in log_text and "stopped" in log_text

        # --- revocation: refused at the mTLS listener, and no renewal with it --------------------
        revoked = serial_of(current_cert(d))
        server.scepd("certs", "revoke", revoked, "--reason", "keyCompromise")
        out = agent("checkin", "--dir", str(d))
        assert out.returncode != 0 and "401" in out.stderr and "revoked" in out.stderr, out.stdout + out.stderr
        out = agent("renew", "--dir", str(d), "--force")
        assert out.returncode != 0 and "revoked" in out.stderr, out.stdout + out.stderr
        assert serial_of(current_cert(d)) == revoked  # nothing installed
    finally:
        if daemon is not None:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)
        stop_server(server)


def test_agent_over_acme_renews_unattended_with_replaces(tmp_path):
    """The same over ACME: enroll with an enrollment token (EAB) and the pinned root fingerprint
    (trust bootstrap over HTTPS), then the daemon renews by itself at least twice, each renewal a
    new order with `replaces`, the hook runs and each certificate checks in over mTLS; a revoked
    certificate is refused at the mTLS listener and the account orders its replacement."""
    import sqlite3
    https, mtls_port, http01 = free_port(), free_port(), free_port()
    env = {"SCEPD_CA_DEFAULT_VALIDITY": VALIDITY, "SCEPD_SERVER_MTLS": f"127.0.0.1:{mtls_port}",
           "SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}", "SCEPD_ACME_HTTP01_PORT": str(http01),
           "SCEPD_ACME_RESOLVE": "*=127.0.0.1", "SCEPD_ACME_EAB_REQUIRED": "1"}
    server = start_server(tmp_path / "server", env)
    d = tmp_path / "agent"
    hook_log = tmp_path / "hook.log"
    daemon_log = tmp_path / "agent.log"
    daemon = None
    try:
        fp = hashlib.sha256(x509.load_pem_x509_certificate(server.root_pem.read_bytes()).public_bytes(
            serialization.Encoding.DER)).hexdigest()
        created = server.scepd("eab", "create", "--identifiers", "*.lab.test", "--ttl", "1h")
        kid, hmac_key = created.split("kid: ")[1].split()[0], created.split("hmac: ")[1].split()[0]
        directory = f"https://127.0.0.1:{https}/acme/directory"
        out = agent("enroll", "--dir", str(d), "--protocol", "acme", "--server", directory,
                    "--cn", "agent-2.lab.test", "--eab-kid", kid, "--eab-hmac", hmac_key, "--ca-fingerprint", fp,
                    "--http01-address", "127.0.0.1", "--http01-port", str(http01),
                    "--mtls-url", f"https://127.0.0.1:{mtls_port}")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "checked in over mTLS" in out.stdout
        first = server.verify(d / "cert.pem", d / "key.pem")
        assert (os.stat(d / "account-key.pem").st_mode & 0o077) == 0
        # a wrong fingerprint is refused before anything is sent
        out = agent("enroll", "--dir", str(tmp_path / "other"), "--protocol", "acme", "--server", directory,
                    "--cn", "x.lab.test", "--eab-kid", kid, "--eab-hmac", hmac_key, "--ca-fingerprint", "00" * 32)
        assert out.returncode != 0 and "fingerprint" in out.stderr, out.stdout + out.stderr

        daemon, hooked = run_until_two_renewals(server, d, first, hook_log, daemon_log)
        with sqlite3.connect(server.state_dir / "scepd.db") as db:
            replaced = {r[0] for r in db.execute("SELECT replaced_serial FROM acme_replacements")}
        assert serial_of(first) in replaced  # each renewal's order named the certificate it replaces
        records = {c["serial"]: c for c in json.loads(server.scepd("certs", "list", "--json"))}
        assert all(records[s]["protocol"] == "acme" for s in hooked)
        wait_for(lambda: all(f"checked in over mTLS as serial {s}" in daemon_log.read_text() for s in hooked),
                 30, "a check-in with every renewed certificate", (daemon_log,), daemon)
        out = agent("status", "--dir", str(d), "--json")
        report = json.loads(out.stdout)
        assert report["protocol"] == "acme" and report["acme_account"].startswith(f"https://127.0.0.1:{https}/acme/acct/")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
        daemon = None
        assert "Traceback" not in daemon_log.read_text()

        # revocation: refused at mTLS; the account (not the certificate) authorises the next order
        revoked = serial_of(current_cert(d))
        server.scepd("certs", "revoke", revoked, "--reason", "keyCompromise")
        out = agent("checkin", "--dir", str(d))
        assert out.returncode != 0 and "401" in out.stderr, out.stdout + out.stderr
        out = agent("renew", "--dir", str(d), "--force")
        assert out.returncode == 0, out.stdout + out.stderr
        assert serial_of(current_cert(d)) != revoked
        out = agent("checkin", "--dir", str(d))
        assert out.returncode == 0, out.stdout + out.stderr
        # the operator deactivates the account: no more orders
        accounts = json.loads(server.scepd("acme", "accounts", "--json"))
        assert [(a["eab_kid"], a["identifiers"], a["status"]) for a in accounts] == [(kid, "*.lab.test", "valid")]
        server.scepd("acme", "deactivate", accounts[0]["id"])
        out = agent("renew", "--dir", str(d), "--force")
        assert out.returncode != 0 and "unauthorized" in out.stderr, out.stdout + out.stderr
    finally:
        if daemon is not None:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)
        stop_server(server)


IDLE_RSS_LIMIT_KB = 30 * 1024  # issue 13: the agent idle below 30 MB
IDLE_WINDOW = 2.0  # seconds watched between two checks (the next one is about a minute away)


def _proc_status(pid: int, task: int | None = None) -> dict[str, str]:
    path = Path(f"/proc/{pid}/status") if task is None else Path(f"/proc/{pid}/task/{task}/status")
    return dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)


def _tree(pid: int) -> list[int]:
    """pid and its descendants (every thread's children)."""
    out = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
            out += _tree(int(child))
    return out


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wakeups(pid: int) -> int:
    """Context switches of every thread: a sleeping thread that never wakes adds none."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        st = _proc_status(pid, int(task))
        total += int(st["voluntary_ctxt_switches"]) + int(st["nonvoluntary_ctxt_switches"])
    return total


def test_agent_daemon_idles_under_30mb_with_one_thread_and_no_cpu(tmp_path):
    """`scepd-agent run` against a real server: the first check renews (the certificate enrolled
    under a 3-minute validity is inside --renew-before 10m; the server now issues 90-day ones), runs
    the hook and checks in over mTLS; then, until the next check a minute later, the daemon's whole
    process tree is under 30 MB resident, one process with one thread, and it neither uses CPU
    (utime+stime unchanged) nor wakes up (context switches unchanged) while watched for 2 s."""
    mtls_port = free_port()
    env = {"SCEPD_SERVER_MTLS": f"127.0.0.1:{mtls_port}"}
    server = start_server(tmp_path / "server", {**env, "SCEPD_CA_DEFAULT_VALIDITY": VALIDITY})
    d = tmp_path / "agent"
    hook_log, daemon_log = tmp_path / "hook.log", tmp_path / "agent.log"
    daemon = None
    try:
        fp = hashlib.sha256(x509.load_pem_x509_certificate(server.root_pem.read_bytes()).public_bytes(
            serialization.Encoding.DER)).hexdigest()
        out = agent("enroll", "--dir", str(d), "--server", server.url, "--cn", "agent-idle",
                    "--challenge", server.challenge, "--ca-fingerprint", fp,
                    "--mtls-url", f"https://127.0.0.1:{mtls_port}")
        assert out.returncode == 0, out.stdout + out.stderr
        first = current_cert(d)
        stop_server(server)
        server = start_server(tmp_path / "server", env, port=server.port)  # 90-day certificates now

        daemon = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--dir", str(d), "--interval", "1m", "--renew-before", "10m",
             "--on-renew", f'echo "$SCEPD_AGENT_SERIAL" >> {hook_log}'],
            stdout=open(daemon_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: state(d).get("last_check", {}).get("action") == "renew"
                 and state(d).get("last_checkin", {}).get("ok") and "next check at" in daemon_log.read_text(),
                 120, "the first check (a renewal) to complete", (daemon_log, server.log), daemon)
        renewed = current_cert(d)
        assert state(d)["last_check"]["result"] == "ok" and renewed.serial_number != first.serial_number
        assert hook_log.read_text().split() == [serial_of(renewed)]

        pid = daemon.pid
        tree = _tree(pid)
        rss_kb = sum(int(_proc_status(p)["VmRSS"].split()[0]) for p in tree)
        threads = os.listdir(f"/proc/{pid}/task")
        ticks, wakeups = _cpu_ticks(pid), _wakeups(pid)
        time.sleep(IDLE_WINDOW)  # the idle window being measured, not a synchronisation
        idle_ticks, idle_wakeups = _cpu_ticks(pid) - ticks, _wakeups(pid) - wakeups
        figures = (f"idle: tree {tree}, VmRSS {rss_kb} kB, threads {len(threads)}, "
                   f"{idle_ticks} CPU ticks and {idle_wakeups} context switches in {IDLE_WINDOW} s")
        print(figures)
        assert tree == [pid], figures  # no check process left behind
        assert rss_kb < IDLE_RSS_LIMIT_KB, figures
        assert threads == [str(pid)], figures
        assert idle_ticks == 0 and idle_wakeups == 0, figures
        assert daemon_log.read_text().count("check: ") == 1, daemon_log.read_text()  # still before the next check

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
        daemon = None
        log_text = daemon_log.read_text()
        assert "Traceback" not in log_text and log_text.rstrip().endswith("stopped"), log_text
    finally:
        if daemon is not None:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)
        stop_server(server)
