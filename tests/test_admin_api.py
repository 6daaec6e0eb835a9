"""The admin API on the real HTTPS listener (TLS on loopback): tokens, admin client certificates,
401/403, bad input, and the same services as the CLI."""
from __future__ import annotations

import ssl

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scepd.admin.service import AdminService
from scepd.http.app import create_https_app
from scepd.ca.revocation import RevocationReason
from scepd.http.tls import ServerCertificate, names_for

from .helpers import rsa_key
from .test_revocation_tls import _issue

API = "/api/v1/admin"


@pytest.fixture
async def https(services, tmp_path):
    from scepd.clock import SystemClock
    services.enrollment.clock = SystemClock()  # OpenSSL checks validity with the real clock
    services.clock = SystemClock()
    cert = ServerCertificate(tmp_path / "tls", services.enrollment, services.ca_material, names_for("127.0.0.1"))
    await cert.ensure()
    runner = web.AppRunner(create_https_app(services))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=cert.context(client_auth=False))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"https://127.0.0.1:{port}"
    await runner.cleanup()


def _ctx(services, tmp_path, cert_pem: bytes | None = None, key_pem: bytes | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=services.ca_material.root.public_bytes(
        serialization.Encoding.PEM).decode())
    if cert_pem is not None:
        (tmp_path / "client.pem").write_bytes(cert_pem)
        (tmp_path / "client.key").write_bytes(key_pem)
        ctx.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
    return ctx


def _pem(services, cert: x509.Certificate) -> bytes:
    enc = serialization.Encoding.PEM
    return cert.public_bytes(enc) + services.ca_material.cert.public_bytes(enc)


@pytest.fixture
async def token(services):
    _id, value = await AdminService(services.store, services.clock).create_token("tests", actor="test")
    return value


async def test_bearer_token_lists_shows_and_revokes(services, https, tmp_path, token):
    issued = await _issue(services, "api-1", rsa_key(0))
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        ctx = _ctx(services, tmp_path)
        async with s.get(f"{https}{API}/certificates", headers=auth, ssl=ctx) as r:
            assert r.status == 200
            serials = [c["serial"] for c in (await r.json())["certificates"]]
            assert issued.record.serial in serials
        async with s.get(f"{https}{API}/certificates/{issued.record.serial.upper()}", headers=auth, ssl=ctx) as r:
            body = await r.json()
            assert r.status == 200 and body["state"] == "valid" and "BEGIN CERTIFICATE" in body["pem"]
        async with s.post(f"{https}{API}/certificates/{issued.record.serial}/revoke", headers=auth, ssl=ctx,
                          json={"reason": "keyCompromise"}) as r:
            body = await r.json()
            assert r.status == 200 and body["state"] == "revoked" and body["revocation_reason"] == "keyCompromise"
        async with s.post(f"{https}{API}/certificates/{issued.record.serial}/revoke", headers=auth, ssl=ctx,
                          json={"reason": "superseded"}) as r:
            assert r.status == 400 and "already revoked" in (await r.json())["error"]
        async with s.get(f"{https}{API}/audit?event=certificate.revoked", headers=auth, ssl=ctx) as r:
            entries = (await r.json())["audit"]
            assert r.status == 200 and len(entries) == 1 and entries[0]["actor"].startswith("admin-api:token:")
        async with s.get(f"{https}{API}/certificates?expiring_within=365d&limit=5", headers=auth, ssl=ctx) as r:
            assert r.status == 200
    # the revocation reached the same store the CLI and OCSP read, and the CRL was refreshed
    assert (await services.store.get_certificate(issued.record.serial)).status == "revoked"
    crl = x509.load_der_x509_crl(await services.crl.current_der())
    assert crl.get_revoked_certificate_by_serial_number(issued.cert.serial_number) is not None


@pytest.mark.parametrize("header", [None, "Bearer scepd_wrong", "Bearer ", "Basic dXNlcjpwYXNz", "scepd_x"])
async def test_missing_or_wrong_token_is_401(services, https, tmp_path, header):
    headers = {"Authorization": header} if header is not None else {}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{https}{API}/certificates", headers=headers, ssl=_ctx(services, tmp_path)) as r:
            assert r.status == 401
            assert "error" in await r.json() and "Bearer" in r.headers["WWW-Authenticate"]


