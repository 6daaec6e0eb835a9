"""The `scepd` command line. Every command calls the same services the server uses."""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import __version__, config as config_mod
from .ca import pki
from .http import eventloop
from .http.assembly import frontends, open_store
from .cli_support import STATE_DIR, CliHost, fail, load_config, serial_argument, with_services, with_store
from .clock import SystemClock
from .config import ConfigError, parse_duration
from .render import cert_json, pending_json, serial_key

_fail = fail
_load_config = load_config


def _setup_logging(cfg: config_mod.Config, verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else getattr(logging, cfg.server.log_level.upper(), logging.INFO)
    from .ops.logctx import ContextFilter, JsonFormatter, TextFormatter
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())  # request id and transaction id on every record
    handler.setFormatter(JsonFormatter() if cfg.server.log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # no formatter here prints a record's thread or process: do not look them up for every line
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def _open_services(cfg: config_mod.Config):
    from .http.app import open_services
    try:
        return await open_services(cfg)
    except pki.PkiError as exc:
        fail(str(exc))


@click.group()
@click.version_option(__version__, prog_name="scepd")
@click.pass_context
def main(ctx: click.Context) -> None:
    """scepd: certificate enrollment server (SCEP) with its own CA."""
    if ctx.obj is None:  # what every subcommand (and a front-end's) opens the store and services with
        ctx.obj = CliHost(open_services=_open_services, open_store=open_store)


# --- init -------------------------------------------------------------------------------------


#: The root key's passphrase (init, serve's first start, `ca rollover`); never the CA key's.
ROOT_PASSPHRASE_ENV = "SCEPD_ROOT_KEY_PASSPHRASE"


def _interactive() -> bool:
    return sys.stdin.isatty()


@dataclass(frozen=True)
class RootKeyPlan:
    """Where `init` writes the root key and with which passphrase (None: unencrypted)."""
    path: Path | None  # None: DIR/ca/root.key
    passphrase: bytes | None
    generated: bool = False  # serve's first start made it up: print it once


def _init(state_dir: Path, cn: str, org: str | None, http: str | None, import_cert: Path | None,
          import_key: Path | None, import_chain: Path | None, import_passphrase_env: str | None,
          ra: bool = False, ca_key_type: str = "rsa",
          root_key: RootKeyPlan | None = None, key_uris: dict | None = None) -> pki.CaMaterial:
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    cfg_path = state_dir / config_mod.CONFIG_NAME
    if not cfg_path.exists():
        cfg_path.write_text(config_mod.render_default(http or "127.0.0.1:8080"))
    cfg = _load_config(state_dir)
    from .http.app import passphrase_for
    passphrase = passphrase_for(cfg)
    ca_key_uri = (key_uris or {}).get("create", {}).get("ca_key_uri")
    if import_cert or import_key or import_chain:
        if not (import_cert and (import_key or ca_key_uri) and import_chain):
            _fail("--import-ca-cert, --import-ca-key (or --ca-key-uri) and --import-chain go together")
        import_pass = os.environ.get(import_passphrase_env or "", "").encode() or None
        material = pki.import_ca(state_dir, import_cert.read_bytes(),
                                 import_key.read_bytes() if import_key else None,
                                 import_chain.read_bytes(), import_pass, passphrase,
                                 key_uri=None if import_key else ca_key_uri)
    else:
        root_key = root_key or RootKeyPlan(None, None)
        material = pki.create(state_dir, SystemClock(), cn=cn, org=org, passphrase=passphrase,
                              ca_key_type=ca_key_type, root_passphrase=root_key.passphrase,
                              root_key_path=root_key.path, **(key_uris or {}).get("create", {}))
    if ra:
        pki.create_ra(state_dir, material, SystemClock(), passphrase, cn=f"{cn} SCEP RA", org=org,
                      key_uri=(key_uris or {}).get("ra"))
    elif not isinstance(material.key, __import__("cryptography.hazmat.primitives.asymmetric.rsa",
                                                 fromlist=["rsa"]).RSAPrivateKey):
        _fail("an EC issuing CA cannot decrypt SCEP requests: add --ra")

    async def _db() -> None:
        store = await open_store(cfg.database_url)
        await store.close()
    asyncio.run(_db())
    return material


def _new_root_passphrase(insecure: bool) -> bytes | None:
    """$SCEPD_ROOT_KEY_PASSPHRASE, else asked twice on a terminal; without either, init refuses
    (a script must say what it wants) unless --insecure-unencrypted-root-key."""
    value = os.environ.get(ROOT_PASSPHRASE_ENV)
    if value:
        return value.encode()
    if insecure:
        return None
    if _interactive():
        value = click.prompt("Passphrase for the root CA key", hide_input=True,
                             confirmation_prompt=True, err=True)
        if not value:
            _fail("the root key passphrase must not be empty")
        return value.encode()
    _fail(f"the root CA key needs a passphrase and there is no terminal to ask for one: set "
          f"{ROOT_PASSPHRASE_ENV}, run init on a terminal, or pass --insecure-unencrypted-root-key "
          "(test setups only)")
    raise AssertionError  # unreachable


def _announce_root_key(state_dir: Path, plan: RootKeyPlan, err: bool = True) -> None:
    """Loud: the root key belongs offline (on stderr for init; serve says it on stdout, with its
    one-time challenge, since its stderr is the log stream, JSON lines with log_format = json)."""
    path = plan.path or pki.ca_dir(state_dir) / "root.key"
    if not plan.passphrase:
        click.echo(f"WARNING: the root CA key {path} is NOT encrypted (--insecure-unencrypted-root-key): "
                   "test setups only.", err=err)
    if plan.generated:
        click.echo(f"Passphrase of the root CA key (shown once; {ROOT_PASSPHRASE_ENV} was not set): "
                   f"{plan.passphrase.decode()}", err=err)  # type: ignore[union-attr]
    where = "" if plan.path is None else f"; none is kept in {state_dir}"
    click.echo(f"IMPORTANT: the root CA key is in {path}{where}. It belongs OFFLINE: move it to offline "
               "storage now (its passphrase kept apart). Only `scepd ca rollover --root-key FILE` needs it, "
               "to sign the next issuing CA.", err=err)


@main.command()
@STATE_DIR
@click.option("--cn", default="scepd", show_default=True, help="Base name of the CA subjects.")
@click.option("--org", default=None, help="Organization (O=) of the CA subjects.")
@click.option("--http", default=None, help="Listen address written to the config (host:port).")
@click.option("--import-ca-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--import-ca-key", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--import-chain", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="PEM chain of the imported CA up to and including the root.")
@click.option("--import-key-passphrase-env", default=None,
              help="Environment variable holding the imported key's passphrase.")
@click.option("--ra", is_flag=True, help="Also create a separate RSA SCEP RA certificate and key.")
@click.option("--ca-key-type", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True,
              help="Issuing CA key (ec needs --ra: SCEP decryption is RSA).")
@click.option("--root-key-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the (encrypted) root key to this file, outside the state directory, "
                   "instead of DIR/ca/root.key.")
@click.option("--insecure-unencrypted-root-key", is_flag=True,
              help=f"Write the root key unencrypted when {ROOT_PASSPHRASE_ENV} is not set (tests only).")
@click.option("--ca-key-bits", type=click.Choice(["2048", "3072"]), default="2048", show_default=True,
              help="Size of an RSA issuing CA key.")
@click.option("--ca-key-uri", default=None, metavar="PKCS11-URI",
              help="Keep the issuing CA key in a PKCS#11 token (RFC 7512 URI; created unless it exists; "
                   "with --import-ca-cert: the imported CA's key, already in the token).")
@click.option("--ra-key-uri", default=None, metavar="PKCS11-URI", help="The RA key in a token (implies --ra).")
@click.option("--root-key-uri", default=None, metavar="PKCS11-URI", help="The root CA key in a token.")
def init(state_dir, cn, org, http, import_ca_cert, import_ca_key, import_chain, import_key_passphrase_env,
         ra, ca_key_type, root_key_out, insecure_unencrypted_root_key, ca_key_bits=2048, ca_key_uri=None,
         ra_key_uri=None, root_key_uri=None):
    """Create a two-tier CA (or import one) in STATE_DIR.

    The root key is encrypted with $SCEPD_ROOT_KEY_PASSPHRASE, or with a passphrase asked on the
    terminal; without a terminal and that variable, init refuses."""
    ra = ra or bool(ra_key_uri)
    if ca_key_type == "ec" and not ra:
        _fail("--ca-key-type ec needs --ra: SCEP clients encrypt requests with RSA key transport")
    importing = bool(import_ca_cert or import_ca_key or import_chain)
    plan = None
    if importing and (root_key_out or insecure_unencrypted_root_key):
        _fail("--root-key-out and --insecure-unencrypted-root-key are about a new root; an imported CA "
              "brings no root key")
    if not importing:
        if pki.exists(state_dir):
            _fail(f"a CA already exists in {pki.ca_dir(state_dir)}; refusing to overwrite it")
        if root_key_out is not None:
            out = root_key_out.absolute()
            if out.resolve().is_relative_to(state_dir.absolute().resolve()):
                _fail(f"--root-key-out {root_key_out} is inside the state directory; the point is "
                      "to keep the root key out of it")
            if os.path.lexists(out):
                _fail(f"{root_key_out} already exists; refusing to overwrite a private key")
            root_key_out = out
        if root_key_uri is None:
            plan = RootKeyPlan(root_key_out, _new_root_passphrase(insecure_unencrypted_root_key))
        elif root_key_out is not None:
            _fail("--root-key-out and --root-key-uri are two places for the same key: choose one")
    if importing and (root_key_uri or (ca_key_uri and import_ca_key)):
        _fail("an imported CA brings its key: --import-ca-key FILE or --ca-key-uri (a key already "
              "in the token), and no root key")
    key_uris = {"create": {"ca_key_uri": ca_key_uri, "root_key_uri": root_key_uri,
                           "ca_bits": int(ca_key_bits)}, "ra": ra_key_uri}
    try:
        material = _init(state_dir, cn, org, http, import_ca_cert, import_ca_key, import_chain,
                         import_key_passphrase_env, ra, ca_key_type, plan, key_uris)
    except pki.PkiError as exc:
        _fail(str(exc))
        return
    d = pki.ca_dir(state_dir)
    click.echo(f"CA ready in {d}")
    click.echo(f"  issuing CA: {material.cert.subject.rfc4514_string()}")
    click.echo(f"  root:       {material.root.subject.rfc4514_string()}")
    click.echo(f"  root SHA-256 fingerprint: {_fingerprint(material.root)}")
    if plan is not None:
        _announce_root_key(state_dir, plan)
    for what, uri in (("issuing CA", ca_key_uri), ("RA", ra_key_uri), ("root CA", root_key_uri)):
        if uri:
            click.echo(f"  {what} key: in the PKCS#11 token ({uri.split('?')[0]})")


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()


# --- serve ------------------------------------------------------------------------------------


@main.command()
@STATE_DIR
@click.option("--http", default=None, help="host:port for SCEP over HTTP (default from config).")
@click.option("--https", default=None, help="host:port for the HTTPS listener (ACME, admin API).")
@click.option("--mtls", default=None, help="host:port for the mutual-TLS agent listener.")
@click.option("--admin", default=None,
              help="host:port for a private admin listener (admin API over TLS; then not on --https).")
@click.option("--demo-challenge/--no-demo-challenge", default=True, show_default=True,
              help="Print a fresh one-time challenge (valid 1 hour) at start.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Worker processes (default [server] workers; 0 = one per CPU core; 1 = no fork).")
@click.option("-v", "--verbose", is_flag=True)
def serve(state_dir, http, https, mtls, admin, demo_challenge, workers, verbose):
    """Serve SCEP (and HTTPS/mTLS when asked); initialises a CA first if STATE_DIR has none."""
    if not pki.exists(state_dir):
        # first start (scripts/serve on a fresh machine): the root key is encrypted with
        # $SCEPD_ROOT_KEY_PASSPHRASE, else with a random passphrase printed once (as step-ca's
        # container does); either way it must then be moved offline.
        value = os.environ.get(ROOT_PASSPHRASE_ENV)
        plan = RootKeyPlan(None, value.encode()) if value else \
            RootKeyPlan(None, secrets.token_urlsafe(24).encode(), generated=True)
        try:
            _init(state_dir, "scepd", None, http, None, None, None, None, root_key=plan)
        except pki.PkiError as exc:
            _fail(str(exc))
        click.echo(f"initialised a new CA in {pki.ca_dir(state_dir)}")
        _announce_root_key(state_dir, plan, err=False)
    cfg = _load_config(state_dir)
    reloader = _Reloader(cfg, verbose)
    for key, value in (("http", http), ("https", https), ("mtls", mtls), ("admin", admin)):
        if value:
            setattr(cfg.server, key, value)
    if workers is not None:
        cfg.server.workers = workers
    try:
        _check_listeners(cfg)
        eventloop.loop_factory(cfg.server.event_loop)  # uvloop missing: one line now, not one a worker
    except ConfigError as exc:
        _fail(str(exc))
    count = cfg.server.workers or os.cpu_count() or 1
    _setup_logging(cfg, verbose)
    if count > 1:
        _serve_workers(cfg, demo_challenge, count, reloader)
        return
    reason = _serve_error(lambda: eventloop.run(_serve(cfg, demo_challenge, reloader), cfg.server.event_loop))
    if reason:
        _fail(reason)


def _check_listeners(cfg: config_mod.Config) -> None:
    """ConfigError for listener settings `serve` cannot honour (addresses: when binding)."""
    if cfg.server.metrics_on_admin and not cfg.server.admin:
        raise ConfigError("[server] metrics_on_admin needs [server] admin (the admin listener)")


#: (section, key) a reload does not change: the bound sockets, the process count, the database
_FIXED_ON_RELOAD = (("server", "http"), ("server", "https"), ("server", "mtls"), ("server", "admin"),
                    ("server", "workers"), ("server", "event_loop"), ("database", "url"))


class _Reloader:
    """SIGHUP: the configuration read again (file and environment), keeping what only a restart
    changes (README "Reloading")."""

    def __init__(self, loaded: config_mod.Config, verbose: bool):
        self.verbose = verbose
        # as the file and environment gave them at start (before the command-line values)
        self._file = {(sec, key): getattr(getattr(loaded, sec), key) for sec, key in _FIXED_ON_RELOAD}

    def read(self, running: config_mod.Config) -> config_mod.Config:
        """The new configuration; ConfigError (one line) when it is not valid."""
        new = config_mod.load(running.state_dir)
        log = logging.getLogger("scepd.reload")
        for section, key in _FIXED_ON_RELOAD:
            if getattr(getattr(new, section), key) != self._file[(section, key)]:
                log.warning("[%s] %s changed: a restart applies it; the reload keeps %r", section, key,
                            getattr(getattr(running, section), key))
            setattr(getattr(new, section), key, getattr(getattr(running, section), key))
        _check_listeners(new)
        return new

    def apply_logging(self, cfg: config_mod.Config) -> None:
        _setup_logging(cfg, self.verbose)


def _serve_error(run) -> str | None:
    """run(); None, or the one line `serve` exits with for the errors an operator can fix."""
    try:
        run()
    except Exception as exc:
        reason = _error_line(exc)
        if reason is None:
            raise
        return reason
    return None


def _error_line(exc: Exception) -> str | None:
    """The one line for an error an operator can fix (bad config, CA files, database, address)."""
    from sqlalchemy.exc import SQLAlchemyError
    if isinstance(exc, (pki.PkiError, ConfigError)):
        return str(exc)
    if isinstance(exc, _DatabaseUnreachable):
        return f"cannot reach the database: {exc}"
    if isinstance(exc, SQLAlchemyError):
        return f"cannot use the database: {str(exc.orig if hasattr(exc, 'orig') else exc).splitlines()[0]}"
    if isinstance(exc, OSError):
        return f"cannot listen: {exc.strerror or exc}"
    return None


class _DatabaseUnreachable(Exception):
    pass


def _split_hostport(text: str) -> tuple[str, int]:
    try:
        return config_mod.parse_hostport(text)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


async def _renew_server_cert(server_cert, stop: asyncio.Event, services) -> None:
    """The primary process renews the server certificate (hourly check); the other workers load
    the files it wrote into their live TLS contexts (checked every minute). services.primary is
    read each time: a reload promotes a new primary."""
    log = logging.getLogger("scepd.tls")
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=3600 if services.primary else 60)
        except asyncio.TimeoutError:
            pass
        if stop.is_set():
            return
        try:
            if services.primary:
                await server_cert.ensure()
            else:
                server_cert.reload_if_changed()
        except Exception:  # keep serving with the current certificate; try again next time
            log.exception("server certificate renewal failed")


#: listener -> (app factory name in scepd.http.app, TLS client certificate required)
_TLS_LISTENERS = {"https": ("create_https_app", False), "mtls": ("create_mtls_app", True),
                  "admin": ("create_admin_app", False)}


class _Generation:
    """One set of services and apps serving the listening sockets: a worker's whole life, or
    that of a single-process `serve` between two reloads."""

    def __init__(self, services):
        self.services = services
        self.runners: list = []
        self.tasks: list[asyncio.Task] = []
        self.stop = asyncio.Event()
        self._accepting: list = []  # this generation's duplicates of the listening sockets

    async def serve(self, app, sock, ssl_context=None, access_log: bool = True) -> None:
        """`app` on a duplicate of the listening socket `sock` (stopping closes the duplicate,
        the socket stays for the next generation)."""
        dup = sock.dup()
        try:
            self.runners.append(await _start_sock_site(app, dup, ssl_context, access_log))
        except BaseException:
            dup.close()
            raise
        self._accepting.append(dup)

    def promote(self) -> None:
        """Become the primary (a reload's new worker 0 once the old one stopped)."""
        async def _run():
            try:
                await self.services.promote()
            except Exception:
                logging.getLogger("scepd.reload").exception("the new primary's start-up jobs failed")
        self.tasks.append(asyncio.create_task(_run()))

    async def close(self) -> None:
        """Stop accepting, finish the requests under way (aiohttp's graceful shutdown), release."""
        self.stop.set()
        for task in self.tasks:
            task.cancel()
        # stop accepting, then let the connections accepted just before get their transports
        # (asyncio's Server.close() with such a connection still pending leaves it hanging)
        loop = asyncio.get_running_loop()
        for dup in self._accepting:
            loop.remove_reader(dup.fileno())
        for _ in range(3):
            await asyncio.sleep(0)
        for runner in self.runners:
            for site in list(runner.sites):
                await site.stop()
        await self._first_requests()
        for runner in reversed(self.runners):
            await runner.cleanup()
        await self.services.close()

    async def _first_requests(self) -> None:
        """Until every connection accepted before the sockets closed has sent its first request
        (at most DRAIN_GRACE): aiohttp's shutdown closes every connection waiting for a
        request, and a client that connected a moment ago would see its request reset. (The
        other generation, or worker, accepts from the shared socket meanwhile.)"""
        deadline = time.monotonic() + DRAIN_GRACE
        while time.monotonic() < deadline:
            fresh = [conn for runner in self.runners if runner.server is not None
                     for conn in runner.server.connections if getattr(conn, "_request_count", 1) == 0]
            if not fresh:
                return
            await asyncio.sleep(0.01)


#: how long a stopping generation waits for the first request of connections it just accepted
DRAIN_GRACE = 2.0


async def _start_generation(cfg: config_mod.Config, socks: dict, primary: bool) -> _Generation:
    """Open the services of `cfg` and serve them on `socks` (listener name -> listening socket)."""
    from .http import app as app_mod
    try:
        services = await app_mod.open_services(cfg)
    except OSError as exc:
        raise _DatabaseUnreachable(str(exc)) from None
    services.primary = primary
    logging.getLogger("scepd").info("serving on the %s event loop", eventloop.running_loop_name())
    gen = _Generation(services)
    try:
        log_access = cfg.server.access_log
        await gen.serve(app_mod.create_app(services), socks["http"], access_log=log_access)
        if any(key in socks for key in _TLS_LISTENERS):
            server_cert = _server_certificate(cfg, services)
            if primary:  # a restarted primary: the certificate may have come due meanwhile
                await server_cert.ensure()
            services.on_promote.append(server_cert.ensure)
            gen.tasks.append(asyncio.create_task(_renew_server_cert(server_cert, gen.stop, services)))
            for key, (factory, client_auth) in _TLS_LISTENERS.items():
                if key in socks:
                    app = getattr(app_mod, factory)(services)
                    await gen.serve(app, socks[key], server_cert.context(client_auth), access_log=log_access)
    except BaseException:
        await gen.close()
        raise
    return gen


def _bind_listeners(cfg: config_mod.Config) -> dict:
    """listener name -> listening socket, for every listener configured (closed again on error)."""
    from .http.workers import bind
    socks: dict = {}
    try:
        for key in ("http", *_TLS_LISTENERS):
            if getattr(cfg.server, key):
                socks[key] = bind(*_split_hostport(getattr(cfg.server, key)))
    except OSError:
        for sock in socks.values():
            sock.close()
        raise
    return socks


async def _serve(cfg: config_mod.Config, demo_challenge: bool, reloader: _Reloader) -> None:
    """`serve --workers 1`: one process; SIGHUP starts a new generation of the services on the
    same sockets, then stops the old one gracefully (README "Reloading")."""
    stop, hup = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)  # before anything is announced
    socks = _bind_listeners(cfg)
    # counters and histograms in files, as with several workers: a reload's new generation of the
    # services (same process) goes on from the old one's counts instead of restarting from zero
    from .ops.metrics import share_across_processes
    metrics_dir = _metrics_directory(cfg.state_dir)
    share_across_processes(metrics_dir)
    try:
        gen = await _start_generation(cfg, socks, primary=True)
        try:
            _announce(cfg, {k: s.getsockname()[:2] for k, s in socks.items()}, gen.services.ca_material.root)
            if demo_challenge:
                secret = await gen.services.challenges.create(dt.timedelta(hours=1), actor="serve")
                click.echo(f"One-time challenge password (valid 1 hour): {secret}")
            sys.stdout.flush()
            while not stop.is_set():
                waits = [asyncio.create_task(stop.wait()), asyncio.create_task(hup.wait())]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in waits:
                    task.cancel()
                if hup.is_set() and not stop.is_set():
                    hup.clear()
                    cfg, gen = await _reload_in_process(cfg, gen, socks, reloader)
            logging.getLogger("scepd").info("shutting down")
        finally:
            await gen.close()
    finally:
        for sock in socks.values():
            sock.close()
        import shutil
        shutil.rmtree(metrics_dir, ignore_errors=True)


