"""Malformed input never gets a 500: seeded, bounded mutations of real client captures."""
from __future__ import annotations

import random

import pytest

from scepd import config as config_mod, pki
from scepd.app import create_app, open_services
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
    env = {"SCEPD_SCEP_STATIC_CHALLENGE": "vector-challenge", "SCEPD_SCEP_LEGACY_ALGORITHMS": "1"}
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
