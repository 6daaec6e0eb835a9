"""The admin API: JSON over the HTTPS listener under /api/v1/admin/ (see scepd.admin for the
authentication rule). Handlers are thin: parse, call the same services the CLI calls, encode.
"""
from __future__ import annotations

import datetime as dt
import json
import logging

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError
from cryptography.hazmat.primitives import serialization

from .service import AdminService, normalize_serial
from ..ops.audit import audit_json, list_audit, parse_since
from ..config import ConfigError, parse_duration
from ..enroll.challenges import clean_names
from ..errors import BadRequest, ScepdError, mapping_for
from ..render import cert_json, pending_json
from ..store import CertificateRecord, StoreNotFound

log = logging.getLogger("scepd.admin.http")



PREFIX = "/api/v1/admin"
MAX_LIMIT = 1000


class _Denied(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def authenticate(request: web.Request, services, admin: AdminService) -> str:
    """The actor name for the audit trail, or _Denied(401/403)."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Denied(401, "use Authorization: Bearer <token>")
        rec = await admin.check_token(token.strip())
        if rec is None:
            raise _Denied(401, "invalid or revoked token")
        return f"token:{rec.id}:{rec.name}"
    from ..enroll.enrollment import serial_hex
    from ..http.tls import peer_certificate
    cert = peer_certificate(request)
    if cert is None:
        raise _Denied(401, "an admin client certificate or a bearer token is required")
    serial = serial_hex(cert.serial_number)
    try:
        rec = await services.store.get_certificate(serial)
    except StoreNotFound:
        raise _Denied(401, "client certificate not issued by this server") from None
    if rec.der != cert.public_bytes(serialization.Encoding.DER):
        raise _Denied(401, "client certificate not issued by this server")
    if rec.status == "revoked":
        raise _Denied(401, "client certificate revoked")
    if rec.not_after <= services.clock.now():
        raise _Denied(401, "client certificate expired")
    if rec.profile != "admin":
        raise _Denied(403, "not an admin certificate")
    return f"cert:{rec.serial}:{rec.subject}"


def _json_error(status: int, message: str) -> web.Response:
    resp = web.json_response({"error": message}, status=status)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="scepd-admin"'
    return resp


async def _body(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        data = json.loads(await request.text() or "{}")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def _ttl(body: dict, default: str) -> dt.timedelta:
    """A lifetime from the request body ("1h", "7d"), between 1 second and 366 days."""
    text = body.get("ttl", default)
    if not isinstance(text, str):
        raise BadRequest("ttl and the other fields are strings (ttl such as 1h or 7d)")
    try:
        ttl = parse_duration(text)
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None
    if ttl <= dt.timedelta(0) or ttl > dt.timedelta(days=366):
        raise BadRequest("ttl must be between 1 second and 366 days")
    return ttl


#: for front-end plug-ins adding admin routes (acme/: POST /api/v1/admin/eab)
json_body = _body
ttl_param = _ttl


def _int_param(request: web.Request, name: str, default: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 0 <= int(raw) <= maximum:
        raise BadRequest(f"{name} must be an integer 0..{maximum}")
    return int(raw)


def admin_endpoint(services, handler, admin: AdminService | None = None):
    """An aiohttp handler from `handler(request, actor)`: authenticated (bearer token or admin
    certificate), errors mapped to JSON. Front-end plug-ins (acme/) add their admin routes with it."""
    admin = admin or AdminService(services.store, services.clock, services.enrollment)

    async def wrapped(request: web.Request) -> web.Response:
        try:
            actor = await authenticate(request, services, admin)
            return await handler(request, actor)
        except _Denied as denied:
            log.info("admin API %s %s refused: %s", request.method, request.path, denied.message)
            return _json_error(denied.status, denied.message)
        except ScepdError as err:
            return _json_error(mapping_for(err).http_status, err.detail)
        except (SQLAlchemyError, OSError):  # the store is unreachable: nothing was done
            log.exception("admin API %s %s: store unavailable", request.method, request.path)
            return _json_error(503, "the store is temporarily unavailable")
    return wrapped


def add_admin_routes(app: web.Application, services) -> None:
    admin = AdminService(services.store, services.clock, services.enrollment)

    def route(handler):
        return admin_endpoint(services, handler, admin)

    async def list_certs(request: web.Request, _actor: str) -> web.Response:
        now = services.clock.now()
        before = None
        if "expiring_within" in request.query:
            try:
                before = now + parse_duration(request.query["expiring_within"])
            except ConfigError as exc:
                raise BadRequest(str(exc)) from None
        limit = _int_param(request, "limit", 100, MAX_LIMIT)
        offset = _int_param(request, "offset", 0, 10**9)
        records = await services.store.list_certificates(expiring_before=before, limit=limit, offset=offset)
        return web.json_response({"certificates": [cert_json(r, now) for r in records]})

    async def _get(serial_text: str) -> CertificateRecord:
        from ..errors import NotFound
        serial = normalize_serial(serial_text)
        try:
            return await services.store.get_certificate(serial)
        except StoreNotFound:
            raise NotFound(f"no certificate with serial {serial}") from None

    async def show_cert(request: web.Request, _actor: str) -> web.Response:
        rec = await _get(request.match_info["serial"])
        return web.json_response(cert_json(rec, services.clock.now(), with_pem=True))

    async def revoke_cert(request: web.Request, actor: str) -> web.Response:
        from ..ca.revocation import RevocationReason
        body = await _body(request)
        reason_text = body.get("reason", "unspecified")
        if not isinstance(reason_text, (str, int)) or isinstance(reason_text, bool):
            raise BadRequest("reason must be an RFC 5280 reason name or code")
        reason = RevocationReason.parse(reason_text)
        serial = normalize_serial(request.match_info["serial"])
        rec = await services.revocation.revoke(serial, reason, actor=f"admin-api:{actor}")
        return web.json_response(cert_json(rec, services.clock.now()))

    async def create_challenge(request: web.Request, actor: str) -> web.Response:
        body = await _body(request)
        cn, names, profile = body.get("cn"), body.get("names"), body.get("profile")
        if cn is not None and not isinstance(cn, str):
            raise BadRequest("ttl and cn are strings")
        if isinstance(names, str):
            names = [names]
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise BadRequest("names is a list of name patterns (strings)")
        if profile is not None and not isinstance(profile, str):
            raise BadRequest("profile is a profile name (string)")
        ttl = _ttl(body, "1h")
        try:  # `cn` is the older spelling of one name pattern
            scope = clean_names([*(names or ()), *([cn] if cn else [])])
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        secret = await services.challenges.create(ttl, names=scope, profile=profile or None,
                                                  actor=f"admin-api:{actor}")
        return web.json_response({"challenge": secret,
                                  "expires_at": (services.clock.now() + ttl).isoformat(),
                                  "names": list(scope) if scope else None, "profile": profile or None,
                                  "cn_pattern": cn or None}, status=201)

    async def list_pending(request: web.Request, _actor: str) -> web.Response:
        show_all = request.query.get("all") in ("1", "true")
        rows = await services.store.list_pending(None if show_all else "pending")
        return web.json_response({"pending": [pending_json(r) for r in rows]})

    def _pending_id(request: web.Request) -> int:
        raw = request.match_info["pending_id"]
        if not raw.isdigit():
            raise BadRequest("a pending request id is an integer")
        return int(raw)

    async def approve_pending(request: web.Request, actor: str) -> web.Response:
        issued = await services.enrollment.approve_pending(_pending_id(request), f"admin-api:{actor}")
        return web.json_response(cert_json(issued.record, services.clock.now()))

    async def reject_pending(request: web.Request, actor: str) -> web.Response:
        body = await _body(request)
        reason = body.get("reason")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
            raise BadRequest("reject needs a reason (1..500 characters)")
        rec = await services.enrollment.reject_pending(_pending_id(request), reason.strip(),
                                                      f"admin-api:{actor}")
        return web.json_response(pending_json(rec))

    async def get_audit(request: web.Request, _actor: str) -> web.Response:
        since = None
        if request.query.get("since"):
            try:
                since = parse_since(request.query["since"], services.clock.now())
            except ValueError as exc:
                raise BadRequest(str(exc).removeprefix("--since: ")) from None
        serial = normalize_serial(request.query["serial"]) if request.query.get("serial") else None
        records = await list_audit(services.store, event=request.query.get("event") or None,
                                   serial=serial, since=since,
                                   limit=_int_param(request, "limit", 100, MAX_LIMIT) or 1)
        return web.json_response({"audit": [audit_json(r) for r in records]})

    async def list_agents(request: web.Request, _actor: str) -> web.Response:
        from ..ops.agents import AgentInventory
        limit = _int_param(request, "limit", 1000, 10000)
        rows = await AgentInventory(services.store, services.clock).list(limit)
        now = services.clock.now()
        return web.json_response({"agents": [r.to_json(now) for r in rows]})

    async def whoami(_request: web.Request, actor: str) -> web.Response:
        return web.json_response({"actor": actor})

    r = app.router
    r.add_get(f"{PREFIX}/whoami", route(whoami))
    r.add_get(f"{PREFIX}/certificates", route(list_certs))
    r.add_get(f"{PREFIX}/certificates/{{serial}}", route(show_cert))
    r.add_post(f"{PREFIX}/certificates/{{serial}}/revoke", route(revoke_cert))
    r.add_post(f"{PREFIX}/challenges", route(create_challenge))
    r.add_get(f"{PREFIX}/audit", route(get_audit))
    r.add_get(f"{PREFIX}/agents", route(list_agents))
    if hasattr(services.enrollment, "approve_pending") and hasattr(services.store, "list_pending"):
        r.add_get(f"{PREFIX}/pending", route(list_pending))
        r.add_post(f"{PREFIX}/pending/{{pending_id}}/approve", route(approve_pending))
        r.add_post(f"{PREFIX}/pending/{{pending_id}}/reject", route(reject_pending))
