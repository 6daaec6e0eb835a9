"""CSR self-signatures are verified by scepd itself (issue 10): the CSR's own algorithm over the
CertificationRequestInfo bytes received. SHA-1 is accepted over SCEP (as SCEP messages with
SHA-1 are: strongSwan `pki --scep --digest sha1`, older Cisco IOS), MD5 only behind the legacy
switch, ACME takes SHA-2 only. CSRs are made by the openssl CLI: pyca refuses to sign with SHA-1."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from scepd.http.app import SERVICES, create_app
from scepd.ca.csr import LEGACY_SCEP_DIGESTS, SCEP_DIGESTS, STRONG_DIGESTS, decode_csr
from scepd.errors import BadMessageCheck, FailInfo, ForbiddenAlgorithm, UnreadableEnvelope
from scepd.scep import wire

from . import helpers
from .helpers import pkcs_req, reply_certs, rsa_key, self_signed
from .test_acme_ari import path_of, responder  # noqa: F401  (fixture)
from .test_acme_jws import P, b64
from .test_acme_orders import dns_server, get, key_authorization, lab, new_order, wait_status  # noqa: F401
from .test_subject import SUBJECTS, _tlv, cert_subject_der, csr_with_name


def openssl_csr(tmp: Path, *args: str, key: str = "rsa:2048", dn: tuple[str, ...] = ("CN=legacy-device",),
                challenge: str | None = "static-secret") -> bytes:
    """`openssl req -new` with the given signing options; returns the CSR DER."""
    cnf = tmp / "req.cnf"
    cnf.write_text("[req]\nprompt=no\ndistinguished_name=dn\n"
                   + (f"attributes=attrs\n[attrs]\nchallengePassword={challenge}\n" if challenge else "")
                   + "[dn]\n" + "".join(f"{rdn}\n" for rdn in dn))
    keygen = ["-newkey", key, "-nodes", "-keyout", str(tmp / "csr.key")] if key != "existing" \
        else ["-key", str(tmp / "csr.key")]
    subprocess.run(["openssl", "req", "-new", *keygen, "-config", str(cnf),
                    "-outform", "DER", "-out", str(tmp / "req.der"), *args], check=True, capture_output=True)
    return (tmp / "req.der").read_bytes()


def csr_key(tmp: Path):
    return serialization.load_pem_private_key((tmp / "csr.key").read_bytes(), None)


def tampered(csr_der: bytes) -> bytes:
    raw = bytearray(csr_der)
    raw[-3] ^= 0x01  # inside the signature BIT STRING, the last element
    return bytes(raw)


# --- decode_csr -------------------------------------------------------------------------------------

@pytest.mark.parametrize("label, args, key", [
    ("rsa-sha1", ["-sha1"], "rsa:2048"),
    ("ecdsa-sha1", ["-sha1"], "ec-p256"),
    ("rsa-sha224", ["-sha224"], "rsa:2048"),
    ("rsa-sha512", ["-sha512"], "rsa:2048"),
    ("rsa-pss-sha384", ["-sha384", "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32"],
     "rsa:2048"),
])
def test_signatures_verify_and_tampering_is_caught(tmp_path, label, args, key):
    if key == "ec-p256":
        subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-out", str(tmp_path / "csr.key")], check=True, capture_output=True)
        key = "existing"
    csr = openssl_csr(tmp_path, *args, key=key)
    facts = decode_csr(csr, allowed_digests=SCEP_DIGESTS)
    assert facts.public_key == csr_key(tmp_path).public_key()
    with pytest.raises(BadMessageCheck, match="does not verify"):
        decode_csr(tampered(csr), allowed_digests=SCEP_DIGESTS)


def test_rsa_pss_key_csr_verifies(tmp_path):
    """A key that is RSA-PSS itself (id-RSASSA-PSS SubjectPublicKeyInfo), parameters parsed."""
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA-PSS", "-pkeyopt", "rsa_keygen_bits:2048",
                    "-out", str(tmp_path / "csr.key")], check=True, capture_output=True)
    csr = openssl_csr(tmp_path, key="existing")
    assert decode_csr(csr, allowed_digests=STRONG_DIGESTS).common_name == "legacy-device"
    with pytest.raises(BadMessageCheck):
        decode_csr(tampered(csr), allowed_digests=STRONG_DIGESTS)


def test_ed25519_csr_verifies():
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "ed")]))
           .sign(key, None).public_bytes(serialization.Encoding.DER))
    assert decode_csr(csr, allowed_digests=frozenset()).common_name == "ed"  # no digest to allow
    with pytest.raises(BadMessageCheck):
        decode_csr(tampered(csr), allowed_digests=frozenset())


def test_digest_allow_lists(tmp_path):
    sha1 = openssl_csr(tmp_path, "-sha1")
    with pytest.raises(ForbiddenAlgorithm, match="SHA-1"):
        decode_csr(sha1, allowed_digests=STRONG_DIGESTS)
    md5 = openssl_csr(tmp_path, "-md5")
    with pytest.raises(ForbiddenAlgorithm, match="MD5"):
        decode_csr(md5, allowed_digests=SCEP_DIGESTS)
    assert decode_csr(md5, allowed_digests=LEGACY_SCEP_DIGESTS).common_name == "legacy-device"


def test_strongswan_style_unsorted_attributes_are_verified_on_the_received_bytes():
    """The tolerant path (attributes SET OF unsorted, re-encoded to be read) goes through the
    same verification: a flipped signature bit is caught there too."""
    from asn1crypto import core as asn1_core, csr as asn1_csr, x509 as asn1_x509
    from cryptography.hazmat.primitives.asymmetric import padding
    key = rsa_key(0)
    info = asn1_csr.CertificationRequest.load(csr_with_name(key, SUBJECTS["sscep"]))["certification_request_info"]
    ext = asn1_csr.CRIAttribute({"type": "extension_request", "values": [[{
        "extn_id": "subject_alt_name", "critical": False,
        "extn_value": [asn1_x509.GeneralName("dns_name", "a-long-enough-name.example.test")]}]]}).dump()
    # extensionRequest before challengePassword, as strongSwan pki sends them: not DER, whose
    # SET OF is sorted by encoding (asn1crypto would sort it, so the bytes are put together here)
    attributes = _tlv(0xA0, ext + info["attributes"][0].dump())
    tbs = _tlv(0x30, info["version"].dump() + info["subject"].dump() + info["subject_pk_info"].dump()
               + attributes)
    csr = _tlv(0x30, tbs + asn1_csr.SignedDigestAlgorithm({"algorithm": "sha1_rsa"}).dump()
               + asn1_core.OctetBitString(key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())).dump())
    with pytest.raises(ValueError):
        x509.load_der_x509_csr(csr)  # pyca refuses it: the tolerant path it is
    facts = decode_csr(csr, allowed_digests=SCEP_DIGESTS)
    assert facts.challenge_password == "static-secret" and facts.subject_der == SUBJECTS["sscep"]
    with pytest.raises(BadMessageCheck):
        decode_csr(tampered(csr), allowed_digests=SCEP_DIGESTS)
    with pytest.raises(ForbiddenAlgorithm):
        decode_csr(csr, allowed_digests=STRONG_DIGESTS)


# --- SCEP through the app ---------------------------------------------------------------------------

async def _enroll_csr(client, csr: bytes, key):
    signer = (self_signed(rsa_key(1)), rsa_key(1))  # the message signer; the CSR key is `key`
    msg, _, _ = pkcs_req(client.server.app[SERVICES].ca_material.cert, key, csr, signer=signer)
    resp = await client.post("/scep?operation=PKIOperation", data=msg)
    assert resp.status == 200
    return wire.decode_cert_rep(await resp.read()), signer


async def test_sha1_csr_enrolls_over_scep(client, tmp_path):
    csr = openssl_csr(tmp_path, "-sha1", dn=("O=interop-lab", "CN=sha1-device"))
    rep, _ = await _enroll_csr(client, tampered(csr), csr_key(tmp_path))
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_MESSAGE_CHECK
    # a CSR inside the envelope that does not verify gets the one no-oracle answer (issue 11 item 1)
    assert rep.fail_info_text == UnreadableEnvelope.DETAIL
    rep, signer = await _enroll_csr(client, csr, csr_key(tmp_path))
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    leaf = reply_certs(rep, *signer)[0]
    assert leaf.public_key() == csr_key(tmp_path).public_key()
    assert leaf.signature_hash_algorithm.name == "sha256"  # what we sign with is our choice
    assert leaf.subject.rfc4514_string() == "CN=sha1-device,O=interop-lab"


@pytest.mark.parametrize("legacy", [False, True])
async def test_md5_csr_needs_the_legacy_switch(aiohttp_client, make_services, tmp_path, legacy):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_LEGACY_ALGORITHMS": "1" if legacy else "0"})
    client = await aiohttp_client(create_app(services))
    csr = openssl_csr(tmp_path, "-md5")
    rep, _ = await _enroll_csr(client, csr, csr_key(tmp_path))
    if legacy:
        assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    else:
        assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_ALG
        assert "MD5" in rep.fail_info_text
        assert await services.store.list_certificates() == []


async def test_sha1_csr_approved_after_pending(aiohttp_client, make_services, tmp_path):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_REQUIRE_APPROVAL": "1"})
    client = await aiohttp_client(create_app(services))
    rep, _ = await _enroll_csr(client, openssl_csr(tmp_path, "-sha1"), csr_key(tmp_path))
    assert rep.status == wire.PkiStatus.PENDING
    [pending] = await services.store.find_pending(rep.transaction_id)
    issued = await services.enrollment.approve_pending(pending.id, "admin")
    assert issued.cert.public_key() == csr_key(tmp_path).public_key()


# --- ACME: SHA-2 only, and subjects from identifiers ------------------------------------------------

async def _ready_order(lab, name):  # noqa: F811
    resp, order = await new_order(lab, [{"type": "dns", "value": name}])
    a = await get(lab, order["authorizations"][0])
    ch = next(c for c in a["challenges"] if c["type"] == "http-01")
    lab.tokens[ch["token"]] = key_authorization(lab, ch)
    await lab.post(path_of(ch["url"]), {})
    order = await wait_status(lab, resp.headers["Location"])
    assert order["status"] == "ready", order
    return resp.headers["Location"], order


async def test_acme_refuses_sha1_csr_with_badcsr(lab, tmp_path):  # noqa: F811
    _, order = await _ready_order(lab, "sha1.example.test")
    csr = openssl_csr(tmp_path, "-sha1", "-addext", "subjectAltName=DNS:sha1.example.test",
                      dn=("CN=sha1.example.test",), challenge=None)
    resp = await lab.post(path_of(order["finalize"]), {"csr": b64(csr)})
    body = await resp.json()
    assert body["type"] == P + "badCSR" and "SHA-1" in body["detail"], body


async def test_acme_issues_cn_only_while_scep_keeps_the_subject(lab, tmp_path):  # noqa: F811
    location, order = await _ready_order(lab, "kept.example.test")
    csr = openssl_csr(tmp_path, "-addext", "subjectAltName=DNS:kept.example.test",
                      dn=("C=US", "O=interop-lab", "CN=kept.example.test"), challenge=None)
    resp = await lab.post(path_of(order["finalize"]), {"csr": b64(csr)})
    assert resp.status == 200, await resp.text()
    order = await wait_status(lab, location, until=("processing",))
    cert = x509.load_pem_x509_certificates(await (await lab.post(path_of(order["certificate"]), None)).read())[0]
    assert cert.subject.rfc4514_string() == "CN=kept.example.test"
    # the same subject over SCEP (same services, bytes in, bytes out) is kept
    key = rsa_key(2)
    scep_csr = csr_with_name(key, SUBJECTS["scepclient"], "static-secret")
    signer = (self_signed(key), key)
    msg, _, _ = pkcs_req(lab.services.ca_material.cert, key, scep_csr, signer=signer)
    lab.services.scep.challenges.static_secret = "static-secret"
    reply, _ = await lab.services.scep.pki_operation(msg)
    rep = wire.decode_cert_rep(reply)
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    assert cert_subject_der(reply_certs(rep, *signer)[0]) == SUBJECTS["scepclient"]


def _csr_outcome(csr_der: bytes, digests, strict: bool, monkeypatch) -> tuple:
    import scepd.ca.csr as csr_mod
    with monkeypatch.context() as m:
        if not strict:
            m.setattr(csr_mod, "_load_strict", lambda _d: None)
        try:
            f = decode_csr(csr_der, allowed_digests=digests)
        except Exception as err:  # noqa: BLE001 - the type and text are what is compared
            return type(err).__name__, str(err)
        return (f.spki_der, f.common_name, f.subject_rfc4514, f.sans, f.other_extensions, f.challenge_password,
                f.subject_der)


def test_the_strict_csr_reading_answers_as_the_asn1crypto_one(tmp_path, monkeypatch):
    """decode_csr reads a CSR that pyca parses (not RSA-PSS) without asn1crypto: on the stock
    clients' CSRs, openssl's, pyca's, the fuzz corpus and 400 mutants of them it answers exactly
    what the asn1crypto reading answers (facts, or the same error)."""
    import random

    from .helpers import VECTORS, make_csr
    inputs = [x509.load_pem_x509_csr(p.read_bytes()).public_bytes(serialization.Encoding.DER)
              for p in sorted(VECTORS.glob("*.csr.pem"))]
    inputs += [p.read_bytes() for p in sorted((Path(__file__).parent / "data" / "fuzz" / "csr").glob("*.der"))]
    inputs += [openssl_csr(tmp_path, "-sha1"), openssl_csr(tmp_path, "-md5"),
               openssl_csr(tmp_path, "-sha384", "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32")]
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", str(tmp_path / "csr.key")], check=True, capture_output=True)
    inputs += [openssl_csr(tmp_path, "-sha512", key="existing"),
               make_csr(rsa_key(0), "strict", "pw", sans=[x509.DNSName("a.example")]),
               x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
                   ed25519.Ed25519PrivateKey.generate(), None).public_bytes(serialization.Encoding.DER)]
    import scepd.ca.csr as csr_mod
    assert sum(csr_mod._load_strict(d) is not None for d in inputs) >= 8
    rnd = random.Random(2986)
    mutants = helpers.mutants(rnd, inputs)  # bounded: 400 mutants of 1-3 edits each
    kinds = set()
    for data in inputs + mutants:
        for digests in (STRONG_DIGESTS, LEGACY_SCEP_DIGESTS):
            strict = _csr_outcome(data, digests, True, monkeypatch)
            assert strict == _csr_outcome(data, digests, False, monkeypatch)
            kinds.add(strict[0] if isinstance(strict[0], str) else "facts")
    assert {"facts", "MalformedRequest", "BadMessageCheck", "ForbiddenAlgorithm"} <= kinds, kinds
