"""EST over HTTPS (RFC 7030 §3, RFC 8951): every HTTP detail lives here, the service sees bytes,
the Basic password and the verified TLS client certificate.

Routes (HTTPS listener only): /.well-known/est/<operation> and /.well-known/est/<label>/<operation>,
operations cacerts and csrattrs (GET), simpleenroll, simplereenroll and serverkeygen (POST).
Answers: 200 with base64 bodies (RFC 8951), 202 + Retry-After while a request waits for approval,
400/401/403/404/413/429 with a one-line text/plain reason (401 with WWW-Authenticate: Basic).
"""
from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time

from aiohttp import web

from ..enroll.pipeline import NameOutOfScope
from ..errors import (ChallengeRejected, ExternalCheckDenied, MalformedRequest, NotFound, PayloadTooLarge, RateLimited,
                      RenewalRefused, RequestRejected, ScepdError, Unavailable)
from ..http_body import read_body
from ..ops.ratelimit import EST_FAILURES_PER_ADDRESS, RateLimiter, address_key
from .service import AuthenticationRequired, Credentials, Enrolled, EstService, Forbidden, encode_base64

log = logging.getLogger("scepd.est.http")

PREFIX = "/.well-known/est"
REALM = "scepd EST"
CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
GET_OPERATIONS = ("cacerts", "csrattrs")
POST_OPERATIONS = ("simpleenroll", "simplereenroll", "serverkeygen")

#: refusals an authenticated client caused by what it asked (HTTP 403)
_FORBIDDEN = (Forbidden, NameOutOfScope, RenewalRefused, RequestRejected, ExternalCheckDenied)


