"""Admin service layer (tokens, admin client certificates, authentication) and the admin API.

The API is JSON over the HTTPS listener under /api/v1/admin/. A caller authenticates with
  * a bearer token (`scepd admin token create`; only its SHA-256 is stored), or
  * an admin client certificate (`scepd admin issue-cert`): issued by our CA with the "admin"
    profile, in the inventory, neither revoked nor expired.
No credentials or an unknown/revoked credential: 401; a valid certificate of ours that is not an
admin certificate: 403. The handlers call the same services as the CLI (RevocationService,
ChallengeService, EnrollmentService pending approvals). Bad input: 400 with a message.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..enroll.challenges import ChallengeGrant
from ..ca.csr import CsrFacts
from ..errors import BadRequest
from ..ca.policy import PROFILES
from ..render import cert_json, pending_json, serial_key  # noqa: F401  (cert_json, pending_json: the admin API's JSON)
from ..store import AuditRecord, CertificateRecord, SqlStore
from ..store.sql import _aware, _naive

log = logging.getLogger("scepd.admin")

_meta = sa.MetaData()

admin_tokens = sa.Table(
    "admin_tokens", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("created_by", sa.Text),
    sa.Column("revoked_at", sa.DateTime),
)

#: component "ops", version 3 (applied from the ordered list, scepd.http.assembly.migrations)
MIGRATIONS = [(3, [admin_tokens])]

TOKEN_PREFIX = "scepd_"


def normalize_serial(text: str) -> str:
    """Hex as `certs list` prints it; also accepts 0x, colons and leading zeros (BadRequest if not hex)."""
    try:
        return serial_key(text)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    id: int
    name: str
    created_at: dt.datetime
    created_by: str | None
    revoked_at: dt.datetime | None


@dataclass(frozen=True)
class AdminCertificate:
    cert: x509.Certificate
    key_pem: bytes
    record: CertificateRecord


class AdminService:
    """Tokens and admin certificates; the same code behind `scepd admin ...` and the API."""

    def __init__(self, store: SqlStore, clock, enrollment=None):
        self.store = store
        self.clock = clock
        self.enrollment = enrollment

    async def create_token(self, name: str, actor: str) -> tuple[int, str]:
        """A new random token, returned once (never stored, never logged)."""
        name = (name or "").strip()
        if not name or len(name) > 128:
            raise BadRequest("a token needs a name of 1..128 characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock.now()
        async with self.store.transaction() as tx:
            result = await tx.connection.execute(admin_tokens.insert().values(
                name=name, token_sha256=token_hash(token), created_at=_naive(now), created_by=actor))
            token_id = int(result.inserted_primary_key[0])
            await tx.audit(AuditRecord(at=now, event="admin.token.created", actor=actor,
                                       details={"token_id": token_id, "name": name}))
        return token_id, token

    async def revoke_token(self, token_id: int, actor: str) -> bool:
        now = self.clock.now()
        async with self.store.transaction() as tx:
            result = await tx.connection.execute(admin_tokens.update().where(
                admin_tokens.c.id == token_id, admin_tokens.c.revoked_at.is_(None)).values(
                revoked_at=_naive(now)))
            if result.rowcount != 1:
                return False
            await tx.audit(AuditRecord(at=now, event="admin.token.revoked", actor=actor,
                                       details={"token_id": token_id}))
        return True

    async def list_tokens(self) -> list[TokenRecord]:
        async with self.store.engine.connect() as conn:
            rows = (await conn.execute(sa.select(admin_tokens).order_by(admin_tokens.c.id))).all()
        return [TokenRecord(r.id, r.name, _aware(r.created_at), r.created_by, _aware(r.revoked_at))
                for r in rows]

    async def check_token(self, token: str) -> TokenRecord | None:
        """The live token with this value, or None (indexed lookup by hash)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 256:
            return None
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(sa.select(admin_tokens).where(
                admin_tokens.c.token_sha256 == token_hash(token)))).first()
        if row is None or row.revoked_at is not None:
            return None
        return TokenRecord(row.id, row.name, _aware(row.created_at), row.created_by, None)

    async def issue_admin_certificate(self, common_name: str, actor: str) -> AdminCertificate:
        """A fresh EC P-256 key and a client certificate with the "admin" profile, through the
        ordinary enrollment path (inventory + audit)."""
        if self.enrollment is None:
            raise RuntimeError("no enrollment service")
        key = ec.generate_private_key(ec.SECP256R1())
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        facts = CsrFacts(public_key=key.public_key(), spki_der=spki, common_name=common_name,
                         subject_rfc4514="", sans=(), other_extensions=(), challenge_password=None)
        request = self.enrollment.approve(facts, PROFILES["admin"])
        issued = await self.enrollment.issue(request, ChallengeGrant("admin"), protocol="admin",
                                             transaction_id=None, requester=actor,
                                             spki_sha256=hashlib.sha256(spki).hexdigest())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return AdminCertificate(issued.cert, key_pem, issued.record)
