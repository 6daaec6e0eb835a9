"""Enrollment: policy -> CA -> store, the one path every issued certificate takes.

The certificate is committed (with the one-time challenge consumed, and an audit record) in one
transaction before the caller gets it back, so nothing is ever handed out that is not stored.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .authority import CertificateAuthority, random_serial
from .challenges import ChallengeGrant
from .clock import Clock
from .csr import CsrFacts
from .errors import ChallengeRejected
from .policy import IssuanceRequest, Profile, approve
from .store import AuditRecord, CertificateRecord, Conflict, SqlStore

log = logging.getLogger("scepd.enrollment")


def serial_hex(serial: int) -> str:
    return format(serial, "x")


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    record: CertificateRecord
    reused: bool = False  # True when an earlier answer to the same transaction was returned


class EnrollmentService:
    def __init__(self, ca: CertificateAuthority, store: SqlStore, clock: Clock,
                 validity: dt.timedelta | None = None):
        self.ca = ca
        self.store = store
        self.clock = clock
        self.validity = validity

    async def previous_answer(self, transaction_id: str, facts: CsrFacts) -> Issued | None:
        """A certificate already issued for this transaction and key (a resent request)."""
        rec = await self.store.find_certificate_for_transaction(transaction_id, facts.spki_sha256)
        if rec is None:
            return None
        return Issued(x509.load_der_x509_certificate(rec.der), rec, reused=True)

    def approve(self, facts: CsrFacts, profile: Profile) -> IssuanceRequest:
        return approve(facts, profile, self.clock.now(), self.validity,
                       self.ca.material.cert.not_valid_after_utc)

    async def issue(self, request: IssuanceRequest, grant: ChallengeGrant, *, protocol: str,
                    transaction_id: str | None, requester: str | None, spki_sha256: str) -> Issued:
        now = self.clock.now()
        for _attempt in range(5):
            serial = random_serial()
            cert = self.ca.issue(request, serial)
            der = cert.public_bytes(serialization.Encoding.DER)
            rec = CertificateRecord(
                serial=serial_hex(serial), ca_id=self.ca.ca_id,
                subject=cert.subject.rfc4514_string(), sans=tuple(str(s) for s in request.sans),
                not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
                profile=request.profile.name, protocol=protocol, transaction_id=transaction_id,
                requester=requester, spki_sha256=spki_sha256, der=der, issued_at=now)
            try:
                async with self.store.transaction() as tx:
                    if grant.one_time_id is not None and \
                            not await tx.consume_challenge(grant.one_time_id, now, rec.serial):
                        raise ChallengeRejected("the challenge password is invalid, expired or already used")
                    await tx.insert_certificate(rec)
                    await tx.audit(AuditRecord(at=now, event="certificate.issued", subject=rec.subject,
                                               serial=rec.serial, actor=requester,
                                               details={"protocol": protocol, "profile": rec.profile,
                                                        "transaction_id": transaction_id,
                                                        "challenge": grant.kind,
                                                        "not_after": rec.not_after.isoformat(),
                                                        "sha256": hashlib.sha256(der).hexdigest()}))
            except Conflict:
                log.warning("serial collision on %s; drawing another", rec.serial)
                continue
            log.info("issued serial=%s subject=%s protocol=%s txn=%s", rec.serial, rec.subject,
                     protocol, transaction_id)
            return Issued(cert, rec)
        raise RuntimeError("could not draw an unused serial number")
