"""Replay of real client captures (../shared/vectors/scep): codec level, then through the app."""
from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scepd import config as config_mod
from scepd.http.app import create_app, open_services
from scepd.clock import FixedClock
from scepd.errors import FailInfo, NotForUs, UnverifiableMessage
from scepd.scep import wire

from .helpers import VECTORS
from .test_subject import cert_subject_der, csr_subject_der

ALL = sorted(p.name[:-4] for p in VECTORS.glob("*.der")
             if not p.name.endswith((".pending-reply.der",)) and p.name != "getcacert-ca.der")
CAPTURE_TIME = dt.datetime(2026, 11, 22, 15, 0, tzinfo=dt.timezone.utc)


def sidecar(name: str) -> dict:
    path = VECTORS / f"{name}.json"
    if not path.exists():  # companion captures share the sidecar of their main vector
        path = VECTORS / f"{name.rsplit('.', 1)[0]}.json"
    return json.loads(path.read_text())


def load_pair(stem: str) -> wire.Recipient:
    cert = x509.load_pem_x509_certificate((VECTORS / "pki" / f"{stem}.pem").read_bytes())
    key = serialization.load_pem_private_key((VECTORS / "pki" / f"{stem}.key").read_bytes(), None)
    return wire.Recipient(cert, key)


def test_every_vector_is_listed(vectors):
    assert len(ALL) == 21, ALL  # 20 sidecar'd captures + the CertPoll's opening PKCSReq


@pytest.mark.parametrize("name", ALL)
def test_codec_decodes_and_decrypts(vectors, name):
    meta = sidecar(name)
    msg = wire.decode_pki_message((VECTORS / f"{name}.der").read_bytes())
    expected_type = 19 if name.endswith(".pkcsreq") else int(meta["expected_messageType"]["value"])
    assert msg.message_type == expected_type
    assert msg.transaction_id == meta["transactionID"]["printable"]
    if not name.endswith(".pkcsreq"):
        assert msg.sender_nonce.hex() == meta["senderNonce_hex"]
        assert msg.envelope.cipher == meta["content_encryption"]["name"]
        assert msg.digest == meta["digest"]["name"]
    decrypts_with = meta["decrypts_with"]
    stem = decrypts_with[0] if isinstance(decrypts_with, list) else decrypts_with
    content = wire.open_envelope(msg.envelope, [load_pair(stem)])
    if expected_type in (17, 19):
        csr = x509.load_pem_x509_csr((VECTORS / meta["csr_file"].split(" ")[0]).read_bytes())
        assert x509.load_der_x509_csr(content).public_key() == csr.public_key()
    elif expected_type == 20:
        ias = wire.decode_issuer_and_subject(content)
        assert ias.subject_der
    else:
        ias = wire.decode_issuer_and_serial(content)
        assert ias.serial > 0


def test_ra_vector_is_not_for_the_ca(vectors):
    msg = wire.decode_pki_message((VECTORS / "sscep-0.10.0-pkcsreq-aes128-sha256-post-ra.der").read_bytes())
    with pytest.raises(NotForUs):
        wire.open_envelope(msg.envelope, [load_pair("ca")])


def test_flipped_signature_byte_is_unverifiable(vectors):
    raw = bytearray((VECTORS / "sscep-0.10.0-pkcsreq-aes128-sha256-post.der").read_bytes())
    raw[-5] ^= 0x01  # inside the SignerInfo signature, the last element
    with pytest.raises(UnverifiableMessage):
        wire.decode_pki_message(bytes(raw))


# --- through the app, with the vectors' own PKI as our CA (and RA) ----------------------------

ENROLL_VECTORS = [n for n in ALL if ("pkcsreq" in n and not n.endswith("post-renewal")
                                     and not n.endswith(".pkcsreq"))]
LEGACY = {n for n in ENROLL_VECTORS if "-des-" in n}


async def _vector_client(aiohttp_client, state: Path, legacy: bool, ra: bool):
    if ra:
        shutil.copy(VECTORS / "pki" / "ra.pem", state / "ca" / "ra.pem")
        shutil.copy(VECTORS / "pki" / "ra.key", state / "ca" / "ra.key")
        (state / "ca" / "ra.key").chmod(0o600)
    env = {"SCEPD_SCEP_STATIC_CHALLENGE": "vector-challenge",
           "SCEPD_SCEP_LEGACY_ALGORITHMS": "1" if legacy else "0"}
    services = await open_services(config_mod.load(state, environ=env), FixedClock(CAPTURE_TIME))
    return await aiohttp_client(create_app(services, close_services=True))


