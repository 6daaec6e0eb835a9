"""Pre-signed OCSP responses (requests without a nonce): signed once, served byte-identical without
a database read, refreshed at half their life, replaced at once on a revocation made here and
within [ocsp] status_poll (1 s, on the injected clock) on one made by another process."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import subprocess

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509 import ocsp

from scepd.ca.ocsp import _issuer_hashes
from scepd.ca.revocation import RevocationReason
from scepd.store import CertificateRecord

from .helpers import rsa_key
from .test_crl_ocsp import _post, _request
from .test_revocation_tls import _issue

GOOD, REVOKED, UNKNOWN = ocsp.OCSPCertStatus.GOOD, ocsp.OCSPCertStatus.REVOKED, ocsp.OCSPCertStatus.UNKNOWN


async def _raw(client, der: bytes) -> bytes:
    resp = await client.post("/ocsp", data=der, headers={"Content-Type": "application/ocsp-request"})
    assert resp.status == 200
    return await resp.read()


def _statements(services) -> list[str]:
    """Every SQL statement the services' store runs from now on (BEGIN/COMMIT aside)."""
    seen: list[str] = []

    def listener(_c, _cur, statement, *_r):
        if statement.split()[0].upper() not in {"BEGIN", "COMMIT", "ROLLBACK"}:
            seen.append(" ".join(statement.split()))
    for _engine in services.store.sync_engines():  # the async engine and the units' one
        sa.event.listen(_engine, "before_cursor_execute", listener)
    return seen


