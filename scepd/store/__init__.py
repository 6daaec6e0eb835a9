"""Storage only stores: records in, records out, NotFound/Conflict out. No policy here."""
from .records import AuditRecord, CertificateRecord, ChallengeRecord, PendingRecord
from .sql import Conflict, SqlStore, StoreNotFound, register_migrations

__all__ = ["PendingRecord", "AuditRecord", "CertificateRecord", "ChallengeRecord", "Conflict", "SqlStore", "StoreNotFound", "register_migrations"]
