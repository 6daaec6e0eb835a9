"""Storage records: plain frozen dataclasses, separate from protocol and CA types."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CertificateRecord:
    serial: str  # lower-case hex, no leading zeros
    ca_id: str
    subject: str
    sans: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    profile: str
    protocol: str
    transaction_id: str | None
    requester: str | None
    spki_sha256: str
    der: bytes
    issued_at: dt.datetime
    status: str = "valid"  # valid | revoked
    revoked_at: dt.datetime | None = None
    revocation_reason: str | None = None

    def state(self, now: dt.datetime) -> str:
        if self.status == "revoked":
            return "revoked"
        return "expired" if self.not_after <= now else "valid"


@dataclass(frozen=True)
class ChallengeRecord:
    id: int
    secret_sha256: str
    cn_pattern: str | None
    created_at: dt.datetime
    expires_at: dt.datetime
    used_at: dt.datetime | None = None
    used_by_serial: str | None = None
    #: name patterns the challenge authorizes (None: any); a row from before the `names`
    #: column reads its cn_pattern as its one pattern
    names: tuple[str, ...] | None = None
    #: the profile the challenge grants (None: the protocol's default)
    profile: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    at: dt.datetime
    event: str
    subject: str | None = None
    serial: str | None = None
    actor: str | None = None
    details: dict = field(default_factory=dict)
    id: int | None = None


@dataclass(frozen=True)
class PendingRecord:
    """A request waiting for an administrator (SCEP PENDING)."""

    id: int
    transaction_id: str
    spki_sha256: str  # the requested key
    signer_spki_sha256: str  # the key that signed the request (polls may be signed by either)
    csr_der: bytes
    subject: str
    profile: str
    protocol: str
    requester: str | None
    created_at: dt.datetime
    status: str = "pending"  # pending | issued | rejected
    renewal_of: str | None = None
    decided_at: dt.datetime | None = None
    decided_by: str | None = None
    reason: str | None = None
    serial: str | None = None
