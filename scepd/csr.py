"""PKCS#10 decoding into plain facts. Shared by SCEP and ACME; policy never sees DER."""
from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from asn1crypto import csr as asn1_csr
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import AttributeOID, NameOID

from .errors import BadMessageCheck, MalformedRequest


@dataclass(frozen=True)
class SubjectAltName:
    kind: str  # "dns" | "ip" | "email" | "uri"
    value: str

    def __str__(self) -> str:
        return f"{self.kind.upper()}:{self.value}"


def certificate_sans(cert: x509.Certificate) -> tuple[SubjectAltName, ...]:
    try:
        return sans_of(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return ()


@dataclass(frozen=True)
class CsrFacts:
    public_key: object
    spki_der: bytes
    common_name: str | None
    subject_rfc4514: str
    sans: tuple[SubjectAltName, ...]
    #: Extension types requested other than SAN (informational; never copied into certificates).
    other_extensions: tuple[str, ...]
    challenge_password: str | None

    @property
    def spki_sha256(self) -> str:
        return hashlib.sha256(self.spki_der).hexdigest()


def sans_of(ext: x509.SubjectAlternativeName) -> tuple[SubjectAltName, ...]:
    """subjectAltName entries as plain facts (unsupported kinds become kind "other")."""
    out: list[SubjectAltName] = []
    for gn in ext:
        if isinstance(gn, x509.DNSName):
            out.append(SubjectAltName("dns", gn.value))
        elif isinstance(gn, x509.IPAddress):
            out.append(SubjectAltName("ip", str(gn.value)))
        elif isinstance(gn, x509.RFC822Name):
            out.append(SubjectAltName("email", gn.value))
        elif isinstance(gn, x509.UniformResourceIdentifier):
            out.append(SubjectAltName("uri", gn.value))
        else:
            out.append(SubjectAltName("other", type(gn).__name__))
    return tuple(out)


def _verify_raw_signature(req: asn1_csr.CertificationRequest) -> bool:
    """Signature check over the CertificationRequestInfo bytes exactly as received."""
    try:
        key = serialization.load_der_public_key(req["certification_request_info"]["subject_pk_info"].dump())
        algo = req["signature_algorithm"]
        hash_name = algo.hash_algo
        hash_cls = {"sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
                    "sha384": hashes.SHA384, "sha512": hashes.SHA512}[hash_name]
        tbs = req["certification_request_info"].dump()
        sig = req["signature"].native
        if isinstance(key, rsa.RSAPublicKey) and algo.signature_algo == "rsassa_pkcs1v15":
            key.verify(sig, tbs, padding.PKCS1v15(), hash_cls())
        elif isinstance(key, ec.EllipticCurvePublicKey) and algo.signature_algo == "ecdsa":
            key.verify(sig, tbs, ec.ECDSA(hash_cls()))
        else:
            return False
        return True
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, KeyError, TypeError):
        return False


def _load_tolerant(csr_der: bytes) -> tuple[x509.CertificateSigningRequest, bool | None]:
    """cryptography parses strict DER only. strongSwan's pki sends its attributes SET OF unsorted
    (extensionRequest before challengePassword): verify the signature over the received bytes,
    then re-encode the attributes canonically so the facts can be read.
    Returns (csr, signature_ok or None when cryptography should check it)."""
    try:
        return x509.load_der_x509_csr(csr_der), None
    except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError
        pass
    try:
        req = asn1_csr.CertificationRequest.load(csr_der)
        ok = _verify_raw_signature(req)
        info = req["certification_request_info"]
        attrs = asn1_csr.CRIAttributes(list(info["attributes"]))
        canonical = asn1_csr.CertificationRequest({
            "certification_request_info": asn1_csr.CertificationRequestInfo({
                "version": info["version"], "subject": info["subject"],
                "subject_pk_info": info["subject_pk_info"], "attributes": attrs}),
            "signature_algorithm": req["signature_algorithm"], "signature": req["signature"],
        }).dump(force=True)
        return x509.load_der_x509_csr(canonical), ok
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, x509.InvalidVersion):  # asn1crypto dump()
        raise MalformedRequest("the request content is not a PKCS#10 certificate request") from None


def decode_csr(csr_der: bytes, verify_signature: bool = True) -> CsrFacts:
    csr, raw_signature_ok = _load_tolerant(csr_der)
    try:
        public_key = csr.public_key()
    except (ValueError, Exception):
        raise MalformedRequest("the CSR public key cannot be read") from None
    if verify_signature and raw_signature_ok is not None:
        if not raw_signature_ok:
            raise BadMessageCheck("the CSR signature does not verify")
    elif verify_signature:
        try:
            ok = csr.is_signature_valid
        except Exception:
            ok = False
        if not ok:
            raise BadMessageCheck("the CSR signature does not verify")
    try:
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = cns[0].value if cns else None
        subject = csr.subject.rfc4514_string()
    except ValueError:
        raise MalformedRequest("the CSR subject cannot be decoded") from None
    sans: tuple[SubjectAltName, ...] = ()
    others: list[str] = []
    try:
        for ext in csr.extensions:
            if isinstance(ext.value, x509.SubjectAlternativeName):
                sans = sans_of(ext.value)
            else:
                others.append(ext.oid.dotted_string)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise MalformedRequest("the CSR extension request cannot be decoded") from None
    challenge = None
    try:
        attr = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
        challenge = attr.value.decode("utf-8", "replace") if isinstance(attr.value, bytes) else str(attr.value)
    except x509.AttributeNotFound:
        pass
    except ValueError:
        raise MalformedRequest("the CSR attributes cannot be decoded") from None
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return CsrFacts(public_key=public_key, spki_der=spki, common_name=cn if isinstance(cn, str) else None,
                    subject_rfc4514=subject, sans=sans, other_extensions=tuple(others),
                    challenge_password=challenge)


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False