async def _send(client, name: str):
    meta = sidecar(name)
    if meta["http_method"] == "GET":
        return await client.get(meta["request_target"].replace("/scep", "/scep", 1))
    return await client.post("/scep?operation=PKIOperation", data=(VECTORS / f"{name}.der").read_bytes())


def _openssl_open(reply: bytes, key_file: Path, tmp: Path) -> list[x509.Certificate]:
    """Verify the CertRep and decrypt its envelope with plain OpenSSL 3 (no legacy provider)."""
    (tmp / "rep.der").write_bytes(reply)
    subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-in", tmp / "rep.der",
                    "-CAfile", VECTORS / "pki" / "root.pem", "-purpose", "any",
                    "-out", tmp / "inner.der"], check=True, capture_output=True)
    subprocess.run(["openssl", "cms", "-decrypt", "-inform", "DER", "-in", tmp / "inner.der",
                    "-inkey", key_file, "-out", tmp / "certs.p7"], check=True, capture_output=True)
    out = subprocess.run(["openssl", "pkcs7", "-inform", "DER", "-in", tmp / "certs.p7", "-print_certs"],
                         check=True, capture_output=True)
    return x509.load_pem_x509_certificates(out.stdout)


@pytest.mark.parametrize("name", ENROLL_VECTORS)
async def test_replayed_enrollment_succeeds(aiohttp_client, vector_state, tmp_path, name):
    meta = sidecar(name)
    client = await _vector_client(aiohttp_client, vector_state, legacy=name in LEGACY,
                                  ra="-ra" in name)
    resp = await _send(client, name)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "application/x-pki-message"
    body = await resp.read()
    rep = wire.decode_cert_rep(body)
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    assert rep.transaction_id == meta["transactionID"]["printable"]
    assert rep.recipient_nonce.hex() == meta["senderNonce_hex"]
    assert rep.sender_nonce != rep.recipient_nonce
    assert rep.digest == meta["digest"]["name"]
    key_file = VECTORS / meta["response_decryption_key"].split(" ")[0]
    csr = x509.load_pem_x509_csr((VECTORS / meta["csr_file"].split(" ")[0]).read_bytes())
    if name in LEGACY:  # OpenSSL 3 cannot decrypt DES without the legacy provider: our codec does
        key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        signer = wire.decode_pki_message((VECTORS / f"{name}.der").read_bytes()).signer_cert
        inner = wire.open_envelope(rep.envelope, [wire.Recipient(signer, key)])
        certs = wire.certs_from_certs_only(inner)
    else:
        certs = _openssl_open(body, key_file, tmp_path)
    assert certs[0].public_key() == csr.public_key()
    # the requested subject, byte for byte (RDN order and string types as the client chose)
    assert cert_subject_der(certs[0]) == csr_subject_der(csr.public_bytes(serialization.Encoding.DER))
    certs[0].verify_directly_issued_by(load_pair("ca").cert)
    # and it is in the inventory
    store = client.server.app[__import__("scepd.http.app", fromlist=["SERVICES"]).SERVICES].store
    rec = await store.get_certificate(format(certs[0].serial_number, "x"))
    assert rec.transaction_id == meta["transactionID"]["printable"]


@pytest.mark.parametrize("name", sorted(LEGACY))
async def test_replayed_legacy_vector_gets_badalg_by_default(aiohttp_client, vector_state, name):
    client = await _vector_client(aiohttp_client, vector_state, legacy=False, ra="-ra" in name)
    resp = await _send(client, name)
    assert resp.status == 200
    rep = wire.decode_cert_rep(await resp.read())
    assert rep.status == wire.PkiStatus.FAILURE
    assert rep.fail_info == FailInfo.BAD_ALG
    assert "RFC 8894" in rep.fail_info_text
    services = client.server.app[__import__("scepd.http.app", fromlist=["SERVICES"]).SERVICES]
    assert await services.store.list_certificates() == []
