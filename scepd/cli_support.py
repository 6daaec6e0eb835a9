"""Public helpers for `scepd` subcommands, scepd's own and the front-end plug-ins' (acme/cli.py).

The `scepd` command (scepd.cli.main) puts a CliHost on the click context: the way to open the
store and the services with every migration and front-end of this build. Subcommands open them
through `with_store` / `with_services` and never import the entry point.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, NoReturn

import click

from . import config as config_mod
from .config import ConfigError
from .render import serial_key

STATE_DIR = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                         envvar="SCEPD_STATE_DIR", default="scepd-data", show_default=True,
                         help="Directory holding the CA, configuration and database.")


def fail(message: str) -> NoReturn:
    """`scepd: MESSAGE` on stderr, exit status 1."""
    click.echo(f"scepd: {message}", err=True)
    sys.exit(1)


def load_config(state_dir: Path) -> config_mod.Config:
    try:
        return config_mod.load(state_dir)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))


def serial_argument(text: str) -> str:
    """A SERIAL argument (hex as `certs list` prints it; 0x, colons, leading zeros accepted)."""
    try:
        return serial_key(text)
    except ValueError as exc:
        fail(f"{text}: {exc}")


@dataclass(frozen=True)
class CliHost:
    #: config -> the services the server runs (scepd.http.app.open_services)
    open_services: Callable[[Any], Awaitable[Any]]
    #: database url -> an SqlStore with every migration applied
    open_store: Callable[[str], Awaitable[Any]]


def host() -> CliHost:
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(CliHost) if ctx is not None else None
    if found is None:
        raise RuntimeError("this command runs under the `scepd` command (scepd.cli.main)")
    return found


def with_services(cfg, fn):
    """A coroutine: fn(services) with the same services the server runs, closed afterwards."""
    opener = host().open_services

    async def _run():
        services = await opener(cfg)  # the opener answers an unusable CA with fail()
        try:
            return await fn(services)
        finally:
            await services.close()
    return _run()


def with_store(cfg, fn):
    """A coroutine: fn(store) with the store alone (every migration applied), closed afterwards."""
    opener = host().open_store

    async def _run():
        store = await opener(cfg.database_url)
        try:
            return await fn(store)
        finally:
            await store.close()
    return _run()
