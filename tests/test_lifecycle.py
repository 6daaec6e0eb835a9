"""SCEP lifecycle: renewal, PENDING + approval + polling, GetCert, GetNextCACert, RA, external check."""
from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from scepd import config as config_mod
from scepd.ca import pki
from scepd.http.app import SERVICES, create_app, open_services
from scepd.clock import FixedClock
from scepd.errors import FailInfo
from scepd.ca.revocation import RevocationReason
from scepd.scep import der, wire
from scepd.store import CertificateRecord

from .helpers import VECTORS, make_csr, pkcs_req, reply_certs, rsa_key, self_signed
from .test_subject import cert_subject_der, csr_subject_der
from .test_vectors import CAPTURE_TIME, _openssl_open, load_pair, sidecar


async def post(client, message: bytes) -> wire.DecodedCertRep:
    resp = await client.post("/scep?operation=PKIOperation", data=message)
    assert resp.status == 200, await resp.text()
    return wire.decode_cert_rep(await resp.read())


def vector(name: str) -> bytes:
    return (VECTORS / f"{name}.der").read_bytes()


# --- renewal: real client captures ------------------------------------------------------------

@pytest.mark.parametrize("name", ["sscep-0.10.0-pkcsreq-aes128-sha256-post-renewal",
                                  "sscep-0.10.0-pkcsreq-aes128-sha256-post-renewal-challenge",
                                  "certmonger-0.79.17-pkcsreq-aes256-sha256-get-renewal"])
async def test_replayed_renewal_signed_by_old_cert(aiohttp_client, vector_state, tmp_path, name):
    meta = sidecar(name)
    # no static challenge at all: the old certificate is the only credential
    services = await open_services(config_mod.load(vector_state, environ={}), FixedClock(CAPTURE_TIME))
    client = await aiohttp_client(create_app(services, close_services=True))
    if meta["http_method"] == "GET":
        resp = await client.get(meta["request_target"])
        rep = wire.decode_cert_rep(await resp.read())
    else:
        rep = await post(client, vector(name))
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    key = serialization.load_pem_private_key((VECTORS / "pki" / "old.key").read_bytes(), None)
    leaf = reply_certs(rep, load_pair("old").cert, key)[0]
    csr = x509.load_pem_x509_csr((VECTORS / meta["csr_file"].split(" ")[0]).read_bytes())
    assert leaf.public_key() == csr.public_key()
    assert cert_subject_der(leaf) == csr_subject_der(csr.public_bytes(serialization.Encoding.DER))
    records = await services.store.list_certificates()
    assert len(records) == 1
    audit = await services.store.list_audit()
    assert audit[0].event == "certificate.renewed"
    assert audit[0].details["renewal_of"] == format(load_pair("old").cert.serial_number, "x")
    assert audit[0].details["challenge"] == "renewal"


