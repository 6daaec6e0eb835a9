"""Fuzz what follows the SCEP signature check: the signed attributes and the pkcsPKIEnvelope.

Input: a 2-byte big-endian length L, L bytes of raw signed attributes (DER Attribute elements,
placed in the SignerInfo's signedAttrs next to contentType and messageDigest), then the
encapsulated content (a ContentInfo(EnvelopedData)). Each input is signed with a fresh-per-run
P-256 key, so decode_pki_message gets past its signature check and the fuzzer explores the
attribute decoding, open_envelope with the vectors' CA and RA keys, and the inner decoders.

Seeds: the attributes and envelopes of the captured client messages.
Allowed: ScepdError.
"""
from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's scepd wins
sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris  # noqa: E402

import common  # noqa: E402
from fuzz_scep_message import RECIPIENTS, decode_inner  # noqa: E402

with atheris.instrument_imports(include=["scepd", "asn1crypto"]):
    from asn1crypto import cms
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from scepd.errors import ScepdError
    from scepd.scep import der, wire

NAME = "scep_envelope"
ALLOWED = (ScepdError,)

_KEY = ec.generate_private_key(ec.SECP256R1())
_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz signer")])
_T0 = dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)
_CERT = (x509.CertificateBuilder().subject_name(_NAME).issuer_name(_NAME).public_key(_KEY.public_key())
         .serial_number(1).not_valid_before(_T0).not_valid_after(_T0 + dt.timedelta(days=1))
         .sign(_KEY, hashes.SHA256()))


def build(data: bytes) -> bytes:
    n = int.from_bytes(data[:2], "big")
    attrs, content = data[2:2 + n], data[2 + n:]
    return wire._signed_data(content, [wire._attribute(wire.OID_CONTENT_TYPE, der.oid(wire.OID_DATA)), attrs],
                             _CERT, _KEY, "sha256", [_CERT])


def check(data: bytes) -> None:
    msg = wire.decode_pki_message(build(data))
    assert isinstance(msg.message_type, int) and len(msg.sender_nonce) == 16
    if msg.envelope is not None:
        decode_inner(msg.message_type, wire.open_envelope(msg.envelope, RECIPIENTS))


def TestOneInput(data: bytes) -> None:
    try:
        check(data)
    except ALLOWED + common.TOLERATED:
        pass


def seeds() -> list[bytes]:
    out = []
    skip = {wire.OID_CONTENT_TYPE, wire.OID_MESSAGE_DIGEST}
    for path in common.vector_ders():
        sd = cms.ContentInfo.load(path.read_bytes())["content"]
        si = sd["signer_infos"][0]
        attrs = b"".join(a.dump() for a in si["signed_attrs"] if a["type"].dotted not in skip)
        content = sd["encap_content_info"]["content"].native or b""
        out.append(len(attrs).to_bytes(2, "big") + attrs + content)
    return out


if __name__ == "__main__":
    common.main(NAME, TestOneInput, seeds)
