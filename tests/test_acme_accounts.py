"""ACME accounts (RFC 8555 §7.3): a deactivated account is refused whatever identifies it (kid
or jwk), and two newAccount requests racing with one key both find the one account."""
from __future__ import annotations

import asyncio

from cryptography.hazmat.primitives import serialization

from .helpers import rsa_key
from .test_acme_ari import path_of, responder  # noqa: F401  (fixture)
from .test_acme_jws import P, Acme, acme, b64, problem_type  # noqa: F401  (fixture)
from .test_acme_orders import dns_server, issue_http01, lab  # noqa: F401  (fixtures)


async def deactivate(client: Acme) -> None:
    resp = await client.post(path_of(client.kid), {"status": "deactivated"})
    assert resp.status == 200 and (await resp.json())["status"] == "deactivated"


async def test_deactivated_account_is_401_by_kid(acme):
    await deactivate(acme)
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "a.example.test"}]})
    assert resp.status == 401 and await problem_type(resp) == P + "unauthorized"


async def test_new_account_with_a_deactivated_key_is_401(acme):
    await deactivate(acme)
    for payload in ({"termsOfServiceAgreed": True}, {"onlyReturnExisting": True}):
        resp = await acme.post("/acme/new-account", payload, jwk=True)
        assert resp.status == 401 and await problem_type(resp) == P + "unauthorized"
        assert "Location" not in resp.headers


async def test_deactivated_account_key_cannot_revoke_by_jwk(lab):
    _order, cert = await issue_http01(lab, ["gone.example.test"])
    await deactivate(lab)
    der = cert.public_bytes(serialization.Encoding.DER)
    resp = await lab.post("/acme/revoke-cert", {"certificate": b64(der)}, jwk=True)
    assert resp.status == 401 and await problem_type(resp) == P + "unauthorized"
    rec = await lab.services.store.get_certificate(format(cert.serial_number, "x"))
    assert rec.status != "revoked"


async def test_concurrent_new_accounts_with_one_key_answer_the_winner(acme):
    """Both requests look the key up before either inserts (held at a barrier, no sleeps): one
    creates the account (201), the other hits the unique key and answers it (200, same URL)."""
    from acme.server import ACME
    service = acme.client.server.app[ACME]
    real = service.db.account_by_thumbprint
    barrier, calls = asyncio.Barrier(2), []

    async def lookup(tp):
        found = await real(tp)
        calls.append(tp)
        if len(calls) <= 2:  # the lookup of both requests, before either inserts
            await asyncio.wait_for(barrier.wait(), 30)
        return found
    service.db.account_by_thumbprint = lookup
    racer = Acme(acme.client, rsa_key(2))
    payload = {"termsOfServiceAgreed": True}
    first, second = await asyncio.gather(racer.post("/acme/new-account", payload, jwk=True),
                                         racer.post("/acme/new-account", payload, jwk=True))
    assert sorted([first.status, second.status]) == [200, 201]
    assert first.headers["Location"] == second.headers["Location"]
    assert (await first.json())["status"] == (await second.json())["status"] == "valid"
