"""What the daemon needs from an enrollment protocol (SCEP today; ACME plugs in the same way)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .schedule import RenewalWindow


class AgentError(Exception):
    """A failure the agent reports in one line (and retries with backoff)."""


class TrustError(AgentError):
    """The server's CA does not match what we pinned."""


@dataclass(frozen=True)
class Identity:
    common_name: str
    sans: tuple[str, ...] = ()  # "DNS:name", "IP:addr"


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    chain: list[x509.Certificate]  # issuing CA (and intermediates), not the root
    ca_certs: list[x509.Certificate] = field(default_factory=list)  # what GetCACert served


class EnrollmentProtocol(Protocol):
    async def enroll(self, key, identity: Identity, secret: str) -> Issued:
        """First enrollment, authorised by a challenge password or an enrollment token."""

    async def renew(self, new_key, current_cert: x509.Certificate, current_key) -> Issued:
        """Renewal authorised by the current certificate."""

    async def next_ca(self) -> list[x509.Certificate]:
        """A successor CA the server announces (rollover), verified against the anchor; [] if none."""

    async def renewal_window(self, cert: x509.Certificate) -> RenewalWindow | None:
        """The server's suggested renewal window, if it offers one."""


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()


def normalize_fingerprint(text: str) -> str:
    out = text.strip().upper().replace(":", "").replace(" ", "")
    if out.startswith("SHA256="):
        out = out[7:]
    if len(out) != 64 or any(ch not in "0123456789ABCDEF" for ch in out):
        raise ValueError("a SHA-256 fingerprint is 64 hex digits (colons allowed)")
    return out


def chains_to(cert: x509.Certificate, anchor: x509.Certificate, pool: list[x509.Certificate],
              max_depth: int = 5) -> list[x509.Certificate] | None:
    """The path from `cert` up to (excluding) `anchor` through `pool`, signatures verified;
    None when there is none. `cert` equal to the anchor gives []."""
    if cert == anchor:
        return []
    path: list[x509.Certificate] = []
    current = cert
    for _ in range(max_depth):
        for issuer in [anchor, *pool]:
            if issuer.subject != current.issuer or issuer == current:
                continue
            try:
                current.verify_directly_issued_by(issuer)
            except Exception:  # InvalidSignature, ValueError, TypeError: not this one
                continue
            if issuer == anchor:
                return path
            path.append(issuer)
            current = issuer
            break
        else:
            return None
    return None
