"""CRLs and the OCSP responder through the real app factory, checked by cryptography and openssl."""
from __future__ import annotations

import base64
import datetime as dt
import os
import subprocess
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509 import ocsp

from scepd import config as config_mod
from scepd.http.app import create_app, open_services
from scepd.ca.revocation import RevocationReason

from .helpers import rsa_key
from .test_revocation_tls import _issue


def _verify_signed_by(ca: x509.Certificate, signature: bytes, data: bytes) -> None:
    ca.public_key().verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


async def _crl(client, services) -> x509.CertificateRevocationList:
    resp = await client.get(f"/crl/{services.authority.ca_id}.crl")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/pkix-crl"
    return x509.load_der_x509_crl(await resp.read())


def _number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


# --- CRL --------------------------------------------------------------------------------------

async def test_crl_contents_and_url_matches_certificates(client, services):
    good = await _issue(services, "crl-good", rsa_key(0))
    bad = await _issue(services, "crl-bad", rsa_key(1))
    other = await _issue(services, "crl-other", rsa_key(2))
    # the URL we serve is the one in every certificate's CRL distribution point
    cdp = good.cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name[0].value.endswith(f"/crl/{services.authority.ca_id}.crl")

    empty = await _crl(client, services)
    assert len(empty) == 0 and _number(empty) == 1
    await services.revocation.revoke(bad.record.serial, RevocationReason.KEY_COMPROMISE, "test")
    await services.revocation.revoke(other.record.serial, RevocationReason.UNSPECIFIED, "test")

    crl = await _crl(client, services)
    ca = services.ca_material.cert
    assert crl.is_signature_valid(ca.public_key())
    assert crl.issuer == ca.subject
    assert _number(crl) == 3  # one new CRL per revocation, numbers only go up
    assert crl.last_update_utc == services.clock.now()
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(hours=24)
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    entry = crl.get_revoked_certificate_by_serial_number(bad.cert.serial_number)
    assert entry is not None and entry.revocation_date_utc == services.clock.now()
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    unspecified = crl.get_revoked_certificate_by_serial_number(other.cert.serial_number)
    assert unspecified is not None and len(unspecified.extensions) == 0  # RFC 5280: no reasonCode
    assert crl.get_revoked_certificate_by_serial_number(good.cert.serial_number) is None
    # SCEP GetCRL is served the same bytes
    assert services.scep.crl_provider is not None
    assert x509.load_der_x509_crl(await services.scep.crl_provider()) == crl


async def test_crl_regenerated_before_next_update_and_number_persists(client, services, make_services):
    first = await _crl(client, services)
    assert _number(first) == 1
    services.clock.advance(dt.timedelta(hours=11))
    assert _number(await _crl(client, services)) == 1  # still fresh: the same CRL
    services.clock.advance(dt.timedelta(hours=2))  # past half its validity: a new one
    second = await _crl(client, services)
    assert _number(second) == 2 and second.last_update_utc == services.clock.now()
    assert second.next_update_utc > first.next_update_utc
    # a second process on the same store continues the numbering
    again = await make_services({"SCEPD_CA_CRL_VALIDITY": "2h"})
    services.clock.advance(dt.timedelta(hours=13))
    third = await again.crl.current()
    assert third.number == 3 and third.next_update - third.this_update == dt.timedelta(hours=2)


async def test_crl_notices_revocations_by_another_process(client, services, make_services):
    issued = await _issue(services, "crl-cli", rsa_key(0))
    assert _number(await _crl(client, services)) == 1
    # `scepd certs revoke` runs in its own process: its RevocationService has no CRL listener
    from scepd.ca.revocation import RevocationService
    await RevocationService(services.store, services.clock).revoke(
        issued.record.serial, RevocationReason.SUPERSEDED, "cli")
    crl = await _crl(client, services)
    assert _number(crl) == 2
    assert crl.get_revoked_certificate_by_serial_number(issued.cert.serial_number) is not None


async def test_unknown_ca_crl_is_404(client):
    assert (await client.get("/crl/0000000000000000.crl")).status == 404


