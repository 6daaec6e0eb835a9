"""PKCS#10 decoding into plain facts. Shared by SCEP and ACME; policy never sees DER."""
from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Callable

from asn1crypto import algos, csr as asn1_csr
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import AttributeOID, NameOID

from ..errors import BadMessageCheck, ForbiddenAlgorithm, MalformedRequest


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
    #: The requested subject as parsed (it re-encodes to `subject_der` whenever that is DER) and
    #: the Name bytes exactly as received. None/b"" for facts not read from a CSR.
    subject: x509.Name | None = None
    subject_der: bytes = b""

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


#: CSR signature algorithms we verify: OID -> (digest name, scheme). RSA-PSS takes its digest
#: from its parameters; Ed25519/Ed448 sign the message itself.
_SIGNATURE_ALGORITHMS: dict[str, tuple[str | None, str]] = {
    "1.2.840.113549.1.1.4": ("md5", "pkcs1"),
    "1.2.840.113549.1.1.5": ("sha1", "pkcs1"),
    "1.2.840.113549.1.1.14": ("sha224", "pkcs1"),
    "1.2.840.113549.1.1.11": ("sha256", "pkcs1"),
    "1.2.840.113549.1.1.12": ("sha384", "pkcs1"),
    "1.2.840.113549.1.1.13": ("sha512", "pkcs1"),
    "1.2.840.113549.1.1.10": (None, "pss"),
    "1.2.840.10045.4.1": ("sha1", "ecdsa"),
    "1.2.840.10045.4.3.1": ("sha224", "ecdsa"),
    "1.2.840.10045.4.3.2": ("sha256", "ecdsa"),
    "1.2.840.10045.4.3.3": ("sha384", "ecdsa"),
    "1.2.840.10045.4.3.4": ("sha512", "ecdsa"),
    "1.3.101.112": (None, "ed25519"),
    "1.3.101.113": (None, "ed448"),
}
_HASHES = {"md5": hashes.MD5, "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
           "sha384": hashes.SHA384, "sha512": hashes.SHA512}
_DIGEST_NAMES = {"md5": "MD5", "sha1": "SHA-1", "sha224": "SHA-224", "sha256": "SHA-256",
                 "sha384": "SHA-384", "sha512": "SHA-512"}
#: What ACME (and any caller that names nothing) accepts: SHA-2 only. Boulder refuses SHA-1 CSRs.
STRONG_DIGESTS = frozenset({"sha224", "sha256", "sha384", "sha512"})
#: SCEP: SHA-1 is an RFC 8894 algorithm (GetCACaps "SHA-1"); MD5 only behind the legacy switch.
SCEP_DIGESTS = STRONG_DIGESTS | {"sha1"}
LEGACY_SCEP_DIGESTS = SCEP_DIGESTS | {"md5"}


def verify_csr_signature(req: asn1_csr.CertificationRequest, allowed_digests: frozenset[str]) -> None:
    """The one CSR signature check: the public key in the CSR, the CSR's own signature
    algorithm, over the CertificationRequestInfo bytes exactly as received. Raises
    ForbiddenAlgorithm for a digest outside `allowed_digests` (or an unknown algorithm), and
    BadMessageCheck when the signature does not verify."""
    algo = req["signature_algorithm"]
    oid = algo["algorithm"].dotted
    if oid not in _SIGNATURE_ALGORITHMS:
        raise ForbiddenAlgorithm(f"CSR signature algorithm {oid} is not supported")
    digest, scheme = _SIGNATURE_ALGORITHMS[oid]
    pss_padding = None
    if scheme == "pss":
        digest, pss_padding = rsa_pss_padding(algo["parameters"], allowed_digests, "the CSR's")
    _check_digest(digest, allowed_digests)
    try:
        info = req["certification_request_info"]
        tbs = info.dump()  # unmodified: the bytes received
        sig = req["signature"].native
        key = serialization.load_der_public_key(info["subject_pk_info"].dump())
    except (ValueError, TypeError, KeyError, UnsupportedAlgorithm):
        raise MalformedRequest("the CSR public key cannot be read") from None
    _verify(scheme, digest, pss_padding, key, sig, tbs)


