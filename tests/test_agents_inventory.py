"""Server side of the agent: POST /api/v1/agents/checkin on the mTLS listener, `scepd agents list`."""
from __future__ import annotations

import datetime as dt
import json

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from agent.checkin import checkin
from agent.protocol import AgentError
from scepd.ops.agents import AgentInventory, Checkin
from scepd.http.app import create_mtls_app
from scepd.cli import main as scepd_main
from scepd.errors import MalformedRequest
from scepd.ca.revocation import RevocationReason
from scepd.http.tls import ServerCertificate, names_for

from .helpers import make_csr, rsa_key


async def _issue(services, cn: str, key):
    from scepd.enroll.challenges import ChallengeGrant
    from scepd.ca.csr import decode_csr
    from scepd.ca.policy import PROFILES
    facts = decode_csr(make_csr(key, cn))
    req = services.enrollment.approve(facts, PROFILES["agent"])
    return await services.enrollment.issue(req, ChallengeGrant("none"), protocol="test", transaction_id=None,
                                           requester="test", spki_sha256=facts.spki_sha256)


@pytest.fixture
async def mtls(services, tmp_path):
    from scepd.clock import SystemClock
    services.enrollment.clock = SystemClock()  # TLS validity is checked by OpenSSL's real clock
    cert = ServerCertificate(tmp_path / "tls", services.enrollment, services.ca_material, names_for("127.0.0.1"))
    await cert.ensure()
    runner = web.AppRunner(create_mtls_app(services))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=cert.context(client_auth=True))
    await site.start()
    yield f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


def _files(services, tmp_path, issued, key, name="a"):
    pem = serialization.Encoding.PEM
    anchor, full, key_path = tmp_path / f"{name}-ca.pem", tmp_path / f"{name}-full.pem", tmp_path / f"{name}-key.pem"
    anchor.write_bytes(services.ca_material.root.public_bytes(pem))
    full.write_bytes(issued.cert.public_bytes(pem) + services.ca_material.cert.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return anchor, full, key_path


async def test_checkin_records_hostname_serial_version_and_time(services, mtls, tmp_path):
    key = rsa_key(1)
    issued = await _issue(services, "agent-1", key)
    files = _files(services, tmp_path, issued, key)
    answer = await checkin(mtls, *files, hostname="web-1.example")
    assert answer["serial"] == issued.record.serial and answer["hostname"] == "web-1.example"
    assert answer["checkins"] == 1
    again = await checkin(mtls + "/api/v1/agents/checkin", *files, hostname="web-1.example")
    assert again["checkins"] == 2
    [rec] = await AgentInventory(services.store, services.clock).list()
    assert (rec.hostname, rec.serial, rec.subject) == ("web-1.example", issued.record.serial, "CN=agent-1")
    assert rec.cert_not_after == issued.record.not_after
    assert rec.last_checkin_at == services.clock.now() and rec.agent_version
    # the serial comes from the verified certificate: a renewed certificate moves the same row on
    key2 = rsa_key(2)
    issued2 = await _issue(services, "agent-1", key2)
    await checkin(mtls, *_files(services, tmp_path, issued2, key2, "b"), hostname="web-1.example")
    [rec] = await AgentInventory(services.store, services.clock).list()
    assert rec.serial == issued2.record.serial and rec.checkins == 3


async def test_checkin_refused_for_a_revoked_certificate(services, mtls, tmp_path):
    key = rsa_key(1)
    issued = await _issue(services, "agent-2", key)
    await services.revocation.revoke(issued.record.serial, RevocationReason.KEY_COMPROMISE, "test")
    with pytest.raises(AgentError, match="401.*revoked"):
        await checkin(mtls, *_files(services, tmp_path, issued, key), hostname="h")
    assert await AgentInventory(services.store, services.clock).list() == []


async def test_checkin_without_a_client_certificate_fails_the_handshake(services, mtls, tmp_path):
    import ssl
    ctx = ssl.create_default_context(cadata=services.ca_material.root.public_bytes(
        serialization.Encoding.PEM).decode())
    async with aiohttp.ClientSession() as session:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            async with session.post(f"{mtls}/api/v1/agents/checkin", json={}, ssl=ctx) as resp:
                await resp.read()


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"hostname": "", "agent_version": "1"}',
                                  b'{"hostname": "a b", "agent_version": "1"}',
                                  b'{"hostname": "h"}', b'{"hostname": "h", "agent_version": 3}'])
