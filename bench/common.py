"""Pieces shared by the bench scripts: starting `scepd serve`, server CPU from /proc, the SCEP
request builder and reply checker, and the shared http-01 responder.

Loopback only; every wait is bounded in time.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.acme_client import Http01Responder  # noqa: E402
from scepd.scep import wire  # noqa: E402
from tests.helpers import make_csr, pkcs_req  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def server_cpu(pid: int) -> float:
    """user + system CPU seconds of the process (Linux /proc), without its children."""
    fields = _stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu(pid: int) -> float:
    """user + system CPU seconds of the process, its live descendants and its reaped children."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                stats[int(entry)] = fields
                children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo, seen = 0, [pid], set()
    while todo and len(seen) < 10_000:
        p = todo.pop()
        if p in seen or p not in stats:
            continue
        seen.add(p)
        f = stats[p]
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # utime stime cutime cstime
        todo.extend(children.get(p, []))
    return total / CLK_TCK


def start_scepd(state: Path, env: dict, ready_seconds: float = 90, workers: int | None = None) -> subprocess.Popen:
    """`python -m scepd serve` on a fresh state dir, returned once it has printed its root.
    `workers`: `serve --workers N` (None: the server's default, one process per core)."""
    extra = [] if workers is None else ["--workers", str(workers)]
    proc = subprocess.Popen([sys.executable, "-m", "scepd", "serve", "--state-dir", str(state),
                             "--no-demo-challenge", *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + ready_seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("Root CA") or not line:
            break
    return proc


def recipient_of(ca_certs: list[x509.Certificate]) -> x509.Certificate:
    """The certificate a PKCSReq is encrypted to: the RA (not a CA) if there is one, else the CA."""
    for c in ca_certs:
        try:
            if not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                return c
        except x509.ExtensionNotFound:
            return c
    return ca_certs[0]


@dataclass
class ScepRequest:
    der: bytes
    transaction_id: str
    nonce: bytes
    key: object
    signer: x509.Certificate


def build_requests(recipient: x509.Certificate, keys: list, signers: list[x509.Certificate], count: int,
                   prefix: str, challenge: str) -> list[ScepRequest]:
    """`count` PKCSReq messages (AES-128-CBC, SHA-256), keys and self-signed signers taken in turn."""
    out = []
    for i in range(count):
        key, signer = keys[i % len(keys)], signers[i % len(keys)]
        der, tid, nonce = pkcs_req(recipient, key, make_csr(key, f"{prefix}-{i}", challenge), signer=(signer, key))
        out.append(ScepRequest(der, tid, nonce, key, signer))
    return out


def check_cert_rep(req: ScepRequest, status: int, body: bytes, ca_certs: list[x509.Certificate]) -> x509.Certificate:
    """The issued certificate of a SUCCESS CertRep, or ValueError saying what is wrong: the signature
    (by one of the GetCACert certificates), transactionID and nonces, the envelope decrypted with the
    request's key, the certificate for the request's key and signed by one of the CA certificates."""
    if status != 200:
        raise ValueError(f"HTTP {status}")
    rep = wire.decode_cert_rep(body)  # verifies the signature against the embedded signer
    if not any(rep.signer_cert == c for c in ca_certs):
        raise ValueError("CertRep signed by a certificate GetCACert did not return")
    if rep.status != wire.PkiStatus.SUCCESS:
        raise ValueError(f"pkiStatus {rep.status.name} failInfo {rep.fail_info} {rep.fail_info_text or ''}")
    if rep.transaction_id != req.transaction_id or rep.recipient_nonce != req.nonce:
        raise ValueError("transactionID or recipientNonce does not match the request")
    inner = wire.open_envelope(rep.envelope, [wire.Recipient(req.signer, req.key)])
    certs = wire.certs_from_certs_only(inner)
    leaf = next((c for c in certs if c.public_key() == req.key.public_key()), None)
    if leaf is None:
        raise ValueError("no certificate for the request's key in the reply")
    for ca in ca_certs:
        with contextlib.suppress(ValueError, TypeError, InvalidSignature):
            leaf.verify_directly_issued_by(ca)
            return leaf
    raise ValueError("the issued certificate is not signed by a GetCACert certificate")


class SharedResponder(Http01Responder):
    """One http-01 responder for every concurrent order: entered once by the bench, not per order."""

    @contextlib.asynccontextmanager
    async def per_order(self):
        yield self
