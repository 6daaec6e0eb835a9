"""CRLs (RFC 5280 §5): one per issuing CA, DER, regenerated when stale or when revocations change.

The state of each CA's CRL (its number, validity and the DER last published) lives in the store,
so the CRL number increments monotonically across restarts, processes and replicas. A CRL is
current while it covers every revocation in the store and less than half of its validity has
passed ("regenerated well before nextUpdate"). Revocations made by another process (the
`scepd certs revoke` CLI, another replica) are noticed by the store's revocation generation, a
counter bumped in the transaction of every revocation and read on each request with one
primary-key lookup (no COUNT over the revoked certificates). Revoked certificates stay listed
after they expire.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..clock import Clock
from ..errors import NotFound
from .revocation import RevocationReason
from ..store import CertificateRecord, SqlStore
from ..store.sql import _aware, _naive, certificates

log = logging.getLogger("scepd.crl")

_meta = sa.MetaData()

crl_state = sa.Table(
    "crl_state", _meta,
    sa.Column("ca_id", sa.String(32), primary_key=True),
    sa.Column("crl_number", sa.BigInteger, nullable=False),
    sa.Column("this_update", sa.DateTime, nullable=False),
    sa.Column("next_update", sa.DateTime, nullable=False),
    sa.Column("revoked_count", sa.Integer, nullable=False),
    sa.Column("der", sa.LargeBinary, nullable=False),
)

#: component "ops", version 1 (applied from the ordered list, scepd.http.assembly.migrations)
MIGRATIONS = [(1, [crl_state])]

DEFAULT_VALIDITY = dt.timedelta(hours=24)


def time_floor(now: dt.datetime) -> int:
    """A CRL number derived from time (microseconds since 1970, as Boulder derives its numbers
    from thisUpdate): above any number this database's sequence reached before `now`."""
    return int(now.timestamp() * 1_000_000)


def raise_numbers(conn: sa.Connection, floor: int, ca_ids: list[str], now: dt.datetime) -> int:
    """A store.write unit for a restored database: the CRL number of every CA in `ca_ids` (and
    of any other row) becomes at least `floor` and its stored CRL stale, so the next CRL continues
    above every number relying parties may have seen before the restore, including CAs that had
    published no CRL when the backup was taken. Returns the CAs changed."""
    changed = int(conn.execute(crl_state.update().where(crl_state.c.crl_number < floor).values(
        crl_number=floor, next_update=crl_state.c.this_update, revoked_count=-1)).rowcount or 0)
    have = {r.ca_id for r in conn.execute(sa.select(crl_state.c.ca_id))}
    for ca_id in sorted(set(ca_ids) - have):
        # a placeholder that is never served: stale (next_update = this_update) and with a
        # revoked count no CRL has, so the next request signs number floor + 1
        conn.execute(crl_state.insert(), dict(ca_id=ca_id, crl_number=floor, this_update=_naive(now),
                                              next_update=_naive(now), revoked_count=-1, der=b""))
        changed += 1
    return changed


@dataclass(frozen=True)
class Signer:
    """An issuing CA that publishes a CRL and answers OCSP for its certificates."""

    cert: x509.Certificate
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @property
    def ca_id(self) -> str:
        from .pki import ca_id_of
        return ca_id_of(self.cert)


@dataclass(frozen=True)
class PublishedCrl:
    ca_id: str
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    revoked_count: int
    der: bytes

    def current(self, now: dt.datetime, revoked_count: int) -> bool:
        half = (self.next_update - self.this_update) / 2
        return self.revoked_count == revoked_count and self.this_update <= now < self.this_update + half


@dataclass(frozen=True)
class RevokedEntry:
    serial: str  # hex, as in the inventory
    revoked_at: dt.datetime | None
    revocation_reason: str | None


