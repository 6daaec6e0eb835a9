"""EST (RFC 7030, RFC 8951) through the HTTPS app factory: base64 in and out, Basic and client
certificate authentication, labels, approval (202 + Retry-After), serverkeygen, errors, limits.
The TLS client certificate is what scepd.http.tls.peer_certificate returns; these tests set it
(the conformance tests present real ones over TLS)."""
from __future__ import annotations

import base64
import datetime as dt
import email
import email.policy
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import generate_latest

from scepd.ca.revocation import RevocationReason
from scepd.http import tls
from scepd.http.app import create_https_app
from scepd.render import serial_hex

from .helpers import ec_key, make_csr, rsa_key

EST = "/.well-known/est"


def basic(password: str, user: str = "anyone") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def b64_lines(der: bytes) -> bytes:
    """base64 broken into 64-character lines with CRLF, as RFC 8951 clients send it."""
    b64 = base64.b64encode(der)
    return b"".join(b64[i:i + 64] + b"\r\n" for i in range(0, len(b64), 64))


def certs_of(body: bytes) -> list[x509.Certificate]:
    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))


class Peer:
    """The TLS client certificate the handler sees (None: the client presented none)."""

    def __init__(self):
        self.cert: x509.Certificate | None = None

    def __call__(self, _request):
        return self.cert


@pytest.fixture
def peer(monkeypatch) -> Peer:
    p = Peer()
    monkeypatch.setattr(tls, "peer_certificate", p)
    return p


@pytest.fixture
async def est(aiohttp_client, services, peer):
    return await aiohttp_client(create_https_app(services))


async def enroll(client, key, password: str | None = "static-secret", cn: str = "dev-1.example",
                 sans=None, path: str = "simpleenroll", label: str = ""):
    headers = basic(password) if password is not None else {}
    headers["Content-Type"] = "application/pkcs10"
    prefix = f"{EST}/{label}/" if label else f"{EST}/"
    return await client.post(prefix + path, data=b64_lines(make_csr(key, cn, sans=sans)), headers=headers)


async def issued(resp) -> x509.Certificate:
    body = await resp.read()
    assert resp.status == 200, body
    assert resp.headers["Content-Type"].startswith("application/pkcs7-mime")
    assert "smime-type=certs-only" in resp.headers["Content-Type"]
    (cert,) = certs_of(body)
    return cert


# --- cacerts, csrattrs, labels ------------------------------------------------------------------

async def test_cacerts_is_the_chain_as_base64_certs_only_pkcs7(est, services, tmp_path):
    resp = await est.get(f"{EST}/cacerts")
    body = await resp.read()
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/pkcs7-mime")
    assert resp.headers["Content-Transfer-Encoding"] == "base64"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # strict DER: no BER fallback
        assert set(certs_of(body)) == set(services.ca_material.chain)
    (tmp_path / "cacerts.der").write_bytes(base64.b64decode(body))
    out = subprocess.run(["openssl", "pkcs7", "-inform", "DER", "-in", str(tmp_path / "cacerts.der"),
                          "-print_certs", "-noout"], capture_output=True, text=True, check=True)
    assert out.stdout.count("subject=") == len(services.ca_material.chain)


async def test_csrattrs_is_204_unless_configured(est, make_services, aiohttp_client, tmp_path):
    resp = await est.get(f"{EST}/csrattrs")
    assert resp.status == 204
    services = await make_services({"SCEPD_EST_CSR_ATTRIBUTES": "1.2.840.113549.1.9.7, 1.3.6.1.1.1.1.22"})
    client = await aiohttp_client(create_https_app(services))
    resp = await client.get(f"{EST}/csrattrs")
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/csrattrs"
    (tmp_path / "attrs.der").write_bytes(base64.b64decode(await resp.read()))
    out = subprocess.run(["openssl", "asn1parse", "-inform", "DER", "-in", str(tmp_path / "attrs.der")],
                         capture_output=True, text=True, check=True).stdout
    assert "challengePassword" in out and "1.3.6.1.1.1.1.22" in out