async def test_replayed_renewal_reply_opens_with_openssl(aiohttp_client, vector_state, tmp_path):
    services = await open_services(config_mod.load(vector_state, environ={}), FixedClock(CAPTURE_TIME))
    client = await aiohttp_client(create_app(services, close_services=True))
    resp = await client.post("/scep?operation=PKIOperation",
                             data=vector("sscep-0.10.0-pkcsreq-aes128-sha256-post-renewal"))
    certs = _openssl_open(await resp.read(), VECTORS / "pki" / "old.key", tmp_path)
    assert certs[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "vector-device"


@pytest.mark.parametrize("same_key", [False, True])
async def test_replayed_scepclient_renewalreq_same_key(aiohttp_client, vector_state, same_key):
    env = {"SCEPD_SCEP_LEGACY_ALGORITHMS": "1", "SCEPD_SCEP_RENEWAL_SAME_KEY": "1" if same_key else "0"}
    services = await open_services(config_mod.load(vector_state, environ=env), FixedClock(CAPTURE_TIME))
    client = await aiohttp_client(create_app(services, close_services=True))
    rep = await post(client, vector("scepclient-2.1.0-renewalreq-des-sha1-post"))
    if same_key:
        assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    else:
        assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_REQUEST
        assert "new key" in rep.fail_info_text


# --- GetCert / CertPoll captures --------------------------------------------------------------

def _old_record() -> CertificateRecord:
    old = load_pair("old").cert
    return CertificateRecord(
        serial=format(old.serial_number, "x"), ca_id="vector", subject=old.subject.rfc4514_string(),
        sans=(), not_before=old.not_valid_before_utc, not_after=old.not_valid_after_utc, profile="device",
        protocol="import", transaction_id=None, requester=None, spki_sha256="0" * 64,
        der=old.public_bytes(serialization.Encoding.DER), issued_at=CAPTURE_TIME)


@pytest.mark.parametrize("known", [True, False])
async def test_replayed_getcert(aiohttp_client, vector_state, known):
    services = await open_services(config_mod.load(vector_state, environ={}), FixedClock(CAPTURE_TIME))
    client = await aiohttp_client(create_app(services, close_services=True))
    if known:
        async with services.store.transaction() as tx:
            await tx.insert_certificate(_old_record())
    rep = await post(client, vector("sscep-0.10.0-getcert-aes128-sha256-post"))
    assert rep.transaction_id == "SSCEP transactionId"
    if known:
        assert rep.status == wire.PkiStatus.SUCCESS
        key = serialization.load_pem_private_key((VECTORS / "pki" / "old.key").read_bytes(), None)
        assert reply_certs(rep, load_pair("old").cert, key)[0] == load_pair("old").cert
    else:
        assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_CERT_ID


async def test_replayed_sscep_pending_then_poll(aiohttp_client, vector_state):
    env = {"SCEPD_SCEP_STATIC_CHALLENGE": "vector-challenge", "SCEPD_SCEP_REQUIRE_APPROVAL": "1"}
    services = await open_services(config_mod.load(vector_state, environ=env), FixedClock(CAPTURE_TIME))
    client = await aiohttp_client(create_app(services, close_services=True))
    name = "sscep-0.10.0-certpoll-aes128-sha256-post"
    rep = await post(client, vector(f"{name}.pkcsreq"))
    assert rep.status == wire.PkiStatus.PENDING
    assert (await post(client, vector(name))).status == wire.PkiStatus.PENDING
    [pending] = await services.store.list_pending()
    await services.enrollment.approve_pending(pending.id, "test")
    rep = await post(client, vector(name))
    assert rep.status == wire.PkiStatus.SUCCESS
    key = serialization.load_pem_private_key((VECTORS / f"{name}.key.pem").read_bytes(), None)
    signer = wire.decode_pki_message(vector(name)).signer_cert
    leaf = reply_certs(rep, signer, key)[0]
    assert leaf.public_key() == key.public_key()


async def test_replayed_certmonger_resend_is_a_poll(aiohttp_client, vector_state):
    env = {"SCEPD_SCEP_STATIC_CHALLENGE": "vector-challenge", "SCEPD_SCEP_REQUIRE_APPROVAL": "1"}
    services = await open_services(config_mod.load(vector_state, environ=env), FixedClock(CAPTURE_TIME))
    client = await aiohttp_client(create_app(services, close_services=True))
    meta = sidecar("certmonger-0.79.17-pkcsreq-aes256-sha256-get")
    for _ in range(2):  # certmonger polls by re-sending the identical request
        rep = wire.decode_cert_rep(await (await client.get(meta["request_target"])).read())
        assert rep.status == wire.PkiStatus.PENDING
    assert len(await services.store.list_pending()) == 1
    # its (never sent) GetCertInitial names the root as issuer: matched by transaction + key anyway
    assert (await post(client, vector("certmonger-0.79.17-certpoll-aes256-sha256-notsent"))).status \
        == wire.PkiStatus.PENDING
    [pending] = await services.store.list_pending()
    await services.enrollment.reject_pending(pending.id, "unknown device", "test")
    rep = wire.decode_cert_rep(await (await client.get(meta["request_target"])).read())
    assert rep.status == wire.PkiStatus.FAILURE and "unknown device" in rep.fail_info_text


async def test_certpoll_for_unknown_transaction(aiohttp_client, vector_state):
    services = await open_services(config_mod.load(vector_state, environ={}), FixedClock(CAPTURE_TIME))
    client = await aiohttp_client(create_app(services, close_services=True))
    rep = await post(client, vector("sscep-0.10.0-certpoll-aes128-sha256-post"))
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_REQUEST


# --- renewal with our own CA ----------------------------------------------------------------------

async def _enroll(client, key, cn="dev-1", challenge="static-secret", signer=None, message_type=19,
                  sans=None, transaction_id=None) -> tuple[wire.DecodedCertRep, tuple]:
    ca = client.server.app[SERVICES].ca_material.cert
    signer = signer or (self_signed(key), key)
    der_msg, _, _ = pkcs_req(ca, key, make_csr(key, cn, challenge, sans), signer=signer,
                             message_type=message_type, transaction_id=transaction_id)
    return await post(client, der_msg), signer


async def _issued(client, key, cn="dev-1", **kw) -> x509.Certificate:
    rep, signer = await _enroll(client, key, cn, **kw)
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    return reply_certs(rep, *signer)[0]


@pytest.mark.parametrize("message_type", [17, 19])
async def test_renewal_needs_no_challenge(client, message_type):
    old_key, new_key = rsa_key(0), rsa_key(1)
    old = await _issued(client, old_key)
    rep, signer = await _enroll(client, new_key, challenge=None, signer=(old, old_key),
                                message_type=message_type)
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    new = reply_certs(rep, *signer)[0]
    assert new.public_key() == new_key.public_key() and new.serial_number != old.serial_number


async def test_renewalreq_from_self_signed_is_refused(client):
    rep, _ = await _enroll(client, rsa_key(0), challenge="static-secret", message_type=17)
    assert rep.status == wire.PkiStatus.FAILURE and "must be signed" in rep.fail_info_text


@pytest.mark.parametrize("case", ["revoked", "expired", "forged", "cn-changed", "new-san", "same-key"])
async def test_renewal_refusals(client, case):
    services = client.server.app[SERVICES]
    old_key, new_key = rsa_key(0), rsa_key(1)
    old = await _issued(client, old_key, sans=[x509.DNSName("dev-1.example.test")])
    cn, sans, key = "dev-1", [x509.DNSName("dev-1.example.test")], new_key
    signer = (old, old_key)
    if case == "revoked":
        await services.revocation.revoke(format(old.serial_number, "x"), RevocationReason.KEY_COMPROMISE, "t")
    elif case == "expired":
        services.clock.advance(dt.timedelta(days=91))
    elif case == "forged":  # same issuer name, signed by a key that is not our CA's
        rogue = rsa_key(3)
        forged = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer)
                  .public_key(old_key.public_key()).serial_number(12345)
                  .not_valid_before(old.not_valid_before_utc).not_valid_after(old.not_valid_after_utc)
                  .sign(rogue, hashes.SHA256()))
        signer = (forged, old_key)
    elif case == "cn-changed":
        cn = "other"
    elif case == "new-san":
        sans = sans + [x509.DNSName("evil.example.test")]
    elif case == "same-key":
        key = old_key
    rep, _ = await _enroll(client, key, cn, challenge=None, signer=signer, sans=sans)
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_REQUEST
    expected = {"revoked": "revoked", "expired": "expired", "forged": "not issued by this CA",
                "cn-changed": "subject CN", "new-san": "cannot add", "same-key": "new key"}[case]
    assert expected in rep.fail_info_text


