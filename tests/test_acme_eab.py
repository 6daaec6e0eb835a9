"""External account binding: `scepd eab create` keys bind accounts once and limit their orders."""
from __future__ import annotations

import datetime as dt
import json

import pytest
from cryptography.hazmat.primitives import hashes, hmac

from acme.service import AcmeService, AcmeSettings
from scepd.http.app import create_https_app

from .helpers import rsa_key
from .test_acme_jws import P, Acme, b64, problem_type, rsa_jwk


def binding(acme: Acme, kid: str, hmac_key: str, key, alg: str = "HS256") -> dict:
    protected = b64(json.dumps({"alg": alg, "kid": kid, "url": acme.url("/acme/new-account")}).encode())
    payload = b64(json.dumps(rsa_jwk(key)).encode())
    mac = hmac.HMAC(__import__("base64").urlsafe_b64decode(hmac_key + "=" * (-len(hmac_key) % 4)),
                    {"HS256": hashes.SHA256(), "HS512": hashes.SHA512()}[alg])
    mac.update(f"{protected}.{payload}".encode())
    return {"protected": protected, "payload": payload, "signature": b64(mac.finalize())}


@pytest.fixture
async def eab_acme(aiohttp_client, make_services):
    services = await make_services({"SCEPD_ACME_EAB_REQUIRED": "1"})
    client = await aiohttp_client(create_https_app(services))
    a = Acme(client, rsa_key(0))
    a.services = services
    return a


async def test_eab_required_binds_once_and_limits_identifiers(eab_acme):
    acme = eab_acme
    d = await (await acme.client.get("/acme/directory")).json()
    assert d["meta"]["externalAccountRequired"] is True
    resp = await acme.post("/acme/new-account", {"termsOfServiceAgreed": True}, jwk=True)
    assert await problem_type(resp) == P + "externalAccountRequired"
    kid, key = await AcmeService(acme.services, AcmeSettings()).create_eab(
        dt.timedelta(days=1), "*.lab.example.test", "test")
    bad = binding(acme, kid, key, rsa_key(3))  # MACs a different key than the account's
    resp = await acme.post("/acme/new-account", {"externalAccountBinding": bad}, jwk=True)
    assert resp.status == 400 and await problem_type(resp) == P + "malformed"
    resp = await acme.post("/acme/new-account", {"externalAccountBinding": binding(acme, kid, key, acme.key, "HS512")},
                           jwk=True)
    assert resp.status == 201, await resp.text()
    acme.kid = resp.headers["Location"]
    other = Acme(acme.client, rsa_key(2))
    resp = await other.post("/acme/new-account", {"externalAccountBinding": binding(other, kid, key, other.key)},
                            jwk=True)
    assert await problem_type(resp) == P + "unauthorized"  # single use
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "a.lab.example.test"}]})
    assert resp.status == 201
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "www.example.test"}]})
    assert await problem_type(resp) == P + "unauthorized"
    rows = [a.details for a in await acme.services.store.list_audit()]
    assert any(r.get("kid") == kid for r in rows)


async def test_expired_eab_key(eab_acme):
    acme = eab_acme
    kid, key = await AcmeService(acme.services, AcmeSettings()).create_eab(dt.timedelta(minutes=5), None, "t")
    acme.services.clock.advance(dt.timedelta(minutes=6))
    resp = await acme.post("/acme/new-account", {"externalAccountBinding": binding(acme, kid, key, acme.key)},
                           jwk=True)
    assert await problem_type(resp) == P + "unauthorized"


def test_ids_and_eab_keys_never_start_with_a_dash(monkeypatch):
    """Account ids and EAB keys are typed as arguments (`scepd acme deactivate ID`, certbot
    --eab-hmac-key KEY): one starting with "-" reads as an option (a conformance run hit both)."""
    import secrets

    from acme import service
    draws = iter(["-first", "-second", "third"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(draws))
    assert service.new_id() == "third"