async def _reload_in_process(cfg, gen: _Generation, socks: dict, reloader: _Reloader):
    """(config, generation) after a SIGHUP: the new ones, or the old ones when the new
    configuration or CA files are not usable (one error line)."""
    log = logging.getLogger("scepd.reload")
    try:
        new_cfg = reloader.read(cfg)
        new_gen = await _start_generation(new_cfg, socks, primary=False)
    except Exception as exc:
        log.error("reload failed, still serving the previous configuration: %s",
                  _error_line(exc) or f"{type(exc).__name__}: {exc}")
        return cfg, gen
    reloader.apply_logging(new_cfg)
    await gen.close()  # both generations accept until the old one's sockets close
    new_gen.promote()
    log.info("reloaded: configuration and CA files from %s", new_cfg.state_dir)
    return new_cfg, new_gen


# --- serve --workers N (scepd/http/workers.py has the process model) ---------------------------


async def _prepare_once(cfg: config_mod.Config, demo_challenge: bool) -> dict:
    """The parent's share, before any worker forks: migrations, the CA, the server TLS
    certificate, the demo challenge. Everything it opened is closed again."""
    from .http.app import open_services
    try:
        services = await open_services(cfg)
    except OSError as exc:
        raise _DatabaseUnreachable(str(exc)) from None
    try:
        if cfg.server.https or cfg.server.mtls or cfg.server.admin:
            await _server_certificate(cfg, services).ensure()
        delegate = getattr(services.ocsp, "delegate", None)
        if delegate is not None:  # [ca] ocsp_delegated: its certificate issued once, not per worker
            await delegate.current()
        secret = None
        if demo_challenge:
            secret = await services.challenges.create(dt.timedelta(hours=1), actor="serve")
        return {"root": services.ca_material.root, "secret": secret}
    finally:
        await services.close()


