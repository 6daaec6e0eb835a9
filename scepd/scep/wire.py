"""SCEP wire format (RFC 8894): PKIMessage decoding and CertRep / certs-only encoding.

Pure functions from bytes to frozen dataclasses and back; keys, clock values and randomness are
passed in. Nothing here knows about HTTP, policy or storage. Errors are the typed ScepdErrors:
MalformedRequest / UnverifiableMessage / NotForUs (answered with HTTP 400 by the transport), and
UnreadableEnvelope for anything that goes wrong once decryption starts (one answer for every
such failure: see open_envelope).
"""
from __future__ import annotations

import datetime as dt
import enum
import functools
import hmac
import os
from dataclasses import dataclass
from typing import Callable

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, padding as sym_padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..ca.csr import SCEP_DIGESTS, rsa_pss_padding
from ..errors import MalformedRequest, NotForUs, ScepdError, UnreadableEnvelope, UnverifiableMessage
from . import der

# --- vocabulary -----------------------------------------------------------------------------


class MessageType(enum.IntEnum):
    CERT_REP = 3
    RENEWAL_REQ = 17
    PKCS_REQ = 19
    CERT_POLL = 20  # GetCertInitial
    GET_CERT = 21
    GET_CRL = 22


class PkiStatus(enum.IntEnum):
    SUCCESS = 0
    FAILURE = 2
    PENDING = 3


OID_DATA = "1.2.840.113549.1.7.1"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
OID_RSA = "1.2.840.113549.1.1.1"
OID_RSA_PSS = "1.2.840.113549.1.1.10"
OID_MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
OID_PKI_STATUS = "2.16.840.1.113733.1.9.3"
OID_FAIL_INFO = "2.16.840.1.113733.1.9.4"
OID_SENDER_NONCE = "2.16.840.1.113733.1.9.5"
OID_RECIPIENT_NONCE = "2.16.840.1.113733.1.9.6"
OID_TRANSACTION_ID = "2.16.840.1.113733.1.9.7"
OID_FAIL_INFO_TEXT = "1.3.6.1.5.5.7.24.1"

#: digest name -> (OID, cryptography hash class)
DIGESTS: dict[str, tuple[str, type[hashes.HashAlgorithm]]] = {
    "md5": ("1.2.840.113549.2.5", hashes.MD5),
    "sha1": ("1.3.14.3.2.26", hashes.SHA1),
    "sha224": ("2.16.840.1.101.3.4.2.4", hashes.SHA224),
    "sha256": ("2.16.840.1.101.3.4.2.1", hashes.SHA256),
    "sha384": ("2.16.840.1.101.3.4.2.2", hashes.SHA384),
    "sha512": ("2.16.840.1.101.3.4.2.3", hashes.SHA512),
}
_DIGEST_BY_OID = {oid: name for name, (oid, _) in DIGESTS.items()}
#: signature OIDs that imply a digest (some clients put these in SignerInfo.signatureAlgorithm)
_SIG_OIDS = {
    OID_RSA: ("rsa", None),
    "1.2.840.113549.1.1.4": ("rsa", "md5"),
    "1.2.840.113549.1.1.5": ("rsa", "sha1"),
    "1.2.840.113549.1.1.14": ("rsa", "sha224"),
    "1.2.840.113549.1.1.11": ("rsa", "sha256"),
    "1.2.840.113549.1.1.12": ("rsa", "sha384"),
    "1.2.840.113549.1.1.13": ("rsa", "sha512"),
    OID_RSA_PSS: ("rsa-pss", None),  # strongSwan `pki --scep --rsa-padding pss`; parameters name the digest
    "1.2.840.10045.2.1": ("ecdsa", None),
    "1.2.840.10045.4.1": ("ecdsa", "sha1"),
    "1.2.840.10045.4.3.2": ("ecdsa", "sha256"),
    "1.2.840.10045.4.3.3": ("ecdsa", "sha384"),
    "1.2.840.10045.4.3.4": ("ecdsa", "sha512"),
}

#: content cipher name -> (OID, key bytes, block bytes)
CIPHERS: dict[str, tuple[str, int, int]] = {
    "des-cbc": ("1.3.14.3.2.7", 8, 8),
    "des-ede3-cbc": ("1.2.840.113549.3.7", 24, 8),
    "aes-128-cbc": ("2.16.840.1.101.3.4.1.2", 16, 16),
    "aes-192-cbc": ("2.16.840.1.101.3.4.1.22", 24, 16),
    "aes-256-cbc": ("2.16.840.1.101.3.4.1.42", 32, 16),
}
_CIPHER_BY_OID = {oid: name for name, (oid, _, _) in CIPHERS.items()}
LEGACY_CIPHERS = frozenset({"des-cbc"})
LEGACY_DIGESTS = frozenset({"md5"})


# --- decoded forms --------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """The pkcsPKIEnvelope, still encrypted."""

    enveloped_der: bytes
    cipher: str  # a CIPHERS name, or "unknown:<oid>"


@dataclass(frozen=True)
class PkiMessage:
    message_type: int
    transaction_id: str
    sender_nonce: bytes
    signer_cert: x509.Certificate
    signer_cert_der: bytes
    digest: str  # a DIGESTS name
    signing_time: dt.datetime | None
    envelope: Envelope | None

    @property
    def signer_is_self_signed(self) -> bool:
        return self.signer_cert.issuer == self.signer_cert.subject


@dataclass(frozen=True)
class Recipient:
    """A certificate + RSA key that requests may be encrypted to (the CA, or the RA)."""

    cert: x509.Certificate
    key: rsa.RSAPrivateKey


@dataclass(frozen=True)
class IssuerAndSerial:
    issuer_der: bytes
    serial: int


@dataclass(frozen=True)
class IssuerAndSubject:
    issuer_der: bytes
    subject_der: bytes


# --- tolerant specs -------------------------------------------------------------------------


class _EncryptedContentInfo(core.Sequence):
    """As cms.EncryptedContentInfo, but keeps encryptedContent raw: clients send it BER-constructed."""

    _fields = [
        ("content_type", cms.ContentType),
        ("content_encryption_algorithm", cms.EncryptionAlgorithm),
        ("encrypted_content", core.Any, {"optional": True}),
    ]


