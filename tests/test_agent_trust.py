"""What the agent trusts from a SCEP server reached over http://: a man in the middle may rewrite
GetCACert / GetNextCACert. Every certificate is verified to the pinned root (basicConstraints,
keyUsage, validity at the injected clock, path length), so a certificate signed by an enrolled
device's key, an expired CA or a CA without keyCertSign is never an envelope recipient, a CertRep
signer or an announced next CA. The server runs in-process on loopback; the man in the middle is
an aiohttp app in front of it."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from agent.protocol import AgentError, Identity, TrustError, Usage, issued_path
from agent.scep_client import ScepClient
from scepd import config as config_mod
from scepd.ca import pki
from scepd.http.app import create_app, open_services
from scepd.errors import NotForUs
from scepd.scep import wire

from .helpers import rsa_key


async def _site(app):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/scep"


@dataclass
class Lab:
    services: object
    clock: object
    real: str  # the server
    mitm: str  # the man in the middle in front of it
    #: operation -> body the man in the middle answers instead of the server
    replaced: dict[str, bytes] = field(default_factory=dict)
    posted: list[bytes] = field(default_factory=list)

    @property
    def root(self) -> x509.Certificate:
        return self.services.ca_material.root

    @property
    def ca(self) -> x509.Certificate:
        return self.services.ca_material.cert

    def client(self, via_mitm: bool = True, now=None) -> ScepClient:
        return ScepClient(self.mitm if via_mitm else self.real, self.root, now=now or self.clock.now)


def _mitm_app(lab: Lab) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        op = request.query.get("operation", "")
        if op in lab.replaced:
            return web.Response(body=lab.replaced[op], content_type="application/x-x509-ca-ra-cert")
        async with aiohttp.ClientSession() as session:
            if request.method == "POST":
                body = await request.read()
                lab.posted.append(body)
                reply = session.post(lab.real, params=request.query, data=body)
            else:
                reply = session.get(lab.real, params=request.query)
            async with reply as resp:
                return web.Response(status=resp.status, body=await resp.read(), content_type=resp.content_type)
    app = web.Application()
    app.router.add_route("*", "/scep", handle)
    return app


@pytest.fixture
async def lab(services, clock):
    runner, real = await _site(create_app(services))
    lab = Lab(services, clock, real, "")
    mrunner, lab.mitm = await _site(_mitm_app(lab))
    yield lab
    await mrunner.cleanup()
    await runner.cleanup()


def _certs_only(*certs: x509.Certificate) -> bytes:
    return wire.certs_only([c.public_bytes(serialization.Encoding.DER) for c in certs])


def _cert(cn: str, key, issuer: x509.Certificate, issuer_key, now: dt.datetime, *, ca: bool,
          key_cert_sign: bool, path_length: int | None = None) -> x509.Certificate:
    """A certificate with keyUsage digitalSignature + keyEncipherment (+ keyCertSign): what a
    man in the middle wants as the envelope recipient and CertRep signer."""
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                                         crl_sign=key_cert_sign, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(issuer_key, hashes.SHA256()))


async def _enrolled_device(lab: Lab) -> tuple[x509.Certificate, object]:
    """The attacker's own device, legitimately enrolled: a certificate and key under the CA."""
    key = rsa_key(5)
    issued = await lab.client(via_mitm=False).enroll(key, Identity("attacker-device"), "static-secret")
    return issued.cert, key


def _recipient_of(message: bytes, cert: x509.Certificate, key) -> bool:
    """Whether `cert`/`key` can open the envelope of a posted PKIMessage."""
    try:
        wire.open_envelope(wire.decode_pki_message(message).envelope, [wire.Recipient(cert, key)])
        return True
    except NotForUs:
        return False


async def test_a_ca_signed_by_a_device_key_is_refused(lab):
    device, device_key = await _enrolled_device(lab)
    fake = _cert("Test Issuing CA", rsa_key(6), device, device_key, lab.clock.now(), ca=True, key_cert_sign=True)
    lab.replaced["GetCACert"] = _certs_only(fake, device, lab.ca, lab.root)
    client = lab.client()
    trusted = await client.ca_certs()
    assert fake not in trusted and lab.ca in trusted
    issued = await client.enroll(rsa_key(7), Identity("victim"), "static-secret")
    assert issued.chain == [lab.ca]
    # the challenge travelled to the CA, not to the man in the middle
    assert not _recipient_of(lab.posted[0], fake, rsa_key(6))
    assert _recipient_of(lab.posted[0], lab.ca, lab.services.ca_material.key)


async def test_a_device_certificate_served_first_is_not_the_recipient(lab):
    """An end-entity certificate the CA issued verifies like an RA would: the agent encrypts to a
    CA that can decrypt before it considers an RA."""
    device, device_key = await _enrolled_device(lab)
    lab.replaced["GetCACert"] = _certs_only(device, lab.ca, lab.root)
    client = lab.client()
    await client.enroll(rsa_key(7), Identity("victim"), "static-secret")
    assert client.roles[device] is Usage.RA and client.roles[lab.ca] is Usage.CA
    assert not _recipient_of(lab.posted[0], device, device_key)


