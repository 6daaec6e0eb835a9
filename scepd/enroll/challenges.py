"""Challenge passwords: a static shared secret and one-time secrets issued by the admin CLI.

One-time challenges are 128-bit random hex strings (short enough to type on a router console),
stored as SHA-256 (they are high-entropy, so no salt/KDF is needed), expire, may be scoped to
name patterns (`--names`: the CN and every SAN must match one) and a profile, and are consumed
inside the transaction that stores the certificate they pay for. The scope is enforced by the
enrollment pipeline (scepd/pipeline.py), not here: a challenge only says who asked.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from ..clock import Clock
from ..errors import ChallengeRejected
from ..ca.policy import enrollment_profile
from ..store import AuditRecord, SqlStore


#: verify(record=...) not given: read the challenge from the store
_UNREAD = object()


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChallengeGrant:
    """A verified challenge. `one_time_id` must be consumed in the issuing transaction."""

    kind: str  # "static" | "one-time" | "none"
    one_time_id: int | None = None
    #: the name patterns this challenge authorizes (None: any name) and the profile it grants
    names: tuple[str, ...] | None = None
    profile: str | None = None


def clean_names(names) -> tuple[str, ...] | None:
    """Name patterns as given (`--names`, the admin API, `static_challenge_names`): stripped,
    empty ones dropped; None when none remain (unrestricted). ValueError for a bad pattern."""
    if names is None:
        return None
    if isinstance(names, str):
        names = names.split(",")
    out = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError("name patterns are strings")
        name = name.strip()
        if len(name) > 255 or any(ord(ch) < 0x20 for ch in name):
            raise ValueError("a name pattern is at most 255 printable characters")
        if name and name not in out:
            out.append(name)
    return tuple(out) or None


class ChallengeService:
    def __init__(self, store: SqlStore, clock: Clock, static_secret: str = "", required: bool = True,
                 static_names: tuple[str, ...] | None = None):
        self.store = store
        self.clock = clock
        self.static_secret = static_secret
        self.required = required
        #: `[scep] static_challenge_names`: what the static challenge authorizes (None: any name)
        self.static_names = static_names

    async def create(self, ttl: dt.timedelta, cn_pattern: str | None = None, actor: str = "cli", *,
                     names=None, profile: str | None = None) -> str:
        """`names`: patterns every name of the request must match one of; `cn_pattern` is the
        older spelling of one such pattern. `profile`: the profile the challenge grants."""
        if ttl <= dt.timedelta(0):
            raise ValueError("a challenge needs a positive lifetime")
        scope = clean_names([*(names or ()), *([cn_pattern] if cn_pattern else [])])
        if profile:
            enrollment_profile(profile)  # PolicyViolation for an unknown or internal profile
        secret = secrets.token_hex(16)
        now = self.clock.now()
        async with self.store.transaction() as tx:
            cid = await tx.insert_challenge(secret_hash(secret), None, now, now + ttl,
                                            names=scope, profile=profile or None)
            # the secret itself is never logged nor audited
            await tx.audit(AuditRecord(at=now, event="challenge.created", actor=actor,
                                       details={"challenge_id": cid, "names": list(scope) if scope else None,
                                                "profile": profile or None,
                                                "expires_at": (now + ttl).isoformat()}))
        return secret

    def lookup_key(self, presented: str | None) -> str | None:
        """The store key (secret hash) `verify` would look up for this presented challenge, or
        None when it needs no lookup (none presented, or the static secret): a front end reads
        it in its own read unit and passes the row to verify(record=...)."""
        if not presented or (self.static_secret and hmac.compare_digest(
                presented.encode(), self.static_secret.encode())):
            return None
        return secret_hash(presented)

    async def verify(self, presented: str | None, common_name: str | None = None, *,
                     record=_UNREAD) -> ChallengeGrant:
        """Check a presented challenge; raises ChallengeRejected. Does not consume. The grant
        carries the challenge's name scope and profile for the pipeline (`common_name` is
        no longer looked at here). `record`: the row for lookup_key(presented) (or None), when
        the caller already read it."""
        if not presented:
            if self.required:
                raise ChallengeRejected("a challenge password is required")
            return ChallengeGrant("none")
        if self.static_secret and hmac.compare_digest(presented.encode(), self.static_secret.encode()):
            return ChallengeGrant("static", names=self.static_names)
        rec = await self.store.find_challenge(secret_hash(presented)) if record is _UNREAD else record
        # the same answer for unknown, used and expired: do not tell an attacker which it was
        if rec is None or rec.used_at is not None or rec.expires_at <= self.clock.now():
            raise ChallengeRejected("the challenge password is invalid, expired or already used")
        return ChallengeGrant("one-time", rec.id, names=rec.names, profile=rec.profile)