class _EnvelopedData(core.Sequence):
    _fields = [
        ("version", cms.CMSVersion),
        ("originator_info", cms.OriginatorInfo, {"implicit": 0, "optional": True}),
        ("recipient_infos", cms.RecipientInfos),
        ("encrypted_content_info", _EncryptedContentInfo),
        ("unprotected_attrs", cms.CMSAttributes, {"implicit": 1, "optional": True}),
    ]


class _EnvelopeContentInfo(core.Sequence):
    _fields = [("content_type", cms.ContentType), ("content", _EnvelopedData, {"explicit": 0})]


class _IssuerAndSubject(core.Sequence):
    _fields = [("issuer", asn1_x509.Name), ("subject", asn1_x509.Name)]


# --- decoding -------------------------------------------------------------------------------


def _printable(value: core.Asn1Value) -> str:
    native = value.native
    if isinstance(native, bytes):
        native = native.decode("ascii", "replace")
    if not isinstance(native, str):
        raise ValueError("not a string")
    return native


def _contents(value: bytes, tag: int) -> bytes | None:
    """The contents of `value` when it is one definite-length element with primitive `tag` (the
    DER every client sends), read without asn1crypto; None for anything else, which asn1crypto
    then reads (so an unusual encoding gets exactly its answer)."""
    try:
        found, start, end = der._header(value, 0)
    except ValueError:
        return None
    return value[start:end] if found == tag and end == len(value) else None


def _octets(value: bytes):
    """An OCTET STRING attribute value's octets (asn1crypto's .native for anything unusual)."""
    fast = _contents(value, 0x04)
    return fast if fast is not None else core.OctetString.load(value).native


def _printable_value(value: bytes) -> str:
    """A PrintableString attribute value as _printable reads it."""
    fast = _contents(value, 0x13)
    return fast.decode("latin1") if fast is not None else _printable(core.PrintableString.load(value))


def _signing_time(value: bytes) -> dt.datetime:
    """A signingTime value: the UTCTime YYMMDDHHMMSSZ of every client read directly, anything
    else by asn1crypto (cms.Time)."""
    fast = _contents(value, 0x17)
    if fast is not None and len(fast) == 13 and fast[12:] == b"Z" and fast[:12].isdigit():
        yy = int(fast[0:2])
        try:
            return dt.datetime(yy + (2000 if yy < 50 else 1900), int(fast[2:4]), int(fast[4:6]),
                               int(fast[6:8]), int(fast[8:10]), int(fast[10:12]), tzinfo=dt.timezone.utc)
        except ValueError:
            pass
    return cms.Time.load(value).native


def _attr(attrs: dict[str, list], oid: str, what: str) -> core.Asn1Value:
    values = attrs.get(oid)
    if not values:
        raise MalformedRequest(f"the SCEP message has no {what} attribute")
    return values[0]


def _signed_attrs_to_verify(si: cms.SignerInfo) -> bytes:
    """The signed attributes as the signer signed them: the received contents under a SET tag."""
    raw = si["signed_attrs"]
    return der.tlv(0x31, raw.contents)


def _find_signer(sd: cms.SignedData, si: cms.SignerInfo) -> tuple[x509.Certificate, bytes]:
    sid = si["sid"]
    certificates = sd["certificates"]  # Void when absent; never .native (it parses every certificate)
    candidates = [] if isinstance(certificates, core.Void) else \
        [c.chosen for c in certificates if c.name == "certificate"]
    for cand in candidates:
        if sid.name == "issuer_and_serial_number":
            ias = sid.chosen
            if cand.serial_number == ias["serial_number"].native and \
                    cand.issuer.dump() == ias["issuer"].dump():
                break
        elif sid.name == "subject_key_identifier":
            if cand.key_identifier == sid.chosen.native:
                break
    else:
        if len(candidates) == 1:  # tolerate a sloppy sid when there is only one candidate
            cand = candidates[0]
        else:
            raise MalformedRequest("the SCEP message does not carry its signer's certificate")
    cert_der = cand.dump()
    try:
        return x509.load_der_x509_certificate(cert_der), cert_der
    except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError
        raise MalformedRequest("the signer certificate cannot be parsed") from None


def _verify_signature(cert: x509.Certificate, si: cms.SignerInfo, digest: str, data: bytes) -> None:
    params = si["signature_algorithm"]["parameters"]
    _verify_raw(cert, si["signature_algorithm"]["algorithm"].dotted, si["signature"].native, digest, data,
                None if isinstance(params, (core.Void, core.Null)) else params.dump())


def _pss_padding(params_der: bytes | None, digest: str) -> padding.PSS:
    """RSASSA-PSS (RFC 4056 in CMS): the parameters' digest must be the SignerInfo's own."""
    if params_der is None:
        raise UnverifiableMessage("the RSA-PSS signature has no parameters")
    try:
        params = algos.RSASSAPSSParams.load(params_der)
        pss_digest, pss = rsa_pss_padding(params, SCEP_DIGESTS, "the SCEP message's")
    except ScepdError as err:
        raise UnverifiableMessage(err.detail) from None
    except (ValueError, TypeError):
        raise UnverifiableMessage("the SCEP message's RSA-PSS parameters cannot be decoded") from None
    if pss_digest != digest:
        raise UnverifiableMessage("the RSA-PSS digest is not the SignerInfo's digest algorithm")
    return pss


def _verify_raw(cert: x509.Certificate, sig_oid: str, signature: bytes, digest: str, data: bytes,
                params_der: bytes | None = None) -> None:
    kind, implied = _SIG_OIDS.get(sig_oid, (None, None))
    if kind is None:
        raise UnverifiableMessage(f"unsupported signature algorithm {sig_oid}")
    hash_cls = DIGESTS[implied or digest][1]
    key = cert.public_key()
    try:
        if kind == "rsa" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hash_cls())
        elif kind == "rsa-pss" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, _pss_padding(params_der, digest), hash_cls())
        elif kind == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hash_cls()))
        else:
            raise UnverifiableMessage("the signer key does not match the signature algorithm")
    except InvalidSignature:
        raise UnverifiableMessage("the SCEP message signature does not verify") from None


class SignerKeyRefused(Exception):
    """decode_pki_message's `check_signer_key` refused the signer's key: `error` says why, and
    `message` is the decoded message, NOT verified (enough to address a signed FAILURE)."""

    def __init__(self, error: ScepdError, message: "PkiMessage"):
        super().__init__(error.detail)
        self.error, self.message = error, message


