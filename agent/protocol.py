"""What the daemon needs from an enrollment protocol (SCEP today; ACME plugs in the same way)."""
from __future__ import annotations

import datetime as dt
import enum
import hashlib
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

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


def pinned_anchor(served: list[x509.Certificate], pin: str | None, source: str) -> x509.Certificate:
    """The trust anchor among the CA certificates a server served (`source`: GetCACert, EST
    cacerts): the one with the pinned SHA-256 fingerprint, or on first use (pin None: the caller
    was told to allow it) the last self-signed one."""
    if pin is not None:
        matching = [c for c in served if fingerprint(c) == pin]
        if not matching:
            raise TrustError(f"no certificate served by {source} has the pinned fingerprint; served: "
                             + ", ".join(f"{c.subject.rfc4514_string()} {fingerprint(c)}" for c in served))
        return matching[0]
    roots = [c for c in served if c.issuer == c.subject]
    return roots[-1] if roots else served[-1]


def normalize_fingerprint(text: str) -> str:
    out = text.strip().upper().replace(":", "").replace(" ", "")
    if out.startswith("SHA256="):
        out = out[7:]
    if len(out) != 64 or any(ch not in "0123456789ABCDEF" for ch in out):
        raise ValueError("a SHA-256 fingerprint is 64 hex digits (colons allowed)")
    return out


class Usage(enum.Enum):
    """What a certificate is trusted for once its path to the pinned anchor verifies."""

    CA = "a CA (basicConstraints CA, keyUsage keyCertSign)"
    RA = "an RA (not a CA; keyUsage digitalSignature or keyEncipherment)"
    END_ENTITY = "a certificate"


def _ca_constraints(anchor: x509.Certificate) -> ExtensionPolicy:
    """Checks for every CA on a path (and for a CA verified as the target itself). The library
    already refuses an issuer without basicConstraints CA and enforces pathLenConstraint; it does
    not look at keyUsage, so keyCertSign is checked here (RFC 5280 §4.2.1.3). The pinned anchor
    is the operator's choice and is not judged on keyUsage."""
    def basic_constraints(_policy, _cert, bc: x509.BasicConstraints) -> None:
        if not bc.ca:
            raise ValueError("basicConstraints does not assert CA")

    def key_usage(_policy, cert, ku: x509.KeyUsage | None) -> None:
        if cert == anchor:
            return
        if ku is None or not ku.key_cert_sign:
            raise ValueError("keyUsage lacks keyCertSign")

    return (ExtensionPolicy.permit_all()
            .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, basic_constraints)
            .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, key_usage))


def _not_a_ca(_policy, _cert, bc: x509.BasicConstraints | None) -> None:
    if bc is not None and bc.ca:
        raise ValueError("a CA certificate is not an RA")


def _ra_key_usage(_policy, _cert, ku: x509.KeyUsage) -> None:
    if not (ku.digital_signature or ku.key_encipherment):
        raise ValueError("keyUsage has neither digitalSignature nor keyEncipherment")


_RA_POLICY = (ExtensionPolicy.permit_all()
              .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _not_a_ca)
              .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _ra_key_usage))


def verified_path(cert: x509.Certificate, anchor: x509.Certificate, pool: list[x509.Certificate],
                  at: dt.datetime, usage: Usage = Usage.END_ENTITY, max_depth: int = 5) -> list[x509.Certificate]:
    """The path from `cert` up to (excluding) `anchor` through `pool`, both ends excluded, verified
    with cryptography.x509.verification at `at`: signatures, validity of every certificate,
    basicConstraints CA and keyUsage keyCertSign on every issuer, pathLenConstraint, name
    chaining; `cert` itself must fit `usage`. `cert` equal to the anchor gives []. Raises
    TrustError saying why not."""
    if cert == anchor:
        return []
    ca_policy = _ca_constraints(anchor)
    ee_policy = {Usage.CA: ca_policy, Usage.RA: _RA_POLICY,
                 Usage.END_ENTITY: ExtensionPolicy.permit_all()}[usage]
    verifier = (PolicyBuilder().store(Store([anchor])).time(at).max_chain_depth(max_depth)
                .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy).build_client_verifier())
    try:
        chain = verifier.verify(cert, [c for c in pool if c != cert]).chain
    except (VerificationError, ValueError) as exc:
        raise TrustError(f"{cert.subject.rfc4514_string()} is not trusted as {usage.value} under the "
                         f"pinned root: {exc}") from None
    return chain[1:-1]


def issued_path(leaf: x509.Certificate, anchor: x509.Certificate, pool: list[x509.Certificate],
                now: dt.datetime) -> list[x509.Certificate]:
    """verified_path for a certificate the server just issued to us, judged at the instant of its
    validity nearest to `now` (clock skew between agent and server must not refuse a fresh
    certificate); every CA on its path must be valid at that instant."""
    at = min(max(now, leaf.not_valid_before_utc), leaf.not_valid_after_utc)
    return verified_path(leaf, anchor, pool, at, Usage.END_ENTITY)


def trusted_as(cert: x509.Certificate, anchor: x509.Certificate, pool: list[x509.Certificate],
               at: dt.datetime) -> Usage | None:
    """A CA or an RA certificate (GetCACert, a GetNextCACert signer) verified under the anchor,
    or None."""
    for usage in (Usage.CA, Usage.RA):
        try:
            verified_path(cert, anchor, pool, at, usage)
            return usage
        except TrustError:
            continue
    return None


def key_usage_allows(cert: x509.Certificate, usage: str) -> bool:
    """keyUsage permits `usage` ("digital_signature", "key_encipherment"), or is absent."""
    try:
        return bool(getattr(cert.extensions.get_extension_for_class(x509.KeyUsage).value, usage))
    except x509.ExtensionNotFound:
        return True