async def test_openssl_crl_check(client, services, tmp_path):
    good = await _issue(services, "ossl-good", rsa_key(0))
    bad = await _issue(services, "ossl-bad", rsa_key(1))
    await services.revocation.revoke(bad.record.serial, RevocationReason.KEY_COMPROMISE, "test")
    crl = await _crl(client, services)
    pem = serialization.Encoding.PEM
    (tmp_path / "crl.der").write_bytes(crl.public_bytes(serialization.Encoding.DER))
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(pem))
    (tmp_path / "root.pem").write_bytes(services.ca_material.root.public_bytes(pem))
    (tmp_path / "ca.pem").write_bytes(services.ca_material.cert.public_bytes(pem))
    (tmp_path / "good.pem").write_bytes(good.cert.public_bytes(pem))
    (tmp_path / "bad.pem").write_bytes(bad.cert.public_bytes(pem))
    out = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(tmp_path / "crl.der"), "-noout",
                          "-text"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "X509v3 CRL Number" in out.stdout and "Key Compromise" in out.stdout
    assert format(bad.cert.serial_number, "X") in out.stdout.replace(":", "").upper()
    at = str(int(services.clock.now().timestamp()) + 60)
    base = ["openssl", "verify", "-attime", at, "-crl_check", "-CAfile", str(tmp_path / "root.pem"),
            "-untrusted", str(tmp_path / "ca.pem"), "-CRLfile", str(tmp_path / "crl.pem")]
    ok = subprocess.run(base + [str(tmp_path / "good.pem")], capture_output=True, text=True)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    revoked = subprocess.run(base + [str(tmp_path / "bad.pem")], capture_output=True, text=True)
    assert revoked.returncode != 0
    assert "certificate revoked" in (revoked.stdout + revoked.stderr)


# --- OCSP -------------------------------------------------------------------------------------

def _request(cert, issuer, nonce: bytes | None = None, algorithm=hashes.SHA1()) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm)
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


