"""Conformance: stock third-party clients against a real `scepd serve` on 127.0.0.1.

Debian clients (scepclient, certmonger, strongSwan pki) are required when SCEPD_REQUIRE_CLIENTS=1
(the README test command sets it after installing them as root): a missing client is then a
failure, never a silent pass. sscep is not packaged: its tests run when `sscep` is on PATH and
are reported as skipped otherwise.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

pytestmark = pytest.mark.conformance


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(binary: str) -> str:
    path = shutil.which(binary) or (binary if os.path.exists(binary) else None)
    if path:
        return path
    if os.environ.get("SCEPD_REQUIRE_CLIENTS") == "1":
        pytest.fail(f"{binary} is not installed but SCEPD_REQUIRE_CLIENTS=1")
    pytest.skip(f"{binary} not installed")


@dataclass
class Server:
    state_dir: Path
    port: int
    proc: subprocess.Popen
    challenge: str
    log: Path
    env: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/scep"

    def scepd(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "scepd", *args, "--state-dir", str(self.state_dir)],
                             capture_output=True, text=True, timeout=60, env={**os.environ, **self.env})
        assert out.returncode == 0, out.stderr
        return out.stdout

    def new_challenge(self, *extra: str) -> str:
        return self.scepd("challenge", "create", *extra).strip()

    @property
    def root_pem(self) -> Path:
        return self.state_dir / "ca" / "root.pem"

    @property
    def ca_pem(self) -> Path:
        return self.state_dir / "ca" / "ca.pem"

    def verify(self, cert_file: Path, key_file: Path | None = None) -> x509.Certificate:
        """openssl verify against our root, and the certificate matches the client's key."""
        out = subprocess.run(["openssl", "verify", "-CAfile", str(self.root_pem), "-untrusted",
                              str(self.ca_pem), str(cert_file)], capture_output=True, text=True)
        assert out.returncode == 0 and ": OK" in out.stdout, out.stdout + out.stderr
        data = cert_file.read_bytes()
        cert = x509.load_pem_x509_certificate(data) if b"BEGIN" in data else x509.load_der_x509_certificate(data)
        if key_file is not None:
            from cryptography.hazmat.primitives import serialization
            key = serialization.load_pem_private_key(key_file.read_bytes(), None)
            assert cert.public_key() == key.public_key()
        return cert

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(tmp: Path, env: dict | None = None, port: int | None = None) -> Server:
    """A `scepd serve` subprocess on 127.0.0.1 with its state in tmp/state (kept across restarts:
    call again with the same tmp and port to restart the same server)."""
    tmp.mkdir(parents=True, exist_ok=True)
    state = tmp / "state"
    port = port or free_port()
    log = tmp / f"server-{int(time.time() * 1000)}.log"
    full_env = {**os.environ, **(env or {}), "SCEPD_SERVER_HTTP": f"127.0.0.1:{port}"}
    proc = subprocess.Popen([sys.executable, "-m", "scepd", "serve", "--state-dir", str(state)],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=full_env,
                            start_new_session=True)
    challenge = None
    deadline = time.monotonic() + 90
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"One-time challenge password \(valid 1 hour\): (\S+)", line)
        if m:
            challenge = m.group(1)
            break
    if challenge is None:
        proc.kill()
        raise AssertionError("scepd serve did not start: " + "".join(lines) + log.read_text())
    return Server(state, port, proc, challenge, log, env or {})


def stop_server(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
    assert "Traceback" not in server.log_text(), server.log_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("conformance"))
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def legacy_server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("conformance-legacy"), {"SCEPD_SCEP_LEGACY_ALGORITHMS": "1"})
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def get_only_server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("conformance-get"), {"SCEPD_SCEP_ADVERTISE_POST": "0"})
    yield s
    stop_server(s)


def name_der_of(source) -> bytes:
    """Subject Name DER, read with asn1crypto (not with scepd's code): from a certificate or CSR
    (a file, PEM or DER bytes, or a pyca object), an x509.Name, or Name DER itself."""
    from asn1crypto import csr as asn1_csr, pem, x509 as asn1_x509
    from cryptography.hazmat.primitives import serialization
    if isinstance(source, x509.Name):
        return source.public_bytes()
    if isinstance(source, (x509.Certificate, x509.CertificateSigningRequest)):
        source = source.public_bytes(serialization.Encoding.DER)
    if isinstance(source, Path):
        source = source.read_bytes()
    if pem.detect(source):
        _, _, source = pem.unarmor(source)
    try:
        x509.load_der_x509_certificate(source)
        return asn1_x509.Certificate.load(source)["tbs_certificate"]["subject"].dump()
    except ValueError:
        pass
    try:  # not pyca: strongSwan's CSRs are not DER (unsorted attributes)
        info = asn1_csr.CertificationRequest.load(source)["certification_request_info"]
        info["subject_pk_info"].dump()
        return info["subject"].dump()
    except (ValueError, TypeError, KeyError):
        return asn1_x509.Name.load(source).dump()


def assert_subject_kept(cert, requested) -> None:
    """The issued subject is the requested one byte for byte (RDN order, multi-valued RDNs,
    string types): `requested` is the client's CSR, or the Name it put there."""
    from asn1crypto import x509 as asn1_x509
    issued, wanted = name_der_of(cert), name_der_of(requested)
    assert issued == wanted, (f"issued {asn1_x509.Name.load(issued).human_friendly} ({issued.hex()}) != "
                              f"requested {asn1_x509.Name.load(wanted).human_friendly} ({wanted.hex()})")


def run(cmd: list, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
