"""How certificates, serial numbers and pending requests are written out: one function each,
shared by the CLI (`scepd certs ...`, `scepd pending ...`, `scepd acme ...`), the admin API and
the admin service, so every surface prints the same thing."""
from __future__ import annotations

import datetime as dt
import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .store.records import CertificateRecord

_SERIAL = re.compile(r"^[0-9a-f]{1,64}$")


def serial_hex(serial: int) -> str:
    """The inventory key of a serial number: lower-case hex, no leading zeros."""
    return format(serial, "x")


def serial_key(text: str) -> str:
    """A serial as a user types it (hex as `certs list` prints it; 0x, colons, leading zeros and
    upper case accepted) -> the inventory key. ValueError if it is not hexadecimal."""
    key = str(text).strip().lower().removeprefix("0x").replace(":", "").lstrip("0") or "0"
    if not _SERIAL.match(key):
        raise ValueError("a serial number is hexadecimal")
    return key


def cert_pem(rec: CertificateRecord) -> str:
    return x509.load_der_x509_certificate(rec.der).public_bytes(serialization.Encoding.PEM).decode()


def cert_json(rec: CertificateRecord, now: dt.datetime, with_pem: bool = False) -> dict:
    out = {"serial": rec.serial, "subject": rec.subject, "sans": list(rec.sans),
           "not_before": rec.not_before.isoformat(), "not_after": rec.not_after.isoformat(),
           "state": rec.state(now), "profile": rec.profile, "protocol": rec.protocol,
           "transaction_id": rec.transaction_id, "requester": rec.requester, "ca_id": rec.ca_id,
           "issued_at": rec.issued_at.isoformat(),
           "revoked_at": rec.revoked_at.isoformat() if rec.revoked_at else None,
           "revocation_reason": rec.revocation_reason}
    if with_pem:
        out["pem"] = cert_pem(rec)
    return out


def pending_json(r) -> dict:
    return {"id": r.id, "status": r.status, "subject": r.subject, "transaction_id": r.transaction_id,
            "protocol": r.protocol, "requester": r.requester, "created_at": r.created_at.isoformat(),
            "renewal_of": r.renewal_of, "serial": r.serial, "reason": r.reason}