async def _post(client, der: bytes) -> ocsp.OCSPResponse:
    resp = await client.post("/ocsp", data=der, headers={"Content-Type": "application/ocsp-request"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/ocsp-response"
    return ocsp.load_der_ocsp_response(await resp.read())


async def test_ocsp_good_revoked_unknown(client, services):
    ca = services.ca_material.cert
    good = await _issue(services, "ocsp-good", rsa_key(0))
    bad = await _issue(services, "ocsp-bad", rsa_key(1))
    await services.revocation.revoke(bad.record.serial, RevocationReason.KEY_COMPROMISE, "test")
    aia = good.cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert any(d.access_location.value == services.authority.ocsp_url for d in aia)

    nonce = os.urandom(16)
    r = await _post(client, _request(good.cert, ca, nonce))
    assert r.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert r.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert r.serial_number == good.cert.serial_number
    assert r.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    assert r.responder_key_hash == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    _verify_signed_by(ca, r.signature, r.tbs_response_bytes)
    assert r.next_update_utc - r.this_update_utc == dt.timedelta(hours=1)

    r = await _post(client, _request(bad.cert, ca, algorithm=hashes.SHA256()))
    assert r.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert r.revocation_reason == x509.ReasonFlags.key_compromise
    assert r.revocation_time_utc == services.clock.now()
    _verify_signed_by(ca, r.signature, r.tbs_response_bytes)

    unknown = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        r.issuer_name_hash, r.issuer_key_hash, 12345678901234567890, hashes.SHA256()).build()
    r = await _post(client, unknown.public_bytes(serialization.Encoding.DER))
    assert r.certificate_status == ocsp.OCSPCertStatus.UNKNOWN


async def test_ocsp_get_form(client, services):
    ca = services.ca_material.cert
    good = await _issue(services, "ocsp-get", rsa_key(0))
    der = _request(good.cert, ca)
    resp = await client.get("/ocsp/" + quote(base64.b64encode(der).decode(), safe=""))
    assert resp.status == 200
    assert "max-age=" in resp.headers["Cache-Control"]
    r = ocsp.load_der_ocsp_response(await resp.read())
    assert r.certificate_status == ocsp.OCSPCertStatus.GOOD
    # RFC 6960 A.1: clients differ in escaping; raw '/' (even '//') and '+' must work too
    candidates = []
    for _ in range(400):  # ~98% chance of a '//' somewhere; some '/' is near certain
        der = _request(good.cert, ca, nonce=os.urandom(16))
        b64 = base64.b64encode(der).decode()
        if "/" in b64:
            candidates.append(b64)
        if "//" in b64:
            break
    b64 = candidates[-1]
    assert "/" in b64
    resp = await client.get("/ocsp/" + b64.replace("+", "%2B"), allow_redirects=False)
    assert resp.status == 200
    assert ocsp.load_der_ocsp_response(await resp.read()).certificate_status == ocsp.OCSPCertStatus.GOOD


async def test_ocsp_sees_revocation_by_another_process_within_the_poll_bound(client, services):
    """`scepd certs revoke` runs in its own process (no listener here): the pre-signed "good" is
    served until the revocation counter is read again, at most [ocsp] status_poll (1 s) later."""
    from scepd.ca.revocation import RevocationService
    ca = services.ca_material.cert
    issued = await _issue(services, "ocsp-cli", rsa_key(0))
    assert (await _post(client, _request(issued.cert, ca))).certificate_status == ocsp.OCSPCertStatus.GOOD
    await RevocationService(services.store, services.clock).revoke(
        issued.record.serial, RevocationReason.CESSATION_OF_OPERATION, "cli")
    services.clock.advance(dt.timedelta(seconds=1))
    r = await _post(client, _request(issued.cert, ca))
    assert r.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert r.revocation_reason == x509.ReasonFlags.cessation_of_operation


async def test_ocsp_foreign_issuer_is_unauthorized(client, services):
    other = x509.load_der_x509_certificate((await _issue(services, "x", rsa_key(0))).record.der)
    # ask about a certificate "issued by" the leaf itself: an issuer we do not serve
    r = await _post(client, _request(other, other))
    assert r.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


@pytest.mark.parametrize("body", [b"", b"\x30\x03\x02\x01\x01", b"not der at all", os.urandom(300),
                                  b"\x30" + b"\x82\xff\xff" + b"\x00" * 20])
async def test_ocsp_malformed_post_is_malformed_request_never_500(client, body):
    resp = await client.post("/ocsp", data=body)
    assert resp.status == 200
    r = ocsp.load_der_ocsp_response(await resp.read())
    assert r.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


@pytest.mark.parametrize("tail", ["!!!", "AAAA", "%ZZ", "a" * 5000])
async def test_ocsp_malformed_get_never_500(client, tail):
    resp = await client.get("/ocsp/" + tail)
    assert resp.status in (200, 400, 404)
    if resp.status == 200:
        r = ocsp.load_der_ocsp_response(await resp.read())
        assert r.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


async def test_ocsp_oversized_nonce_is_malformed(client, services):
    ca = services.ca_material.cert
    good = await _issue(services, "nonce", rsa_key(0))
    r = await _post(client, _request(good.cert, ca, os.urandom(64)))
    assert r.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


async def test_previous_ca_after_rollover_keeps_crl_and_ocsp(state_dir, clock, aiohttp_client):
    """Certificates of a previous issuing CA (after `ca activate-next`) still get CRL and OCSP."""
    from scepd.ca import pki
    cfg = config_mod.load(state_dir, environ={})
    services = await open_services(cfg, clock)
    try:
        old = await _issue(services, "before-rollover", rsa_key(0))
        old_ca = services.ca_material.cert
    finally:
        await services.close()
    pki.rollover(state_dir, clock, (state_dir / "ca" / "root.key").read_bytes(), None, None)
    pki.activate_next(state_dir)
    services = await open_services(cfg, clock)
    try:
        assert services.authority.ca_id != old.record.ca_id
        await services.revocation.revoke(old.record.serial, RevocationReason.KEY_COMPROMISE, "test")
        client = await aiohttp_client(create_app(services))
        resp = await client.get(f"/crl/{old.record.ca_id}.crl")
        assert resp.status == 200
        crl = x509.load_der_x509_crl(await resp.read())
        assert crl.issuer == old_ca.subject and crl.is_signature_valid(old_ca.public_key())
        assert crl.get_revoked_certificate_by_serial_number(old.cert.serial_number) is not None
        r = await _post(client, _request(old.cert, old_ca))
        assert r.certificate_status == ocsp.OCSPCertStatus.REVOKED
        _verify_signed_by(old_ca, r.signature, r.tbs_response_bytes)
    finally:
        await services.close()


async def test_readyz_checks_ca_key(client, services):
    assert (await client.get("/readyz")).status == 200
    from dataclasses import replace
    from cryptography.hazmat.primitives.asymmetric import rsa
    services.ca_material = replace(services.ca_material, key=rsa.generate_private_key(65537, 2048))
    resp = await client.get("/readyz")
    assert resp.status == 503 and "CA key" in await resp.text()


async def test_scep_getcrl_serves_the_published_crl(client, services):
    """SCEP GetCRL (messageType 22) through the app answers with the same CRL as /crl/."""
    from asn1crypto import cms

    from scepd.scep import der, wire

    from .helpers import pkcs_req
    key = rsa_key(0)
    issued = await _issue(services, "getcrl", key)
    revoked = await _issue(services, "getcrl-revoked", rsa_key(1))
    await services.revocation.revoke(revoked.record.serial, RevocationReason.AFFILIATION_CHANGED, "test")
    ca = services.ca_material.cert
    msg, _, _ = pkcs_req(ca, key, der.seq(ca.subject.public_bytes(), der.integer(issued.cert.serial_number)),
                         message_type=22, signer=(issued.cert, key))
    resp = await client.post("/scep?operation=PKIOperation", data=msg)
    rep = wire.decode_cert_rep(await resp.read())
    assert rep.status == wire.PkiStatus.SUCCESS
    inner = wire.open_envelope(rep.envelope, [wire.Recipient(issued.cert, key)])
    signed = cms.ContentInfo.load(inner)["content"]
    crl = x509.load_der_x509_crl(signed["crls"][0].dump())
    assert crl == await _crl(client, services)
    assert crl.get_revoked_certificate_by_serial_number(revoked.cert.serial_number) is not None


async def test_delegated_responder_signs_and_openssl_accepts(make_services, aiohttp_client, tmp_path):
    from scepd.clock import SystemClock
    services = await make_services({"SCEPD_CA_OCSP_DELEGATED": "1"})
    real = SystemClock()  # openssl checks thisUpdate/nextUpdate against the real clock
    services.enrollment.clock = services.ocsp.clock = real
    client = await aiohttp_client(create_app(services))
    ca = services.ca_material.cert
    issued = await _issue(services, "delegated", rsa_key(0))
    der = _request(issued.cert, ca)
    resp = await client.post("/ocsp", data=der)
    body = await resp.read()
    r = ocsp.load_der_ocsp_response(body)
    assert r.certificate_status == ocsp.OCSPCertStatus.GOOD
    [responder] = r.certificates
    assert responder.issuer == ca.subject and responder != ca
    eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING]
    responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
    from cryptography.hazmat.primitives.asymmetric import ec
    responder.public_key().verify(r.signature, r.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
    rec = await services.store.get_certificate(format(responder.serial_number, "x"))
    assert rec.profile == "ocsp"  # in the inventory like every certificate
    # the same responder certificate is reused, not reissued per request
    r2 = ocsp.load_der_ocsp_response(await (await client.post("/ocsp", data=der)).read())
    assert r2.certificates[0] == responder
    pem = serialization.Encoding.PEM
    (tmp_path / "resp.der").write_bytes(body)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "root.pem").write_bytes(services.ca_material.root.public_bytes(pem))
    (tmp_path / "chain.pem").write_bytes(services.ca_material.root.public_bytes(pem) + ca.public_bytes(pem))
    (tmp_path / "cert.pem").write_bytes(issued.cert.public_bytes(pem))
    out = subprocess.run(["openssl", "ocsp", "-respin", str(tmp_path / "resp.der"), "-issuer",
                          str(tmp_path / "ca.pem"), "-cert", str(tmp_path / "cert.pem"), "-CAfile",
                          str(tmp_path / "chain.pem"), "-no_nonce"], capture_output=True, text=True)
    assert "Response verify OK" in out.stdout + out.stderr, out.stdout + out.stderr
    assert f"{tmp_path / 'cert.pem'}: good" in out.stdout


