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
A nonce (1..32 octets, RFC 8954) is echoed in a response signed for that request alone.

Requests without a nonce (nearly all: browsers, openssl's -no_nonce, RFC 5019 clients) get a
pre-signed response, as Boulder's ocsp-responder and EJBCA's pre-produced responses do: one
signed response per (CertID, serial), kept in a bounded LRU (`cache_size`) and served without a
database read, a thread hop or a signature while it is fresh:
  - it is replaced once half of its lifetime (thisUpdate..nextUpdate) has passed, so a served
    response always has at least lifetime/2 left before nextUpdate;
  - a revocation made through this process (RevocationService listener `on_revocation`) drops
    the certificate's responses at once: the very next request says revoked;
  - a revocation made by another process (another worker, `scepd certs revoke`) bumps the
    store's revocation generation in its own transaction; the responder reads that counter at
    most every `status_poll` (1 s) on the request path, and when it moved, re-reads the status of
    each cached response before serving it again (re-signing only if the status changed). So a
    revocation committed more than `status_poll` before a request is always reflected;
  - "unknown" responses are cached too, but their serial is looked up again on every request
    (a primary-key read, no signature), so a certificate issued afterwards by any process is
    reported good at once;
  - with a delegated responder, responses signed by a responder certificate that has since been
    renewed are re-signed by the new one.
If the generation cannot be read, every cached response is re-checked against the store before
being served; if the store cannot be read either, the answer is tryLater.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import logging
import os
import time
from collections import OrderedDict
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

#: thisUpdate..nextUpdate of every response; a pre-signed one is replaced after half of it.
RESPONSE_LIFETIME = dt.timedelta(hours=1)
#: HTTP max-age of a response without a nonce (never past its nextUpdate): bounds how long an
#: HTTP cache in front of us may keep serving "good" after a revocation.
HTTP_MAX_AGE = 300
#: Pre-signed responses kept (least recently used dropped first); `[ocsp] cache_size`.
CACHE_SIZE = 100_000
#: How often (at most) the revocation generation is read; `[ocsp] status_poll`.
STATUS_POLL = dt.timedelta(seconds=1)
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


@dataclass(frozen=True, slots=True)
class OcspAnswer:
    der: bytes
    status: str  # good | revoked | unknown | malformedRequest | unauthorized | internalError | tryLater
    max_age: int = 0  # seconds a cache may keep it (0 = do not cache)
    this_update: dt.datetime | None = None  # set on cacheable answers (HTTP Last-Modified)
    next_update: dt.datetime | None = None  # (HTTP Expires)
    etag: str = ""  # quoted hex SHA-1 of the DER (RFC 5019 §6.2 ETag)
    last_modified: str = ""  # thisUpdate as an HTTP-date (RFC 5019 §6.2 Last-Modified)
    expires: str = ""  # nextUpdate as an HTTP-date (RFC 5019 §6.2 Expires)


_HTTP_DATE = "%a, %d %b %Y %H:%M:%S GMT"


class _Entry:
    """One pre-signed response (its answer) and the status it was signed from."""

    __slots__ = ("answer", "status", "revoked_at", "reason", "refresh_at", "generation", "responder")

    def __init__(self, answer: OcspAnswer, revoked_at, reason, refresh_at: dt.datetime,
                 generation: int | None, responder):
        self.answer = answer
        self.status = answer.status
        self.revoked_at = revoked_at
        self.reason = reason
        self.refresh_at = refresh_at
        self.generation = generation  # revocation generation at which the status was last confirmed
        self.responder = responder  # the delegated responder certificate that signed it, or None


def _error(status: ocsp.OCSPResponseStatus, label: str) -> OcspAnswer:
    return OcspAnswer(ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER), label)


