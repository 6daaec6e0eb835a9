"""The console's routes under /ui/: authentication (session cookie or admin certificate), CSRF
on every POST, and thin handlers over the existing services."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from ..admin.http import _Denied, authenticate
from ..admin.service import AdminService, normalize_serial
from ..ca.revocation import RevocationReason
from ..errors import BadRequest, NotFound, ScepdError, mapping_for
from ..http.tls import peer_certificate
from ..ops.agents import AgentInventory
from ..ops.audit import list_audit
from ..render import cert_pem
from ..store import StoreNotFound
from . import pages, queries
from .pages import e, when
from .session import COOKIE, PRE_COOKIE, Sessions, load_key

log = logging.getLogger("scepd.console")

PREFIX = "/ui"
#: an agent that has not checked in for this long is shown as silent
AGENT_SILENT_AFTER = dt.timedelta(days=3)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


class _Refused(Exception):
    def __init__(self, response: web.StreamResponse):
        super().__init__()
        self.response = response


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", headers=SECURITY_HEADERS)


def _see(location: str) -> web.Response:
    return web.Response(status=303, headers={**SECURITY_HEADERS, "Location": location})


#: how long the inventory's filter menus (profiles, protocols, CAs present) are reused
MENU_TTL = dt.timedelta(minutes=1)


def add_console_routes(app: web.Application, services) -> None:
    class _Clock:  # the services' clock, read at each request (tests swap it)
        def now(self):
            return services.clock.now()

    sessions = Sessions(load_key(services.config.state_dir), _Clock())
    admin = AdminService(services.store, services.clock, services.enrollment)

    async def signed_in(request: web.Request) -> tuple[str, str] | None:
        """(actor, CSRF binding) of the caller, None if not signed in; _Refused for a client
        certificate that is not an admin certificate (403) or not a valid one of ours."""
        cookie = request.cookies.get(COOKIE)
        session = sessions.verify(cookie)
        if session is not None:
            name = await services.store.read(queries.session_live(session.token_id, session.sid))
            if name is not None:
                return f"token:{session.token_id}:{name}", "session|" + str(cookie)
        if peer_certificate(request) is not None:
            try:
                actor = await authenticate(request, services, admin)
            except _Denied as denied:
                if denied.status == 403:
                    raise _Refused(_html(pages.message("Forbidden", denied.message), 403)) from None
                return None
            return actor, "cert|" + actor.split(":")[1]
        return None

    def page(handler, *, post: bool = False):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                who = await signed_in(request)
                if who is None:
                    if post:
                        return _html(pages.message("Not signed in", "Sign in first."), 401)
                    return _see(f"{PREFIX}/login")
                actor, binding = who
                csrf = sessions.csrf(binding)
                form = None
                if post:
                    form = await request.post()
                    if not sessions.csrf_ok(binding, form.get("csrf")):
                        return _html(pages.message("Forbidden", "The form's CSRF token is missing or wrong; "
                                                   "reload the page and try again.", actor, csrf), 403)
                try:
                    return await handler(request, actor, csrf, form)
                except ScepdError as err:
                    return _html(pages.message("Refused", err.detail, actor, csrf), mapping_for(err).http_status)
            except _Refused as refused:
                return refused.response
            except (SQLAlchemyError, OSError):
                log.exception("console %s %s: store unavailable", request.method, request.path)
                return _html(pages.message("Unavailable", "The store is temporarily unavailable."), 503)
        return wrapped

    # --- sign-in ------------------------------------------------------------------------------

    def _login_page(error: str | None = None, status: int = 200) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        resp = _html(pages.login(sessions.csrf("login|" + nonce), error), status)
        resp.set_cookie(PRE_COOKIE, nonce, max_age=3600, path=f"{PREFIX}/", secure=True, httponly=True,
                        samesite="Strict")
        return resp

    async def login_form(request: web.Request) -> web.StreamResponse:
        try:
            if await signed_in(request) is not None:
                return _see(f"{PREFIX}/certificates")
        except _Refused:
            pass  # a non-admin certificate may still sign in with a token
        return _login_page()

    async def login(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        nonce = request.cookies.get(PRE_COOKIE, "")
        if not nonce or not sessions.csrf_ok("login|" + nonce, form.get("csrf")):
            return _html(pages.message("Forbidden", "The form's CSRF token is missing or wrong; reload the page."), 403)
        token = str(form.get("token") or "").strip()
        rec = await admin.check_token(token) if token else None
        if rec is None:
            log.info("console sign-in refused: invalid or revoked token")
            return _login_page("Invalid or revoked token.", 401)
        value, max_age = sessions.issue(rec.id)
        log.info("console sign-in: token %s (%s)", rec.id, rec.name)
        resp = _see(f"{PREFIX}/certificates")
        resp.set_cookie(COOKIE, value, max_age=max_age, path=f"{PREFIX}/", secure=True, httponly=True,
                        samesite="Strict")
        resp.del_cookie(PRE_COOKIE, path=f"{PREFIX}/")
        return resp

    async def logout(request, actor, _csrf, _form) -> web.StreamResponse:
        session = sessions.verify(request.cookies.get(COOKIE))
        if session is not None:  # ended here for every copy of the cookie, not just this browser's
            await services.store.write(queries.sign_out(session.sid, session.expires, services.clock.now()))
            log.info("console sign-out: %s", actor)
        resp = _see(f"{PREFIX}/login")
        resp.del_cookie(COOKIE, path=f"{PREFIX}/", secure=True, httponly=True, samesite="Strict")
        return resp

    # --- pages --------------------------------------------------------------------------------

    async def home(_request, _actor, _csrf, _form):
        return _see(f"{PREFIX}/certificates")

    menu_cache: dict = {}

    async def menus(now):
        """The filter menus: three DISTINCTs over the whole inventory, so read at most once a
        minute per process rather than on every page."""
        if menu_cache.get("until") is None or now >= menu_cache["until"] or now < menu_cache["at"]:
            menu_cache.update(value=await services.store.read(queries.choices), at=now,
                              until=now + MENU_TTL)
        return menu_cache["value"]

    async def inventory(request, actor, csrf, _form):
        qs = request.query
        page_text = qs.get("page", "1")
        if not page_text.isdigit() or not 1 <= int(page_text) <= 10**6:
            raise BadRequest("page must be a positive integer")
        state = qs.get("state", "")
        if state not in ("", "valid", "expired", "revoked"):
            raise BadRequest("state is valid, expired or revoked")
        f = queries.Filters(q=qs.get("q", "").strip()[:200], state=state, profile=qs.get("profile", "")[:64],
                            protocol=qs.get("protocol", "")[:16], ca=qs.get("ca", "")[:32], page=int(page_text))
        now = services.clock.now()
        records, more = await services.store.read(queries.search(f, now))
        choices = await menus(now)
        return _html(pages.layout("Inventory", pages.inventory(records, more, f, choices, now), actor, csrf))

    async def _record(serial_text: str):
        serial = normalize_serial(serial_text)
        try:
            return await services.store.get_certificate(serial)
        except StoreNotFound:
            raise NotFound(f"no certificate with serial {serial}") from None

    async def detail(request, actor, csrf, _form):
        rec = await _record(request.match_info["serial"])
        trail = await list_audit(services.store, serial=rec.serial, limit=200)
        body = pages.detail(rec, services.clock.now(), trail, csrf)
        return _html(pages.layout(f"Certificate {rec.subject}", body, actor, csrf))

    async def pem(request, _actor, _csrf, _form):
        rec = await _record(request.match_info["serial"])
        return web.Response(text=cert_pem(rec), content_type="application/x-pem-file", headers={
            **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{rec.serial}.pem"'})

    async def revoke(request, actor, _csrf, form):
        if form.get("confirm") != "yes":
            raise BadRequest("tick the confirmation box to revoke")
        reason = RevocationReason.parse(str(form.get("reason") or "unspecified"))
        serial = normalize_serial(request.match_info["serial"])
        await services.revocation.revoke(serial, reason, actor=f"console:{actor}")
        return _see(f"{PREFIX}/certificates/{serial}")

    async def timeline(_request, actor, csrf, _form):
        t = await services.store.read(queries.timeline(services.clock.now()))
        return _html(pages.layout("Expiry timeline", pages.timeline(t), actor, csrf))

    def _pending_id(request) -> int:
        raw = request.match_info["pending_id"]
        if not raw.isdigit():
            raise BadRequest("a pending request id is an integer")
        return int(raw)

    async def pending(_request, actor, csrf, _form):
        rows = await services.store.list_pending("pending")
        return _html(pages.layout("Pending approvals", pages.pending(rows, csrf), actor, csrf))

    async def approve(request, actor, _csrf, _form):
        issued = await services.enrollment.approve_pending(_pending_id(request), f"console:{actor}")
        return _see(f"{PREFIX}/certificates/{issued.record.serial}")

    async def reject(request, actor, _csrf, form):
        reason = str(form.get("reason") or "").strip()
        if not reason or len(reason) > 500:
            raise BadRequest("reject needs a reason (1..500 characters)")
        await services.enrollment.reject_pending(_pending_id(request), reason, f"console:{actor}")
        return _see(f"{PREFIX}/pending")

    async def agents(_request, actor, csrf, _form):
        rows = await AgentInventory(services.store, services.clock).list(1000)
        body = pages.agents(rows, services.clock.now(), AGENT_SILENT_AFTER)
        return _html(pages.layout("Agents", body, actor, csrf))

    async def ca(_request, actor, csrf, _form):
        from ..ca import pki
        cert = services.ca_material.cert
        facts = [("Current CA", e(cert.subject.rfc4514_string())), ("CA id", f'<span class="mono">{e(services.authority.ca_id)}</span>'),
                 ("Valid until", when(cert.not_valid_after_utc))]
        nxt = await asyncio.to_thread(pki.load_next, services.config.state_dir)
        facts.append(("Next CA", e(f"{nxt.subject.rfc4514_string()} (from {nxt.not_valid_before_utc:%Y-%m-%d})")
                      if nxt is not None else "none staged"))
        if services.crl is not None:
            crl = await services.crl.current()
            facts += [("CRL number", e(crl.number)), ("CRL this update", when(crl.this_update)),
                      ("CRL next update", when(crl.next_update))]
        base = services.config.base_url.rstrip("/")
        facts.append(("OCSP responder", e(f"{base}/ocsp" + (" (delegated signer)" if services.config.ca.ocsp_delegated
                                                            else " (signed by the CA)"))
                      if services.ocsp is not None else "off"))
        return _html(pages.layout("CA status", pages.ca_status(facts), actor, csrf))

    async def audit(request, actor, csrf, _form):
        event = request.query.get("event", "").strip()[:64] or None
        records = await list_audit(services.store, event=event, limit=100)
        body = (f'<form class="filters" method="get" action="{PREFIX}/audit"><div><label for="f-event">Event</label>'
                f'<input id="f-event" name="event" value="{e(event)}"></div><div><button type="submit">Filter</button></div></form>'
                + pages.audit_table(records))
        return _html(pages.layout("Recent audit events", body, actor, csrf))

    async def css(_request):
        return web.Response(text=pages.CSS, content_type="text/css", headers={"Cache-Control": "max-age=3600"})

    async def bare(_request):
        return _see(f"{PREFIX}/")

    r = app.router
    r.add_get(PREFIX, bare)
    r.add_get(f"{PREFIX}/console.css", css)
    r.add_get(f"{PREFIX}/login", login_form)
    r.add_post(f"{PREFIX}/login", login)
    r.add_post(f"{PREFIX}/logout", page(logout, post=True))
    r.add_get(f"{PREFIX}/", page(home))
    r.add_get(f"{PREFIX}/certificates", page(inventory))
    r.add_get(f"{PREFIX}/certificates/{{serial:[^/]+}}.pem", page(pem))
    r.add_get(f"{PREFIX}/certificates/{{serial}}", page(detail))
    r.add_post(f"{PREFIX}/certificates/{{serial}}/revoke", page(revoke, post=True))
    r.add_get(f"{PREFIX}/timeline", page(timeline))
    r.add_get(f"{PREFIX}/pending", page(pending))
    r.add_post(f"{PREFIX}/pending/{{pending_id}}/approve", page(approve, post=True))
    r.add_post(f"{PREFIX}/pending/{{pending_id}}/reject", page(reject, post=True))
    r.add_get(f"{PREFIX}/agents", page(agents))
    r.add_get(f"{PREFIX}/ca", page(ca))
    r.add_get(f"{PREFIX}/audit", page(audit))