@dataclass(frozen=True)
class _SignedParts:
    """What decode_pki_message reads from the outer SignedData, whichever parser read it."""

    content: bytes  # the eContent octets (b"" when absent)
    attrs: dict[str, list[bytes]]  # signed attribute OID -> its values, each one element's bytes
    digest_oid: str
    signature_oid: str
    signature: bytes
    signed_attrs: bytes  # the signed attributes under a SET tag, as signed
    find_signer: Callable[[], tuple[x509.Certificate, bytes]]
    signature_params: bytes | None = None  # the signature algorithm's parameters (DER), when not NULL


def _parse_signed_data(message_der: bytes) -> _SignedParts:
    """The tolerant parser (asn1crypto: BER, several signers' certificates, odd encodings)."""
    ci = cms.ContentInfo.load(message_der)
    if ci["content_type"].dotted != OID_SIGNED_DATA:
        raise MalformedRequest("the SCEP message is not a CMS SignedData")
    sd = ci["content"]
    signer_infos = list(sd["signer_infos"])
    if not signer_infos:
        raise MalformedRequest("the SCEP message has no signer")
    si = signer_infos[0]
    encap = sd["encap_content_info"]
    content = encap["content"].native if encap["content"].native is not None else b""
    if not isinstance(content, bytes):
        content = bytes(encap["content"])
    if isinstance(si["signed_attrs"], core.Void):
        raise MalformedRequest("the SCEP message has no signed attributes")
    attrs: dict[str, list[bytes]] = {}
    for a in si["signed_attrs"]:
        attrs.setdefault(a["type"].dotted, [v.dump() for v in a["values"]])
    params = si["signature_algorithm"]["parameters"]
    return _SignedParts(content, attrs, si["digest_algorithm"]["algorithm"].dotted,
                        si["signature_algorithm"]["algorithm"].dotted, si["signature"].native,
                        _signed_attrs_to_verify(si), lambda: _find_signer(sd, si),
                        None if isinstance(params, (core.Void, core.Null)) else params.dump())


#: DER contents of the OIDs the fast parser recognises -> dotted form (anything else: the
#: tolerant parser decides)
_KNOWN_OIDS = {der.oid(o)[2:]: o for o in (
    OID_SIGNED_DATA, OID_DATA, OID_ENVELOPED_DATA, OID_CONTENT_TYPE, OID_MESSAGE_DIGEST, OID_SIGNING_TIME,
    OID_MESSAGE_TYPE, OID_PKI_STATUS, OID_FAIL_INFO, OID_SENDER_NONCE, OID_RECIPIENT_NONCE,
    OID_TRANSACTION_ID, OID_FAIL_INFO_TEXT, *(oid for oid, _ in DIGESTS.values()), *_SIG_OIDS,
    *(oid for oid, _, _ in CIPHERS.values()))}


#: the tags asn1crypto's CMS attribute specs demand of these attributes' values (the SCEP ones
#: are untyped there)
_ATTRIBUTE_TAGS = {OID_CONTENT_TYPE: (0x06,), OID_MESSAGE_DIGEST: (0x04,), OID_SIGNING_TIME: (0x17, 0x18)}


class _Unusual(Exception):
    """The fast parser met something it leaves to the tolerant one."""


def _elements(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element start, content start, content end) of each element in data[start:end]:
    definite lengths only, no recursion (ValueError/_Unusual otherwise)."""
    out = []
    pos = start
    while pos < end:  # bounded: pos advances by at least 2 each turn
        tag, content_start, content_end = der._header(data, pos)
        if content_end is None or content_end > end:
            raise _Unusual
        out.append((tag, pos, content_start, content_end))
        pos = content_end
    return out


def _fast_oid(data: bytes, element: tuple[int, int, int, int]) -> str:
    tag, _s, cs, ce = element
    if tag != 0x06:
        raise _Unusual
    dotted = _KNOWN_OIDS.get(data[cs:ce])
    if dotted is None:
        raise _Unusual
    return dotted


def _parse_signed_data_fast(m: bytes) -> _SignedParts | None:
    """The common case, definite-length DER with one certificate, read by walking the bytes
    (no asn1crypto): None for anything else, which the tolerant parser then reads, so every
    unusual message gets exactly the tolerant parser's answer."""
    try:
        outer = _elements(m, 0, len(m))
        if len(outer) < 1 or outer[0][0] != 0x30:
            raise _Unusual
        ci = _elements(m, outer[0][2], outer[0][3])
        if len(ci) != 2 or _fast_oid(m, ci[0]) != OID_SIGNED_DATA or ci[1][0] != 0xA0:
            raise _Unusual
        wrapped = _elements(m, ci[1][2], ci[1][3])
        if len(wrapped) != 1 or wrapped[0][0] != 0x30:
            raise _Unusual
        sd = _elements(m, wrapped[0][2], wrapped[0][3])
        tags = [e[0] for e in sd]
        if tags not in ([0x02, 0x31, 0x30, 0xA0, 0x31], [0x02, 0x31, 0x30, 0xA0, 0xA1, 0x31]):
            raise _Unusual
        encap = _elements(m, sd[2][2], sd[2][3])
        if not encap or _fast_oid(m, encap[0]) != OID_DATA or len(encap) > 2:
            raise _Unusual
        content = b""
        if len(encap) == 2:
            if encap[1][0] != 0xA0:
                raise _Unusual
            inner = _elements(m, encap[1][2], encap[1][3])
            if len(inner) != 1 or inner[0][0] != 0x04:  # a BER-constructed eContent: tolerant parser
                raise _Unusual
            content = m[inner[0][2]:inner[0][3]]
        certs = _elements(m, sd[3][2], sd[3][3])
        if len(certs) != 1 or certs[0][0] != 0x30:
            raise _Unusual
        signer_der = m[certs[0][1]:certs[0][3]]
        signer_infos = _elements(m, sd[-1][2], sd[-1][3])
        if not signer_infos or signer_infos[0][0] != 0x30:
            raise _Unusual
        si = _elements(m, signer_infos[0][2], signer_infos[0][3])
        if len(si) not in (6, 7) or [e[0] for e in si[:6]] != [0x02, si[1][0], 0x30, 0xA0, 0x30, 0x04] \
                or si[1][0] not in (0x30, 0x80) or (len(si) == 7 and si[6][0] != 0xA1):
            raise _Unusual
        if si[1][0] == 0x30 and [e[0] for e in _elements(m, si[1][2], si[1][3])] != [0x30, 0x02]:
            raise _Unusual  # a malformed IssuerAndSerialNumber: the tolerant parser's answer
        digest_alg = _elements(m, si[2][2], si[2][3])
        signature_alg = _elements(m, si[4][2], si[4][3])
        if not digest_alg or not signature_alg:
            raise _Unusual
        digest_oid, signature_oid = _fast_oid(m, digest_alg[0]), _fast_oid(m, signature_alg[0])
        signature_params = None  # absent or NULL, else its DER (RSA-PSS)
        if len(signature_alg) > 1 and signature_alg[1][0] != 0x05:
            signature_params = m[signature_alg[1][1]:signature_alg[1][3]]
        attrs: dict[str, list[bytes]] = {}
        for attr in _elements(m, si[3][2], si[3][3]):
            if attr[0] != 0x30:
                raise _Unusual
            type_and_values = _elements(m, attr[2], attr[3])
            if len(type_and_values) != 2 or type_and_values[1][0] != 0x31:
                raise _Unusual
            values = _elements(m, type_and_values[1][2], type_and_values[1][3])
            attr_type = _fast_oid(m, type_and_values[0])
            if any(v[0] not in _ATTRIBUTE_TAGS.get(attr_type, (v[0],)) for v in values):
                raise _Unusual  # a value not of its type: the tolerant parser's answer
            attrs.setdefault(attr_type, [m[v[1]:v[3]] for v in values])
        try:  # the one certificate is the signer, whatever the sid says (as the tolerant parser)
            signer = x509.load_der_x509_certificate(signer_der)
        except (ValueError, x509.InvalidVersion):
            raise _Unusual from None
    except (_Unusual, ValueError, IndexError):
        return None
    return _SignedParts(content, attrs, digest_oid, signature_oid, m[si[5][2]:si[5][3]],
                        der.tlv(0x31, m[si[3][2]:si[3][3]]), lambda: (signer, signer_der), signature_params)


