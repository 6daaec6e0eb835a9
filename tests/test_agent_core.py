"""The agent against an in-process scepd on loopback (SCEP over HTTP, check-in over mTLS), with
one injected clock shared by server and agent: renewals at any instant, no sleeping."""
from __future__ import annotations

import datetime as dt
import json
import os
import stat

import pytest
from aiohttp import web
from click.testing import CliRunner
from cryptography import x509

from agent import schedule
from agent.cli import _enroll, main as agent_main, render_status, status_report
from agent.core import Agent
from agent.files import AgentDir
from agent.protocol import AgentError, Identity, TrustError, fingerprint
from agent.scep_client import ScepClient, new_key
from scepd.ops.agents import AgentInventory
from scepd.http.app import create_app, create_mtls_app
from scepd.ca.revocation import RevocationReason
from scepd.http.tls import ServerCertificate, names_for

DAY = dt.timedelta(days=1)


async def _site(app, ssl_context=None):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@pytest.fixture
async def server(services, tmp_path):
    """SCEP on http://127.0.0.1:PORT/scep and the mTLS listener, one Services, one FixedClock."""
    runner, port = await _site(create_app(services))
    tls = ServerCertificate(tmp_path / "tls", services.enrollment, services.ca_material, names_for("127.0.0.1"))
    # the TLS certificate is checked by OpenSSL against the real clock: issue it at real time
    real_clock = services.enrollment.clock
    from scepd.clock import SystemClock
    services.enrollment.clock = SystemClock()
    await tls.ensure()
    services.enrollment.clock = real_clock
    mrunner, mport = await _site(create_mtls_app(services), tls.context(client_auth=True))
    yield {"scep": f"http://127.0.0.1:{port}/scep", "mtls": f"https://127.0.0.1:{mport}", "services": services}
    await mrunner.cleanup()
    await runner.cleanup()


def _pin(services) -> str:
    return fingerprint(services.ca_material.root)


async def _enrolled(server, tmp_path, mtls=True) -> AgentDir:
    d = AgentDir(tmp_path / "agent")
    await _enroll(d, server["scep"], Identity("host-1", ("DNS:host-1.example",)), "static-secret",
                  _pin(server["services"]), server["mtls"] if mtls else None, hostname="host-1")
    return d


async def test_enroll_pins_the_root_and_installs_a_verified_pair(server, tmp_path):
    d = await _enrolled(server, tmp_path, mtls=False)
    pair = d.load_pair()
    assert pair.cert.public_key() == pair.key.public_key()
    assert pair.cert.subject.rfc4514_string() == "CN=host-1"
    assert d.load_anchor() == server["services"].ca_material.root
    assert pair.chain == (server["services"].ca_material.cert,)
    assert stat.S_IMODE(os.stat(d.key_path).st_mode) == 0o600
    state = d.load_state()
    assert state["server"] == server["scep"] and state["identity"] == {"cn": "host-1", "sans": ["DNS:host-1.example"]}


async def test_enroll_refuses_a_foreign_fingerprint(server, tmp_path):
    with pytest.raises(AgentError, match="pinned fingerprint"):
        await _enroll(AgentDir(tmp_path / "a"), server["scep"], Identity("h"), "static-secret", "AB" * 32, None)
    assert AgentDir(tmp_path / "a").load_cert() is None


async def test_a_wrong_challenge_is_reported(server, tmp_path):
    with pytest.raises(AgentError, match="refused"):
        await _enroll(AgentDir(tmp_path / "a"), server["scep"], Identity("h"), "wrong", _pin(server["services"]),
                      None)


async def test_replies_from_another_ca_are_refused(server, tmp_path):
    from tests.helpers import self_signed, rsa_key
    other = self_signed(rsa_key(3), "Other Root")
    client = ScepClient(server["scep"], other)
    with pytest.raises(TrustError):
        await client.ca_certs()


