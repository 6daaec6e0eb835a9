"""The agent's ACME mode against the real ACME server app on loopback: trust bootstrap by
fingerprint, account creation with an enrollment token (EAB) persisted in the state directory,
http-01 answered by the agent's own responder, renewal with `replaces` (ARI), the ARI window,
and certIDs."""
from __future__ import annotations

import datetime as dt
import os
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from acme.service import AcmeService, AcmeSettings
from acme.store import replacements
from agent.acme_client import AcmeClient, AcmeProblem, b64u_decode, bootstrap_anchor, cert_id, identifiers_of
from agent.core import acme_client_for
from agent.files import AgentDir
from agent.protocol import AgentError, Identity, TrustError, fingerprint
from agent.scep_client import new_key
from scepd.http.app import create_https_app

from .acme_responders import free_port
from .helpers import self_signed, rsa_key


@pytest.fixture
async def lab(aiohttp_client, make_services):
    port = free_port()
    services = await make_services({"SCEPD_ACME_HTTP01_PORT": str(port), "SCEPD_ACME_RESOLVE": "*=127.0.0.1",
                                    "SCEPD_ACME_EAB_REQUIRED": "1"})
    app = create_https_app(services)
    client = await aiohttp_client(app)
    kid, hmac_key = await AcmeService(services, AcmeSettings()).create_eab(dt.timedelta(hours=1), "*.lab.test", "t")

    class Lab:
        pass
    lab = Lab()
    lab.services, lab.port, lab.token = services, port, f"{kid}:{hmac_key}"
    lab.directory = str(client.make_url("/acme/directory"))
    from acme.server import ACME
    lab.service = app[ACME]
    lab.anchor = services.ca_material.root
    return lab


def client_for(lab, tmp_path) -> tuple[AcmeClient, AgentDir]:
    d = AgentDir(tmp_path / "agent")
    d.create()
    if not d.load_state():
        d.save_state({"server": lab.directory, "protocol": "acme",
                      "acme": {"http01_address": "127.0.0.1", "http01_port": lab.port}})
    return acme_client_for(d.load_state(), d, lab.anchor), d


async def test_enroll_renew_with_replaces_and_ari(lab, tmp_path):
    client, d = client_for(lab, tmp_path)
    key = new_key()
    issued = await client.enroll(key, Identity("a1.lab.test", ("DNS:alt.lab.test",)), lab.token)
    cert = issued.cert
    assert cert.public_key() == key.public_key()
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]  # profile `agent`: usable at the mTLS listener
    assert issued.chain == [lab.services.ca_material.cert]
    # the account is persisted: key 0600 and URL in the state
    assert stat.S_IMODE(os.stat(d.account_key_path).st_mode) == 0o600
    account = d.load_state()["acme"]["account"]
    assert account.endswith("/acme/acct/" + account.rsplit("/", 1)[1])
    # ARI window: about one third of the lifetime left
    window = await client.renewal_window(cert)
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs((cert.not_valid_after_utc - window.start) - life / 3) < dt.timedelta(minutes=1)
    # a new client from the same directory renews as the same account (the EAB key is spent)
    again, _ = client_for(lab, tmp_path)
    assert again.account_url == account
    renewed = await again.renew(new_key(), cert, key)
    assert renewed.cert.serial_number != cert.serial_number
    import sqlalchemy as sa
    async with lab.services.store.engine.connect() as conn:
        replaced = (await conn.execute(sa.select(replacements.c.replaced_serial))).scalars().all()
    assert replaced == [format(cert.serial_number, "x")]  # the renewal's order said `replaces`
    # renewing the same old certificate again: alreadyReplaced, so the agent orders without it
    third = await again.renew(new_key(), cert, key)
    assert third.cert.serial_number not in (cert.serial_number, renewed.cert.serial_number)


async def test_the_finalize_csr_names_every_identifier_as_a_san(lab, tmp_path, monkeypatch):
    """Public ACME CAs (and pebble) read the names from the SAN only: the CN must be one too."""
    import agent.acme_client as acme_client
    sent = []
    real = acme_client.build_csr
    monkeypatch.setattr(acme_client, "build_csr", lambda *a: sent.append(real(*a)) or sent[-1])
    client, _ = client_for(lab, tmp_path)
    await client.enroll(new_key(), Identity("cn.lab.test", ("DNS:alt.lab.test",)), lab.token)
    csr = x509.load_der_x509_csr(sent[-1])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["alt.lab.test", "cn.lab.test"]