def _openssl_check(tmp_path, services, body: bytes, cert: x509.Certificate, expect: str) -> str:
    pem = serialization.Encoding.PEM
    ca = services.ca_material.cert
    (tmp_path / "resp.der").write_bytes(body)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "chain.pem").write_bytes(services.ca_material.root.public_bytes(pem) + ca.public_bytes(pem))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(pem))
    out = subprocess.run(["openssl", "ocsp", "-respin", str(tmp_path / "resp.der"), "-issuer",
                          str(tmp_path / "ca.pem"), "-cert", str(tmp_path / "cert.pem"), "-CAfile",
                          str(tmp_path / "chain.pem"), "-no_nonce", "-resp_text"],
                         capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert "Response verify OK" in text, text
    assert f"{tmp_path / 'cert.pem'}: {expect}" in out.stdout, text
    assert "This Update:" in out.stdout and "Next Update:" in out.stdout
    assert "WARNING" not in text, text  # openssl warns when thisUpdate/nextUpdate are off
    return out.stdout


async def test_good_response_is_presigned_byte_identical_and_valid_for_openssl(client, services, tmp_path,
                                                                              monkeypatch):
    # openssl checks thisUpdate/nextUpdate against the real time: start the test clock there
    services.clock.set(dt.datetime.now(dt.timezone.utc).replace(microsecond=0))
    ca = services.ca_material.cert
    issued = await _issue(services, "presigned", rsa_key(0))
    der = _request(issued.cert, ca)
    first = await _raw(client, der)
    signed_at = services.clock.now()
    services.clock.advance(dt.timedelta(minutes=10))  # re-signing now would change thisUpdate
    seen = _statements(services)
    second = await _raw(client, der)
    assert len(seen) == 1 and "FROM revocation_generation" in seen[0]  # the once-a-second poll only
    seen.clear()
    import asyncio

    from scepd.ca import ocsp as ocsp_module
    hops: list[object] = []
    real_to_thread = asyncio.to_thread

    async def counting_to_thread(fn, *a, **k):
        hops.append(fn)
        return await real_to_thread(fn, *a, **k)
    monkeypatch.setattr(ocsp_module.asyncio, "to_thread", counting_to_thread)
    get = await client.get("/ocsp/" + base64.b64encode(der).decode().replace("/", "%2F"))
    assert get.status == 200
    third = await get.read()
    assert first == second == third
    assert seen == [] and hops == []  # a fresh pre-signed response: no database read, no thread
    assert services.ocsp.stats["signed"] == 1 and services.ocsp.stats["hit"] == 2
    r = ocsp.load_der_ocsp_response(first)
    assert r.certificate_status == GOOD and r.serial_number == issued.cert.serial_number
    assert r.this_update_utc == signed_at and r.next_update_utc == signed_at + dt.timedelta(hours=1)
    ca.public_key().verify(r.signature, r.tbs_response_bytes, padding.PKCS1v15(), hashes.SHA256())
    _openssl_check(tmp_path, services, first, issued.cert, "good")
    # RFC 5019 §6.2 HTTP headers on the GET form
    h = get.headers
    assert h["Content-Type"] == "application/ocsp-response"
    assert "public" in h["Cache-Control"] and "no-transform" in h["Cache-Control"]
    max_age = int(h["Cache-Control"].split("max-age=")[1].split(",")[0])
    assert 0 < max_age <= (r.next_update_utc - services.clock.now()).total_seconds()
    assert h["Last-Modified"] == signed_at.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert h["Expires"] == r.next_update_utc.strftime("%a, %d %b %Y %H:%M:%S GMT")
    etag = h["ETag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 20
    # a cache revalidating with the ETag gets 304 and no body
    again = await client.get("/ocsp/" + base64.b64encode(der).decode().replace("/", "%2F"),
                             headers={"If-None-Match": etag})
    assert again.status == 304 and await again.read() == b"" and again.headers["ETag"] == etag
    await _raw(client, _request(issued.cert, ca, nonce=os.urandom(8)))
    assert len(hops) == 1  # (the probe works: a response with a nonce is signed in a thread)


async def test_revocation_through_the_service_is_served_on_the_next_request(client, services):
    ca = services.ca_material.cert
    issued = await _issue(services, "revoke-here", rsa_key(0))
    der = _request(issued.cert, ca, algorithm=hashes.SHA256())
    good = await _raw(client, der)
    services.clock.advance(dt.timedelta(seconds=5))
    assert await _raw(client, der) == good  # pre-signed
    await services.revocation.revoke(issued.record.serial, RevocationReason.KEY_COMPROMISE, "test")
    r = ocsp.load_der_ocsp_response(await _raw(client, der))  # no clock step: the very next request
    assert r.certificate_status == REVOKED
    assert r.revocation_reason == x509.ReasonFlags.key_compromise
    assert r.revocation_time_utc == services.clock.now()
    # and the revoked answer is pre-signed in turn
    services.clock.advance(dt.timedelta(seconds=5))
    assert await _raw(client, der) == r.public_bytes(serialization.Encoding.DER)


async def test_revocation_by_another_process_is_seen_within_the_poll_bound(client, services, make_services):
    """Another worker or `scepd certs revoke`: a second store on the same SQLite file, without our
    listener. Served "good" (pre-signed) until status_poll (1 s) has passed, then "revoked"; other
    cached responses are re-checked (one status read), not re-signed."""
    ca = services.ca_material.cert
    a = await _issue(services, "other-a", rsa_key(0))
    b = await _issue(services, "other-b", rsa_key(1))
    der_a, der_b = _request(a.cert, ca), _request(b.cert, ca)
    good_a, good_b = await _raw(client, der_a), await _raw(client, der_b)
    other = await make_services()
    await other.revocation.revoke(a.record.serial, RevocationReason.SUPERSEDED, "cli")

    services.clock.advance(dt.timedelta(milliseconds=999))
    seen = _statements(services)
    assert await _raw(client, der_a) == good_a  # within the bound: the pre-signed response
    assert seen == []
    services.clock.advance(dt.timedelta(milliseconds=1))  # the bound: [ocsp] status_poll = 1 s
    r = ocsp.load_der_ocsp_response(await _raw(client, der_a))
    assert r.certificate_status == REVOKED and r.revocation_reason == x509.ReasonFlags.superseded
    assert any("revocation_generation" in s for s in seen)
    signed = services.ocsp.stats["signed"]
    assert await _raw(client, der_b) == good_b  # its status was read again, still good: same bytes
    assert services.ocsp.stats["signed"] == signed and services.ocsp.stats["rechecked"] == 1
    seen.clear()
    assert await _raw(client, der_b) == good_b
    assert seen == []  # confirmed at the new generation: no more reads


async def test_clock_stepped_back_polls_and_re_signs(client, services, make_services):
    """A wall clock stepped back (NTP) must not serve a response whose thisUpdate lies in the
    future, nor stop the revocation counter reads until it has caught up again."""
    issued = await _issue(services, "clock-back", rsa_key(0))
    der = _request(issued.cert, services.ca_material.cert)
    first = await _raw(client, der)
    services.clock.advance(dt.timedelta(seconds=10))
    assert await _raw(client, der) == first  # pre-signed
    services.clock.advance(dt.timedelta(hours=-1))
    r = ocsp.load_der_ocsp_response(await _raw(client, der))
    assert r.this_update_utc == services.clock.now() and r.certificate_status == GOOD  # signed anew
    other = await make_services()
    await other.revocation.revoke(issued.record.serial, RevocationReason.SUPERSEDED, "cli")
    services.clock.advance(dt.timedelta(seconds=1))  # the bound, counted from the stepped clock
    r = ocsp.load_der_ocsp_response(await _raw(client, der))
    assert r.certificate_status == REVOKED


async def test_status_poll_zero_reads_the_generation_on_every_request(make_services, aiohttp_client):
    from scepd.http.app import create_app
    services = await make_services({"SCEPD_OCSP_STATUS_POLL": "0"})
    client = await aiohttp_client(create_app(services))
    issued = await _issue(services, "poll-0", rsa_key(0))
    der = _request(issued.cert, services.ca_material.cert)
    good = await _raw(client, der)
    assert ocsp.load_der_ocsp_response(good).certificate_status == GOOD
    services.clock.advance(dt.timedelta(seconds=5))
    seen = _statements(services)
    assert await _raw(client, der) == good
    assert len(seen) == 1 and "FROM revocation_generation" in seen[0]  # one primary-key read a request
    other = await make_services()
    await other.revocation.revoke(issued.record.serial, RevocationReason.SUPERSEDED, "cli")
    assert ocsp.load_der_ocsp_response(await _raw(client, der)).certificate_status == REVOKED


async def test_presigned_response_is_replaced_before_next_update(client, services):
    ca = services.ca_material.cert
    issued = await _issue(services, "refresh", rsa_key(0))
    der = _request(issued.cert, ca)
    first = await _raw(client, der)
    t0 = services.clock.now()
    services.clock.advance(dt.timedelta(minutes=29, seconds=59))
    assert await _raw(client, der) == first  # more than half of its hour left: kept
    services.clock.advance(dt.timedelta(seconds=1))  # half of the lifetime passed: signed anew
    second = await _raw(client, der)
    assert second != first
    r = ocsp.load_der_ocsp_response(second)
    assert r.certificate_status == GOOD
    assert r.this_update_utc == t0 + dt.timedelta(minutes=30)
    assert r.next_update_utc == r.this_update_utc + dt.timedelta(hours=1)
    services.clock.advance(dt.timedelta(minutes=10))
    assert await _raw(client, der) == second
    # whatever the hour, a served response has at least half an hour before its nextUpdate
    for _ in range(8):  # bounded
        services.clock.advance(dt.timedelta(minutes=17))
        r = ocsp.load_der_ocsp_response(await _raw(client, der))
        assert r.this_update_utc <= services.clock.now()
        assert r.next_update_utc - services.clock.now() >= dt.timedelta(minutes=30)


async def test_nonce_request_gets_a_fresh_response_echoing_it(client, services):
    ca = services.ca_material.cert
    issued = await _issue(services, "nonce", rsa_key(0))
    plain = await _raw(client, _request(issued.cert, ca))
    services.clock.advance(dt.timedelta(seconds=30))
    n1, n2 = os.urandom(16), os.urandom(16)
    r1 = ocsp.load_der_ocsp_response(await _raw(client, _request(issued.cert, ca, nonce=n1)))
    r2 = ocsp.load_der_ocsp_response(await _raw(client, _request(issued.cert, ca, nonce=n2)))
    assert r1.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == n1
    assert r2.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == n2
    assert r1.this_update_utc == services.clock.now() and r1.certificate_status == GOOD
    resp = await client.post("/ocsp", data=_request(issued.cert, ca, nonce=n1))
    assert resp.headers["Cache-Control"] == "no-cache, no-store"  # for that client alone
    assert await _raw(client, _request(issued.cert, ca)) == plain  # the pre-signed one untouched
    assert services.ocsp.stats["signed"] == 4


async def test_unknown_serial_issued_later_by_another_process_is_good(client, services, make_services):
    ca = services.ca_material.cert
    name_hash, key_hash = _issuer_hashes(ca, "sha1")
    serial = 0x5CE9D0CC5E9D0CC5E9D0CC5E9D0CC5
    der = ocsp.OCSPRequestBuilder().add_certificate_by_hash(name_hash, key_hash, serial, hashes.SHA1()) \
        .build().public_bytes(serialization.Encoding.DER)
    unknown = await _raw(client, der)
    assert ocsp.load_der_ocsp_response(unknown).certificate_status == UNKNOWN
    services.clock.advance(dt.timedelta(seconds=5))
    assert await _raw(client, der) == unknown  # cached: one read, no new signature
    assert services.ocsp.stats["signed"] == 1
    # another process issues that serial; no clock step, no listener here
    other = await make_services()
    now = services.clock.now()
    async with other.store.transaction() as tx:
        await tx.insert_certificate(CertificateRecord(
            serial=format(serial, "x"), ca_id=services.authority.ca_id, subject="CN=later", sans=(),
            not_before=now, not_after=now + dt.timedelta(days=1), profile="device", protocol="test",
            transaction_id=None, requester=None, spki_sha256="0" * 64, der=b"\x30\x00", issued_at=now))
    r = ocsp.load_der_ocsp_response(await _raw(client, der))
    assert r.certificate_status == GOOD and r.serial_number == serial


async def test_cache_size_bounds_the_presigned_responses(make_services, aiohttp_client):
    from scepd.http.app import create_app
    services = await make_services({"SCEPD_OCSP_CACHE_SIZE": "3"})
    client = await aiohttp_client(create_app(services))
    ca = services.ca_material.cert
    name_hash, key_hash = _issuer_hashes(ca, "sha1")
    now = services.clock.now()
    serials = [0x7000 + i for i in range(6)]
    async with services.store.transaction() as tx:
        for s in serials:
            await tx.insert_certificate(CertificateRecord(
                serial=format(s, "x"), ca_id=services.authority.ca_id, subject=f"CN={s}", sans=(),
                not_before=now, not_after=now + dt.timedelta(days=1), profile="device", protocol="test",
                transaction_id=None, requester=None, spki_sha256="0" * 64, der=b"\x30\x00", issued_at=now))
    ders = [ocsp.OCSPRequestBuilder().add_certificate_by_hash(name_hash, key_hash, s, hashes.SHA1())
            .build().public_bytes(serialization.Encoding.DER) for s in serials]
    bodies = [await _raw(client, d) for d in ders]
    assert services.ocsp.cache_len() == 3
    assert services.ocsp.stats["signed"] == 6
    services.clock.advance(dt.timedelta(seconds=5))
    assert await _raw(client, ders[-1]) == bodies[-1]  # among the three newest: still held
    assert services.ocsp.stats["signed"] == 6
    assert await _raw(client, ders[0]) != bodies[0]  # dropped (least recently used): signed again
    assert services.ocsp.stats["signed"] == 7 and services.ocsp.cache_len() == 3
    metrics = await (await client.get("/metrics")).text()
    assert "scepd_ocsp_cache_entries 3.0" in metrics
    assert 'scepd_ocsp_cache_events{event="signed"} 7.0' in metrics
    assert 'scepd_ocsp_cache_events{event="hit"} 1.0' in metrics
    # 0 turns the cache off: every response signed (the behaviour before pre-signing)
    plain = await make_services({"SCEPD_OCSP_CACHE_SIZE": "0"})
    client0 = await aiohttp_client(create_app(plain))
    await _raw(client0, ders[1])
    plain.clock.advance(dt.timedelta(seconds=1))
    await _raw(client0, ders[1])
    assert plain.ocsp.stats["signed"] == 2 and plain.ocsp.cache_len() == 0


async def test_malformed_and_foreign_requests_are_not_cached(client, services):
    for body in (b"", b"\x30\x03\x02\x01\x01", os.urandom(200)):
        r = await _post(client, body)
        assert r.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    other = await _issue(services, "foreign", rsa_key(0))
    r = await _post(client, _request(other.cert, other.cert))
    assert r.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    resp = await client.post("/ocsp", data=b"\x30\x03\x02\x01\x01")
    assert resp.headers["Cache-Control"] == "no-cache, no-store"
    assert services.ocsp.cache_len() == 0 and services.ocsp.stats["signed"] == 0


async def test_delegated_responder_renewal_replaces_presigned_responses(make_services, aiohttp_client):
    from scepd.http.app import create_app
    services = await make_services({"SCEPD_CA_OCSP_DELEGATED": "1"})
    client = await aiohttp_client(create_app(services))
    ca = services.ca_material.cert
    issued = await _issue(services, "delegated-cache", rsa_key(0))
    der = _request(issued.cert, ca)
    first = ocsp.load_der_ocsp_response(await _raw(client, der))
    [r1] = first.certificates
    renew_at = r1.not_valid_before_utc + (r1.not_valid_after_utc - r1.not_valid_before_utc) * 2 / 3
    services.clock.set(renew_at - dt.timedelta(minutes=2))
    body = await _raw(client, der)  # an old response: signed anew, still by the first responder
    assert ocsp.load_der_ocsp_response(body).certificates[0] == r1
    services.clock.advance(dt.timedelta(minutes=1))
    assert await _raw(client, der) == body  # pre-signed
    services.clock.advance(dt.timedelta(minutes=1))  # the responder certificate is renewed now
    r = ocsp.load_der_ocsp_response(await _raw(client, der))
    [r2] = r.certificates
    assert r2 != r1 and r2.issuer == ca.subject
    assert r.this_update_utc == services.clock.now() and r.certificate_status == GOOD
    from cryptography.hazmat.primitives.asymmetric import ec
    r2.public_key().verify(r.signature, r.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))


async def test_delegated_responder_renewal_due_in_two_processes_issues_once(make_services):
    """Two workers (two DelegatedResponder objects over the same DIR/ocsp, each with its own
    in-process lock) find the responder certificate due at the same moment: one issues, the other
    waits on DIR/ocsp/responder.lock and loads that pair -- one certificate, key matching."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from scepd.ca.ocsp import DelegatedResponder
    services = await make_services({"SCEPD_CA_OCSP_DELEGATED": "1"})
    directory = services.config.state_dir / "ocsp"
    issued: list[str] = []
    real_issue = services.enrollment.issue_internal

    async def counting_issue(*args, **kwargs):
        issued.append(args[0])
        await asyncio.sleep(0.05)  # the other worker runs meanwhile
        return await real_issue(*args, **kwargs)
    services.enrollment.issue_internal = counting_issue
    first, second = DelegatedResponder(directory, services.enrollment), DelegatedResponder(directory, services.enrollment)
    (cert_a, key_a), (cert_b, key_b) = await asyncio.gather(first.current(), second.current())
    assert len(issued) == 1 and cert_a == cert_b
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key_b.public_key().public_bytes(*spki) == cert_a.public_key().public_bytes(*spki)
    signature = key_b.sign(b"tbs", ec.ECDSA(hashes.SHA256()))
    cert_a.public_key().verify(signature, b"tbs", ec.ECDSA(hashes.SHA256()))
    # at renewal time, the same: one new certificate for both
    services.clock.set(cert_a.not_valid_before_utc + (cert_a.not_valid_after_utc - cert_a.not_valid_before_utc) * 2 / 3)
    (renewed_a, _), (renewed_b, _) = await asyncio.gather(first.current(), second.current())
    assert len(issued) == 2 and renewed_a == renewed_b != cert_a


async def test_delegated_responder_never_loads_a_key_of_another_certificate(make_services):
    """A key file beside the certificate of another pair (a renewal cut short) is not loaded: a
    new pair is issued, and it verifies."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from scepd.ca.ocsp import DelegatedResponder
    services = await make_services({"SCEPD_CA_OCSP_DELEGATED": "1"})
    directory = services.config.state_dir / "ocsp"
    cert, _key = await DelegatedResponder(directory, services.enrollment).current()
    stray = ec.generate_private_key(ec.SECP256R1())
    (directory / "responder.key").write_bytes(stray.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    fresh = DelegatedResponder(directory, services.enrollment)  # a worker starting now
    cert2, key2 = await fresh.current()
    assert cert2 != cert
    signature = key2.sign(b"tbs", ec.ECDSA(hashes.SHA256()))
    cert2.public_key().verify(signature, b"tbs", ec.ECDSA(hashes.SHA256()))
    assert DelegatedResponder(directory, services.enrollment)._load()[0] == cert2
