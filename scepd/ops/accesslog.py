"""HTTP access log: one line per request on the `scepd.access` logger, text or JSON like every
other log line (`[server] access_log`, on by default).

    GET /scep?operation=PKIOperation&message=<1234 bytes> 200 5120B 12.3ms rid=... peer=...

Redacted: the SCEP `message=` (a whole PKIMessage, shown as its length) and every query
parameter that may carry a secret (token, challenge, password, secret, key, hmac, jwt) -- their
values become `REDACTED`. Headers (Authorization, cookies) are never logged.
"""
from __future__ import annotations

import logging
from urllib.parse import parse_qsl, quote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

LOGGER = "scepd.access"
#: request dict key the request-context middleware stores the request id under
REQUEST_ID_KEY = web.RequestKey("scepd_request_id", str)
SECRET_WORDS = ("token", "challenge", "password", "passwd", "secret", "key", "hmac", "jwt", "auth")
MAX_PATH = 512


#: redacted forms of short queries that had nothing to hide (`operation=GetCACert`...), so the
#: common ones are not parsed again on every request; bounded, and never holding a secret
_PLAIN_QUERIES: dict[str, str] = {}


def redact_target(path: str, query: str) -> str:
    """The request target for the log: path (capped) and the query with secrets removed."""
    shown = path if len(path) <= MAX_PATH else path[:MAX_PATH] + "..."
    if not query:
        return shown
    known = _PLAIN_QUERIES.get(query)
    if known is not None:
        return f"{shown}?{known}"
    redacted = _redact_query(query)
    if len(query) <= 64 and "REDACTED" not in redacted and " bytes>" not in redacted \
            and len(_PLAIN_QUERIES) < 256:
        _PLAIN_QUERIES[query] = redacted
    return f"{shown}?{redacted}"


def _redact_query(query: str) -> str:
    parts = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        low = name.lower()
        if low == "message":
            value = f"<{len(value)} bytes>"
        elif any(word in low for word in SECRET_WORDS):
            value = "REDACTED"
        elif len(value) > 128:
            value = value[:128] + "..."
        parts.append(f"{quote(name[:64], safe='')}={quote(value, safe='<> .-_')}")
    return "&".join(parts)


class AccessLogger(AbstractAccessLogger):
    """aiohttp calls `log` once the response is sent (with the time it took)."""

    def log(self, request, response, time: float) -> None:  # noqa: A002 - aiohttp's signature
        try:
            rel = request.rel_url
            fields = {
                "method": request.method,
                "target": redact_target(rel.raw_path, rel.raw_query_string),
                "status": response.status,
                "bytes": response.body_length,
                "duration_ms": round(time * 1000, 2),
                "request_id": request.get(REQUEST_ID_KEY),
                "peer": request.remote,
            }
        except Exception:  # the access log never breaks a request
            return
        self.logger.info("%s %s %s %sB %.1fms rid=%s peer=%s", fields["method"], fields["target"],
                         fields["status"], fields["bytes"], fields["duration_ms"], fields["request_id"],
                         fields["peer"], extra={"access": fields})


def runner_args(enabled: bool) -> dict:
    """Keyword arguments for aiohttp's AppRunner."""
    if not enabled:
        return {"access_log": None}
    return {"access_log": logging.getLogger(LOGGER), "access_log_class": AccessLogger}
