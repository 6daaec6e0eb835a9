"""The EST service (RFC 7030, RFC 8951): decoded requests in, certificates out. No HTTP here
(see transport.py, which reads the body, the Basic credentials and the TLS client certificate).

request -> decode (base64 PKCS#10) -> authenticate (an Authorization)
        -> pipeline (scepd/enroll/pipeline.py: names, profile, policy, external check, approval, issue)
        -> encode (base64 certs-only PKCS#7)

Authentication, as the transport hands it over (`Credentials`):
  * simpleenroll / serverkeygen: HTTP Basic, any user name, the password a one-time or the static
    challenge (scepd/enroll/challenges.py: the same scope of names and profile as in SCEP);
    without Basic credentials, a TLS client certificate of ours (valid, in the inventory, not
    revoked) authorizes a new certificate for the names that certificate carries (its CN and
    SANs), nothing else.
  * simplereenroll: the TLS client certificate being renewed (scepd/enroll/renewal.py: same CN,
    no new subjectAltName, a new key unless `[scep] renewal_same_key`).
A request that waits for approval is found again by its key and its credential: the transaction
id is a hash of the CSR's public key and the password (or the client certificate's serial), so
the client's retry of the same request gets 202 again, then its certificate.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import glob
import hashlib
import logging
import re
from dataclasses import dataclass, field, replace

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ..ca.csr import CsrFacts, certificate_sans, decode_csr
from ..ca.pki import CaMaterial
from ..ca.policy import ENROLLMENT_PROFILES, check_key, enrollment_profile
from ..clock import Clock
from ..enroll.challenges import ChallengeService, secret_hash
from ..enroll.pipeline import Authorization, CsrRequest, Pipeline
from ..enroll.renewal import RenewalPolicy, SignerNotValid
from ..errors import (ChallengeRejected, ForbiddenAlgorithm, MalformedRequest, NotFound, PolicyViolation,
                      RenewalRefused, RequestRejected, ScepdError)
from ..render import serial_hex
from ..scep.wire import certs_only
from ..store import StoreNotFound

log = logging.getLogger("scepd.est")

#: the keys serverkeygen generates (`[est] serverkeygen_key`)
SERVER_KEY_TYPES = ("rsa2048", "rsa3072", "rsa4096", "p256", "p384")

_LABEL = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # RFC 7030 §3.2.2: a label is one path segment
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


class AuthenticationRequired(ScepdError):
    """No credential, or one that authenticates nobody: HTTP 401 with WWW-Authenticate."""


class Forbidden(ScepdError):
    """An authenticated client asked for what its credential does not grant: HTTP 403."""


@dataclass(frozen=True)
class EstSettings:
    #: label -> profile; every other label is unknown (404)
    labels: dict[str, str] = field(default_factory=dict)
    serverkeygen_key: str = "rsa2048"
    #: csrattrs: dotted OIDs; empty: 204
    csr_attributes: tuple[str, ...] = ()
    retry_after: int = 60

    def __post_init__(self) -> None:
        for label, profile in self.labels.items():
            if not _LABEL.match(label):
                raise ValueError(f"[est] labels: {label!r} is not a label (letters, digits, - and _)")
            enrollment_profile(profile)  # PolicyViolation for an unknown or internal profile
        if self.serverkeygen_key not in SERVER_KEY_TYPES:
            raise ValueError(f"[est] serverkeygen_key must be one of {', '.join(SERVER_KEY_TYPES)}")
        for oid in self.csr_attributes:
            if not _OID.match(oid):
                raise ValueError(f"[est] csr_attributes: {oid!r} is not a dotted OID")
        if self.retry_after < 1:
            raise ValueError("[est] retry_after must be at least 1 second")

    @classmethod
    def parse(cls, labels: str = "", serverkeygen_key: str = "rsa2048", csr_attributes: str = "",
              retry_after: int = 60) -> "EstSettings":
        """From the `[est]` keys; ValueError naming what is wrong."""
        mapping: dict[str, str] = {}
        for item in (part.strip() for part in labels.split(",")):
            if not item:
                continue
            label, sep, profile = item.partition("=")
            if not sep or not profile.strip():
                raise ValueError(f"[est] labels: {item!r} is not label=profile")
            mapping[label.strip()] = profile.strip()
        oids = tuple(o.strip() for o in csr_attributes.split(",") if o.strip())
        try:
            return cls(mapping, serverkeygen_key.strip().lower(), oids, retry_after)
        except PolicyViolation as exc:
            raise ValueError(f"[est] labels: {exc.detail}") from None


@dataclass(frozen=True)
class Credentials:
    """What the transport authenticated: Basic credentials and/or the verified TLS peer."""

    #: the Basic password; None when the request had no Basic credentials
    password: str | None = field(default=None, repr=False)
    #: the TLS client certificate (OpenSSL verified its chain to our root during the handshake)
    client_cert: x509.Certificate | None = None
    #: who asked, for the audit records ("est:ADDRESS")
    requester: str = "est"


@dataclass(frozen=True)
class Enrolled:
    """The answer: a certificate (with the server-generated key for serverkeygen), or pending."""

    cert: x509.Certificate | None = None
    #: serverkeygen only: PKCS#8 DER of the key, handed to the client and then forgotten
    key_pkcs8: bytes | None = field(default=None, repr=False)
    pending_id: int | None = None
    retry_after: int = 0
    serial: str | None = None


def decode_base64(body: bytes, what: str) -> bytes:
    """RFC 8951 §3: base64 with any whitespace and line breaks, padding optional; a PEM armour
    is tolerated. MalformedRequest when it is not base64."""
    text = re.sub(rb"-----(BEGIN|END) [A-Z0-9 #]{1,40}-----", b"", body)
    text = re.sub(rb"\s+", b"", text).rstrip(b"=")
    if not text:
        raise MalformedRequest(f"the body carries no {what}")
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequest(f"the {what} is not base64") from None


def encode_base64(der: bytes) -> bytes:
    """base64 in one line, no line breaks (RFC 8951 §3: RFC 4648 §4; strongSwan's decoder
    does not skip line breaks)."""
    return base64.b64encode(der)


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    first, rest = 40 * parts[0] + parts[1], parts[2:]
    body = bytearray()
    for value in [first, *rest]:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.append(0x80 | (value & 0x7F))
            value >>= 7
        body += bytes(reversed(chunk))
    return b"\x06" + _der_len(len(body)) + bytes(body)


def csr_attrs_der(oids: tuple[str, ...]) -> bytes:
    """RFC 7030 §4.5.2 CsrAttrs: SEQUENCE SIZE (0..MAX) OF AttrOrOID, here OIDs only."""
    body = b"".join(_der_oid(o) for o in oids)
    return b"\x30" + _der_len(len(body)) + body


def _names_of_cert(cert: x509.Certificate) -> tuple[str, ...]:
    """The names a client certificate carries, as exact patterns (glob-escaped)."""
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    names = [str(v) for v in cns] + [s.value for s in certificate_sans(cert)]
    return tuple(dict.fromkeys(glob.escape(n) for n in names))


def generate_key(kind: str):
    if kind.startswith("rsa"):
        return rsa.generate_private_key(65537, int(kind[3:]))
    return ec.generate_private_key({"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[kind])


class EstService:
    def __init__(self, ca: CaMaterial, pipeline: Pipeline, challenges: ChallengeService,
                 renewal: RenewalPolicy, clock: Clock, settings: EstSettings = EstSettings()):
        self.ca = ca
        self.pipeline = pipeline
        self.enrollment = pipeline.enrollment
        self.challenges = challenges
        self.renewal = renewal
        self.clock = clock
        self.settings = settings
        # RFC 7030 §4.1.3: the issuing chain. In DER order (a SET OF sorted by encoding): EST
        # clients find the root by its self-signature, and strict DER parsers refuse disorder
        self._ca_certs = encode_base64(certs_only(
            sorted(c.public_bytes(serialization.Encoding.DER) for c in ca.chain)))
        self._csr_attrs = encode_base64(csr_attrs_der(settings.csr_attributes)) \
            if settings.csr_attributes else None

    # --- labels, cacerts, csrattrs ------------------------------------------------------------

    def profile_of_label(self, label: str | None) -> str | None:
        """The profile a label selects (None: no label, the `[est] profile`); NotFound if unknown."""
        if label is None:
            return None
        try:
            return self.settings.labels[label]
        except KeyError:
            raise NotFound("unknown EST label") from None

    def ca_certs(self) -> bytes:
        """cacerts: base64 certs-only PKCS#7 of the issuing chain."""
        return self._ca_certs

    def csr_attrs(self) -> bytes | None:
        """csrattrs: base64 CsrAttrs, or None (204: nothing in particular is wanted)."""
        return self._csr_attrs

    # --- simpleenroll, simplereenroll, serverkeygen ------------------------------------------

    async def simple_enroll(self, body: bytes, creds: Credentials, label: str | None = None) -> Enrolled:
        return await self._enroll(body, creds, label, renew=False, server_key=False)

    async def simple_reenroll(self, body: bytes, creds: Credentials, label: str | None = None) -> Enrolled:
        return await self._enroll(body, creds, label, renew=True, server_key=False)

    async def server_keygen(self, body: bytes, creds: Credentials, label: str | None = None) -> Enrolled:
        return await self._enroll(body, creds, label, renew=False, server_key=True)

    async def _enroll(self, body: bytes, creds: Credentials, label: str | None, *, renew: bool,
                      server_key: bool) -> Enrolled:
        profile = self.profile_of_label(label)
        csr_der = decode_base64(body, "PKCS#10 request")
        limits = self.enrollment.key_limits
        try:  # the key limits before the signature check, which runs off the loop
            facts = await asyncio.to_thread(decode_csr, csr_der, True, lambda k: check_key(k, limits))
        except RecursionError:
            raise MalformedRequest("the CSR is nested too deeply") from None
        except ForbiddenAlgorithm as err:
            raise MalformedRequest(err.detail) from None
        if renew:
            auth = await self._renewal(facts, creds)
        else:
            # serverkeygen never waits (see _server_keygen), so it has nothing to find again
            auth, found = await self._new_enrollment(facts, creds, profile, lookup=not server_key)
            if found is not None:
                return found
        if server_key:
            return await self._server_keygen(auth, facts, csr_der)
        decision = await self.pipeline.enroll(auth, CsrRequest(facts, csr_der))
        if decision.pending is not None:
            log.info("EST request pending id=%s txn=%s", decision.pending.id, auth.transaction_id)
            return Enrolled(pending_id=decision.pending.id, retry_after=self.settings.retry_after)
        cert = decision.issued.cert
        return Enrolled(cert=cert, serial=serial_hex(cert.serial_number))

    async def _renewal(self, facts: CsrFacts, creds: Credentials) -> Authorization:
        cert = creds.client_cert
        if cert is None:
            raise AuthenticationRequired("simplereenroll needs the TLS client certificate being renewed")
        try:
            grant = await self.renewal.authorize(cert, facts, self.clock.now())
        except SignerNotValid as err:
            log.info("EST simplereenroll: client certificate refused: %s", err.detail)
            raise AuthenticationRequired("the client certificate does not authenticate this request") from None
        except RenewalRefused as err:
            raise Forbidden(err.detail) from None
        if grant.old_record is None:  # signed by our key but not in the inventory
            raise AuthenticationRequired("the client certificate does not authenticate this request")
        return Authorization("renewal", protocol="est", renewal_of=grant.old_serial, challenge_kind="renewal",
                             requester=creds.requester, transaction_id=_transaction(facts, f"renew:{grant.old_serial}"))

    async def _new_enrollment(self, facts: CsrFacts, creds: Credentials, profile: str | None,
                              lookup: bool = True) -> tuple[Authorization, Enrolled | None]:
        """(the Authorization, or the answer to a request already decided or waiting)."""
        base = dict(protocol="est", requester=creds.requester)
        if creds.password is not None:
            txn = _transaction(facts, "pw:" + secret_hash(creds.password))
            found = await self._known(txn, facts) if lookup else None
            if found is not None:
                return Authorization("challenge", **base), found
            try:
                grant = await self.challenges.verify(creds.password, facts.common_name)
            except ChallengeRejected:
                raise AuthenticationRequired("the password is invalid, expired or already used") from None
            if grant.kind == "none":  # challenges not required, and an empty password
                granted = None
            else:
                granted = grant.profile
            if granted and profile and granted != profile:
                raise Forbidden(f"this challenge grants the profile {granted!r}, not {profile!r}")
            return Authorization("challenge", names=grant.names, profile=granted or profile,
                                 challenge_id=grant.one_time_id, challenge_kind=grant.kind,
                                 transaction_id=txn, presented_challenge=creds.password, **base), None
        cert = creds.client_cert
        if cert is None:
            raise AuthenticationRequired("authenticate with HTTP Basic (the challenge password) "
                                         "or a client certificate issued by this CA")
        try:
            grant = await self.renewal.check_signer(cert, self.clock.now())
        except SignerNotValid as err:
            log.info("EST: client certificate refused: %s", err.detail)
            raise AuthenticationRequired("the client certificate does not authenticate this request") from None
        if grant.old_record is None or grant.old_record.profile not in ENROLLMENT_PROFILES \
                or cert.not_valid_after_utc < self.clock.now():
            raise AuthenticationRequired("the client certificate does not authenticate this request")
        txn = _transaction(facts, f"cert:{grant.old_serial}")
        found = await self._known(txn, facts) if lookup else None
        auth = Authorization("tls-client", names=_names_of_cert(cert), profile=profile,
                             challenge_kind="tls-client", transaction_id=txn, **base)
        return auth, found

    async def _known(self, txn: str, facts: CsrFacts) -> Enrolled | None:
        """The answer to a request seen before with this key and credential: still pending
        (202), rejected (403), or issued once approved (the certificate)."""
        for pending in await self.enrollment.store.find_pending(txn):
            if pending.spki_sha256 != facts.spki_sha256:
                continue
            if pending.status == "pending":
                return Enrolled(pending_id=pending.id, retry_after=self.settings.retry_after)
            if pending.status == "rejected":
                raise RequestRejected("the request was rejected by an administrator")
            try:
                record = await self.enrollment.store.get_certificate(pending.serial)
            except StoreNotFound:
                raise RequestRejected("the request was rejected by an administrator") from None
            if record.status == "revoked":
                raise RequestRejected("the certificate issued for this request is revoked; "
                                      "enroll with a new key")
            return Enrolled(cert=x509.load_der_x509_certificate(record.der), serial=record.serial)
        return None

    async def _server_keygen(self, auth: Authorization, facts: CsrFacts, csr_der: bytes) -> Enrolled:
        """RFC 7030 §4.4: the CSR names the subject; the key is made here, put in the reply and
        forgotten (never stored, never logged). A request that would wait for approval is
        refused: its key would have to be kept until then."""
        key = await asyncio.to_thread(generate_key, self.settings.serverkeygen_key)
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        facts = replace(facts, public_key=key.public_key(), spki_der=spki)
        auth = replace(auth, transaction_id=_transaction(facts, "keygen:" + (auth.transaction_id or "")))
        approved = await self.pipeline.authorize(auth, CsrRequest(facts, csr_der))
        if auth.renewal_of is None and self.pipeline.approval.requires(auth.protocol,
                                                                        approved.request.profile.name):
            raise Forbidden("serverkeygen is not available for requests that need approval; "
                            "use simpleenroll")
        decision = await self.pipeline.complete(approved)
        cert = decision.issued.cert
        pkcs8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        return Enrolled(cert=cert, key_pkcs8=pkcs8, serial=serial_hex(cert.serial_number))

    def certs_only_base64(self, cert: x509.Certificate) -> bytes:
        """The enrollment reply: base64 certs-only PKCS#7 holding the certificate."""
        return encode_base64(certs_only([cert.public_bytes(serialization.Encoding.DER)]))


def _transaction(facts: CsrFacts, identity: str) -> str:
    """The pending-request key of EST: the request's public key and who asked."""
    return "est-" + hashlib.sha256(f"{facts.spki_sha256}|{identity}".encode()).hexdigest()[:40]

