"""The CA: signs approved IssuanceRequests. Knows nothing of SCEP, ACME or CSRs."""
from __future__ import annotations

import ipaddress
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from .pki import CaMaterial
from .policy import IssuanceRequest


def random_serial() -> int:
    """A positive 127-bit random serial (RFC 5280: at most 20 octets; CA/B: >= 64 bits of entropy)."""
    return secrets.randbits(127) | (1 << 126)  # fixed top bit: always 16 octets, never 0


def _general_name(kind: str, value: str) -> x509.GeneralName:
    if kind == "dns":
        return x509.DNSName(value)
    if kind == "ip":
        return x509.IPAddress(ipaddress.ip_address(value))
    if kind == "email":
        return x509.RFC822Name(value)
    if kind == "uri":
        return x509.UniformResourceIdentifier(value)
    raise ValueError(kind)


_END_ENTITY = x509.BasicConstraints(ca=False, path_length=None)


class CertificateAuthority:
    def __init__(self, material: CaMaterial, base_url: str):
        self.material = material
        self.base_url = base_url.rstrip("/")
        #: what is the same in every certificate of one CA material (built once, see _per_ca)
        self._constants: tuple[tuple[CaMaterial, str], str, x509.Name, list] | None = None

    def _per_ca(self) -> tuple[str, x509.Name, list]:
        """(ca_id, issuer name, the extensions every certificate carries), computed once per
        CA material (a rollover swaps `material`) and base URL."""
        material = self.material
        if self._constants is None or self._constants[0][0] is not material \
                or self._constants[0][1] != self.base_url:
            ca, ca_id = material.cert, material.ca_id
            extensions = [
                (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), False),  # type: ignore[arg-type]
                (x509.CRLDistributionPoints([x509.DistributionPoint(
                    full_name=[x509.UniformResourceIdentifier(self._crl_url(ca_id))], relative_name=None,
                    reasons=None, crl_issuer=None)]), False),
                (x509.AuthorityInformationAccess([
                    x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                           x509.UniformResourceIdentifier(self.ocsp_url)),
                    x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS,
                                           x509.UniformResourceIdentifier(self._ca_issuers_url(ca_id))),
                ]), False),
            ]
            self._constants = ((material, self.base_url), ca_id, ca.subject, extensions)
        return self._constants[1:]

    @property
    def ca_id(self) -> str:
        return self._per_ca()[0]

    @property
    def crl_url(self) -> str:
        return self._crl_url(self.ca_id)

    def _crl_url(self, ca_id: str) -> str:
        return f"{self.base_url}/crl/{ca_id}.crl"

    @property
    def ocsp_url(self) -> str:
        return f"{self.base_url}/ocsp"

    @property
    def ca_issuers_url(self) -> str:
        return self._ca_issuers_url(self.ca_id)

    def _ca_issuers_url(self, ca_id: str) -> str:
        return f"{self.base_url}/ca/{ca_id}.crt"

    def issue(self, req: IssuanceRequest, serial: int) -> x509.Certificate:
        _ca_id, issuer, constant = self._per_ca()
        # the subject policy approved, as it is: pyca re-encodes a parsed Name byte for byte
        # (RDN order, multi-valued RDNs, string types)
        subject = req.subject if req.subject is not None else x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, req.common_name)] if req.common_name else [])
        is_rsa = isinstance(req.public_key, rsa.RSAPublicKey)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(req.public_key)  # type: ignore[arg-type]
            .serial_number(serial)
            .not_valid_before(req.not_before)
            .not_valid_after(req.not_after)
            .add_extension(_END_ENTITY, critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=is_rsa, data_encipherment=False,
                                         key_agreement=isinstance(req.public_key, ec.EllipticCurvePublicKey),
                                         key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(req.profile.extended_key_usages)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(req.public_key), critical=False)  # type: ignore[arg-type]
        )
        for extension, critical in constant:
            builder = builder.add_extension(extension, critical=critical)
        if req.sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(s.kind, s.value) for s in req.sans]),
                critical=len(subject) == 0)  # RFC 5280 §4.2.1.6: critical when subject is empty
        if req.profile.ocsp_no_check:
            builder = builder.add_extension(x509.OCSPNoCheck(), critical=False)
        return builder.sign(self.material.key, hashes.SHA256())
