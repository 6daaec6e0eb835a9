"""Revocation: the one service the CLI, ACME revokeCert and the admin API call.

Recorded (with an audit record) in one transaction before the call returns; listeners (CRL
regeneration, metrics) are told afterwards.
"""
from __future__ import annotations

import enum
import logging
from typing import Awaitable, Callable

from ..clock import Clock
from ..errors import AlreadyRevoked, BadRequest, NotFound
from ..store import AuditRecord, CertificateRecord, SqlStore, StoreNotFound

log = logging.getLogger("scepd.revocation")


class RevocationReason(enum.Enum):
    """RFC 5280 §5.3.1 CRLReason; value 7 is unused and never accepted."""

    UNSPECIFIED = 0
    KEY_COMPROMISE = 1
    CA_COMPROMISE = 2
    AFFILIATION_CHANGED = 3
    SUPERSEDED = 4
    CESSATION_OF_OPERATION = 5
    CERTIFICATE_HOLD = 6
    REMOVE_FROM_CRL = 8
    PRIVILEGE_WITHDRAWN = 9
    AA_COMPROMISE = 10

    @property
    def label(self) -> str:
        parts = self.name.lower().split("_")
        return parts[0] + "".join(p.title() for p in parts[1:])  # keyCompromise, as RFC 5280 spells it

    @classmethod
    def parse(cls, text: str | int) -> "RevocationReason":
        if isinstance(text, int) or (isinstance(text, str) and text.isdigit()):
            code = int(text)
            for r in cls:
                if r.value == code:
                    return r
            raise BadRequest(f"revocation reason code {code} is not allowed")
        key = str(text).replace("-", "").replace("_", "").lower()
        for r in cls:
            if r.label.lower() == key or r.name.replace("_", "").lower() == key:
                return r
        raise BadRequest(f"unknown revocation reason {text!r}; use one of: "
                         + ", ".join(r.label for r in cls))


#: Revocation reasons a caller may ask for (certificateHold/removeFromCRL need a hold workflow).
ALLOWED_REASONS = frozenset(RevocationReason) - {RevocationReason.CERTIFICATE_HOLD,
                                                  RevocationReason.REMOVE_FROM_CRL,
                                                  RevocationReason.AA_COMPROMISE}

Listener = Callable[[CertificateRecord, RevocationReason], Awaitable[None]]


class RevocationService:
    def __init__(self, store: SqlStore, clock: Clock):
        self.store = store
        self.clock = clock
        self.listeners: list[Listener] = []

    async def revoke(self, serial: str, reason: RevocationReason, actor: str) -> CertificateRecord:
        if reason not in ALLOWED_REASONS:
            raise BadRequest(f"revocation reason {reason.label} is not allowed")
        now = self.clock.now()
        try:
            async with self.store.transaction() as tx:
                changed = await tx.revoke_certificate(serial, reason.label, now)
                if not changed:
                    raise AlreadyRevoked(f"certificate {serial} is already revoked")
                await tx.audit(AuditRecord(at=now, event="certificate.revoked", serial=serial,
                                           actor=actor, details={"reason": reason.label}))
        except StoreNotFound:
            raise NotFound(f"no certificate with serial {serial}") from None
        rec = await self.store.get_certificate(serial)
        log.info("revoked serial=%s reason=%s by %s", serial, reason.label, actor)
        for listener in self.listeners:
            try:
                await listener(rec, reason)
            except Exception:  # a failing listener must not undo or hide the revocation
                log.exception("revocation listener failed for %s", serial)
        return rec
