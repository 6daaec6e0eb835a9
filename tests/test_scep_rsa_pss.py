"""A PKIMessage whose SignerInfo is signed with RSASSA-PSS (RFC 4056), as strongSwan's
`pki --scep --rsa-padding pss` sends it: verified with the parameters it names, by both
PKIMessage parsers alike; parameters that do not fit are refused as unverifiable."""
from __future__ import annotations

import datetime as dt

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from scepd.errors import UnverifiableMessage
from scepd.http.app import SERVICES
from scepd.scep import wire

from .helpers import make_csr, pkcs_req, reply_certs, rsa_key, self_signed

_HASH = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384}


def pss_signed(message: bytes, key, *, digest="sha256", mgf="sha256", salt=32, signed_with=None,
               params=True) -> bytes:
    """`message` (signed by `key` with PKCS#1 v1.5) re-signed with RSA-PSS; `signed_with`
    (digest, mgf, salt) is what really signs when it differs from what the parameters say."""
    ci = cms.ContentInfo.load(message)
    si = ci["content"]["signer_infos"][0]
    alg = {"algorithm": "rsassa_pss"}
    if params:
        alg["parameters"] = {"hash_algorithm": {"algorithm": digest},
                             "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": mgf}},
                             "salt_length": salt, "trailer_field": "trailer_field_bc"}
    si["signature_algorithm"] = alg
    real_digest, real_mgf, real_salt = signed_with or (digest, mgf, salt)
    signed_attrs = wire._signed_attrs_to_verify(si)  # under a SET tag, as signed
    si["signature"] = key.sign(signed_attrs, padding.PSS(mgf=padding.MGF1(_HASH[real_mgf]()), salt_length=real_salt),
                               _HASH[real_digest]())
    return ci.dump(force=True)


def _decode(data: bytes, fast: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(wire, "_parse_signed_data_fast", lambda _m: None)
        return wire.decode_pki_message(data)


@pytest.fixture(scope="module")
def request_parts():
    key = rsa_key(0)
    ca = self_signed(rsa_key(1), "CA")
    der, tid, nonce = pkcs_req(ca, key, make_csr(key, "pss", "x"))
    return key, der, tid


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "tolerant"])
def test_an_rsa_pss_signed_pkimessage_verifies(request_parts, fast, monkeypatch):
    key, der, tid = request_parts
    data = pss_signed(der, key)
    assert (wire._parse_signed_data_fast(data) is not None) is True  # DER: the fast parser reads it
    msg = _decode(data, fast, monkeypatch)
    assert msg.transaction_id == tid and msg.digest == "sha256"


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "tolerant"])
@pytest.mark.parametrize("case, kwargs, detail", [
    ("a signature made with other parameters", {"signed_with": ("sha256", "sha256", 20)}, "does not verify"),
    ("a PSS digest that is not the SignerInfo's", {"digest": "sha384", "mgf": "sha384"}, "digest"),
    ("no parameters", {"params": False}, "no parameters"),
    ("an MD5 mask", {"mgf": "md5"}, "MD5"),
])
def test_rsa_pss_parameters_that_do_not_fit_are_unverifiable(request_parts, fast, case, kwargs, detail, monkeypatch):
    key, der, _ = request_parts
    data = _with_mgf_md5(der) if kwargs.get("mgf") == "md5" else pss_signed(der, key, **kwargs)
    with pytest.raises(UnverifiableMessage) as err:
        _decode(data, fast, monkeypatch)
    assert detail in err.value.detail, (case, err.value.detail)


def _with_mgf_md5(der: bytes) -> bytes:
    """Parameters naming an MD5 mask (refused before any verification; pyca signs none)."""
    ci = cms.ContentInfo.load(der)
    si = ci["content"]["signer_infos"][0]
    si["signature_algorithm"] = {"algorithm": "rsassa_pss", "parameters": {
        "hash_algorithm": {"algorithm": "sha256"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "md5"}},
        "salt_length": 32, "trailer_field": "trailer_field_bc"}}
    si["signature"] = b"\x00" * 256
    return ci.dump(force=True)


async def test_an_rsa_pss_signed_pkcsreq_enrolls(client):
    services = client.server.app[SERVICES]
    ca = services.ca_material.cert
    key = rsa_key(2)
    secret = await services.challenges.create(dt.timedelta(hours=1))
    signer = (self_signed(key), key)
    der = pkcs_req(ca, key, make_csr(key, "pss-enroll", secret), signer=signer)[0]
    resp = await client.post("/scep?operation=PKIOperation", data=pss_signed(der, key))
    assert resp.status == 200, await resp.text()
    rep = wire.decode_cert_rep(await resp.read())
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    [cert] = reply_certs(rep, *signer)[:1]
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