async def test_daemon_checks_renew_when_due_hook_and_checkin(server, tmp_path, clock):
    services = server["services"]
    d = await _enrolled(server, tmp_path)
    first = d.load_cert()
    hook_out = tmp_path / "hook.txt"
    policy = schedule.Policy.from_options(dt.timedelta(minutes=20), dt.timedelta(days=5), None)
    agent = Agent(d, policy, clock=clock, rand=lambda: 0.5, hostname="host-1",
                  on_renew=f'echo "$SCEPD_AGENT_SERIAL $SCEPD_AGENT_CERT" >> {hook_out}')
    inventory = AgentInventory(services.store, clock)
    # not due: nothing changes, the next check is one interval away, check-in recorded
    result = await agent.check(daemon=True)
    assert result.ok and result.decision.action is schedule.Action.WAIT and result.renewed is None
    assert result.next_check == clock.now() + dt.timedelta(minutes=20)
    assert d.load_cert() == first and not hook_out.exists()
    assert [(a.hostname, a.serial) for a in await inventory.list()] == [("host-1", format(first.serial_number, "x"))]
    # renewal (forced here, at a time the TLS stack also accepts): no challenge, new key, hook, check-in
    result = await agent.check(force=True)
    assert result.ok and result.decision.action is schedule.Action.RENEW and result.renewed is not None
    second = d.load_cert()
    assert second != first and second.public_key() != first.public_key()
    assert d.load_pair("previous").cert == first
    serial2 = format(second.serial_number, "x")
    assert hook_out.read_text().split() == [serial2, str(d.cert_path)]
    assert (await services.store.get_certificate(serial2)).protocol == "scep"
    assert [(a.hostname, a.serial) for a in await inventory.list()] == [("host-1", serial2)]
    state = d.load_state()
    assert state["renewals"] == 1 and state["last_checkin"]["ok"] and state["last_checkin"]["serial"] == serial2
    assert state["last_check"]["result"] == "ok" and state["failures"] == 0
    # the one clock moved to 1 s past the threshold: renewed by itself, authenticated by `second`
    clock.set(second.not_valid_after_utc - 5 * DAY + dt.timedelta(seconds=1))
    before = clock.now() - dt.timedelta(seconds=2)
    clock.set(before)
    result = await agent.check(daemon=True, checkin_after=False)
    assert result.decision.action is schedule.Action.WAIT  # 1 s before the threshold
    clock.set(before + dt.timedelta(seconds=3))
    result = await agent.check(daemon=True, checkin_after=False)
    assert result.ok and result.decision.action is schedule.Action.RENEW
    third = d.load_cert()
    assert third.not_valid_after_utc > second.not_valid_after_utc and d.load_pair("previous").cert == second
    assert len(hook_out.read_text().splitlines()) == 2


async def test_checkin_with_a_revoked_certificate_is_refused(server, tmp_path, clock):
    d = await _enrolled(server, tmp_path)
    serial = format(d.load_cert().serial_number, "x")
    await server["services"].revocation.revoke(serial, RevocationReason.KEY_COMPROMISE, "test")
    agent = Agent(d, schedule.Policy(), clock=clock)
    assert await agent.checkin() is None
    last = d.load_state()["last_checkin"]
    assert not last["ok"] and "401" in last["message"] and "revoked" in last["message"]


class _Failing:
    def __init__(self):
        self.calls = 0

    async def next_ca(self):
        return []

    async def renewal_window(self, cert):
        return None

    async def renew(self, new_key, cert, key):
        self.calls += 1
        raise AgentError("server unreachable")

    async def enroll(self, key, identity, secret):
        self.calls += 1
        raise AgentError("server unreachable")


