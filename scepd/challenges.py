"""Challenge passwords: a static shared secret and one-time secrets issued by the admin CLI.

One-time challenges are 128-bit random hex strings (short enough to type on a router console),
stored as SHA-256 (they are high-entropy, so no salt/KDF is needed), expire, may be bound to a
CN pattern, and are consumed inside the transaction that stores the certificate they pay for.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from .clock import Clock
from .errors import ChallengeRejected
from .policy import cn_matches
from .store import AuditRecord, SqlStore


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChallengeGrant:
    """A verified challenge. `one_time_id` must be consumed in the issuing transaction."""

    kind: str  # "static" | "one-time" | "none"
    one_time_id: int | None = None


class ChallengeService:
    def __init__(self, store: SqlStore, clock: Clock, static_secret: str = "", required: bool = True):
        self.store = store
        self.clock = clock
        self.static_secret = static_secret
        self.required = required

    async def create(self, ttl: dt.timedelta, cn_pattern: str | None = None, actor: str = "cli") -> str:
        if ttl <= dt.timedelta(0):
            raise ValueError("a challenge needs a positive lifetime")
        secret = secrets.token_hex(16)
        now = self.clock.now()
        async with self.store.transaction() as tx:
            cid = await tx.insert_challenge(secret_hash(secret), cn_pattern or None, now, now + ttl)
            # the secret itself is never logged nor audited
            await tx.audit(AuditRecord(at=now, event="challenge.created", actor=actor,
                                       details={"challenge_id": cid, "cn_pattern": cn_pattern,
                                                "expires_at": (now + ttl).isoformat()}))
        return secret

    async def verify(self, presented: str | None, common_name: str | None) -> ChallengeGrant:
        """Check a presented challenge; raises ChallengeRejected. Does not consume."""
        if not presented:
            if self.required:
                raise ChallengeRejected("a challenge password is required")
            return ChallengeGrant("none")
        if self.static_secret and hmac.compare_digest(presented.encode(), self.static_secret.encode()):
            return ChallengeGrant("static")
        rec = await self.store.find_challenge(secret_hash(presented))
        # the same answer for unknown, used and expired: do not tell an attacker which it was
        if rec is None or rec.used_at is not None or rec.expires_at <= self.clock.now():
            raise ChallengeRejected("the challenge password is invalid, expired or already used")
        if not cn_matches(rec.cn_pattern, common_name):
            raise ChallengeRejected("the challenge password is not valid for this subject")
        return ChallengeGrant("one-time", rec.id)
