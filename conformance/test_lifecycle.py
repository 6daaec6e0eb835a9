"""SCEP lifecycle with real clients: renewal, GetCert, PENDING + approval + polling, restarts."""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from .conftest import require, run, start_server, stop_server
from .test_certmonger import SCRIPT as CM_REQUEST_SCRIPT, certmonger_session

needs_sscep = pytest.mark.skipif(shutil.which("sscep") is None, reason="sscep is not on PATH")


def _csr(tmp_path, stem, cn, challenge=None):
    cnf = tmp_path / f"{stem}.cnf"
    attrs = f"attributes=attrs\n[dn]\nCN={cn}\n[attrs]\nchallengePassword={challenge}\n" if challenge \
        else f"[dn]\nCN={cn}\n"
    cnf.write_text("[req]\nprompt=no\ndistinguished_name=dn\n" + attrs)
    out = run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", tmp_path / f"{stem}.key",
               "-out", tmp_path / f"{stem}.csr", "-config", cnf])
    assert out.returncode == 0, out.stderr


def _sscep_enroll(srv, tmp_path, stem, *extra, n=3):
    return run(["sscep", "enroll", "-u", srv.url, "-c", tmp_path / "ca.crt-0", "-k", tmp_path / f"{stem}.key",
                "-r", tmp_path / f"{stem}.csr", "-l", tmp_path / f"{stem}.crt", "-t", "1", "-n", str(n), *extra],
               cwd=tmp_path)