async def test_a_next_ca_signed_by_a_device_is_refused(lab):
    device, device_key = await _enrolled_device(lab)
    fake = _cert("Test Issuing CA", rsa_key(6), device, device_key, lab.clock.now(), ca=True, key_cert_sign=True)
    lab.replaced["GetNextCACert"] = wire.encode_next_ca_certs([fake], device, device_key, lab.clock.now(),
                                                              extra_certs=(lab.ca,))
    with pytest.raises(TrustError, match="does not verify"):
        await lab.client().next_ca()


async def test_a_tampered_next_ca_reply_is_refused(lab, state_dir):
    """The announcement is only as good as its signature: one byte changed inside the
    encapsulated certificates and the reply is refused; untouched, the same reply is followed."""
    nxt = pki.rollover(state_dir, lab.clock, (state_dir / "ca" / "root.key").read_bytes(), None, None)
    lab.services.scep.next_ca = (nxt,)
    assert await lab.client().next_ca() == [nxt]
    body = lab.services.scep.next_ca_certs()
    at = body.index(nxt.public_bytes(serialization.Encoding.DER)) + 200  # inside the new CA's DER
    lab.replaced["GetNextCACert"] = body[:at] + bytes([body[at] ^ 1]) + body[at + 1:]
    with pytest.raises(AgentError, match="signature does not verify"):
        await lab.client().next_ca()


async def test_an_expired_ca_is_refused(lab):
    later = lab.ca.not_valid_after_utc + dt.timedelta(days=1)
    client = lab.client(via_mitm=False, now=lambda: later)
    assert await client.ca_certs() == [lab.root]  # only the pinned root itself is left
    with pytest.raises(AgentError, match="can be encrypted to"):
        await client.enroll(rsa_key(7), Identity("victim"), "static-secret")


async def test_a_ca_without_key_cert_sign_is_refused(lab, state_dir):
    root_key = serialization.load_pem_private_key((state_dir / "ca" / "root.key").read_bytes(), None)
    now = lab.clock.now()
    no_sign = _cert("Test Issuing CA", rsa_key(6), lab.root, root_key, now, ca=True, key_cert_sign=False)
    lab.replaced["GetCACert"] = _certs_only(no_sign, lab.ca, lab.root)
    client = lab.client()
    assert no_sign not in await client.ca_certs()
    await client.enroll(rsa_key(7), Identity("victim"), "static-secret")
    assert not _recipient_of(lab.posted[0], no_sign, rsa_key(6))
    # nor does a certificate it signed verify
    leaf = _cert("leaf", rsa_key(7), no_sign, rsa_key(6), now, ca=False, key_cert_sign=False)
    with pytest.raises(TrustError, match="keyCertSign"):
        issued_path(leaf, lab.root, [no_sign], now)


async def test_path_length_is_enforced(lab):
    """The issuing CA has pathLenConstraint 0: a sub-CA it signs cannot issue."""
    now = lab.clock.now()
    sub = _cert("Sub CA", rsa_key(6), lab.ca, lab.services.ca_material.key, now, ca=True, key_cert_sign=True)
    leaf = _cert("leaf", rsa_key(7), sub, rsa_key(6), now, ca=False, key_cert_sign=False)
    with pytest.raises(TrustError, match="path length"):
        issued_path(leaf, lab.root, [sub, lab.ca], now)


async def test_a_legitimate_ra_is_used_and_its_next_ca_followed(tmp_path, clock):
    """An EC issuing CA with an RSA RA (CA:FALSE, keyEncipherment): the RA verifies as an RA,
    is the envelope recipient and signs the CertRep and the GetNextCACert reply."""
    d = tmp_path / "ra-state"
    material = pki.create(d, clock, cn="RAT", root_bits=2048, ca_key_type="ec")
    ra = pki.create_ra(d, material, clock, None)
    (d / config_mod.CONFIG_NAME).write_text(config_mod.render_default())
    nxt = pki.rollover(d, clock, (d / "ca" / "root.key").read_bytes(), None, None)
    services = await open_services(config_mod.load(d, environ={"SCEPD_SCEP_STATIC_CHALLENGE": "s"}), clock)
    runner, url = await _site(create_app(services, close_services=True))
    try:
        client = ScepClient(url, material.root, now=clock.now)
        issued = await client.enroll(rsa_key(7), Identity("behind-ra"), "s")
        assert client.roles == {ra: Usage.RA, material.cert: Usage.CA, material.root: Usage.CA}
        assert client.recipient(issued.ca_certs) == ra and issued.chain == [material.cert]
        assert await client.next_ca() == [nxt]
    finally:
        await runner.cleanup()
