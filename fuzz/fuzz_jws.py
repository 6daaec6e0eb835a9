"""Fuzz the ACME JWS and JWK parser (acme/jws.py): parse (outer, and inner as in keyChange),
load_jwk, verify and payload_json, in the order the server calls them.

Input: a request body. Seeds made at start: flattened JWS signed with RSA-2048, P-256, P-384,
P-521 and Ed25519 keys (jwk and kid forms, POST-as-GET, a nested keyChange JWS).
Allowed: ScepdError (jws.py raises MalformedRequest / BadSignatureAlgorithm / BadNonce /
UnverifiableMessage).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's acme wins
sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris  # noqa: E402

import common  # noqa: E402

with atheris.instrument_imports(include=["acme", "scepd", "josepy"]):
    import josepy
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    from acme import jws
    from scepd.errors import ScepdError

NAME = "jws"
ALLOWED = (ScepdError,)


def check(body: bytes) -> None:
    for inner in (False, True):
        try:
            req = jws.parse(body, inner=inner)
            if req.jwk is not None:
                key = jws.load_jwk(req.jwk)
                jws.thumbprint(key) if not isinstance(key, jws.OkpJwk) else key.thumbprint()
                jws.verify(req, key)
            if not req.is_post_as_get:
                assert isinstance(req.payload_json(), dict)
        except ALLOWED + common.TOLERATED:
            pass


def body_of(data: bytes) -> bytes:
    """The request body an input stands for. First byte NUL: the three decoded JWS parts
    (protected header JSON, payload, signature) joined by NUL bytes, base64url-encoded here so
    that mutations reach the header's JSON rather than break its base64. First byte 0x01: a
    header of JSON values of any type drawn from the rest (structure-aware: type confusion).
    Anything else: the body as it is."""
    if data[:1] == b"\0":
        parts = (data[1:].split(b"\0", 2) + [b"", b""])[:3]
    elif data[:1] == b"\1":
        fdp = atheris.FuzzedDataProvider(data[1:])
        header = {k: common.json_value(fdp) for k in ("alg", "nonce", "url", "jwk", "kid") if fdp.ConsumeBool()}
        if fdp.ConsumeBool():
            header["jwk"] = common.json_object(fdp)
        header.update(common.json_object(fdp))
        payload = json.dumps(common.json_object(fdp)).encode() if fdp.ConsumeBool() else b""
        parts = [json.dumps(header).encode(), payload, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 140))]
    else:
        return data
    return json.dumps(dict(zip(("protected", "payload", "signature"), map(jws.b64u_encode, parts)))).encode()


def TestOneInput(data: bytes) -> None:
    check(body_of(data))


def _jwk_of(key) -> dict:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": jws.b64u_encode(raw)}
    if isinstance(key, rsa.RSAPrivateKey):
        return josepy.JWKRSA(key=key.public_key()).to_partial_json()
    return josepy.JWKEC(key=key.public_key()).to_partial_json()


def _sign(key, alg: str, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    hash_cls = jws.ALGORITHMS[alg][1]
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hash_cls())))
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def make_jws(key, alg: str, payload: bytes, *, kid: str | None = None, nonce: str | None = "bm9uY2U",
             url: str = "https://127.0.0.1/acme/new-order") -> bytes:
    header = {"alg": alg, "url": url}
    if nonce is not None:
        header["nonce"] = nonce
    if kid is not None:
        header["kid"] = kid
    else:
        header["jwk"] = _jwk_of(key)
    protected = jws.b64u_encode(json.dumps(header).encode())
    body = jws.b64u_encode(payload)
    sig = _sign(key, alg, f"{protected}.{body}".encode())
    return json.dumps({"protected": protected, "payload": body, "signature": jws.b64u_encode(sig)}).encode()


def seeds() -> list[bytes]:
    keys = [(rsa.generate_private_key(65537, 2048), "RS256"), (ec.generate_private_key(ec.SECP256R1()), "ES256"),
            (ec.generate_private_key(ec.SECP384R1()), "ES384"), (ec.generate_private_key(ec.SECP521R1()), "ES512"),
            (ed25519.Ed25519PrivateKey.generate(), "EdDSA")]
    payload = json.dumps({"identifiers": [{"type": "dns", "value": "a.example"}]}).encode()
    out = []
    for key, alg in keys:
        out.append(make_jws(key, alg, payload))
        out.append(make_jws(key, alg, b"", kid="https://127.0.0.1/acme/acct/abc"))
    inner = make_jws(keys[1][0], "ES256", json.dumps({"account": "https://127.0.0.1/acme/acct/abc",
                                                      "oldKey": _jwk_of(keys[0][0])}).encode(), nonce=None)
    out.append(inner)
    out.append(make_jws(keys[0][0], "RS256", inner, kid="https://127.0.0.1/acme/acct/abc"))
    for body in list(out):  # the same requests as decoded parts
        obj = json.loads(body)
        out.append(b"\0" + b"\0".join(jws.b64u_decode(obj[k]) for k in ("protected", "payload", "signature")))
    out += [b"\1" + bytes(range(i, i + 64)) for i in range(0, 192, 16)]  # structured: any bytes do
    return out


if __name__ == "__main__":
    common.main(NAME, TestOneInput, seeds, dictionary="json.dict")