def _server_certificate(cfg: config_mod.Config, services):
    from .http.tls import ServerCertificate, names_for
    tls_host = _split_hostport(cfg.server.https or cfg.server.mtls or cfg.server.admin)[0]
    extra = tuple(n.strip() for n in cfg.server.tls_names.split(",") if n.strip())
    if cfg.server.admin and _split_hostport(cfg.server.admin)[0] != tls_host:
        extra += (_split_hostport(cfg.server.admin)[0],)
    return ServerCertificate(cfg.state_dir / "tls", services.enrollment, services.ca_material,
                              names_for(tls_host, extra))


async def _start_sock_site(app, sock, ssl_context=None, access_log: bool = True):
    from aiohttp import web
    from .http.app import HTTP_HANDLER_ARGS
    from .ops.accesslog import runner_args
    runner = web.AppRunner(app, handle_signals=False, **runner_args(access_log), **HTTP_HANDLER_ARGS)
    await runner.setup()
    try:
        await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


async def _worker(cfg: config_mod.Config, socks: dict, primary: bool, report) -> None:
    """One worker: the apps on the inherited sockets until SIGTERM/SIGINT; SIGUSR1 makes it the
    primary (sent by the parent during a reload, once the old primary stopped)."""
    gen = await _start_generation(cfg, socks, primary)
    try:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, gen.stop.set)
        loop.add_signal_handler(signal.SIGUSR1, gen.promote)
        report("ready")
        await gen.stop.wait()
    finally:
        await gen.close()