async def test_renewal_grace_period(aiohttp_client, make_services):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_RENEWAL_GRACE": "7d"})
    client = await aiohttp_client(create_app(services))
    old = await _issued(client, rsa_key(0))
    services.clock.advance(dt.timedelta(days=95))
    rep, _ = await _enroll(client, rsa_key(1), challenge=None, signer=(old, rsa_key(0)))
    assert rep.status == wire.PkiStatus.SUCCESS
    services.clock.advance(dt.timedelta(days=10))
    old2 = x509.load_der_x509_certificate((await services.store.list_certificates())[-1].der)
    rep, _ = await _enroll(client, rsa_key(2), challenge=None, signer=(old2, rsa_key(1)))
    assert rep.status == wire.PkiStatus.SUCCESS  # the renewed certificate is fresh again


@pytest.mark.parametrize("policy", ["revoke", "refuse"])
async def test_duplicate_subject_policies(aiohttp_client, make_services, policy):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_DUPLICATE_SUBJECTS": policy})
    client = await aiohttp_client(create_app(services))
    old = await _issued(client, rsa_key(0))
    if policy == "revoke":
        await _issued(client, rsa_key(1), challenge=None, signer=(old, rsa_key(0)))
        rec = await services.store.get_certificate(format(old.serial_number, "x"))
        assert rec.status == "revoked" and rec.revocation_reason == "superseded"
    else:
        rep, _ = await _enroll(client, rsa_key(1))
        assert rep.status == wire.PkiStatus.FAILURE and "already exists" in rep.fail_info_text
        await _issued(client, rsa_key(1), challenge=None, signer=(old, rsa_key(0)))  # renewal still fine


