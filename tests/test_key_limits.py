"""Key limits (scepd.ca.policy.check_key, `[policy] max_rsa_bits`): one rule for CSR keys, SCEP
signer certificate keys and ACME account keys (see test_acme_keys.py). A SCEP signer key outside
the limits gets a signed FAILURE badAlg without its signature being verified."""
from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from scepd import config as config_mod
from scepd.http.app import SERVICES, create_app
from scepd.errors import BadPublicKey, FailInfo, mapping_for
from scepd.ca.policy import KeyLimits, check_key
from scepd.scep import wire

from .helpers import make_csr, pkcs_req, rsa_key, self_signed
from .odd_keys import fake_rsa_public_key, huge_exponent, rsa_with_exponent


@pytest.mark.parametrize("key,ok", [
    (fake_rsa_public_key(2048), True),
    (fake_rsa_public_key(4096), True),
    (fake_rsa_public_key(2047), False),
    (fake_rsa_public_key(4097), False),
    (fake_rsa_public_key(8192), False),
    (fake_rsa_public_key(2048, e=5), True),
    (fake_rsa_public_key(2048, e=2 ** 32 - 1), True),
    (fake_rsa_public_key(2048, e=3), False),
    (fake_rsa_public_key(2048, e=2 ** 32 + 1), False),
    (fake_rsa_public_key(2048, e=huge_exponent(2000)), False),
    (ec.generate_private_key(ec.SECP521R1()).public_key(), True),
    (ec.generate_private_key(ec.SECP256K1()).public_key(), False),
    (ed25519.Ed25519PrivateKey.generate().public_key(), False),  # CSRs and SCEP: RSA or EC only
], ids=["rsa2048", "rsa4096", "rsa2047", "rsa4097", "rsa8192", "e5", "e2^32-1", "e3", "e2^32+1", "e2000bit",
        "p521", "secp256k1", "ed25519"])
def test_check_key_default_limits(key, ok):
    if ok:
        check_key(key)
    else:
        with pytest.raises(BadPublicKey):
            check_key(key)


def test_check_key_configured_limits_and_ed25519_for_jws():
    check_key(fake_rsa_public_key(8192), KeyLimits(max_rsa_bits=8192))
    with pytest.raises(BadPublicKey):
        check_key(fake_rsa_public_key(8193), KeyLimits(max_rsa_bits=8192))
    check_key(ed25519.Ed25519PrivateKey.generate().public_key(), allow_ed25519=True)
    assert mapping_for(BadPublicKey).fail_info == FailInfo.BAD_ALG
    assert mapping_for(BadPublicKey).acme_type == "urn:ietf:params:acme:error:badPublicKey"


def test_max_rsa_bits_config_file_env_and_bounds(tmp_path):
    assert config_mod.load(tmp_path, environ={}).policy.max_rsa_bits == 4096
    (tmp_path / config_mod.CONFIG_NAME).write_text("[policy]\nmax_rsa_bits = 6144\n")
    assert config_mod.load(tmp_path, environ={}).policy.max_rsa_bits == 6144
    assert config_mod.load(tmp_path, environ={"SCEPD_POLICY_MAX_RSA_BITS": "8192"}).policy.max_rsa_bits == 8192
    for bad in ("1024", "16384"):
        with pytest.raises(config_mod.ConfigError):
            config_mod.load(tmp_path, environ={"SCEPD_POLICY_MAX_RSA_BITS": bad})
    assert "[policy]\nmax_rsa_bits = 4096" in "\n".join(
        line for line in config_mod.render_default().splitlines() if not line.startswith("#"))


# --- SCEP ------------------------------------------------------------------------------------


def cert_for(public_key, signing_key, cn: str = "odd signer") -> x509.Certificate:
    """A certificate for `public_key` signed by `signing_key` (the key needn't be usable)."""
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=1)).sign(signing_key, hashes.SHA256()))


async def post_scep(client, der: bytes) -> wire.DecodedCertRep:
    resp = await client.post("/scep?operation=PKIOperation", data=der)
    assert resp.status == 200, await resp.text()
    return wire.decode_cert_rep(await resp.read())


@pytest.fixture
def verifications(monkeypatch):
    seen = []
    real = wire._verify_signature

    def spy(cert, *args):
        seen.append(cert)  # the client's check of the reply's signature counts too
        return real(cert, *args)
    monkeypatch.setattr(wire, "_verify_signature", spy)
    return seen


@pytest.mark.parametrize("bits", [8192, 16384])
async def test_oversized_signer_key_is_badalg_without_verification(client, verifications, bits):
    """The signer certificate claims a huge modulus (no real key: the message is signed by
    another one, so a verification could only fail): refused first, with a signed FAILURE."""
    key = rsa_key(0)
    signer = cert_for(fake_rsa_public_key(bits), key)
    der, txid, nonce = pkcs_req(client.server.app[SERVICES].ca_material.cert, key,
                                make_csr(key, "big-signer", "static-secret"), signer=(signer, key))
    rep = await post_scep(client, der)
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_ALG
    assert rep.transaction_id == txid and rep.recipient_nonce == nonce
    assert f"{bits} bits" in rep.fail_info_text
    assert rep.signer_cert == client.server.app[SERVICES].ca_material.cert
    assert signer not in verifications


async def test_signer_key_with_huge_exponent_is_badalg_without_verification(client, verifications):
    """A real key, a valid signature: still refused, before the (slow) verification."""
    key = rsa_with_exponent(huge_exponent(2000))
    signer = self_signed(key)
    rep = await post_scep(client, pkcs_req(client.server.app[SERVICES].ca_material.cert, key,
                                           make_csr(rsa_key(1), "huge-e", "static-secret"),
                                           signer=(signer, key))[0])
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_ALG
    assert signer not in verifications
    assert await client.server.app[SERVICES].store.list_certificates() == []


@pytest.mark.parametrize("csr_key", [rsa_with_exponent(2 ** 32 + 1), rsa_key(0, 8192)], ids=["e2^32+1", "rsa8192"])
async def test_csr_key_outside_limits_is_badalg(client, csr_key):
    signer_key = rsa_key(1)
    rep = await post_scep(client, pkcs_req(client.server.app[SERVICES].ca_material.cert, signer_key,
                                           make_csr(csr_key, "odd-csr", "static-secret"),
                                           signer=(self_signed(signer_key), signer_key))[0])
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_ALG
    assert await client.server.app[SERVICES].store.list_certificates() == []


async def test_csr_key_8192_with_max_rsa_bits_and_p521_are_issued(aiohttp_client, make_services):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_POLICY_MAX_RSA_BITS": "8192"})
    client = await aiohttp_client(create_app(services))
    signer_key = rsa_key(1)
    for csr_key in (rsa_key(0, 8192), ec.generate_private_key(ec.SECP521R1())):
        rep = await post_scep(client, pkcs_req(services.ca_material.cert, signer_key,
                                               make_csr(csr_key, "big-ok", "static-secret"),
                                               signer=(self_signed(signer_key), signer_key))[0])
        assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
