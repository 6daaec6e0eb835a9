"""Deeply nested input never reaches a recursion limit (issue 11 item 6): every BER walker of ours
is iterative and bounded, and asn1crypto (which recurses) only sees bytes whose nesting a cheap
pre-scan bounded. Unauthenticated, 13 KB of nesting used to answer HTTP 500."""
from __future__ import annotations

import datetime as dt
import os

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID, ObjectIdentifier

from scepd.http.app import SERVICES, create_https_app
from scepd.errors import MalformedRequest
from scepd.scep import der, wire

from .helpers import VECTORS, rsa_key, self_signed
from .test_acme_jws import P, problem_type


def nested(depth: int, tag: int, innermost: bytes) -> bytes:
    out = innermost
    for _ in range(depth):
        out = der.tlv(tag, out)
    return out


DEEP_OCTETS = nested(3000, 0x24, der.octet_string(b"A" * 16))  # BER constructed OCTET STRINGs
DEEP_SEQUENCE = nested(3000, 0x30, b"")


def signed_message(content: bytes, certs: bytes | None = None) -> bytes:
    """A PKCSReq-shaped SignedData around `content`, or, with `certs` as its certificate field,
    one whose signature is junk: the certificates are read before the signature is checked."""
    key = rsa_key(0)
    cert = self_signed(key)
    attrs = [wire._attribute(wire.OID_CONTENT_TYPE, der.oid(wire.OID_DATA)),
             wire._attribute(wire.OID_MESSAGE_TYPE, der.printable("19")),
             wire._attribute(wire.OID_TRANSACTION_ID, der.printable("DEEP")),
             wire._attribute(wire.OID_SENDER_NONCE, der.octet_string(os.urandom(16)))]
    if certs is None:
        return wire._signed_data(content, attrs, cert, key, "sha256", [cert])
    digest_alg = der.algorithm(wire.DIGESTS["sha256"][0], der.null())
    signer_info = der.seq(der.integer(1), der.seq(cert.issuer.public_bytes(), der.integer(cert.serial_number)),
                          digest_alg, der.tlv(0xA0, b"".join(attrs)), der.algorithm(wire.OID_RSA, der.null()),
                          der.octet_string(b"junk"))
    signed_data = der.seq(der.integer(1), der.set_of(digest_alg),
                          der.seq(der.oid(wire.OID_DATA), der.explicit(0, der.octet_string(content))),
                          der.tlv(0xA0, certs), der.set_of(signer_info))
    return der.seq(der.oid(wire.OID_SIGNED_DATA), der.explicit(0, signed_data))


def envelope_with(ca: x509.Certificate, encrypted_content: bytes) -> bytes:
    ktri = der.seq(der.integer(0), der.seq(ca.issuer.public_bytes(), der.integer(ca.serial_number)),
                   der.algorithm(wire.OID_RSA, der.null()), der.octet_string(b"\x01" * 256))
    eci = der.seq(der.oid(wire.OID_DATA), der.algorithm(wire.CIPHERS["aes-128-cbc"][0], der.octet_string(b"\0" * 16)),
                  encrypted_content)
    return der.seq(der.oid(wire.OID_ENVELOPED_DATA), der.explicit(0, der.seq(der.integer(0), der.set_of(ktri), eci)))


def certificate_with_extension(oid: str, value: bytes) -> bytes:
    key = rsa_key(0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deep")])
    now = dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(ObjectIdentifier(oid), value), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def _cases(ca: x509.Certificate) -> dict[str, bytes]:
    our_cert = self_signed(rsa_key(0)).public_bytes(serialization.Encoding.DER)
    policies = der.seq(der.seq(der.oid("2.5.29.32.0"), der.seq(der.seq(der.oid("1.2.3.4.5"), DEEP_SEQUENCE))))
    return {
        # the case: [0] encryptedContent holding 3,000 nested constructed OCTET STRINGs
        "encryptedContent": signed_message(envelope_with(ca, der.tlv(0xA0, DEEP_OCTETS))),
        # top level: an "other" certificate format in the certificates field, read before the signature
        "certificates field": signed_message(b"", der.tlv(0xA3, der.oid("1.2.3.4") + DEEP_SEQUENCE) + our_cert),
        # DER inside an OCTET STRING: a certificate policy qualifier, parsed when certificates are read
        "certificate extension": signed_message(b"", certificate_with_extension("2.5.29.32", policies)),
    }


@pytest.mark.parametrize("case", ["encryptedContent", "certificates field", "certificate extension"])
async def test_deep_pkioperation_is_400(client, case):
    body = _cases(client.server.app[SERVICES].ca_material.cert)[case]
    assert len(body) < 20_000
    resp = await client.post("/scep?operation=PKIOperation", data=body)
    text = await resp.text()
    assert resp.status == 400, text
    assert text.count("\n") == 1 and "Recursion" not in text


def test_open_envelope_bounds_constructed_octet_strings():
    """Our own walker (string_octets), reached directly: a bounded, iterative ValueError."""
    ca = self_signed(rsa_key(1), "CA")
    enveloped = cms.ContentInfo.load(envelope_with(ca, der.tlv(0xA0, DEEP_OCTETS)))["content"].untag().dump()
    with pytest.raises(MalformedRequest):
        wire.open_envelope(wire.Envelope(enveloped, "aes-128-cbc"), [wire.Recipient(ca, rsa_key(1))])
    with pytest.raises(ValueError):
        der.string_octets(der.tlv(0xA0, DEEP_OCTETS))
    with pytest.raises(ValueError):
        der.read_tlv(b"\x30\x80" * 3000 + b"\x00\x00" * 3000)


def test_the_bound_leaves_real_messages_alone():
    """Every real capture passes the pre-scan, and so do 60 levels (real messages stay under 25)."""
    for capture in VECTORS.glob("*.der"):
        der.check_nesting(capture.read_bytes())
    der.check_nesting(nested(60, 0x30, b""))
    assert der.string_octets(nested(3, 0x24, der.octet_string(b"ab") + der.octet_string(b"c"))) == b"abc"
    with pytest.raises(der.NestingTooDeep):
        der.check_nesting(nested(200, 0x04, b"\x05\x00"))  # DER inside OCTET STRINGs counts too


async def test_deep_acme_json_is_a_problem_document(aiohttp_client, services):
    client = await aiohttp_client(create_https_app(services))
    deep = b"[" * 20_000 + b"]" * 20_000  # under the 64 KB body cap
    resp = await client.post("/acme/new-account", data=deep, headers={"Content-Type": "application/jose+json"})
    assert resp.status == 400
    assert await problem_type(resp) == P + "malformed"
