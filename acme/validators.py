"""The three RFC 8555/8737 challenge validators: http-01, dns-01, tls-alpn-01.

Each is one coroutine (identifier, token, key authorization) -> None that raises a
ValidationFailed subclass naming what went wrong in client terms (the problem type comes from
the shared error table: connection, dns, tls, incorrectResponse). Where the validator connects is
configurable for labs and tests: `address_for` (SCEPD_ACME_RESOLVE), the http-01 and tls-alpn-01
ports, and the DNS resolver(s) of dns-01.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from scepd.errors import (PayloadTooLarge, ValidationConnection, ValidationDns,
                          ValidationFailed, ValidationTls)

from . import jws

#: RFC 8737 §6.1 id-pe-acmeIdentifier
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
ALPN = "acme-tls/1"
TIMEOUT = 10.0
MAX_BODY = 4096


@dataclass(frozen=True)
class Target:
    type: str  # dns | ip
    value: str  # the name without "*." for wildcards


@dataclass(frozen=True)
class ValidatorSettings:
    http01_port: int = 80
    tlsalpn01_port: int = 443
    resolve: str = ""  # "name=addr,*=addr"
    dns_resolvers: str = ""  # "addr[:port],..."; empty = the system's (/etc/resolv.conf)

    def address_for(self, name: str) -> str:
        default = None
        for item in filter(None, (p.strip() for p in self.resolve.split(","))):
            host, _, addr = item.partition("=")
            if host == name:
                return addr
            if host == "*":
                default = addr
        return default or name

    def nameservers(self) -> list[tuple[str, int]]:
        out = []
        for item in filter(None, (p.strip() for p in self.dns_resolvers.split(","))):
            if item.startswith("["):  # [v6]:port
                host, _, port = item[1:].partition("]:")
            elif item.count(":") == 1:
                host, _, port = item.partition(":")
            else:
                host, port = item, ""
            out.append((host, int(port or 53)))
        return out


_MAX_HEAD = 16 * 1024  # status line and headers of an http-01 answer


class _BadResponse(Exception):
    """The http-01 answer is not HTTP/1.x we can read."""


async def _http_get(addr: str, port: int, host: str, path: str) -> tuple[int, bytes]:
    """One HTTP/1.1 GET on a fresh connection (Connection: close): (status, body). No
    redirects, no cookies, nothing kept between validations; the body is capped at MAX_BODY
    (PayloadTooLarge above) whether it comes with a Content-Length, chunked or until close.
    A plain request on asyncio streams: a client session cost more than the fetch."""
    reader, writer = await asyncio.open_connection(addr, port, limit=_MAX_HEAD)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: scepd-acme-validator\r\n"
                     "Accept: */*\r\nConnection: close\r\n\r\n".encode("ascii"))
        for _ in range(8):  # 1xx interim answers are skipped (a few)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                raise _BadResponse() from None
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
                raise _BadResponse()
            status = int(parts[1])
            if not 100 <= status < 200:
                break
        else:
            raise _BadResponse()
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, sep, value = line.partition(":")
                if not sep:
                    raise _BadResponse()
                headers[name.strip().lower()] = value.strip()
        if status in (204, 304):
            return status, b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                try:
                    size_line = await reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                    raise _BadResponse() from None
                if size == 0:
                    return status, body
                if len(body) + size > MAX_BODY:
                    raise PayloadTooLarge("the http-01 answer is too large")
                try:
                    body += (await reader.readexactly(size + 2))[:-2]
                except asyncio.IncompleteReadError:
                    raise _BadResponse() from None
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise _BadResponse() from None
            if length < 0:
                raise _BadResponse()
            if length > MAX_BODY:
                raise PayloadTooLarge("the http-01 answer is too large")
            try:
                return status, await reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise _BadResponse() from None
        body = await reader.read(MAX_BODY + 1)  # delimited by the close
        while body and len(body) <= MAX_BODY:
            more = await reader.read(MAX_BODY + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > MAX_BODY:
            raise PayloadTooLarge("the http-01 answer is too large")
        return status, body
    finally:
        writer.close()


async def http01(target: Target, token: str, key_authorization: str, settings: ValidatorSettings) -> None:
    """RFC 8555 §8.3: GET http://name/.well-known/acme-challenge/TOKEN, no redirects."""
    addr = settings.address_for(target.value)
    host = f"[{target.value}]" if ":" in target.value else target.value
    try:
        async with asyncio.timeout(TIMEOUT):
            status, raw = await _http_get(addr.strip("[]"), settings.http01_port, host,
                                          f"/.well-known/acme-challenge/{token}")
    except PayloadTooLarge:
        raise ValidationFailed(f"http-01: {target.value} answered with more than {MAX_BODY} bytes") from None
    except (_BadResponse, asyncio.TimeoutError, OSError, UnicodeError):
        raise ValidationConnection(f"http-01: could not fetch the challenge from {target.value}") from None
    body = raw.decode("utf-8", "replace").strip()
    if status != 200 or body != key_authorization:
        raise ValidationFailed(f"http-01: {target.value} answered HTTP {status} "
                               "without the expected key authorization")