def _worker_process(cfg: config_mod.Config, socks: dict, metrics_dir: str, index: int, primary: bool,
                    report) -> int:
    """The body of a forked worker; its exit code."""
    from .ops.metrics import share_across_processes
    share_across_processes(metrics_dir)
    try:
        reason = _serve_error(lambda: eventloop.run(_worker(cfg, socks, primary, report), cfg.server.event_loop))
    except Exception as exc:  # the log has the traceback; the parent prints one line
        logging.getLogger("scepd.workers").exception("worker %d failed", index)
        reason = f"worker {index} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if reason:
        report(reason)
        return 1
    return 0


def _serve_workers(cfg: config_mod.Config, demo_challenge: bool, count: int, reloader: _Reloader) -> None:
    import functools
    import shutil
    from .http.workers import Supervisor, WorkerStartError, threads_other_than_main
    prepared: dict = {}
    reason = _serve_error(lambda: prepared.update(asyncio.run(_prepare_once(cfg, demo_challenge))))
    if reason:
        _fail(reason)
    if threads_other_than_main():  # forking now could copy a held lock
        _fail("internal error: threads still run before the workers start; use --workers 1")
    socks: dict = {}
    metrics_dir = None
    log = logging.getLogger("scepd.workers")
    running = [cfg]

    def reload():
        """SIGHUP, in the parent: the new configuration and CA files checked as at start (and the
        server certificate issued by a newly activated CA); the body of the new workers, or None
        (one error line) to keep the old ones."""
        reload_log = logging.getLogger("scepd.reload")
        try:
            new_cfg = reloader.read(running[0])
            reason = _serve_error(lambda: asyncio.run(_prepare_once(new_cfg, False)))
        except ConfigError as exc:
            reason = str(exc)
        except Exception as exc:
            reason = _error_line(exc) or f"{type(exc).__name__}: {exc}"
        if reason is None and threads_other_than_main():
            reason = "internal error: threads still run after checking the configuration"
        if reason:
            reload_log.error("reload failed, still serving the previous configuration: %s", reason)
            return None
        reloader.apply_logging(new_cfg)
        running[0] = new_cfg
        return functools.partial(_worker_process, new_cfg, socks, metrics_dir)

    try:
        socks = _bind_listeners(cfg)
        # counters and histograms of every worker, summed by whichever answers /metrics
        metrics_dir = _metrics_directory(cfg.state_dir)
        # rate-limit buckets in memory the workers share (a limit is the configured one whichever
        # worker a client reaches); made before the first fork, kept across reloads
        from .ops.ratelimit import share_across_processes
        share_across_processes(max(1, cfg.limits.max_keys))
        supervisor = Supervisor(count, functools.partial(_worker_process, cfg, socks, metrics_dir),
                                on_reload=reload)
        supervisor.install_signal_handlers()
        supervisor.start()
        if supervisor.stopping:
            return
        pids = supervisor.pids()
        log.info("%d workers started: pids %s", len(pids), " ".join(map(str, pids)))
        _announce(cfg, {k: s.getsockname()[:2] for k, s in socks.items()}, prepared["root"], pids)
        if prepared["secret"]:
            click.echo(f"One-time challenge password (valid 1 hour): {prepared['secret']}")
        sys.stdout.flush()
        supervisor.run()
        log.info("shutting down")
    except OSError as exc:
        _fail(f"cannot listen: {exc.strerror or exc}")
    except WorkerStartError as exc:
        _fail(str(exc))
    finally:
        for sock in socks.values():
            sock.close()
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _metrics_directory(state_dir: Path) -> str:
    """DIR/.metrics-<parent pid>, new and empty; those of servers no longer running (a kill -9)
    are removed."""
    import shutil
    for old in state_dir.glob(".metrics-*"):
        pid = old.name.removeprefix(".metrics-")
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = state_dir / f".metrics-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    return str(path)


