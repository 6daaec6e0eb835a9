"""Fuzz the PKCS#10 decoder (scepd/csr.py decode_csr), with and without the signature check
(without it, mutated CSRs reach the subject, extension and attribute decoding).

Seeds: the vectors' CSRs, and CSRs made at start (RSA, P-256, Ed25519; every SAN kind; a
challenge password; unsorted attributes as strongSwan sends them).
Allowed: ScepdError (decode_csr raises MalformedRequest / BadMessageCheck).
"""
from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's scepd wins
sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris  # noqa: E402

import common  # noqa: E402

with atheris.instrument_imports(include=["scepd", "asn1crypto"]):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.x509.oid import AttributeOID, NameOID

    from scepd.ca.csr import decode_csr
    from scepd.errors import ScepdError

NAME = "csr"
ALLOWED = (ScepdError,)


def check(data: bytes) -> None:
    for verify in (True, False):
        try:
            facts = decode_csr(data, verify_signature=verify)
        except ALLOWED + common.TOLERATED:
            continue
        assert isinstance(facts.subject_rfc4514, str) and len(facts.spki_sha256) == 64


def TestOneInput(data: bytes) -> None:
    check(data)


def _csr(key, cn: str, sans, challenge: str | None, hash_alg) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                   x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fuzz")]))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    b = b.add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                        critical=True)
    if challenge is not None:
        b = b.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    return b.sign(key, hash_alg).public_bytes(serialization.Encoding.DER)


def seeds() -> list[bytes]:
    out = [x509.load_pem_x509_csr(p.read_bytes()).public_bytes(serialization.Encoding.DER)
           for p in sorted(common.VECTORS.glob("*.csr.pem"))]
    sans = [x509.DNSName("a.example"), x509.IPAddress(ipaddress.ip_address("192.0.2.1")),
            x509.RFC822Name("a@example.com"), x509.UniformResourceIdentifier("https://a.example/"),
            x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4"))]
    rsa_key = rsa.generate_private_key(65537, 2048)
    out.append(_csr(rsa_key, "rsa", sans, "secret", hashes.SHA256()))
    out.append(_csr(ec.generate_private_key(ec.SECP256R1()), "ec", sans[:2], None, hashes.SHA384()))
    out.append(_csr(ed25519.Ed25519PrivateKey.generate(), "ed", [], "pw", None))
    return out


if __name__ == "__main__":
    common.main(NAME, TestOneInput, seeds)