def rsa_pss_padding(params: algos.RSASSAPSSParams, allowed_digests: frozenset[str],
                    whose: str) -> tuple[str, padding.PSS]:
    """The one reading of RSASSA-PSS parameters (RFC 4055), for CSRs and SCEP messages alike:
    (the digest, the padding to verify with). MGF1 and the 0xBC trailer only; the mask's digest
    must be one of `allowed_digests` (the caller checks the message digest). ForbiddenAlgorithm
    for anything else, MalformedRequest when they cannot be decoded; `whose` starts the detail."""
    try:
        digest = params["hash_algorithm"]["algorithm"].native
        mgf = params["mask_gen_algorithm"]
        if mgf["algorithm"].native != "mgf1" or params["trailer_field"].native != "trailer_field_bc":
            raise ForbiddenAlgorithm(f"{whose} RSA-PSS parameters are not supported (MGF1 only)")
        mgf_digest = mgf["parameters"]["algorithm"].native
        if mgf_digest not in _HASHES or mgf_digest not in allowed_digests:
            raise ForbiddenAlgorithm(f"{whose} RSA-PSS mask uses "
                                     f"{_DIGEST_NAMES.get(mgf_digest, mgf_digest)}, which is not accepted here")
        return digest, padding.PSS(mgf=padding.MGF1(_HASHES[mgf_digest]()),
                                   salt_length=params["salt_length"].native)
    except (KeyError, ValueError, TypeError):
        raise MalformedRequest(f"{whose} RSA-PSS parameters cannot be decoded") from None


def _check_digest(digest: str | None, allowed_digests: frozenset[str]) -> None:
    if digest is not None and (digest not in _HASHES or digest not in allowed_digests):
        raise ForbiddenAlgorithm(f"the CSR is signed with {_DIGEST_NAMES.get(digest, digest)}, "
                                 "which is not accepted here")


def _verify(scheme: str, digest: str | None, pss_padding, key, sig: bytes, tbs: bytes) -> None:
    try:
        if scheme in ("pkcs1", "pss") and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, tbs, pss_padding or padding.PKCS1v15(), _HASHES[digest]())  # type: ignore[index]
        elif scheme == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, tbs, ec.ECDSA(_HASHES[digest]()))  # type: ignore[index]
        elif scheme == "ed25519" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, tbs)
        elif scheme == "ed448" and isinstance(key, ed448.Ed448PublicKey):
            key.verify(sig, tbs)
        else:
            raise BadMessageCheck("the CSR signature algorithm does not match its key")
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        raise BadMessageCheck("the CSR signature does not verify") from None


def _load_tolerant(csr_der: bytes) -> tuple[x509.CertificateSigningRequest, asn1_csr.CertificationRequest]:
    """cryptography parses strict DER only. strongSwan's pki sends its attributes SET OF unsorted
    (extensionRequest before challengePassword): then the attributes are re-encoded canonically
    so the facts can be read. The signature is always checked on the received bytes (the
    asn1crypto view returned beside the cryptography one)."""
    try:
        req = asn1_csr.CertificationRequest.load(csr_der)
        req["certification_request_info"]["subject"].dump()  # parse what the checks need, now
        req["signature_algorithm"]["algorithm"].dotted
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):  # asn1crypto on odd encodings
        raise MalformedRequest("the request content is not a PKCS#10 certificate request") from None
    try:
        return x509.load_der_x509_csr(csr_der), req
    except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError
        pass
    try:
        info = req["certification_request_info"]
        attrs = asn1_csr.CRIAttributes(list(info["attributes"]))
        canonical = asn1_csr.CertificationRequest({
            "certification_request_info": asn1_csr.CertificationRequestInfo({
                "version": info["version"], "subject": info["subject"],
                "subject_pk_info": info["subject_pk_info"], "attributes": attrs}),
            "signature_algorithm": req["signature_algorithm"], "signature": req["signature"],
        }).dump(force=True)
        return x509.load_der_x509_csr(canonical), asn1_csr.CertificationRequest.load(csr_der)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, x509.InvalidVersion):  # asn1crypto dump()
        raise MalformedRequest("the request content is not a PKCS#10 certificate request") from None