def _envelope_fast(content: bytes) -> Envelope | None:
    """The pkcsPKIEnvelope in the common case, definite-length DER, read by walking the bytes;
    None for anything else (the tolerant parser's)."""
    try:
        ci = _elements(content, 0, len(content))
        if len(ci) != 1 or ci[0][0] != 0x30:
            return None
        parts = _elements(content, ci[0][2], ci[0][3])
        if len(parts) != 2 or _fast_oid(content, parts[0]) != OID_ENVELOPED_DATA or parts[1][0] != 0xA0:
            return None
        wrapped = _elements(content, parts[1][2], parts[1][3])
        if len(wrapped) != 1 or wrapped[0][0] != 0x30:
            return None
        env = _elements(content, wrapped[0][2], wrapped[0][3])
        if [e[0] for e in env] != [0x02, 0x31, 0x30]:
            return None
        eci = _elements(content, env[2][2], env[2][3])
        if len(eci) not in (2, 3) or _fast_oid(content, eci[0]) != OID_DATA or eci[1][0] != 0x30:
            return None
        alg = _elements(content, eci[1][2], eci[1][3])
        if not alg:
            return None
        return Envelope(enveloped_der=content[wrapped[0][1]:wrapped[0][3]],
                        cipher=_CIPHER_BY_OID[_fast_oid(content, alg[0])])
    except (_Unusual, ValueError, IndexError, KeyError):
        return None


def _envelope_of(content: bytes) -> Envelope:
    """The pkcsPKIEnvelope (still encrypted): its EnvelopedData and content cipher."""
    fast = _envelope_fast(content)
    if fast is not None:
        return fast
    env_ci = _EnvelopeContentInfo.load(content)
    if env_ci["content_type"].dotted != OID_ENVELOPED_DATA:
        raise MalformedRequest("the pkcsPKIEnvelope is not a CMS EnvelopedData")
    env = env_ci["content"]
    alg = env["encrypted_content_info"]["content_encryption_algorithm"]["algorithm"].dotted
    return Envelope(enveloped_der=env.untag().dump(), cipher=_CIPHER_BY_OID.get(alg, f"unknown:{alg}"))


def decode_pki_message(message_der: bytes,
                       check_signer_key: Callable[[object], None] | None = None) -> PkiMessage:
    """Parse and verify the outer SignedData. The envelope is left encrypted (open_envelope).
    `check_signer_key(public_key)` runs before any digest or signature work; when it raises a
    ScepdError the signature is not verified and SignerKeyRefused is raised instead."""
    refused: ScepdError | None = None
    try:
        # asn1crypto recurses: bound the nesting before it sees anything (see der.check_nesting)
        message_der = message_der[:der.read_tlv(message_der)[3]]
        der.check_nesting(message_der)
        parts = _parse_signed_data_fast(message_der) or _parse_signed_data(message_der)
        content, attrs = parts.content, parts.attrs
        digest = _DIGEST_BY_OID.get(parts.digest_oid)
        if digest is None:
            raise UnverifiableMessage(f"unsupported digest algorithm {parts.digest_oid}")
        signer_cert, signer_der = parts.find_signer()
        if check_signer_key is not None:
            try:
                signer_key = signer_cert.public_key()
            except (ValueError, UnsupportedAlgorithm):
                raise UnverifiableMessage("the signer certificate's key cannot be read") from None
            try:
                check_signer_key(signer_key)
            except ScepdError as err:  # an oversized key must not cost a verification
                refused = err
        if refused is None:
            # messageDigest binds the content to the signed attributes
            expected = _octets(_attr(attrs, OID_MESSAGE_DIGEST, "messageDigest"))
            h = hashes.Hash(DIGESTS[digest][1]())
            h.update(content)
            if not hmac.compare_digest(h.finalize(), expected or b""):
                raise UnverifiableMessage("the SCEP message digest does not match its content")
            _verify_raw(signer_cert, parts.signature_oid, parts.signature, digest, parts.signed_attrs,
                        parts.signature_params)
        message_type_text = _printable_value(_attr(attrs, OID_MESSAGE_TYPE, "messageType"))
        transaction_id = _printable_value(_attr(attrs, OID_TRANSACTION_ID, "transactionID"))
        nonce = _octets(_attr(attrs, OID_SENDER_NONCE, "senderNonce"))
        signing_time = None
        if attrs.get(OID_SIGNING_TIME):
            try:
                signing_time = _signing_time(attrs[OID_SIGNING_TIME][0])
            except (ValueError, TypeError):
                signing_time = None
        envelope = None
        if content:
            der.check_nesting(content[:der.read_tlv(content)[3]])  # BER chunks were not scanned
            envelope = _envelope_of(content)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise MalformedRequest("the SCEP message is not a valid CMS SignedData") from None
    try:
        message_type = int(message_type_text)
    except ValueError:
        raise MalformedRequest("messageType is not a number") from None
    if not transaction_id or len(transaction_id) > 255:
        raise MalformedRequest("transactionID is empty or too long")
    if not isinstance(nonce, bytes) or len(nonce) != 16:
        raise MalformedRequest("senderNonce must be 16 octets")
    msg = PkiMessage(message_type=message_type, transaction_id=transaction_id, sender_nonce=nonce,
                     signer_cert=signer_cert, signer_cert_der=signer_der, digest=digest,
                     signing_time=signing_time, envelope=envelope)
    if refused is not None:
        raise SignerKeyRefused(refused, msg)
    return msg


