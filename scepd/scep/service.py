"""The SCEP service: bytes in, bytes out. No HTTP here (see transport.py).

request -> decode (wire) -> authorize (challenge, policy) -> issue (enrollment: CA + store)
        -> encode (wire)
Anything that fails before we know who asked (undecodable, unverifiable, not for us) raises
a ScepdError the transport answers with HTTP 400; every later failure becomes a signed CertRep
FAILURE with the failInfo from the error table.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..challenges import ChallengeService
from ..clock import Clock
from ..csr import decode_csr
from ..enrollment import EnrollmentService
from ..errors import (BadTime, ForbiddenAlgorithm, MalformedRequest, NotForUs, ScepdError,
                      UnsupportedMessageType, UnverifiableMessage, mapping_for)
from ..pki import CaMaterial
from ..policy import Profile
from . import wire

log = logging.getLogger("scepd.scep")

#: Errors answered with HTTP 400: nothing in the message can be trusted or answered.
HTTP_ERRORS = (MalformedRequest, UnverifiableMessage, NotForUs)

#: RFC 8894 §3.5.2 keywords, exact spelling (sscep compares case-sensitively). "SHA-384" is not an
#: RFC keyword but we do verify and sign SHA-384, and strongSwan pki 5.9 (Debian 12) needs it:
#: its caps enum is 0,1,2,... yet tested as bit flags, so its AES check really tests bit 3,
#: which only "SHA-384" sets. Without it `pki --scep` refuses AES against any server.
CAPABILITIES = ("POSTPKIOperation", "SHA-1", "SHA-256", "SHA-384", "SHA-512", "AES", "DES3",
                "SCEPStandard")


@dataclass(frozen=True)
class ScepSettings:
    legacy_algorithms: bool = False
    getcacert_chain: bool = True
    #: false: omit POSTPKIOperation and SCEPStandard, so clients fall back to GET (old NDES style)
    advertise_post: bool = True
    max_clock_skew: dt.timedelta | None = None


@dataclass(frozen=True)
class ScepOutcome:
    """What happened, for logs and metrics (the reply bytes are separate)."""

    message_type: int
    transaction_id: str
    status: wire.PkiStatus
    fail_info: int | None = None
    serial: str | None = None


class ScepService:
    def __init__(self, ca: CaMaterial, enrollment: EnrollmentService, challenges: ChallengeService,
                 profile: Profile, clock: Clock, settings: ScepSettings,
                 ra: wire.Recipient | None = None):
        self.ca = ca
        self.enrollment = enrollment
        self.challenges = challenges
        self.profile = profile
        self.clock = clock
        self.settings = settings
        self.ra = ra
        ca_recipient = wire.Recipient(ca.cert, ca.key) if isinstance(ca.key, rsa.RSAPrivateKey) else None
        self.recipients = [r for r in (ra, ca_recipient) if r is not None]
        if not self.recipients:
            raise ValueError("SCEP needs an RSA CA or an RSA RA to decrypt requests")
        signer = ra or ca_recipient
        self.signer_cert, self.signer_key = signer.cert, signer.key
        # an RA signer's path runs through the issuing CA: carry it so clients can build it
        self._reply_extra_certs = (ca.cert, *ca.intermediates) if ra else ca.intermediates
        self._ca_certs_reply = self._build_ca_certs()

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

    # --- PKIOperation -----------------------------------------------------------------------

    async def pki_operation(self, message_der: bytes, requester: str | None = None
                            ) -> tuple[bytes, ScepOutcome]:
        msg = wire.decode_pki_message(message_der)  # raises HTTP_ERRORS
        digest = msg.digest if self._digest_allowed(msg.digest) else "sha256"
        try:
            self._check_algorithms(msg)
            self._check_time(msg)
            if msg.envelope is None:
                raise MalformedRequest("the message has no pkcsPKIEnvelope")
            data = wire.open_envelope(msg.envelope, self.recipients)
            if msg.message_type in (wire.MessageType.PKCS_REQ, wire.MessageType.RENEWAL_REQ):
                return await self._enroll(msg, data, digest, requester)
            raise UnsupportedMessageType(f"messageType {msg.message_type} is not supported")
        except NotForUs:
            raise
        except ScepdError as err:
            fail_info = mapping_for(err).fail_info
            log.info("SCEP FAILURE txn=%s type=%s failInfo=%s: %s", msg.transaction_id,
                     msg.message_type, fail_info.name, err.detail)
            rep = wire.CertRep(transaction_id=msg.transaction_id, recipient_nonce=msg.sender_nonce,
                               sender_nonce=os.urandom(16), status=wire.PkiStatus.FAILURE,
                               fail_info=int(fail_info), fail_info_text=err.detail)
            return self._sign(rep, digest), ScepOutcome(msg.message_type, msg.transaction_id,
                                                        wire.PkiStatus.FAILURE, int(fail_info))

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

    async def _enroll(self, msg: wire.PkiMessage, csr_der: bytes, digest: str,
                      requester: str | None) -> tuple[bytes, ScepOutcome]:
        facts = decode_csr(csr_der)
        issued = await self.enrollment.previous_answer(msg.transaction_id, facts)
        if issued is None:
            grant = await self.challenges.verify(facts.challenge_password, facts.common_name)
            request = self.enrollment.approve(facts, self.profile)
            issued = await self.enrollment.issue(
                request, grant, protocol="scep", transaction_id=msg.transaction_id,
                requester=requester, spki_sha256=facts.spki_sha256)
        leaf = issued.cert.public_bytes(serialization.Encoding.DER)
        envelope = wire.envelope_to(msg.signer_cert, wire.certs_only([leaf]), msg.envelope.cipher)
        rep = wire.CertRep(transaction_id=msg.transaction_id, recipient_nonce=msg.sender_nonce,
                           sender_nonce=os.urandom(16), status=wire.PkiStatus.SUCCESS,
                           envelope_der=envelope)
        return self._sign(rep, digest), ScepOutcome(msg.message_type, msg.transaction_id,
                                                    wire.PkiStatus.SUCCESS, serial=issued.record.serial)

    def _sign(self, rep: wire.CertRep, digest: str) -> bytes:
        return wire.encode_cert_rep(rep, self.signer_cert, self.signer_key, digest, self.clock.now(),
                                    self._reply_extra_certs)
