"""EST (RFC 7030, RFC 8951) as the agent speaks it: the third EnrollmentProtocol, over HTTPS only.

Trust: the first `cacerts` of an enrollment is fetched over an unverified TLS connection (the
root is not known yet) and the anchor is the served certificate with the pinned SHA-256
fingerprint, as SCEP's GetCACert (`protocol.pinned_anchor`); every other served certificate is
kept only if it verifies as a CA under that anchor (`protocol.trusted_as`). From then on every
connection verifies the server's TLS certificate against the anchor (our CA issues it).
Enrollment: `simpleenroll` with HTTP Basic (user the CN or "scepd-agent", password the
challenge), base64 PKCS#10 in, base64 certs-only PKCS#7 out. Renewal: `simplereenroll`, the
current certificate and key as the TLS client certificate, for the new key. `202` +
Retry-After: the same request again (the server finds it by key and credential), bounded.
The reply's certificate must be for our key and verify under the anchor (protocol.issued_path).
Heavy modules (aiohttp) are imported inside the functions that use them.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import logging
import os
import ssl
import tempfile
from urllib.parse import urlsplit

from cryptography import x509

from .protocol import AgentError, Identity, Issued, TrustError, Usage, issued_path, trusted_as
from .schedule import RenewalWindow

log = logging.getLogger("scepd.agent.est")

TIMEOUT_SECONDS = 60
WELL_KNOWN = "/.well-known/est"
MAX_POLLS = 60  # 202 answers followed before giving up (the daemon retries later)
PENDING_DEADLINE = 300.0  # seconds a request may wait for approval within one attempt
MAX_RETRY_AFTER = 60.0


def base_url(server: str) -> str:
    """https://ca:8443[/.well-known/est[/LABEL]] -> the URL the operation names are appended to."""
    parts = urlsplit(server)
    if parts.scheme != "https" or not parts.netloc:
        raise AgentError("the EST server URL must be https:// (e.g. https://ca.example:8443/.well-known/est)")
    path = parts.path.rstrip("/")
    if not path.startswith(WELL_KNOWN):
        path = WELL_KNOWN + path  # a bare origin (or origin + label): the well-known prefix added
    return f"https://{parts.netloc}{path}"


def decode_base64_body(body: bytes, what: str) -> bytes:
    """RFC 8951: base64 (RFC 4648) with any whitespace or line breaks ignored; a DER body (a
    server that sends binary despite RFC 8951) is taken as is."""
    if body[:1] == b"\x30" and body[1:2] in (b"\x80", b"\x81", b"\x82", b"\x83", b"\x84"):
        return body  # DER SEQUENCE with a long-form length: never base64 text
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise AgentError(f"the EST {what} reply is not base64") from None


def certs_of(body: bytes, what: str) -> list[x509.Certificate]:
    """The certificates of a base64 certs-only PKCS#7 reply (RFC 7030 §4.1.3, §4.2.3)."""
    from cryptography.hazmat.primitives.serialization import pkcs7
    der = decode_base64_body(body, what)
    try:
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except ValueError:
        raise AgentError(f"the EST {what} reply is not a certs-only PKCS#7") from None
    if not certs:
        raise AgentError(f"the EST {what} reply carries no certificate")
    return certs


def basic_authorization(identity: Identity, password: str) -> str:
    """RFC 7617: user name the CN (no ':' allowed in it) or "scepd-agent", the challenge as password."""
    user = identity.common_name if identity.common_name and ":" not in identity.common_name else "scepd-agent"
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def retry_after(value: str | None, polls: int) -> float:
    """Seconds to wait before asking again: the server's Retry-After (delta-seconds), else a
    backoff like SCEP's polling; clamped to [1, MAX_RETRY_AFTER]."""
    try:
        delay = float(value) if value is not None else float(min(2 ** polls, 30))
    except ValueError:
        delay = float(min(2 ** polls, 30))
    return min(max(delay, 1.0), MAX_RETRY_AFTER)


def reply_text(status: int, body: bytes) -> str:
    text = " ".join(body[:300].decode("utf-8", "replace").split())
    return text or f"HTTP {status}"


