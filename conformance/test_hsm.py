"""Stock clients against a `scepd serve` whose CA key is in a PKCS#11 token (SoftHSM2, issue 16):
strongSwan pki (AES, SHA-256), micromdm scepclient (single DES, SHA-1: the CertRep is signed
in the token with the client's digest) and sscep (3DES, SHA-1; when on PATH) enroll; lego
issues over ACME (http-01); openssl checks OCSP and the CRL, both signed in
the token, before and after a revocation made by another process; a rollover to a new token key
while the server runs (SIGHUP)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request

import pytest
from cryptography import x509

from scepd.ca import pki
from scepd.scep import wire
from tests import softhsm

from .conftest import free_port, require, run, start_server, stop_server
from .test_acme import _lego
from .test_reload import _reload
from .test_ocsp_crl import _enroll_with_pki, _ocsp
from .test_sscep import _csr, _getca


@pytest.fixture(scope="module")
def hsm_server(tmp_path_factory):
    hsm = softhsm.shared(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("hsm-serve")
    out = subprocess.run([sys.executable, "-m", "scepd", "init", "--state-dir", str(tmp / "state"),
                          "--insecure-unencrypted-root-key", "--ca-key-uri", hsm.uri("scepd-misc", "serve-ca")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not (tmp / "state" / "ca" / "ca.key").exists()
    https, http01 = free_port(), free_port()
    # two forked workers: each opens its own token session (none is inherited from the parent,
    # which loaded the CA before forking)
    s = start_server(tmp, {"SCEPD_SCEP_LEGACY_ALGORITHMS": "1", "SCEPD_SERVER_WORKERS": "2",
                           "SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}",
                           "SCEPD_ACME_HTTP01_PORT": str(http01), "SCEPD_ACME_RESOLVE": "*=127.0.0.1"})
    s.env["SCEPD_SERVER_HTTP"] = f"127.0.0.1:{s.port}"
    s.directory, s.http01, s.records = f"https://127.0.0.1:{https}/acme/directory", http01, tmp / "dns.json"
    yield s
    stop_server(s)
    assert "2 workers started" in s.log_text()


def test_strongswan_enrolls_and_openssl_checks_ocsp_and_crl(hsm_server, tmp_path):
    cert, serial = _enroll_with_pki(hsm_server, tmp_path, "hsm-strongswan")
    assert f"{cert}: good" in _ocsp(hsm_server, ["-cert", cert], tmp_path)
    hsm_server.scepd("certs", "revoke", serial, "--reason", "keyCompromise")  # another process
    out = _ocsp(hsm_server, ["-cert", cert], tmp_path)
    assert f"{cert}: revoked" in out and "Reason: keyCompromise" in out
    ca_id = pki.ca_id_of(x509.load_pem_x509_certificate(hsm_server.ca_pem.read_bytes()))
    with urllib.request.urlopen(f"http://127.0.0.1:{hsm_server.port}/crl/{ca_id}.crl", timeout=30) as resp:
        (tmp_path / "crl.der").write_bytes(resp.read())
    out = run(["openssl", "crl", "-inform", "DER", "-in", tmp_path / "crl.der", "-CAfile", hsm_server.ca_pem,
               "-noout", "-text"])
    assert out.returncode == 0 and "verify OK" in out.stdout + out.stderr, out.stdout + out.stderr
    crl = x509.load_der_x509_crl((tmp_path / "crl.der").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None


def test_scepclient_des_sha1_enrolls(hsm_server, tmp_path):
    binary = require("scepclient")
    out = run([binary, "-server-url", hsm_server.url, "-challenge", hsm_server.new_challenge(), "-cn",
               "hsm-scepclient", "-private-key", tmp_path / "key.pem", "-certificate", tmp_path / "cert.pem"],
              cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    hsm_server.verify(tmp_path / "cert.pem", tmp_path / "key.pem")


@pytest.mark.skipif(shutil.which("sscep") is None, reason="sscep is not on PATH")
def test_sscep_enrolls_3des_sha1(hsm_server, tmp_path):
    ca = _getca(hsm_server, tmp_path)
    _csr(tmp_path, "hsm-sscep", hsm_server.new_challenge())
    out = run(["sscep", "enroll", "-u", hsm_server.url, "-c", ca, "-k", tmp_path / "key.pem",
               "-r", tmp_path / "req.csr", "-l", tmp_path / "cert.pem", "-E", "3des", "-S", "sha1",
               "-t", "1", "-n", "3", "-v"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    hsm_server.verify(tmp_path / "cert.pem", tmp_path / "key.pem")


def test_lego_issues_over_acme(hsm_server, tmp_path):
    """ACME over the HTTPS listener, whose TLS certificate the token-backed CA issued too."""
    out = _lego(hsm_server, tmp_path, "run", domains=("hsm.example.test",))
    assert out.returncode == 0, out.stdout + out.stderr
    certs = tmp_path / "lego" / "certificates"
    hsm_server.verify(certs / "hsm.example.test.crt", certs / "hsm.example.test.key")


def test_rollover_to_a_new_token_key_with_sighup(tmp_path_factory, tmp_path):
    """The running server (two workers) publishes the next CA, made in the token by `scepd ca
    rollover --next-key-uri` with the root key in the token too, after SIGHUP (GetNextCACert
    signed in the token, verified by openssl cms), and issues from it after `ca activate-next`
    and another SIGHUP (strongSwan pki)."""
    hsm = softhsm.shared(tmp_path_factory)
    tmp = tmp_path / "srv"
    out = subprocess.run([sys.executable, "-m", "scepd", "init", "--state-dir", str(tmp / "state"),
                          "--ca-key-uri", hsm.uri("scepd-roll", "serve-ca"),
                          "--root-key-uri", hsm.uri("scepd-roll", "serve-root")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    srv = start_server(tmp, {"SCEPD_SERVER_WORKERS": "2"})
    try:
        pid = srv.proc.pid
        srv.scepd("ca", "rollover", "--next-key-uri", hsm.uri("scepd-roll", "serve-next"))
        _reload(srv)
        with urllib.request.urlopen(f"{srv.url}?operation=GetNextCACert", timeout=30) as resp:
            (tmp_path / "next.p7").write_bytes(resp.read())
        out = run(["openssl", "cms", "-verify", "-inform", "DER", "-in", tmp_path / "next.p7",
                   "-CAfile", srv.root_pem, "-purpose", "any", "-out", tmp_path / "inner.der"])
        assert out.returncode == 0, out.stdout + out.stderr
        next_pem = srv.state_dir / "ca" / "next" / "ca.pem"
        nxt = x509.load_pem_x509_certificate(next_pem.read_bytes())
        assert wire.certs_from_certs_only((tmp_path / "inner.der").read_bytes()) == [nxt]

        srv.scepd("ca", "activate-next")
        _reload(srv)
        assert (srv.state_dir / "ca" / "ca.key.uri").read_text().strip() == hsm.uri("scepd-roll", "serve-next")
        cert, _serial = _enroll_with_pki(srv, tmp_path, "after-hsm-rollover")  # verified against the new ca.pem
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        assert leaf.issuer == nxt.subject
        leaf.verify_directly_issued_by(nxt)
        assert srv.proc.pid == pid and srv.proc.poll() is None
    finally:
        stop_server(srv)