def _cbc_decrypt(cipher: str, key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    if cipher == "des-cbc":
        algo = TripleDES(key * 3)  # EDE with K1=K2=K3 is single DES
    elif cipher == "des-ede3-cbc":
        algo = TripleDES(key)
    else:
        algo = algorithms.AES(key)
    dec = Cipher(algo, modes.CBC(iv)).decryptor()
    return dec.update(ciphertext) + dec.finalize()


def _open_content(cipher: str, key: rsa.RSAPrivateKey, encrypted_key: bytes, iv: bytes,
                  ciphertext: bytes) -> bytes:
    """Key transport, CBC decryption, unpadding and the plaintext's structure, with no early
    exit: every stage runs whatever happened before, and any failure raises the same
    UnreadableEnvelope (its reason is only logged). Key transport uses implicit rejection, as
    CMS implementations do against Bleichenbacher's attack: when PKCS#1 v1.5 decryption fails
    (or, with OpenSSL 3.2+'s own implicit rejection, yields a key of the wrong length) a random
    key of the right length stands in, and CBC decryption runs with it."""
    _oid, key_len, block = CIPHERS[cipher]
    stand_in = os.urandom(key_len)
    try:
        cek = key.decrypt(encrypted_key, padding.PKCS1v15())
    except ValueError:
        cek = b""
    key_ok = len(cek) == key_len
    padded = _cbc_decrypt(cipher, cek if key_ok else stand_in, iv, ciphertext)
    unpadder = sym_padding.PKCS7(block * 8).unpadder()
    try:
        plaintext, padding_ok = unpadder.update(padded) + unpadder.finalize(), True
    except ValueError:
        plaintext, padding_ok = padded, False
    structure_ok = _one_element(plaintext)
    if key_ok and padding_ok and structure_ok:
        return plaintext
    raise UnreadableEnvelope("key transport failed" if not key_ok else
                             "bad CBC padding" if not padding_ok else
                             "the plaintext is not exactly one well-formed BER element")


def _one_element(data: bytes) -> bool:
    """The plaintext must be one complete element and nothing after it: asn1crypto ignores
    trailing bytes, which would let blocks appended after a valid request act as an oracle."""
    try:
        if der.read_tlv(data)[3] != len(data):
            return False
        der.check_nesting(data)
        return True
    except ValueError:
        return False


def open_envelope(envelope: Envelope, recipients: list[Recipient]) -> bytes:
    """Decrypt the pkcsPKIEnvelope with whichever of our certificates it is addressed to.

    What is decided from cleartext alone keeps its own answer: a structure that does not parse
    or lengths that do not fit the cipher (MalformedRequest), an unsupported cipher or no
    recipient identifier naming one of our certificates (NotForUs). None of it depends on the
    plaintext. From the moment decryption starts, every failure is one UnreadableEnvelope."""
    if envelope.cipher not in CIPHERS:
        raise NotForUs(f"unsupported content encryption algorithm {envelope.cipher[8:]}")
    _oid, _key_len, block = CIPHERS[envelope.cipher]
    fast = _enveloped_fast(envelope.enveloped_der)
    if fast is not None:
        iv, ciphertext, key_trans = fast
        found = _recipient_fast(key_trans, recipients)
        if found is None:
            raise NotForUs("the pkcsPKIEnvelope is not encrypted to this server's certificate")
        ours, encrypted_key = found
    else:
        ours, iv, ciphertext, encrypted_key = _open_tolerant(envelope, recipients)
    if not isinstance(iv, bytes) or len(iv) != block or not ciphertext or len(ciphertext) % block \
            or not isinstance(encrypted_key, bytes):
        raise MalformedRequest("the pkcsPKIEnvelope's IV or ciphertext does not fit its cipher")
    return _open_content(envelope.cipher, ours.key, encrypted_key, iv, ciphertext)


def _open_tolerant(envelope: Envelope, recipients: list[Recipient]):
    """The EnvelopedData read by asn1crypto (BER, odd encodings): (ours, iv, ciphertext, key)."""
    try:
        env = _EnvelopedData.load(envelope.enveloped_der)
        eci = env["encrypted_content_info"]
        iv = eci["content_encryption_algorithm"]["parameters"].native
        raw = eci["encrypted_content"]
        if raw.contents is None:
            raise NotForUs("the envelope has no encrypted content")
        ciphertext = der.string_octets(raw._header + raw.contents + raw._trailer)
        rinfos = [ri.chosen for ri in env["recipient_infos"] if ri.name == "ktri"]
        found = _recipient(rinfos, recipients)
        if found is None:
            raise NotForUs("the pkcsPKIEnvelope is not encrypted to this server's certificate")
        ours, encrypted_key = found[0], found[1]["encrypted_key"].native
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError):  # asn1crypto on odd encodings
        raise MalformedRequest("the pkcsPKIEnvelope is not a valid CMS EnvelopedData") from None
    return ours, iv, ciphertext, encrypted_key


@dataclass(frozen=True)
class _KeyTrans:
    """A KeyTransRecipientInfo as the fast reader saw it: its recipient (issuer Name bytes and
    serial, or a subjectKeyIdentifier) and the encrypted content key."""

    issuer_der: bytes | None
    serial: int | None
    ski: bytes | None
    encrypted_key: bytes


