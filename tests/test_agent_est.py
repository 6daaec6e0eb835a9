"""The agent's EST client (agent/est_client.py) without a network: URL handling, RFC 8951 base64
bodies, certs-only PKCS#7 parsing, Basic credentials, Retry-After, the reply's certificate
checked against key and anchor, 202 polling bounded (sleep injected), refusals as one line with
the server's text, the pin chosen from cacerts, and the EST protocol picked from the state.
The real server is exercised in conformance/test_agent_est.py."""
from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from agent import est_client
from agent.core import SystemClock, protocol_for
from agent.est_client import (EstClient, base_url, basic_authorization, certs_of, client_cert_context,
                              decode_base64_body, retry_after)
from agent.files import AgentDir
from agent.protocol import AgentError, Identity, TrustError, fingerprint, pinned_anchor

from .helpers import ec_key

NOW = dt.datetime.now(dt.timezone.utc)


def _cert(subject: str, key, issuer: x509.Certificate | None = None, issuer_key=None, ca: bool = False,
          days: int = 30) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    return b.sign(issuer_key or key, hashes.SHA256())


class Pki:
    def __init__(self):
        self.root_key, self.ca_key = ec_key(), ec_key()
        self.root = _cert("Test Root", self.root_key, ca=True)
        self.ca = _cert("Test Issuing CA", self.ca_key, self.root, self.root_key, ca=True)

    def leaf(self, key, cn: str = "dev.example") -> x509.Certificate:
        return _cert(cn, key, self.ca, self.ca_key)


@pytest.fixture(scope="module")
def pki():
    return Pki()


def b64_certs(*certs: x509.Certificate, wrap: bool = False) -> bytes:
    der = pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER)
    return base64.encodebytes(der) if wrap else base64.b64encode(der)


class Scripted(EstClient):
    """An EstClient whose HTTP calls answer from a script: (status, headers, body) per call."""

    def __init__(self, pki, answers, **kw):
        self.sleeps: list[float] = []

        async def sleep(seconds):
            self.sleeps.append(seconds)
        super().__init__("https://ca.example:8443/.well-known/est", pki.root, sleep=sleep, **kw)
        self.answers = list(answers)
        self.calls: list[tuple[str, str, dict | None, bytes | None]] = []

    async def _call(self, method, operation, *, ctx=None, data=None, headers=None):
        self.calls.append((method, operation, headers, data))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_base_url_accepts_origin_prefix_and_label():
    assert base_url("https://ca:8443") == "https://ca:8443/.well-known/est"
    assert base_url("https://ca:8443/.well-known/est/") == "https://ca:8443/.well-known/est"
    assert base_url("https://ca:8443/.well-known/est/servers") == "https://ca:8443/.well-known/est/servers"
    with pytest.raises(AgentError, match="https://"):
        base_url("http://ca:8080/.well-known/est")


def test_base64_bodies_per_rfc_8951(pki):
    der = pkcs7.serialize_certificates([pki.ca, pki.root], serialization.Encoding.DER)
    assert decode_base64_body(base64.b64encode(der), "cacerts") == der
    assert decode_base64_body(base64.encodebytes(der).replace(b"\n", b"\r\n"), "cacerts") == der  # line breaks
    assert decode_base64_body(der, "cacerts") == der  # a server sending binary DER
    with pytest.raises(AgentError, match="cacerts reply is not base64"):
        decode_base64_body(b"%%% not base64 %%%", "cacerts")
    assert set(certs_of(b64_certs(pki.ca, pki.root, wrap=True), "cacerts")) == {pki.ca, pki.root}
    with pytest.raises(AgentError, match="not a certs-only PKCS#7"):
        certs_of(base64.b64encode(b"\x30\x03\x02\x01\x01"), "cacerts")


def test_basic_credentials_and_retry_after():
    user, _, password = base64.b64decode(basic_authorization(Identity("dev.example"), "s3cr:et")
                                         .removeprefix("Basic ")).decode().partition(":")
    assert (user, password) == ("dev.example", "s3cr:et")
    for cn in ("", "a:b"):  # RFC 7617: no colon in the user name
        assert base64.b64decode(basic_authorization(Identity(cn), "x")[6:]) == b"scepd-agent:x"
    assert retry_after("7", 1) == 7 and retry_after("0", 1) == 1 and retry_after("9999", 1) == 60
    assert retry_after(None, 1) == 2 and retry_after("Fri, 27 Nov 2026 10:00:00 GMT", 3) == 8


def test_pinned_anchor_from_served_certificates(pki):
    served = [pki.ca, pki.root]
    assert pinned_anchor(served, fingerprint(pki.root), "EST cacerts") == pki.root
    assert pinned_anchor(served, None, "EST cacerts") == pki.root  # first use: the self-signed one
    with pytest.raises(TrustError, match="no certificate served by EST cacerts has the pinned fingerprint"):
        pinned_anchor(served, "AB" * 32, "EST cacerts")


