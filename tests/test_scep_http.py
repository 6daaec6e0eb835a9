"""SCEP over HTTP through the real app factory: operations, encodings, failures."""
from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from scepd.http.app import SERVICES, create_app
from scepd.errors import FailInfo, UnreadableEnvelope
from scepd.scep import wire

from .helpers import ec_key, make_csr, pkcs_req, reply_certs, rsa_key, self_signed

CA_PATHS = ["/scep", "/scep/pkiclient.exe", "/scep/any/thing", "/cgi-bin/pkiclient.exe",
            "/cgi-bin/pkiclient.exe/pkiclient.exe", "/certsrv/mscep/mscep.dll",
            "/certsrv/mscep/mscep.dll/pkiclient.exe"]


def ca_of(client) -> x509.Certificate:
    return client.server.app[SERVICES].ca_material.cert


async def enroll(client, key=None, challenge="static-secret", path="/scep", **kw):
    key = key or rsa_key(0)
    signer = kw.pop("signer", None) or (self_signed(key), key)
    csr = kw.pop("csr", None) or make_csr(key, kw.pop("cn", "device-1"), challenge, kw.pop("sans", None))
    der, txid, nonce = pkcs_req(ca_of(client), key, csr, signer=signer, **kw)
    resp = await client.post(f"{path}?operation=PKIOperation", data=der)
    assert resp.status == 200, await resp.text()
    rep = wire.decode_cert_rep(await resp.read())
    assert rep.transaction_id == txid and rep.recipient_nonce == nonce
    return rep, signer


# --- GetCACaps / GetCACert ------------------------------------------------------------------

async def test_getcacaps_exact_keywords_crlf(client):
    resp = await client.get("/scep?operation=GetCACaps")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    body = await resp.text()
    assert body.endswith("\r\n") and "\n" not in body.replace("\r\n", "")
    assert body.split("\r\n")[:-1] == ["POSTPKIOperation", "SHA-1", "SHA-256", "SHA-384", "SHA-512",
                                      "AES", "DES3", "SCEPStandard", "Renewal", "GetNextCACert"]


async def test_getcacaps_without_post(aiohttp_client, make_services):
    services = await make_services({"SCEPD_SCEP_ADVERTISE_POST": "0"})
    client = await aiohttp_client(create_app(services))
    body = await (await client.get("/scep?operation=GetCACaps&message=0")).text()
    assert "POSTPKIOperation" not in body and "SCEPStandard" not in body and "AES\r\n" in body


@pytest.mark.parametrize("path", CA_PATHS)
async def test_getcacert_chain_in_order_on_every_path(client, path):
    resp = await client.get(f"{path}?operation=GetCACert&message=whatever")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/x-x509-ca-ra-cert"
    certs = wire.certs_from_certs_only(await resp.read())
    material = client.server.app[SERVICES].ca_material
    assert certs == [material.cert, material.root]  # issuing CA (signer/decrypter) first


async def test_getcacert_single_der_when_chain_off(aiohttp_client, make_services):
    services = await make_services({"SCEPD_SCEP_GETCACERT_CHAIN": "0"})
    client = await aiohttp_client(create_app(services))
    resp = await client.get("/scep?operation=GetCACert")
    assert resp.headers["Content-Type"] == "application/x-x509-ca-cert"
    assert x509.load_der_x509_certificate(await resp.read()) == services.ca_material.cert


async def test_getcacert_order_survives_unsorted_der():
    """certs_only must keep wire order even when DER sorting would swap the certificates."""
    a, b = self_signed(rsa_key(1), "zzz"), self_signed(rsa_key(2), "aaa")
    ders = [c.public_bytes(serialization.Encoding.DER) for c in (a, b)]
    for order in (ders, ders[::-1]):
        got = wire.certs_from_certs_only(wire.certs_only(order))
        assert [c.public_bytes(serialization.Encoding.DER) for c in got] == order


async def test_operation_name_is_case_tolerant(client):
    resp = await client.get("/scep?OPERATION=getcacaps")
    assert resp.status == 200 and "AES" in await resp.text()


async def test_unknown_and_missing_operation_are_400(client):
    for url in ("/scep?operation=Nope", "/scep"):
        resp = await client.get(url)
        assert resp.status == 400
        text = await resp.text()
        assert text.count("\n") == 1 and "Traceback" not in text


# --- PKIOperation: encodings ----------------------------------------------------------------

