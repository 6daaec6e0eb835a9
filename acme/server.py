"""ACME over HTTPS (aiohttp). One wrapper does every cross-cutting RFC 8555 duty: Replay-Nonce
on every response to a POST (errors included), Link rel="index", Cache-Control: no-store,
application/problem+json errors from the shared error table. Handlers stay thin."""
from __future__ import annotations

import json
import logging

from aiohttp import web

from scepd.errors import MalformedRequest, RateLimited, ScepdError, Unavailable, UnsupportedMediaType, mapping_for
from scepd.http_body import read_body
from scepd.ops.logctx import set_transaction_id
from scepd.ops.ratelimit import ACME_FAILED_VALIDATIONS_PER_ACCOUNT, ACME_NEW_ACCOUNTS_PER_ADDRESS, ACME_NEW_NONCES_PER_ADDRESS, ACME_NEW_ORDERS_PER_ACCOUNT, address_key

from . import jws
from .service import AcmeService, AcmeSettings, KeyConflict, problem

log = logging.getLogger("scepd.acme.http")
ACME = web.AppKey("acme", AcmeService)
MAX_BODY = 64 * 1024


def _base(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}/acme"


def _json(body: dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json",
                        headers=headers or {})


def _problem(err: ScepdError) -> web.Response:
    body = problem(err)
    headers = {"Retry-After": str(err.retry_after)} if isinstance(err, (RateLimited, Unavailable)) else None
    return web.Response(text=json.dumps(body), status=body["status"], content_type="application/problem+json",
                        headers=headers)


def _ts(t) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _order_json(base: str, o: dict) -> dict:
    out = {"status": o["status"], "expires": _ts(o["expires"]),
           "identifiers": o["identifiers"],
           "authorizations": [f"{base}/authz/{a['id']}" for a in o["authzs"]],
           "finalize": f"{base}/order/{o['id']}/finalize"}
    if o.get("profile"):
        out["profile"] = o["profile"]
    for field, column in (("notBefore", "not_before"), ("notAfter", "not_after")):
        if o.get(column):
            out[field] = _ts(o[column])
    if o.get("cert_serial"):
        out["certificate"] = f"{base}/cert/{o['cert_serial']}"
    if o.get("error"):
        out["error"] = json.loads(o["error"])
    return out


def _challenge_json(base: str, c: dict) -> dict:
    out = {"type": c["type"], "url": f"{base}/chall/{c['id']}", "token": c["token"], "status": c["status"]}
    if c.get("validated"):
        out["validated"] = c["validated"].isoformat().replace("+00:00", "Z")
    if c.get("error"):
        out["error"] = json.loads(c["error"])
    return out


def _authz_json(base: str, a: dict) -> dict:
    out = {"identifier": {"type": a["type"], "value": a["value"]}, "status": a["status"],
           "expires": _ts(a["expires"]),
           "challenges": [_challenge_json(base, c) for c in a["challenges"]]}
    if a.get("wildcard"):
        out["wildcard"] = True
    if a["status"] == "valid":  # RFC 8555 §7.1.4: only the challenge that was validated
        out["challenges"] = [c for c in out["challenges"] if c["status"] == "valid"]
    return out


def _account_json(base: str, acct: dict) -> dict:
    return {"status": acct["status"], "contact": json.loads(acct["contact"]),
            "orders": f"{base}/acct/{acct['id']}/orders"}