async def test_enroll_sends_basic_and_base64_csr_and_checks_the_reply(pki):
    key = ec_key()
    cert = pki.leaf(key)
    client = Scripted(pki, [(200, {}, b64_certs(pki.ca, pki.root)), (200, {}, b64_certs(cert, wrap=True))])
    issued = await client.enroll(key, Identity("dev.example", ("DNS:dev.example",)), "pw")
    assert issued.cert == cert and issued.chain == [pki.ca] and set(issued.ca_certs) == {pki.ca, pki.root}
    (m1, op1, _, _), (m2, op2, headers, body) = client.calls
    assert (m1, op1, m2, op2) == ("GET", "cacerts", "POST", "simpleenroll")
    assert headers["Authorization"] == basic_authorization(Identity("dev.example"), "pw")
    assert headers["Content-Type"] == "application/pkcs10"
    csr = x509.load_der_x509_csr(base64.b64decode(body, validate=True))
    assert csr.is_signature_valid and csr.public_key() == key.public_key()
    assert csr.subject.rfc4514_string() == "CN=dev.example"
    assert [a.oid.dotted_string for a in csr.attributes] == ["1.2.840.113549.1.9.14"]  # extensionRequest: the SAN
    with pytest.raises(x509.AttributeNotFound):  # the password travels in Basic only
        csr.attributes.get_attribute_for_oid(x509.oid.AttributeOID.CHALLENGE_PASSWORD)


async def test_pending_is_polled_with_retry_after_then_issued(pki):
    key = ec_key()
    cert = pki.leaf(key)
    client = Scripted(pki, [(200, {}, b64_certs(pki.ca, pki.root)),
                            (202, {"Retry-After": "3"}, b"waits\n"), (202, {}, b"waits\n"),
                            (200, {}, b64_certs(cert))])
    issued = await client.enroll(key, Identity("dev.example"), "pw")
    assert issued.cert == cert
    assert client.sleeps == [3.0, 4.0]  # the server's Retry-After, else SCEP's backoff
    posts = [c for c in client.calls if c[0] == "POST"]
    assert len(posts) == 3 and len({c[3] for c in posts}) == 1  # the same request each time


async def test_pending_polling_is_bounded(pki, monkeypatch):
    monkeypatch.setattr(est_client, "MAX_POLLS", 3)
    client = Scripted(pki, [(200, {}, b64_certs(pki.ca, pki.root))] + [(202, {"Retry-After": "1"}, b"")] * 4)
    with pytest.raises(AgentError, match="still pending approval"):
        await client.enroll(ec_key(), Identity("dev.example"), "pw")
    assert client.sleeps == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("status,text", [(401, "authentication failed"), (403, "names outside the scope: x"),
                                         (400, "the PKCS#10 request is not base64")])
async def test_refusals_are_one_line_with_the_servers_text(pki, status, text):
    client = Scripted(pki, [(200, {}, b64_certs(pki.ca, pki.root)), (status, {}, (text + "\n").encode())])
    with pytest.raises(AgentError) as info:
        await client.enroll(ec_key(), Identity("dev.example"), "pw")
    assert str(info.value) == f"the EST server refused simpleenroll (HTTP {status}): {text}"


async def test_reply_must_be_for_our_key_and_under_the_anchor(pki):
    key = ec_key()
    client = Scripted(pki, [(200, {}, b64_certs(pki.ca, pki.root)), (200, {}, b64_certs(pki.leaf(ec_key())))])
    with pytest.raises(AgentError, match="no certificate for our key"):
        await client.enroll(key, Identity("dev.example"), "pw")
    other = Pki()
    foreign = _cert("dev.example", key, other.ca, other.ca_key)
    client = Scripted(pki, [(200, {}, b64_certs(pki.ca, pki.root)), (200, {}, b64_certs(foreign, other.ca))])
    with pytest.raises(TrustError):
        await client.enroll(key, Identity("dev.example"), "pw")


async def test_cacerts_keeps_only_cas_under_the_anchor(pki):
    stranger = Pki()
    client = Scripted(pki, [(200, {}, b64_certs(pki.ca, stranger.ca, pki.root))])
    assert set(await client.ca_certs()) == {pki.ca, pki.root}
    client = Scripted(pki, [(200, {}, b64_certs(stranger.ca, stranger.root))])
    with pytest.raises(TrustError, match="none of the certificates served by EST cacerts"):
        await client.ca_certs()
    client = Scripted(pki, [(404, {}, b"unknown EST label\n")])
    with pytest.raises(AgentError, match="cacerts answered HTTP 404: unknown EST label"):
        await client.ca_certs()


