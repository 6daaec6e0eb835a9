"""Issuance policy: turns requested facts into an approved IssuanceRequest, or refuses.

An ordered pipeline (validate key -> validate names -> validate subject -> build): nothing is
copied from a CSR wholesale. The subject DN is issued as requested (SCEP; `[policy] subject`,
attribute types from `[policy] subject_attributes`) or reduced to its CN (ACME, `cn-only`);
allowed SAN types survive; the profile decides KU/EKU and lifetime.
"""
from __future__ import annotations

import datetime as dt
import fnmatch
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from .csr import CsrFacts, SubjectAltName, is_ip
from ..config import Config, ConfigError
from ..errors import BadPublicKey, PolicyViolation


@dataclass(frozen=True)
class Profile:
    name: str
    extended_key_usages: tuple[ObjectIdentifier, ...]
    validity: dt.timedelta = dt.timedelta(days=90)
    #: id-pkix-ocsp-nocheck (RFC 6960 §4.2.2.2.1): for delegated OCSP responder certificates
    ocsp_no_check: bool = False


PROFILES: dict[str, Profile] = {
    "agent": Profile("agent", (ExtendedKeyUsageOID.CLIENT_AUTH,)),
    "server": Profile("server", (ExtendedKeyUsageOID.SERVER_AUTH,)),
    "device": Profile("device", (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)),
    # admin API client certificates (`scepd admin issue-cert`); the inventory's profile tells
    # an admin certificate from an agent's
    "admin": Profile("admin", (ExtendedKeyUsageOID.CLIENT_AUTH,)),
    # delegated OCSP responder (`[ca] ocsp_delegated`), renewed by the server
    "ocsp": Profile("ocsp", (ExtendedKeyUsageOID.OCSP_SIGNING,), ocsp_no_check=True),
}


@dataclass(frozen=True)
class IssuanceRequest:
    """What the CA signs. Built only by policy."""

    public_key: object
    common_name: str | None
    sans: tuple[SubjectAltName, ...]
    profile: Profile
    not_before: dt.datetime
    not_after: dt.datetime
    #: the subject DN to issue, exactly (policy built or checked it); None: CN-only from common_name
    subject: x509.Name | None = None


#: Subject attribute types by the names `[policy] subject_attributes` accepts (case-insensitive;
#: a dotted OID is accepted too). RFC 5280 §4.1.2.4 / RFC 4519 / X.520 names, PKCS#9 ones, DC, UID.
SUBJECT_ATTRIBUTE_TYPES: dict[str, ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME, "C": NameOID.COUNTRY_NAME, "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME, "street": NameOID.STREET_ADDRESS,
    "serialNumber": NameOID.SERIAL_NUMBER, "title": NameOID.TITLE, "surname": NameOID.SURNAME,
    "givenName": NameOID.GIVEN_NAME, "initials": NameOID.INITIALS,
    "generationQualifier": NameOID.GENERATION_QUALIFIER, "dnQualifier": NameOID.DN_QUALIFIER,
    "pseudonym": NameOID.PSEUDONYM, "postalCode": NameOID.POSTAL_CODE,
    "postalAddress": NameOID.POSTAL_ADDRESS, "businessCategory": NameOID.BUSINESS_CATEGORY,
    "name": ObjectIdentifier("2.5.4.41"), "description": ObjectIdentifier("2.5.4.13"),
    "postOfficeBox": ObjectIdentifier("2.5.4.18"),
    "physicalDeliveryOfficeName": ObjectIdentifier("2.5.4.19"),
    "telephoneNumber": ObjectIdentifier("2.5.4.20"), "houseIdentifier": ObjectIdentifier("2.5.4.51"),
    "organizationIdentifier": NameOID.ORGANIZATION_IDENTIFIER,
    "emailAddress": NameOID.EMAIL_ADDRESS, "unstructuredName": NameOID.UNSTRUCTURED_NAME,
    "unstructuredAddress": ObjectIdentifier("1.2.840.113549.1.9.8"),
    "DC": NameOID.DOMAIN_COMPONENT, "UID": NameOID.USER_ID,
}
_ATTRIBUTE_NAME = {oid: name for name, oid in SUBJECT_ATTRIBUTE_TYPES.items()}
SUBJECT_MODES = ("keep", "cn-only")


