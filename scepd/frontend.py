"""The contract of a protocol front-end plug-in (acme/ is one): what it adds to scepd.

A front-end never assembles scepd itself: scepd.http.assembly lists the front-ends and calls these
hooks; the front-end's CLI commands get the store and the services from the `scepd` command
(scepd.cli_support.with_services), not by importing scepd's entry points.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Frontend:
    name: str
    #: callable(app, services): mount the front-end's routes on the HTTPS listener (its protocol
    #: and any admin API routes, scepd.admin_http.admin_endpoint)
    https_routes: Callable[[Any, Any], None] | None = None
    #: callable(app, services): the front-end's admin API routes (scepd.admin.http.admin_endpoint),
    #: on the admin listener when [server] admin is set, else on the HTTPS listener
    admin_routes: Callable[[Any, Any], None] | None = None
    #: () -> [(parent, click command)]: parent "" is the `scepd` group itself, else the name of one
    #: of its groups ("certs")
    cli_commands: Callable[[], Sequence[tuple[str, Any]]] = lambda: ()
    #: () -> [scepd.ops.retention.Purge]: the front-end's expired rows, purged on the retention
    #: schedule with scepd's own
    purges: Callable[[], Sequence[Any]] = lambda: ()
