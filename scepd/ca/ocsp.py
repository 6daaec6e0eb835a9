"""OCSP responder (RFC 6960): DER request in, signed DER response out. No HTTP here.

Each request names one certificate by (hash algorithm, issuer name hash, issuer key hash,
serial). We answer for every issuing CA we hold (the current one and previous ones after a
rollover), signed by that CA itself (RFC 6960 §4.2.2.2 case 1) or, with `[ca] ocsp_delegated`,
for the current CA by a delegated responder certificate (case 3: EKU id-kp-OCSPSigning,
id-pkix-ocsp-nocheck, issued through the ordinary enrollment path, renewed at 2/3 of its life):
  good     the certificate is in our inventory and not revoked (an expired one is still "good":
           OCSP reports revocation, not validity)
  revoked  with revocationTime and reason (absent for unspecified)
  unknown  our issuer, but a serial we never issued
  unauthorized (response status) an issuer we do not serve
  malformedRequest (response status) anything that does not decode
The status comes straight from the store (a primary-key lookup), so a revocation made by any
process is visible on the next request. A nonce (1..32 octets, RFC 8954) is echoed.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from ..clock import Clock
from .crl import Signer
from ..render import serial_hex
from ..store import SqlStore, StoreNotFound

log = logging.getLogger("scepd.ocsp")

#: How long a response may be cached (nextUpdate and HTTP max-age).
RESPONSE_LIFETIME = dt.timedelta(hours=1)
MAX_REQUEST_BYTES = 16 * 1024

_HASHES = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384,
           "sha512": hashlib.sha512}
_CRYPTO_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
                  "sha512": hashes.SHA512}


def _issuer_hashes(cert: x509.Certificate, algorithm: str) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) of a CA certificate (RFC 6960 §4.1.1)."""
    h = _HASHES[algorithm]
    name_hash = h(cert.subject.public_bytes()).digest()
    # the key hash covers the BIT STRING value of subjectPublicKey, without tag and length
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    from asn1crypto import keys
    key_bits = keys.PublicKeyInfo.load(spki)["public_key"].contents[1:]  # skip unused-bits octet
    return name_hash, h(key_bits).digest()


@dataclass(frozen=True)
class OcspAnswer:
    der: bytes
    status: str  # good | revoked | unknown | malformedRequest | unauthorized | internalError
    max_age: int = 0  # seconds a cache may keep it (0 = do not cache)


def _error(status: ocsp.OCSPResponseStatus, label: str) -> OcspAnswer:
    return OcspAnswer(ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER), label)


class DelegatedResponder:
    """DIR/ocsp/responder.pem and responder.key (0600): an OCSP signing certificate of the
    current issuing CA, issued on first use and renewed once two thirds of its life have passed."""

    def __init__(self, directory: Path, enrollment):
        self.directory = directory
        self.enrollment = enrollment
        self.cert_path = directory / "responder.pem"
        self.key_path = directory / "responder.key"
        self._current: tuple[x509.Certificate, object] | None = None
        self._lock = asyncio.Lock()

    @property
    def ca_id(self) -> str:
        return self.enrollment.ca.ca_id

    def _load(self) -> tuple[x509.Certificate, object] | None:
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        except (FileNotFoundError, ValueError, TypeError):
            return None
        return cert, key

    def _due(self, pair, now: dt.datetime) -> bool:
        if pair is None:
            return True
        cert = pair[0]
        if cert.issuer != self.enrollment.ca.material.cert.subject:
            return True
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        return now >= cert.not_valid_before_utc + lifetime * 2 / 3

    async def current(self) -> tuple[x509.Certificate, object]:
        now = self.enrollment.clock.now()
        if not self._due(self._current, now):
            return self._current  # type: ignore[return-value]
        async with self._lock:
            pair = self._current if not self._due(self._current, now) else self._load()
            if self._due(pair, now):
                pair = await self._issue()
            self._current = pair
            return pair  # type: ignore[return-value]

    async def _issue(self) -> tuple[x509.Certificate, object]:
        from .pki import write_private, write_public
        from .policy import PROFILES
        issued, key = await self.enrollment.issue_internal("scepd OCSP responder", (), PROFILES["ocsp"],
                                                           "scepd:ocsp")
        write_private(self.key_path, key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()), replace=True)
        write_public(self.cert_path, issued.cert.public_bytes(serialization.Encoding.PEM))
        log.info("OCSP responder certificate issued: serial=%s", issued.record.serial)
        return issued.cert, key


