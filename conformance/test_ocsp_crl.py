"""Revocation status against a real `scepd serve`: `openssl ocsp`, `openssl crl`, `openssl verify
-crl_check`, and the admin API with curl and an admin client certificate.

Certificates come from a real SCEP client (strongSwan pki) and from `scepd admin issue-cert`;
revocations are made by the `scepd certs revoke` CLI, a separate process, so the server has to
notice them on its own.
"""
from __future__ import annotations

import json
import re
import shutil
import urllib.request

import pytest
from cryptography import x509

from .conftest import free_port, require, run, start_server, stop_server


@pytest.fixture(scope="module")
def status_server(tmp_path_factory):
    https_port = free_port()
    s = start_server(tmp_path_factory.mktemp("ocsp-crl"), {"SCEPD_SERVER_HTTPS": f"127.0.0.1:{https_port}",
                                                           "SCEPD_SERVER_LOG_FORMAT": "json"})
    s.https_port = https_port  # type: ignore[attr-defined]
    # CLI commands see the same configuration as the server (base URL of CRL/OCSP in certificates)
    s.env["SCEPD_SERVER_HTTP"] = f"127.0.0.1:{s.port}"
    yield s
    stop_server(s)


def _admin_cert(server, tmp_path, cn: str):
    cert, key = tmp_path / f"{cn}.pem", tmp_path / f"{cn}.key"
    out = server.scepd("admin", "issue-cert", "--cn", cn, "--out-cert", str(cert), "--out-key", str(key))
    serial = re.search(r"admin certificate ([0-9a-f]+)", out).group(1)
    server.verify(cert, key)
    return cert, key, serial


def _ocsp(server, cert_args: list, tmp_path) -> str:
    openssl = require("openssl")
    out = run([openssl, "ocsp", "-issuer", server.ca_pem, *cert_args, "-url",
               f"http://127.0.0.1:{server.port}/ocsp", "-CAfile", server.root_pem, "-nonce"], cwd=tmp_path)
    assert "Response verify OK" in out.stdout + out.stderr, out.stdout + out.stderr
    return out.stdout