@pytest.mark.parametrize("content_type", [None, "application/x-pki-message", "application/octet-stream",
                                          "text/plain", "application/x-www-form-urlencoded"])
async def test_post_with_any_content_type(client, content_type):
    key = rsa_key(0)
    der, _, _ = pkcs_req(ca_of(client), key, make_csr(key, "ct-test", "static-secret"))
    headers = {"Content-Type": content_type} if content_type else {}
    resp = await client.post("/scep?operation=PKIOperation", data=der, headers=headers)
    assert resp.status == 200
    assert wire.decode_cert_rep(await resp.read()).status == wire.PkiStatus.SUCCESS


def _encodings(der: bytes) -> dict[str, str]:
    std = base64.b64encode(der).decode()
    url = base64.urlsafe_b64encode(der).decode()
    with_newlines = "\n".join(std[i:i + 64] for i in range(0, len(std), 64)) + "\n"
    return {
        "standard-escaped": quote(std, safe=""),
        "standard-raw-slash": std.replace("+", "%2B").replace("=", "%3D"),
        "sscep-newlines": quote(with_newlines, safe="/"),
        "urlsafe-padded": quote(url, safe=""),
        "urlsafe-unpadded": url.rstrip("="),
        "plus-as-space": std.replace("+", "%20").replace("=", ""),
        "macos-unescaped": std,
    }


@pytest.mark.parametrize("encoding", list(_encodings(b"x")))
async def test_get_message_tolerant_decoding(client, encoding):
    key = rsa_key(0)
    der, _, _ = pkcs_req(ca_of(client), key, make_csr(key, f"get-{encoding}", "static-secret"))
    message = _encodings(der)[encoding]
    for url in (f"/scep?operation=PKIOperation&message={message}",
                f"/scep?message={message}&operation=PKIOperation"):
        resp = await client.get(url)
        assert resp.status == 200, await resp.text()
        assert wire.decode_cert_rep(await resp.read()).status == wire.PkiStatus.SUCCESS


async def test_get_without_message_is_400(client):
    assert (await client.get("/scep?operation=PKIOperation")).status == 400
    assert (await client.get("/scep?operation=PKIOperation&message=%%%")).status == 400


async def test_body_cap_413(aiohttp_client, make_services):
    services = await make_services({"SCEPD_SCEP_MAX_BODY_BYTES": "4096"})
    client = await aiohttp_client(create_app(services))
    resp = await client.post("/scep?operation=PKIOperation", data=b"\x30" * 5000)
    assert resp.status == 413


@pytest.mark.parametrize("body", [b"garbage", b"\x30\x03\x02\x01\x01", b"\x30\x80", b""])
async def test_undecodable_post_is_400_one_line(client, body):
    resp = await client.post("/scep?operation=PKIOperation", data=body)
    assert resp.status == 400
    text = await resp.text()
    assert text.count("\n") == 1 and "Error" not in text and "Traceback" not in text


async def test_tampered_signature_is_400(client):
    key = rsa_key(0)
    der, _, _ = pkcs_req(ca_of(client), key, make_csr(key, "t", "static-secret"))
    raw = bytearray(der)
    raw[-3] ^= 0xFF
    resp = await client.post("/scep?operation=PKIOperation", data=bytes(raw))
    assert resp.status == 400
    assert "signature" in await resp.text()


async def test_encrypted_to_someone_else_is_400(client):
    key = rsa_key(0)
    other = self_signed(rsa_key(3), "not our CA")
    der, _, _ = pkcs_req(other, key, make_csr(key, "t", "static-secret"))
    resp = await client.post("/scep?operation=PKIOperation", data=der)
    assert resp.status == 400
    assert "not encrypted to" in await resp.text()


# --- PKIOperation: outcomes -----------------------------------------------------------------

@pytest.mark.parametrize("cipher", ["aes-128-cbc", "aes-192-cbc", "aes-256-cbc", "des-ede3-cbc"])
@pytest.mark.parametrize("digest", ["sha1", "sha256", "sha512"])
async def test_success_reply_mirrors_client_algorithms(client, cipher, digest):
    rep, signer = await enroll(client, cn=f"alg-{cipher}-{digest}", cipher=cipher, digest=digest)
    assert rep.status == wire.PkiStatus.SUCCESS
    assert rep.digest == digest
    env = rep.envelope
    assert env.cipher == cipher
    certs = reply_certs(rep, *signer)
    leaf = certs[0]
    assert leaf.public_key() == rsa_key(0).public_key()
    assert leaf.subject.rfc4514_string() == f"CN=alg-{cipher}-{digest}"
    services = client.server.app[SERVICES]
    assert rep.signer_cert == services.ca_material.cert
    rec = await services.store.get_certificate(format(leaf.serial_number, "x"))
    assert rec.der == leaf.public_bytes(serialization.Encoding.DER)


