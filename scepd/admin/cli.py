"""`scepd admin ...`: admin API credentials (tokens, client certificates) and CRL/OCSP helpers.

Every command calls the same service layer the server uses (scepd.admin.AdminService,
scepd.ca.crl.CrlService).
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from ..clock import SystemClock


def _state_dir_option(fn):
    return click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                        envvar="SCEPD_STATE_DIR", default="scepd-data", show_default=True,
                        help="Directory holding the CA, configuration and database.")(fn)


def _fail(message: str) -> None:
    click.echo(f"scepd: {message}", err=True)
    raise SystemExit(1)


def _config(state_dir: Path):
    from .. import config as config_mod
    from ..ca import pki
    if not pki.exists(state_dir):
        _fail(f"no CA in {state_dir}; run `scepd init --state-dir {state_dir}`")
    try:
        return config_mod.load(state_dir)
    except (config_mod.ConfigError, ValueError) as exc:
        _fail(str(exc))


def _with_admin(cfg, fn, full: bool = False):
    """A coroutine: fn(AdminService, services or None), with the store or (full) the services
    the `scepd` command opens (scepd.cli_support)."""
    from .service import AdminService
    from ..cli_support import with_services, with_store
    if full:
        return with_services(cfg, lambda services: fn(
            AdminService(services.store, services.clock, services.enrollment), services))
    return with_store(cfg, lambda store: fn(AdminService(store, SystemClock()), None))


@click.group("admin")
def admin() -> None:
    """Admin API credentials: bearer tokens and admin client certificates."""


@admin.group("token")
def token() -> None:
    """Bearer tokens for the admin API (stored as SHA-256 only)."""


@token.command("create")
@_state_dir_option
@click.option("--name", required=True, help="What the token is for (shown in `token list` and the audit).")
def token_create(state_dir, name):
    """Print a new token once (it cannot be shown again)."""
    from ..errors import ScepdError
    cfg = _config(state_dir)
    try:
        _id, value = asyncio.run(_with_admin(cfg, lambda a, _s: a.create_token(name, actor="cli")))
    except ScepdError as exc:
        _fail(exc.detail)
    click.echo(value)


@token.command("list")
@_state_dir_option
def token_list(state_dir):
    """Tokens (id, name, created, revoked), never their values."""
    cfg = _config(state_dir)
    for t in asyncio.run(_with_admin(cfg, lambda a, _s: a.list_tokens())):
        click.echo(json.dumps({"id": t.id, "name": t.name, "created_at": t.created_at.isoformat(),
                               "created_by": t.created_by,
                               "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None}))


@token.command("revoke")
@_state_dir_option
@click.argument("token_id", type=int)
def token_revoke(state_dir, token_id):
    """Revoke a token by id; it stops working at once."""
    cfg = _config(state_dir)
    if not asyncio.run(_with_admin(cfg, lambda a, _s: a.revoke_token(token_id, actor="cli"))):
        _fail(f"no live token with id {token_id}")
    click.echo(f"revoked token {token_id}")


@admin.command("issue-cert")
@_state_dir_option
@click.option("--cn", required=True, help="Common name of the administrator (e.g. alice).")
@click.option("--out-cert", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the certificate (PEM, followed by the issuing CA).")
@click.option("--out-key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the new private key (PEM, mode 0600).")
def issue_cert(state_dir, cn, out_cert, out_key):
    """Issue an admin client certificate (profile "admin") for the HTTPS admin API."""
    from ..errors import ScepdError
    from ..ca.pki import PkiError, pem, write_private, write_public
    cfg = _config(state_dir)
    for path in (out_cert, out_key):
        if path.exists():
            _fail(f"{path} exists; refusing to overwrite")

    async def _run(a, services):
        issued = await a.issue_admin_certificate(cn, actor="cli")
        return issued, services.ca_material
    try:
        issued, material = asyncio.run(_with_admin(cfg, _run, full=True))
    except (ScepdError, PkiError) as exc:
        _fail(getattr(exc, "detail", str(exc)))
    try:
        write_private(out_key, issued.key_pem)  # 0600, O_EXCL: never through a planted symlink
    except PkiError as exc:
        _fail(str(exc))
    write_public(out_cert, pem(issued.cert, material.cert, *material.intermediates).encode())
    click.echo(f"admin certificate {issued.record.serial} for CN={cn} written to {out_cert} (key {out_key})")


@admin.command("crl")
@_state_dir_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the DER CRL here (default: print PEM).")
def crl(state_dir, out):
    """Publish (if due) and print the current CRL of the issuing CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cfg = _config(state_dir)
    der = asyncio.run(_with_admin(cfg, lambda _a, s: s.crl.current_der(), full=True))
    if out:
        out.write_bytes(der)
        click.echo(f"CRL written to {out}")
        return
    click.echo(x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM).decode(), nl=False)