def _enroll_with_pki(server, tmp_path, cn: str):
    pki = require("pki")
    out = run([pki, "--scepca", "--url", server.url, "--caout", tmp_path / "ca.pem", "--outform", "pem"],
              cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    key = tmp_path / f"{cn}.key"
    key.write_text(run([pki, "--gen", "--type", "rsa", "--size", "2048", "--outform", "pem"]).stdout)
    out = run([pki, "--scep", "--url", server.url, "--in", key, "--dn", f"CN={cn}", "--password",
               server.new_challenge(), "--cacert-enc", tmp_path / "ca-1.pem", "--cacert-sig",
               tmp_path / "ca-1.pem", "--cacert", tmp_path / "ca.pem", "--outform", "pem"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cert = tmp_path / f"{cn}.pem"
    cert.write_text(out.stdout)
    return cert, format(server.verify(cert, key).serial_number, "x")


def test_openssl_ocsp_good_revoked_unknown(status_server, tmp_path):
    cert, serial = _enroll_with_pki(status_server, tmp_path, "ocsp-device")
    out = _ocsp(status_server, ["-cert", cert], tmp_path)
    assert f"{cert}: good" in out
    status_server.scepd("certs", "revoke", serial, "--reason", "keyCompromise")  # another process
    out = _ocsp(status_server, ["-cert", cert], tmp_path)
    assert f"{cert}: revoked" in out and "Reason: keyCompromise" in out
    out = _ocsp(status_server, ["-serial", "0x1234567890abcdef"], tmp_path)
    assert "0x1234567890abcdef: unknown" in out


def test_crl_from_distribution_point_and_verify_crl_check(status_server, tmp_path):
    good, _key, _ = _admin_cert(status_server, tmp_path, "crl-good")
    bad, _key2, bad_serial = _admin_cert(status_server, tmp_path, "crl-bad")
    status_server.scepd("certs", "revoke", bad_serial, "--reason", "superseded")
    leaf = x509.load_pem_x509_certificate(bad.read_bytes())
    url = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
    assert url.startswith(f"http://127.0.0.1:{status_server.port}/crl/")
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.headers["Content-Type"] == "application/pkix-crl"
        (tmp_path / "crl.der").write_bytes(resp.read())
    openssl = require("openssl")
    out = run([openssl, "crl", "-inform", "DER", "-in", tmp_path / "crl.der", "-out", tmp_path / "crl.pem",
               "-CAfile", status_server.ca_pem, "-text"])
    assert out.returncode == 0 and "verify OK" in out.stderr + out.stdout, out.stdout + out.stderr
    assert "Superseded" in (tmp_path / "crl.pem").read_text()  # -text goes to -out with the PEM
    base = [openssl, "verify", "-crl_check", "-CAfile", status_server.root_pem, "-untrusted", status_server.ca_pem,
            "-CRLfile", tmp_path / "crl.pem"]
    ok = run(base + [good])
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    refused = run(base + [bad])
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr


def test_admin_api_with_client_certificate_and_token(status_server, tmp_path):
    curl = require("curl")
    cert, key, _ = _admin_cert(status_server, tmp_path, "alice")
    base = f"https://127.0.0.1:{status_server.https_port}/api/v1/admin"
    out = run([curl, "-sS", "--cacert", status_server.root_pem, "--cert", cert, "--key", key,
               "-w", "\n%{http_code}", f"{base}/whoami"])
    assert out.stdout.rstrip().endswith("200") and "cert:" in out.stdout, out.stdout + out.stderr
    token = status_server.scepd("admin", "token", "create", "--name", "conformance").strip()
    out = run([curl, "-sS", "--cacert", status_server.root_pem, "-H", f"Authorization: Bearer {token}",
               "-X", "POST", "-H", "Content-Type: application/json", "-d", '{"ttl": "5m"}',
               "-w", "\n%{http_code}", f"{base}/challenges"])
    assert out.stdout.rstrip().endswith("201"), out.stdout + out.stderr
    out = run([curl, "-sS", "--cacert", status_server.root_pem, "-w", "\n%{http_code}", f"{base}/whoami"])
    assert out.stdout.rstrip().endswith("401")
    events = status_server.scepd("audit", "list", "--event", "admin.token.created")
    assert "conformance" in events


def test_metrics_and_readyz(status_server):
    with urllib.request.urlopen(f"http://127.0.0.1:{status_server.port}/readyz", timeout=30) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{status_server.port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    assert "scepd_certificates_active" in text and 'scepd_certificates_expiring{within_days="30"}' in text
    assert re.search(r'scepd_ocsp_responses_total\{status="revoked"\} [1-9]', text)


def test_json_logs_carry_transaction_id_and_no_secrets(status_server, tmp_path):
    challenge = status_server.new_challenge()
    _cert, _serial = _enroll_with_pki(status_server, tmp_path, "logged-device")
    lines = [line for line in status_server.log_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    scep = [r for r in records if r["logger"].startswith("scepd.scep") or "protocol=scep" in r["message"]]
    assert scep and all(r.get("transaction_id") and r.get("request_id") for r in scep), scep
    assert status_server.challenge not in status_server.log_text() and challenge not in status_server.log_text()


@pytest.mark.skipif(shutil.which("sscep") is None, reason="sscep is not on PATH (not packaged for Debian)")
def test_sscep_getcrl_matches_published_crl(status_server, tmp_path):
    """sscep getcrl (SCEP GetCRL, messageType 22) gets the same CRL the CDP URL serves."""
    sscep = shutil.which("sscep")
    cert, serial = _enroll_with_pki(status_server, tmp_path, "getcrl-device")
    status_server.scepd("certs", "revoke", serial, "--reason", "affiliationChanged")
    out = run([sscep, "getca", "-u", status_server.url, "-c", tmp_path / "ca.crt"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    out = run([sscep, "getcrl", "-u", status_server.url, "-c", tmp_path / "ca.crt-0", "-k",
               tmp_path / "getcrl-device.key", "-l", cert, "-w", tmp_path / "crl.pem"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    url = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert x509.load_der_x509_crl(resp.read()) == crl
