"""Renewal authorization: a request signed by a certificate we issued needs no challenge.

Whatever the SCEP message type (RenewalReq, or PKCSReq signed by the old certificate as sscep,
certmonger, Apple and Cisco send it), the signer certificate authenticates the request when:
  * it is not self-signed (RFC 8894 §2.4: a self-signed signer never authenticates anything);
  * it was issued by one of our CAs: the current issuing CA or a previous one after a rollover
    (signature verified, not just names compared);
  * it is unexpired (or within the configured grace period after expiry);
  * it is not revoked in our inventory (a certificate our CA key signed but that predates the
    inventory, e.g. under an imported CA, is accepted);
  * the new request keeps its subject: same CN, and no subjectAltName the old certificate lacked;
  * it asks for a new key, unless same-key renewal is allowed.
"""
from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ..ca.csr import CsrFacts, certificate_sans
from ..errors import RenewalRefused
from ..render import serial_hex
from ..store import CertificateRecord, SqlStore, StoreNotFound


class SignerNotValid(RenewalRefused):
    """The certificate itself authenticates nothing (not ours, revoked, expired, not yet valid),
    as opposed to a valid certificate whose request is not a renewal of it (EST answers the
    first 401, the second 403; SCEP answers both alike)."""


#: authorize(issuer=..., record=...) not given: check / read it here
_UNKNOWN = object()


@dataclass(frozen=True)
class RenewalSettings:
    grace: dt.timedelta = dt.timedelta(0)
    allow_same_key: bool = False


@dataclass(frozen=True)
class RenewalGrant:
    old_serial: str
    old_record: CertificateRecord | None  # None: issued by our CA key before the inventory existed


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _cn(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return attrs[0].value if attrs else None  # type: ignore[return-value]


def issued_by_us(cert: x509.Certificate, cas: list[x509.Certificate]) -> x509.Certificate | None:
    """The CA among `cas` whose key signed `cert`, or None."""
    if cert.issuer == cert.subject:
        return None
    for ca in cas:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
            return ca
        except Exception:  # InvalidSignature, ValueError, TypeError: not this CA
            continue
    return None


class RenewalPolicy:
    def __init__(self, store: SqlStore, cas: list[x509.Certificate], settings: RenewalSettings):
        self.store = store
        self.cas = cas  # current issuing CA first, then previous ones
        self.settings = settings

    def is_candidate(self, signer: x509.Certificate) -> bool:
        """Does this signer claim to be one of our certificates (so the request is a renewal)?"""
        return signer.issuer != signer.subject and any(ca.subject == signer.issuer for ca in self.cas)

    def issuer_of(self, signer: x509.Certificate) -> x509.Certificate | None:
        """The CA of ours whose key signed `signer` (a signature check: call it off the loop)."""
        return issued_by_us(signer, self.cas)

    async def check_signer(self, signer: x509.Certificate, now: dt.datetime, *,
                           issuer=_UNKNOWN, record=_UNKNOWN) -> RenewalGrant:
        """Is `signer` a certificate of ours that authenticates its holder now? SignerNotValid
        if not: not issued by one of our CAs, revoked, expired (beyond the grace), not yet valid.
        `issuer`: issuer_of(signer) when the caller already checked it (in its own worker
        thread); `record`: the signer's inventory row (or None), when the caller already read it."""
        if issuer is _UNKNOWN:
            issuer = await asyncio.to_thread(issued_by_us, signer, self.cas)  # a signature check
        if issuer is None:
            raise SignerNotValid("the signer certificate was not issued by this CA")
        serial = serial_hex(signer.serial_number)
        if record is _UNKNOWN:
            try:
                record = await self.store.get_certificate(serial)
            except StoreNotFound:
                record = None
        if record is not None and record.status == "revoked":
            raise SignerNotValid("the signer certificate is revoked")
        if signer.not_valid_after_utc + self.settings.grace < now:
            raise SignerNotValid("the signer certificate has expired; enroll again with a challenge")
        if signer.not_valid_before_utc > now + dt.timedelta(minutes=5):
            raise SignerNotValid("the signer certificate is not valid yet")
        return RenewalGrant(serial, record)

    async def authorize(self, signer: x509.Certificate, facts: CsrFacts, now: dt.datetime, *,
                        issuer=_UNKNOWN, record=_UNKNOWN) -> RenewalGrant:
        grant = await self.check_signer(signer, now, issuer=issuer, record=record)
        if facts.common_name != _cn(signer):
            raise RenewalRefused("a renewal must keep the subject CN of the certificate it renews")
        extra = set(facts.sans) - set(certificate_sans(signer))
        if extra:
            raise RenewalRefused("a renewal cannot add subjectAltNames: "
                                 + ", ".join(str(s) for s in sorted(extra, key=str)))
        if not self.settings.allow_same_key and facts.spki_der == _spki(signer):
            raise RenewalRefused("a renewal must use a new key (same-key renewal is disabled)")
        return grant
