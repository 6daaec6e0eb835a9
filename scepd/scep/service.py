"""The SCEP service: bytes in, bytes out. No HTTP here (see transport.py).

request -> decode (wire) -> authenticate (challenge or renewal: an Authorization)
        -> pipeline (scepd/pipeline.py: names, profile, policy, external check, approval, issue)
        -> encode (wire)
Anything that fails before we know who asked (undecodable, unverifiable, not for us) raises
a ScepdError the transport answers with HTTP 400; every later failure becomes a signed CertRep
FAILURE with the failInfo from the error table. Every failure from the moment decryption starts
(key transport, CBC padding, the plaintext's structure, the CSR or IssuerAndSerial inside) is
one UnreadableEnvelope: the same signed FAILURE (badMessageCheck, one fixed failInfoText), so no
reply tells a padding error from a parse error (no decryption oracle). Only the log says which.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import asyncio
import dataclasses
import hashlib
from typing import Awaitable, Callable

from ..enroll.challenges import ChallengeGrant, ChallengeService
from ..clock import Clock
from ..ca.csr import LEGACY_SCEP_DIGESTS, SCEP_DIGESTS, CsrFacts, decode_csr
from ..enroll.enrollment import EnrollmentService
from ..errors import (BadCertId, BadRequest, BadTime, ChallengeRejected, ForbiddenAlgorithm, MalformedRequest,
                      NotForUs, RenewalRefused, RequestRejected, ScepdError, UnknownTransaction,
                      UnsupportedMessageType, UnverifiableMessage, mapping_for)
from ..errors import BadMessageCheck, Unavailable, UnreadableEnvelope
from ..render import serial_hex
from ..enroll.external_check import ExternalCheck
from ..ops.logctx import set_transaction_id
from ..enroll.pipeline import ApprovalPolicy, Authorization, CsrRequest, Pipeline
from ..enroll.renewal import RenewalPolicy, RenewalSettings
from ..store import StoreNotFound, sql
from ..ca.pki import CaMaterial
from ..ca.policy import KeyLimits, Profile, check_key
from . import wire

log = logging.getLogger("scepd.scep")

#: Errors answered with HTTP 400: nothing in the message can be trusted or answered.
HTTP_ERRORS = (MalformedRequest, UnverifiableMessage, NotForUs)

#: RFC 8894 §3.5.2 keywords, exact spelling (sscep compares case-sensitively). "SHA-384" is not an
#: RFC keyword but we do verify and sign SHA-384, and strongSwan pki 5.9 (Debian 12) needs it:
#: its caps enum is 0,1,2,... yet tested as bit flags, so its AES check really tests bit 3,
#: which only "SHA-384" sets. Without it `pki --scep` refuses AES against any server.
CAPABILITIES = ("POSTPKIOperation", "SHA-1", "SHA-256", "SHA-384", "SHA-512", "AES", "DES3",
                "SCEPStandard", "Renewal", "GetNextCACert")


@dataclass(frozen=True)
class ScepSettings:
    legacy_algorithms: bool = False
    getcacert_chain: bool = True
    #: false: omit POSTPKIOperation and SCEPStandard, so clients fall back to GET (old NDES style)
    advertise_post: bool = True
    max_clock_skew: dt.timedelta | None = None
    #: initial enrollments wait for `scepd pending approve` (renewals never do); only used when
    #: no pipeline is given (the app passes one built from `[policy] require_approval`)
    require_approval: bool = False
    #: `[policy]`: signer certificate keys outside them are refused before any verification
    key_limits: KeyLimits = KeyLimits()


@dataclass(frozen=True)
class ScepOutcome:
    """What happened, for logs and metrics (the reply bytes are separate)."""

    message_type: int
    transaction_id: str
    status: wire.PkiStatus
    fail_info: int | None = None
    serial: str | None = None
    cipher: str | None = None
    digest: str | None = None


class ScepService:
    def __init__(self, ca: CaMaterial, enrollment: EnrollmentService, challenges: ChallengeService,
                 profile: Profile, clock: Clock, settings: ScepSettings,
                 ra: wire.Recipient | None = None, renewal: RenewalPolicy | None = None,
                 external_check: ExternalCheck | None = None,
                 crl_provider: Callable[[], Awaitable[bytes]] | None = None,
                 next_ca: tuple[x509.Certificate, ...] = (),
                 previous_recipients: tuple[wire.Recipient, ...] = (),
                 pipeline: Pipeline | None = None):
        self.ca = ca
        self.renewal = renewal or RenewalPolicy(enrollment.store, [ca.cert], RenewalSettings())
        self.external_check = external_check or ExternalCheck()
        #: the one enrollment path (scepd/pipeline.py): this front end only authenticates
        self.pipeline = pipeline or Pipeline(enrollment, self.external_check,
                                             ApprovalPolicy.parse(settings.require_approval),
                                             {"scep": profile.name})
        self.crl_provider = crl_provider
        self.next_ca = next_ca
        self.enrollment = enrollment
        self.challenges = challenges
        self.profile = profile
        self.clock = clock
        self.settings = settings
        self.ra = ra
        ca_recipient = wire.Recipient(ca.cert, ca.key) if isinstance(ca.key, rsa.RSAPrivateKey) else None
        # previous CAs still decrypt: clients that fetched GetCACert before a rollover
        self.recipients = [r for r in (ra, ca_recipient) if r is not None] + list(previous_recipients)
        if not self.recipients:
            raise ValueError("SCEP needs an RSA CA or an RSA RA to decrypt requests")
        signer = ra or ca_recipient
        self.signer_cert, self.signer_key = signer.cert, signer.key
        # an RA signer's path runs through the issuing CA: carry it so clients can build it
        self._reply_extra_certs = (ca.cert, *ca.intermediates) if ra else ca.intermediates
        self._ca_certs_reply = self._build_ca_certs()
        self._next_ca_reply: tuple[tuple[x509.Certificate, ...], bytes] | None = None

    # --- GetCACaps / GetCACert --------------------------------------------------------------

    def capabilities(self) -> str:
        caps = CAPABILITIES if self.settings.advertise_post else tuple(
            c for c in CAPABILITIES if c not in ("POSTPKIOperation", "SCEPStandard"))
        return "".join(cap + "\r\n" for cap in caps)

    def _build_ca_certs(self) -> tuple[bytes, str]:
        der = serialization.Encoding.DER
        if self.ra is None and not self.settings.getcacert_chain:
            return self.ca.cert.public_bytes(der), "application/x-x509-ca-cert"
        # signer/decrypter first (RA, then the issuing CA), then the rest of the chain
        certs: list[x509.Certificate] = [self.ra.cert] if self.ra else []
        certs += list(self.ca.chain) if self.settings.getcacert_chain else [self.ca.cert]
        return wire.certs_only([c.public_bytes(der) for c in certs]), "application/x-x509-ca-ra-cert"

    def ca_certs(self) -> tuple[bytes, str]:
        return self._ca_certs_reply

    def next_ca_certs(self) -> bytes | None:
        """GetNextCACert body, or None when no rollover is prepared. It signs: the transport
        calls it in a worker thread."""
        if not self.next_ca:
            return None
        # signed once per CA set (the reply changes only when next_ca does), not per request
        if self._next_ca_reply is None or self._next_ca_reply[0] != self.next_ca:
            body = wire.encode_next_ca_certs(list(self.next_ca), self.signer_cert, self.signer_key,
                                             self.clock.now(), extra_certs=self._reply_extra_certs)
            self._next_ca_reply = (self.next_ca, body)
        return self._next_ca_reply[1]

    # --- PKIOperation -----------------------------------------------------------------------

    async def pki_operation(self, message_der: bytes, requester: str | None = None,
                            admit: Callable[[int, str], None] | None = None) -> tuple[bytes, ScepOutcome]:
        """`admit(message_type, transaction_id)` runs once the message is decoded and verified,
        before decryption: a ScepdError it raises (a rate limit) is answered as a signed FAILURE."""
        reply, outcome, msg = await self._pki_operation(message_der, requester, admit)
        return reply, dataclasses.replace(outcome, cipher=msg.envelope.cipher if msg.envelope else None,
                                          digest=msg.digest)

    async def _pki_operation(self, message_der: bytes, requester: str | None, admit=None):
        # RSA and CMS work runs in worker threads (pyca/cryptography releases the GIL), so the
        # event loop keeps serving and a second core is used. Everything before the policy
        # decisions -- decode and verify, the rate-limit gate, decryption, the CSR's checks --
        # and the reads that depend on it are ONE hop: a read unit whose `prepare` is
        # _receive (on SQLite both run in one store thread; see SqlStore.read)
        received, rows = await self.enrollment.store.read(
            self._lookup, prepare=lambda: self._receive(message_der, admit))  # raises HTTP_ERRORS
        msg = received.msg
        set_transaction_id(msg.transaction_id)  # on every log line from here on
        digest = msg.digest if self._digest_allowed(msg.digest) else "sha256"
        try:
            if received.error is not None:
                raise received.error
            if received.opened is not None:
                return (*await self._enroll(msg, received.opened, rows, digest, requester), msg)
            if msg.message_type == wire.MessageType.CERT_POLL:
                return (*await self._poll(msg, received.data, digest), msg)
            if msg.message_type == wire.MessageType.GET_CERT:
                return (*await self._get_cert(msg, received.data, digest), msg)
            if msg.message_type == wire.MessageType.GET_CRL:
                return (*await self._get_crl(msg, received.data, digest), msg)
            raise UnsupportedMessageType(f"messageType {msg.message_type} is not supported")
        except (NotForUs, Unavailable):  # NotForUs: decided from recipient identifiers, before
            raise  # any decryption: HTTP 400. Unavailable (the key token): HTTP 503, not a FAILURE
        except ScepdError as err:
            fail_info = mapping_for(err).fail_info
            # an UnreadableEnvelope's reason (padding, parse, CSR...) goes to the log, never the reply
            log.info("SCEP FAILURE txn=%s type=%s failInfo=%s: %s", msg.transaction_id,
                     msg.message_type, fail_info.name,
                     f"{err.detail} ({err.reason})" if isinstance(err, UnreadableEnvelope) else err.detail)
            rep = wire.CertRep(transaction_id=msg.transaction_id, recipient_nonce=msg.sender_nonce,
                               sender_nonce=os.urandom(16), status=wire.PkiStatus.FAILURE,
                               fail_info=int(fail_info), fail_info_text=err.detail)
            return await asyncio.to_thread(self._sign, rep, digest), ScepOutcome(
                msg.message_type, msg.transaction_id, wire.PkiStatus.FAILURE, int(fail_info)), msg

    def _receive(self, message_der: bytes, admit) -> "_Received":
        """The CPU work of any PKIOperation before a decision, in a worker (or store) thread:
        decode and verify the message (HTTP_ERRORS propagate), `admit` it (the rate-limit gate,
        before anything is decrypted), check its algorithms and time, then open the envelope:
        for a PKCSReq/RenewalReq with its CSR's checks (_open_enrollment). A ScepdError from
        `admit` on is kept in `error`, to be answered with a signed FAILURE."""
        try:
            msg = wire.decode_pki_message(message_der, self._check_key)
        except wire.SignerKeyRefused as exc:  # a signed FAILURE badAlg; the unverified message
            return _Received(exc.message, error=exc.error)  # only addresses it (anyone may sign such a one)
        try:
            if admit is not None:
                admit(msg.message_type, msg.transaction_id)
            self._check_algorithms(msg)
            self._check_time(msg)
            if msg.envelope is None:
                raise MalformedRequest("the message has no pkcsPKIEnvelope")
            if msg.message_type in (wire.MessageType.PKCS_REQ, wire.MessageType.RENEWAL_REQ):
                return _Received(msg, opened=self._open_enrollment(msg))
            return _Received(msg, data=wire.open_envelope(msg.envelope, self.recipients))
        except ScepdError as err:
            return _Received(msg, error=err)

    def _lookup(self, conn, received: "_Received"):
        """A PKCSReq/RenewalReq's read unit: everything it reads, once -- the transaction's
        earlier answers, the presented one-time challenge, a renewal signer's inventory row."""
        opened = received.opened
        if opened is None:
            return received, None
        certs, pendings = sql.find_transaction(conn, received.msg.transaction_id)
        return received, (certs, pendings,
                          sql.find_challenge(conn, opened.challenge_key) if opened.challenge_key else None,
                          sql.get_certificate(conn, opened.signer_serial) if opened.signer_serial else None)

    def _check_key(self, public_key) -> None:
        """Signer and CSR keys: checked before their signatures are verified."""
        check_key(public_key, self.settings.key_limits)

    def _digest_allowed(self, digest: str) -> bool:
        return digest not in wire.LEGACY_DIGESTS or self.settings.legacy_algorithms

    def _check_algorithms(self, msg: wire.PkiMessage) -> None:
        if not self._digest_allowed(msg.digest):
            raise ForbiddenAlgorithm(f"digest {msg.digest} is not accepted (RFC 8894 §2.9); use SHA-256")
        if msg.envelope is not None:
            cipher = msg.envelope.cipher
            if cipher not in wire.CIPHERS:
                raise ForbiddenAlgorithm(f"content encryption {cipher} is not supported; use AES")
            if cipher in wire.LEGACY_CIPHERS and not self.settings.legacy_algorithms:
                raise ForbiddenAlgorithm("single DES is not accepted (RFC 8894 §2.9); use AES or DES3")
        if not isinstance(msg.signer_cert.public_key(), rsa.RSAPublicKey):
            raise ForbiddenAlgorithm("the signer certificate must hold an RSA key to receive the reply")

    def _check_time(self, msg: wire.PkiMessage) -> None:
        skew = self.settings.max_clock_skew
        if skew and msg.signing_time is not None:
            if abs(msg.signing_time - self.clock.now()) > skew:
                raise BadTime("signingTime is too far from the server's clock")

    def _open_enrollment(self, msg: wire.PkiMessage) -> "_Opened":
        """The CPU work of a PKCSReq/RenewalReq before any lookup, in one worker thread: open the
        envelope (one UnreadableEnvelope for every failure, see open_envelope), decode and verify
        the CSR (the key limits before its signature; the digests a SCEP message may use), and,
        for a signer that claims to be ours, verify it was (the renewal check)."""
        csr_der = wire.open_envelope(msg.envelope, self.recipients)
        digests = LEGACY_SCEP_DIGESTS if self.settings.legacy_algorithms else SCEP_DIGESTS
        facts = _decode_enveloped_csr(csr_der, check_key=self._check_key, allowed_digests=digests)
        candidate = self.renewal.is_candidate(msg.signer_cert)
        return _Opened(csr_der, facts, candidate, self.renewal.issuer_of(msg.signer_cert) if candidate else None,
                       challenge_key=self.challenges.lookup_key(facts.challenge_password),
                       signer_serial=serial_hex(msg.signer_cert.serial_number) if candidate else None,
                       signer_spki_sha256=_spki_sha256(msg.signer_cert))

    async def _enroll(self, msg: wire.PkiMessage, opened: "_Opened", rows, digest: str,
                      requester: str | None) -> tuple[bytes, ScepOutcome]:
        csr_der, facts = opened.csr_der, opened.facts
        certs, pendings, challenge_row, signer_row = rows  # read with the message (_lookup)
        # a resent request (lost reply, or a client that polls by resending: certmonger,
        # micromdm scepclient) is the same transaction, answered from what we already decided
        # ...unless it is signed by that very certificate: then it is a same-key renewal
        # (micromdm scepclient keeps key and transactionID when it renews)
        for record in sorted(certs, key=lambda r: r.issued_at, reverse=True):
            if record.spki_sha256 == facts.spki_sha256:
                cert = x509.load_der_x509_certificate(record.der)
                if cert != msg.signer_cert:
                    return await asyncio.to_thread(self._success, msg, cert, digest)
                break
        for pending in pendings:
            if pending.spki_sha256 == facts.spki_sha256:
                return await self._answer_pending(msg, pending, digest)
        # authenticate: a renewal signed by one of our certificates, or a challenge
        auth = dict(protocol="scep", requester=requester, transaction_id=msg.transaction_id,
                    presented_challenge=facts.challenge_password)
        if opened.renewal_candidate:
            try:
                grant = await self.renewal.authorize(msg.signer_cert, facts, self.clock.now(),
                                                     issuer=opened.renewal_issuer, record=signer_row)
                authorization = Authorization("renewal", renewal_of=grant.old_serial,
                                              challenge_kind="renewal", renewal_record=signer_row, **auth)
            except RenewalRefused as refused:
                challenge_grant = await self._challenge_instead_of_renewal(msg, facts, refused, challenge_row)
                authorization = _challenge_authorization(challenge_grant, auth)
        elif msg.message_type == wire.MessageType.RENEWAL_REQ:
            raise RenewalRefused("a RenewalReq must be signed by a certificate issued by this CA")
        else:
            challenge_grant = await self.challenges.verify(facts.challenge_password, facts.common_name,
                                                           record=challenge_row)
            authorization = _challenge_authorization(challenge_grant, auth)
        # everything else (names, profile, policy, external check, approval, issuance): the
        # pipeline; the SUCCESS reply is built in the hop that signs the certificate, and
        # returned once the certificate is committed
        decision = await self.pipeline.enroll(authorization, CsrRequest(
            facts, csr_der, signer_spki_sha256=opened.signer_spki_sha256),
            finish=lambda cert: self._success(msg, cert, digest))
        if decision.pending is not None:
            return await self._pending(msg, digest, decision.pending.id)
        if decision.issued.reply is not None:
            return decision.issued.reply
        return await asyncio.to_thread(self._success, msg, decision.issued.cert, digest)

    async def _challenge_instead_of_renewal(self, msg: wire.PkiMessage, facts: CsrFacts,
                                            refused: RenewalRefused, challenge_row) -> ChallengeGrant:
        """A request signed by one of our certificates that is no valid renewal (another CN, an
        expired or revoked signer), but carries a valid challenge, is an initial enrollment that
        challenge authenticates, and spends: strongSwan `pki --scep --cert old.pem --key old.key
        --password ... --dn CN=other`, certmonger after a subject change. strongSwan 5.9 sends
        that as a RenewalReq (17) when Renewal is advertised, so both message types qualify;
        without a valid challenge (micromdm scepclient's RenewalReq carries none) the renewal
        refusal is the answer."""
        if not facts.challenge_password:
            raise refused
        try:
            grant = await self.challenges.verify(facts.challenge_password, facts.common_name,
                                                 record=challenge_row)
        except ChallengeRejected:
            raise refused from None
        log.info("txn=%s: not a renewal (%s); enrolled with its challenge instead",
                 msg.transaction_id, refused.detail)
        return grant

    async def _answer_pending(self, msg: wire.PkiMessage, pending, digest: str) -> tuple[bytes, ScepOutcome]:
        if pending.status == "pending":
            return await self._pending(msg, digest, pending.id)
        if pending.status == "rejected":
            raise RequestRejected(f"rejected by an administrator: {pending.reason or 'no reason given'}")
        record = await self.enrollment.store.get_certificate(pending.serial)
        return await asyncio.to_thread(self._success, msg, x509.load_der_x509_certificate(record.der), digest)

    async def _poll(self, msg: wire.PkiMessage, data: bytes, digest: str) -> tuple[bytes, ScepOutcome]:
        """CertPoll/GetCertInitial: matched on transactionID plus a public key (the requested
        key or the key that signed the original request), never on signer certificate bytes:
        sscep resumes polling with a fresh self-signed signer."""
        wire.decode_issuer_and_subject(data)  # must be well formed; the transaction decides
        signer_spki = _spki_sha256(msg.signer_cert)
        record = await self.enrollment.store.find_certificate_for_transaction(msg.transaction_id, signer_spki)
        if record is not None:
            return await asyncio.to_thread(self._success, msg, x509.load_der_x509_certificate(record.der),
                                           digest)
        for pending in await self.enrollment.store.find_pending(msg.transaction_id):
            if signer_spki in (pending.spki_sha256, pending.signer_spki_sha256):
                return await self._answer_pending(msg, pending, digest)
        raise UnknownTransaction("no request with this transactionID and key is known here")

    async def _get_cert(self, msg: wire.PkiMessage, data: bytes, digest: str) -> tuple[bytes, ScepOutcome]:
        ias = wire.decode_issuer_and_serial(data)
        try:
            record = await self.enrollment.store.get_certificate(serial_hex(ias.serial))
        except StoreNotFound:
            raise BadCertId("no certificate with this issuer and serial number") from None
        cert = x509.load_der_x509_certificate(record.der)
        if cert.issuer.public_bytes() != ias.issuer_der:
            raise BadCertId("no certificate with this issuer and serial number")
        return await asyncio.to_thread(self._success, msg, cert, digest)

    async def _get_crl(self, msg: wire.PkiMessage, data: bytes, digest: str) -> tuple[bytes, ScepOutcome]:
        """GetCRL: IssuerAndSerialNumber of a certificate we issued, or of the CA itself (sscep
        without -O asks with the CA's own subject and serial)."""
        ias = wire.decode_issuer_and_serial(data)
        ours = {self.ca.cert.subject.public_bytes(), self.ca.cert.issuer.public_bytes()}
        if ias.issuer_der not in ours:
            raise BadCertId("this server publishes no CRL for that issuer")
        if self.crl_provider is None:
            raise BadRequest("no CRL is available")
        crl_der = await self.crl_provider()

        def reply() -> tuple[bytes, ScepOutcome]:
            body = wire.certs_only([], [crl_der])
            envelope = wire.envelope_to(msg.signer_cert, body, msg.envelope.cipher)
            return self._reply_success(msg, envelope, digest, None)
        return await asyncio.to_thread(reply)

    def _success(self, msg: wire.PkiMessage, cert: x509.Certificate, digest: str) -> tuple[bytes, ScepOutcome]:
        leaf = cert.public_bytes(serialization.Encoding.DER)
        envelope = wire.envelope_to(msg.signer_cert, wire.certs_only([leaf]), msg.envelope.cipher)
        return self._reply_success(msg, envelope, digest, serial_hex(cert.serial_number))

    def _reply_success(self, msg, envelope: bytes, digest: str, serial: str | None) -> tuple[bytes, ScepOutcome]:
        rep = wire.CertRep(transaction_id=msg.transaction_id, recipient_nonce=msg.sender_nonce,
                           sender_nonce=os.urandom(16), status=wire.PkiStatus.SUCCESS,
                           envelope_der=envelope)
        return self._sign(rep, digest), ScepOutcome(msg.message_type, msg.transaction_id,
                                                    wire.PkiStatus.SUCCESS, serial=serial)

    async def _pending(self, msg: wire.PkiMessage, digest: str, pending_id: int) -> tuple[bytes, ScepOutcome]:
        rep = wire.CertRep(transaction_id=msg.transaction_id, recipient_nonce=msg.sender_nonce,
                           sender_nonce=os.urandom(16), status=wire.PkiStatus.PENDING)
        return await asyncio.to_thread(self._sign, rep, digest), ScepOutcome(
            msg.message_type, msg.transaction_id, wire.PkiStatus.PENDING)

    def _sign(self, rep: wire.CertRep, digest: str) -> bytes:
        return wire.encode_cert_rep(rep, self.signer_cert, self.signer_key, digest, self.clock.now(),
                                    self._reply_extra_certs)