def _announce(cfg: config_mod.Config, addresses: dict, root, pids: list[int] | None = None) -> None:
    """What `serve` prints at start (the parent, once, with --workers N)."""
    host, port = addresses["http"]
    base = cfg.server.base_url.rstrip("/") or f"http://{host}:{port}"
    click.echo(f"scepd {__version__} listening on http://{host}:{port}")
    if pids is not None:
        click.echo(f"Worker processes: {len(pids)} (pids {' '.join(map(str, pids))})")
    click.echo(f"SCEP URL: {base}/scep")
    click.echo(f"CA certificates: {base}/scep?operation=GetCACert")
    admin_api = "" if cfg.server.admin else ", admin API"
    if "https" in addresses:
        h, p = addresses["https"]
        click.echo(f"HTTPS (ACME{admin_api}): https://{h}:{p}/")
        click.echo(f"ACME directory: https://{h}:{p}/acme/directory")
    if "mtls" in addresses:
        h, p = addresses["mtls"]
        click.echo(f"mTLS agent API: https://{h}:{p}/api/v1/")
    if "admin" in addresses:
        h, p = addresses["admin"]
        click.echo(f"Admin API: https://{h}:{p}/api/v1/admin/")
    click.echo(f"Root CA SHA-256 fingerprint: {_fingerprint(root)}")
    if cfg.scep.static_challenge:
        click.echo("Static challenge password: configured (SCEPD_SCEP_STATIC_CHALLENGE)")
    from .enroll.pipeline import startup_warnings
    for warning in startup_warnings(cfg):  # once, at start
        logging.getLogger("scepd").warning("%s", warning)


