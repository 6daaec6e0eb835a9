"""Fuzz the OCSP request decoder: OcspResponder.respond (scepd/ocsp.py) with the vectors'
issuing CA as the signer and an in-memory store (serial % 3: unknown, good, revoked).

respond documents no exception at all: anything that does not decode is answered with a
malformedRequest/unauthorized OCSPResponse. So every exception is a crash, and the answer must
itself decode with pyca/cryptography and name the serial that was asked about.
Seeds made at start: requests for the vectors' device certificate (SHA-1 and SHA-256 CertIDs,
with and without nonce) and for serials landing on each store answer.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's scepd wins
sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris  # noqa: E402

import common  # noqa: E402

with atheris.instrument_imports(include=["scepd"]):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp

    from scepd.clock import FixedClock
    from scepd.ca.crl import Signer
    from scepd.ca.ocsp import OcspResponder, _issuer_hashes
    from scepd.store import StoreNotFound

NAME = "ocsp"
ALLOWED: tuple[type[BaseException], ...] = ()
NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc)
CA = x509.load_pem_x509_certificate(common.vector("pki/ca.pem"))
CA_KEY = serialization.load_pem_private_key(common.vector("pki/ca.key"), None)
DEVICE = x509.load_pem_x509_certificate(common.vector("pki/old.pem"))
SIGNER = Signer(CA, CA_KEY)


class _Store:
    """serial % 3 == 0: never issued; 1: good; 2: revoked (keyCompromise)."""

    async def get_certificate(self, serial: str):
        kind = int(serial, 16) % 3
        if kind == 0:
            raise StoreNotFound(serial)
        return types.SimpleNamespace(ca_id=SIGNER.ca_id, status="valid" if kind == 1 else "revoked",
                                     revoked_at=NOW - dt.timedelta(days=1), issued_at=NOW - dt.timedelta(days=2),
                                     revocation_reason="keyCompromise")


RESPONDER = OcspResponder(_Store(), FixedClock(NOW), [SIGNER])
LOOP = asyncio.new_event_loop()
LABELS = {"good", "revoked", "unknown", "malformedRequest", "unauthorized"}


def check(data: bytes) -> None:
    answer = LOOP.run_until_complete(RESPONDER.respond(data))
    assert answer.status in LABELS, answer.status
    resp = ocsp.load_der_ocsp_response(answer.der)
    if answer.status in ("good", "revoked", "unknown"):
        assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert resp.serial_number == ocsp.load_der_ocsp_request(data).serial_number
    else:
        assert resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL


def TestOneInput(data: bytes) -> None:
    try:
        check(data)
    except ALLOWED + common.TOLERATED:
        pass


def seeds() -> list[bytes]:
    out = []
    for algo in (hashes.SHA1(), hashes.SHA256()):
        for nonce in (None, b"0123456789abcdef"):
            b = ocsp.OCSPRequestBuilder().add_certificate(DEVICE, CA, algo)
            if nonce:
                b = b.add_extension(x509.OCSPNonce(nonce), critical=False)
            out.append(b.build().public_bytes(serialization.Encoding.DER))
    name_hash, key_hash = _issuer_hashes(CA, "sha256")
    for serial in (3, 4, 5):
        out.append(ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            name_hash, key_hash, serial, hashes.SHA256()).build().public_bytes(serialization.Encoding.DER))
    return out


if __name__ == "__main__":
    common.main(NAME, TestOneInput, seeds)