async def test_failures_back_off_and_never_sleep_past_expiry(server, tmp_path, clock, caplog):
    d = await _enrolled(server, tmp_path, mtls=False)
    cert = d.load_cert()
    failing = _Failing()
    policy = schedule.Policy.from_options(dt.timedelta(minutes=20), dt.timedelta(days=5), None)
    agent = Agent(d, policy, clock=clock, rand=lambda: 1.0, protocol_factory=lambda st: failing)
    clock.set(cert.not_valid_after_utc - DAY)
    delays = []
    for _ in range(8):
        result = await agent.check(daemon=True)
        assert not result.ok and result.message == "server unreachable"
        delays.append(result.next_check - clock.now())
    assert delays[:4] == [dt.timedelta(seconds=s) for s in (30, 60, 120, 240)]
    assert max(delays) == dt.timedelta(minutes=20)
    assert d.load_state()["failures"] == 8 and d.load_cert() == cert  # the old pair stays
    # 10 seconds before expiry: the retry is pulled in before expiry, loudly
    clock.set(cert.not_valid_after_utc - dt.timedelta(seconds=10))
    result = await agent.check(daemon=True)
    assert result.next_check < cert.not_valid_after_utc
    assert "EXPIRES" in caplog.text
    # expired without a challenge: stuck, reported, nothing attempted
    clock.set(cert.not_valid_after_utc + dt.timedelta(seconds=1))
    calls = failing.calls
    result = await agent.check(daemon=True)
    assert result.decision.action is schedule.Action.STUCK and failing.calls == calls
    assert "EXPIRED" in caplog.text


async def test_expired_certificate_re_enrolls_with_a_configured_challenge(server, tmp_path, clock):
    d = await _enrolled(server, tmp_path, mtls=False)
    old = d.load_cert()
    clock.set(old.not_valid_after_utc + DAY)
    agent = Agent(d, schedule.Policy(), clock=clock, challenge="static-secret")
    result = await agent.check()
    assert result.ok and result.decision.action is schedule.Action.REENROLL
    new = d.load_cert()
    assert new != old and new.not_valid_after_utc > clock.now()
    assert new.subject == old.subject


async def test_renewal_by_pkcsreq_when_the_server_lacks_renewal(server, tmp_path, clock, monkeypatch):
    d = await _enrolled(server, tmp_path, mtls=False)
    pair = d.load_pair()

    async def no_caps(self):
        return {"POSTPKIOperation", "AES", "SHA-256"}
    monkeypatch.setattr(ScepClient, "capabilities", no_caps)
    sent = []
    from scepd.scep import wire
    original = wire.encode_pki_message

    def spy(**kw):
        sent.append(kw["message_type"])
        return original(**kw)
    monkeypatch.setattr(wire, "encode_pki_message", spy)
    client = ScepClient(server["scep"], d.load_anchor(), now=clock.now)
    key = new_key()
    issued = await client.renew(key, pair.cert, pair.key)
    assert sent == [19] and issued.cert.public_key() == key.public_key()


async def test_rollover_is_announced_then_followed(server, tmp_path, clock, state_dir):
    """GetNextCACert announces the next CA (verified against the pinned root); the renewal after
    the switch installs a certificate from it with the new chain."""
    from scepd.ca import pki
    services = server["services"]
    d = await _enrolled(server, tmp_path, mtls=False)
    nxt = pki.rollover(state_dir, clock, (state_dir / "ca" / "root.key").read_bytes(), None, None)
    services.scep.next_ca = (nxt,)
    agent = Agent(d, schedule.Policy(), clock=clock)
    await agent.check()
    assert x509.load_pem_x509_certificates(d.next_ca_path.read_bytes()) == [nxt]
    assert status_report(d, clock.now(), schedule.Policy())["next_ca_announced"] is True