@functools.lru_cache(maxsize=64)
def _reason_flag(label: str | None) -> x509.ReasonFlags | None:
    """The CRL entry reasonCode; absent for `unspecified` (RFC 5280 §5.3.1 SHOULD)."""
    if not label:
        return None
    try:
        reason = RevocationReason.parse(label)
    except Exception:
        return None
    if reason is RevocationReason.UNSPECIFIED:
        return None
    return {
        RevocationReason.KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
        RevocationReason.CA_COMPROMISE: x509.ReasonFlags.ca_compromise,
        RevocationReason.AFFILIATION_CHANGED: x509.ReasonFlags.affiliation_changed,
        RevocationReason.SUPERSEDED: x509.ReasonFlags.superseded,
        RevocationReason.CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
        RevocationReason.CERTIFICATE_HOLD: x509.ReasonFlags.certificate_hold,
        RevocationReason.REMOVE_FROM_CRL: x509.ReasonFlags.remove_from_crl,
        RevocationReason.PRIVILEGE_WITHDRAWN: x509.ReasonFlags.privilege_withdrawn,
        RevocationReason.AA_COMPROMISE: x509.ReasonFlags.aa_compromise,
    }[reason]


def authority_key_identifier(cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(cert.public_key())  # type: ignore[arg-type]


def build_crl(signer: Signer, revoked: list[RevokedEntry] | list[CertificateRecord], number: int, this_update: dt.datetime,
              next_update: dt.datetime) -> bytes:
    """Sign one CRL (v2, SHA-256): CRL number, AKI, one entry per revoked certificate."""
    entries = []
    for rec in revoked:
        entry = (x509.RevokedCertificateBuilder().serial_number(int(rec.serial, 16))
                 .revocation_date(rec.revoked_at or this_update))
        flag = _reason_flag(rec.revocation_reason)
        if flag is not None:
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        entries.append(entry.build())
    # all entries at once: add_revoked_certificate copies the list each call (quadratic)
    builder = (x509.CertificateRevocationListBuilder(revoked_certificates=entries)
               .issuer_name(signer.cert.subject)
               .last_update(this_update)
               .next_update(next_update)
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(authority_key_identifier(signer.cert), critical=False))
    return builder.sign(signer.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _published(row) -> PublishedCrl:
    m = row._mapping
    return PublishedCrl(ca_id=m["ca_id"], number=int(m["crl_number"]), this_update=_aware(m["this_update"]),
                        next_update=_aware(m["next_update"]), revoked_count=int(m["revoked_count"]),
                        der=bytes(m["der"]))


class CrlService:
    """`current_der()` is what HTTP (/crl/<ca-id>.crl) and SCEP GetCRL serve."""

    def __init__(self, store: SqlStore, clock: Clock, signers: list[Signer],
                 validity: dt.timedelta = DEFAULT_VALIDITY):
        if not signers:
            raise ValueError("a CRL service needs at least one issuing CA")
        if validity <= dt.timedelta(0):
            raise ValueError("CRL validity must be positive")
        self.store = store
        self.clock = clock
        self.signers = {s.ca_id: s for s in signers}
        self.default_ca_id = signers[0].ca_id
        self.validity = validity
        self._cache: dict[str, PublishedCrl] = {}
        #: the revocation generation read before each cached CRL's revocations were
        self._generation: dict[str, int] = {}
        self._lock = asyncio.Lock()
        #: called with (PublishedCrl) after each newly signed CRL (metrics)
        self.listeners: list = []

    async def current(self, ca_id: str | None = None) -> PublishedCrl:
        ca_id = ca_id or self.default_ca_id
        if ca_id not in self.signers:
            raise NotFound("no CRL for that CA")
        now = self.clock.now()
        generation = await self.store.revocation_generation()
        cached = self._cache.get(ca_id)
        if cached is not None and self._generation.get(ca_id) == generation and \
                cached.current(now, cached.revoked_count):
            return cached
        async with self._lock:
            cached = self._cache.get(ca_id)
            if cached is not None and self._generation.get(ca_id) == generation and \
                    cached.current(self.clock.now(), cached.revoked_count):
                return cached  # refreshed while this request waited
            published = await self._refresh(ca_id)
            # read before the refresh read its revocations: a revocation in between only
            # causes one more refresh, never a stale CRL
            self._generation[ca_id] = generation
            return published

    async def current_der(self, ca_id: str | None = None) -> bytes:
        return (await self.current(ca_id)).der

    async def on_revocation(self, rec: CertificateRecord, _reason) -> None:
        """RevocationService listener: publish a CRL with the new entry now."""
        if rec.ca_id in self.signers:
            await self.current(rec.ca_id)

    async def _read(self, conn, ca_id: str, lock: bool = False):
        q = sa.select(crl_state).where(crl_state.c.ca_id == ca_id)
        row = (await conn.execute(q.with_for_update() if lock else q)).first()
        c = certificates.c  # only the columns a CRL entry needs (no DER blobs)
        revoked = [RevokedEntry(r.serial, _aware(r.revoked_at), r.revocation_reason)
                   for r in (await conn.execute(sa.select(c.serial, c.revoked_at, c.revocation_reason)
                                                .where(c.ca_id == ca_id, c.status == "revoked")
                                                .order_by(c.revoked_at))).all()]
        return (_published(row) if row is not None else None), revoked

    def _next(self, previous: PublishedCrl | None):
        now = self.clock.now().replace(microsecond=0)
        number = (previous.number if previous else 0) + 1
        return number, now, now + self.validity

    async def _refresh(self, ca_id: str) -> PublishedCrl:
        """Sign outside the write transaction (a large CRL takes a while and SQLite has one
        writer), then commit only if nobody published in between; the last attempt holds the
        row lock throughout, so it always succeeds."""
        signer = self.signers[ca_id]
        for attempt in range(3):
            optimistic = attempt < 2
            try:
                if optimistic:
                    async with self.store.engine.connect() as conn:
                        previous, revoked = await self._read(conn, ca_id)
                    if previous is not None and previous.current(self.clock.now(), len(revoked)):
                        self._cache[ca_id] = previous  # another process or replica published it
                        return previous
                    number, this_update, next_update = self._next(previous)
                    der = await asyncio.to_thread(build_crl, signer, revoked, number, this_update, next_update)
                async with self.store.transaction() as tx:
                    conn = tx.connection
                    if optimistic:
                        if await self._locked_number(conn, ca_id) != number - 1:
                            continue  # someone else published meanwhile: look again
                    else:
                        previous, revoked = await self._read(conn, ca_id, lock=True)
                        if previous is not None and previous.current(self.clock.now(), len(revoked)):
                            self._cache[ca_id] = previous
                            return previous
                        number, this_update, next_update = self._next(previous)
                        der = await asyncio.to_thread(build_crl, signer, revoked, number, this_update,
                                                      next_update)
                    values = dict(crl_number=number, this_update=_naive(this_update),
                                  next_update=_naive(next_update), revoked_count=len(revoked), der=der)
                    if number == 1:
                        await conn.execute(crl_state.insert().values(ca_id=ca_id, **values))
                    else:
                        await conn.execute(crl_state.update().where(crl_state.c.ca_id == ca_id)
                                           .values(**values))
            except IntegrityError:  # a concurrent first insert
                if not optimistic:
                    raise
                continue
            break
        published = PublishedCrl(ca_id, number, this_update, next_update, len(revoked), der)
        self._cache[ca_id] = published
        log.info("CRL published ca=%s number=%s entries=%s next_update=%s", ca_id, number,
                 len(revoked), next_update.isoformat())
        for listener in self.listeners:
            listener(published)
        return published

    async def _locked_number(self, conn, ca_id: str) -> int:
        row = (await conn.execute(sa.select(crl_state.c.crl_number).where(crl_state.c.ca_id == ca_id)
                                  .with_for_update())).first()
        return int(row.crl_number) if row is not None else 0
