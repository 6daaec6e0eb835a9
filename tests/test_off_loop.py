"""Signature verification, RSA decryption and signing never run on the event loop: each such
function is wrapped to record whether it ran in the loop's thread, then driven through the real
app. (/readyz and OCSP signing already ran in worker threads.)"""
from __future__ import annotations

import asyncio

import pytest

import scepd.enroll.renewal
import scepd.scep.service
from acme import jws
from scepd.http.app import SERVICES, create_app, create_https_app
from scepd.scep import der, wire

from .helpers import make_csr, pkcs_req, reply_certs, rsa_key, self_signed
from .test_acme_jws import Acme


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


@pytest.fixture
def on_loop(monkeypatch):
    """on_loop(module, name) -> list: one entry per call of module.name, True if on the loop."""
    def watch(module, name: str) -> list[bool]:
        calls: list[bool] = []
        real = getattr(module, name)

        def spy(*args, **kwargs):
            calls.append(_on_loop())
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
        return calls
    return watch


async def post_scep(client, der_bytes: bytes) -> wire.DecodedCertRep:
    resp = await client.post("/scep?operation=PKIOperation", data=der_bytes)
    assert resp.status == 200, await resp.text()
    return wire.decode_cert_rep(await resp.read())


def request(client, key, cn: str, challenge: str | None = "static-secret", **kw) -> bytes:
    ca = client.server.app[SERVICES].ca_material.cert
    return pkcs_req(ca, key, kw.pop("csr", None) or make_csr(key, cn, challenge), **kw)[0]


async def test_failure_reply_is_signed_off_the_loop(client, on_loop):
    signed = on_loop(wire, "encode_cert_rep")
    rep = await post_scep(client, request(client, rsa_key(0), "wrong", challenge="wrong"))
    assert rep.status == wire.PkiStatus.FAILURE
    assert signed == [False]


async def test_pending_reply_is_signed_off_the_loop(aiohttp_client, make_services, on_loop):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_REQUIRE_APPROVAL": "1"})
    client = await aiohttp_client(create_app(services))
    signed = on_loop(wire, "encode_cert_rep")
    rep = await post_scep(client, request(client, rsa_key(0), "waits"))
    assert rep.status == wire.PkiStatus.PENDING
    assert signed == [False]


async def test_csr_signature_is_verified_off_the_loop(client, on_loop):
    verified = on_loop(scepd.scep.service, "decode_csr")
    rep = await post_scep(client, request(client, rsa_key(0), "csr-check"))
    assert rep.status == wire.PkiStatus.SUCCESS
    assert verified == [False]


async def test_renewal_signer_is_verified_off_the_loop(client, on_loop):
    key = rsa_key(0)
    signer = (self_signed(key), key)
    cert = reply_certs(await post_scep(client, request(client, key, "renew-me", signer=signer)), *signer)[0]
    checked = on_loop(scepd.enroll.renewal, "issued_by_us")
    new_key = rsa_key(1)
    rep = await post_scep(client, request(client, new_key, "renew-me", challenge=None, signer=(cert, key),
                                          csr=make_csr(new_key, "renew-me")))
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    assert checked == [False]


async def test_getcrl_reply_is_signed_off_the_loop(client, on_loop):
    key = rsa_key(0)
    signer = (self_signed(key), key)
    cert = reply_certs(await post_scep(client, request(client, key, "crl-asker", signer=signer)), *signer)[0]
    ca = client.server.app[SERVICES].ca_material.cert
    signed = on_loop(wire, "encode_cert_rep")
    ias = der.seq(ca.subject.public_bytes(), der.integer(cert.serial_number))
    rep = await post_scep(client, pkcs_req(ca, key, ias, message_type=22, signer=(cert, key))[0])
    assert rep.status == wire.PkiStatus.SUCCESS
    assert signed == [False]


async def test_get_next_ca_cert_is_signed_off_the_loop(client, on_loop):
    services = client.server.app[SERVICES]
    services.scep.next_ca = (services.ca_material.cert,)  # what is announced does not matter here
    signed = on_loop(wire, "encode_next_ca_certs")
    resp = await client.get("/scep?operation=GetNextCACert")
    assert resp.status == 200
    assert signed == [False]


async def test_acme_jws_is_verified_off_the_loop(aiohttp_client, services, on_loop):
    verified = on_loop(jws, "verify")
    a = Acme(await aiohttp_client(create_https_app(services)), rsa_key(0))
    await a.register()
    resp = await a.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "l.example.test"}]})
    assert resp.status == 201
    assert verified == [False, False]
