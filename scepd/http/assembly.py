"""The one place that assembles scepd with its protocol front-ends: which front-ends this build
serves (acme/), and the one ordered list of every schema migration.

Only the entry points (scepd.cli, scepd.http.app) consult this module; scepd's core (CA, policy,
store, errors, enrollment) and the front-ends never import it, and nothing else under scepd/
imports acme (tests/test_import_graph.py).
"""
from __future__ import annotations

from ..frontend import Frontend
from ..store import Migration, SqlStore


def frontends() -> tuple[Frontend, ...]:
    """The protocol front-ends next to SCEP, in the order their routes and commands are added."""
    from acme.frontend import FRONTEND as acme
    return (acme,)


def migrations() -> list[Migration]:
    """Every migration, in the order a new database gets them (append; never reorder or edit one
    that shipped). Each component's versions are applied once, recorded in schema_version."""
    from acme import store as acme_store

    from ..admin import service as admin
    from ..console import queries as console
    from ..ops import agents, audit, metrics
    from ..ca import crl
    from ..store.sql import MIGRATIONS as store_own
    ordered: list[Migration] = []
    for component, steps in (("core", store_own["core"]),   # certificates, challenges, audit, pending
                             ("ops", crl.MIGRATIONS),          # 1: CRL state
                             ("ops", audit.MIGRATIONS),        # 2: audit indexes, append-only triggers
                             ("ops", admin.MIGRATIONS),        # 3: admin API tokens
                             ("agents", agents.MIGRATIONS),    # 1: agent inventory, 2: check-in index
                             ("acme", acme_store.MIGRATIONS),  # 1-4: ACME accounts, orders, EAB, ARI
                             ("metrics", metrics.MIGRATIONS),  # 1: valid certificates per expiry day
                             ("console", console.MIGRATIONS)):  # 1: signed-out console sessions
        ordered.extend((component, version, step) for version, step in steps)
    return ordered


async def open_store(url: str) -> SqlStore:
    """The store with every migration of this build applied."""
    return await SqlStore.open(url, migrations())