async def test_issued_certificate_contents(client):
    key = rsa_key(0)
    sans = [x509.DNSName("dev.example.test"), x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
            x509.RFC822Name("ops@example.test")]
    rep, signer = await enroll(client, key, cn="dev.example.test", sans=sans)
    leaf = reply_certs(rep, *signer)[0]
    services = client.server.app[SERVICES]
    assert leaf.serial_number.bit_length() >= 64
    assert leaf.not_valid_after_utc - services.clock.now() == dt.timedelta(days=90)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    got_sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(got_sans) == sans
    cdp = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name[0].value == f"http://127.0.0.1:8080/crl/{services.authority.ca_id}.crl"
    aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert {d.access_location.value for d in aia} == {
        "http://127.0.0.1:8080/ocsp", f"http://127.0.0.1:8080/ca/{services.authority.ca_id}.crt"}
    leaf.verify_directly_issued_by(services.ca_material.cert)


async def test_ec_p256_csr_key_is_issued(client):
    """The requester's CSR key may be EC; the throwaway signer stays RSA for key transport."""
    key, signer_key = ec_key(), rsa_key(1)
    csr = make_csr(key, "ec-device", "static-secret")
    rep, signer = await enroll(client, signer_key, csr=csr, signer=(self_signed(signer_key), signer_key))
    assert rep.status == wire.PkiStatus.SUCCESS
    assert reply_certs(rep, *signer)[0].public_key() == key.public_key()


@pytest.mark.parametrize("challenge,text", [(None, "required"), ("wrong", "invalid"),
                                            ("static-secreT", "invalid")])
async def test_bad_challenge_is_signed_failure_badrequest(client, challenge, text):
    rep, _ = await enroll(client, challenge=challenge, cn="nochal")
    assert rep.status == wire.PkiStatus.FAILURE
    assert rep.fail_info == FailInfo.BAD_REQUEST
    assert text in rep.fail_info_text
    assert rep.envelope is None
    assert rep.signer_cert == client.server.app[SERVICES].ca_material.cert
    assert await client.server.app[SERVICES].store.list_certificates() == []


async def test_small_rsa_key_refused(client):
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    signer_key = rsa_key(1)
    rep, _ = await enroll(client, signer_key, csr=make_csr(small, "small", "static-secret"),
                          signer=(self_signed(signer_key), signer_key))
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_ALG
    assert "2048" in rep.fail_info_text


async def test_csr_with_bad_signature_is_badmessagecheck(client):
    key = rsa_key(0)
    csr = bytearray(make_csr(key, "badsig", "static-secret"))
    csr[-1] ^= 0x01
    rep, _ = await enroll(client, key, csr=bytes(csr))
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_MESSAGE_CHECK


async def test_garbage_csr_is_badmessagecheck(client):
    """Like a padding error (no decryption oracle: see test_padding_oracle.py)."""
    rep, _ = await enroll(client, csr=b"\x30\x03\x02\x01\x00")
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_MESSAGE_CHECK
    assert rep.fail_info_text == UnreadableEnvelope.DETAIL


async def test_unsupported_message_type_is_badrequest(client):
    rep, _ = await enroll(client, message_type=42)
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_REQUEST


@pytest.mark.parametrize("legacy", [False, True])
async def test_des_and_md5_need_the_legacy_switch(aiohttp_client, make_services, legacy):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_LEGACY_ALGORITHMS": "1" if legacy else "0"})
    client = await aiohttp_client(create_app(services))
    for cipher, digest in (("des-cbc", "sha256"), ("aes-128-cbc", "md5")):
        rep, _ = await enroll(client, cn=f"legacy-{cipher}-{digest}", cipher=cipher, digest=digest)
        if legacy:
            assert rep.status == wire.PkiStatus.SUCCESS
            assert rep.digest == digest
        else:
            assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_ALG
            assert rep.digest == "sha256"  # never sign with MD5 unless asked to allow it


async def test_signing_time_skew_is_badtime_when_configured(aiohttp_client, make_services):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_MAX_CLOCK_SKEW": "300"})
    client = await aiohttp_client(create_app(services))
    now = services.clock.now()
    rep, _ = await enroll(client, cn="late", signing_time=now - dt.timedelta(hours=2))
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_TIME
    rep, _ = await enroll(client, cn="ontime", signing_time=now + dt.timedelta(seconds=30))
    assert rep.status == wire.PkiStatus.SUCCESS


