"""Conformance: EST (RFC 7030, RFC 8951) against a real `scepd serve` HTTPS listener on 127.0.0.1.

- strongSwan pki 5.9.8 (`pki --estca`, `pki --est --userpass`, `pki --est --cert --key` for
  simplereenroll with a new key, polling a request that waits for approval). Its TLS needs the
  openssl plugin (Debian libstrongswan-standard-plugins) for our ECDSA server certificate.
- curl + openssl: cacerts, simpleenroll with Basic and a base64 CSR, serverkeygen (multipart split
  here, the key checked against the certificate by openssl).
- Refusals: wrong password (401 + WWW-Authenticate), a spent one-time challenge (401), a revoked
  client certificate (401), an expired one (refused in the TLS handshake, before HTTP), names
  outside the challenge's scope (403), malformed base64 or CSR (400), an oversize body (413),
  an unknown label (404).
Every certificate is checked with `openssl verify` against our root and matched to its key.
"""
from __future__ import annotations

import base64
import datetime as dt
import email
import email.policy
import json
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .conftest import free_port, require, start_server, stop_server

pytestmark = pytest.mark.conformance


class EstServer:
    def __init__(self, server, port: int):
        self.server, self.port = server, port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def est(self, label: str = "") -> str:
        return f"{self.url}/.well-known/est/" + (f"{label}/" if label else "")


