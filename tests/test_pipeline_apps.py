"""The one enrollment pipeline seen through the front ends: SCEP challenges scoped to names and
a profile, SCEP renewal keeping the renewed certificate's profile, and ACME orders through the
external check and approval (`scepd pending approve` / `reject` while the order is processing)."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from scepd.http.app import SERVICES, create_https_app
from scepd.errors import FailInfo
from scepd.ca.csr import decode_csr
from scepd.enroll.pipeline import Authorization, CsrRequest
from scepd.scep import wire

from .helpers import make_csr, pkcs_req, rsa_key, self_signed
from .test_acme_ari import path_of, responder, thumb  # noqa: F401  (fixture)
from .test_acme_jws import P, Acme, b64
from .test_lifecycle import _enroll
from .test_scep_http import enroll


def ekus(cert: x509.Certificate) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def issued_cert(rep, signer) -> x509.Certificate:
    from .helpers import reply_certs
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    return reply_certs(rep, *signer)[0]


# --- SCEP ---------------------------------------------------------------------------------------

async def test_scep_challenge_scoped_to_names(client):
    services = client.server.app[SERVICES]
    secret = await services.challenges.create(dt.timedelta(hours=1), names=["dev-*.example"])
    rep, _ = await enroll(client, challenge=secret, cn="dev-1.example", sans=[x509.DNSName("www.other.example")])
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_REQUEST
    assert "www.other.example" in rep.fail_info_text
    rep, signer = await enroll(client, challenge=secret, cn="dev-1.example")
    cert = issued_cert(rep, signer)
    assert cert.subject.rfc4514_string() == "CN=dev-1.example"
    # consumed by that issuance
    rep, _ = await enroll(client, rsa_key(1), challenge=secret, cn="dev-2.example")
    assert rep.status == wire.PkiStatus.FAILURE and "already used" in rep.fail_info_text


async def test_scep_static_challenge_scoped_by_static_challenge_names(aiohttp_client, make_services):
    from scepd.http.app import create_app
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_STATIC_CHALLENGE_NAMES": "*.devices.example"})
    client = await aiohttp_client(create_app(services))
    rep, _ = await enroll(client, cn="cam-1.devices.example", sans=[x509.DNSName("bank.example")])
    assert rep.status == wire.PkiStatus.FAILURE and "'bank.example' is outside" in rep.fail_info_text
    rep, signer = await enroll(client, cn="cam-1.devices.example")
    assert issued_cert(rep, signer).subject.rfc4514_string() == "CN=cam-1.devices.example"


async def test_scep_renewal_of_an_acme_agent_certificate_stays_agent(client):
    """An `agent` certificate (clientAuth only, here from ACME) renewed over SCEP keeps its
    profile: it does not become `device` ([scep] profile) and gain serverAuth."""
    services = client.server.app[SERVICES]
    old_key, new_key = rsa_key(0), rsa_key(1)
    der = make_csr(old_key, "agent-7.example", None, [x509.DNSName("agent-7.example")])
    old = (await services.pipeline.enroll(
        Authorization("acme-account", protocol="acme", names=("agent-7.example",), profile="agent",
                      transaction_id="order-1"), CsrRequest(decode_csr(der), der))).issued
    assert ekus(old.cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    rep, signer = await _enroll(client, new_key, cn="agent-7.example", challenge=None,
                                sans=[x509.DNSName("agent-7.example")], signer=(old.cert, old_key))
    new = issued_cert(rep, signer)
    assert ekus(new) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    record = await services.store.get_certificate(format(new.serial_number, "x"))
    assert (record.profile, record.protocol) == ("agent", "scep")
    # a first enrollment over SCEP still gets [scep] profile = device
    rep, signer = await enroll(client, rsa_key(2), cn="dev-9")
    assert ExtendedKeyUsageOID.SERVER_AUTH in ekus(issued_cert(rep, signer))


def check_script(tmp_path, allow: bool, reason: str = "not in the CMDB") -> str:
    """An external check that keeps its input (payload.json) and allows or denies."""
    script = tmp_path / "check.sh"
    script.write_text(f"#!/bin/sh\ncat > '{tmp_path}/payload.json'\necho '{reason}'\nexit {0 if allow else 1}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


async def test_scep_external_check_gets_protocol_scep_from_policy_key(aiohttp_client, make_services, tmp_path):
    from scepd.http.app import create_app
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_POLICY_CSR_CHECK_COMMAND": check_script(tmp_path, False)})
    client = await aiohttp_client(create_app(services))
    rep, _ = await enroll(client, cn="dev-1")
    assert rep.status == wire.PkiStatus.FAILURE and "not in the CMDB" in rep.fail_info_text
    payload = json.loads((tmp_path / "payload.json").read_text())
    assert (payload["protocol"], payload["authorization"], payload["profile"]) == ("scep", "challenge", "device")


# --- ACME ---------------------------------------------------------------------------------------

@pytest.fixture
async def acme_lab(aiohttp_client, make_services, responder):  # noqa: F811
    async def make(**env):
        server, tokens = responder
        services = await make_services({"SCEPD_ACME_HTTP01_PORT": str(server.port),
                                        "SCEPD_ACME_RESOLVE": "*=127.0.0.1", **env})
        app = create_https_app(services)
        client = await aiohttp_client(app)
        a = Acme(client, rsa_key(0))
        await a.register()
        from acme.server import ACME
        a.tokens, a.services, a.service = tokens, services, app[ACME]
        return a
    return make


async def ready_order(acme, name: str) -> tuple[dict, str]:
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": name}]})
    assert resp.status == 201
    order, url = await resp.json(), path_of(resp.headers["Location"])
    authz = await (await acme.post(path_of(order["authorizations"][0]), None)).json()
    ch = next(c for c in authz["challenges"] if c["type"] == "http-01")
    acme.tokens[ch["token"]] = f"{ch['token']}.{thumb(acme.key)}"
    assert (await acme.post(path_of(ch["url"]), {})).status == 200
    for _ in range(100):  # bounded polling of the background validation
        order = await (await acme.post(url, None)).json()
        if order["status"] != "pending":
            break
        await asyncio.sleep(0.05)
    assert order["status"] == "ready", order
    return order, url


async def poll(acme, url: str, until=("processing",), rounds=200) -> tuple[dict, object]:
    for _ in range(rounds):  # bounded: 200 x 50 ms
        resp = await acme.post(url, None)
        body = await resp.json()
        if body["status"] not in until:
            return body, resp
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} still {body['status']}")


async def finalize(acme, order, name) -> tuple[object, dict]:
    csr = make_csr(rsa_key(1), None, sans=[x509.DNSName(name)])
    resp = await acme.post(path_of(order["finalize"]), {"csr": b64(csr)})
    return resp, await resp.json()


async def test_acme_order_denied_by_the_external_check_carries_its_reason(acme_lab, tmp_path):
    lab = await acme_lab(SCEPD_POLICY_CSR_CHECK_COMMAND=check_script(tmp_path, False))
    order, url = await ready_order(lab, "web.example.test")
    resp, body = await finalize(lab, order, "web.example.test")
    if resp.status == 200:  # answered `processing`: the check was slower than finalize's wait
        body, resp = await poll(lab, url)
        body = body["error"]
    assert body["type"] == P + "unauthorized" and "not in the CMDB" in body["detail"], body
    order, _ = await poll(lab, url)
    assert order["status"] == "invalid" and "not in the CMDB" in order["error"]["detail"]
    payload = json.loads((tmp_path / "payload.json").read_text())
    assert (payload["protocol"], payload["authorization"], payload["profile"], payload["challenge"]) == \
        ("acme", "acme-account", "server", None)
    assert payload["sans"] == ["DNS:web.example.test"]


async def test_acme_order_allowed_by_the_external_check_is_issued(acme_lab, tmp_path):
    lab = await acme_lab(SCEPD_POLICY_CSR_CHECK_COMMAND=check_script(tmp_path, True))
    order, url = await ready_order(lab, "ok.example.test")
    await finalize(lab, order, "ok.example.test")
    order, _ = await poll(lab, url)
    assert order["status"] == "valid", order


@pytest.mark.parametrize("decision", ["approve", "reject"])
async def test_acme_order_waits_for_approval(acme_lab, decision):
    lab = await acme_lab(SCEPD_POLICY_REQUIRE_APPROVAL="acme")
    order, url = await ready_order(lab, "wait.example.test")
    resp, body = await finalize(lab, order, "wait.example.test")
    assert resp.status == 200 and body["status"] == "processing" and resp.headers["Retry-After"] == "1"
    [pending] = await lab.services.store.list_pending()
    oid = url.rsplit("/", 1)[1]
    assert (pending.protocol, pending.transaction_id, pending.profile) == ("acme", oid, "server")
    resp = await lab.post(url, None)  # it keeps waiting, whoever asks
    assert (await resp.json())["status"] == "processing" and resp.headers["Retry-After"] == "1"
    if decision == "approve":  # as `scepd pending approve ID` does, from another process
        await lab.services.enrollment.approve_pending(pending.id, "cli")
        order, _ = await poll(lab, url)
        assert order["status"] == "valid", order
        pem = await (await lab.post(path_of(order["certificate"]), None)).read()
        cert = x509.load_pem_x509_certificates(pem)[0]
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName) == ["wait.example.test"]
    else:
        await lab.services.enrollment.reject_pending(pending.id, "unknown host", "cli")
        order, _ = await poll(lab, url)
        assert order["status"] == "invalid" and "unknown host" in order["error"]["detail"], order


async def test_scep_approval_only_when_listed(acme_lab):
    """require_approval = acme: SCEP requests do not wait, ACME ones do."""
    lab = await acme_lab(SCEPD_POLICY_REQUIRE_APPROVAL="acme", SCEPD_SCEP_STATIC_CHALLENGE="static-secret")
    der = make_csr(rsa_key(2), "dev-1", "static-secret")
    signer = (self_signed(rsa_key(2)), rsa_key(2))
    msg, _, _ = pkcs_req(lab.services.ca_material.cert, rsa_key(2), der, signer=signer)
    reply, _ = await lab.services.scep.pki_operation(msg)
    assert wire.decode_cert_rep(reply).status == wire.PkiStatus.SUCCESS
    assert await lab.services.store.list_pending() == []
