"""The agent inventory: who checked in over mutual TLS, with which certificate, and when.

One row per (hostname, certificate subject): an agent that renews keeps its row, whose serial,
expiry and last check-in move on. `POST /api/v1/agents/checkin` on the mTLS listener records a
check-in (the serial and expiry come from the verified client certificate, never from the body);
`scepd agents list [--json]` shows the inventory, soonest certificate expiry first.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import dataclass

import click
import sqlalchemy as sa

from ..clock import Clock, SystemClock
from ..errors import MalformedRequest, mapping_for
from ..store import SqlStore
from ..store.sql import _aware, _naive

metadata = sa.MetaData()

agents = sa.Table(
    "agents", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("serial", sa.String(64), nullable=False),
    sa.Column("agent_version", sa.String(64), nullable=False),
    sa.Column("cert_not_after", sa.DateTime, nullable=False),
    sa.Column("first_seen_at", sa.DateTime, nullable=False),
    sa.Column("last_checkin_at", sa.DateTime, nullable=False),
    sa.Column("checkins", sa.Integer, nullable=False, server_default="0"),
    sa.UniqueConstraint("hostname", "subject", name="uq_agents_host_subject"),
    sa.Index("ix_agents_not_after", "cert_not_after"),
    sa.Index("ix_agents_serial", "serial"),
)

#: component "agents" (applied from the ordered list, scepd.http.assembly.migrations)
MIGRATIONS = [
    (1, [agents]),
    # "agents seen within" (metrics) filters on the last check-in time
    (2, lambda c: c.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS ix_agents_last_checkin ON agents (last_checkin_at)")),
]

MAX_HOSTNAME = 255
MAX_VERSION = 64


@dataclass(frozen=True)
class AgentRecord:
    hostname: str
    subject: str
    serial: str
    agent_version: str
    cert_not_after: dt.datetime
    first_seen_at: dt.datetime
    last_checkin_at: dt.datetime
    checkins: int

    def to_json(self, now: dt.datetime) -> dict:
        return {"hostname": self.hostname, "subject": self.subject, "serial": self.serial,
                "agent_version": self.agent_version, "cert_not_after": self.cert_not_after.isoformat(),
                "cert_expired": self.cert_not_after <= now, "first_seen_at": self.first_seen_at.isoformat(),
                "last_checkin_at": self.last_checkin_at.isoformat(), "checkins": self.checkins}


def _record(row) -> AgentRecord:
    m = row._mapping
    return AgentRecord(hostname=m["hostname"], subject=m["subject"], serial=m["serial"],
                       agent_version=m["agent_version"], cert_not_after=_aware(m["cert_not_after"]),
                       first_seen_at=_aware(m["first_seen_at"]), last_checkin_at=_aware(m["last_checkin_at"]),
                       checkins=m["checkins"])


@dataclass(frozen=True)
class Checkin:
    """A validated check-in body plus what the verified client certificate says."""

    hostname: str
    agent_version: str
    serial: str
    subject: str
    cert_not_after: dt.datetime

    @staticmethod
    def parse_body(body: object) -> tuple[str, str]:
        if not isinstance(body, dict):
            raise MalformedRequest("the check-in body must be a JSON object")
        hostname, version = body.get("hostname"), body.get("agent_version")
        if not isinstance(hostname, str) or not hostname or len(hostname) > MAX_HOSTNAME \
                or any(ord(ch) < 0x21 for ch in hostname):
            raise MalformedRequest("hostname: a non-empty string without spaces, at most 255 characters")
        if not isinstance(version, str) or not version or len(version) > MAX_VERSION:
            raise MalformedRequest("agent_version: a non-empty string, at most 64 characters")
        return hostname, version


class AgentInventory:
    def __init__(self, store: SqlStore, clock: Clock):
        self.store = store
        self.clock = clock

    async def record(self, c: Checkin) -> AgentRecord:
        now = _naive(self.clock.now())
        async with self.store.transaction() as tx:
            conn = tx.connection
            row = (await conn.execute(sa.select(agents.c.id).where(
                agents.c.hostname == c.hostname, agents.c.subject == c.subject))).first()
            values = dict(serial=c.serial, agent_version=c.agent_version,
                          cert_not_after=_naive(c.cert_not_after), last_checkin_at=now)
            if row is None:
                await conn.execute(agents.insert().values(hostname=c.hostname, subject=c.subject,
                                                          first_seen_at=now, checkins=1, **values))
            else:
                await conn.execute(agents.update().where(agents.c.id == row.id).values(
                    checkins=agents.c.checkins + 1, **values))
            out = (await conn.execute(sa.select(agents).where(
                agents.c.hostname == c.hostname, agents.c.subject == c.subject))).first()
        return _record(out)

    async def count_seen_since(self, since: dt.datetime) -> int:
        async with self.store.engine.connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(agents).where(
                agents.c.last_checkin_at >= _naive(since)))).scalar_one())

    async def list(self, limit: int = 1000) -> list[AgentRecord]:
        async with self.store.engine.connect() as conn:
            rows = (await conn.execute(sa.select(agents).order_by(
                agents.c.cert_not_after, agents.c.hostname).limit(limit))).all()
        return [_record(r) for r in rows]


# --- the mTLS route ---------------------------------------------------------------------------


def add_checkin_route(app, services) -> None:
    """Mounted on the mTLS listener (scepd.http.app.MTLS_ROUTES): the gate has already verified the
    client certificate (ours, in the inventory, not revoked; see scepd.http.tls)."""
    from aiohttp import web

    from ..http.tls import PEER

    inventory = AgentInventory(services.store, services.clock)

    async def checkin(request: web.Request) -> web.Response:
        peer = request[PEER]
        try:
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise MalformedRequest("the check-in body must be JSON") from None
            hostname, version = Checkin.parse_body(body)
        except MalformedRequest as err:
            return web.json_response({"error": err.detail}, status=mapping_for(err).http_status)
        rec = await inventory.record(Checkin(hostname, version, peer.serial, peer.subject,
                                             peer.cert.not_valid_after_utc))
        return web.json_response({"hostname": rec.hostname, "serial": rec.serial,
                                   "cert_not_after": rec.cert_not_after.isoformat(),
                                   "recorded_at": rec.last_checkin_at.isoformat(),
                                   "checkins": rec.checkins})

    app.router.add_post("/api/v1/agents/checkin", checkin)


# --- `scepd agents` ---------------------------------------------------------------------------


@click.group("agents")
def agents_cli() -> None:
    """The agent inventory (check-ins over mutual TLS)."""


@agents_cli.command("list")
@click.option("--state-dir", type=click.Path(file_okay=False), envvar="SCEPD_STATE_DIR",
              default="scepd-data", show_default=True, help="Directory holding the CA, configuration and database.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@click.option("--limit", default=1000, show_default=True)
def agents_list(state_dir, as_json, limit):
    """Every agent with its certificate's expiry and last check-in, soonest expiry first."""
    from pathlib import Path

    from .. import config as config_mod

    try:
        cfg = config_mod.load(Path(state_dir))
    except (config_mod.ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None

    from ..cli_support import with_store
    now = SystemClock().now()
    records = asyncio.run(with_store(cfg, lambda store: AgentInventory(store, SystemClock()).list(limit)))
    if as_json:
        click.echo(json.dumps([r.to_json(now) for r in records], indent=2))
        return
    click.echo(f"{'HOSTNAME':24} {'SERIAL':34} {'CERT NOT AFTER':20} {'LAST CHECK-IN':20} {'VERSION':8} SUBJECT")
    for r in records:
        flag = " EXPIRED" if r.cert_not_after <= now else ""
        click.echo(f"{r.hostname:24} {r.serial:34} {r.cert_not_after:%Y-%m-%d %H:%M:%SZ} "
                   f"{r.last_checkin_at:%Y-%m-%d %H:%M:%SZ} {r.agent_version:8} {r.subject}{flag}")