def _start(tmp: Path, **env: str) -> EstServer:
    port = free_port()
    srv = start_server(tmp, {"SCEPD_SERVER_HTTPS": f"127.0.0.1:{port}",
                             "SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                             "SCEPD_EST_LABELS": "servers=server", **env})
    return EstServer(srv, port)


@pytest.fixture(scope="module")
def est(tmp_path_factory):
    s = _start(tmp_path_factory.mktemp("est"))
    yield s
    stop_server(s.server)


def pki(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([require("pki"), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def curl(*args, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([require("curl"), "-sS", *map(str, args)], capture_output=True, timeout=timeout)


def openssl(*args, data: bytes | None = None) -> bytes:
    out = subprocess.run(["openssl", *map(str, args)], input=data, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def pki_key_and_csr(tmp: Path, name: str, dn: str, kind: str = "rsa") -> tuple[Path, Path]:
    key, csr = tmp / f"{name}.key", tmp / f"{name}.csr"
    gen = pki("--gen", "--type", kind, *(("--size", "256") if kind == "ecdsa" else ()), "--outform", "pem")
    assert gen.returncode == 0, gen.stderr
    key.write_text(gen.stdout)
    req = pki("--req", "--in", key, "--type", "priv", "--dn", dn, "--outform", "pem")
    assert req.returncode == 0, req.stderr
    csr.write_text(req.stdout)
    return key, csr


def openssl_csr(tmp: Path, name: str, cn: str, *sans: str) -> tuple[Path, bytes]:
    """(PEM key file, DER CSR) made by openssl req."""
    key = tmp / f"{name}.key"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
    extra = ("-addext", "subjectAltName=" + ",".join(f"DNS:{s}" for s in sans)) if sans else ()
    der = openssl("req", "-new", "-key", key, "-subj", f"/CN={cn}", *extra, "-outform", "DER")
    return key, der


def certs_from_base64(body: bytes, tmp: Path, name: str) -> Path:
    """openssl base64 -d | openssl pkcs7 -inform DER -print_certs, into name.pem."""
    der = openssl("base64", "-d", "-A", data=body)
    pem = openssl("pkcs7", "-inform", "DER", "-print_certs", data=der)
    out = tmp / f"{name}.pem"
    out.write_bytes(pem)
    return out


def curl_post(est: EstServer, op: str, body: bytes, tmp: Path, *auth: str, label: str = "",
              client: tuple[Path, Path] | None = None) -> tuple[int, dict, bytes]:
    data, head = tmp / "body.b64", tmp / "headers.txt"
    data.write_bytes(body)
    tls = ("--cert", client[0], "--key", client[1]) if client else ()
    out = curl("--cacert", est.server.root_pem, *tls, *auth, "-H", "Content-Type: application/pkcs10",
               "--data-binary", f"@{data}", "-D", head, est.est(label) + op)
    assert out.returncode == 0, out.stderr.decode()
    # the last header block (curl may have been answered 100 Continue first)
    lines = [b for b in head.read_bytes().decode("latin-1").split("\r\n\r\n") if b.strip()][-1].split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if ":" in line)}
    return status, headers, out.stdout


# --- strongSwan pki ---------------------------------------------------------------------------------

def test_pki_estca_fetches_the_chain(est, tmp_path):
    out = pki("--estca", "--url", est.url, "--cacert", est.server.root_pem, "--caout", tmp_path / "ca.pem",
              "--outform", "pem", "--force")
    assert out.returncode == 0, out.stderr
    root = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    issuing = x509.load_pem_x509_certificate((tmp_path / "ca-1.pem").read_bytes())
    assert root == x509.load_pem_x509_certificate(est.server.root_pem.read_bytes())
    assert issuing == x509.load_pem_x509_certificate(est.server.ca_pem.read_bytes())


def test_pki_est_enrolls_with_a_one_time_challenge_then_reenrolls_with_a_new_key(est, tmp_path):
    srv = est.server
    challenge = srv.new_challenge()
    key1, csr1 = pki_key_and_csr(tmp_path, "first", "CN=pki-est.example")
    out = pki("--est", "--url", est.url, "--cacert", srv.root_pem, "--cacert", srv.ca_pem, "--in", csr1,
              "--userpass", f"device:{challenge}", "--outform", "pem")
    assert out.returncode == 0, out.stderr
    (tmp_path / "first.pem").write_text(out.stdout)
    first = srv.verify(tmp_path / "first.pem", key1)
    assert first.subject.rfc4514_string() == "CN=pki-est.example"

    # the spent one-time challenge: HTTP 401
    _key, csr_again = pki_key_and_csr(tmp_path, "again", "CN=pki-est-2.example")
    out = pki("--est", "--url", est.url, "--cacert", srv.root_pem, "--in", csr_again,
              "--userpass", f"device:{challenge}")
    assert out.returncode != 0 and "HTTP 401" in out.stderr, out.stderr

    # simplereenroll: TLS client authentication with the old certificate and key, a new ECDSA key
    key2, csr2 = pki_key_and_csr(tmp_path, "second", "CN=pki-est.example", kind="ecdsa")
    out = pki("--est", "--url", est.url, "--cacert", srv.root_pem, "--cacert", srv.ca_pem, "--in", csr2,
              "--cert", tmp_path / "first.pem", "--key", key1, "--outform", "pem")
    assert out.returncode == 0, out.stderr
    (tmp_path / "second.pem").write_text(out.stdout)
    second = srv.verify(tmp_path / "second.pem", key2)
    assert second.subject == first.subject and second.serial_number != first.serial_number
    shown = json.loads(srv.scepd("certs", "show", format(second.serial_number, "x")))
    assert shown["protocol"] == "est", shown
    audit = srv.scepd("audit", "list")
    assert "certificate.renewed" in audit and format(first.serial_number, "x") in audit

    # the same key again: a new key is required (403)
    out = pki("--est", "--url", est.url, "--cacert", srv.root_pem, "--in", csr2,
              "--cert", tmp_path / "second.pem", "--key", key2)
    assert out.returncode != 0 and "HTTP 403" in out.stderr, out.stderr

    # revoked: the certificate authenticates nothing any more (401)
    srv.scepd("certs", "revoke", format(second.serial_number, "x"), "--reason", "keyCompromise")
    _key3, csr3 = pki_key_and_csr(tmp_path, "third", "CN=pki-est.example", kind="ecdsa")
    out = pki("--est", "--url", est.url, "--cacert", srv.root_pem, "--in", csr3,
              "--cert", tmp_path / "second.pem", "--key", key2)
    assert out.returncode != 0 and "HTTP 401" in out.stderr, out.stderr


def test_an_expired_client_certificate_is_refused_in_the_tls_handshake(est, tmp_path):
    """Signed by our issuing CA, expired: OpenSSL on the HTTPS listener refuses it before any
    HTTP (the listener's rule, scepd/http/tls.py); nothing is issued."""
    srv = est.server
    ca_key = serialization.load_pem_private_key((srv.state_dir / "ca" / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate(srv.ca_pem.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired.example")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "expired.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "expired.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _k, csr = pki_key_and_csr(tmp_path, "renew", "CN=expired.example", kind="ecdsa")
    before = srv.scepd("certs", "list")
    out = pki("--est", "--url", est.url, "--cacert", srv.root_pem, "--in", csr,
              "--cert", tmp_path / "expired.pem", "--key", tmp_path / "expired.key")
    assert out.returncode != 0, out.stderr
    out = curl("--cacert", srv.root_pem, "--cert", tmp_path / "expired.pem", "--key", tmp_path / "expired.key",
               "--data-binary", "x", est.est() + "simplereenroll")
    assert out.returncode != 0  # a TLS alert, no HTTP answer
    assert srv.scepd("certs", "list") == before


def test_pki_est_polls_while_the_request_waits_for_approval(tmp_path):
    srv = _start(tmp_path / "srv", SCEPD_POLICY_REQUIRE_APPROVAL="est", SCEPD_EST_RETRY_AFTER="1")
    try:
        key, csr = pki_key_and_csr(tmp_path, "pending", "CN=pki-pending.example")
        proc = subprocess.Popen([require("pki"), "--est", "--url", srv.url, "--cacert", str(srv.server.root_pem),
                                 "--cacert", str(srv.server.ca_pem), "--in", str(csr), "--userpass",
                                 f"u:{srv.server.new_challenge()}", "--interval", "1", "--maxpolltime", "90",
                                 "--outform", "pem"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            pending = []
            deadline = time.monotonic() + 60
            while not pending and time.monotonic() < deadline:
                pending = json.loads(srv.server.scepd("pending", "list", "--json"))
                time.sleep(0.5)  # the client polls a real server: nothing to inject here
            assert len(pending) == 1 and pending[0]["protocol"] == "est", pending
            srv.server.scepd("pending", "approve", str(pending[0]["id"]))
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert proc.returncode == 0, stderr
        assert "EST request pending" in srv.server.log_text()
        (tmp_path / "pending.pem").write_text(stdout)
        srv.server.verify(tmp_path / "pending.pem", key)
    finally:
        stop_server(srv.server)


# --- curl + openssl --------------------------------------------------------------------------------

def test_curl_cacerts_decodes_with_openssl(est, tmp_path):
    out = curl("--cacert", est.server.root_pem, "-D", tmp_path / "h.txt", est.est() + "cacerts")
    assert out.returncode == 0, out.stderr
    headers = (tmp_path / "h.txt").read_text().lower()
    assert "content-type: application/pkcs7-mime" in headers and "content-transfer-encoding: base64" in headers
    pem = certs_from_base64(out.stdout, tmp_path, "cacerts").read_text()
    chain = x509.load_pem_x509_certificates(pem.encode())
    assert set(chain) == {x509.load_pem_x509_certificate(est.server.ca_pem.read_bytes()),
                          x509.load_pem_x509_certificate(est.server.root_pem.read_bytes())}


def test_curl_simpleenroll_with_basic_auth(est, tmp_path):
    key, der = openssl_csr(tmp_path, "curl", "curl.example", "curl.example")
    b64 = openssl("base64", "-e", data=der)  # 64-character lines: the server takes them
    status, headers, body = curl_post(est, "simpleenroll", b64, tmp_path, "-u", "anyone:static-secret")
    assert status == 200, body
    assert headers["content-type"].startswith("application/pkcs7-mime")
    cert = est.server.verify(certs_from_base64(body, tmp_path, "curl"), key)
    assert cert.subject.rfc4514_string() == "CN=curl.example"
    # under the label "servers": the server profile (serverAuth only)
    srv_key, der = openssl_csr(tmp_path, "srv", "www.example", "www.example")
    status, _, body = curl_post(est, "simpleenroll", openssl("base64", "-e", data=der), tmp_path,
                                "-u", "x:static-secret", label="servers")
    assert status == 200, body
    cert = est.server.verify(certs_from_base64(body, tmp_path, "srv"), srv_key)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    # a serverAuth-only certificate is no TLS client certificate: the handshake refuses it
    _key, der = openssl_csr(tmp_path, "srv2", "www.example")
    (tmp_path / "srv2.b64").write_bytes(base64.b64encode(der))
    out = curl("--cacert", est.server.root_pem, "--cert", tmp_path / "srv.pem", "--key", srv_key,
               "--data-binary", f"@{tmp_path / 'srv2.b64'}", est.est() + "simplereenroll")
    assert out.returncode != 0, out.stdout  # no HTTP answer at all
    # with a client certificate instead of a password: a new key for the certificate's own names
    key2, der2 = openssl_csr(tmp_path, "curl2", "curl.example")
    status, _, body = curl_post(est, "simpleenroll", openssl("base64", "-e", data=der2), tmp_path,
                                client=(tmp_path / "curl.pem", key))
    assert status == 200, body
    est.server.verify(certs_from_base64(body, tmp_path, "curl2"), key2)
    status, _, body = curl_post(est, "simpleenroll", openssl("base64", "-e", data=openssl_csr(
        tmp_path, "curl3", "someone-else.example")[1]), tmp_path, client=(tmp_path / "curl.pem", key))
    assert status == 403 and b"someone-else.example" in body


def test_curl_serverkeygen_returns_a_key_matching_its_certificate(est, tmp_path):
    _key, der = openssl_csr(tmp_path, "kg", "keygen.example")
    status, headers, body = curl_post(est, "serverkeygen", base64.b64encode(der), tmp_path,
                                      "-u", "x:static-secret")
    assert status == 200, body
    assert headers["content-type"].startswith("multipart/mixed; boundary=")
    msg = email.message_from_bytes(b"Content-Type: " + headers["content-type"].encode() + b"\r\n\r\n" + body,
                                   policy=email.policy.default)
    key_part, cert_part = msg.iter_parts()
    assert key_part.get_content_type() == "application/pkcs8"
    assert cert_part.get_content_type() == "application/pkcs7-mime"
    key_der = openssl("base64", "-d", "-A", data=key_part.get_payload().strip().encode())
    (tmp_path / "kg-server.key").write_bytes(openssl("pkey", "-inform", "DER", data=key_der))
    cert_pem = certs_from_base64(cert_part.get_payload().strip().encode(), tmp_path, "kg")
    est.server.verify(cert_pem, tmp_path / "kg-server.key")
    pub_of_key = openssl("pkey", "-in", tmp_path / "kg-server.key", "-pubout")
    pub_of_cert = openssl("x509", "-in", cert_pem, "-noout", "-pubkey")
    assert pub_of_key == pub_of_cert
    assert b"Private-Key: (2048 bit" in openssl("pkey", "-in", tmp_path / "kg-server.key", "-noout", "-text")


def test_curl_refusals(est, tmp_path):
    srv = est.server
    _key, der = openssl_csr(tmp_path, "neg", "neg.example")
    b64 = base64.b64encode(der)
    status, headers, body = curl_post(est, "simpleenroll", b64, tmp_path, "-u", "x:wrong")
    assert status == 401 and headers["www-authenticate"].startswith("Basic realm=")
    status, headers, _ = curl_post(est, "simpleenroll", b64, tmp_path)
    assert status == 401 and "www-authenticate" in headers
    scoped = srv.new_challenge("--names", "dev-*.example")
    _key, der_out = openssl_csr(tmp_path, "scope", "dev-1.example", "dev-1.example", "bank.example")
    status, _, body = curl_post(est, "simpleenroll", base64.b64encode(der_out), tmp_path, "-u", f"x:{scoped}")
    assert status == 403 and b"bank.example" in body
    status, _, body = curl_post(est, "simpleenroll", b"%%% not base64 %%%", tmp_path, "-u", "x:static-secret")
    assert status == 400 and body.startswith(b"the PKCS#10 request is not base64")
    status, _, _ = curl_post(est, "simpleenroll", base64.b64encode(der[:-30]), tmp_path, "-u", "x:static-secret")
    assert status == 400
    status, _, _ = curl_post(est, "simpleenroll", b"A" * (70 * 1024), tmp_path, "-u", "x:static-secret")
    assert status == 413
    status, _, _ = curl_post(est, "simpleenroll", b64, tmp_path, "-u", "x:static-secret", label="nosuch")
    assert status == 404
    assert "Traceback" not in srv.log_text()