async def test_resent_request_returns_the_same_certificate(client):
    key = rsa_key(0)
    der, _, _ = pkcs_req(ca_of(client), key, make_csr(key, "resend", "static-secret"))
    serials = []
    for _ in range(2):
        rep = wire.decode_cert_rep(await (await client.post("/scep?operation=PKIOperation", data=der)).read())
        assert rep.status == wire.PkiStatus.SUCCESS
        signer = wire.decode_pki_message(der).signer_cert
        serials.append(reply_certs(rep, signer, key)[0].serial_number)
    assert serials[0] == serials[1]
    assert len(await client.server.app[SERVICES].store.list_certificates()) == 1


async def test_one_time_challenge_issues_once(client):
    services = client.server.app[SERVICES]
    secret = await services.challenges.create(dt.timedelta(hours=1))
    rep, _ = await enroll(client, challenge=secret, cn="otp-1")
    assert rep.status == wire.PkiStatus.SUCCESS
    rep, _ = await enroll(client, rsa_key(1), challenge=secret, cn="otp-2")
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_REQUEST


async def test_one_time_challenge_expires_and_binds_cn(client):
    services = client.server.app[SERVICES]
    expiring = await services.challenges.create(dt.timedelta(minutes=10))
    bound = await services.challenges.create(dt.timedelta(hours=1), cn_pattern="router-*")
    services.clock.advance(dt.timedelta(minutes=11))
    rep, _ = await enroll(client, challenge=expiring, cn="late")
    assert rep.status == wire.PkiStatus.FAILURE
    rep, _ = await enroll(client, challenge=bound, cn="switch-1")
    assert rep.status == wire.PkiStatus.FAILURE and "subject" in rep.fail_info_text
    rep, _ = await enroll(client, challenge=bound, cn="router-7")
    assert rep.status == wire.PkiStatus.SUCCESS


async def test_healthz_readyz_and_ca_download(client):
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    services = client.server.app[SERVICES]
    resp = await client.get(f"/ca/{services.authority.ca_id}.crt")
    assert x509.load_der_x509_certificate(await resp.read()) == services.ca_material.cert
    assert (await client.get("/ca/0000.crt")).status == 404


async def _raw_http(client, request: bytes) -> tuple[str, dict, bytes]:
    import asyncio
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=30)  # HTTP/1.0: the server closes
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


async def test_cisco_ios_http10_with_pkiclient_suffix(client):
    """Cisco IOS: HTTP/1.0, no Host header, /pkiclient.exe appended to the configured path."""
    status, headers, body = await _raw_http(
        client, b"GET /cgi-bin/pkiclient.exe/pkiclient.exe?operation=GetCACert&message=CA HTTP/1.0\r\n\r\n")
    assert status.endswith("200 OK")
    assert headers["Content-Type"] == "application/x-x509-ca-ra-cert"
    assert wire.certs_from_certs_only(body)[0] == client.server.app[SERVICES].ca_material.cert
    key = rsa_key(0)
    der, _, _ = pkcs_req(ca_of(client), key, make_csr(key, "ios-router", "static-secret"),
                         cipher="des-ede3-cbc", digest="sha1")
    message = quote(base64.b64encode(der).decode(), safe="")
    status, headers, body = await _raw_http(
        client, f"GET /cgi-bin/pkiclient.exe/pkiclient.exe?operation=PKIOperation&message={message} "
                f"HTTP/1.0\r\n\r\n".encode())
    assert status.endswith("200 OK")
    assert wire.decode_cert_rep(body).status == wire.PkiStatus.SUCCESS


async def test_large_get_message_4096_bit_key_many_sans(client):
    """A GET message over aiohttp's default 8190-byte request line still enrolls."""
    big = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    sans = [x509.DNSName(f"a-rather-long-host-name-{i}.devices.example.test") for i in range(60)]
    der, _, _ = pkcs_req(ca_of(client), big, make_csr(big, "big", "static-secret", sans))
    message = quote(base64.b64encode(der).decode(), safe="")
    assert len(message) > 8190
    resp = await client.get(f"/scep?operation=PKIOperation&message={message}")
    assert resp.status == 200
    assert wire.decode_cert_rep(await resp.read()).status == wire.PkiStatus.SUCCESS