async def test_revoked_token_stops_working(services, https, tmp_path):
    admin = AdminService(services.store, services.clock)
    token_id, token = await admin.create_token("short-lived", actor="test")
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{https}{API}/whoami", headers=auth, ssl=_ctx(services, tmp_path)) as r:
            assert r.status == 200 and (await r.json())["actor"] == f"token:{token_id}:short-lived"
        assert await admin.revoke_token(token_id, actor="test") is True
        async with s.get(f"{https}{API}/whoami", headers=auth, ssl=_ctx(services, tmp_path)) as r:
            assert r.status == 401


async def test_tokens_are_stored_hashed(services, token):
    import sqlalchemy as sa
    from scepd.admin.service import admin_tokens, token_hash
    async with services.store.engine.connect() as conn:
        rows = (await conn.execute(sa.select(admin_tokens))).all()
    assert len(rows) == 1 and rows[0].token_sha256 == token_hash(token)
    assert token not in repr(rows)


async def test_admin_client_certificate(services, https, tmp_path):
    admin = AdminService(services.store, services.clock, services.enrollment)
    cert = await admin.issue_admin_certificate("alice", actor="test")
    assert cert.record.profile == "admin"
    eku = cert.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    ctx = _ctx(services, tmp_path, _pem(services, cert.cert), cert.key_pem)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{https}{API}/whoami", ssl=ctx) as r:
            assert r.status == 200 and (await r.json())["actor"] == f"cert:{cert.record.serial}:CN=alice"
        async with s.post(f"{https}{API}/challenges", ssl=ctx, json={"ttl": "10m", "cn": "router-*"}) as r:
            body = await r.json()
            assert r.status == 201 and len(body["challenge"]) == 32 and body["cn_pattern"] == "router-*"
        # the challenge works for SCEP verification (same ChallengeService)
        grant = await services.challenges.verify(body["challenge"], "router-7")
        assert grant.kind == "one-time"
        await services.revocation.revoke(cert.record.serial, RevocationReason.PRIVILEGE_WITHDRAWN, "test")
        async with s.get(f"{https}{API}/whoami", ssl=_ctx(services, tmp_path, _pem(services, cert.cert),
                                                         cert.key_pem)) as r:
            assert r.status == 401 and "revoked" in (await r.json())["error"]


async def test_agent_certificate_is_403(services, https, tmp_path):
    key = rsa_key(1)
    issued = await _issue(services, "agent-x", key)  # profile "agent": ours, valid, not admin
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    ctx = _ctx(services, tmp_path, _pem(services, issued.cert), key_pem)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{https}{API}/certificates", ssl=ctx) as r:
            assert r.status == 403 and "not an admin" in (await r.json())["error"]


