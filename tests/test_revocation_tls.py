"""Revocation service and the mTLS gate, through real TLS on loopback."""
from __future__ import annotations

import ssl

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from scepd.http.app import create_mtls_app
from scepd.errors import AlreadyRevoked, BadRequest, NotFound
from scepd.ca.revocation import RevocationReason
from scepd.http.tls import ServerCertificate, names_for

from .helpers import make_csr, rsa_key


async def _issue(services, cn: str, key):
    from scepd.enroll.challenges import ChallengeGrant
    from scepd.ca.csr import decode_csr
    facts = decode_csr(make_csr(key, cn))
    req = services.enrollment.approve(facts, __import__("scepd.ca.policy", fromlist=["PROFILES"]).PROFILES["agent"])
    return await services.enrollment.issue(req, ChallengeGrant("none"), protocol="test", transaction_id=None,
                                           requester="test", spki_sha256=facts.spki_sha256)


async def test_revoke_records_and_audits(services):
    issued = await _issue(services, "rev-1", rsa_key(0))
    rec = await services.revocation.revoke(issued.record.serial, RevocationReason.KEY_COMPROMISE, "test")
    assert rec.status == "revoked" and rec.revocation_reason == "keyCompromise"
    assert rec.revoked_at == services.clock.now()
    with pytest.raises(AlreadyRevoked):
        await services.revocation.revoke(issued.record.serial, RevocationReason.SUPERSEDED, "test")
    with pytest.raises(NotFound):
        await services.revocation.revoke("abc", RevocationReason.SUPERSEDED, "test")
    events = [a.event for a in await services.store.list_audit()]
    assert events.count("certificate.revoked") == 1


@pytest.mark.parametrize("text", ["7", "removeFromCRL", "certificateHold", "nonsense"])
def test_disallowed_reasons(text):
    with pytest.raises(BadRequest):
        reason = RevocationReason.parse(text)
        from scepd.ca.revocation import ALLOWED_REASONS
        if reason not in ALLOWED_REASONS:
            raise BadRequest("not allowed")


def test_reason_labels_round_trip():
    assert RevocationReason.parse("keyCompromise") is RevocationReason.KEY_COMPROMISE
    assert RevocationReason.parse("key-compromise") is RevocationReason.KEY_COMPROMISE
    assert RevocationReason.parse(4) is RevocationReason.SUPERSEDED


@pytest.fixture
async def mtls(services, tmp_path):
    from scepd.clock import SystemClock
    services.enrollment.clock = SystemClock()  # TLS validity is checked by OpenSSL's real clock
    cert = ServerCertificate(tmp_path / "tls", services.enrollment, services.ca_material,
                             names_for("127.0.0.1"))
    assert await cert.ensure() is True
    assert await cert.ensure() is False  # not due again
    runner = web.AppRunner(create_mtls_app(services))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=cert.context(client_auth=True))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"https://127.0.0.1:{port}"
    await runner.cleanup()


def _client_ctx(services, tmp_path, issued=None, key=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=services.ca_material.root.public_bytes(
        serialization.Encoding.PEM).decode())
    if issued is not None:
        (tmp_path / "c.pem").write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM)
                                         + services.ca_material.cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    return ctx


async def test_mtls_accepts_ours_and_refuses_revoked(services, mtls, tmp_path):
    key = rsa_key(1)
    issued = await _issue(services, "agent-1", key)
    ctx = _client_ctx(services, tmp_path, issued, key)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{mtls}/api/v1/whoami", ssl=ctx) as resp:
            assert resp.status == 200
            assert (await resp.json())["serial"] == issued.record.serial
        await services.revocation.revoke(issued.record.serial, RevocationReason.KEY_COMPROMISE, "test")
        async with session.get(f"{mtls}/api/v1/whoami", ssl=_client_ctx(services, tmp_path, issued, key)) as resp:
            assert resp.status == 401
            assert "revoked" in (await resp.json())["error"]


async def test_mtls_refuses_no_client_certificate(services, mtls, tmp_path):
    async with aiohttp.ClientSession() as session:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            async with session.get(f"{mtls}/api/v1/whoami", ssl=_client_ctx(services, tmp_path)) as resp:
                await resp.read()