@dataclass(frozen=True)
class SubjectPolicy:
    """`keep`: issue the requested subject DN exactly (RDN order, multi-valued RDNs, string
    types), refusing attribute types outside `allowed`; `cn-only`: issue CN=<the CSR's CN>."""

    mode: str = "keep"
    allowed: frozenset[ObjectIdentifier] = frozenset(SUBJECT_ATTRIBUTE_TYPES.values())

    @classmethod
    def from_config(cls, mode: str, attributes: str) -> "SubjectPolicy":
        """`attributes`: comma-separated names of SUBJECT_ATTRIBUTE_TYPES or dotted OIDs; empty =
        the default set. Raises ValueError naming what is wrong."""
        if mode not in SUBJECT_MODES:
            raise ValueError(f"[policy] subject must be one of {', '.join(SUBJECT_MODES)}, not {mode!r}")
        if not attributes.strip():
            return cls(mode)
        by_lower = {name.lower(): oid for name, oid in SUBJECT_ATTRIBUTE_TYPES.items()}
        allowed = set()
        for item in (part.strip() for part in attributes.split(",")):
            if not item:
                continue
            if item.lower() in by_lower:
                allowed.add(by_lower[item.lower()])
            elif re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", item):
                allowed.add(ObjectIdentifier(item))
            else:
                raise ValueError(f"[policy] subject_attributes: unknown attribute type {item!r} "
                                 "(use a name such as CN, O, OU, or a dotted OID)")
        return cls(mode, frozenset(allowed))


def attribute_type_name(oid: ObjectIdentifier) -> str:
    name = _ATTRIBUTE_NAME.get(oid)
    return f"{name} ({oid.dotted_string})" if name else oid.dotted_string


def check_subject(facts: CsrFacts, subject_policy: SubjectPolicy) -> x509.Name:
    """The subject to issue under `subject_policy` (names were checked by check_names)."""
    if subject_policy.mode == "cn-only" or facts.subject is None:
        return _cn_only(facts.common_name)
    for attr in facts.subject:
        if attr.oid not in subject_policy.allowed:
            raise PolicyViolation(f"subject attribute type {attribute_type_name(attr.oid)} is not "
                                  "allowed by this server's policy")
        if attr.oid == NameOID.COMMON_NAME:
            _check_cn(attr.value if isinstance(attr.value, str) else "")
    return facts.subject


def _cn_only(common_name: str | None) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])


ALLOWED_SAN_KINDS = frozenset({"dns", "ip", "email", "uri"})
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
MAX_CN = 64


#: RSA moduli of at least this many bits; the upper bound is KeyLimits.max_rsa_bits
MIN_RSA_BITS = 2048
#: the largest `[policy] max_rsa_bits` may be
MAX_RSA_BITS_CEILING = 8192
#: the RSA public exponent: odd and 3 < e < 2^32 (a huge exponent makes every verification slow)
MAX_RSA_EXPONENT = 2 ** 32
EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


@dataclass(frozen=True)
class KeyLimits:
    """The public keys this server accepts, from `[policy]`: in CSRs, in SCEP signer
    certificates and as ACME (JWS) keys."""

    max_rsa_bits: int = 4096

    def __post_init__(self) -> None:
        if not MIN_RSA_BITS <= self.max_rsa_bits <= MAX_RSA_BITS_CEILING:
            raise ValueError(f"max_rsa_bits must lie between {MIN_RSA_BITS} and {MAX_RSA_BITS_CEILING}")


def check_key(public_key: object, limits: KeyLimits = KeyLimits(), *, allow_ed25519: bool = False) -> None:
    """The one key rule: RSA of MIN_RSA_BITS..limits.max_rsa_bits bits with an odd exponent
    3 < e < 2^32, EC P-256/P-384/P-521, and Ed25519 where `allow_ed25519` (JWS). Only sizes and
    numbers are read, so it is cheap even for an absurd key: call it before any signature work."""
    if isinstance(public_key, rsa.RSAPublicKey):
        bits, e = public_key.key_size, public_key.public_numbers().e
        if not MIN_RSA_BITS <= bits <= limits.max_rsa_bits:
            raise BadPublicKey(f"RSA key of {bits} bits refused: {MIN_RSA_BITS} to "
                               f"{limits.max_rsa_bits} bits are accepted")
        if e % 2 == 0 or not 3 < e < MAX_RSA_EXPONENT:
            raise BadPublicKey("RSA public exponent refused: it must be odd, above 3 and below 2^32")
        return
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, EC_CURVES):
            return
        raise BadPublicKey(f"EC curve {public_key.curve.name[:40]} refused: use P-256, P-384 or P-521")
    if allow_ed25519 and isinstance(public_key, ed25519.Ed25519PublicKey):
        return
    raise BadPublicKey("key type refused: use RSA or EC P-256/P-384/P-521"
                       + (" or Ed25519" if allow_ed25519 else ""))


def valid_dns_name(name: str, allow_wildcard: bool = False) -> bool:
    if allow_wildcard and name.startswith("*."):
        name = name[2:]
    if not name or len(name) > 253 or name.endswith("."):
        return False
    return all(_DNS_LABEL.match(label) for label in name.split("."))