async def test_https_without_client_certificate_still_serves(services, https, tmp_path):
    """ACME clients present no certificate: the optional client-cert request must not break them."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{https}/healthz", ssl=_ctx(services, tmp_path)) as r:
            assert r.status == 200


@pytest.mark.parametrize("method,path,body,status,needle", [
    ("post", "/certificates/zz/revoke", {"reason": "keyCompromise"}, 400, "hexadecimal"),
    ("post", "/certificates/abc/revoke", {"reason": "keyCompromise"}, 404, "no certificate"),
    ("post", "/certificates/abc/revoke", {"reason": "7"}, 400, "not allowed"),
    ("post", "/certificates/abc/revoke", {"reason": "certificateHold"}, 400, "not allowed"),
    ("post", "/certificates/abc/revoke", {"reason": ["x"]}, 400, "reason"),
    ("post", "/certificates/abc/revoke", "not json", 400, "JSON"),
    ("post", "/certificates/abc/revoke", [1, 2], 400, "object"),
    ("get", "/certificates/abc", None, 404, "no certificate"),
    ("get", "/certificates?limit=-1", None, 400, "limit"),
    ("get", "/certificates?expiring_within=soon", None, 400, "duration"),
    ("post", "/challenges", {"ttl": "forever"}, 400, "duration"),
    ("post", "/challenges", {"ttl": "0s"}, 400, "ttl"),
    ("post", "/challenges", {"cn": 5}, 400, "strings"),
    ("post", "/pending/x/approve", None, 400, "integer"),
    ("post", "/pending/999/approve", None, 404, "no pending"),
    ("post", "/pending/999/reject", {}, 400, "reason"),
    ("get", "/audit?since=whenever", None, 400, "duration"),
])
async def test_bad_input_is_4xx_with_message(services, https, tmp_path, token, method, path, body, status, needle):
    kwargs = {"headers": {"Authorization": f"Bearer {token}"}, "ssl": _ctx(services, tmp_path)}
    if isinstance(body, str):
        kwargs["data"] = body
    elif body is not None:
        kwargs["json"] = body
    async with aiohttp.ClientSession() as s:
        async with getattr(s, method)(f"{https}{API}{path}", **kwargs) as r:
            assert r.status == status, await r.text()
            assert needle in (await r.json())["error"]
    # nothing half-done: no revocation, no challenge was recorded by a refused request
    events = [a.event for a in await services.store.list_audit()]
    assert "certificate.revoked" not in events and "challenge.created" not in events


async def test_pending_approve_and_reject_through_api(services, https, tmp_path, token):
    from scepd.enroll.challenges import ChallengeGrant
    from scepd.ca.csr import decode_csr
    from scepd.ca.policy import PROFILES

    from .helpers import make_csr
    ids = []
    for i in range(2):
        facts = decode_csr(make_csr(rsa_key(i), f"pending-{i}"))
        rec = await services.enrollment.create_pending(
            services.enrollment.approve(facts, PROFILES["device"]), ChallengeGrant("none"), protocol="scep",
            transaction_id=f"TXN{i}", requester="test", spki_sha256=facts.spki_sha256,
            signer_spki_sha256=facts.spki_sha256, csr_der=make_csr(rsa_key(i), f"pending-{i}"))
        ids.append(rec.id)
    auth = {"Authorization": f"Bearer {token}"}
    ctx = _ctx(services, tmp_path)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{https}{API}/pending", headers=auth, ssl=ctx) as r:
            assert [p["id"] for p in (await r.json())["pending"]] == ids
        async with s.post(f"{https}{API}/pending/{ids[0]}/approve", headers=auth, ssl=ctx) as r:
            body = await r.json()
            assert r.status == 200 and body["subject"] == "CN=pending-0"
        async with s.post(f"{https}{API}/pending/{ids[1]}/reject", headers=auth, ssl=ctx,
                          json={"reason": "unknown device"}) as r:
            assert r.status == 200 and (await r.json())["status"] == "rejected"
        async with s.post(f"{https}{API}/pending/{ids[1]}/approve", headers=auth, ssl=ctx) as r:
            assert r.status in (400, 403, 409) and "already" in (await r.json())["error"]


def test_admin_cli_tokens_issue_cert_and_crl(state_dir, tmp_path):
    """`scepd admin ...` commands: the token is printed once, stored hashed, listed without its
    value, revocable; issue-cert writes a 0600 key and an "admin" certificate; crl prints PEM."""
    import json
    import os

    from click.testing import CliRunner

    from scepd.cli import main
    runner = CliRunner()
    args = ["--state-dir", str(state_dir)]
    created = runner.invoke(main, ["admin", "token", "create", "--name", "ci", *args])
    assert created.exit_code == 0, created.output
    token = created.output.strip()
    assert token.startswith("scepd_") and len(token) > 40
    listed = runner.invoke(main, ["admin", "token", "list", *args])
    assert json.loads(listed.output.splitlines()[0])["name"] == "ci" and token not in listed.output
    assert runner.invoke(main, ["admin", "token", "revoke", "1", *args]).exit_code == 0
    again = runner.invoke(main, ["admin", "token", "revoke", "1", *args])
    assert again.exit_code != 0 and "no live token" in again.output
    assert runner.invoke(main, ["admin", "token", "create", "--name", "", *args]).exit_code != 0

    cert, key = tmp_path / "a.pem", tmp_path / "a.key"
    out = runner.invoke(main, ["admin", "issue-cert", "--cn", "alice", "--out-cert", str(cert),
                               "--out-key", str(key), *args])
    assert out.exit_code == 0, out.output
    assert os.stat(key).st_mode & 0o077 == 0
    leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    shown = runner.invoke(main, ["certs", "show", format(leaf.serial_number, "x"), *args])
    assert json.loads(shown.output)["profile"] == "admin"
    refused = runner.invoke(main, ["admin", "issue-cert", "--cn", "alice", "--out-cert", str(cert),
                                   "--out-key", str(key), *args])
    assert refused.exit_code != 0 and "refusing to overwrite" in refused.output
    crl = runner.invoke(main, ["admin", "crl", *args])
    assert crl.exit_code == 0 and x509.load_pem_x509_crl(crl.output.encode()).is_signature_valid(
        x509.load_pem_x509_certificate((state_dir / "ca" / "ca.pem").read_bytes()).public_key())


async def test_admin_api_lists_agents_and_metrics_count_them(services, https, tmp_path, token, aiohttp_client):
    import datetime as dt

    from scepd.ops.agents import AgentInventory, Checkin
    from scepd.http.app import create_app

    from .test_metrics_audit import _get, _scrape
    inventory = AgentInventory(services.store, services.clock)
    now = services.clock.now()
    await inventory.record(Checkin("host-a", "0.1.0", "abc1", "CN=host-a", now + dt.timedelta(days=30)))
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{https}/api/v1/admin/agents", headers=headers,
                               ssl=_ctx(services, tmp_path)) as resp:
            assert resp.status == 200
            [agent] = (await resp.json())["agents"]
    assert agent["hostname"] == "host-a" and agent["serial"] == "abc1"
    client = await aiohttp_client(create_app(services))
    samples = await _scrape(client)
    assert _get(samples, "scepd_agents_seen", within="1h") == 1
    assert _get(samples, "scepd_agents_seen", within="24h") == 1


async def test_admin_api_creates_eab_keys(services, https, tmp_path, token):
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{https}/api/v1/admin/eab", json={"ttl": "2h", "identifiers": "*.lab.test"},
                                headers=headers, ssl=_ctx(services, tmp_path)) as resp:
            assert resp.status == 201
            body = await resp.json()
        async with session.post(f"{https}/api/v1/admin/eab", json={"ttl": "forever"}, headers=headers,
                                ssl=_ctx(services, tmp_path)) as resp:
            assert resp.status == 400
    from acme.store import AcmeStore
    row = await AcmeStore(services.store).get_eab(body["kid"])
    assert row["identifiers"] == "*.lab.test" and row["hmac_key"] == body["hmac_key"]


async def test_challenge_scoped_to_names_and_profile_through_the_api(services, https, tmp_path, token):
    """A challenge created with names and a profile over the API binds every name of the SCEP
    request (CN and each SAN) and gives its profile."""
    from scepd.scep import wire

    from .helpers import make_csr, pkcs_req, reply_certs, self_signed

    services.challenges.clock = services.scep.clock = services.clock  # the https fixture's clock
    auth = {"Authorization": f"Bearer {token}"}
    ctx = _ctx(services, tmp_path)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{https}{API}/challenges", headers=auth, ssl=ctx,
                          json={"ttl": "10m", "names": ["dev-*.example"], "profile": "agent"}) as r:
            body = await r.json()
            assert r.status == 201 and body["names"] == ["dev-*.example"] and body["profile"] == "agent"
        for bad, message in (({"names": "x", "profile": "gold"}, "cannot be granted"),
                             ({"profile": "admin"}, "cannot be granted"),
                             ({"names": [1]}, "names is a list"), ({"names": ["a\nb"]}, "printable")):
            async with s.post(f"{https}{API}/challenges", headers=auth, ssl=ctx, json=bad) as r:
                assert r.status == 400 and message in (await r.json())["error"], bad

    async def scep(cn, sans):
        key = rsa_key(1)
        csr = make_csr(key, cn, body["challenge"], [x509.DNSName(n) for n in sans] or None)
        signer = (self_signed(key), key)
        der, _, _ = pkcs_req(services.ca_material.cert, key, csr, signer=signer)
        reply, _ = await services.scep.pki_operation(der)
        rep = wire.decode_cert_rep(reply)
        return rep, (reply_certs(rep, *signer)[0] if rep.status == wire.PkiStatus.SUCCESS else None)
    rep, _ = await scep("dev-1.example", ["www.other.example"])
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == 2  # badRequest
    assert "'www.other.example' is outside the subject names this challenge authorizes" in rep.fail_info_text
    rep, cert = await scep("dev-1.example", [])
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]  # the challenge's profile, not device
