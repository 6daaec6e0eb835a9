"""SCEP (RFC 8894) as the agent speaks it, over the codec scepd.scep.wire (never the server).

Enrollment: PKCSReq with the challenge password, signed by a throwaway self-signed certificate.
Renewal: RenewalReq signed by the current certificate and key (a PKCSReq signed by it when the
server does not advertise `Renewal`), always for a new key, no challenge.
Trust: every certificate taken from GetCACert / GetNextCACert is verified to the pinned anchor
(protocol.verified_path: signatures, validity now, basicConstraints, keyUsage, path length).
Requests are encrypted to a verified CA that allows keyEncipherment, or to a verified RA when no
CA can decrypt. Every reply is verified: signed by such a CA or RA with digitalSignature, our
transactionID and nonce, and a certificate for our key issued under the anchor.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from scepd.errors import ScepdError
from scepd.scep import wire

from .protocol import (AgentError, Identity, Issued, TrustError, Usage, issued_path, key_usage_allows,
                       trusted_as, verified_path)
from .schedule import RenewalWindow

log = logging.getLogger("scepd.agent.scep")

TIMEOUT = aiohttp.ClientTimeout(total=60)
MAX_POLLS = 10


def parse_san(text: str) -> x509.GeneralName:
    kind, sep, value = text.partition(":")
    if not sep or not value:
        raise ValueError(f"--san expects DNS:name or IP:address, got {text!r}")
    kind = kind.upper()
    if kind == "DNS":
        return x509.DNSName(value)
    if kind == "IP":
        import ipaddress
        return x509.IPAddress(ipaddress.ip_address(value))
    if kind == "EMAIL":
        return x509.RFC822Name(value)
    if kind == "URI":
        return x509.UniformResourceIdentifier(value)
    raise ValueError(f"--san kind {kind} is not supported: use DNS, IP, EMAIL or URI")


def identity_of(cert: x509.Certificate) -> Identity:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    sans: list[str] = []
    try:
        for gn in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value:
            if isinstance(gn, x509.DNSName):
                sans.append(f"DNS:{gn.value}")
            elif isinstance(gn, x509.IPAddress):
                sans.append(f"IP:{gn.value}")
            elif isinstance(gn, x509.RFC822Name):
                sans.append(f"EMAIL:{gn.value}")
            elif isinstance(gn, x509.UniformResourceIdentifier):
                sans.append(f"URI:{gn.value}")
    except x509.ExtensionNotFound:
        pass
    return Identity(str(cns[0].value) if cns else "", tuple(sans))


def build_csr(key, identity: Identity, challenge: str | None) -> bytes:
    from cryptography.hazmat.primitives import serialization
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.common_name)]))
    if identity.sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([parse_san(s) for s in identity.sans]), critical=False)
    if challenge is not None:
        builder = builder.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def self_signed(key, common_name: str, now: dt.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or "scepd-agent")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))


def new_key() -> rsa.RSAPrivateKey:
    """RSA: a SCEP reply is encrypted to the signer certificate's key (RSA key transport)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class ScepClient:
    """One SCEP server, trusted through `anchor` (the pinned root)."""

    def __init__(self, url: str, anchor: x509.Certificate, *, ssl_context: ssl.SSLContext | None = None,
                 now=lambda: dt.datetime.now(dt.timezone.utc)):
        self.url = url
        self.anchor = anchor
        self.ssl_context = ssl_context
        self.now = now
        self.last_ca_certs: list[x509.Certificate] = []
        #: what each certificate of the last GetCACert was verified as
        self.roles: dict[x509.Certificate, Usage] = {}

    # --- transport --------------------------------------------------------------------------

    async def _get(self, operation: str) -> tuple[int, bytes, str]:
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                async with session.get(self.url, params={"operation": operation}, ssl=self.ssl_context) as resp:
                    return resp.status, await resp.read(), resp.headers.get("Content-Type", "")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise AgentError(f"SCEP {operation} to {self.url} failed: {exc or 'timeout'}") from None

    async def _post(self, message: bytes) -> bytes:
        try:
            return await self._post_once(message)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise AgentError(f"SCEP PKIOperation to {self.url} failed: {exc or 'timeout'}") from None

    async def _post_once(self, message: bytes) -> bytes:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.post(self.url, params={"operation": "PKIOperation"}, data=message,
                                    headers={"Content-Type": "application/x-pki-message"},
                                    ssl=self.ssl_context) as resp:
                body = await resp.read()
                if resp.status != 200:
                    text = body[:200].decode("utf-8", "replace").strip()
                    raise AgentError(f"SCEP server answered HTTP {resp.status}: {text}")
                return body

    # --- CA certificates --------------------------------------------------------------------

    async def capabilities(self) -> set[str]:
        status, body, _ = await self._get("GetCACaps")
        if status != 200:
            return set()
        return {line.strip() for line in body.decode("ascii", "replace").splitlines() if line.strip()}

    async def fetch_ca_certs(self) -> list[x509.Certificate]:
        """GetCACert, unverified (enrollment pins from it)."""
        status, body, _ = await self._get("GetCACert")
        if status != 200:
            raise AgentError(f"GetCACert answered HTTP {status}")
        try:
            return wire.certs_from_certs_only(body)
        except Exception:
            try:
                return [x509.load_der_x509_certificate(body)]
            except ValueError:
                raise AgentError("GetCACert reply is neither a certificate nor a PKCS#7 bundle") from None

    async def ca_certs(self) -> list[x509.Certificate]:
        """GetCACert, keeping only the certificates verified as a CA or an RA under the anchor
        (in served order)."""
        certs = await self.fetch_ca_certs()
        now = self.now()
        roles = {c: usage for c in certs if (usage := trusted_as(c, self.anchor, certs, now)) is not None}
        good = [c for c in certs if c in roles]
        if not good:
            raise TrustError("none of the certificates served by GetCACert is a CA or RA under the pinned CA")
        for c in certs:
            if c not in roles:
                log.warning("GetCACert served %s, which does not verify as a CA or RA under the pinned "
                            "root: ignored", c.subject.rfc4514_string())
        self.last_ca_certs, self.roles = good, roles
        return good

    def recipient(self, ca_certs: list[x509.Certificate]) -> x509.Certificate:
        """The certificate to encrypt to: RSA, keyEncipherment allowed; a CA before an RA (any
        end-entity certificate the CA issued with keyEncipherment verifies as an RA too, so an RA
        is used only when no CA can decrypt)."""
        usable = [c for c in ca_certs
                  if isinstance(c.public_key(), rsa.RSAPublicKey) and key_usage_allows(c, "key_encipherment")]
        usable.sort(key=lambda c: self.roles.get(c) is not Usage.CA)  # stable: served order within a kind
        if not usable:
            raise AgentError("no CA or RA certificate served by GetCACert can be encrypted to "
                             "(RSA with keyEncipherment)")
        return usable[0]

    async def next_ca(self) -> list[x509.Certificate]:
        """RFC 8894 §4.7.1: the reply is signed by the current CA (or RA), which must verify under
        the anchor; the new CA certificates it encapsulates must verify as CAs under the anchor."""
        status, body, _ = await self._get("GetNextCACert")
        if status != 200:
            return []
        try:
            reply = wire.decode_next_ca_certs(body)
        except ScepdError:
            raise AgentError("GetNextCACert reply cannot be decoded or its signature does not verify") from None
        now = self.now()
        signer = reply.signer_cert
        if trusted_as(signer, self.anchor, reply.certs, now) is None \
                or not key_usage_allows(signer, "digital_signature"):
            raise TrustError("GetNextCACert is not signed by a CA or RA under the pinned root")
        pool = reply.certs + reply.next_certs
        announced = []
        for cert in reply.next_certs:
            if cert == self.anchor:
                continue
            # checked at its start when that lies ahead: a successor may be issued in advance
            at = max(now, cert.not_valid_before_utc)
            try:
                verified_path(cert, self.anchor, pool, at, Usage.CA)
            except TrustError:
                if trusted_as(cert, self.anchor, pool, at) is not Usage.RA:
                    raise TrustError("GetNextCACert announced a CA that does not verify under the pinned "
                                     f"root: {cert.subject.rfc4514_string()}") from None
                continue  # a new RA certificate: nothing for the agent to follow
            announced.append(cert)
        return announced

    async def renewal_window(self, cert: x509.Certificate) -> RenewalWindow | None:
        return None  # SCEP has no renewal information

    # --- enrollment -------------------------------------------------------------------------

    async def enroll(self, key, identity: Identity, secret: str) -> Issued:
        ca_certs = await self.ca_certs()
        csr = build_csr(key, identity, secret)
        signer = self_signed(key, identity.common_name, self.now())
        return await self._request(wire.MessageType.PKCS_REQ, csr, signer, key, key, ca_certs)

    async def renew(self, new_key, current_cert: x509.Certificate, current_key) -> Issued:
        ca_certs = await self.ca_certs()
        caps = await self.capabilities()
        message_type = wire.MessageType.RENEWAL_REQ if "Renewal" in caps else wire.MessageType.PKCS_REQ
        csr = build_csr(new_key, identity_of(current_cert), None)
        return await self._request(message_type, csr, current_cert, current_key, new_key, ca_certs)

    async def _request(self, message_type: int, csr_der: bytes, signer_cert: x509.Certificate, signer_key,
                       new_key, ca_certs: list[x509.Certificate]) -> Issued:
        recipient = self.recipient(ca_certs)
        transaction_id = os.urandom(16).hex().upper()
        nonce = os.urandom(16)
        message = await asyncio.to_thread(
            wire.encode_pki_message, message_type=int(message_type), transaction_id=transaction_id,
            sender_nonce=nonce, message_data=csr_der, recipient=recipient, cipher="aes-256-cbc",
            signer_cert=signer_cert, signer_key=signer_key, digest="sha256", signing_time=self.now())
        reply = self._check_reply(await self._post(message), transaction_id, nonce, ca_certs)
        polls = 0
        while reply.status == wire.PkiStatus.PENDING:
            polls += 1
            if polls > MAX_POLLS:
                raise AgentError("the request is still pending approval; it will be retried")
            await asyncio.sleep(min(2 ** polls, 30))
            # resending the same transaction is how a client polls (the server answers from it)
            nonce = os.urandom(16)
            message = await asyncio.to_thread(
                wire.encode_pki_message, message_type=int(message_type), transaction_id=transaction_id,
                sender_nonce=nonce, message_data=csr_der, recipient=recipient, cipher="aes-256-cbc",
                signer_cert=signer_cert, signer_key=signer_key, digest="sha256", signing_time=self.now())
            reply = self._check_reply(await self._post(message), transaction_id, nonce, ca_certs)
        if reply.status != wire.PkiStatus.SUCCESS:
            text = reply.fail_info_text or "no reason given"
            raise AgentError(f"the server refused the request (failInfo {reply.fail_info}): {text}")
        inner = await asyncio.to_thread(wire.open_envelope, reply.envelope,
                                        [wire.Recipient(signer_cert, signer_key)])
        issued = [c for c in wire.certs_from_certs_only(inner) if c.public_key() == new_key.public_key()]
        if not issued:
            raise AgentError("the reply carries no certificate for our key")
        cert = issued[0]
        chain = issued_path(cert, self.anchor, ca_certs, self.now())
        return Issued(cert, chain, ca_certs)

    def _check_reply(self, body: bytes, transaction_id: str, nonce: bytes,
                     ca_certs: list[x509.Certificate]) -> wire.DecodedCertRep:
        try:
            reply = wire.decode_cert_rep(body)
        except Exception:
            raise AgentError("the SCEP reply cannot be decoded or its signature does not verify") from None
        if reply.signer_cert not in ca_certs or not key_usage_allows(reply.signer_cert, "digital_signature"):
            raise TrustError("the SCEP reply is not signed by the CA (or RA) served by GetCACert")
        if reply.transaction_id != transaction_id or reply.recipient_nonce != nonce:
            raise AgentError("the SCEP reply does not answer our request (transactionID/nonce)")
        return reply