def count_requests(client: AcmeClient) -> list[str]:
    """The requests the client makes from now on, as "METHOD resource" (ids dropped)."""
    seen: list[str] = []
    real = client._request

    async def counted(method, url, **kw):
        seen.append(f"{method} {url.split('/acme/', 1)[1].split('/')[0]}")
        return await real(method, url, **kw)
    client._request = counted
    return seen


async def test_order_takes_five_requests_when_the_server_answers_at_once(lab, tmp_path):
    """Issue 13: a challenge answered `valid` needs no authorization poll (RFC 8555 §7.1.6),
    and with every authorization valid the order is finalized without polling it first; a
    finalize answered `valid` names the certificate. Before: 7 requests an order."""
    lab.service.respond_wait = lab.service.finalize_wait = 60.0  # the server answers outcomes
    client, _ = client_for(lab, tmp_path)
    await client.enroll(new_key(), Identity("e0.lab.test"), lab.token)  # account, nonce, directory
    seen = count_requests(client)
    issued = await client.enroll(new_key(), Identity("e1.lab.test"), "")
    assert issued.cert.subject.rfc4514_string() == "CN=e1.lab.test"
    assert seen == ["POST new-order", "POST authz", "POST chall", "POST order", "POST cert"], seen


async def test_order_polls_when_the_server_answers_later(lab, tmp_path, monkeypatch):
    """A challenge still `processing` is polled through its authorization, and a finalize
    refused with orderNotReady waits for the order to be ready, then finalizes."""
    from scepd.errors import OrderNotReady
    lab.service.respond_wait = 0.0
    client, _ = client_for(lab, tmp_path)
    client.sleep = lambda _s: __import__("asyncio").sleep(0.01)
    await client.enroll(new_key(), Identity("p0.lab.test"), lab.token)
    real, refused = lab.service.finalize, []

    async def not_yet(auth, order_id):
        if not refused:
            refused.append(order_id)
            raise OrderNotReady("not ready yet")
        return await real(auth, order_id)
    monkeypatch.setattr(lab.service, "finalize", not_yet)
    seen = count_requests(client)
    issued = await client.enroll(new_key(), Identity("p1.lab.test"), "")
    assert issued.cert.subject.rfc4514_string() == "CN=p1.lab.test" and refused
    assert seen[:3] == ["POST new-order", "POST authz", "POST chall"] and seen[-1] == "POST cert", seen
    assert seen.count("POST authz") >= 2 and seen.count("POST order") >= 3, seen  # polls, refused finalize, finalize


async def test_enrollment_token_is_required_and_single_use(lab, tmp_path):
    client, _ = client_for(lab, tmp_path)
    with pytest.raises(AgentError, match="enrollment token"):
        await client.enroll(new_key(), Identity("b.lab.test"), "")
    await client.enroll(new_key(), Identity("b.lab.test"), lab.token)
    other, _ = client_for(lab, tmp_path / "other")
    with pytest.raises(AcmeProblem) as info:
        await other.enroll(new_key(), Identity("c.lab.test"), lab.token)
    assert info.value.type.endswith(":unauthorized")
    # the binding limits the names: outside *.lab.test is refused
    with pytest.raises(AcmeProblem) as info:
        await client.enroll(new_key(), Identity("outside.example.test"), "")
    assert info.value.type.endswith(":unauthorized")


async def test_failed_validation_is_a_clear_error(lab, tmp_path):
    client, _ = client_for(lab, tmp_path)
    client.http01_port = free_port()  # the validator knocks on lab.port: nobody answers there
    with pytest.raises(AgentError, match="authorization for d.lab.test is invalid"):
        await client.enroll(new_key(), Identity("d.lab.test"), lab.token)


async def test_bootstrap_anchor_by_fingerprint(lab):
    root = await bootstrap_anchor(lab.directory, fingerprint(lab.anchor))
    assert root == lab.anchor
    with pytest.raises(TrustError):
        await bootstrap_anchor(lab.directory, "AB" * 32)
    assert await bootstrap_anchor(lab.directory, None) == lab.anchor  # first use (caller allowed it)


async def test_wrong_anchor_is_refused_for_the_issued_certificate(lab, tmp_path):
    client, _ = client_for(lab, tmp_path)
    client.anchor = self_signed(rsa_key(3), "Someone Else")
    with pytest.raises(TrustError):
        await client.enroll(new_key(), Identity("e.lab.test"), lab.token)