def _enveloped_fast(data: bytes) -> tuple[bytes, bytes, list[_KeyTrans]] | None:
    """(iv, ciphertext, key transport recipient infos) of an EnvelopedData in the common case --
    definite-length DER, only KeyTransRecipientInfos, an IV parameter, encrypted content present
    -- read by walking the bytes (no asn1crypto); None for anything else, which the tolerant
    reader (_open_tolerant) then reads, so every unusual envelope gets exactly its answer."""
    try:
        outer = _elements(data, 0, len(data))
        if len(outer) != 1 or outer[0][0] != 0x30:
            return None
        env = _elements(data, outer[0][2], outer[0][3])
        if [e[0] for e in env] != [0x02, 0x31, 0x30]:
            return None
        key_trans = []
        for ri in _elements(data, env[1][2], env[1][3]):
            if ri[0] != 0x30:
                return None
            fields = _elements(data, ri[2], ri[3])
            if [e[0] for e in fields[:1] + fields[2:]] != [0x02, 0x30, 0x04] or fields[1][0] not in (0x30, 0x80):
                return None
            rid = fields[1]
            issuer = serial = ski = None
            if rid[0] == 0x30:
                ias = _elements(data, rid[2], rid[3])
                if [e[0] for e in ias] != [0x30, 0x02]:
                    return None
                issuer = data[ias[0][1]:ias[0][3]]
                serial = int.from_bytes(data[ias[1][2]:ias[1][3]], "big", signed=True)
            else:
                ski = data[rid[2]:rid[3]]
            key_trans.append(_KeyTrans(issuer, serial, ski, data[fields[3][2]:fields[3][3]]))
        eci = _elements(data, env[2][2], env[2][3])
        if len(eci) != 3 or eci[0][0] != 0x06 or eci[1][0] != 0x30 or eci[2][0] not in (0x80, 0xA0):
            return None
        alg = _elements(data, eci[1][2], eci[1][3])
        if len(alg) != 2 or alg[0][0] != 0x06 or alg[1][0] != 0x04:
            return None
        iv = data[alg[1][2]:alg[1][3]]
        ciphertext = der.string_octets(data[eci[2][1]:eci[2][3]])
    except (_Unusual, ValueError, IndexError):
        return None
    return iv, ciphertext, key_trans


def _recipient_fast(key_trans: list[_KeyTrans], recipients: list[Recipient]) -> tuple[Recipient, bytes] | None:
    """_recipient over the fast reader's recipient infos: the same order, the same matches."""
    for ours in recipients:
        ours_issuer, ours_ski = _recipient_ids(ours.cert)
        for kt in key_trans:
            if kt.ski is None:
                match = kt.serial == ours.cert.serial_number and kt.issuer_der == ours_issuer
            else:
                match = ours_ski is not None and kt.ski == ours_ski
            if match:
                return ours, kt.encrypted_key
    return None


def _recipient(rinfos: list, recipients: list[Recipient]) -> tuple[Recipient, cms.KeyTransRecipientInfo] | None:
    """The first of our certificates that a RecipientInfo names (by issuer+serial or SKI)."""
    for ours in recipients:
        ours_issuer, ours_ski = _recipient_ids(ours.cert)
        for ri in rinfos:
            rid = ri["rid"]
            if rid.name == "issuer_and_serial_number":
                match = rid.chosen["serial_number"].native == ours.cert.serial_number and \
                    rid.chosen["issuer"].dump() == ours_issuer
            else:
                match = ours_ski is not None and rid.chosen.native == ours_ski
            if match:
                return ours, ri
    return None


@functools.lru_cache(maxsize=16)
def _recipient_ids(cert: x509.Certificate) -> tuple[bytes, bytes | None]:
    """(issuer Name DER, subjectKeyIdentifier) of one of our certificates, computed once."""
    return cert.issuer.public_bytes(), _ski(cert)


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def decode_issuer_and_serial(data: bytes) -> IssuerAndSerial:
    """The decrypted content of GetCert/GetCRL: a failure is an UnreadableEnvelope (one answer)."""
    try:
        ias = cms.IssuerAndSerialNumber.load(data, strict=True)
        ias.native  # noqa: B018  (asn1crypto is lazy: parse it all now, so anything malformed fails here)
        return IssuerAndSerial(issuer_der=ias["issuer"].dump(), serial=ias["serial_number"].native)
    except (ValueError, TypeError, KeyError, RecursionError):
        raise UnreadableEnvelope("the content is not an IssuerAndSerialNumber") from None


def decode_issuer_and_subject(data: bytes) -> IssuerAndSubject:
    """The decrypted content of CertPoll: a failure is an UnreadableEnvelope (one answer)."""
    try:
        ias = _IssuerAndSubject.load(data, strict=True)
        ias.native  # noqa: B018  (asn1crypto is lazy: parse it all now, so anything malformed fails here)
        return IssuerAndSubject(issuer_der=ias["issuer"].dump(), subject_der=ias["subject"].dump())
    except (ValueError, TypeError, KeyError, RecursionError):
        raise UnreadableEnvelope("the content is not an IssuerAndSubject") from None


# --- encoding -------------------------------------------------------------------------------


def certs_only(certs_der: list[bytes], crls_der: list[bytes] = ()) -> bytes:
    """A degenerate SignedData: certificates in exactly the given order (clients read them
    positionally; DER SET OF sorting would reorder them), optionally CRLs (GetCRL replies)."""
    parts = [der.integer(1), der.set_of(), der.seq(der.oid(OID_DATA))]
    if certs_der:
        parts.append(der.tlv(0xA0, b"".join(certs_der)))
    if crls_der:
        parts.append(der.tlv(0xA1, b"".join(crls_der)))
    parts.append(der.set_of())
    return der.seq(der.oid(OID_SIGNED_DATA), der.explicit(0, der.seq(*parts)))


def _encrypt_content(cipher: str, plaintext: bytes, random: bytes) -> tuple[bytes, bytes, bytes]:
    """(key, iv, ciphertext); `random` supplies key+iv bytes (injected for determinism in tests)."""
    _oid, key_len, block = CIPHERS[cipher]
    key, iv = random[:key_len], random[key_len:key_len + block]
    if cipher == "des-cbc":
        algo = TripleDES(key * 3)
    elif cipher == "des-ede3-cbc":
        algo = TripleDES(key)
    else:
        algo = algorithms.AES(key)
    padder = sym_padding.PKCS7(block * 8).padder()
    padded = padder.update(plaintext) + padder.finalize()
    enc = Cipher(algo, modes.CBC(iv)).encryptor()
    return key, iv, enc.update(padded) + enc.finalize()