async def test_a_label_selects_its_profile_and_an_unknown_label_is_404(make_services, aiohttp_client, peer):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_EST_LABELS": "servers=server"})
    client = await aiohttp_client(create_https_app(services))
    cert = await issued(await enroll(client, rsa_key(1), label="servers"))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert = await issued(await enroll(client, rsa_key(2), cn="dev-2.example"))
    assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}  # [est] profile = device
    for resp in (await client.get(f"{EST}/nosuch/cacerts"), await enroll(client, rsa_key(3), label="nosuch"),
                 await client.get(f"{EST}/servers/nosuchop")):
        assert resp.status == 404, await resp.text()


async def test_bad_est_settings_are_config_errors(make_services):
    from scepd.config import ConfigError
    for env in ({"SCEPD_EST_LABELS": "servers"}, {"SCEPD_EST_LABELS": "x=admin"},
                {"SCEPD_EST_LABELS": "a/b=server"}, {"SCEPD_EST_SERVERKEYGEN_KEY": "dsa"},
                {"SCEPD_EST_CSR_ATTRIBUTES": "challengePassword"}, {"SCEPD_EST_PROFILE": "nope"}):
        with pytest.raises(ConfigError):
            await make_services(env)


# --- simpleenroll with HTTP Basic -----------------------------------------------------------------

async def test_simpleenroll_with_the_static_challenge(est, services):
    key = rsa_key(1)
    cert = await issued(await enroll(est, key))
    assert cert.public_key() == key.public_key()
    assert cert.subject.rfc4514_string() == "CN=dev-1.example"
    record = await services.store.get_certificate(serial_hex(cert.serial_number))
    assert record.protocol == "est" and record.requester.startswith("est:")
    audit = [a for a in await services.store.list_audit() if a.event == "certificate.issued"]
    assert any(a.details.get("protocol") == "est" and a.details.get("challenge") == "static" for a in audit)
    text = generate_latest(services.metrics.registry).decode()
    assert 'scepd_certificates_issued_total{profile="device",protocol="est"} 1.0' in text
    assert 'scepd_est_responses_total{operation="simpleenroll",status="200"} 1.0' in text


async def test_wrong_or_missing_password_is_401_with_www_authenticate(est):
    for resp in (await enroll(est, rsa_key(1), password="wrong"), await enroll(est, rsa_key(1), password=None),
                 await est.post(f"{EST}/simpleenroll", data=b64_lines(make_csr(rsa_key(1))),
                                headers={"Authorization": "Basic %%%"})):
        assert resp.status == 401, await resp.text()
        assert resp.headers["WWW-Authenticate"].startswith('Basic realm="')
        assert resp.headers["Content-Type"].startswith("text/plain")


async def test_a_one_time_challenge_is_spent_by_its_certificate(est, services):
    secret = await services.challenges.create(dt.timedelta(hours=1))
    await issued(await enroll(est, rsa_key(1), password=secret))
    resp = await enroll(est, rsa_key(2), password=secret, cn="dev-2.example")
    assert resp.status == 401
    assert "invalid, expired or already used" in await resp.text()


async def test_names_outside_the_challenge_scope_are_403(est, services):
    secret = await services.challenges.create(dt.timedelta(hours=1), names=["dev-*.example"])
    resp = await enroll(est, rsa_key(1), password=secret, sans=[x509.DNSName("bank.example")])
    assert resp.status == 403 and "bank.example" in await resp.text()
    await issued(await enroll(est, rsa_key(1), password=secret))  # not spent by the refusal


async def test_a_challenge_profile_and_another_label_profile_are_403(make_services, aiohttp_client, peer):
    services = await make_services({"SCEPD_EST_LABELS": "servers=server"})
    client = await aiohttp_client(create_https_app(services))
    secret = await services.challenges.create(dt.timedelta(hours=1), profile="agent")
    resp = await enroll(client, rsa_key(1), password=secret, label="servers")
    assert resp.status == 403 and "'agent'" in await resp.text()
    cert = await issued(await enroll(client, rsa_key(1), password=secret))
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]


async def test_malformed_bodies_are_400_and_oversize_413(est):
    auth = basic("static-secret")
    for body in (b"not base64 at all!", b"", base64.b64encode(b"\x30\x03\x02\x01\x01"),
                 base64.b64encode(make_csr(rsa_key(1))[:-20])):
        resp = await est.post(f"{EST}/simpleenroll", data=body, headers=auth)
        assert resp.status == 400, (body, await resp.text())
        assert "Traceback" not in await resp.text()
    resp = await est.post(f"{EST}/simpleenroll", data=b"A" * (64 * 1024 + 4), headers=auth)
    assert resp.status == 413
    resp = await est.get(f"{EST}/simpleenroll")
    assert resp.status == 405


