"""ACME commands for the `scepd` CLI (registered in scepd/cli.py)."""
from __future__ import annotations

import asyncio

import click

from scepd.cli import STATE_DIR, _fail, _load_config, _with_services
from scepd.errors import ScepdError


@click.command("renew-now")
@STATE_DIR
@click.argument("serial")
def renew_now(state_dir, serial):
    """Move a certificate's ARI renewal window into the past (ACME clients that read ARI renew)."""
    from .service import AcmeService, AcmeSettings
    cfg = _load_config(state_dir)
    key = serial.lower().removeprefix("0x").replace(":", "").lstrip("0") or "0"
    try:
        asyncio.run(_with_services(cfg, lambda s: AcmeService(s, AcmeSettings()).mark_renew_now(key)))
    except ScepdError as exc:
        _fail(exc.detail)
        return
    click.echo(f"{key}: ARI window moved into the past")