def check_names(common_name: str | None, sans: tuple[SubjectAltName, ...], allow_wildcard: bool = False) -> None:
    """`allow_wildcard`: "*.name" DNS names pass (ACME orders whose wildcard was proven by dns-01)."""
    if not common_name and not sans:
        raise PolicyViolation("the request names no subject: a CN or a subjectAltName is required")
    if common_name is not None:
        _check_cn(common_name)
    for san in sans:
        if san.kind not in ALLOWED_SAN_KINDS:
            raise PolicyViolation(f"subjectAltName type {san.value} is not allowed")
        if san.kind == "dns" and not valid_dns_name(san.value, allow_wildcard):
            raise PolicyViolation(f"invalid DNS name {san.value!r}")
        if san.kind == "ip" and not is_ip(san.value):
            raise PolicyViolation(f"invalid IP address {san.value!r}")


def _check_cn(common_name: str) -> None:
    if len(common_name) > MAX_CN:
        raise PolicyViolation(f"CN longer than {MAX_CN} characters")
    if any(ord(ch) < 0x20 for ch in common_name):
        raise PolicyViolation("CN contains control characters")


def approve(facts: CsrFacts, profile: Profile, now: dt.datetime,
            validity: dt.timedelta | None = None, ca_not_after: dt.datetime | None = None,
            window: tuple[dt.datetime | None, dt.datetime | None] | None = None,
            allow_wildcard: bool = False, key_limits: KeyLimits = KeyLimits(),
            subject_policy: SubjectPolicy | None = None) -> IssuanceRequest:
    """`window`: a requested (notBefore, notAfter), e.g. from an ACME order, checked with
    `check_window`; either end may be None (the default then applies). `allow_wildcard`: see
    check_names. `subject_policy`: issue the requested subject under it (SCEP); None: CN-only
    (ACME, where names come from identifiers, and the server's own certificates)."""
    check_key(facts.public_key, key_limits)
    check_names(facts.common_name, facts.sans, allow_wildcard)
    subject = check_subject(facts, subject_policy) if subject_policy else _cn_only(facts.common_name)
    start = now.replace(microsecond=0) - dt.timedelta(minutes=5)  # tolerate clients' clock skew
    end = now.replace(microsecond=0) + (validity or profile.validity)
    if window is not None:
        check_window(window, now, validity or profile.validity, ca_not_after)
        if window[0] is not None:
            start = window[0].replace(microsecond=0)
            end = start + (validity or profile.validity) if window[1] is None else end
        if window[1] is not None:
            end = window[1].replace(microsecond=0)
    if ca_not_after is not None and end > ca_not_after:
        end = ca_not_after
    return IssuanceRequest(public_key=facts.public_key, common_name=facts.common_name,
                           sans=facts.sans, profile=profile, not_before=start, not_after=end,
                           subject=subject)


#: how far ahead a requested notBefore may lie
MAX_FUTURE_START = dt.timedelta(days=7)


def check_window(window: tuple[dt.datetime | None, dt.datetime | None], now: dt.datetime,
                 max_validity: dt.timedelta, ca_not_after: dt.datetime | None) -> None:
    """A requested validity: not starting in the past (beyond clock skew) or too far ahead,
    ending after it starts and in the future, no longer than the profile allows, inside the CA's."""
    nb, na = window
    start = nb or now
    if nb is not None and (nb < now - dt.timedelta(minutes=5) or nb > now + MAX_FUTURE_START):
        raise PolicyViolation("notBefore must lie between now and 7 days from now")
    if na is not None:
        if na <= start or na <= now:
            raise PolicyViolation("notAfter must be later than notBefore and than now")
        if na - start > max_validity:
            raise PolicyViolation(f"the requested validity exceeds the maximum of {max_validity}")
        if ca_not_after is not None and na > ca_not_after:
            raise PolicyViolation("notAfter is later than the issuing CA's own notAfter")


#: the profiles a request may be given (a challenge's --profile, a renewal keeping its own);
#: `admin` and `ocsp` certificates are made by the server itself only
ENROLLMENT_PROFILES = ("agent", "server", "device")


def enrollment_profile(name: str) -> Profile:
    """The profile `name`, if a challenge may grant it (PolicyViolation otherwise)."""
    if name not in ENROLLMENT_PROFILES:
        raise PolicyViolation(f"profile {name!r} cannot be granted to a request; use one of "
                              + ", ".join(ENROLLMENT_PROFILES))
    return profile_named(name)


def profile_named(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise PolicyViolation(f"unknown profile {name!r}") from None


def subject_policy(cfg: Config) -> SubjectPolicy:
    """The `[policy] subject` keys as a SubjectPolicy; ConfigError naming what is wrong."""
    try:
        return SubjectPolicy.from_config(cfg.policy.subject, cfg.policy.subject_attributes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