async def test_pem_armour_and_a_raw_line_are_tolerated(est):
    csr = make_csr(ec_key(), "dev-3.example")
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + b64_lines(csr) + b"-----END CERTIFICATE REQUEST-----\n"
    await issued(await est.post(f"{EST}/simpleenroll", data=pem, headers=basic("static-secret")))
    raw = base64.b64encode(make_csr(ec_key(), "dev-4.example")).rstrip(b"=")
    await issued(await est.post(f"{EST}/simpleenroll", data=raw, headers=basic("static-secret")))


async def test_failed_attempts_per_address_are_limited(make_services, aiohttp_client, peer):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_LIMITS_EST_FAILURES_PER_ADDRESS": "1/1h burst 2"})
    client = await aiohttp_client(create_https_app(services))
    for _ in range(2):
        assert (await enroll(client, rsa_key(1), password="wrong")).status == 401
    resp = await enroll(client, rsa_key(1))  # even the right password, until a token is back
    assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0
    assert (await client.get(f"{EST}/cacerts")).status == 200


# --- approval ---------------------------------------------------------------------------------------

async def test_pending_answers_202_then_the_certificate_once_approved(make_services, aiohttp_client, peer):
    services = await make_services({"SCEPD_POLICY_REQUIRE_APPROVAL": "est", "SCEPD_EST_RETRY_AFTER": "120"})
    client = await aiohttp_client(create_https_app(services))
    secret = await services.challenges.create(dt.timedelta(hours=1))
    key = rsa_key(1)
    for _ in range(2):  # the retry finds the same request (the challenge was spent on the first)
        resp = await enroll(client, key, password=secret)
        assert resp.status == 202 and resp.headers["Retry-After"] == "120"
    # another key with the spent challenge is no retry
    assert (await enroll(client, rsa_key(2), password=secret)).status == 401
    (pending,) = await services.store.list_pending()
    assert pending.protocol == "est"
    approved = await services.enrollment.approve_pending(pending.id, "test")
    cert = await issued(await enroll(client, key, password=secret))
    assert cert == approved.cert
    # serverkeygen would have to keep the key until approval: refused
    resp = await enroll(client, rsa_key(3), path="serverkeygen",
                        password=await services.challenges.create(dt.timedelta(hours=1)))
    assert resp.status == 403


async def test_a_rejected_request_is_403(make_services, aiohttp_client, peer):
    services = await make_services({"SCEPD_POLICY_REQUIRE_APPROVAL": "true",
                                    "SCEPD_SCEP_STATIC_CHALLENGE": "static-secret"})
    client = await aiohttp_client(create_https_app(services))
    assert (await enroll(client, rsa_key(1))).status == 202
    (pending,) = await services.store.list_pending()
    await services.enrollment.reject_pending(pending.id, "no", "test")
    assert (await enroll(client, rsa_key(1))).status == 403


# --- serverkeygen -----------------------------------------------------------------------------------

async def test_serverkeygen_returns_a_pkcs8_key_and_its_certificate_and_keeps_no_key(est, services, state_dir):
    resp = await enroll(est, rsa_key(1), path="serverkeygen", cn="dev-9.example")
    body = await resp.read()
    assert resp.status == 200, body
    assert resp.headers["Content-Type"].startswith("multipart/mixed; boundary=")
    msg = email.message_from_bytes(b"Content-Type: " + resp.headers["Content-Type"].encode() + b"\r\n\r\n" + body,
                                   policy=email.policy.default)
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["application/pkcs8", "application/pkcs7-mime"]
    assert all(p["Content-Transfer-Encoding"] == "base64" for p in parts)
    key_der = base64.b64decode(parts[0].get_payload())
    key = serialization.load_der_private_key(key_der, None)
    (cert,) = certs_of(parts[1].get_payload().encode())
    assert cert.public_key() == key.public_key() and key.key_size == 2048
    assert cert.public_key() != rsa_key(1).public_key()
    assert cert.subject.rfc4514_string() == "CN=dev-9.example"
    db = (state_dir / "scepd.db").read_bytes()
    assert key_der not in db and key_der[-64:] not in db