def envelope_to(recipient: x509.Certificate, plaintext: bytes, cipher: str,
                random: bytes | None = None) -> bytes:
    """ContentInfo(EnvelopedData) of `plaintext` for `recipient` (RSA key transport, PKCS#1 v1.5)."""
    key = recipient.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the recipient key is not RSA")
    _oid, key_len, block = CIPHERS[cipher]
    cek, iv, ciphertext = _encrypt_content(cipher, plaintext, random or os.urandom(key_len + block))
    ktri = der.seq(
        der.integer(0),
        der.seq(recipient.issuer.public_bytes(), der.integer(recipient.serial_number)),
        der.algorithm(OID_RSA, der.null()),
        der.octet_string(key.encrypt(cek, padding.PKCS1v15())),
    )
    eci = der.seq(der.oid(OID_DATA), der.algorithm(CIPHERS[cipher][0], der.octet_string(iv)),
                  der.tlv(0x80, ciphertext))
    enveloped = der.seq(der.integer(0), der.set_of(ktri), eci)
    return der.seq(der.oid(OID_ENVELOPED_DATA), der.explicit(0, enveloped))


def _attribute(oid: str, value: bytes) -> bytes:
    return der.seq(der.oid(oid), der.set_of(value))


@dataclass(frozen=True)
class CertRep:
    transaction_id: str
    recipient_nonce: bytes
    sender_nonce: bytes
    status: PkiStatus
    fail_info: int | None = None
    fail_info_text: str | None = None
    #: ContentInfo(EnvelopedData) for SUCCESS replies
    envelope_der: bytes | None = None


def encode_cert_rep(rep: CertRep, signer_cert: x509.Certificate, signer_key, digest: str,
                    signing_time: dt.datetime, extra_certs: tuple[x509.Certificate, ...] = ()) -> bytes:
    """The signed CertRep. Signature is rsaEncryption with `digest` (the client's own digest);
    for PENDING/FAILURE the encapsulated content is an empty OCTET STRING (certmonger refuses
    an absent eContent)."""
    attrs = [
        _attribute(OID_CONTENT_TYPE, der.oid(OID_DATA)),
        _attribute(OID_SIGNING_TIME, der.utc_time(signing_time)),
        _attribute(OID_MESSAGE_TYPE, der.printable(str(int(MessageType.CERT_REP)))),
        _attribute(OID_PKI_STATUS, der.printable(str(int(rep.status)))),
        _attribute(OID_TRANSACTION_ID, der.printable(rep.transaction_id)),
        _attribute(OID_RECIPIENT_NONCE, der.octet_string(rep.recipient_nonce)),
        _attribute(OID_SENDER_NONCE, der.octet_string(rep.sender_nonce)),
    ]
    if rep.status == PkiStatus.FAILURE:
        attrs.append(_attribute(OID_FAIL_INFO, der.printable(str(int(rep.fail_info or 0)))))
        if rep.fail_info_text:
            attrs.append(_attribute(OID_FAIL_INFO_TEXT, der.utf8(rep.fail_info_text[:200])))
    return _signed_data(rep.envelope_der or b"", attrs, signer_cert, signer_key, digest,
                        [signer_cert, *extra_certs])


def _signed_data(content: bytes, attrs: list[bytes], signer_cert: x509.Certificate, signer_key,
                 digest: str, certs: list[x509.Certificate]) -> bytes:
    """ContentInfo(SignedData) over `content` (always present, possibly empty) with one
    SignerInfo. The signed attributes are signed exactly as emitted (DER SET, sorted), with
    rsaEncryption as the signature algorithm (strongSwan accepts nothing else) or ECDSA."""
    digest_oid, hash_cls = DIGESTS[digest]
    h = hashes.Hash(hash_cls())
    h.update(content)
    signed_attrs_set = der.set_of(*attrs, _attribute(OID_MESSAGE_DIGEST, der.octet_string(h.finalize())))
    if isinstance(signer_key, rsa.RSAPrivateKey):
        signature = signer_key.sign(signed_attrs_set, padding.PKCS1v15(), hash_cls())
        sig_alg = der.algorithm(OID_RSA, der.null())
    else:
        signature = signer_key.sign(signed_attrs_set, ec.ECDSA(hash_cls()))
        sig_alg = der.algorithm(_ECDSA_BY_DIGEST.get(digest, "1.2.840.10045.4.3.2"))
    digest_alg = der.algorithm(digest_oid, der.null())
    signer_id, certificates = _signer_constants(signer_cert, tuple(certs))
    signer_info = der.seq(
        der.integer(1),
        signer_id,
        digest_alg,
        der.tlv(0xA0, signed_attrs_set[len(der.length(len(signed_attrs_set))) + 1:]),
        sig_alg,
        der.octet_string(signature),
    )
    signed_data = der.seq(
        der.integer(1),
        der.set_of(digest_alg),
        der.seq(der.oid(OID_DATA), der.explicit(0, der.octet_string(content))),
        certificates,
        der.set_of(signer_info),
    )
    return der.seq(der.oid(OID_SIGNED_DATA), der.explicit(0, signed_data))


@functools.lru_cache(maxsize=16)
def _signer_constants(signer_cert: x509.Certificate, certs: tuple[x509.Certificate, ...]) -> tuple[bytes, bytes]:
    """The signer's IssuerAndSerialNumber and the [0] certificates of a SignedData: the same for
    every reply of one signer, so encoded once."""
    return (der.seq(signer_cert.issuer.public_bytes(), der.integer(signer_cert.serial_number)),
            der.tlv(0xA0, b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)))


_ECDSA_BY_DIGEST = {"sha1": "1.2.840.10045.4.1", "sha256": "1.2.840.10045.4.3.2",
                    "sha384": "1.2.840.10045.4.3.3", "sha512": "1.2.840.10045.4.3.4"}


# --- client side (used by tests, the agent and benchmarks) -----------------------------------