# --- approval across a restart -------------------------------------------------------------------

async def test_pending_survives_restart(aiohttp_client, make_services):
    env = {"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret", "SCEPD_SCEP_REQUIRE_APPROVAL": "1"}
    first = await make_services(env)
    client = await aiohttp_client(create_app(first))
    key = rsa_key(0)
    ca = first.ca_material.cert
    req, txid, _ = pkcs_req(ca, key, make_csr(key, "waiting", "static-secret"))
    assert (await post(client, req)).status == wire.PkiStatus.PENDING
    await client.close()
    await first.close()
    second = await make_services(env)  # a new process, same database
    [pending] = await second.store.list_pending()
    assert pending.transaction_id == txid
    await second.enrollment.approve_pending(pending.id, "admin")
    client = await aiohttp_client(create_app(second))
    # sscep resumes polling with a fresh self-signed signer of the same key
    poll, _, _ = pkcs_req(ca, key, der.seq(ca.subject.public_bytes(),
                                           x509.Name.from_rfc4514_string("CN=waiting").public_bytes()),
                          transaction_id=txid, message_type=20, signer=(self_signed(key, "again"), key))
    rep = await post(client, poll)
    assert rep.status == wire.PkiStatus.SUCCESS
    audit = [a.event for a in await second.store.list_audit()]
    assert "request.pending" in audit and "certificate.issued" in audit


async def test_one_time_challenge_is_spent_by_a_pending_request(aiohttp_client, make_services):
    services = await make_services({"SCEPD_SCEP_REQUIRE_APPROVAL": "1"})
    client = await aiohttp_client(create_app(services))
    secret = await services.challenges.create(dt.timedelta(hours=1))
    rep, _ = await _enroll(client, rsa_key(0), challenge=secret)
    assert rep.status == wire.PkiStatus.PENDING
    rep, _ = await _enroll(client, rsa_key(1), "dev-2", challenge=secret)
    assert rep.status == wire.PkiStatus.FAILURE


# --- rollover -----------------------------------------------------------------------------------------

async def test_rollover_next_ca_and_renewal_across_it(aiohttp_client, make_services, state_dir, tmp_path):
    env = {"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret"}
    services = await make_services(env)
    client = await aiohttp_client(create_app(services))
    assert (await client.get("/scep?operation=GetNextCACert")).status == 404
    old_key = rsa_key(0)
    old = await _issued(client, old_key)
    old_ca = services.ca_material.cert
    nxt = pki.rollover(state_dir, services.clock, (state_dir / "ca" / "root.key").read_bytes(), None, None)
    services2 = await make_services(env)
    client2 = await aiohttp_client(create_app(services2))
    resp = await client2.get("/scep?operation=GetNextCACert")
    assert resp.headers["Content-Type"] == "application/x-x509-next-ca-cert"
    body = await resp.read()
    # RFC 8894 §4.7.1, read by OpenSSL: the signature verifies to the root (chain.pem is what
    # `sscep getnextca -C` is given), the content is a certs-only PKCS#7 holding the new CA
    assert _openssl_next_ca(body, tmp_path, state_dir / "ca" / "root.pem",
                            state_dir / "ca" / "chain.pem") == [nxt]
    # the signer travels in the reply: the root alone verifies it
    assert _openssl_next_ca(body, tmp_path, state_dir / "ca" / "root.pem") == [nxt]
    decoded = wire.decode_next_ca_certs(body)
    assert decoded.signer_cert == old_ca and decoded.next_certs == [nxt]
    pki.activate_next(state_dir)
    services3 = await make_services(env)
    assert services3.ca_material.cert == nxt
    client3 = await aiohttp_client(create_app(services3))
    # a client still encrypting to the previous CA, renewing a certificate the previous CA issued
    rep, _ = await _renew_to(client3, old_ca, old, old_key, rsa_key(1))
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    new = reply_certs(rep, old, old_key)[0]
    assert new.issuer == nxt.subject
    new.verify_directly_issued_by(nxt)