async def test_bad_bodies_get_400_with_a_reason(services, mtls, tmp_path, body):
    import ssl
    key = rsa_key(1)
    issued = await _issue(services, "agent-3", key)
    anchor, full, key_path = _files(services, tmp_path, issued, key)
    ctx = ssl.create_default_context(cafile=str(anchor))
    ctx.load_cert_chain(str(full), str(key_path))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{mtls}/api/v1/agents/checkin", data=body, ssl=ctx,
                                headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
            assert error and "Error" not in error and "Traceback" not in error
    assert await AgentInventory(services.store, services.clock).list() == []


def test_body_validation():
    assert Checkin.parse_body({"hostname": "h.example", "agent_version": "0.1.0"}) == ("h.example", "0.1.0")
    for bad in (None, [], {"hostname": "x" * 256, "agent_version": "1"}, {"hostname": "h", "agent_version": ""}):
        with pytest.raises(MalformedRequest):
            Checkin.parse_body(bad)


async def test_scepd_agents_list(services, state_dir, clock):
    key = rsa_key(1)
    issued = await _issue(services, "agent-4", key)
    inventory = AgentInventory(services.store, clock)
    await inventory.record(Checkin("db-1", "0.1.0", issued.record.serial, issued.record.subject,
                                   issued.record.not_after))
    runner = CliRunner()
    import asyncio  # the command runs its own event loop: call it from a thread
    out = await asyncio.to_thread(runner.invoke, scepd_main, ["agents", "list", "--state-dir", str(state_dir),
                                                              "--json"])
    assert out.exit_code == 0, out.output
    [row] = json.loads(out.output)
    assert row["hostname"] == "db-1" and row["serial"] == issued.record.serial
    assert row["cert_not_after"] == issued.record.not_after.isoformat() and row["last_checkin_at"]
    out = await asyncio.to_thread(runner.invoke, scepd_main, ["agents", "list", "--state-dir", str(state_dir)])
    assert out.exit_code == 0 and "db-1" in out.output and issued.record.serial in out.output
    assert "LAST CHECK-IN" in out.output


async def test_inventory_lists_soonest_expiry_first(services, clock):
    inventory = AgentInventory(services.store, clock)
    later = clock.now() + dt.timedelta(days=30)
    sooner = clock.now() + dt.timedelta(days=2)
    await inventory.record(Checkin("b", "1", "bb", "CN=b", later))
    await inventory.record(Checkin("a", "1", "aa", "CN=a", sooner))
    assert [r.hostname for r in await inventory.list()] == ["a", "b"]


async def test_checkin_path_uses_indexes(services, state_dir, clock):
    """Recording a check-in (the mTLS request path) never scans the agents table."""
    import re
    import sqlite3

    from sqlalchemy import event
    captured: list[tuple[str, tuple]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if re.match(r"\s*(SELECT|UPDATE|DELETE)", statement, re.I) and "agents" in statement:
            captured.append((statement, tuple(parameters or ())))
    inventory = AgentInventory(services.store, clock)
    for i in range(5):
        await inventory.record(Checkin(f"h{i}", "1", f"{i:x}", f"CN=h{i}", clock.now()))
    for _engine in services.store.sync_engines():  # the async engine and the units' one
        event.listen(_engine, "before_cursor_execute", capture)
    await inventory.record(Checkin("h1", "1", "ff", "CN=h1", clock.now()))
    await inventory.record(Checkin("new", "1", "fe", "CN=new", clock.now()))
    for _engine in services.store.sync_engines():  # the async engine and the units' one
        event.remove(_engine, "before_cursor_execute", capture)
    assert len(captured) >= 4
    db = sqlite3.connect(state_dir / "scepd.db")
    for statement, params in captured:
        plan = " | ".join(row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + statement, params))
        assert not re.findall(r"\bSCAN agents\b", plan), f"full scan in: {statement}\nplan: {plan}"


async def test_expired_and_foreign_certificates_fail_the_handshake(services, mtls, tmp_path, clock):
    """The rule (scepd.http.tls): foreign and expired client certificates are refused by the TLS
    handshake; the agent reports it in one line."""
    from .helpers import self_signed
    key = rsa_key(1)
    clock.set(clock.now() - dt.timedelta(days=200))  # issued 200 days ago, valid 90 days
    services.enrollment.clock = clock
    expired = await _issue(services, "agent-old", key)
    assert expired.cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc)
    with pytest.raises(AgentError, match="TLS handshake refused|cannot connect"):
        await checkin(mtls, *_files(services, tmp_path, expired, key), hostname="old")

    class _Foreign:
        cert = self_signed(key, "agent-foreign")
    with pytest.raises(AgentError, match="TLS handshake refused|cannot connect"):
        await checkin(mtls, *_files(services, tmp_path, _Foreign, key, "f"), hostname="foreign")
    assert await AgentInventory(services.store, services.clock).list() == []