async def test_concurrent_publishers_never_share_a_crl_number(services, make_services):
    """Two CRL services (two replicas) asked concurrently: each number names exactly one CRL."""
    other = await make_services()
    issued = await _issue(services, "race", rsa_key(0))
    services.clock.advance(dt.timedelta(hours=13))
    await services.revocation.revoke(issued.record.serial, RevocationReason.SUPERSEDED, "test")
    import asyncio
    seen: dict[int, bytes] = {}
    for _round in range(3):
        services.clock.advance(dt.timedelta(hours=13))
        results = await asyncio.gather(*(s.crl.current() for s in (services, other) for _ in range(3)))
        for published in results:
            assert seen.setdefault(published.number, published.der) == published.der
    assert max(seen) == (await other.crl.current()).number
    assert sorted(seen) == list(range(min(seen), max(seen) + 1))


async def test_ocsp_request_for_two_certificates_is_refused_cleanly(client, services, tmp_path):
    """pyca/cryptography answers one CertID per request (so do Boulder and most responders):
    `openssl ocsp -cert a -cert b` gets malformedRequest, never a 500."""
    pem = serialization.Encoding.PEM
    a = await _issue(services, "two-a", rsa_key(0))
    b = await _issue(services, "two-b", rsa_key(1))
    for name, cert in (("ca", services.ca_material.cert), ("a", a.cert), ("b", b.cert)):
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(pem))
    out = subprocess.run(["openssl", "ocsp", "-issuer", str(tmp_path / "ca.pem"), "-cert", str(tmp_path / "a.pem"),
                          "-cert", str(tmp_path / "b.pem"), "-no_nonce", "-reqout", str(tmp_path / "req.der")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = await _post(client, (tmp_path / "req.der").read_bytes())
    assert r.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


async def test_fresh_crl_costs_one_key_read_and_other_process_revocations_are_seen(client, services,
                                                                                    make_services):
    """No COUNT over the revoked certificates per CRL request: one primary-key read says whether
    any process revoked something since the cached CRL was signed."""
    import sqlalchemy as sa

    issued = [await _issue(services, f"crl-gen-{i}", rsa_key(i)) for i in range(2)]
    await services.revocation.revoke(issued[0].record.serial, RevocationReason.SUPERSEDED, "test")
    assert _number(await _crl(client, services)) == 1
    seen: list[str] = []

    def statement_seen(_c, _cur, statement, *_r):
        if statement.split()[0].upper() not in {"BEGIN", "COMMIT", "ROLLBACK"}:
            seen.append(" ".join(statement.split()))
    for _engine in services.store.sync_engines():  # the async engine and the units' one
        sa.event.listen(_engine, "before_cursor_execute", statement_seen)
    crl = await _crl(client, services)
    assert _number(crl) == 1 and len(seen) == 1 and "count(" not in seen[0].lower()
    assert seen[0].startswith("SELECT revocation_generation.generation FROM revocation_generation")
    # another process (the CLI, a replica) revokes: the next request publishes a new CRL
    other = await make_services()
    from scepd.ca.revocation import RevocationService
    await RevocationService(other.store, other.clock).revoke(issued[1].record.serial,
                                                             RevocationReason.KEY_COMPROMISE, "cli")
    seen.clear()
    crl = await _crl(client, services)
    assert _number(crl) == 2 and len(crl) == 2
    assert not any("count(" in s.lower() for s in seen)


async def test_store_down_gives_try_later_and_503_never_500(client, services):
    issued = await _issue(services, "down", rsa_key(0))
    der = _request(issued.cert, services.ca_material.cert)
    await services.store.engine.dispose()

    async def broken(*_a, **_k):
        raise OSError("database unreachable")
    services.store.get_certificate = broken
    services.store.revocation_generation = broken
    r = await _post(client, der)
    assert r.response_status == ocsp.OCSPResponseStatus.TRY_LATER
    assert (await client.get(f"/crl/{services.authority.ca_id}.crl")).status == 503