def test_cert_id_and_identifiers():
    import datetime as _dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    key = rsa_key(0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(0x80FF).not_valid_before(now).not_valid_after(now + _dt.timedelta(days=1))
            .add_extension(x509.AuthorityKeyIdentifier(b"\x01\x02", None, None), critical=False)
            .sign(key, hashes.SHA256()))
    aki, serial = cert_id(cert).split(".")
    assert b64u_decode(aki) == b"\x01\x02"
    assert b64u_decode(serial) == b"\x00\x80\xff"  # DER INTEGER contents: positive, leading zero
    assert identifiers_of(Identity("Host.lab.test", ("DNS:host.lab.test", "IP:10.0.0.1"))) == [
        {"type": "dns", "value": "host.lab.test"}, {"type": "ip", "value": "10.0.0.1"}]
    with pytest.raises(AgentError):
        identifiers_of(Identity("h", ("EMAIL:a@b.c",)))


async def test_daemon_check_renews_when_due_and_replaces_an_expired_certificate(lab, tmp_path):
    """Agent.check in ACME mode with an injected clock: inside the threshold it renews (ARI),
    and once the certificate has expired the account alone orders a new one (no token)."""
    from agent import schedule
    from agent.core import Agent
    from scepd.clock import FixedClock
    client, d = client_for(lab, tmp_path)
    key = new_key()
    issued = await client.enroll(key, Identity("f.lab.test"), lab.token)
    d.save_anchor(lab.anchor)
    d.install(key, issued.cert, issued.chain)
    st = d.load_state()
    st["identity"] = {"cn": "f.lab.test", "sans": []}
    d.save_state(st)
    policy = schedule.Policy.from_options(dt.timedelta(minutes=20), dt.timedelta(days=5), None)
    clock = FixedClock(issued.cert.not_valid_before_utc + dt.timedelta(days=1))
    agent = Agent(d, policy, clock=clock, rand=lambda: 0.0)
    result = await agent.check()
    assert result.ok and result.renewed is None  # not due (ARI window and threshold ahead)
    clock.set(issued.cert.not_valid_after_utc - dt.timedelta(days=2))
    result = await agent.check()
    assert result.ok and result.decision.action is schedule.Action.RENEW, result.message
    renewed = d.load_cert()
    assert renewed.serial_number != issued.cert.serial_number
    clock.set(renewed.not_valid_after_utc + dt.timedelta(hours=1))
    result = await agent.check()
    assert result.ok and result.decision.action is schedule.Action.REENROLL, result.message
    assert d.load_cert().serial_number != renewed.serial_number


async def test_order_round_on_postgresql(aiohttp_client, make_services, postgres_cluster, tmp_path):
    """The same round on PostgreSQL, where units run on the loop: a POST-as-GET spends its nonce
    in its one unit, the challenge is started in a unit of its own, the order names its
    certificate in the issuance's transaction; nonces stay single use."""
    import time

    from acme.server import ACME
    port = free_port()
    services = await make_services({"SCEPD_ACME_HTTP01_PORT": str(port), "SCEPD_ACME_RESOLVE": "*=127.0.0.1",
                                    "SCEPD_DATABASE_URL": postgres_cluster.create_database(
                                        f"scepd_agent_acme_{time.monotonic_ns()}")})
    assert services.store.dialect == "postgresql"
    app = create_https_app(services)
    client = await aiohttp_client(app)
    app[ACME].respond_wait = app[ACME].finalize_wait = 60.0
    d = AgentDir(tmp_path / "agent")
    d.create()
    d.save_state({"server": str(client.make_url("/acme/directory")), "protocol": "acme",
                  "acme": {"http01_address": "127.0.0.1", "http01_port": port}})
    acme = acme_client_for(d.load_state(), d, services.ca_material.root)
    first = await acme.enroll(new_key(), Identity("pg0.lab.test"), "")
    seen = count_requests(acme)
    second = await acme.enroll(new_key(), Identity("pg1.lab.test"), "")
    assert seen == ["POST new-order", "POST authz", "POST chall", "POST order", "POST cert"], seen
    assert first.cert.serial_number != second.cert.serial_number
    # a nonce is good once
    nonce = acme._nonce
    status, _, _ = await acme._request("POST", acme.account_url, data=acme._sign(acme.account_url, None, nonce, False),
                                       headers={"Content-Type": "application/jose+json"})
    assert status == 200
    status, _, raw = await acme._request("POST", acme.account_url, data=acme._sign(acme.account_url, None, nonce, False),
                                         headers={"Content-Type": "application/jose+json"})
    assert status == 400 and b"badNonce" in raw