async def test_renew_is_simplereenroll_with_the_current_certificate(pki, monkeypatch):
    old_key, new_key = ec_key(), ec_key()
    old = pki.leaf(old_key, "dev.example")
    new = pki.leaf(new_key, "dev.example")
    seen = {}

    def context(anchor, cert, key, chain):
        seen.update(anchor=anchor, cert=cert, key=key, chain=chain)
        return client_cert_context(anchor, cert, key, chain)
    monkeypatch.setattr(est_client, "client_cert_context", context)
    client = Scripted(pki, [(200, {}, b64_certs(pki.ca, pki.root)), (200, {}, b64_certs(new))])
    issued = await client.renew(new_key, old, old_key)
    assert issued.cert == new
    assert seen == {"anchor": pki.root, "cert": old, "key": old_key, "chain": [pki.ca]}
    _, op, headers, body = client.calls[1]
    assert op == "simplereenroll" and "Authorization" not in headers
    csr = x509.load_der_x509_csr(base64.b64decode(body))
    assert csr.public_key() == new_key.public_key() and csr.subject == old.subject
    # the handshake refused (an expired or serverAuth-only certificate): said what to do
    client = Scripted(pki, [(200, {}, b64_certs(pki.ca, pki.root)),
                            AgentError("EST simplereenroll: the TLS handshake with https://x failed: alert")])
    with pytest.raises(AgentError, match="cannot renew by simplereenroll; enroll again with a challenge"):
        await client.renew(ec_key(), old, old_key)


def test_client_cert_context_loads_the_pair(pki, tmp_path):
    key = ec_key()
    ctx = client_cert_context(pki.root, pki.leaf(key), key, [pki.ca])
    assert ctx.verify_mode.name == "CERT_REQUIRED" and ctx.check_hostname


def test_the_state_selects_the_est_client(pki, tmp_path):
    d = AgentDir(tmp_path / "agent")
    d.create()
    d.save_anchor(pki.root)
    client = protocol_for({"server": "https://ca:8443/.well-known/est/devices", "protocol": "est"}, d, SystemClock())
    assert isinstance(client, EstClient) and client.anchor == pki.root
    assert client.url == "https://ca:8443/.well-known/est/devices"


# --- against the real HTTPS app over TLS on loopback (one injected clock for server and agent) ------

@pytest.fixture
async def est_url(services, tmp_path):
    from aiohttp import web

    from scepd.clock import SystemClock as ServerSystemClock
    from scepd.http.app import create_https_app
    from scepd.http.tls import ServerCertificate, names_for
    tls = ServerCertificate(tmp_path / "tls", services.enrollment, services.ca_material, names_for("127.0.0.1"))
    fixed = services.enrollment.clock  # OpenSSL checks the TLS certificate at the real time
    services.enrollment.clock = ServerSystemClock()
    await tls.ensure()
    services.enrollment.clock = fixed
    runner = web.AppRunner(create_https_app(services))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context(client_auth=False))
    await site.start()
    yield f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/.well-known/est", services
    await runner.cleanup()


async def _est_enrolled(est_url, tmp_path) -> AgentDir:
    from agent.cli import _enroll_est
    url, services = est_url
    d = AgentDir(tmp_path / "agent")
    await _enroll_est(d, url, Identity("est-host", ("DNS:est-host.example",)), "static-secret",
                      fingerprint(services.ca_material.root), None)
    return d


async def test_enroll_then_renew_over_tls_with_the_current_certificate(est_url, tmp_path, clock):
    from agent import schedule
    from agent.core import Agent
    d = await _est_enrolled(est_url, tmp_path)
    first = d.load_pair()
    assert d.load_anchor() == est_url[1].ca_material.root and d.load_state()["protocol"] == "est"
    assert first.cert.public_key() == first.key.public_key()
    result = await Agent(d, schedule.Policy(), clock=clock).check(force=True)
    assert result.ok and result.decision.action is schedule.Action.RENEW, result.message
    second = d.load_pair()
    assert second.cert.serial_number != first.cert.serial_number
    assert second.cert.public_key() == second.key.public_key() != first.key.public_key()
    assert second.cert.subject == first.cert.subject
    assert d.load_state()["last_renewal"]["how"] == "renewed"


async def test_an_expired_certificate_reenrolls_by_simpleenroll_only_with_a_challenge(est_url, tmp_path, clock,
                                                                                        caplog):
    from agent import schedule
    from agent.core import Agent
    d = await _est_enrolled(est_url, tmp_path)
    old = d.load_cert()
    clock.set(old.not_valid_after_utc + dt.timedelta(days=1))
    result = await Agent(d, schedule.Policy(), clock=clock).check()
    assert not result.ok and result.decision.action is schedule.Action.STUCK
    assert "EXPIRED" in result.message and d.load_cert() == old
    result = await Agent(d, schedule.Policy(), clock=clock, challenge="static-secret").check()
    assert result.ok and result.decision.action is schedule.Action.REENROLL, result.message
    new = d.load_cert()
    assert new != old and new.subject == old.subject and new.not_valid_after_utc > clock.now()
    assert d.load_state()["last_renewal"]["how"] == "re-enrolled"
