"""Enrollment: policy -> CA -> store, the one path every issued certificate takes.

The certificate is committed (with the one-time challenge consumed, and an audit record) in one
transaction before the caller gets it back, so nothing is ever handed out that is not stored.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..ca.authority import CertificateAuthority, random_serial
from .challenges import ChallengeGrant
from ..clock import Clock
from ..ca.csr import LEGACY_SCEP_DIGESTS, CsrFacts, decode_csr
from ..errors import ChallengeRejected, NotFound, PolicyViolation, RequestRejected
from ..ca.policy import IssuanceRequest, KeyLimits, Profile, SubjectPolicy, approve, check_window, profile_named
from ..render import serial_hex
from ..store import AuditRecord, CertificateRecord, Conflict, PendingRecord, SqlStore, StoreNotFound, sql

#: duplicate-subject policies: keep both | revoke the renewed certificate | refuse a second one
DUPLICATE_POLICIES = ("allow", "revoke", "refuse")

#: protocols whose certificates carry the requested subject DN (ACME's come from identifiers)
REQUESTED_SUBJECT_PROTOCOLS = frozenset({"scep", "est"})

log = logging.getLogger("scepd.enrollment")


def _subject_string(request: IssuanceRequest) -> str:
    """The issued subject as the inventory renders it (cert.subject.rfc4514_string())."""
    if request.subject is not None:
        return request.subject.rfc4514_string()
    return f"CN={request.common_name}" if request.common_name else ""


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    record: CertificateRecord
    reused: bool = False  # True when an earlier answer to the same transaction was returned
    #: what issue(finish=...) returned for this certificate (built before the commit, handed
    #: out only after it)
    reply: object = None


class EnrollmentService:
    def __init__(self, ca: CertificateAuthority, store: SqlStore, clock: Clock,
                 validity: dt.timedelta | None = None, duplicate_subjects: str = "allow",
                 key_limits: KeyLimits = KeyLimits(), subject_policy: SubjectPolicy | None = None):
        if duplicate_subjects not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicate_subjects must be one of {DUPLICATE_POLICIES}")
        self.ca = ca
        self.store = store
        self.clock = clock
        self.validity = validity
        self.duplicate_subjects = duplicate_subjects
        #: `[policy]`: the keys approve() accepts; ACME and SCEP check other keys against them too
        self.key_limits = key_limits
        #: how requested subjects are issued (SCEP; ACME names come from identifiers)
        self.subject_policy = subject_policy or SubjectPolicy()
        #: told of certificates revoked as superseded here; the app shares RevocationService's list
        #: so CRL publication and metrics see these revocations like any other
        self.revocation_listeners: list = []
        #: sync callables(CertificateRecord) told after each committed issuance (metrics)
        self.issued_listeners: list = []

    def approve(self, facts: CsrFacts, profile: Profile, window=None,
                allow_wildcard: bool = False, requested_subject: bool = False) -> IssuanceRequest:
        """`window`: a requested (notBefore, notAfter) checked by policy.check_window;
        `allow_wildcard` only for names whose wildcard was proven (ACME dns-01);
        `requested_subject`: issue the CSR's subject DN under the subject policy (SCEP), rather
        than CN-only (ACME, internal)."""
        return approve(facts, profile, self.clock.now(), self.validity,
                       self.ca.material.cert.not_valid_after_utc, window, allow_wildcard, self.key_limits,
                       self.subject_policy if requested_subject else None)

    def check_window(self, window, profile: Profile) -> None:
        check_window(window, self.clock.now(), self.validity or profile.validity,
                     self.ca.material.cert.not_valid_after_utc)

    async def issue(self, request: IssuanceRequest, grant: ChallengeGrant, *, protocol: str,
                    transaction_id: str | None, requester: str | None, spki_sha256: str,
                    renewal_of: str | None = None, pending_id: int | None = None,
                    decided_by: str | None = None, finish=None, also=None) -> Issued:
        """Sign and store. `renewal_of`: the serial this renews (revoked as superseded when the
        duplicate policy is "revoke"); `pending_id`: the pending request this answers.
        `finish(cert)`: the front end's reply, built in the same worker thread as the signature
        (the same hop as the write unit) while the writer commits; returned as Issued.reply, only
        once the certificate is committed. `also(conn, rec)`: the front end's own writes, in the issuance's transaction
        (ACME: the order `valid` with the certificate committed, no write unit of its own)."""
        now = self.clock.now()
        issued_subject = _subject_string(request)
        if self.duplicate_subjects == "refuse" and issued_subject:
            subject = issued_subject  # as the inventory renders the subjects we issue
            clash = [r for r in await self.store.find_valid_by_subject(subject, now) if r.serial != renewal_of]
            if clash:
                raise PolicyViolation(f"a valid certificate for {subject} already exists "
                                      f"(serial {clash[0].serial})")
        supersede = renewal_of if self.duplicate_subjects == "revoke" else None
        event = "certificate.renewed" if renewal_of else "certificate.issued"
        for _attempt in range(5):
            serial = random_serial()

            def sign(serial=serial) -> tuple[CertificateRecord, AuditRecord, x509.Certificate]:
                # off the loop: the signature and the rows to store
                cert = self.ca.issue(request, serial)
                der = cert.public_bytes(serialization.Encoding.DER)
                rec = CertificateRecord(
                    serial=serial_hex(serial), ca_id=self.ca.ca_id,
                    subject=cert.subject.rfc4514_string(), sans=tuple(str(s) for s in request.sans),
                    not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
                    profile=request.profile.name, protocol=protocol, transaction_id=transaction_id,
                    requester=requester, spki_sha256=spki_sha256, der=der, issued_at=now)
                issued_audit = AuditRecord(at=now, event=event, subject=rec.subject, serial=rec.serial,
                                           actor=requester,
                                           details={"protocol": protocol, "profile": rec.profile,
                                                    "transaction_id": transaction_id, "challenge": grant.kind,
                                                    "renewal_of": renewal_of, "pending_id": pending_id,
                                                    "not_after": rec.not_after.isoformat(),
                                                    "sha256": hashlib.sha256(der).hexdigest()})
                return rec, issued_audit, cert

            def unit(conn, signed):
                # the whole issuance, one transaction: challenge spent, certificate stored,
                # pending request decided, the renewed certificate superseded, audit rows
                rec, issued_audit = signed[0], signed[1]
                if grant.one_time_id is not None and \
                        not sql.consume_challenge(conn, grant.one_time_id, now, rec.serial):
                    raise ChallengeRejected("the challenge password is invalid, expired or already used")
                sql.insert_certificate(conn, rec)  # Conflict: the serial is taken
                if pending_id is not None and not sql.decide_pending(
                        conn, pending_id, "issued", now, decided_by or "admin", serial=rec.serial):
                    raise RequestRejected("the pending request was already decided")
                if supersede:
                    try:
                        if sql.revoke_certificate(conn, supersede, "superseded", now):
                            sql.insert_audit(conn, AuditRecord(
                                at=now, event="certificate.revoked", serial=supersede, actor="renewal",
                                details={"reason": "superseded", "replaced_by": rec.serial}))
                    except StoreNotFound:
                        pass  # renewed a certificate that predates the inventory
                sql.insert_audit(conn, issued_audit)
                if also is not None:
                    also(conn, rec)
                return signed
            try:
                # signed in a worker thread that hands the unit to the store: one hop; the front
                # end's reply is built there while the writer commits (the signature and the fsync
                # overlap); the certificate and the reply reach the caller only once committed
                if finish is None:
                    (rec, _audit, cert), reply = await self.store.write(unit, prepare=sign), None
                else:
                    (rec, _audit, cert), reply = await self.store.write(
                        unit, prepare=sign, meanwhile=lambda signed: finish(signed[2]))
            except Conflict:
                log.warning("serial collision on %s; drawing another", serial_hex(serial))
                continue
            log.info("issued serial=%s subject=%s protocol=%s txn=%s", rec.serial, rec.subject,
                     protocol, transaction_id)
            if supersede and self.revocation_listeners:
                await self._tell_superseded(supersede)
            for listener in self.issued_listeners:
                listener(rec)
            return Issued(cert, rec, reply=reply)
        raise RuntimeError("could not draw an unused serial number")

    async def _tell_superseded(self, serial: str) -> None:
        from ..ca.revocation import RevocationReason
        try:
            old = await self.store.get_certificate(serial)
        except StoreNotFound:
            return
        if old.status != "revoked":
            return
        for listener in self.revocation_listeners:
            try:
                await listener(old, RevocationReason.SUPERSEDED)
            except Exception:  # a listener must never undo or hide the issuance
                log.exception("revocation listener failed for %s", serial)

    async def issue_internal(self, common_name: str, sans: tuple, profile: Profile,
                             requester: str) -> tuple[Issued, object]:
        """A certificate for one of the server's own services (TLS listener, OCSP responder):
        a fresh EC P-256 key generated here, issued through the ordinary path (so it is in the
        inventory like any other). Returns (issued, private key)."""
        from cryptography.hazmat.primitives.asymmetric import ec
        key = ec.generate_private_key(ec.SECP256R1())
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        facts = CsrFacts(public_key=key.public_key(), spki_der=spki, common_name=common_name,
                         subject_rfc4514="", sans=tuple(sans), other_extensions=(), challenge_password=None)
        issued = await self.issue(self.approve(facts, profile), ChallengeGrant("internal"),
                                  protocol="internal", transaction_id=None, requester=requester,
                                  spki_sha256=hashlib.sha256(spki).hexdigest())
        return issued, key

    # --- manual approval ----------------------------------------------------------------------

    async def create_pending(self, request: IssuanceRequest, grant: ChallengeGrant, *, protocol: str,
                             transaction_id: str, requester: str | None, spki_sha256: str,
                             signer_spki_sha256: str, csr_der: bytes,
                             renewal_of: str | None = None) -> PendingRecord:
        """Record a request for an administrator; the one-time challenge is spent now, so it
        cannot be used twice while the request waits."""
        now = self.clock.now()
        subject = _subject_string(request)
        rec = PendingRecord(id=0, transaction_id=transaction_id, spki_sha256=spki_sha256,
                            signer_spki_sha256=signer_spki_sha256, csr_der=csr_der, subject=subject,
                            profile=request.profile.name, protocol=protocol, requester=requester,
                            created_at=now, renewal_of=renewal_of)
        async with self.store.transaction() as tx:
            if grant.one_time_id is not None and \
                    not await tx.consume_challenge(grant.one_time_id, now, f"pending:{transaction_id}"[:64]):
                raise ChallengeRejected("the challenge password is invalid, expired or already used")
            pending_id = await tx.insert_pending(rec)
            await tx.audit(AuditRecord(at=now, event="request.pending", subject=subject, actor=requester,
                                       details={"pending_id": pending_id, "transaction_id": transaction_id,
                                                "protocol": protocol, "challenge": grant.kind}))
        log.info("pending id=%s subject=%s txn=%s", pending_id, subject, transaction_id)
        return await self.store.get_pending(pending_id)

    async def approve_pending(self, pending_id: int, actor: str) -> Issued:
        try:
            pending = await self.store.get_pending(pending_id)
        except StoreNotFound:
            raise NotFound(f"no pending request {pending_id}") from None
        if pending.status != "pending":
            raise RequestRejected(f"request {pending_id} is already {pending.status}")
        # verified on receipt with the digests its protocol allowed; the check runs off the loop
        facts = await asyncio.to_thread(decode_csr, pending.csr_der, allowed_digests=LEGACY_SCEP_DIGESTS)
        # the request passed the whole pipeline up to approval when it was recorded; ACME names
        # (wildcards included) were proven by the account's authorizations
        request = self.approve(facts, profile_named(pending.profile), allow_wildcard=pending.protocol == "acme",
                               requested_subject=pending.protocol in REQUESTED_SUBJECT_PROTOCOLS)
        return await self.issue(request, ChallengeGrant("approved"), protocol=pending.protocol,
                                transaction_id=pending.transaction_id, requester=pending.requester,
                                spki_sha256=pending.spki_sha256, renewal_of=pending.renewal_of,
                                pending_id=pending.id, decided_by=actor)

    async def reject_pending(self, pending_id: int, reason: str, actor: str) -> PendingRecord:
        now = self.clock.now()
        async with self.store.transaction() as tx:
            try:
                pending = await self.store.get_pending(pending_id)
            except StoreNotFound:
                raise NotFound(f"no pending request {pending_id}") from None
            if not await tx.decide_pending(pending_id, "rejected", now, actor, reason=reason):
                raise RequestRejected(f"request {pending_id} is already {pending.status}")
            await tx.audit(AuditRecord(at=now, event="request.rejected", subject=pending.subject,
                                       actor=actor, details={"pending_id": pending_id, "reason": reason}))
        return await self.store.get_pending(pending_id)
