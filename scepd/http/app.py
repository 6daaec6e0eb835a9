"""Assembly: open the store, load the CA, build the services, and the aiohttp app factory.
The protocol front-ends (acme/) and the ordered migrations come from scepd.http.assembly.

The factory only assembles; every acquired resource is released by cleanup_ctx.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from ..ca import pki
from ..ca.authority import CertificateAuthority
from ..enroll.challenges import ChallengeService
from ..clock import Clock, SystemClock
from ..enroll.challenges import clean_names
from ..config import Config, parse_duration
from ..enroll.enrollment import EnrollmentService
from ..enroll.external_check import ExternalCheck
from ..enroll.pipeline import Pipeline, approval_policy
from ..ca.policy import KeyLimits, profile_named, subject_policy
from ..ops.ratelimit import RateLimiter
from ..enroll.renewal import RenewalPolicy, RenewalSettings
from cryptography.hazmat.primitives.asymmetric import rsa
from ..ca.revocation import RevocationService
from ..scep import wire
from ..scep.service import ScepService, ScepSettings
from ..scep.transport import ScepHandler, add_routes
from ..est.service import EstService, EstSettings
from ..config import ConfigError
from ..errors import ScepdError
from ..store import SqlStore
from ..ops.routes import add_https_context, add_ops_routes, attach_ops
from ..ops.retention import CORE_PURGES, RetentionService, RetentionSettings
from ..admin.http import add_admin_routes
from ..console.routes import add_console_routes
from .assembly import frontends, migrations

if TYPE_CHECKING:
    from ..ca.crl import CrlService
    from ..ops.metrics import Metrics
    from ..ca.ocsp import OcspResponder

import datetime as dt


@dataclass
class Services:
    config: Config
    clock: Clock
    store: SqlStore
    ca_material: pki.CaMaterial
    authority: CertificateAuthority
    challenges: ChallengeService
    enrollment: EnrollmentService
    scep: ScepService
    revocation: RevocationService
    #: the one enrollment path of every protocol (scepd/pipeline.py)
    pipeline: Pipeline | None = None
    #: EST (RFC 7030) on the HTTPS listener (scepd/est/)
    est: EstService | None = None
    crl: "CrlService | None" = None  # set by ops.attach_ops
    ocsp: "OcspResponder | None" = None
    metrics: "Metrics | None" = None
    #: rate limits of SCEP and ACME (scepd/ratelimit.py, [limits])
    limits: RateLimiter = dataclasses.field(default_factory=RateLimiter.disabled)
    #: purges what expired (scepd/ops/retention.py); run by the primary worker
    retention: "RetentionService | None" = None
    #: this process runs the once-per-server jobs (start-up resumes, server certificate
    #: renewal): always with one process, worker 0 with `serve --workers N`
    primary: bool = True
    #: the once-per-server jobs to run when this process becomes the primary after it started
    #: (a reload's new worker 0 once the old one stopped): async callables, e.g. ACME's resume
    on_promote: list = dataclasses.field(default_factory=list)

    async def promote(self) -> None:
        """Become the primary: run the once-per-server jobs a start as the primary runs."""
        self.primary = True
        for job in list(self.on_promote):
            await job()

    async def close(self) -> None:
        await self.store.close()


def passphrase_for(config: Config) -> bytes | None:
    env = config.ca.key_passphrase_env
    value = os.environ.get(env) if env else None
    return value.encode() if value else None


async def open_services(config: Config, clock: Clock | None = None) -> Services:
    clock = clock or SystemClock()
    limits = RateLimiter.from_config(config.limits, clock)  # ConfigError before anything opens
    retention_settings = RetentionSettings.from_config(config.retention)
    material = pki.load(config.state_dir, passphrase_for(config))
    store = await SqlStore.open(config.database_url, migrations())
    try:
        authority = CertificateAuthority(material, config.base_url)
        challenges = ChallengeService(store, clock, config.scep.static_challenge,
                                      config.scep.challenge_required,
                                      clean_names(config.scep.static_challenge_names))
        sc, pc = config.scep, config.policy
        enrollment = EnrollmentService(authority, store, clock, parse_duration(config.ca.default_validity),
                                       duplicate_subjects=sc.duplicate_subjects,
                                       key_limits=KeyLimits(config.policy.max_rsa_bits),
                                       subject_policy=subject_policy(config))
        ra = pki.load_ra(config.state_dir, passphrase_for(config))
        previous = pki.load_previous(config.state_dir, passphrase_for(config))
        renewal = RenewalPolicy(store, [material.cert] + [c for c, _ in previous],
                                RenewalSettings(grace=parse_duration(sc.renewal_grace),
                                                allow_same_key=sc.renewal_same_key))
        next_ca = pki.load_next(config.state_dir)
        skew = config.scep.max_clock_skew
        external_check = ExternalCheck(pc.csr_check_command, pc.csr_check_url, pc.csr_check_timeout,
                                       pc.csr_check_allow_http)
        pipeline = Pipeline(enrollment, external_check, approval_policy(config),
                            {"scep": config.scep.profile, "acme": config.acme.default_profile,
                             "est": config.est.profile},
                            renewal_profile=pc.renewal_profile)
        scep = ScepService(material, enrollment, challenges, profile_named(config.scep.profile), clock,
                           ScepSettings(legacy_algorithms=config.scep.legacy_algorithms,
                                        getcacert_chain=config.scep.getcacert_chain,
                                        advertise_post=config.scep.advertise_post,
                                        max_clock_skew=dt.timedelta(seconds=skew) if skew else None,
                                        key_limits=enrollment.key_limits),
                           ra=wire.Recipient(*ra) if ra else None, renewal=renewal,
                           external_check=external_check, pipeline=pipeline,
                           next_ca=(next_ca,) if next_ca else (),
                           previous_recipients=tuple(wire.Recipient(c, k) for c, k in previous
                                                     if isinstance(k, rsa.RSAPrivateKey)))
        est = EstService(material, pipeline, challenges, renewal, clock, _est_settings(config))
    except Exception:
        await store.close()
        raise
    services = Services(config, clock, store, material, authority, challenges, enrollment, scep,
                        RevocationService(store, clock), pipeline=pipeline, limits=limits, est=est)
    # renewals that supersede (duplicate_subjects = revoke) notify the same listeners
    enrollment.revocation_listeners = services.revocation.listeners
    try:
        attach_ops(services, previous)
    except Exception:
        await store.close()
        raise
    services.retention = RetentionService(store, clock, retention_settings,
                                          CORE_PURGES + tuple(p for f in frontends() for p in f.purges()))
    if services.metrics is not None:
        metrics = services.metrics
        services.retention.listeners.append(lambda kind, n: metrics.retention_purged_total.labels(kind=kind).inc(n))
    return services


def _est_settings(config: Config) -> EstSettings:
    """`[est]`; ConfigError naming what is wrong."""
    try:
        profile_named(config.est.profile)
        return EstSettings.parse(config.est.labels, config.est.serverkeygen_key, config.est.csr_attributes,
                                 config.est.retry_after)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except ScepdError as exc:  # an unknown [est] profile
        raise ConfigError(f"[est] profile: {exc.detail}") from None


SERVICES = web.AppKey("services", Services)

#: aiohttp limits the request line to 8190 bytes by default; a GET PKIOperation with a 4096-bit
#: key and a long SAN list is larger than that. 64 KiB covers real requests and stays bounded.
HTTP_HANDLER_ARGS = {"max_line_size": 65536, "max_field_size": 16384}


def create_app(services: Services, close_services: bool = False) -> web.Application:
    app = web.Application(client_max_size=max(services.config.scep.max_body_bytes, 1024))
    app[SERVICES] = services
    add_routes(app, ScepHandler(services.scep, services.config.scep.max_body_bytes,
                                observer=services.metrics.scep_observer if services.metrics else None,
                                limits=services.limits))
    add_ops_routes(app, services)
    ca_id = services.authority.ca_id
    ca_der = services.ca_material.cert.public_bytes(serialization.Encoding.DER)

    async def ca_cert(request: web.Request) -> web.Response:
        if request.match_info["ca_id"] != ca_id:
            raise web.HTTPNotFound(text="unknown CA\n")
        return web.Response(body=ca_der, content_type="application/pkix-cert")

    app.router.add_get("/ca/{ca_id}.crt", ca_cert)

    _common_routes(app, services)
    if services.retention is not None and services.retention.settings.interval:
        _run_retention(app, services)
    if close_services:
        _close_on_cleanup(app, services)
    return app


def _run_retention(app: web.Application, services: Services) -> None:
    """The retention schedule while the app runs: the first run one interval after start, and
    each run only in the primary worker (which a reload may hand to another process)."""
    retention = services.retention
    assert retention is not None and retention.settings.interval is not None

    async def _lifetime(_app: web.Application):
        stop = asyncio.Event()

        async def loop():
            try:
                await asyncio.wait_for(stop.wait(), retention.settings.interval.total_seconds())
            except asyncio.TimeoutError:
                await retention.run_forever(stop, lambda: services.primary)
        task = asyncio.create_task(loop())
        yield
        stop.set()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    app.cleanup_ctx.append(_lifetime)


def _close_on_cleanup(app: web.Application, services: Services) -> None:
    async def _lifetime(_app: web.Application):
        yield
        await services.close()
    app.cleanup_ctx.append(_lifetime)


def _common_routes(app: web.Application, services: Services) -> None:
    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        try:
            await services.store.ping()
        except Exception:
            return web.Response(status=503, text="store unreachable\n")
        try:
            await _ca_key_signs(services)
        except Exception:
            return web.Response(status=503, text="CA key unusable\n")
        return web.Response(text="ready\n")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


async def _ca_key_signs(services: Services) -> None:
    """readyz: the issuing CA key signs, and the signature verifies with the CA certificate."""
    import asyncio

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    def _check() -> None:
        key, cert, data = services.ca_material.key, services.ca_material.cert, b"scepd readyz"
        if isinstance(key, rsa.RSAPrivateKey):
            sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
            cert.public_key().verify(sig, data, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[call-arg]
        else:
            sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
            cert.public_key().verify(sig, data, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
        ra = getattr(services.scep, "ra", None)
        if ra is not None and hasattr(ra.key, "ping"):  # an RA key in a PKCS#11 token too
            ra.key.ping()
    await asyncio.to_thread(_check)


#: scepd's own HTTPS routes, a callable(app, services) each; protocol front-ends (acme/) come
#: from scepd.http.assembly.frontends().
HTTPS_ROUTES: list = []
#: the admin API and the web console (scepd/console): on the admin listener when [server] admin is set,
#: else on the HTTPS listener
ADMIN_ROUTES: list = [add_admin_routes, add_console_routes]
#: Packages that serve on the mTLS listener (agent API) append a callable(app, services).
MTLS_ROUTES: list = []


def add_est_routes(app: web.Application, services: Services) -> None:
    """EST (RFC 7030) under /.well-known/est/: HTTPS only, it reads the TLS client certificate."""
    from ..est.transport import EstHandler, add_routes as add_est
    from .tls import peer_certificate

    if services.est is None:
        return
    metrics = services.metrics
    add_est(app, EstHandler(services.est, services.config.est.max_body_bytes,
                            observer=metrics.est_observer if metrics else None, limits=services.limits,
                            peer_certificate=peer_certificate))


HTTPS_ROUTES.append(add_est_routes)

from ..ops.agents import add_checkin_route  # noqa: E402  (agent inventory: its migrations + check-in route)

MTLS_ROUTES.append(add_checkin_route)


def create_https_app(services: Services) -> web.Application:
    """The HTTPS listener: ACME (acme/) mounts here, and the admin API unless [server] admin
    gives it a listener of its own."""
    app = web.Application(client_max_size=256 * 1024)
    app[SERVICES] = services
    add_https_context(app, services)
    _common_routes(app, services)
    _root_routes(app, services)
    for add in HTTPS_ROUTES:
        add(app, services)
    for frontend in frontends():
        if frontend.https_routes is not None:
            frontend.https_routes(app, services)
    if not services.config.server.admin:
        _admin_routes(app, services)
    return app


def _admin_routes(app: web.Application, services: Services) -> None:
    for add in ADMIN_ROUTES:
        add(app, services)
    for frontend in frontends():
        if frontend.admin_routes is not None:
            frontend.admin_routes(app, services)


def create_admin_app(services: Services) -> web.Application:
    """The private admin listener ([server] admin): the admin API with the same TLS and
    authentication as on the HTTPS listener, /healthz, /readyz, and /metrics when
    [server] metrics_on_admin is set."""
    from ..ops.routes import add_metrics_route, metrics_on_admin
    app = web.Application(client_max_size=256 * 1024)
    app[SERVICES] = services
    add_https_context(app, services)
    _common_routes(app, services)
    _admin_routes(app, services)
    if metrics_on_admin(services.config) and services.metrics is not None:
        add_metrics_route(app, services)
    return app


def _root_routes(app: web.Application, services: Services) -> None:
    """Trust bootstrap for HTTPS clients (the agent's ACME mode, like `step ca bootstrap`): fetch
    the root over an unverified connection, keep it only if its SHA-256 fingerprint is the one
    pinned out of band, then verify every later connection against it."""
    import hashlib

    roots = [services.ca_material.root]
    pem = "".join(r.public_bytes(serialization.Encoding.PEM).decode() for r in roots)
    by_fp = {hashlib.sha256(r.public_bytes(serialization.Encoding.DER)).hexdigest(): r for r in roots}

    async def all_roots(_request: web.Request) -> web.Response:
        return web.Response(text=pem, content_type="application/x-pem-file")

    async def one_root(request: web.Request) -> web.Response:
        fp = request.match_info["fp"].lower().replace(":", "")
        root = by_fp.get(fp)
        if root is None:
            raise web.HTTPNotFound(text="no root with that SHA-256 fingerprint\n")
        return web.Response(text=root.public_bytes(serialization.Encoding.PEM).decode(),
                            content_type="application/x-pem-file")

    app.router.add_get("/roots.pem", all_roots)
    app.router.add_get("/root/{fp}", one_root)


def create_mtls_app(services: Services) -> web.Application:
    """The mutual-TLS listener: every request carries a client certificate from our CA that is
    in the inventory and not revoked (see scepd.http.tls for the rule)."""
    from .tls import PEER, mtls_gate

    app = web.Application(client_max_size=64 * 1024, middlewares=[mtls_gate(services.store)])
    app[SERVICES] = services

    async def whoami(request: web.Request) -> web.Response:
        peer = request[PEER]
        return web.json_response({"serial": peer.serial, "subject": peer.subject})

    app.router.add_get("/api/v1/whoami", whoami)
    for add in MTLS_ROUTES:
        add(app, services)
    return app