def basic_password(header: str | None) -> str | None:
    """The password of `Authorization: Basic base64(user:password)` (RFC 7617), any user name;
    None without Basic credentials. AuthenticationRequired for undecodable ones."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise AuthenticationRequired("malformed Basic credentials") from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise AuthenticationRequired("malformed Basic credentials")
    return password


def status_of(err: ScepdError) -> int:
    if isinstance(err, (AuthenticationRequired, ChallengeRejected)):  # the latter: spent meanwhile
        return 401
    if isinstance(err, _FORBIDDEN):
        return 403
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, PayloadTooLarge):
        return 413
    if isinstance(err, RateLimited):
        return 429
    if isinstance(err, Unavailable):
        return 503
    return 400  # malformed base64 or CSR, a refused key or subject (PolicyViolation), ...


def error_response(err: ScepdError) -> web.Response:
    status = status_of(err)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = f'Basic realm="{REALM}"'
    if isinstance(err, (RateLimited, Unavailable)):
        headers["Retry-After"] = str(err.retry_after)
    reason = (err.detail.splitlines() or ["refused"])[0][:300]
    return web.Response(status=status, text=reason + "\n", content_type="text/plain", headers=headers)


def multipart_keygen(enrolled: Enrolled, certs_only_b64: bytes) -> tuple[bytes, str]:
    """RFC 7030 §4.4.2: multipart/mixed, the PKCS#8 key (application/pkcs8) then the
    certificate (certs-only PKCS#7), each base64."""
    boundary = "est-" + secrets.token_hex(12)
    parts = []
    for ctype, body in (("application/pkcs8", encode_base64(enrolled.key_pkcs8)),
                        (CERTS_ONLY, certs_only_b64)):
        parts.append(f"--{boundary}\r\nContent-Type: {ctype}\r\n"
                     "Content-Transfer-Encoding: base64\r\n\r\n".encode() + body + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/mixed; boundary={boundary}"


class EstHandler:
    def __init__(self, service: EstService, max_body_bytes: int, observer=None,
                 limits: RateLimiter | None = None, peer_certificate=None):
        self.service = service
        self.max_body_bytes = max_body_bytes
        #: callable(operation, status, seconds) for metrics
        self.observer = observer
        self.limits = limits or RateLimiter.disabled()
        #: callable(request) -> the verified TLS client certificate or None
        self.peer_certificate = peer_certificate or (lambda _request: None)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        op = request.match_info.get("op", "")
        operation = op if op in GET_OPERATIONS + POST_OPERATIONS else "other"
        status = 500
        try:
            response = await self._handle(request, op, request.match_info.get("label"))
            status = response.status
            return response
        finally:
            if self.observer is not None:
                self.observer(operation, status, time.monotonic() - started)

    async def _handle(self, request: web.Request, op: str, label: str | None) -> web.Response:
        address = address_key(request.remote)
        counted = False
        try:
            self.service.profile_of_label(label)  # NotFound for an unknown label
            if op in GET_OPERATIONS:
                if request.method not in ("GET", "HEAD"):
                    return _not_allowed("GET")
                return self._get(op)
            if op not in POST_OPERATIONS:
                raise NotFound("unknown EST operation")
            if request.method != "POST":
                return _not_allowed("POST")
            self.limits.ensure(EST_FAILURES_PER_ADDRESS, address)
            counted = True
            creds = Credentials(password=basic_password(request.headers.get("Authorization")),
                                client_cert=self.peer_certificate(request),
                                requester=f"est:{request.remote or '?'}")
            body = await read_body(request, self.max_body_bytes)
            if not body.strip():
                raise MalformedRequest("the body carries no PKCS#10 request")
            call = {"simpleenroll": self.service.simple_enroll, "simplereenroll": self.service.simple_reenroll,
                    "serverkeygen": self.service.server_keygen}[op]
            enrolled = await call(body, creds, label)
            return self._enrolled(op, enrolled)
        except ScepdError as err:
            status = status_of(err)
            if counted and status in (400, 401, 403):
                self.limits.spend(EST_FAILURES_PER_ADDRESS, address)
            log.info("EST %s %s refused with HTTP %s: %s", request.method, op[:40], status, err.detail)
            return error_response(err)
        except Exception:  # never a 500 with internal text: the log has it
            log.exception("EST %s failed", op[:40])
            return web.Response(status=503, text="the server cannot answer now; retry later\n",
                                content_type="text/plain", headers={"Retry-After": "30"})

    def _get(self, op: str) -> web.Response:
        if op == "cacerts":
            return web.Response(body=self.service.ca_certs(), headers={
                "Content-Type": CERTS_ONLY, "Content-Transfer-Encoding": "base64"})
        attrs = self.service.csr_attrs()
        if attrs is None:
            return web.Response(status=204)
        return web.Response(body=attrs, headers={"Content-Type": "application/csrattrs",
                                                 "Content-Transfer-Encoding": "base64"})

    def _enrolled(self, op: str, enrolled: Enrolled) -> web.Response:
        if enrolled.cert is None:  # RFC 7030 §4.2.3: accepted, retry the same request later
            return web.Response(status=202, text="the request waits for approval; retry later\n",
                                content_type="text/plain", headers={"Retry-After": str(enrolled.retry_after)})
        log.info("EST %s issued serial=%s", op, enrolled.serial)
        certs_b64 = self.service.certs_only_base64(enrolled.cert)
        if enrolled.key_pkcs8 is not None:
            body, ctype = multipart_keygen(enrolled, certs_b64)
            return web.Response(body=body, headers={"Content-Type": ctype})
        return web.Response(body=certs_b64, headers={"Content-Type": CERTS_ONLY,
                                                     "Content-Transfer-Encoding": "base64"})


def _not_allowed(method: str) -> web.Response:
    return web.Response(status=405, text=f"use {method}\n", content_type="text/plain",
                        headers={"Allow": method})


def add_routes(app: web.Application, handler: EstHandler) -> None:
    for path in (PREFIX + "/{op}", PREFIX + "/{label}/{op}"):
        app.router.add_route("*", path, handler.handle)