def encode_pki_message(*, message_type: int, transaction_id: str, sender_nonce: bytes,
                       message_data: bytes, recipient: x509.Certificate, cipher: str,
                       signer_cert: x509.Certificate, signer_key, digest: str,
                       signing_time: dt.datetime | None = None) -> bytes:
    """A client PKIMessage (PKCSReq, RenewalReq, CertPoll, GetCert, GetCRL)."""
    envelope = envelope_to(recipient, message_data, cipher)
    attrs = [
        _attribute(OID_CONTENT_TYPE, der.oid(OID_DATA)),
        _attribute(OID_MESSAGE_TYPE, der.printable(str(int(message_type)))),
        _attribute(OID_TRANSACTION_ID, der.printable(transaction_id)),
        _attribute(OID_SENDER_NONCE, der.octet_string(sender_nonce)),
    ]
    if signing_time is not None:
        attrs.append(_attribute(OID_SIGNING_TIME, der.utc_time(signing_time)))
    return _signed_data(envelope, attrs, signer_cert, signer_key, digest, [signer_cert])


@dataclass(frozen=True)
class DecodedCertRep:
    status: PkiStatus
    transaction_id: str
    sender_nonce: bytes
    recipient_nonce: bytes
    fail_info: int | None
    fail_info_text: str | None
    signer_cert: x509.Certificate
    envelope: Envelope | None
    digest: str


def decode_cert_rep(rep_der: bytes) -> DecodedCertRep:
    """Client-side decoding of a CertRep (signature verified against the embedded signer)."""
    msg = decode_pki_message(rep_der)
    ci = cms.ContentInfo.load(rep_der)
    attrs = {a["type"].dotted: list(a["values"]) for a in ci["content"]["signer_infos"][0]["signed_attrs"]}
    status = PkiStatus(int(_printable(core.PrintableString.load(attrs[OID_PKI_STATUS][0].dump()))))
    fail_info = None
    if OID_FAIL_INFO in attrs:
        fail_info = int(_printable(core.PrintableString.load(attrs[OID_FAIL_INFO][0].dump())))
    text = None
    if OID_FAIL_INFO_TEXT in attrs:
        text = core.UTF8String.load(attrs[OID_FAIL_INFO_TEXT][0].dump()).native
    rnonce = core.OctetString.load(attrs[OID_RECIPIENT_NONCE][0].dump()).native
    return DecodedCertRep(status=status, transaction_id=msg.transaction_id, sender_nonce=msg.sender_nonce,
                          recipient_nonce=rnonce, fail_info=fail_info, fail_info_text=text,
                          signer_cert=msg.signer_cert, envelope=msg.envelope, digest=msg.digest)


def certs_from_certs_only(p7_der: bytes) -> list[x509.Certificate]:
    """Certificates of a degenerate SignedData, in wire order."""
    ci = cms.ContentInfo.load(p7_der)
    certs = ci["content"]["certificates"]
    return [x509.load_der_x509_certificate(c.chosen.dump()) for c in certs]


def encode_next_ca_certs(next_certs: list[x509.Certificate], signer_cert: x509.Certificate, signer_key,
                         signing_time: dt.datetime, digest: str = "sha256",
                         extra_certs: tuple[x509.Certificate, ...] = ()) -> bytes:
    """GetNextCACert reply (RFC 8894 §4.7.1): a SignedData signed by the current CA (or RA) key
    whose encapsulated content (eContentType id-data, as sscep and OpenSSL read it) is a degenerate
    certificates-only SignedData holding the new CA certificates. The outer certificates carry
    the signer and its chain (`extra_certs`, as in a CertRep) so a client can verify the
    signature against the root it already trusts."""
    inner = certs_only([c.public_bytes(serialization.Encoding.DER) for c in next_certs])
    attrs = [_attribute(OID_CONTENT_TYPE, der.oid(OID_DATA)),
             _attribute(OID_SIGNING_TIME, der.utc_time(signing_time))]
    return _signed_data(inner, attrs, signer_cert, signer_key, digest, [signer_cert, *extra_certs])


@dataclass(frozen=True)
class DecodedNextCa:
    """A GetNextCACert reply whose signature verified against `signer_cert` (which the caller
    must still verify, with `certs` as the untrusted pool, before trusting `next_certs`)."""

    signer_cert: x509.Certificate
    certs: list[x509.Certificate]  # the outer SignedData's certificates (signer and its chain)
    next_certs: list[x509.Certificate]  # the encapsulated certificates-only SignedData


def decode_next_ca_certs(reply_der: bytes) -> DecodedNextCa:
    """Client side of GetNextCACert (RFC 8894 §4.7.1): verify the outer signature (messageDigest
    over the content, then the signed attributes), then read the inner certificates-only
    SignedData. Raises UnverifiableMessage or MalformedRequest."""
    try:
        ci = cms.ContentInfo.load(reply_der)
        if ci["content_type"].dotted != OID_SIGNED_DATA:
            raise MalformedRequest("the GetNextCACert reply is not a CMS SignedData")
        sd = ci["content"]
        signer_infos = list(sd["signer_infos"])
        if len(signer_infos) != 1:
            raise MalformedRequest("the GetNextCACert reply must have exactly one signer")
        si = signer_infos[0]
        encap = sd["encap_content_info"]
        if encap["content_type"].dotted != OID_DATA or encap["content"].native is None:
            raise MalformedRequest("the GetNextCACert reply does not encapsulate the new certificates")
        content = encap["content"].native
        if si["signed_attrs"].native is None:
            raise MalformedRequest("the GetNextCACert reply has no signed attributes")
        attrs: dict[str, list] = {}
        for a in si["signed_attrs"]:
            attrs.setdefault(a["type"].dotted, list(a["values"]))
        digest = _DIGEST_BY_OID.get(si["digest_algorithm"]["algorithm"].dotted)
        if digest is None:
            raise UnverifiableMessage("unsupported digest algorithm in the GetNextCACert reply")
        signer_cert, _ = _find_signer(sd, si)
        md = core.OctetString.load(_attr(attrs, OID_MESSAGE_DIGEST, "messageDigest").dump()).native
        h = hashes.Hash(DIGESTS[digest][1]())
        h.update(content)
        if not hmac.compare_digest(h.finalize(), md or b""):
            raise UnverifiableMessage("the GetNextCACert digest does not match its content")
        _verify_signature(signer_cert, si, digest, _signed_attrs_to_verify(si))
        outer = [x509.load_der_x509_certificate(c.chosen.dump()) for c in sd["certificates"]
                 if c.name == "certificate"] if sd["certificates"].native is not None else []
        next_certs = certs_from_certs_only(content)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise MalformedRequest("the GetNextCACert reply is not a valid CMS SignedData") from None
    if not next_certs:
        raise MalformedRequest("the GetNextCACert reply carries no certificate")
    return DecodedNextCa(signer_cert=signer_cert, certs=outer, next_certs=next_certs)