def dns01_value(key_authorization: str) -> str:
    return jws.b64u_encode(hashlib.sha256(key_authorization.encode()).digest())


async def dns01(target: Target, token: str, key_authorization: str, settings: ValidatorSettings) -> None:
    """RFC 8555 §8.4: a TXT record at _acme-challenge.NAME holding base64url(SHA-256(keyAuth))."""
    import dns.asyncresolver
    import dns.exception
    import dns.nameserver
    import dns.resolver

    name = f"_acme-challenge.{target.value}"
    servers = settings.nameservers()
    try:
        if servers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.lifetime = TIMEOUT
        answer = await resolver.resolve(name, "TXT", search=False)
    except dns.resolver.NXDOMAIN:
        raise ValidationDns(f"dns-01: {name} does not exist") from None
    except dns.resolver.NoAnswer:
        raise ValidationFailed(f"dns-01: {name} has no TXT record") from None
    except (dns.exception.DNSException, OSError):
        raise ValidationDns(f"dns-01: the TXT lookup of {name} failed") from None
    values = {b"".join(r.strings).decode("ascii", "replace") for r in answer}
    if dns01_value(key_authorization) not in values:
        raise ValidationFailed(f"dns-01: no TXT record at {name} holds the expected digest")


def reverse_name(ip: str) -> str:
    """RFC 8738 §6: the SNI of a tls-alpn-01 validation for an IP identifier."""
    return ipaddress.ip_address(ip).reverse_pointer + "."


async def tlsalpn01(target: Target, token: str, key_authorization: str, settings: ValidatorSettings) -> None:
    """RFC 8737: a TLS handshake with SNI = name and ALPN acme-tls/1 must present a certificate
    with exactly that one name and a critical acmeIdentifier holding SHA-256(keyAuth)."""
    addr = settings.address_for(target.value)
    sni = target.value if target.type == "dns" else reverse_name(target.value).rstrip(".")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the certificate is self-signed by design; checked below
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN])
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(addr, settings.tlsalpn01_port, ssl=ctx, server_hostname=sni),
            TIMEOUT)
    except ssl.SSLError:
        raise ValidationTls(f"tls-alpn-01: the TLS handshake with {target.value} failed") from None
    except (OSError, asyncio.TimeoutError):
        raise ValidationConnection(f"tls-alpn-01: could not connect to {target.value}") from None
    try:
        sslobj = writer.get_extra_info("ssl_object")
        if sslobj.selected_alpn_protocol() != ALPN:
            raise ValidationTls(f"tls-alpn-01: {target.value} did not negotiate {ALPN}")
        der = sslobj.getpeercert(binary_form=True)
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass
    check_tlsalpn01_certificate(der, target, key_authorization)


def check_tlsalpn01_certificate(der: bytes | None, target: Target, key_authorization: str) -> None:
    try:
        cert = x509.load_der_x509_certificate(der or b"")
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except (ValueError, x509.InvalidVersion, x509.ExtensionNotFound):
        raise ValidationFailed("tls-alpn-01: the certificate lacks subjectAltName or acmeIdentifier") from None
    names = [("dns", n.value.lower()) for n in sans if isinstance(n, x509.DNSName)] + \
            [("ip", str(n.value)) for n in sans if isinstance(n, x509.IPAddress)]
    if len(list(sans)) != 1 or names != [(target.type, target.value)]:
        raise ValidationFailed(f"tls-alpn-01: the certificate must name exactly {target.value}")
    if not ext.critical:
        raise ValidationFailed("tls-alpn-01: the acmeIdentifier extension must be critical")
    digest = hashlib.sha256(key_authorization.encode()).digest()
    if ext.value.value != b"\x04\x20" + digest:  # DER OCTET STRING (32 bytes)
        raise ValidationFailed("tls-alpn-01: acmeIdentifier does not hold the expected digest")


VALIDATORS = {"http-01": http01, "dns-01": dns01, "tls-alpn-01": tlsalpn01}
