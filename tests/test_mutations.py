"""Malformed input never gets a 500: seeded, bounded mutations of real client captures."""
from __future__ import annotations

import random

import pytest

from scepd import config as config_mod
from scepd.ca import pki
from scepd.http.app import create_app, open_services
from scepd.clock import FixedClock
from scepd.scep import wire

from .helpers import VECTORS
from .test_vectors import CAPTURE_TIME

SOURCES = ["sscep-0.10.0-pkcsreq-aes128-sha256-post", "scepclient-2.1.0-pkcsreq-des-sha1-post",
           "certmonger-0.79.17-pkcsreq-aes256-sha256-get", "sscep-0.10.0-getcert-aes128-sha256-post"]


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # flip a few bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del b[rng.randrange(1, len(b)):]
    elif kind == 2:  # insert junk
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 3:  # corrupt a length byte near the start of a structure
        i = rng.randrange(min(len(b), 64))
        b[i] = rng.choice([0x00, 0x7F, 0x80, 0x81, 0x84, 0xFF])
    else:  # duplicate a slice
        i, j = sorted(rng.sample(range(len(b)), 2))
        b[j:j] = b[i:j][:200]
    return bytes(b)


@pytest.fixture
async def vector_client(aiohttp_client, tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    p = VECTORS / "pki"
    pki.import_ca(d, (p / "ca.pem").read_bytes(), (p / "ca.key").read_bytes(), (p / "chain.pem").read_bytes(),
                  None, None)
    (d / config_mod.CONFIG_NAME).write_text(config_mod.render_default())
    # hundreds of bad requests from 127.0.0.1 in one app under a clock that stands still: the
    # rate limits would answer them all alike; this test is about the parser
    env = {"SCEPD_SCEP_STATIC_CHALLENGE": "vector-challenge", "SCEPD_SCEP_LEGACY_ALGORITHMS": "1",
           "SCEPD_LIMITS_ENABLED": "0"}
    services = await open_services(config_mod.load(d, environ=env), FixedClock(CAPTURE_TIME))
    return await aiohttp_client(create_app(services, close_services=True))


@pytest.mark.parametrize("source", SOURCES)
async def test_mutated_messages_get_400_or_a_signed_reply(vector_client, source):
    rng = random.Random(f"scepd-{source}")
    original = (VECTORS / f"{source}.der").read_bytes()
    statuses = {}
    for _ in range(150):  # bounded: 150 mutants per source
        resp = await vector_client.post("/scep?operation=PKIOperation", data=mutate(original, rng))
        body = await resp.read()
        assert resp.status in (200, 400), (resp.status, body[:200])
        if resp.status == 200:
            rep = wire.decode_cert_rep(body)  # a well-formed, verifiable CertRep
            assert rep.status in (wire.PkiStatus.SUCCESS, wire.PkiStatus.FAILURE)
        else:
            text = body.decode()
            assert text.count("\n") == 1 and "Traceback" not in text and "Error" not in text
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
    assert statuses.get(400, 0) > 0  # the mutator does produce bad input


async def test_mutated_acme_requests_get_problem_documents(aiohttp_client, make_services):
    """ACME: validly signed requests whose payloads are mutated bytes, and mutated JWS bodies,
    to every POST resource: always a problem document (or success), never a 500."""
    import json

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from scepd.http.app import create_https_app

    from .helpers import make_csr, rsa_key
    from .test_acme_jws import Acme, b64, sign
    # over 200 nonces from 127.0.0.1 under a clock that stands still: rate limits off explicitly
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret", "SCEPD_LIMITS_ENABLED": "0"})
    acme = Acme(await aiohttp_client(create_https_app(services)), rsa_key(0))
    await acme.register()
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "m.example.test"}]})
    order = await resp.json()
    oid = resp.headers["Location"].rsplit("/", 1)[1]
    authz = "/" + order["authorizations"][0].split("/", 3)[3]
    chall = "/" + (await (await acme.post(authz, None)).json())["challenges"][0]["url"].split("/", 3)[3]
    acct = "/" + acme.kid.split("/", 3)[3]
    targets = [
        ("/acme/new-order", {"identifiers": [{"type": "dns", "value": "m.example.test"}], "profile": "agent",
                             "notAfter": "2026-12-01T00:00:00Z"}),
        (f"/acme/order/{oid}/finalize", {"csr": b64(make_csr(rsa_key(1), "m.example.test"))}),
        ("/acme/revoke-cert", {"certificate": b64(b"\x30\x03\x02\x01\x01"), "reason": 1}),
        (acct, {"contact": ["mailto:a@example.test"]}),
        (authz, {"status": "deactivated"}),
        (chall, {}),
        ("/acme/key-change", {"protected": "e30", "payload": "e30", "signature": ""}),
    ]
    rng = random.Random("scepd-acme")
    seen = set()
    for path, payload in targets:
        raw = json.dumps(payload).encode()
        for _ in range(25):  # bounded: 25 signed mutants and 5 broken bodies per resource
            mutant = mutate(raw, rng)
            protected = {"alg": "RS256", "nonce": await acme.nonce(), "url": acme.url(path), "kid": acme.kid}
            p64, pl64 = b64(json.dumps(protected).encode()), b64(mutant)
            sig = acme.key.sign(f"{p64}.{pl64}".encode(), padding.PKCS1v15(), hashes.SHA256())
            body = json.dumps({"protected": p64, "payload": pl64, "signature": b64(sig)}).encode()
            resp = await acme.client.post(path, data=body, headers={"Content-Type": "application/jose+json"})
            assert resp.status != 500 and "Replay-Nonce" in resp.headers, (path, mutant, await resp.text())
            if resp.status >= 400:
                assert resp.headers["Content-Type"].startswith("application/problem+json")
                doc = await resp.json()
                assert doc["type"].startswith("urn:ietf:params:acme:error:") and "Traceback" not in doc["detail"]
                seen.add(doc["type"])
        for _ in range(5):
            body = mutate(sign(acme.key, {"alg": "RS256", "nonce": await acme.nonce(), "url": acme.url(path),
                                          "kid": acme.kid}, raw, "RS256"), rng)
            resp = await acme.client.post(path, data=body, headers={"Content-Type": "application/jose+json"})
            assert resp.status != 500 and "Replay-Nonce" in resp.headers, (path, body, await resp.text())
    assert "urn:ietf:params:acme:error:malformed" in seen  # the mutator does produce bad input