class OcspResponder:
    def __init__(self, store: SqlStore, clock: Clock, signers: list[Signer],
                 lifetime: dt.timedelta = RESPONSE_LIFETIME, delegate: DelegatedResponder | None = None):
        self.store = store
        self.clock = clock
        self.signers = list(signers)
        self.lifetime = lifetime
        self.delegate = delegate
        self._index: dict[tuple[str, bytes, bytes], Signer] = {}
        for signer in self.signers:
            for algorithm in _HASHES:
                name_hash, key_hash = _issuer_hashes(signer.cert, algorithm)
                self._index[(algorithm, name_hash, key_hash)] = signer

    async def respond(self, request_der: bytes) -> OcspAnswer:
        if not request_der or len(request_der) > MAX_REQUEST_BYTES:
            return _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformedRequest")
        try:
            req = ocsp.load_der_ocsp_request(request_der)
            algorithm = req.hash_algorithm.name
            key = (algorithm, req.issuer_name_hash, req.issuer_key_hash)
            serial = req.serial_number
            nonce = None
            for ext in req.extensions:
                if isinstance(ext.value, x509.OCSPNonce):
                    nonce = ext.value.nonce
        except Exception:  # cryptography raises ValueError and friends on anything odd
            return _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformedRequest")
        if nonce is not None and not 1 <= len(nonce) <= 32:
            return _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformedRequest")
        signer = self._index.get(key) if algorithm in _HASHES else None
        if signer is None:
            return _error(ocsp.OCSPResponseStatus.UNAUTHORIZED, "unauthorized")
        if serial <= 0:
            return _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformedRequest")
        try:
            status, revoked_at, reason = await self._status(signer, serial_hex(serial))
        except Exception:  # store unreachable: RFC 6960 tryLater, never an HTTP 500
            log.exception("OCSP status lookup failed")
            return _error(ocsp.OCSPResponseStatus.TRY_LATER, "tryLater")
        now = self.clock.now().replace(microsecond=0)
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=req.issuer_name_hash, issuer_key_hash=req.issuer_key_hash,
            serial_number=serial, algorithm=_CRYPTO_HASHES[algorithm](), cert_status=status,
            this_update=now, next_update=now + self.lifetime, revocation_time=revoked_at,
            revocation_reason=reason)
        responder_cert, responder_key = signer.cert, signer.key
        if self.delegate is not None and self.delegate.ca_id == signer.ca_id:
            try:
                responder_cert, responder_key = await self.delegate.current()
            except Exception:
                log.exception("OCSP responder certificate unavailable")
                return _error(ocsp.OCSPResponseStatus.INTERNAL_ERROR, "internalError")
            builder = builder.certificates([responder_cert])  # so clients can check the delegation
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder_cert)
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        response = await asyncio.to_thread(builder.sign, responder_key, hashes.SHA256())
        label = {ocsp.OCSPCertStatus.GOOD: "good", ocsp.OCSPCertStatus.REVOKED: "revoked",
                 ocsp.OCSPCertStatus.UNKNOWN: "unknown"}[status]
        # a response carrying the client's nonce is for that client only
        max_age = 0 if nonce is not None else int(min(self.lifetime, dt.timedelta(minutes=5)).total_seconds())
        return OcspAnswer(response.public_bytes(serialization.Encoding.DER), label, max_age)

    async def _status(self, signer: Signer, serial: str):
        try:
            rec = await self.store.get_certificate(serial)
        except StoreNotFound:
            return ocsp.OCSPCertStatus.UNKNOWN, None, None
        if rec.ca_id != signer.ca_id:
            return ocsp.OCSPCertStatus.UNKNOWN, None, None
        if rec.status != "revoked":
            return ocsp.OCSPCertStatus.GOOD, None, None
        from .crl import _reason_flag
        revoked_at = (rec.revoked_at or rec.issued_at).astimezone(dt.timezone.utc).replace(
            microsecond=0, tzinfo=None)
        return ocsp.OCSPCertStatus.REVOKED, revoked_at, _reason_flag(rec.revocation_reason)
