"""Assembly of the operations services (CRL, OCSP, metrics) onto Services, and their HTTP routes.

Kept out of app.py so the shared factory only gains two calls. The HTTP handlers are thin:
bytes in, service call, bytes out.
"""
from __future__ import annotations

import datetime as dt

import base64
import binascii
import logging
import time

from aiohttp import web

from ..config import parse_duration
from ..ca.crl import CrlService, Signer
from ..errors import MalformedRequest, NotFound, PayloadTooLarge
from ..http_body import read_body
from .logctx import new_request_id, request_id, transaction_id
from .metrics import CONTENT_TYPE, Metrics
from ..ca.ocsp import MAX_REQUEST_BYTES, OcspResponder
from .accesslog import REQUEST_ID_KEY

log = logging.getLogger("scepd.ops")


def attach_ops(services, previous: list[tuple[object, object]] = ()) -> None:
    """Build services.crl / .ocsp / .metrics and hook them to revocation and issuance."""
    material = services.ca_material
    signers = [Signer(material.cert, material.key)] + [Signer(c, k) for c, k in previous]  # type: ignore[arg-type]
    crl_validity = parse_duration(services.config.ca.crl_validity)  # ConfigError if malformed
    services.metrics = Metrics(services.store, services.clock)
    services.crl = CrlService(services.store, services.clock, signers, crl_validity)
    delegate = None
    if services.config.ca.ocsp_delegated:
        from ..ca.ocsp import DelegatedResponder
        delegate = DelegatedResponder(services.config.state_dir / "ocsp", services.enrollment)
    ocsp_cfg = services.config.ocsp
    if ocsp_cfg.cache_size < 0:
        from ..config import ConfigError
        raise ConfigError(f"[ocsp] cache_size must be 0 or more, got {ocsp_cfg.cache_size}")
    services.ocsp = OcspResponder(services.store, services.clock, signers, delegate=delegate,
                                  cache_size=ocsp_cfg.cache_size,
                                  status_poll=parse_duration(ocsp_cfg.status_poll))
    services.crl.listeners.append(services.metrics.crl_published)
    services.revocation.listeners.append(services.ocsp.on_revocation)  # first: drops pre-signed "good"
    services.revocation.listeners.append(services.crl.on_revocation)
    services.revocation.listeners.append(services.metrics.on_revocation)
    services.enrollment.issued_listeners.append(services.metrics.issued)
    services.metrics.add_scrape_hook(_agents_seen(services))
    services.metrics.registry.register(_OcspCacheCollector(services.ocsp))
    services.scep.crl_provider = services.crl.current_der  # SCEP GetCRL
    services.limits.listeners.append(services.metrics.rate_limited)
    for name in services.limits.names():  # every enabled limit shows, at 0 until it refuses
        services.metrics.rate_limited_total.labels(limit=name)


def context_middleware(metrics: Metrics | None):
    """Request id + transaction id context for logs, and latency by route for metrics."""
    # the labelled children, looked up once: labels() costs a lock and a dict build per call, a
    # tenth of a cached OCSP response's CPU (bounded: endpoints are routes, methods are few)
    seconds: dict[tuple[str, str], object] = {}
    responses: dict[tuple[str, int], object] = {}

    def observe(endpoint: str, method: str, elapsed: float, status: int) -> None:
        hist = seconds.get((endpoint, method))
        if hist is None:
            hist = metrics.request_seconds.labels(endpoint=endpoint, method=method)  # type: ignore[union-attr]
            if len(seconds) < 1000:
                seconds[(endpoint, method)] = hist
        hist.observe(elapsed)  # type: ignore[attr-defined]
        counter = responses.get((endpoint, status))
        if counter is None:
            counter = metrics.responses.labels(endpoint=endpoint, status=str(status))  # type: ignore[union-attr]
            if len(responses) < 1000:
                responses[(endpoint, status)] = counter
        counter.inc()  # type: ignore[attr-defined]

    @web.middleware
    async def middleware(request: web.Request, handler):
        rid = request_id.set(new_request_id())
        request[REQUEST_ID_KEY] = request_id.get()  # for the access log line, written after
        tid = transaction_id.set(None)
        started = time.monotonic()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            if metrics is not None:
                info = request.match_info
                resource = info.route.resource if info is not None and info.route else None
                endpoint = resource.canonical if resource is not None else "unmatched"
                observe(endpoint, request.method, time.monotonic() - started, status)
            transaction_id.reset(tid)
            request_id.reset(rid)

    return middleware


