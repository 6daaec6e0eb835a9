"""ACME as a scepd front-end (scepd.frontend.Frontend): listed by scepd.http.assembly, the one place
in scepd that knows about this package."""
from __future__ import annotations

from scepd.frontend import Frontend


def _https_routes(app, services) -> None:
    from .server import add_routes
    add_routes(app, services)  # /acme/...


def _admin_routes(app, services) -> None:
    from .server import add_admin_routes
    add_admin_routes(app, services)  # POST /api/v1/admin/eab


def _cli_commands():
    from .cli import acme_group, eab, renew_now
    return [("certs", renew_now), ("", eab), ("", acme_group)]


def _purges():
    from .retention import purges
    return purges()


FRONTEND = Frontend("acme", https_routes=_https_routes, admin_routes=_admin_routes,
                    cli_commands=_cli_commands, purges=_purges)
