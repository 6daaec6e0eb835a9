"""Storage only stores: records in, records out, NotFound/Conflict out. No policy here."""
from .records import AuditRecord, CertificateRecord, ChallengeRecord, PendingRecord
from .sql import Conflict, Migration, SqlStore, StoreNotFound, core_migrations

__all__ = ["PendingRecord", "AuditRecord", "CertificateRecord", "ChallengeRecord", "Conflict", "SqlStore", "StoreNotFound", "Migration", "core_migrations"]