def _decode_enveloped_csr(csr_der: bytes, **options):
    """decode_csr for a CSR that came out of a pkcsPKIEnvelope: a CSR that does not decode or
    whose signature does not verify is one more UnreadableEnvelope, answered like a padding
    error (no oracle). Refusals of a CSR that did decode and verify keep their own answer."""
    try:
        return decode_csr(csr_der, **options)
    except (MalformedRequest, BadMessageCheck) as err:
        raise UnreadableEnvelope(f"the CSR: {err.detail}") from None
    except RecursionError:
        raise UnreadableEnvelope("the CSR: nested too deeply") from None


@dataclass(frozen=True)
class _Opened:
    """A PKCSReq/RenewalReq after its CPU checks (ScepService._open_enrollment)."""

    csr_der: bytes
    facts: CsrFacts
    renewal_candidate: bool  # the signer claims to be one of our certificates
    renewal_issuer: x509.Certificate | None  # ...and this CA of ours signed it (None: none did)
    challenge_key: str | None = None  # ChallengeService.lookup_key of the presented challenge
    signer_serial: str | None = None  # a renewal candidate's serial (its inventory row is read)
    signer_spki_sha256: str | None = None


@dataclass(frozen=True)
class _Received:
    """A PKIOperation after ScepService._receive: the decoded message, and either the ScepdError
    it is answered with, or what its envelope held (`opened` for a PKCSReq/RenewalReq, else
    the decrypted `data`)."""

    msg: wire.PkiMessage
    error: ScepdError | None = None
    opened: _Opened | None = None
    data: bytes | None = None


def _challenge_authorization(grant: ChallengeGrant, auth: dict) -> Authorization:
    """A challenge grant as the pipeline's Authorization (its name scope and profile)."""
    return Authorization("challenge", names=grant.names, profile=grant.profile,
                         challenge_id=grant.one_time_id, challenge_kind=grant.kind, **auth)


def _spki_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
