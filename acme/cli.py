"""ACME commands for the `scepd` CLI (added by scepd.http.assembly through acme.frontend)."""
from __future__ import annotations

import asyncio

import click

from scepd.cli_support import STATE_DIR, fail, load_config, serial_argument, with_services
from scepd.errors import ScepdError


@click.command("renew-now")
@STATE_DIR
@click.argument("serial")
def renew_now(state_dir, serial):
    """Move a certificate's ARI renewal window into the past (ACME clients that read ARI renew)."""
    from .service import AcmeService, AcmeSettings
    cfg = load_config(state_dir)
    key = serial_argument(serial)
    try:
        asyncio.run(with_services(cfg, lambda s: AcmeService(s, AcmeSettings()).mark_renew_now(key)))
    except ScepdError as exc:
        fail(exc.detail)
    click.echo(f"{key}: ARI window moved into the past")


@click.group("eab")
def eab() -> None:
    """ACME external account binding keys (enrollment tokens for ACME clients)."""


@eab.command("create")
@STATE_DIR
@click.option("--identifiers", default=None, help="Shell pattern the bound account may order, e.g. '*.lab.example'.")
@click.option("--ttl", default="7d", show_default=True, help="How long the key can be used to bind an account.")
def eab_create(state_dir, identifiers, ttl):
    """Print a single-use key id and HMAC key (base64url)."""
    from scepd.config import ConfigError, parse_duration

    from .service import AcmeService, AcmeSettings
    try:
        lifetime = parse_duration(ttl)
    except ConfigError as exc:
        fail(str(exc))
    cfg = load_config(state_dir)
    kid, key = asyncio.run(with_services(cfg, lambda s: AcmeService(s, AcmeSettings()).create_eab(
        lifetime, identifiers, "cli")))
    click.echo(f"kid: {kid}")
    click.echo(f"hmac: {key}")


@click.group("acme")
def acme_group() -> None:
    """ACME accounts."""


@acme_group.command("accounts")
@STATE_DIR
@click.option("--json", "as_json", is_flag=True)
def accounts_list(state_dir, as_json):
    """Every ACME account: status, contact, and the EAB key (enrollment token) it was bound with."""
    import json

    from .service import AcmeService, AcmeSettings
    cfg = load_config(state_dir)
    rows = asyncio.run(with_services(cfg, lambda s: AcmeService(s, AcmeSettings()).list_accounts()))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['id']}  {r['status']:<11}  {r['created_at'][:19]}  eab={r['eab_kid'] or '-'}  "
                   f"identifiers={r['identifiers'] or '*'}  {' '.join(r['contact'])}")


@acme_group.command("deactivate")
@STATE_DIR
@click.argument("account_id")
def account_deactivate(state_dir, account_id):
    """Deactivate an account (RFC 8555 §7.3.6 done by the operator): no more orders or revocations."""
    from .service import AcmeService, AcmeSettings
    cfg = load_config(state_dir)
    try:
        asyncio.run(with_services(cfg, lambda s: AcmeService(s, AcmeSettings()).deactivate_account(
            account_id, "cli")))
    except ScepdError as exc:
        fail(exc.detail)
    click.echo(f"{account_id}: deactivated")
