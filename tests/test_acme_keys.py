"""ACME account keys within scepd.ca.policy's key limits: RSA 2048..max_rsa_bits with an odd
exponent 3 < e < 2^32, EC P-256/P-384/P-521, Ed25519. Anything else is badPublicKey, refused
before the signature is verified (a huge exponent makes each verification ~100x dearer)."""
from __future__ import annotations

import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from acme import jws
from scepd.http.app import create_https_app

from .helpers import make_csr, rsa_key
from .odd_keys import huge_exponent, rsa_with_exponent
from .test_acme_ari import path_of, responder  # noqa: F401  (fixture)
from .test_acme_jws import P, b64, problem_type
from .test_acme_orders import dns_server, get, lab, new_order, wait_status  # noqa: F401  (fixtures)


def _int(value: int, size: int | None = None) -> str:
    return b64(value.to_bytes(size or (value.bit_length() + 7) // 8, "big"))


def jwk_and_alg(public_key) -> tuple[dict, str]:
    if isinstance(public_key, rsa.RSAPublicKey):
        n = public_key.public_numbers()
        return {"kty": "RSA", "n": _int(n.n), "e": _int(n.e)}, "RS256"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        size = (public_key.curve.key_size + 7) // 8
        crv, alg = {"secp256r1": ("P-256", "ES256"), "secp384r1": ("P-384", "ES384"),
                    "secp521r1": ("P-521", "ES512")}[public_key.curve.name]
        nums = public_key.public_numbers()
        return {"kty": "EC", "crv": crv, "x": _int(nums.x, size), "y": _int(nums.y, size)}, alg
    raw = public_key.public_bytes_raw()
    return {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}, "EdDSA"


def signature(key, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        digest = {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}[key.curve.key_size]
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(digest())))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return key.sign(data)


async def post(client, path: str, payload, key, kid: str | None = None):
    """A JWS signed by `key` (any type): with its jwk, or with `kid`."""
    nonce = (await client.head("/acme/new-nonce")).headers["Replay-Nonce"]
    jwk, alg = jwk_and_alg(key.public_key())
    protected = {"alg": alg, "nonce": nonce, "url": str(client.make_url(path))}
    protected.update({"kid": kid} if kid else {"jwk": jwk})
    p64, pl64 = b64(json.dumps(protected).encode()), "" if payload is None else b64(json.dumps(payload).encode())
    body = {"protected": p64, "payload": pl64, "signature": b64(signature(key, f"{p64}.{pl64}".encode()))}
    resp = await client.post(path, data=json.dumps(body), headers={"Content-Type": "application/jose+json"})
    assert resp.status != 500 and "Replay-Nonce" in resp.headers
    return resp


@pytest.fixture
async def https(aiohttp_client, make_services):
    async def _client(env: dict | None = None):
        return await aiohttp_client(create_https_app(await make_services(env or {})))
    return _client


@pytest.fixture
def verifications(monkeypatch):
    """Every JWS signature verification the server attempts."""
    seen = []
    real = jws.verify

    def spy(req, key):
        seen.append(req.alg)
        return real(req, key)
    monkeypatch.setattr(jws, "verify", spy)
    return seen


@pytest.mark.parametrize("exponent", [huge_exponent(2000), 2 ** 32 + 1, 3], ids=["2000-bit", "2^32+1", "3"])
async def test_rsa_exponent_outside_limits_is_bad_public_key_unverified(https, verifications, exponent):
    client = await https()
    resp = await post(client, "/acme/new-account", {"termsOfServiceAgreed": True}, rsa_with_exponent(exponent))
    assert resp.status == 400 and await problem_type(resp) == P + "badPublicKey"
    assert verifications == []  # refused before any signature work


async def test_rsa_1024_is_bad_public_key(https):
    client = await https()
    resp = await post(client, "/acme/new-account", {"termsOfServiceAgreed": True}, rsa_key(0, 1024))
    assert resp.status == 400 and await problem_type(resp) == P + "badPublicKey"


async def test_rsa_8192_needs_max_rsa_bits(https, verifications):
    big = rsa_key(0, 8192)  # generated once per session (slow)
    refused = await post(await https(), "/acme/new-account", {"termsOfServiceAgreed": True}, big)
    assert refused.status == 400 and await problem_type(refused) == P + "badPublicKey"
    assert verifications == []
    client = await https({"SCEPD_POLICY_MAX_RSA_BITS": "8192"})
    resp = await post(client, "/acme/new-account", {"termsOfServiceAgreed": True}, big)
    assert resp.status == 201, await resp.text()
    resp = await post(client, "/acme/new-order", {"identifiers": [{"type": "dns", "value": "big.example.test"}]},
                      big, kid=resp.headers["Location"])
    assert resp.status == 201, await resp.text()


@pytest.mark.parametrize("key", [ec.generate_private_key(ec.SECP521R1()), ed25519.Ed25519PrivateKey.generate(),
                                 rsa_with_exponent(65537 * 3 + 2)],
                         ids=["P-521", "Ed25519", "RSA-odd-e"])
async def test_accepted_account_keys_register_and_order(https, key):
    client = await https()
    resp = await post(client, "/acme/new-account", {"termsOfServiceAgreed": True}, key)
    assert resp.status == 201, await resp.text()
    resp = await post(client, "/acme/new-order", {"identifiers": [{"type": "dns", "value": "k.example.test"}]},
                      key, kid=resp.headers["Location"])
    assert resp.status == 201, await resp.text()


async def test_key_change_to_a_refused_key_is_bad_public_key(https):
    client = await https()
    old = rsa_key(0)
    resp = await post(client, "/acme/new-account", {"termsOfServiceAgreed": True}, old)
    kid = resp.headers["Location"]
    new = rsa_with_exponent(huge_exponent(2000))
    url = str(client.make_url("/acme/key-change"))
    jwk, alg = jwk_and_alg(new.public_key())
    p64 = b64(json.dumps({"alg": alg, "jwk": jwk, "url": url}).encode())
    pl64 = b64(json.dumps({"account": kid, "oldKey": jwk_and_alg(old.public_key())[0]}).encode())
    inner = {"protected": p64, "payload": pl64, "signature": b64(signature(new, f"{p64}.{pl64}".encode()))}
    resp = await post(client, "/acme/key-change", inner, old, kid=kid)
    assert resp.status == 400 and await problem_type(resp) == P + "badPublicKey"


async def test_finalize_csr_key_over_the_limit_is_bad_csr(lab):
    resp, order = await new_order(lab, [{"type": "dns", "value": "csr.example.test"}])
    a = await get(lab, order["authorizations"][0])
    ch = next(c for c in a["challenges"] if c["type"] == "http-01")
    from .test_acme_orders import key_authorization
    lab.tokens[ch["token"]] = key_authorization(lab, ch)
    await lab.post(path_of(ch["url"]), {})
    order = await wait_status(lab, resp.headers["Location"])
    assert order["status"] == "ready", order
    csr = make_csr(rsa_key(0, 8192), None, sans=[x509.DNSName("csr.example.test")])
    resp = await lab.post(path_of(order["finalize"]), {"csr": b64(csr)})
    assert resp.status == 400 and await problem_type(resp) == P + "badCSR"
    assert "8192" in (await resp.json())["detail"]