# --- client certificates: simplereenroll and simpleenroll ------------------------------------------

async def test_simplereenroll_with_the_client_certificate(est, services, peer, clock):
    old_key = rsa_key(1)
    old = await issued(await enroll(est, old_key))
    peer.cert = old
    new_key = rsa_key(2)
    resp = await enroll(est, new_key, password=None, path="simplereenroll")
    new = await issued(resp)
    assert new.public_key() == new_key.public_key() and new.subject == old.subject
    (audit,) = [a for a in await services.store.list_audit() if a.event == "certificate.renewed"]
    assert audit.details["protocol"] == "est" and audit.details["renewal_of"] == serial_hex(old.serial_number)
    # same key: refused unless [scep] renewal_same_key; another CN or a new SAN: refused
    for resp in (await enroll(est, old_key, password=None, path="simplereenroll"),
                 await enroll(est, rsa_key(3), password=None, path="simplereenroll", cn="other.example"),
                 await enroll(est, rsa_key(3), password=None, path="simplereenroll",
                              sans=[x509.DNSName("extra.example")])):
        assert resp.status == 403, await resp.text()
    # no client certificate, a foreign one
    peer.cert = None
    assert (await enroll(est, rsa_key(3), password=None, path="simplereenroll")).status == 401
    from .helpers import self_signed
    peer.cert = self_signed(rsa_key(4), "dev-1.example")
    assert (await enroll(est, rsa_key(3), password=None, path="simplereenroll")).status == 401
    # revoked
    peer.cert = new
    await _revoke(services, new)
    resp = await enroll(est, rsa_key(3), password=None, path="simplereenroll")
    assert resp.status == 401 and "WWW-Authenticate" in resp.headers


async def _revoke(services, cert: x509.Certificate) -> None:
    await services.revocation.revoke(serial_hex(cert.serial_number), RevocationReason.KEY_COMPROMISE, "test")


async def test_an_expired_client_certificate_does_not_renew(est, services, peer, clock):
    old = await issued(await enroll(est, rsa_key(1)))
    peer.cert = old
    clock.set(old.not_valid_after_utc + dt.timedelta(seconds=1))
    resp = await enroll(est, rsa_key(2), password=None, path="simplereenroll")
    assert resp.status == 401
    assert await resp.text() == "the client certificate does not authenticate this request\n"


async def test_simpleenroll_with_a_client_certificate_is_limited_to_its_names(est, services, peer):
    old = await issued(await enroll(est, rsa_key(1), sans=[x509.DNSName("alias.example")]))
    peer.cert = old
    cert = await issued(await enroll(est, rsa_key(2), password=None, cn="alias.example"))
    assert cert.subject.rfc4514_string() == "CN=alias.example"
    resp = await enroll(est, rsa_key(3), password=None, cn="other.example")
    assert resp.status == 403 and "other.example" in await resp.text()
    await _revoke(services, old)
    assert (await enroll(est, rsa_key(4), password=None)).status == 401


def test_basic_credentials_and_base64_decoding():
    from scepd.est.service import AuthenticationRequired, decode_base64
    from scepd.est.transport import basic_password
    from scepd.errors import MalformedRequest
    assert basic_password("Basic " + base64.b64encode(b"user:pa:ss").decode()) == "pa:ss"  # first colon splits
    assert basic_password("basic " + base64.b64encode(b":secret").decode()) == "secret"
    assert basic_password("Bearer abc") is None and basic_password(None) is None
    for bad in ("Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()):
        with pytest.raises(AuthenticationRequired):
            basic_password(bad)
    der = make_csr(rsa_key(1))
    b64 = base64.b64encode(der)
    for body in (b64, b64.rstrip(b"="), b"  " + b64_lines(der).replace(b"\r\n", b"\n") + b"\n",
                 b"-----BEGIN CERTIFICATE REQUEST-----\r\n" + b64_lines(der) + b"-----END CERTIFICATE REQUEST-----"):
        assert decode_base64(body, "CSR") == der
    for body in (b"", b" \r\n", b"MII*"):
        with pytest.raises(MalformedRequest):
            decode_base64(body, "CSR")