async def test_status_report_and_exit_codes(server, tmp_path, clock):
    d = await _enrolled(server, tmp_path, mtls=False)
    cert = d.load_cert()
    policy = schedule.Policy.from_options(None, dt.timedelta(days=5), None)
    report = status_report(d, clock.now(), policy)
    assert report["state"] == "valid"
    c = report["certificate"]
    assert c["serial"] == format(cert.serial_number, "x") and c["subject"] == "CN=host-1"
    assert c["renewal_due_at"] == (cert.not_valid_after_utc - 5 * DAY).isoformat().replace("+00:00", "Z")
    assert c["time_left_seconds"] == int((cert.not_valid_after_utc - clock.now()).total_seconds())
    text = render_status(report)
    for label in ("subject:", "serial:", "issuer:", "not after:", "time left:", "renewal due:", "last check:",
                  "next check:"):
        assert label in text
    assert status_report(d, cert.not_valid_after_utc - DAY, policy)["state"] == "renewal-due"
    assert status_report(d, cert.not_valid_after_utc, policy)["state"] == "expired"
    runner = CliRunner()
    out = runner.invoke(agent_main, ["status", "--dir", str(d.root), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["certificate"]["serial"] == format(cert.serial_number, "x")
    missing = runner.invoke(agent_main, ["status", "--dir", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "MISSING" in missing.output


def test_enroll_refuses_trust_on_first_use_unless_asked(tmp_path):
    out = CliRunner().invoke(agent_main, ["enroll", "--dir", str(tmp_path / "a"), "--server",
                                          "http://127.0.0.1:9/scep", "--cn", "h", "--challenge", "x"])
    assert out.exit_code != 0 and "--ca-fingerprint" in out.output and "--trust-first-use" in out.output
    assert not (tmp_path / "a").exists()


async def test_reuse_key_only_when_the_server_allows_it(server, tmp_path, clock):
    from scepd.enroll.renewal import RenewalSettings
    d = await _enrolled(server, tmp_path, mtls=False)
    first = d.load_pair()
    agent = Agent(d, schedule.Policy(), clock=clock, reuse_key=True)
    result = await agent.check(force=True)
    assert not result.ok and "new key" in result.message and d.load_cert() == first.cert
    server["services"].scep.renewal.settings = RenewalSettings(allow_same_key=True)
    result = await agent.check(force=True)
    assert result.ok and d.load_cert() != first.cert
    assert d.load_cert().public_key() == first.key.public_key()


async def test_daemon_loop_wakes_on_hup_stops_on_term_and_survives_surprises(server, tmp_path, clock):
    """Agent.run with the signals' events set by hand: never sleeps in this test."""
    import asyncio
    d = await _enrolled(server, tmp_path, mtls=False)
    calls = []

    def factory(st):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("surprise")  # a bug must not kill the daemon
        if len(calls) == 3:
            stop.set()  # SIGTERM arrives during the third check: it finishes, then the loop ends
        return _Failing()
    stop, wake = asyncio.Event(), asyncio.Event()
    wake.set()  # SIGHUP pending: check again at once
    agent = Agent(d, schedule.Policy(), clock=clock, protocol_factory=factory)

    async def hup_again():
        while len(calls) < 3 and not stop.is_set():
            wake.set()
            await asyncio.sleep(0)
    pump = asyncio.create_task(hup_again())
    await asyncio.wait_for(agent.run(stop, wake), timeout=30)
    pump.cancel()
    assert len(calls) == 3
    assert d.load_state()["next_check"]  # recorded by the daemon


def test_status_exits_2_for_an_expired_certificate(tmp_path):
    from tests.helpers import rsa_key, self_signed
    key = rsa_key(0)
    expired = self_signed(key, "old-host", not_after=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1))
    d = AgentDir(tmp_path / "agent")
    d.install(key, expired, [])
    d.save_state({"server": "http://127.0.0.1:9/scep", "protocol": "scep"})
    out = CliRunner().invoke(agent_main, ["status", "--dir", str(d.root)])
    assert out.exit_code == 2 and "EXPIRED" in out.output and "CN=old-host" in out.output


async def test_enroll_twice_needs_force(server, tmp_path):
    import asyncio
    d = await _enrolled(server, tmp_path, mtls=False)
    args = ["enroll", "--dir", str(d.root), "--server", server["scep"], "--cn", "host-1", "--challenge",
            "static-secret", "--ca-fingerprint", _pin(server["services"])]
    first = d.load_cert()
    out = await asyncio.to_thread(CliRunner().invoke, agent_main, args)
    assert out.exit_code == 1 and "already holds a certificate" in out.output and d.load_cert() == first
    out = await asyncio.to_thread(CliRunner().invoke, agent_main, args + ["--force"])
    assert out.exit_code == 0, out.output
    assert d.load_cert() != first and d.load_pair("previous").cert == first
