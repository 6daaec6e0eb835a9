"""No full-table scans on the request path: every statement an enrollment, a renewal, a poll and
a GetCert run is checked with SQLite's EXPLAIN QUERY PLAN."""
from __future__ import annotations

import datetime as dt
import re
import sqlite3

from sqlalchemy import event

from scepd.http.app import SERVICES
from scepd.scep import der, wire

from .helpers import make_csr, pkcs_req, reply_certs, rsa_key


async def test_request_path_uses_indexes(client, state_dir):
    services = client.server.app[SERVICES]
    captured: list[tuple[str, tuple]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if re.match(r"\s*(SELECT|UPDATE|DELETE)", statement, re.I):
            captured.append((statement, tuple(parameters or ())))
    engines = services.store.sync_engines()  # the async engine and the read/write units' one
    for engine in engines:
        event.listen(engine, "before_cursor_execute", capture)
    ca = services.ca_material.cert
    key, new_key = rsa_key(0), rsa_key(1)
    secret = await services.challenges.create(dt.timedelta(hours=1))
    msg, txid, _ = pkcs_req(ca, key, make_csr(key, "plan", secret))
    rep = wire.decode_cert_rep(await (await client.post("/scep?operation=PKIOperation", data=msg)).read())
    assert rep.status == wire.PkiStatus.SUCCESS
    old = reply_certs(rep, wire.decode_pki_message(msg).signer_cert, key)[0]
    renew, _, _ = pkcs_req(ca, new_key, make_csr(new_key, "plan"), signer=(old, key), message_type=17)
    assert wire.decode_cert_rep(await (await client.post("/scep?operation=PKIOperation",
                                                         data=renew)).read()).status == wire.PkiStatus.SUCCESS
    poll, _, _ = pkcs_req(ca, key, der.seq(ca.subject.public_bytes(), old.subject.public_bytes()),
                          transaction_id=txid, message_type=20)
    assert wire.decode_cert_rep(await (await client.post("/scep?operation=PKIOperation",
                                                         data=poll)).read()).status == wire.PkiStatus.SUCCESS
    getcert, _, _ = pkcs_req(ca, key, der.seq(ca.subject.public_bytes(), der.integer(old.serial_number)),
                             message_type=21, signer=(old, key))
    assert wire.decode_cert_rep(await (await client.post("/scep?operation=PKIOperation",
                                                         data=getcert)).read()).status == wire.PkiStatus.SUCCESS
    for engine in engines:
        event.remove(engine, "before_cursor_execute", capture)
    assert len(captured) >= 6
    db = sqlite3.connect(state_dir / "scepd.db")
    for statement, params in captured:
        plan = " | ".join(row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + statement, params))
        scans = [t for t in re.findall(r"\bSCAN (\w+)", plan) if t != "schema_version"]
        assert not scans, f"full scan of {scans} in: {statement}\nplan: {plan}"
