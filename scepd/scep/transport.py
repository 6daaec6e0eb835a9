"""SCEP over HTTP (RFC 8894 §4): every HTTP detail lives here, the service sees bytes.

Paths: /scep, /scep/<anything>, /cgi-bin/pkiclient.exe, /certsrv/mscep/mscep.dll, each also
with /pkiclient.exe appended (Cisco IOS appends it). GET and POST for PKIOperation; POST with
any or no Content-Type; the body is capped (413). GET `message=` is decoded tolerantly.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from urllib.parse import unquote_to_bytes

from aiohttp import web

from ..errors import MalformedRequest, PayloadTooLarge, ScepdError, Unavailable, UnsupportedOperation, mapping_for
from ..http_body import read_body
from ..ops.ratelimit import SCEP_FAILURES_PER_ADDRESS, SCEP_FAILURES_PER_TRANSACTION, RateLimiter, address_key
from . import wire
from .service import HTTP_ERRORS, ScepService

log = logging.getLogger("scepd.scep.http")

PATHS = ("/scep", "/cgi-bin/pkiclient.exe", "/certsrv/mscep/mscep.dll")
_B64_JUNK = re.compile(rb"[\s]")


def _raw_query(query_string: str) -> dict[str, bytes]:
    """Parameters with percent-escapes decoded but '+' kept (base64 needs it); names lower-cased;
    the first occurrence wins."""
    params: dict[str, bytes] = {}
    for part in query_string.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        key = unquote_to_bytes(name).decode("latin-1").strip().lower()
        params.setdefault(key, unquote_to_bytes(value))
    return params


def decode_get_message(value: bytes) -> bytes:
    """base64 as real clients send it: standard or URL-safe alphabet, newlines, missing padding,
    and '+' that an intermediary turned into a space."""
    text = value.strip().replace(b" ", b"+")
    text = _B64_JUNK.sub(b"", text).replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
    if not text:
        raise MalformedRequest("PKIOperation over GET needs a message parameter")
    text += b"=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequest("the message parameter is not base64") from None


def _error_response(err: ScepdError) -> web.Response:
    status = 413 if isinstance(err, PayloadTooLarge) else 503 if isinstance(err, Unavailable) else 400
    return web.Response(status=status, text=err.detail.splitlines()[0] + "\n", content_type="text/plain")


class ScepHandler:
    def __init__(self, service: ScepService, max_body_bytes: int, observer=None,
                 limits: RateLimiter | None = None):
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.observer = observer  # callable(operation, outcome|None, seconds) for metrics
        self.limits = limits or RateLimiter.disabled()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        params = _raw_query(request.query_string)
        operation = params.get("operation", b"").decode("latin-1")
        op = operation.lower()
        outcome = None
        try:
            if op == "getcacaps":
                return web.Response(text=self.service.capabilities(), content_type="text/plain")
            if op == "getcacert":
                body, ctype = self.service.ca_certs()
                return web.Response(body=body, content_type=ctype)
            if op == "getnextcacert":
                body = await asyncio.to_thread(self.service.next_ca_certs)  # signs
                if body is None:
                    return web.Response(status=404, text="no next CA certificate is published\n",
                                        content_type="text/plain")
                return web.Response(body=body, content_type="application/x-x509-next-ca-cert")
            if op == "pkioperation":
                if request.method == "POST":
                    message = await self._read_body(request)
                elif request.method in ("GET", "HEAD"):
                    message = decode_get_message(params.get("message", b""))
                else:
                    raise UnsupportedOperation("PKIOperation takes GET or POST")
                remote = request.remote or "?"
                gate = _FailureGate(self.limits, address_key(request.remote))
                reply, outcome = await self.service.pki_operation(message, requester=f"scep:{remote}",
                                                                  admit=gate.admit)
                gate.record(outcome)
                log.info("PKIOperation %s type=%s status=%s txn=%s cipher=%s digest=%s serial=%s",
                         request.method, outcome.message_type, outcome.status.name, outcome.transaction_id,
                         outcome.cipher, outcome.digest, outcome.serial or "-")
                return web.Response(body=reply, content_type="application/x-pki-message")
            if not operation:
                raise UnsupportedOperation("missing operation parameter")
            raise UnsupportedOperation(f"unknown operation {operation[:40]!r}")
        except HTTP_ERRORS + (PayloadTooLarge, UnsupportedOperation) as err:
            log.info("SCEP %s refused with HTTP %s: %s", operation[:40], mapping_for(err).http_status,
                     err.detail)
            return _error_response(err)
        except Unavailable as err:  # no signature can be made now: no signed FAILURE either
            log.warning("SCEP %s answered HTTP 503: %s", operation[:40], err)
            resp = _error_response(err)
            resp.headers["Retry-After"] = str(err.retry_after)
            return resp
        finally:
            if self.observer is not None:
                self.observer(op or "unknown", outcome, time.monotonic() - started)

    async def _read_body(self, request: web.Request) -> bytes:
        body = await read_body(request, self.max_body_bytes)  # the whole body, however it arrives
        if not body:
            raise MalformedRequest("PKIOperation over POST needs a body")
        return body


_ENROLLMENTS = (wire.MessageType.PKCS_REQ, wire.MessageType.RENEWAL_REQ)


class _FailureGate:
    """Failed enrollments (PKCSReq/RenewalReq answered FAILURE) per address and per
    transactionID: once either is over its limit, enrollments are answered with a signed FAILURE
    (badRequest, "retry in N s") before anything is decrypted. Polls, GetCert and GetCRL pass."""

    __slots__ = ("limits", "address", "refused")

    def __init__(self, limits: RateLimiter, address: str):
        self.limits, self.address, self.refused = limits, address, False

    def admit(self, message_type: int, transaction_id: str) -> None:
        if message_type in _ENROLLMENTS:
            self.refused = True  # until both checks pass: a refusal is not itself a failure
            self.limits.ensure(SCEP_FAILURES_PER_ADDRESS, self.address)
            self.limits.ensure(SCEP_FAILURES_PER_TRANSACTION, transaction_id)
            self.refused = False

    def record(self, outcome) -> None:
        if outcome.status == wire.PkiStatus.FAILURE and outcome.message_type in _ENROLLMENTS \
                and not self.refused:
            self.limits.spend(SCEP_FAILURES_PER_ADDRESS, self.address)
            self.limits.spend(SCEP_FAILURES_PER_TRANSACTION, outcome.transaction_id)


def add_routes(app: web.Application, handler: ScepHandler) -> None:
    for base in PATHS:
        for path in (base, base + "/pkiclient.exe"):
            app.router.add_route("GET", path, handler.handle)
            app.router.add_route("POST", path, handler.handle)
    app.router.add_route("GET", "/scep/{tail:.+}", handler.handle)
    app.router.add_route("POST", "/scep/{tail:.+}", handler.handle)