def add_ops_routes(app: web.Application, services) -> None:
    """Plain-HTTP routes: /crl/<ca-id>.crl, /ocsp (GET and POST), /metrics."""
    app.middlewares.append(context_middleware(services.metrics))
    crl: CrlService = services.crl
    responder: OcspResponder = services.ocsp
    metrics: Metrics = services.metrics

    async def get_crl(request: web.Request) -> web.Response:
        try:
            published = await crl.current(request.match_info["ca_id"])
        except NotFound:
            raise web.HTTPNotFound(text="unknown CA\n") from None
        except Exception:
            log.exception("CRL unavailable")
            return web.Response(status=503, text="CRL temporarily unavailable\n",
                                headers={"Retry-After": "30"})
        remaining = int((published.next_update - services.clock.now()).total_seconds())
        headers = {"Cache-Control": f"public, max-age={max(0, min(remaining, 3600))}",
                   "Last-Modified": published.this_update.strftime("%a, %d %b %Y %H:%M:%S GMT"),
                   "Expires": published.next_update.strftime("%a, %d %b %Y %H:%M:%S GMT")}
        return web.Response(body=published.der, content_type="application/pkix-crl", headers=headers)

    counters: dict[str, object] = {}  # status -> its bound counter (labels() is a lookup and a lock)

    def _count(status: str) -> None:
        counter = counters.get(status)
        if counter is None:
            counter = counters[status] = metrics.ocsp_responses.labels(status=status)
        counter.inc()  # type: ignore[attr-defined]

    async def _answer(der: bytes, if_none_match: str | None = None) -> web.Response:
        answer = await responder.respond(der)
        _count(answer.status)
        if not answer.max_age:  # errors, and responses carrying the client's nonce
            return web.Response(body=answer.der, content_type="application/ocsp-response",
                                headers={"Cache-Control": "no-cache, no-store"})
        # RFC 5019 §6.2: max-age below nextUpdate, Last-Modified thisUpdate, Expires nextUpdate,
        # ETag a hash of the response
        headers = {"Content-Type": "application/ocsp-response",
                   "Cache-Control": f"public, max-age={answer.max_age}, no-transform, must-revalidate",
                   "Last-Modified": answer.last_modified, "Expires": answer.expires, "ETag": answer.etag}
        if if_none_match is not None and if_none_match == answer.etag:
            del headers["Content-Type"]
            return web.Response(status=304, headers=headers)
        return web.Response(body=answer.der, headers=headers)

    async def ocsp_post(request: web.Request) -> web.Response:
        content = request.content
        if content.is_eof() and (request.content_length or 0) <= MAX_REQUEST_BYTES:
            # the whole (small) body came with the headers: take it without a timer and two reads
            body = content.read_nowait(-1)
            if len(body) <= MAX_REQUEST_BYTES:
                return await _answer(body)
            return web.Response(status=413, text=f"request body over {MAX_REQUEST_BYTES} bytes\n",
                                content_type="text/plain")
        try:
            body = await read_body(request, MAX_REQUEST_BYTES)
        except PayloadTooLarge as err:
            return web.Response(status=413, text=err.detail + "\n", content_type="text/plain")
        except MalformedRequest:
            body = b""  # answered malformedRequest
        return await _answer(body)

    async def ocsp_get(request: web.Request) -> web.Response:
        text = request.match_info["request"].strip()
        text = text.replace(" ", "+").replace("-", "+").replace("_", "/")
        try:
            der = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            der = b""
        return await _answer(der, request.headers.get("If-None-Match"))

    app.router.add_get("/crl/{ca_id}.crl", get_crl)
    app.router.add_post("/ocsp", ocsp_post)
    app.router.add_get("/ocsp/{request:.+}", ocsp_get)
    if not metrics_on_admin(services.config):
        add_metrics_route(app, services)


def metrics_on_admin(config) -> bool:
    """[server] metrics_on_admin with an admin listener: /metrics is served there only."""
    return bool(config.server.admin and config.server.metrics_on_admin)


def add_metrics_route(app: web.Application, services) -> None:
    """GET /metrics: the plain-HTTP listener's, or the admin listener's ([server] metrics_on_admin)."""
    metrics: Metrics = services.metrics

    async def get_metrics(_request: web.Request) -> web.Response:
        try:
            body = await metrics.render()
        except Exception:
            log.exception("metrics scrape failed")
            return web.Response(status=503, text="metrics temporarily unavailable\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/metrics", get_metrics)


def add_https_context(app: web.Application, services) -> None:
    """The HTTPS listener gets the same log context and latency metrics."""
    app.middlewares.append(context_middleware(getattr(services, "metrics", None)))


def _agents_seen(services):
    """scepd_agents_seen{within}: agents whose last mTLS check-in is recent."""
    from .agents import AgentInventory

    inventory = AgentInventory(services.store, services.clock)

    async def hook(metrics: Metrics) -> None:
        now = services.clock.now()
        for within, delta in (("1h", dt.timedelta(hours=1)), ("24h", dt.timedelta(hours=24))):
            metrics.agents_seen.labels(within=within).set(await inventory.count_seen_since(now - delta))
    return hook


class _OcspCacheCollector:
    """scepd_ocsp_cache_entries and scepd_ocsp_cache_events{event}, read at scrape time only
    (nothing on the request path), of the process answering the scrape (gauges, so that they
    also show with `serve --workers N`): hit = served pre-signed; signed = signatures made
    (pre-signed or for a request with a nonce); rechecked = a cached response whose status was
    read again (unknown serials, or after another process revoked something); poll = revocation
    counter reads. All counted since the process started."""

    def __init__(self, responder: OcspResponder):
        self.responder = responder

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        yield GaugeMetricFamily("scepd_ocsp_cache_entries", "Pre-signed OCSP responses held",
                                value=self.responder.cache_len())
        events = GaugeMetricFamily("scepd_ocsp_cache_events",
                                   "Pre-signed OCSP response cache events since this process started",
                                   labels=["event"])
        for event, count in self.responder.stats.items():
            events.add_metric([event], count)
        yield events