def add_routes(app: web.Application, services) -> None:
    cfg = services.config.acme
    service = AcmeService(services, AcmeSettings(
        http01_port=cfg.http01_port, tlsalpn01_port=cfg.tlsalpn01_port, resolve=cfg.resolve,
        dns_resolver=cfg.dns_resolver, terms_of_service=cfg.terms_of_service,
        eab_required=cfg.eab_required, default_profile=cfg.default_profile))
    app[ACME] = service
    limits = services.limits

    async def _resume(_app):
        if services.primary:  # once per server, not once per worker (scepd/http/workers.py)
            await service.resume()

    async def _close(_app):
        await service.close()
    app.on_startup.append(_resume)
    services.on_promote.append(service.resume)  # a reload's new primary, once the old one stopped
    app.on_cleanup.append(_close)

    def post(handler, *, jwk=False, allow_jwk=False):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            base = _base(request)
            if "/order/" in request.path:  # every log line of this request carries the order id
                set_transaction_id(request.match_info.get("id"))
            auth = None
            try:
                try:
                    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
                    if ctype != "application/jose+json":
                        raise UnsupportedMediaType("Content-Type must be application/jose+json")
                    body = await read_body(request, MAX_BODY)  # 413 problem above the cap
                    req = jws.parse(body)
                    auth = await service.open(req)  # BadNonce: forged or expired
                    await service.precheck(auth, str(request.url), jwk_required=jwk, allow_jwk=allow_jwk)
                    response = await handler(request, base, auth)
                    # a request that wrote nothing spends its nonce now (one small write unit)
                    err = await service.settle(auth)
                    if err is not None:
                        raise err
                except ScepdError as err:
                    err = await service.settle(auth, err)  # a used nonce is the answer
                    log.info("ACME %s refused: %s (%s)", request.path, mapping_for(err).acme_type, err.detail)
                    services.metrics.acme_problem(mapping_for(err).acme_type)
                    response = _problem(err)
            except Exception:  # never internal text; the log has the details
                log.exception("ACME %s failed", request.path)
                response = web.Response(text=json.dumps({
                    "type": "urn:ietf:params:acme:error:serverInternal",
                    "detail": "internal error", "status": 500}), status=500,
                    content_type="application/problem+json")
            response.headers["Replay-Nonce"] = await service.new_nonce()
            response.headers.add("Link", f'<{base}/directory>;rel="index"')
            response.headers["Cache-Control"] = "no-store"
            return response
        return wrapped

    async def directory(request: web.Request) -> web.Response:
        base = _base(request)
        meta = {"externalAccountRequired": service.settings.eab_required, "profiles": service.profiles()}
        if service.settings.terms_of_service:
            meta["termsOfService"] = service.settings.terms_of_service
        return _json({"newNonce": f"{base}/new-nonce", "newAccount": f"{base}/new-account",
                      "newOrder": f"{base}/new-order", "revokeCert": f"{base}/revoke-cert",
                      "keyChange": f"{base}/key-change", "renewalInfo": f"{base}/renewal-info",
                      "meta": meta})

    async def renewal_info(request: web.Request) -> web.Response:
        """Unauthenticated GET (RFC 9773)."""
        base = _base(request)
        try:
            body = await service.renewal_info(request.match_info["cert_id"])
        except ScepdError as err:
            resp = _problem(err)
        else:
            resp = _json(body, headers={"Retry-After": "21600"})
        resp.headers["Link"] = f'<{base}/directory>;rel="index"'
        return resp

    async def new_nonce(request: web.Request) -> web.Response:
        status = 200 if request.method == "HEAD" else 204
        link = f'<{_base(request)}/directory>;rel="index"'
        try:
            limits.acquire(ACME_NEW_NONCES_PER_ADDRESS, address_key(request.remote))
        except RateLimited as err:
            services.metrics.acme_problem(mapping_for(err).acme_type)
            resp = _problem(err)
            resp.headers.update({"Cache-Control": "no-store", "Link": link})
            return resp
        return web.Response(status=status, headers={
            "Replay-Nonce": await service.new_nonce(), "Cache-Control": "no-store", "Link": link})

    async def new_account(request, base, auth):
        address = address_key(request.remote)
        existing = await service.account_for_key(auth)
        if existing is None:  # no account holds this key: the request would create one
            limits.acquire(ACME_NEW_ACCOUNTS_PER_ADDRESS, address)
        created = False
        try:
            acct, created = await service.new_account(auth, existing)
        finally:
            if existing is None and not created:  # only accounts created count
                limits.refund(ACME_NEW_ACCOUNTS_PER_ADDRESS, address)
        return _json(_account_json(base, acct), status=201 if created else 200,
                     headers={"Location": f"{base}/acct/{acct['id']}"})

    async def account(request, base, auth):
        acct = await service.update_account(auth, request.match_info["id"])
        return _json(_account_json(base, acct), headers={"Location": f"{base}/acct/{acct['id']}"})

    async def account_orders(request, base, auth):
        ids, cursor = await service.orders_page(auth, request.match_info["id"], request.query.get("cursor"))
        headers = {}
        if cursor is not None:  # RFC 8555 §7.1.2.1: the next page
            headers["Link"] = f'<{base}/acct/{request.match_info["id"]}/orders?cursor={cursor}>;rel="next"'
        return _json({"orders": [f"{base}/order/{i}" for i in ids]}, headers=headers)

    async def key_change(request, base, auth):
        try:
            acct = await service.key_change(auth, str(request.url))
        except KeyConflict as exc:
            resp = _json({"type": "urn:ietf:params:acme:error:malformed",
                          "detail": "that key already belongs to an account", "status": 409}, status=409,
                         headers={"Location": f"{base}/acct/{exc.account_id}"})
            resp.content_type = "application/problem+json"
            return resp
        return _json(_account_json(base, acct), headers={"Location": f"{base}/acct/{acct['id']}"})

    async def new_order(request, base, auth):
        acquired = []

        def gate(acct):  # the rate limit, once the account is authenticated
            limits.acquire(ACME_NEW_ORDERS_PER_ACCOUNT, acct["id"])
            acquired.append(acct["id"])
        try:
            order = await service.new_order(  # `peek` before authentication counts nothing
                auth, gate, peek=lambda account_id: limits.allows(ACME_NEW_ORDERS_PER_ACCOUNT, account_id))
        except ScepdError:  # only orders created count
            for account_id in acquired:
                limits.refund(ACME_NEW_ORDERS_PER_ACCOUNT, account_id)
            raise
        return _json(_order_json(base, order), status=201, headers={"Location": f"{base}/order/{order['id']}"})

    async def order(request, base, auth):
        o = await service.order(auth, request.match_info["id"])
        headers = {"Retry-After": "1"} if o["status"] == "processing" else {}
        return _json(_order_json(base, o), headers=headers)

    async def finalize(request, base, auth):
        o = await service.finalize(auth, request.match_info["id"])
        headers = {"Location": f"{base}/order/{o['id']}"}
        if o["status"] == "processing":
            headers["Retry-After"] = "1"
        return _json(_order_json(base, o), headers=headers)

    async def authz(request, base, auth):
        req = auth.req
        if req.is_post_as_get:
            a = await service.authz(auth, request.match_info["id"])
        elif req.payload_json().get("status") == "deactivated":
            a = await service.deactivate_authz(auth, request.match_info["id"])
        else:
            raise MalformedRequest("an authorization can only be fetched or deactivated")
        headers = {"Retry-After": "1"} if a["status"] == "pending" else {}
        return _json(_authz_json(base, a), headers=headers)

    async def challenge(request, base, auth):
        req = auth.req
        if req.is_post_as_get:
            ch, a = await service.challenge(auth, request.match_info["id"])
        else:
            req.payload_json()  # {} to respond
            ch = await service.respond(  # validations that failed: `peek` before authentication
                auth, request.match_info["id"],  # (counts nothing), `gate` after it (refuses, counted)
                gate=lambda acct: limits.ensure(ACME_FAILED_VALIDATIONS_PER_ACCOUNT, acct["id"]),
                peek=lambda acct: limits.allows(ACME_FAILED_VALIDATIONS_PER_ACCOUNT, acct["id"]))
        headers = {"Link": f'<{base}/authz/{ch["authz_id"]}>;rel="up"'}
        if ch["status"] == "processing":
            headers["Retry-After"] = "1"
        resp = _json(_challenge_json(base, ch), headers=headers)
        return resp

    async def certificate(request, base, auth):
        pem = await service.certificate_pem(auth, request.match_info["serial"])
        return web.Response(body=pem.encode(), content_type="application/pem-certificate-chain")

    async def revoke(request, base, auth):
        await service.revoke(auth)
        return web.Response(status=200)

    r = app.router
    r.add_get("/acme/directory", directory)
    r.add_get("/acme/renewal-info/{cert_id}", renewal_info)
    r.add_route("HEAD", "/acme/new-nonce", new_nonce)
    r.add_get("/acme/new-nonce", new_nonce, allow_head=False)
    r.add_post("/acme/new-account", post(new_account, jwk=True))
    r.add_post("/acme/new-order", post(new_order))
    r.add_post("/acme/revoke-cert", post(revoke, allow_jwk=True))
    r.add_post("/acme/key-change", post(key_change))
    r.add_post("/acme/acct/{id}", post(account))
    r.add_post("/acme/acct/{id}/orders", post(account_orders))
    r.add_post("/acme/order/{id}", post(order))
    r.add_post("/acme/order/{id}/finalize", post(finalize))
    r.add_post("/acme/authz/{id}", post(authz))
    r.add_post("/acme/chall/{id}", post(challenge))
    r.add_post("/acme/cert/{serial}", post(certificate))


def add_admin_routes(app: web.Application, services) -> None:
    """ACME's part of the admin API: POST /api/v1/admin/eab creates an external account binding key."""
    from scepd.admin.http import PREFIX, admin_endpoint, json_body, ttl_param
    from scepd.errors import BadRequest

    async def create_eab(request: web.Request, actor: str) -> web.Response:
        body = await json_body(request)
        pattern = body.get("identifiers")
        if pattern is not None and not isinstance(pattern, str):
            raise BadRequest("ttl and identifiers are strings")
        ttl = ttl_param(body, "7d")
        kid, key = await AcmeService(services, AcmeSettings()).create_eab(ttl, pattern, f"admin-api:{actor}")
        return web.json_response({"kid": kid, "hmac_key": key, "identifiers": pattern}, status=201)

    app.router.add_post(f"{PREFIX}/eab", admin_endpoint(services, create_eab))
