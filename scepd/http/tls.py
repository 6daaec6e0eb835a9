"""TLS for the HTTPS (ACME, admin API) and mTLS (agents) listeners.

The server's own certificate is issued by our CA through the ordinary enrollment path (so it is
in the inventory like every other certificate) and renewed by the server once two thirds of its
lifetime have passed. The mTLS rule:
  * foreign (not chaining to our root) and expired client certificates are refused by OpenSSL
    during the handshake;
  * a chaining certificate that is revoked, or not in our inventory, is answered HTTP 401.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..ca.csr import SubjectAltName, certificate_sans
from ..enroll.enrollment import EnrollmentService, serial_hex
from ..ca.pki import CaMaterial, pem, write_private, write_public
from ..ca.policy import PROFILES
from ..store import SqlStore, StoreNotFound

log = logging.getLogger("scepd.tls")


def names_for(host: str, extra: tuple[str, ...] = ()) -> tuple[SubjectAltName, ...]:
    out: list[SubjectAltName] = []
    for name in (host, "localhost", "127.0.0.1", *extra):
        if not name:
            continue
        try:
            san = SubjectAltName("ip", str(ipaddress.ip_address(name)))
        except ValueError:
            san = SubjectAltName("dns", name)
        if san not in out:
            out.append(san)
    return tuple(out)


class ServerCertificate:
    """Files DIR/tls/server.pem (leaf + issuing CA) and server.key (0600)."""

    def __init__(self, directory: Path, enrollment: EnrollmentService, material: CaMaterial,
                 names: tuple[SubjectAltName, ...]):
        self.directory = directory
        self.enrollment = enrollment
        self.material = material
        self.names = names
        self.cert_path = directory / "server.pem"
        self.key_path = directory / "server.key"
        self._contexts: list[ssl.SSLContext] = []
        self._loaded: tuple | None = None  # the files' identity when the contexts last loaded them

    def _current(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificates(self.cert_path.read_bytes())[0]
        except (FileNotFoundError, ValueError):
            return None

    def due(self, now: dt.datetime) -> bool:
        cert = self._current()
        if cert is None or not self.key_path.exists():
            return True
        if cert.issuer != self.material.cert.subject:
            return True
        if not set(self.names) <= set(certificate_sans(cert)):
            return True
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        return now >= cert.not_valid_before_utc + lifetime * 2 / 3

    async def ensure(self) -> bool:
        """Issue a new certificate if due; True when one was issued. Reloads live contexts."""
        if not self.due(self.enrollment.clock.now()):
            return False
        issued, key = await self.enrollment.issue_internal(self.names[0].value, self.names,
                                                           PROFILES["server"], "scepd:tls")
        write_private(self.key_path, key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()), replace=True)
        write_public(self.cert_path, pem(issued.cert, self.material.cert, *self.material.intermediates).encode())
        log.info("server TLS certificate issued: serial=%s names=%s", issued.record.serial,
                 ",".join(n.value for n in self.names))
        for ctx in self._contexts:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        self._loaded = self._stamp()
        return True

    def reload_if_changed(self) -> bool:
        """Another process (the primary worker) renewed the files: load them into the live
        contexts. True when they were reloaded."""
        try:
            stamp = self._stamp()
        except FileNotFoundError:
            return False
        if stamp == self._loaded:
            return False
        for ctx in self._contexts:  # ssl.SSLError (key and certificate from different renewals,
            ctx.load_cert_chain(self.cert_path, self.key_path)  # mid-write): the next check retries
        self._loaded = stamp
        return True

    def _stamp(self) -> tuple:
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in (self.cert_path.stat(), self.key_path.stat()))

    def context(self, client_auth: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self._loaded is None:
            self._loaded = self._stamp()
        ctx.load_cert_chain(self.cert_path, self.key_path)
        # mTLS requires a client certificate; the HTTPS listener asks for an optional one (admin
        # API clients present theirs, ACME clients none). Either way it must chain to our root.
        ctx.verify_mode = ssl.CERT_REQUIRED if client_auth else ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=pem(self.material.root, *self.material.intermediates,
                                             self.material.cert))
        self._contexts.append(ctx)
        return ctx


@dataclass(frozen=True)
class PeerCertificate:
    cert: x509.Certificate
    serial: str
    subject: str


PEER = web.RequestKey("peer", PeerCertificate)


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def mtls_gate(store: SqlStore):
    """Middleware: the client certificate must be ours (in the inventory) and not revoked."""

    @web.middleware
    async def gate(request: web.Request, handler):
        cert = peer_certificate(request)
        if cert is None:
            return web.json_response({"error": "a client certificate is required"}, status=401)
        serial = serial_hex(cert.serial_number)
        try:
            rec = await store.get_certificate(serial)
        except StoreNotFound:
            return web.json_response({"error": "client certificate not issued by this server"}, status=401)
        if rec.status == "revoked":
            return web.json_response({"error": "client certificate revoked"}, status=401)
        request[PEER] = PeerCertificate(cert, serial, rec.subject)
        return await handler(request)

    return gate
