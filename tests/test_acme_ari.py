"""ACME issuance through the app with a real http-01 responder on loopback, then ARI (RFC 9773):
renewalInfo windows, `scepd certs renew-now`, revocation, and `replaces` (alreadyReplaced)."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json

import pytest
from aiohttp import web
from click.testing import CliRunner
from cryptography import x509

from scepd.http.app import create_https_app
from scepd.ca.revocation import RevocationReason

from .helpers import make_csr, rsa_key
from .test_acme_jws import P, Acme, b64, problem_type

import josepy


@pytest.fixture
async def responder(aiohttp_server):
    tokens: dict[str, str] = {}

    async def challenge(request):
        token = request.match_info["token"]
        return web.Response(text=tokens.get(token, "nope"), status=200 if token in tokens else 404)
    app = web.Application()
    app.router.add_get("/.well-known/acme-challenge/{token}", challenge)
    server = await aiohttp_server(app)
    return server, tokens


@pytest.fixture
async def acme(aiohttp_client, make_services, responder):
    server, tokens = responder
    services = await make_services({"SCEPD_ACME_HTTP01_PORT": str(server.port), "SCEPD_ACME_RESOLVE": "*=127.0.0.1"})
    client = await aiohttp_client(create_https_app(services))
    a = Acme(client, rsa_key(0))
    await a.register()
    a.tokens, a.services = tokens, services
    return a


def thumb(key) -> str:
    jwk = josepy.JWKRSA(key=key.public_key())
    return base64.urlsafe_b64encode(jwk.thumbprint()).rstrip(b"=").decode()


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


async def issue(acme: Acme, names: list[str], replaces: str | None = None, key_index: int = 1):
    payload = {"identifiers": [{"type": "dns", "value": n} for n in names]}
    if replaces:
        payload["replaces"] = replaces
    resp = await acme.post("/acme/new-order", payload)
    if resp.status != 201:
        return resp, None
    order = await resp.json()
    order_path = path_of(resp.headers["Location"])
    for authz_url in order["authorizations"]:
        authz = await (await acme.post(path_of(authz_url), None)).json()
        ch = authz["challenges"][0]
        acme.tokens[ch["token"]] = f"{ch['token']}.{thumb(acme.key)}"
        assert (await acme.post(path_of(ch["url"]), {})).status == 200
    for _ in range(100):  # bounded polling of the background validation
        order = await (await acme.post(order_path, None)).json()
        if order["status"] != "pending":
            break
        await asyncio.sleep(0.05)
    assert order["status"] == "ready", order
    csr = make_csr(rsa_key(key_index), None, sans=[x509.DNSName(n) for n in names])
    resp = await acme.post(path_of(order["finalize"]), {"csr": b64(csr)})
    order = await resp.json()
    assert order["status"] == "valid", order
    resp = await acme.post(path_of(order["certificate"]), None)
    assert resp.headers["Content-Type"] == "application/pem-certificate-chain"
    chain = x509.load_pem_x509_certificates(await resp.read())
    chain[0].verify_directly_issued_by(acme.services.ca_material.cert)
    return resp, chain[0]


def cert_id(cert: x509.Certificate) -> str:
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    serial = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 8) // 8, "big")
    return f"{b64(aki)}.{b64(serial)}"


async def window(acme, cert):
    resp = await acme.client.get(f"/acme/renewal-info/{cert_id(cert)}")
    assert resp.status == 200 and resp.headers["Retry-After"]
    w = (await resp.json())["suggestedWindow"]
    return dt.datetime.fromisoformat(w["start"].replace("Z", "+00:00")), \
        dt.datetime.fromisoformat(w["end"].replace("Z", "+00:00"))


async def test_renewal_info_window_renew_now_and_revoked(acme, state_dir):
    _, cert = await issue(acme, ["ari.example.test"])
    start, end = await window(acme, cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs((cert.not_valid_after_utc - start) - lifetime / 3) < dt.timedelta(minutes=1)
    assert start < end < cert.not_valid_after_utc
    from scepd.cli import main
    result = await asyncio.to_thread(CliRunner().invoke, main, [
        "certs", "renew-now", "--state-dir", str(state_dir), format(cert.serial_number, "x")])
    assert result.exit_code == 0, result.output
    start, end = await window(acme, cert)
    assert end < acme.services.clock.now()
    _, other = await issue(acme, ["ari2.example.test"], key_index=2)
    await acme.services.revocation.revoke(format(other.serial_number, "x"), RevocationReason.KEY_COMPROMISE, "t")
    assert (await window(acme, other))[1] < acme.services.clock.now()


async def test_renewal_info_unknown_and_malformed(acme):
    assert (await acme.client.get("/acme/renewal-info/nodot")).status == 400
    assert (await acme.client.get(f"/acme/renewal-info/{b64(b'x' * 20)}.{b64(b'1')}")).status == 404


async def test_replaces_once(acme):
    _, cert = await issue(acme, ["rp.example.test"])
    _, new = await issue(acme, ["rp.example.test"], replaces=cert_id(cert), key_index=2)
    assert new is not None
    resp, _ = await issue(acme, ["rp.example.test"], replaces=cert_id(cert), key_index=3)
    assert resp.status == 409 and await problem_type(resp) == P + "alreadyReplaced"
    other = Acme(acme.client, rsa_key(2))
    await other.register()
    other.tokens, other.services = acme.tokens, acme.services
    resp, _ = await issue(other, ["rp.example.test"], replaces=cert_id(new))
    assert await problem_type(resp) == P + "unauthorized"


async def test_failed_challenge_invalidates_order(acme):
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "bad.example.test"}]})
    order_path = path_of(resp.headers["Location"])
    order = await resp.json()
    authz = await (await acme.post(path_of(order["authorizations"][0]), None)).json()
    await acme.post(path_of(authz["challenges"][0]["url"]), {})  # responder does not know the token
    for _ in range(100):
        order = await (await acme.post(order_path, None)).json()
        if order["status"] != "pending":
            break
        await asyncio.sleep(0.05)
    assert order["status"] == "invalid"
    authz = await (await acme.post(path_of(order["authorizations"][0]), None)).json()
    assert authz["status"] == "invalid"
    assert authz["challenges"][0]["error"]["type"] == P + "incorrectResponse"


async def test_finalize_checks_csr_names_and_key(acme):
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "csr.example.test"}]})
    order = await resp.json()
    authz = await (await acme.post(path_of(order["authorizations"][0]), None)).json()
    ch = authz["challenges"][0]
    acme.tokens[ch["token"]] = f"{ch['token']}.{thumb(acme.key)}"
    await acme.post(path_of(ch["url"]), {})
    for _ in range(100):
        if (await (await acme.post(path_of(resp.headers["Location"]), None)).json())["status"] == "ready":
            break
        await asyncio.sleep(0.05)
    wrong = make_csr(rsa_key(1), None, sans=[x509.DNSName("other.example.test")])
    r = await acme.post(path_of(order["finalize"]), {"csr": b64(wrong)})
    assert await problem_type(r) == P + "badCSR"
    same_key = make_csr(acme.key, None, sans=[x509.DNSName("csr.example.test")])
    r = await acme.post(path_of(order["finalize"]), {"csr": b64(same_key)})
    assert await problem_type(r) == P + "badCSR"
    assert json.loads(await (await acme.post(path_of(resp.headers["Location"]), None)).text())["status"] == "ready"


async def test_acme_log_lines_carry_the_order_id(acme, caplog):
    import logging

    from scepd.ops.logctx import ContextFilter
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(ContextFilter())  # as `scepd serve` installs it on its handler
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "log.example.test"}]})
    order_id = resp.headers["Location"].rsplit("/", 1)[1]
    await acme.post(f"/acme/order/{order_id}/finalize", {"csr": b64(make_csr(rsa_key(1), "log.example.test"))})
    refused = [r for r in caplog.records if "refused" in r.getMessage() and "finalize" in r.getMessage()]
    assert refused and all(getattr(r, "transaction_id", None) == order_id for r in refused)