_PSS = "1.2.840.113549.1.1.10"


def _der_elements(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element start, content start, content end) of each element in data[start:end],
    definite lengths only (ValueError otherwise)."""
    out = []
    pos = start
    while pos < end:  # bounded: pos advances by at least 2 each turn
        tag, first, p = data[pos], data[pos + 1], pos + 2
        if first & 0x80:
            n = first & 0x7F
            if n == 0 or n > 4:
                raise ValueError("not a definite length")
            length, p = int.from_bytes(data[p:p + n], "big"), p + n
        else:
            length = first
        if p + length > end:
            raise ValueError("truncated")
        out.append((tag, pos, p, p + length))
        pos = p + length
    return out


@dataclass(frozen=True)
class _Strict:
    """A CSR that pyca parses (strict DER) and that is not RSA-PSS, with what the signature
    check and the subject need, taken from the bytes received."""

    csr: x509.CertificateSigningRequest
    signature_oid: str
    tbs: bytes
    signature: bytes
    subject_der: bytes


def _load_strict(csr_der: bytes) -> _Strict | None:
    """The common case without asn1crypto: None when pyca cannot parse it, when it is signed
    with RSA-PSS (parameters) or its signature BIT STRING has unused bits -- then the asn1crypto
    reading (_load_tolerant, verify_csr_signature) decides, as it always did."""
    try:
        csr = x509.load_der_x509_csr(csr_der)
        oid = csr.signature_algorithm_oid.dotted_string
        outer = _der_elements(csr_der, 0, len(csr_der))
        parts = _der_elements(csr_der, outer[0][2], outer[0][3])
        info = _der_elements(csr_der, parts[0][2], parts[0][3])
    except (ValueError, IndexError, x509.InvalidVersion):  # InvalidVersion is no ValueError
        return None
    if oid == _PSS or len(outer) != 1 or [e[0] for e in parts] != [0x30, 0x30, 0x03] \
            or len(info) < 2 or info[1][0] != 0x30 or parts[2][3] - parts[2][2] < 1 or csr_der[parts[2][2]] != 0:
        return None
    return _Strict(csr, oid, csr_der[parts[0][1]:parts[0][3]], csr_der[parts[2][2] + 1:parts[2][3]],
                   csr_der[info[1][1]:info[1][3]])


def decode_csr(csr_der: bytes, verify_signature: bool = True,
               check_key: Callable[[object], None] | None = None,
               allowed_digests: frozenset[str] = STRONG_DIGESTS) -> CsrFacts:
    """`check_key(public_key)` (policy's key limits) runs before the signature is verified: a
    refused key costs no verification. `allowed_digests`: the signature digests accepted
    (STRONG_DIGESTS, SCEP_DIGESTS, LEGACY_SCEP_DIGESTS); Ed25519/Ed448 have none and are always
    verified."""
    strict = _load_strict(csr_der)
    if strict is not None:
        csr, req = strict.csr, None
    else:
        csr, req = _load_tolerant(csr_der)
    try:
        public_key = csr.public_key()
    except (ValueError, Exception):
        raise MalformedRequest("the CSR public key cannot be read") from None
    if check_key is not None:
        check_key(public_key)
    if verify_signature:
        if strict is not None:  # the same check as verify_csr_signature, on the same bytes
            if strict.signature_oid not in _SIGNATURE_ALGORITHMS:
                raise ForbiddenAlgorithm(f"CSR signature algorithm {strict.signature_oid} is not supported")
            digest, scheme = _SIGNATURE_ALGORITHMS[strict.signature_oid]
            _check_digest(digest, allowed_digests)
            _verify(scheme, digest, None, public_key, strict.signature, strict.tbs)
        else:
            verify_csr_signature(req, allowed_digests)
    try:
        name = csr.subject  # pyca builds the Name here: TypeError for a BIT STRING other than
        cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)  # x500UniqueIdentifier (fuzz_csr)
        cn = cns[0].value if cns else None
        subject = name.rfc4514_string()
        subject_der = strict.subject_der if strict is not None else \
            req["certification_request_info"]["subject"].dump()
    except (ValueError, TypeError):
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
                    challenge_password=challenge, subject=name, subject_der=subject_der)


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False
