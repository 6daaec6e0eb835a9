"""Concurrent enrollments through the real app: distinct serials, one-time challenges spent once."""
from __future__ import annotations

import asyncio
import datetime as dt

from scepd.http.app import SERVICES
from scepd.scep import wire

from .helpers import make_csr, pkcs_req, rsa_key, self_signed


async def _post(client, der: bytes) -> wire.DecodedCertRep:
    resp = await client.post("/scep?operation=PKIOperation", data=der)
    assert resp.status == 200, await resp.text()
    return wire.decode_cert_rep(await resp.read())


async def test_fifty_concurrent_enrollments_distinct_serials(client):
    ca = client.server.app[SERVICES].ca_material.cert
    keys = [rsa_key(i % 4) for i in range(50)]
    messages = []
    for i, key in enumerate(keys):
        der, _, _ = pkcs_req(ca, key, make_csr(key, f"conc-{i}", "static-secret"),
                             signer=(self_signed(key), key))
        messages.append(der)
    replies = await asyncio.wait_for(asyncio.gather(*(_post(client, m) for m in messages)), timeout=120)
    assert [r.status for r in replies] == [wire.PkiStatus.SUCCESS] * 50
    records = await client.server.app[SERVICES].store.list_certificates()
    assert len(records) == 50
    assert len({r.serial for r in records}) == 50
    assert {r.subject for r in records} == {f"CN=conc-{i}" for i in range(50)}


async def test_one_time_challenge_raced_by_twenty(client):
    services = client.server.app[SERVICES]
    secret = await services.challenges.create(dt.timedelta(hours=1))
    ca = services.ca_material.cert
    messages = []
    for i in range(20):
        key = rsa_key(i % 4)
        der, _, _ = pkcs_req(ca, key, make_csr(key, f"race-{i}", secret), signer=(self_signed(key), key))
        messages.append(der)
    replies = await asyncio.wait_for(asyncio.gather(*(_post(client, m) for m in messages)), timeout=120)
    statuses = [r.status for r in replies]
    assert statuses.count(wire.PkiStatus.SUCCESS) == 1
    assert statuses.count(wire.PkiStatus.FAILURE) == 19
    assert all(r.fail_info == 2 for r in replies if r.status == wire.PkiStatus.FAILURE)
    assert len(await services.store.list_certificates()) == 1