def _openssl_next_ca(body: bytes, tmp_path, root_pem, chain_pem=None) -> list[x509.Certificate]:
    """`openssl cms -verify` over a GetNextCACert reply, then its content read as PKCS#7 by
    `openssl pkcs7` and by pyca: the certificates it announces."""
    (tmp_path / "next.p7").write_bytes(body)
    cmd = ["openssl", "cms", "-verify", "-inform", "DER", "-in", tmp_path / "next.p7", "-CAfile", root_pem,
           "-out", tmp_path / "content.der"]
    if chain_pem is not None:
        cmd += ["-certfile", chain_pem]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    content = (tmp_path / "content.der").read_bytes()
    printed = subprocess.run(["openssl", "pkcs7", "-inform", "DER", "-in", tmp_path / "content.der",
                              "-print_certs"], capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    certs = x509.load_pem_x509_certificates(printed.stdout.encode())
    from cryptography.hazmat.primitives.serialization import pkcs7
    assert pkcs7.load_der_pkcs7_certificates(content) == certs
    return certs


async def test_next_ca_reply_is_signed_by_the_ra_with_its_chain(aiohttp_client, tmp_path, clock):
    """With an RA the RA signs (as it signs CertReps) and its issuing CA travels with it."""
    d = tmp_path / "ra-state"
    material = pki.create(d, clock, cn="RAT", root_bits=2048)
    ra = pki.create_ra(d, material, clock, None)
    (d / config_mod.CONFIG_NAME).write_text(config_mod.render_default())
    nxt = pki.rollover(d, clock, (d / "ca" / "root.key").read_bytes(), None, None)
    services = await open_services(config_mod.load(d, environ={}), clock)
    client = await aiohttp_client(create_app(services, close_services=True))
    body = await (await client.get("/scep?operation=GetNextCACert")).read()
    assert _openssl_next_ca(body, tmp_path, d / "ca" / "root.pem") == [nxt]
    decoded = wire.decode_next_ca_certs(body)
    assert decoded.signer_cert == ra and decoded.certs == [ra, material.cert]


async def test_next_ca_reply_is_signed_once_per_ca_set(aiohttp_client, make_services, state_dir, monkeypatch):
    """GetNextCACert does not sign on every request: the reply is built when the set changes."""
    nxt = pki.rollover(state_dir, FixedClock(dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc)),
                       (state_dir / "ca" / "root.key").read_bytes(), None, None)
    services = await make_services()
    client = await aiohttp_client(create_app(services))
    signed = []
    original = wire.encode_next_ca_certs

    def counting(*args, **kw):
        signed.append(args[0])
        return original(*args, **kw)
    monkeypatch.setattr(wire, "encode_next_ca_certs", counting)
    bodies = [await (await client.get("/scep?operation=GetNextCACert")).read() for _ in range(3)]
    assert len(set(bodies)) == 1 and signed == [[nxt]]
    services.scep.next_ca = (nxt, services.ca_material.cert)
    body = await (await client.get("/scep?operation=GetNextCACert")).read()
    assert wire.decode_next_ca_certs(body).next_certs == [nxt, services.ca_material.cert]
    assert len(signed) == 2


async def _renew_to(client, recipient, old, old_key, new_key):
    req, _, _ = pkcs_req(recipient, new_key, make_csr(new_key, "dev-1"), signer=(old, old_key),
                         message_type=17)
    return await post(client, req), None


# --- RA with an EC issuing CA ---------------------------------------------------------------------------

async def test_ra_with_ec_issuing_ca(aiohttp_client, tmp_path, clock):
    d = tmp_path / "ra-state"
    material = pki.create(d, clock, cn="ECT", root_bits=2048, ca_key_type="ec")
    pki.create_ra(d, material, clock, None)
    (d / config_mod.CONFIG_NAME).write_text(config_mod.render_default())
    services = await open_services(config_mod.load(d, environ={"SCEPD_SCEP_STATIC_CHALLENGE": "s"}), clock)
    client = await aiohttp_client(create_app(services, close_services=True))
    certs = wire.certs_from_certs_only(await (await client.get("/scep?operation=GetCACert")).read())
    ra = x509.load_pem_x509_certificate((d / "ca" / "ra.pem").read_bytes())
    assert certs == [ra, material.cert, material.root]
    key = rsa_key(0)
    req, _, _ = pkcs_req(ra, key, make_csr(key, "behind-ra", "s"))
    rep = await post(client, req)
    assert rep.status == wire.PkiStatus.SUCCESS and rep.signer_cert == ra
    leaf = reply_certs(rep, wire.decode_pki_message(req).signer_cert, key)[0]
    assert isinstance(material.key, ec.EllipticCurvePrivateKey)
    leaf.verify_directly_issued_by(material.cert)
    assert stat.S_IMODE((d / "ca" / "ra.key").stat().st_mode) == 0o600