class DelegatedResponder:
    """DIR/ocsp/responder.pem and responder.key (0600): an OCSP signing certificate of the
    current issuing CA, issued on first use and renewed once two thirds of its life have passed.

    Several processes (`serve --workers N`) share the pair: loading, issuing and writing it happen
    under an exclusive lock on DIR/ocsp/responder.lock, so when renewal falls due in two workers at
    once one of them issues and the other loads what it wrote (one certificate, never a key file
    of one renewal beside the certificate of another); and a pair whose key is not the
    certificate's is never loaded."""

    #: how long a process waits for another's renewal (bounded; then it goes on without the lock:
    #: the key-matches-certificate check on load still keeps a mixed pair out)
    LOCK_SECONDS = 30.0

    def __init__(self, directory: Path, enrollment):
        self.directory = directory
        self.enrollment = enrollment
        self.cert_path = directory / "responder.pem"
        self.key_path = directory / "responder.key"
        self._current: tuple[x509.Certificate, object] | None = None
        self._renew_at = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
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
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):  # type: ignore[union-attr]
            log.warning("OCSP responder key and certificate in %s do not match: issuing a new pair",
                        self.directory)
            return None
        return cert, key

    @contextlib.asynccontextmanager
    async def _across_processes(self):
        """Hold DIR/ocsp/responder.lock (flock, exclusive) for the block: polled without blocking
        the event loop, for at most LOCK_SECONDS."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / "responder.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + self.LOCK_SECONDS
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        log.warning("OCSP responder: %s still locked after %.0f s; going on without it",
                                    self.directory / "responder.lock", self.LOCK_SECONDS)
                        break
                    await asyncio.sleep(0.02)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _due(self, pair, now: dt.datetime) -> bool:
        if pair is None:
            return True
        cert = pair[0]
        if cert.issuer != self.enrollment.ca.material.cert.subject:
            return True
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        return now >= cert.not_valid_before_utc + lifetime * 2 / 3

    def fresh(self, now: dt.datetime) -> x509.Certificate | None:
        """The responder certificate in use if it needs no renewal at `now`; else None."""
        pair = self._current
        if pair is None or now >= self._renew_at:
            return None
        return pair[0]

    async def current(self) -> tuple[x509.Certificate, object]:
        now = self.enrollment.clock.now()
        if not self._due(self._current, now):
            return self._current  # type: ignore[return-value]
        async with self._lock, self._across_processes():
            pair = self._current if not self._due(self._current, now) else self._load()
            if self._due(pair, now):
                pair = await self._issue()
            self._current = pair
            cert = pair[0]  # type: ignore[index]
            self._renew_at = cert.not_valid_before_utc + (cert.not_valid_after_utc - cert.not_valid_before_utc) * 2 / 3
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


_LABELS = {ocsp.OCSPCertStatus.GOOD: "good", ocsp.OCSPCertStatus.REVOKED: "revoked",
           ocsp.OCSPCertStatus.UNKNOWN: "unknown"}


class OcspResponder:
    def __init__(self, store: SqlStore, clock: Clock, signers: list[Signer],
                 lifetime: dt.timedelta = RESPONSE_LIFETIME, delegate: DelegatedResponder | None = None,
                 cache_size: int = CACHE_SIZE, status_poll: dt.timedelta = STATUS_POLL):
        self.store = store
        self.clock = clock
        self.signers = list(signers)
        self.lifetime = lifetime
        self.delegate = delegate
        self.cache_size = max(0, cache_size)
        self.status_poll = status_poll
        self._index: dict[tuple[str, bytes, bytes], Signer] = {}
        self._ca_ids: dict[int, str] = {}
        for signer in self.signers:
            self._ca_ids[id(signer)] = signer.ca_id
            for algorithm in _HASHES:
                name_hash, key_hash = _issuer_hashes(signer.cert, algorithm)
                self._index[(algorithm, name_hash, key_hash)] = signer
        # the same, with the index's own key tuple: cache keys share it instead of holding copies
        self._issuers = {k: (k, v) for k, v in self._index.items()}
        # pre-signed responses: ((algorithm, issuerNameHash, issuerKeyHash), serial) -> _Entry
        self._cache: OrderedDict[tuple[tuple[str, bytes, bytes], int], _Entry] = OrderedDict()
        self._inflight: dict[tuple[tuple[str, bytes, bytes], int], asyncio.Future] = {}
        self._generation: int | None = None  # revocation generation last read (None: unknown)
        self._poll_at = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
        self._polled_at = self._poll_at  # when the last generation read started
        self._polling: asyncio.Future | None = None
        self._epoch = 0  # bumped by each revocation made through this process
        #: counters for tests and the benchmark: responses served from the cache, signatures made,
        #: status reads of a cached response, generation reads
        self.stats = {"hit": 0, "signed": 0, "rechecked": 0, "poll": 0}

    async def respond(self, request_der: bytes) -> OcspAnswer:
        if not request_der or len(request_der) > MAX_REQUEST_BYTES:
            return _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformedRequest")
        try:
            req = ocsp.load_der_ocsp_request(request_der)
            algorithm = req.hash_algorithm.name
            name_hash = req.issuer_name_hash
            key_hash = req.issuer_key_hash
            serial = req.serial_number
            nonce = None
            for ext in req.extensions:
                if isinstance(ext.value, x509.OCSPNonce):
                    nonce = ext.value.nonce
        except Exception:  # cryptography raises ValueError and friends on anything odd
            return _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformedRequest")
        if nonce is not None and not 1 <= len(nonce) <= 32:
            return _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformedRequest")
        issuer = self._issuers.get((algorithm, name_hash, key_hash))
        if issuer is None:
            return _error(ocsp.OCSPResponseStatus.UNAUTHORIZED, "unauthorized")
        if serial <= 0:
            return _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformedRequest")
        signer = issuer[1]
        if nonce is None and self.cache_size:
            return await self._presigned((issuer[0], serial), issuer[1])
        try:
            status, revoked_at, reason = await self._status(signer, serial_hex(serial))
        except Exception:  # store unreachable: RFC 6960 tryLater, never an HTTP 500
            log.exception("OCSP status lookup failed")
            return _error(ocsp.OCSPResponseStatus.TRY_LATER, "tryLater")
        now = self.clock.now().replace(microsecond=0)
        try:
            der, _responder = await self._sign(signer, algorithm, name_hash, key_hash, serial, status,
                                               revoked_at, reason, now, nonce)
        except _ResponderUnavailable:
            return _error(ocsp.OCSPResponseStatus.INTERNAL_ERROR, "internalError")
        # a response carrying the client's nonce is for that client only
        max_age = 0 if nonce is not None else int(min(self.lifetime / 2, dt.timedelta(seconds=HTTP_MAX_AGE))
                                                   .total_seconds())
        if not max_age:
            return OcspAnswer(der, _LABELS[status])
        return OcspAnswer(der, _LABELS[status], max_age, now, now + self.lifetime,
                          '"' + hashlib.sha1(der).hexdigest() + '"', now.strftime(_HTTP_DATE),
                          (now + self.lifetime).strftime(_HTTP_DATE))

    # --- pre-signed responses -------------------------------------------------------------

    async def _presigned(self, ckey: tuple[tuple[str, bytes, bytes], int], signer: Signer) -> OcspAnswer:
        now = self.clock.now()
        if now >= self._poll_at or now < self._polled_at:  # (a clock stepped back polls too)
            await self._poll()
        entry = self._cache.get(ckey)
        if (entry is not None and entry.answer.this_update <= now < entry.refresh_at  # type: ignore[operator]
                and entry.generation is not None
                and entry.generation == self._generation and entry.status != "unknown"
                and (entry.responder is None or self.delegate.fresh(now) is entry.responder)):  # type: ignore[union-attr]
            self._cache.move_to_end(ckey)
            self.stats["hit"] += 1
            return entry.answer
        task = self._inflight.get(ckey)
        if task is None:  # one status read / signature per CertID, however many ask at once
            task = asyncio.ensure_future(self._refresh(ckey, signer, entry))
            self._inflight[ckey] = task
            task.add_done_callback(lambda t, k=ckey: self._inflight.pop(k, None) if self._inflight.get(k) is t
                                   else None)
        try:
            entry = await asyncio.shield(task)
        except _ResponderUnavailable:
            return _error(ocsp.OCSPResponseStatus.INTERNAL_ERROR, "internalError")
        except Exception:  # store unreachable: RFC 6960 tryLater, never an HTTP 500
            log.exception("OCSP status lookup failed")
            return _error(ocsp.OCSPResponseStatus.TRY_LATER, "tryLater")
        return entry.answer

    async def _refresh(self, ckey: tuple[tuple[str, bytes, bytes], int], signer: Signer, old: _Entry | None) -> _Entry:
        """Read the status; keep `old` if it still says the same and is fresh, else sign anew."""
        generation, epoch = self._generation, self._epoch
        (algorithm, name_hash, key_hash), serial = ckey
        status, revoked_at, reason = await self._status(signer, serial_hex(serial))
        label = _LABELS[status]
        now = self.clock.now()
        if (old is not None and old.answer.this_update <= now < old.refresh_at  # type: ignore[operator]
                and (old.status, old.revoked_at, old.reason)
                == (label, revoked_at, reason)
                and (old.responder is None or self.delegate.fresh(now) is old.responder)):  # type: ignore[union-attr]
            self.stats["rechecked"] += 1
            if epoch == self._epoch:
                old.generation = generation
            return old
        this_update = now.replace(microsecond=0)
        der, responder = await self._sign(signer, algorithm, name_hash, key_hash, serial, status, revoked_at,
                                          reason, this_update, None)
        next_update = this_update + self.lifetime
        # every served copy has at least lifetime/2 before nextUpdate: max-age never passes it
        max_age = int(min(self.lifetime / 2, dt.timedelta(seconds=HTTP_MAX_AGE)).total_seconds())
        answer = OcspAnswer(der, label, max_age, this_update, next_update,
                            '"' + hashlib.sha1(der).hexdigest() + '"', this_update.strftime(_HTTP_DATE),
                            next_update.strftime(_HTTP_DATE))
        entry = _Entry(answer, revoked_at, reason, this_update + self.lifetime / 2, generation, responder)
        if epoch == self._epoch:  # no revocation here while we read and signed: keep it
            self._cache[ckey] = entry
            self._cache.move_to_end(ckey)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return entry

    async def _poll(self) -> None:
        """Read the revocation generation (once for all concurrent requests)."""
        if self._polling is None:
            self._polling = asyncio.ensure_future(self._read_generation())
        await asyncio.shield(self._polling)

    async def _read_generation(self) -> None:
        started = self.clock.now()
        try:
            self.stats["poll"] += 1
            try:
                self._generation = await self.store.revocation_generation()
            except Exception as err:  # then every cached response is re-checked before use
                if self._generation is not None:
                    log.warning("OCSP: revocation generation unreadable (%s); checking each status", err)
                self._generation = None
            self._polled_at = started
            self._poll_at = started + self.status_poll
        finally:
            self._polling = None

    async def on_revocation(self, record, _reason=None) -> None:
        """RevocationService listener: this process revoked `record`; drop its responses now."""
        self._epoch += 1
        try:
            serial = int(record.serial, 16)
        except (TypeError, ValueError):
            self._cache.clear()
            self._inflight.clear()
            return
        for issuer in self._index:
            key = (issuer, serial)
            self._cache.pop(key, None)
            self._inflight.pop(key, None)  # later requests must not join a read made before

    def cache_len(self) -> int:
        return len(self._cache)

    # --- status and signature -------------------------------------------------------------

    async def _sign(self, signer: Signer, algorithm: str, name_hash: bytes, key_hash: bytes, serial: int,
                    status, revoked_at, reason, now: dt.datetime, nonce: bytes | None):
        """(DER response, delegated responder certificate or None)."""
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=name_hash, issuer_key_hash=key_hash,
            serial_number=serial, algorithm=_CRYPTO_HASHES[algorithm](), cert_status=status,
            this_update=now, next_update=now + self.lifetime,
            revocation_time=revoked_at, revocation_reason=reason)
        responder_cert, responder_key = signer.cert, signer.key
        delegated = None
        if self.delegate is not None and self.delegate.ca_id == self._ca_ids[id(signer)]:
            try:
                responder_cert, responder_key = await self.delegate.current()
            except Exception:
                log.exception("OCSP responder certificate unavailable")
                raise _ResponderUnavailable() from None
            delegated = responder_cert
            builder = builder.certificates([responder_cert])  # so clients can check the delegation
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder_cert)
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        response = await asyncio.to_thread(builder.sign, responder_key, hashes.SHA256())
        self.stats["signed"] += 1
        return response.public_bytes(serialization.Encoding.DER), delegated

    async def _status(self, signer: Signer, serial: str):
        try:
            rec = await self.store.get_certificate(serial)
        except StoreNotFound:
            return ocsp.OCSPCertStatus.UNKNOWN, None, None
        if rec.ca_id != self._ca_ids[id(signer)]:
            return ocsp.OCSPCertStatus.UNKNOWN, None, None
        if rec.status != "revoked":
            return ocsp.OCSPCertStatus.GOOD, None, None
        from .crl import _reason_flag
        revoked_at = (rec.revoked_at or rec.issued_at).astimezone(dt.timezone.utc).replace(
            microsecond=0, tzinfo=None)
        return ocsp.OCSPCertStatus.REVOKED, revoked_at, _reason_flag(rec.revocation_reason)


class _ResponderUnavailable(Exception):
    pass
