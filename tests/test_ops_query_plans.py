"""No full-table scans on the CRL, OCSP, /metrics and admin-API request paths (SQLite EXPLAIN
QUERY PLAN of every statement they run)."""
from __future__ import annotations

import datetime as dt
import re
import sqlite3

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from sqlalchemy import event

from scepd.admin.service import AdminService
from scepd.ca.revocation import RevocationReason

from .helpers import rsa_key
from .test_revocation_tls import _issue


async def test_status_paths_use_indexes(client, services, state_dir):
    issued = [await _issue(services, f"plan-{i}", rsa_key(i)) for i in range(3)]
    admin = AdminService(services.store, services.clock)
    _id, token = await admin.create_token("plans", actor="test")
    captured: list[tuple[str, tuple]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if re.match(r"\s*(SELECT|UPDATE|DELETE)", statement, re.I):
            captured.append((statement, tuple(parameters or ())))
    for _engine in services.store.sync_engines():  # the async engine and the units' one
        event.listen(_engine, "before_cursor_execute", capture)
    await services.revocation.revoke(issued[0].record.serial, RevocationReason.KEY_COMPROMISE, "test")
    services.clock.advance(dt.timedelta(hours=13))
    assert (await client.get(f"/crl/{services.authority.ca_id}.crl")).status == 200
    req = ocsp.OCSPRequestBuilder().add_certificate(issued[1].cert, services.ca_material.cert, hashes.SHA1())
    assert (await client.post("/ocsp", data=req.build().public_bytes(serialization.Encoding.DER))).status == 200
    assert (await client.get("/metrics")).status == 200
    assert await admin.check_token(token) is not None
    for _engine in services.store.sync_engines():  # the async engine and the units' one
        event.remove(_engine, "before_cursor_execute", capture)
    assert len(captured) >= 8
    db = sqlite3.connect(state_dir / "scepd.db")
    for statement, params in captured:
        plan = " | ".join(row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + statement, params))
        scans = [t for t in re.findall(r"\bSCAN (\w+)", plan) if t != "schema_version"]
        assert not scans, f"full scan of {scans} in: {statement}\nplan: {plan}"
