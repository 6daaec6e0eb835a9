"""Fuzz the SCEP PKIMessage decoder: decode_pki_message, then open_envelope with the vectors'
real recipient keys (the CA and the RA of ../shared/vectors/scep/pki), then the inner content
decoder of the message type (PKCS#10, IssuerAndSubject, IssuerAndSerialNumber).

Seeds: the captured client messages (fuzz/corpus/scep_message/, the vectors' own bytes).
Mutations rarely keep the outer signature valid, so fuzz_scep_envelope.py re-signs each input
to reach the envelope and inner decoders; this harness covers everything up to the signature.
Allowed: ScepdError (wire.py documents MalformedRequest / UnverifiableMessage / NotForUs).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's scepd wins
sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris  # noqa: E402

import common  # noqa: E402

with atheris.instrument_imports(include=["scepd", "asn1crypto"]):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from scepd.ca.csr import decode_csr
    from scepd.errors import ScepdError
    from scepd.scep import wire

NAME = "scep_message"
ALLOWED = (ScepdError,)


def _pair(stem: str) -> wire.Recipient:
    cert = x509.load_pem_x509_certificate(common.vector(f"pki/{stem}.pem"))
    key = serialization.load_pem_private_key(common.vector(f"pki/{stem}.key"), None)
    return wire.Recipient(cert, key)


RECIPIENTS = [_pair("ca"), _pair("ra")]


def decode_inner(message_type: int, data: bytes) -> None:
    """What ScepService does with the decrypted content of each message type."""
    if message_type in (wire.MessageType.PKCS_REQ, wire.MessageType.RENEWAL_REQ):
        decode_csr(data)
    elif message_type == wire.MessageType.CERT_POLL:
        wire.decode_issuer_and_subject(data)
    elif message_type in (wire.MessageType.GET_CERT, wire.MessageType.GET_CRL):
        wire.decode_issuer_and_serial(data)


def check_message(data: bytes) -> None:
    msg = wire.decode_pki_message(data)
    assert isinstance(msg.message_type, int) and len(msg.sender_nonce) == 16
    assert 0 < len(msg.transaction_id) <= 255
    if msg.envelope is not None:
        decode_inner(msg.message_type, wire.open_envelope(msg.envelope, RECIPIENTS))


def TestOneInput(data: bytes) -> None:
    try:
        check_message(data)
    except ALLOWED + common.TOLERATED:
        pass


def seeds() -> list[bytes]:
    return [p.read_bytes() for p in common.vector_ders()]


if __name__ == "__main__":
    common.main(NAME, TestOneInput, seeds)
