"""Real challenge responders on loopback for ACME tests: an authoritative DNS server (UDP, any
name under it answered from a dict or a JSON file that a client's hook writes) and the
tls-alpn-01 certificate of RFC 8737. Used by tests/ and conformance/."""
from __future__ import annotations

import hashlib
import json
import socket
import socketserver
import threading
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class DnsServer:
    """TXT records from `records` (name -> [values]) or, when given, the JSON file `path`
    (re-read on every query, so an external hook can write it). Names without a trailing dot,
    lowercase. NXDOMAIN for unknown names; SOA at the apex so clients that look for the zone
    find one."""

    def __init__(self, path: Path | None = None, zone: str = "test"):
        self.records: dict[str, list[str]] = {}
        self.path = path
        self.zone = zone
        self.queries: list[str] = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                data, sock = self.request
                try:
                    query = dns.message.from_wire(data)
                except Exception:
                    return
                sock.sendto(outer.answer(query).to_wire(), self.client_address)

        self.server = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "DnsServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def current(self) -> dict[str, list[str]]:
        if self.path is None:
            return self.records
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        self.queries.append(name)
        records = {k.rstrip(".").lower(): v for k, v in self.current().items()}
        if question.rdtype == dns.rdatatype.TXT and name in records:
            rrset = dns.rrset.from_text_list(question.name, 1, dns.rdataclass.IN, dns.rdatatype.TXT,
                                             [f'"{v}"' for v in records[name]])
            response.answer.append(rrset)
        elif question.rdtype == dns.rdatatype.SOA and (name == self.zone or name in records):
            response.answer.append(dns.rrset.from_text(
                question.name, 60, "IN", "SOA", f"ns.{self.zone}. admin.{self.zone}. 1 60 60 60 60"))
        elif name not in records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response


def tls_alpn_certificate(name: str, key_authorization: str, *, critical: bool = True,
                         digest: bytes | None = None, ip: bool = False) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) of an RFC 8737 validation certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest() if digest is None else digest
    import datetime as dt
    import ipaddress
    now = dt.datetime.now(dt.timezone.utc)
    san = x509.IPAddress(ipaddress.ip_address(name)) if ip else x509.DNSName(name)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme tls alpn")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme tls alpn")]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"),
                                                      b"\x04\x20" + digest), critical=critical)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