# --- ca ---------------------------------------------------------------------------------------


@main.group()
def ca() -> None:
    """Show CA certificates."""


def _material_certs(state_dir: Path) -> tuple[x509.Certificate, list[x509.Certificate]]:
    d = pki.ca_dir(state_dir)
    try:
        root = x509.load_pem_x509_certificate((d / "root.pem").read_bytes())
        chain = x509.load_pem_x509_certificates((d / "chain.pem").read_bytes())
    except FileNotFoundError:
        _fail(f"no CA in {state_dir}; run `scepd init --state-dir {state_dir}`")
        raise
    return root, chain


@ca.command()
@STATE_DIR
def root(state_dir):
    """Print the trust anchor (root CA) PEM."""
    click.echo(pki.pem(_material_certs(state_dir)[0]), nl=False)


@ca.command()
@STATE_DIR
def chain(state_dir):
    """Print the issuing CA followed by the root, PEM."""
    click.echo(pki.pem(*_material_certs(state_dir)[1]), nl=False)


def _root_passphrase(key_pem: bytes, env_name: str | None, ca_passphrase: bytes | None) -> bytes | None:
    """The root key's passphrase: --root-passphrase-env, $SCEPD_ROOT_KEY_PASSPHRASE, the CA key
    passphrase (roots written by older versions), or asked on a terminal."""
    if env_name:
        value = os.environ.get(env_name)
        if not value:
            _fail(f"{env_name} (--root-passphrase-env) is not set")
        return value.encode()  # type: ignore[union-attr]
    value = os.environ.get(ROOT_PASSPHRASE_ENV)
    if value:
        return value.encode()
    if not pki.is_encrypted_key(key_pem):
        return None
    if ca_passphrase and pki.key_opens(key_pem, ca_passphrase):
        return ca_passphrase
    if _interactive():
        return click.prompt("Passphrase of the root CA key", hide_input=True, err=True).encode()
    _fail(f"the root CA key is encrypted: set {ROOT_PASSPHRASE_ENV} (or name another variable "
          "with --root-passphrase-env), or run on a terminal to be asked")
    raise AssertionError  # unreachable