def client_cert_context(anchor: x509.Certificate, cert: x509.Certificate, key,
                        chain: list[x509.Certificate]) -> ssl.SSLContext:
    """Trust the anchor; present `cert` (+ its issuing CAs) with `key`. The ssl module loads a
    client certificate from files only: written to a private temporary directory, read, removed."""
    from cryptography.hazmat.primitives import serialization
    from .acme_client import context_for
    ctx = context_for(anchor)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [cert, *chain])
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with tempfile.TemporaryDirectory(prefix="scepd-agent-est-") as tmp:  # 0700
        cert_file, key_file = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(cert_file, "wb") as f:
            f.write(pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _insecure_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class EstClient:
    """One EST server (its /.well-known/est[/LABEL] URL), trusted through `anchor` (the pinned
    root; None only for `fetch_ca_certs` before the pin is chosen)."""

    def __init__(self, url: str, anchor: x509.Certificate | None, *, ssl_context: ssl.SSLContext | None = None,
                 sleep=asyncio.sleep, now=lambda: dt.datetime.now(dt.timezone.utc)):
        self.url = base_url(url)
        self.anchor = anchor
        self._ssl_context = ssl_context
        self.sleep = sleep
        self.now = now
        self.last_ca_certs: list[x509.Certificate] = []

    # --- transport --------------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is not None:
            return self._ssl_context
        if self.anchor is None:
            return _insecure_context()  # the trust bootstrap: the pin check makes it safe
        from .acme_client import context_for
        return context_for(self.anchor)

    async def _call(self, method: str, operation: str, *, ctx: ssl.SSLContext | None = None,
                    data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
        import aiohttp
        url = f"{self.url}/{operation}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)) as session:
                async with session.request(method, url, data=data, headers=headers,
                                           ssl=ctx or self._context()) as resp:
                    return resp.status, dict(resp.headers), await resp.read()
        except aiohttp.ClientConnectorCertificateError as exc:
            raise TrustError(f"the EST server's TLS certificate does not chain to the pinned root: "
                             f"{exc.certificate_error}") from None
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise AgentError(f"EST {operation}: the TLS handshake with {url} failed: {exc}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise AgentError(f"EST {operation} to {url} failed: {exc or 'timeout'}") from None

    # --- CA certificates --------------------------------------------------------------------

    async def fetch_ca_certs(self) -> list[x509.Certificate]:
        """GET cacerts, unverified beyond the TLS connection (enrollment pins from it)."""
        status, _, body = await self._call("GET", "cacerts")
        if status != 200:
            raise AgentError(f"EST cacerts answered HTTP {status}: {reply_text(status, body)}")
        return certs_of(body, "cacerts")

    async def ca_certs(self) -> list[x509.Certificate]:
        """cacerts, keeping the certificates verified as CAs under the anchor (served order)."""
        if self.anchor is None:
            raise AgentError("no trust anchor: pin the root first")
        certs = await self.fetch_ca_certs()
        now = self.now()
        good = [c for c in certs if c == self.anchor or trusted_as(c, self.anchor, certs, now) is Usage.CA]
        if not good:
            raise TrustError("none of the certificates served by EST cacerts is a CA under the pinned root")
        for c in certs:
            if c not in good:
                log.warning("EST cacerts served %s, which does not verify as a CA under the pinned root: "
                            "ignored", c.subject.rfc4514_string())
        self.last_ca_certs = good
        return good

    async def next_ca(self) -> list[x509.Certificate]:
        return []  # EST announces no successor CA; each renewal reads cacerts afresh

    async def renewal_window(self, cert: x509.Certificate) -> RenewalWindow | None:
        return None

    # --- enrollment -------------------------------------------------------------------------

    async def enroll(self, key, identity: Identity, secret: str) -> Issued:
        from .scep_client import build_csr
        if not secret:
            raise AgentError("EST enrollment needs a challenge (HTTP Basic password)")
        ca_certs = await self.ca_certs()
        csr = build_csr(key, identity, None)
        headers = {"Authorization": basic_authorization(identity, secret)}
        return await self._request("simpleenroll", csr, key, ca_certs, headers, self._context())

    async def renew(self, new_key, current_cert: x509.Certificate, current_key) -> Issued:
        from .scep_client import build_csr, identity_of
        ca_certs = await self.ca_certs()
        chain = [c for c in ca_certs if c != self.anchor and c.subject == current_cert.issuer]
        ctx = client_cert_context(self.anchor, current_cert, current_key, chain)
        csr = build_csr(new_key, identity_of(current_cert), None)
        try:
            return await self._request("simplereenroll", csr, new_key, ca_certs, {}, ctx)
        except TrustError:
            raise
        except AgentError as exc:
            if "TLS handshake" not in str(exc):
                raise
            raise AgentError(f"{exc} (the server refuses an expired certificate, or one without the "
                             "clientAuth usage, as TLS client: such a certificate cannot renew by "
                             "simplereenroll; enroll again with a challenge)") from None

    async def _request(self, operation: str, csr_der: bytes, key, ca_certs: list[x509.Certificate],
                       headers: dict, ctx: ssl.SSLContext) -> Issued:
        body = base64.b64encode(csr_der)
        headers = {**headers, "Content-Type": "application/pkcs10", "Content-Transfer-Encoding": "base64"}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PENDING_DEADLINE
        polls = 0
        while True:
            status, reply_headers, reply = await self._call("POST", operation, ctx=ctx, data=body, headers=headers)
            if status != 202:
                break
            polls += 1
            delay = retry_after(reply_headers.get("Retry-After"), polls)
            if polls > MAX_POLLS or loop.time() + delay > deadline:
                raise AgentError(f"the EST {operation} request is still pending approval; it will be retried")
            log.info("EST %s: pending approval, asking again in %.0f s", operation, delay)
            await self.sleep(delay)
        if status != 200:
            raise AgentError(f"the EST server refused {operation} (HTTP {status}): {reply_text(status, reply)}")
        return self.issued(reply, key, ca_certs, operation)

    def issued(self, reply: bytes, key, ca_certs: list[x509.Certificate], operation: str = "simpleenroll") -> Issued:
        """The certificate for `key` in a certs-only reply, its path verified under the anchor."""
        certs = certs_of(reply, operation)
        mine = [c for c in certs if c.public_key() == key.public_key()]
        if not mine:
            raise AgentError(f"the EST {operation} reply carries no certificate for our key")
        cert = mine[0]
        pool = ca_certs + [c for c in certs if c != cert and c not in ca_certs]
        chain = issued_path(cert, self.anchor, pool, self.now())
        return Issued(cert, chain, ca_certs)