# --- external CSR check --------------------------------------------------------------------------------

@pytest.mark.parametrize("verdict", ["allow", "deny", "slow"])
async def test_external_check_command(aiohttp_client, make_services, tmp_path, verdict):
    script = tmp_path / "check.sh"
    body = {"allow": "cat > %s/seen.json; exit 0" % tmp_path,
            "deny": "cat >/dev/null; echo 'device not in inventory'; exit 1",
            "slow": "sleep 5; exit 0"}[verdict]
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_CSR_CHECK_COMMAND": str(script),
                                    "SCEPD_SCEP_CSR_CHECK_TIMEOUT": "1"})
    client = await aiohttp_client(create_app(services))
    rep, _ = await _enroll(client, rsa_key(0), "checked")
    if verdict == "allow":
        assert rep.status == wire.PkiStatus.SUCCESS
        seen = json.loads((tmp_path / "seen.json").read_text())
        assert seen["common_name"] == "checked" and seen["challenge"] == "static-secret"
        assert "BEGIN CERTIFICATE REQUEST" in seen["csr_pem"]
    else:
        assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_REQUEST
        assert ("device not in inventory" if verdict == "deny" else "timed out") in rep.fail_info_text
        assert await services.store.list_certificates() == []


@pytest.mark.parametrize("answer,ok", [({"allow": True}, True), ({"allow": False, "reason": "nope"}, False),
                                       (None, False)])
async def test_external_check_webhook(aiohttp_client, aiohttp_server, make_services, answer, ok):
    async def hook(request):
        payload = await request.json()
        assert payload["protocol"] == "scep"
        if answer is None:
            return web.Response(status=500, text="boom")
        return web.json_response(answer)
    app = web.Application()
    app.router.add_post("/check", hook)
    server = await aiohttp_server(app)
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_CSR_CHECK_URL": str(server.make_url("/check")),
                                    "SCEPD_SCEP_CSR_CHECK_ALLOW_HTTP": "1"})
    client = await aiohttp_client(create_app(services))
    rep, _ = await _enroll(client, rsa_key(0), "hooked")
    assert (rep.status == wire.PkiStatus.SUCCESS) is ok
    if not ok:
        assert "boom" not in (rep.fail_info_text or "")


async def test_same_key_renewal_with_same_transaction_id_is_not_a_resend(aiohttp_client, make_services):
    """micromdm scepclient renews with the same key, hence the same transactionID."""
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_RENEWAL_SAME_KEY": "1"})
    client = await aiohttp_client(create_app(services))
    key = rsa_key(0)
    old = await _issued(client, key, transaction_id="SAME-TXN")
    rep, _ = await _enroll(client, key, challenge=None, signer=(old, key), message_type=17,
                           transaction_id="SAME-TXN")
    assert rep.status == wire.PkiStatus.SUCCESS
    new = reply_certs(rep, old, key)[0]
    assert new.serial_number != old.serial_number


@pytest.mark.parametrize("name", ["sscep-0.10.0-getcrl-aes128-sha256-post",
                                  "sscep-0.10.0-getcrl-aes128-sha256-post-default"])
async def test_replayed_getcrl(aiohttp_client, vector_state, name):
    """sscep asks with old.pem's issuer+serial (-O), or with the CA's own subject+serial."""
    services = await open_services(config_mod.load(vector_state, environ={}), FixedClock(CAPTURE_TIME))
    client = await aiohttp_client(create_app(services, close_services=True))
    rep = await post(client, vector(name))
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    key = serialization.load_pem_private_key((VECTORS / "pki" / "old.key").read_bytes(), None)
    inner = wire.open_envelope(rep.envelope, [wire.Recipient(load_pair("old").cert, key)])
    from asn1crypto import cms
    crls = cms.ContentInfo.load(inner)["content"]["crls"]
    assert len(crls) == 1
    crl = x509.load_der_x509_crl(crls[0].chosen.dump())
    assert crl.issuer == load_pair("ca").cert.subject
    assert crl.is_signature_valid(load_pair("ca").cert.public_key())