@ca.command()
@STATE_DIR
@click.option("--root-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="The root CA key (default DIR/ca/root.key; bring it back from offline storage).")
@click.option("--root-passphrase-env", default=None,
              help=f"Environment variable with the root key passphrase (default {ROOT_PASSPHRASE_ENV}).")
@click.option("--next-key-uri", default=None, metavar="PKCS11-URI",
              help="Create the next issuing CA key in a PKCS#11 token (RFC 7512 URI).")
@click.option("--root-key-uri", default=None, metavar="PKCS11-URI",
              help="The root CA key is in a token (default: DIR/ca/root.key.uri when init put it there).")
def rollover(state_dir, root_key, root_passphrase_env, next_key_uri=None, root_key_uri=None):
    """Create the next issuing CA under the same root; GetNextCACert publishes it.

    The root key passphrase comes from $SCEPD_ROOT_KEY_PASSPHRASE or is asked on the terminal."""
    from .http.app import passphrase_for
    cfg = _load_config(state_dir)
    key_path = root_key or pki.ca_dir(state_dir) / "root.key"
    stored_uri = pki.ca_dir(state_dir) / "root.key.uri"
    if root_key_uri is None and root_key is None and stored_uri.exists():
        root_key_uri = stored_uri.read_text().strip()
    key_pem, root_pass = None, None
    if root_key_uri is None:
        if not key_path.exists():
            _fail(f"{key_path} not found: pass --root-key with the offline root key")
        key_pem = key_path.read_bytes()
        root_pass = _root_passphrase(key_pem, root_passphrase_env, passphrase_for(cfg))
    try:
        cert = pki.rollover(state_dir, SystemClock(), key_pem, root_pass, passphrase_for(cfg),
                            next_key_uri=next_key_uri, root_key_uri=root_key_uri)
    except pki.PkiError as exc:
        _fail(str(exc))
        return
    _audit(cfg, "ca.rollover", {"next_ca": cert.subject.rfc4514_string(),
                                "next_ca_id": pki.ca_id_of(cert)})
    click.echo(f"next CA ready: {cert.subject.rfc4514_string()} (id {pki.ca_id_of(cert)}); "
               "GetNextCACert publishes it after a reload of the server (systemctl reload scepd, or "
               "kill -HUP the server's pid); then `scepd ca activate-next` and reload again to switch")


@ca.command("activate-next")
@STATE_DIR
def activate_next(state_dir):
    """Switch issuance to the next CA (reload the server afterwards: SIGHUP)."""
    cfg = _load_config(state_dir)
    try:
        cert = pki.activate_next(state_dir)
    except pki.PkiError as exc:
        _fail(str(exc))
        return
    _audit(cfg, "ca.activated", {"ca": cert.subject.rfc4514_string(), "ca_id": pki.ca_id_of(cert)})
    click.echo(f"issuing CA is now {cert.subject.rfc4514_string()} (id {pki.ca_id_of(cert)}); "
               "the previous CA still decrypts and authorizes renewals; reload the server "
               "(systemctl reload scepd, or kill -HUP) to issue from it")


def _audit(cfg, event: str, details: dict) -> None:
    from .store import AuditRecord

    async def _run():
        store = await open_store(cfg.database_url)
        try:
            async with store.transaction() as tx:
                await tx.audit(AuditRecord(at=SystemClock().now(), event=event, actor="cli", details=details))
        finally:
            await store.close()
    asyncio.run(_run())


# --- challenges -------------------------------------------------------------------------------


@main.group()
def challenge() -> None:
    """One-time challenge passwords (enrollment tokens)."""


@challenge.command("create")
@STATE_DIR
@click.option("--ttl", default="1h", show_default=True, help="Lifetime, e.g. 30m, 1h, 7d.")
@click.option("--names", "--cn", "names", multiple=True, metavar="PATTERN",
              help="Shell pattern (repeatable): the CN and every SAN of the request must match one "
                   "(--cn is the older spelling). Default: any name.")
@click.option("--profile", default=None, help="Profile the certificate gets (agent, server, device, ...); "
                                              "default: the protocol's ([scep] profile).")
def challenge_create(state_dir, ttl, names, profile):
    """Print one new one-time challenge password (and nothing else)."""
    from .enroll.challenges import clean_names
    from .errors import ScepdError
    from .ca.policy import enrollment_profile
    try:
        lifetime = parse_duration(ttl)
        scope = clean_names(names)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    if profile:
        try:
            enrollment_profile(profile)
        except ScepdError as exc:
            _fail(exc.detail)
    cfg = _load_config(state_dir)

    if not pki.exists(state_dir):
        _fail(f"no CA in {state_dir}; run `scepd init --state-dir {state_dir}`")
    click.echo(asyncio.run(_with_services(cfg, lambda sv: sv.challenges.create(
        lifetime, names=scope, profile=profile))))


# --- certificates -----------------------------------------------------------------------------


@main.group()
def certs() -> None:
    """The inventory of issued certificates."""


_with_services = with_services
_with_store = with_store


@certs.command("list")
@STATE_DIR
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@click.option("--expiring-within", default=None, help="Only valid certificates expiring within, e.g. 30d.")
@click.option("--limit", default=1000, show_default=True)
def certs_list(state_dir, as_json, expiring_within, limit):
    """List issued certificates, soonest expiry first."""
    now = SystemClock().now()
    before = None
    if expiring_within:
        try:
            before = now + parse_duration(expiring_within)
        except ConfigError as exc:
            _fail(str(exc))
    cfg = _load_config(state_dir)
    records = asyncio.run(_with_store(cfg, lambda s: s.list_certificates(expiring_before=before, limit=limit)))
    if as_json:
        click.echo(json.dumps([cert_json(r, now) for r in records], indent=2))
        return
    click.echo(f"{'SERIAL':34} {'STATE':8} {'NOT AFTER':20} {'PROTO':5} SUBJECT")
    for r in records:
        click.echo(f"{r.serial:34} {r.state(now):8} {r.not_after:%Y-%m-%d %H:%M:%SZ} {r.protocol:5} {r.subject}")


@certs.command("show")
@STATE_DIR
@click.argument("serial")
@click.option("--pem", "as_pem", is_flag=True, help="Print the certificate PEM only.")
def certs_show(state_dir, serial, as_pem):
    """Show one certificate (serial in hex, as `certs list` prints it)."""
    from .store import StoreNotFound
    cfg = _load_config(state_dir)
    key = serial_argument(serial)
    try:
        rec = asyncio.run(_with_store(cfg, lambda s: s.get_certificate(key)))
    except StoreNotFound:
        _fail(f"no certificate with serial {serial}")
        return
    if as_pem:
        cert = x509.load_der_x509_certificate(rec.der)
        click.echo(cert.public_bytes(serialization.Encoding.PEM).decode(), nl=False)
        return
    click.echo(json.dumps(cert_json(rec, SystemClock().now(), with_pem=True), indent=2))


@certs.command("revoke")
@STATE_DIR
@click.argument("serial")
@click.option("--reason", default="unspecified", show_default=True,
              help="RFC 5280 reason: unspecified, keyCompromise, caCompromise, affiliationChanged, "
                   "superseded, cessationOfOperation, privilegeWithdrawn.")
def certs_revoke(state_dir, serial, reason):
    """Revoke a certificate (recorded before this returns)."""
    from .errors import ScepdError
    from .ca.revocation import RevocationReason
    cfg = _load_config(state_dir)
    key = serial_argument(serial)

    async def _run():
        return await _with_services(cfg, lambda sv: sv.revocation.revoke(
            key, RevocationReason.parse(reason), actor="cli"))
    try:
        rec = asyncio.run(_run())
    except ScepdError as exc:
        _fail(exc.detail)
        return
    click.echo(f"revoked {rec.serial} ({rec.subject}) reason={rec.revocation_reason}")


@main.group()
def pending() -> None:
    """Requests waiting for approval ([policy] require_approval): SCEP and ACME."""


@pending.command("list")
@STATE_DIR
@click.option("--all", "show_all", is_flag=True, help="Include decided requests.")
@click.option("--json", "as_json", is_flag=True)
def pending_list(state_dir, show_all, as_json):
    """List pending requests."""
    cfg = _load_config(state_dir)
    rows = asyncio.run(_with_store(cfg, lambda s: s.list_pending(None if show_all else "pending")))
    items = [pending_json(r) for r in rows]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    click.echo(f"{'ID':>5} {'STATUS':9} {'CREATED':20} SUBJECT")
    for r in rows:
        click.echo(f"{r.id:>5} {r.status:9} {r.created_at:%Y-%m-%d %H:%M:%SZ} {r.subject}")


@pending.command("approve")
@STATE_DIR
@click.argument("pending_id", type=int)
def pending_approve(state_dir, pending_id):
    """Issue the certificate of a pending request; the client gets it at its next poll."""
    from .errors import ScepdError
    cfg = _load_config(state_dir)
    try:
        issued = asyncio.run(_with_services(cfg, lambda s: s.enrollment.approve_pending(pending_id, "cli")))
    except ScepdError as exc:
        _fail(exc.detail)
        return
    click.echo(f"approved {pending_id}: issued serial {issued.record.serial} ({issued.record.subject})")


@pending.command("reject")
@STATE_DIR
@click.argument("pending_id", type=int)
@click.option("--reason", required=True, help="Shown to the client in failInfoText.")
def pending_reject(state_dir, pending_id, reason):
    """Reject a pending request."""
    from .errors import ScepdError
    cfg = _load_config(state_dir)
    try:
        asyncio.run(_with_services(cfg, lambda s: s.enrollment.reject_pending(pending_id, reason, "cli")))
    except ScepdError as exc:
        _fail(exc.detail)
        return
    click.echo(f"rejected {pending_id}")


@main.group()
def audit() -> None:
    """The append-only audit trail."""


@audit.command("list")
@STATE_DIR
@click.option("--limit", default=50, show_default=True)
@click.option("--event", default=None, help="Only this event (e.g. certificate.revoked; 'certificate.*' = prefix).")
@click.option("--serial", default=None, help="Only records about this certificate serial (hex).")
@click.option("--since", default=None, help="Only records at/after an ISO 8601 time or a duration ago (24h, 7d).")
def audit_list(state_dir, limit, event, serial, since):
    """Newest audit records first, one JSON object a line."""
    from .ops.audit import audit_json, list_audit, parse_since
    from .errors import ScepdError
    cfg = _load_config(state_dir)
    try:
        since_at = parse_since(since, SystemClock().now()) if since else None
        key = serial_key(serial) if serial else None
    except ValueError as exc:
        _fail(str(exc))
        return
    except ScepdError as exc:
        _fail(exc.detail)
        return
    records = asyncio.run(_with_store(cfg, lambda s: list_audit(s, event=event, serial=key, since=since_at,
                                                                limit=limit)))
    for rec in records:
        click.echo(json.dumps(audit_json(rec), sort_keys=True))


from .admin.cli import admin as _admin_group  # noqa: E402
main.add_command(_admin_group)

from .ops.agents import agents_cli  # noqa: E402

main.add_command(agents_cli)

from .ops.configcheck import config_cli  # noqa: E402

main.add_command(config_cli())

from .ops.backup import commands as _backup_commands  # noqa: E402

for _command in _backup_commands():
    main.add_command(_command)


for _frontend in frontends():  # protocol front-ends (acme/): their commands, under `scepd` or a group
    for _parent, _command in _frontend.cli_commands():
        (main.commands[_parent] if _parent else main).add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