def _getca(srv, tmp_path):
    out = run(["sscep", "getca", "-u", srv.url, "-c", tmp_path / "ca.crt"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_sscep
def test_sscep_renewal_without_challenge_and_revoked_signer(server, tmp_path):
    _getca(server, tmp_path)
    _csr(tmp_path, "old", "sscep-renew", server.new_challenge())
    assert _sscep_enroll(server, tmp_path, "old").returncode == 0
    old = server.verify(tmp_path / "old.crt", tmp_path / "old.key")
    _csr(tmp_path, "new", "sscep-renew")  # no challenge: the old certificate authenticates
    out = _sscep_enroll(server, tmp_path, "new", "-K", tmp_path / "old.key", "-O", tmp_path / "old.crt")
    assert out.returncode == 0, out.stdout + out.stderr
    new = server.verify(tmp_path / "new.crt", tmp_path / "new.key")
    assert new.serial_number != old.serial_number
    audit = server.scepd("audit", "list", "--limit", "5")
    assert '"certificate.renewed"' in audit
    # once revoked, the old certificate authorizes nothing
    server.scepd("certs", "revoke", format(old.serial_number, "x"), "--reason", "keyCompromise")
    _csr(tmp_path, "third", "sscep-renew")
    out = _sscep_enroll(server, tmp_path, "third", "-K", tmp_path / "old.key", "-O", tmp_path / "old.crt", n=1)
    assert out.returncode == 72, out.stdout + out.stderr  # 70 + failInfo badRequest
    assert not (tmp_path / "third.crt").exists()


@needs_sscep
def test_sscep_getcert(server, tmp_path):
    _getca(server, tmp_path)
    _csr(tmp_path, "dev", "sscep-getcert", server.new_challenge())
    assert _sscep_enroll(server, tmp_path, "dev").returncode == 0
    cert = server.verify(tmp_path / "dev.crt")
    out = run(["sscep", "getcert", "-u", server.url, "-c", tmp_path / "ca.crt-0", "-k", tmp_path / "dev.key",
               "-l", tmp_path / "dev.crt", "-s", str(cert.serial_number), "-w", tmp_path / "fetched.crt"],
              cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert server.verify(tmp_path / "fetched.crt") == cert
    out = run(["sscep", "getcert", "-u", server.url, "-c", tmp_path / "ca.crt-0", "-k", tmp_path / "dev.key",
               "-l", tmp_path / "dev.crt", "-s", "12345", "-w", tmp_path / "none.crt"], cwd=tmp_path)
    assert out.returncode == 74, out.stdout + out.stderr  # 70 + failInfo badCertId


@pytest.fixture(scope="module")
def approval_server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("approval"), {"SCEPD_SCEP_REQUIRE_APPROVAL": "1"})
    yield s
    stop_server(s)


def _pending_ids(srv) -> list[int]:
    return [p["id"] for p in json.loads(srv.scepd("pending", "list", "--json"))]


@needs_sscep
def test_sscep_pending_then_approved_while_polling(approval_server, tmp_path):
    srv = approval_server
    _getca(srv, tmp_path)
    _csr(tmp_path, "dev", "sscep-pending", srv.new_challenge())
    before = set(_pending_ids(srv))
    proc = subprocess.Popen(["sscep", "enroll", "-u", srv.url, "-c", str(tmp_path / "ca.crt-0"),
                             "-k", str(tmp_path / "dev.key"), "-r", str(tmp_path / "dev.csr"),
                             "-l", str(tmp_path / "dev.crt"), "-t", "1", "-n", "20"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        new = []
        for _ in range(30):
            new = sorted(set(_pending_ids(srv)) - before)
            if new:
                break
            time.sleep(0.5)
        assert len(new) == 1, "the request never became pending"
        assert "approved" in srv.scepd("pending", "approve", str(new[0]))
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    srv.verify(tmp_path / "dev.crt", tmp_path / "dev.key")


@needs_sscep
def test_pending_survives_server_restart(tmp_path):
    srv = start_server(tmp_path, {"SCEPD_SCEP_REQUIRE_APPROVAL": "1"})
    try:
        _getca(srv, tmp_path)
        _csr(tmp_path, "dev", "sscep-restart", srv.new_challenge())
        out = _sscep_enroll(srv, tmp_path, "dev", n=1)
        assert out.returncode == 3, out.stdout + out.stderr  # sscep: still pending
        [pending_id] = _pending_ids(srv)
    finally:
        stop_server(srv)
    srv = start_server(tmp_path, {"SCEPD_SCEP_REQUIRE_APPROVAL": "1"}, port=srv.port)
    try:
        srv.scepd("pending", "approve", str(pending_id))
        out = _sscep_enroll(srv, tmp_path, "dev")  # same key, same transaction: resumes
        assert out.returncode == 0, out.stdout + out.stderr
        srv.verify(tmp_path / "dev.crt", tmp_path / "dev.key")
    finally:
        stop_server(srv)


@needs_sscep
def test_sscep_rejected_request_fails(approval_server, tmp_path):
    srv = approval_server
    _getca(srv, tmp_path)
    _csr(tmp_path, "dev", "sscep-rejected", srv.new_challenge())
    before = set(_pending_ids(srv))
    assert _sscep_enroll(srv, tmp_path, "dev", n=1).returncode == 3
    [pid] = sorted(set(_pending_ids(srv)) - before)
    srv.scepd("pending", "reject", str(pid), "--reason", "not in the asset list")
    out = _sscep_enroll(srv, tmp_path, "dev", n=1)
    assert out.returncode == 72, out.stdout + out.stderr


@pytest.fixture(scope="module")
def same_key_server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("samekey"), {"SCEPD_SCEP_LEGACY_ALGORITHMS": "1",
                                                         "SCEPD_SCEP_RENEWAL_SAME_KEY": "1"})
    yield s
    stop_server(s)


def test_scepclient_renewalreq(same_key_server, tmp_path):
    binary = require("scepclient")
    srv = same_key_server
    args = [binary, "-server-url", srv.url, "-cn", "scepclient-renew", "-private-key", tmp_path / "key.pem",
            "-certificate", tmp_path / "cert.pem"]
    out = run(args + ["-challenge", srv.new_challenge()], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    first = srv.verify(tmp_path / "cert.pem", tmp_path / "key.pem")
    shutil.copy(tmp_path / "cert.pem", tmp_path / "first.pem")
    out = run(args, cwd=tmp_path)  # existing certificate: RenewalReq (17), no challenge
    assert out.returncode == 0, out.stdout + out.stderr
    second = srv.verify(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert second.serial_number != first.serial_number
    assert '"certificate.renewed"' in srv.scepd("audit", "list", "--limit", "3")


CM_REKEY = CM_REQUEST_SCRIPT + """getcert rekey -s -i r1 -w --wait-timeout 60 -v
getcert list -s -i r1
"""


def _certmonger(_srv, work, script):
    return certmonger_session(work, script)


def test_certmonger_rekey_renews(server, tmp_path):
    script = CM_REKEY.format(url=server.url, dir=tmp_path, challenge=server.new_challenge(), cn="cm-rekey",
                             dn_rest="")
    out = _certmonger(server, tmp_path, script)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("status: MONITORING") >= 2, out.stdout + out.stderr
    cert = server.verify(tmp_path / "cert.pem", tmp_path / "key.pem")
    listed = json.loads(server.scepd("certs", "list", "--json"))
    mine = [c for c in listed if c["subject"] == "CN=cm-rekey"]
    assert len(mine) == 2 and format(cert.serial_number, "x") in {c["serial"] for c in mine}
    assert '"certificate.renewed"' in server.scepd("audit", "list", "--limit", "5")


CM_PENDING = """set -u
getcert add-scep-ca -s -c T -u '{url}' || exit 3
for i in $(seq 1 80); do getcert list-cas -s -c T | grep -q thumbprint && break; sleep 0.25; done
getcert request -s -c T -I r1 -f {dir}/cert.pem -k {dir}/key.pem -L '{challenge}' -N 'CN={cn}'
for i in $(seq 1 120); do test -e {dir}/approved && break; sleep 0.5; done
getcert resubmit -s -i r1 -w --wait-timeout 60 -v
getcert list -s -i r1
"""


def test_certmonger_waits_for_approval(approval_server, tmp_path):
    srv = approval_server
    script = CM_PENDING.format(url=srv.url, dir=tmp_path, challenge=srv.new_challenge(), cn="cm-pending")
    before = set(_pending_ids(srv))
    import threading
    result = {}
    t = threading.Thread(target=lambda: result.update(out=_certmonger(srv, tmp_path, script)))
    t.start()
    try:
        new = []
        for _ in range(60):
            new = sorted(set(_pending_ids(srv)) - before)
            if new:
                break
            time.sleep(0.5)
        assert len(new) == 1, "certmonger's request never became pending"
        srv.scepd("pending", "approve", str(new[0]))
        (tmp_path / "approved").touch()
    finally:
        (tmp_path / "approved").touch()
        t.join(timeout=220)
    out = result["out"]
    assert "status: MONITORING" in out.stdout, out.stdout + out.stderr
    srv.verify(tmp_path / "cert.pem", tmp_path / "key.pem")


def _prepared_rollover(tmp_path):
    """A real server with a next CA prepared by `scepd ca rollover` (published after a restart)."""
    env = {"SCEPD_ROOT_KEY_PASSPHRASE": "conformance-root-passphrase"}
    srv = start_server(tmp_path / "srv", env)
    srv.scepd("ca", "rollover")
    stop_server(srv)
    return start_server(tmp_path / "srv", env, port=srv.port)


def _chain_pem(srv, tmp_path):
    chain = tmp_path / "chain.pem"
    chain.write_bytes(srv.ca_pem.read_bytes() + srv.root_pem.read_bytes())
    return chain


def _der_of(pem_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    return x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(serialization.Encoding.DER)


def test_getnextca_reply_read_by_openssl_cms(tmp_path):
    """RFC 8894 §4.7.1 checked by an independent decoder: openssl verifies the outer SignedData
    against our root and its content, read as PKCS#7, lists the next CA."""
    srv = _prepared_rollover(tmp_path)
    try:
        reply = tmp_path / "next.p7"
        out = run(["curl", "-sS", "-o", reply, "-w", "%{http_code} %{content_type}",
                   f"{srv.url}?operation=GetNextCACert"])
        assert out.stdout == "200 application/x-x509-next-ca-cert", out.stdout + out.stderr
        content = tmp_path / "content.der"
        out = run(["openssl", "cms", "-verify", "-inform", "DER", "-in", reply, "-CAfile", srv.root_pem,
                   "-certfile", _chain_pem(srv, tmp_path), "-out", content, "-binary"])
        assert out.returncode == 0 and "Verification successful" in out.stderr, out.stderr
        out = run(["openssl", "pkcs7", "-inform", "DER", "-in", content, "-print_certs", "-out",
                   tmp_path / "next.pem"])
        assert out.returncode == 0, out.stderr
        assert _der_of(tmp_path / "next.pem") == _der_of(srv.state_dir / "ca" / "next" / "ca.pem")
    finally:
        stop_server(srv)


@needs_sscep
def test_sscep_getnextca(tmp_path):
    srv = _prepared_rollover(tmp_path)
    try:
        out = run(["sscep", "getnextca", "-u", srv.url, "-C", _chain_pem(srv, tmp_path), "-c",
                   tmp_path / "next.crt", "-v"], cwd=tmp_path)
        assert out.returncode == 0 and "signature ok" in out.stdout, out.stdout + out.stderr
        assert _der_of(tmp_path / "next.crt-0") == _der_of(srv.state_dir / "ca" / "next" / "ca.pem")
    finally:
        stop_server(srv)
