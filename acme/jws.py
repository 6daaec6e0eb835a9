"""ACME JWS (RFC 8555 §6.2): a strict pre-parse, then josepy for the JWK and cryptography for
the signature. Wire only: bytes in, a frozen JwsRequest out, typed errors otherwise.

Rules enforced: flattened JSON serialization only ({protected, payload, signature}, nothing
else, no unprotected header); alg in the allowlist (RS256, ES256, ES384, ES512, and EdDSA with
Ed25519 keys per RFC 8037; never none or HMAC); exactly one of jwk and kid; nonce and url present.
josepy reads RSA and EC JWKs; it has no OKP type, so Ed25519 JWKs are read here (OkpJwk).
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import josepy
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from scepd.errors import BadSignatureAlgorithm, MalformedRequest, UnverifiableMessage

ALGORITHMS = {
    "RS256": ("rsa", hashes.SHA256, None),
    "ES256": ("ec", hashes.SHA256, ec.SECP256R1),
    "ES384": ("ec", hashes.SHA384, ec.SECP384R1),
    "ES512": ("ec", hashes.SHA512, ec.SECP521R1),
    "EdDSA": ("okp", None, None),
}


class OkpJwk:
    """An Ed25519 public JWK (RFC 8037), with the two things the server needs of a JWK: the
    key and its RFC 7638 thumbprint (members crv, kty, x)."""

    def __init__(self, jwk: dict):
        if set(jwk) - {"kty", "crv", "x", "kid", "use", "alg", "key_ops"} or jwk.get("crv") != "Ed25519" \
                or "d" in jwk or not isinstance(jwk.get("x"), str):
            raise MalformedRequest("only public Ed25519 OKP keys are accepted")
        raw = b64u_decode(jwk["x"])
        if len(raw) != 32:
            raise MalformedRequest("an Ed25519 key is 32 bytes")
        self.key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        self._members = {"crv": "Ed25519", "kty": "OKP", "x": jwk["x"]}

    def thumbprint(self, hash_function=hashes.SHA256) -> bytes:
        digest = hashes.Hash(hash_function())
        digest.update(json.dumps(self._members, sort_keys=True, separators=(",", ":")).encode())
        return digest.finalize()


def b64u_decode(text: str) -> bytes:
    if not isinstance(text, str) or "=" in text or any(c in text for c in "+/ \n"):
        raise MalformedRequest("base64url fields must be unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise MalformedRequest("invalid base64url") from None


def b64u_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class JwsRequest:
    alg: str
    nonce: str
    url: str
    jwk: dict | None
    kid: str | None
    payload: bytes  # b"" for POST-as-GET
    signing_input: bytes
    signature: bytes
    protected: dict

    @property
    def is_post_as_get(self) -> bool:
        return self.payload == b""

    def payload_json(self) -> dict:
        if self.is_post_as_get:
            raise MalformedRequest("this resource needs a JSON payload")
        try:
            value = json.loads(self.payload)
        except (ValueError, RecursionError):  # deep nesting too
            raise MalformedRequest("the payload is not JSON") from None
        if not isinstance(value, dict):
            raise MalformedRequest("the payload must be a JSON object")
        return value


def parse(body: bytes, inner: bool = False) -> JwsRequest:
    """`inner`: the nested JWS of a keyChange (RFC 8555 §7.3.5): jwk required, no nonce allowed."""
    try:
        outer = json.loads(body)
    except (ValueError, RecursionError):  # deep nesting too
        raise MalformedRequest("the request body is not JSON") from None
    if not isinstance(outer, dict) or set(outer) != {"protected", "payload", "signature"}:
        raise MalformedRequest("only the flattened JWS serialization with a protected header is accepted")
    protected_b64, payload_b64, sig_b64 = outer["protected"], outer["payload"], outer["signature"]
    if not all(isinstance(x, str) for x in (protected_b64, payload_b64, sig_b64)):
        raise MalformedRequest("JWS members must be strings")
    try:
        protected = json.loads(b64u_decode(protected_b64))
    except (ValueError, RecursionError):  # deep nesting too
        raise MalformedRequest("the protected header is not JSON") from None
    if not isinstance(protected, dict):
        raise MalformedRequest("the protected header must be a JSON object")
    alg = protected.get("alg")
    if not isinstance(alg, str) or alg not in ALGORITHMS:  # a list or object is unhashable
        raise BadSignatureAlgorithm(f"algorithm {str(alg)[:20]!r} is not accepted; use RS256, ES256 or EdDSA")
    jwk, kid = protected.get("jwk"), protected.get("kid")
    if (jwk is None) == (kid is None):
        raise MalformedRequest("the protected header needs exactly one of jwk and kid")
    if jwk is not None and not isinstance(jwk, dict):
        raise MalformedRequest("jwk must be a JSON object")
    if kid is not None and not isinstance(kid, str):
        raise MalformedRequest("kid must be a string")
    nonce, url = protected.get("nonce"), protected.get("url")
    if not isinstance(url, str):
        raise MalformedRequest("the protected header has no url")
    if inner:
        if nonce is not None or jwk is None:
            raise MalformedRequest("the inner keyChange JWS needs a jwk and no nonce")
        nonce = ""
    elif not isinstance(nonce, str) or not nonce:
        from scepd.errors import BadNonce
        raise BadNonce("the protected header has no nonce")
    return JwsRequest(alg=alg, nonce=nonce, url=url, jwk=jwk, kid=kid, payload=b64u_decode(payload_b64),
                      signing_input=f"{protected_b64}.{payload_b64}".encode(),
                      signature=b64u_decode(sig_b64), protected=protected)


def load_jwk(jwk: dict) -> josepy.JWK | OkpJwk:
    if isinstance(jwk, dict) and jwk.get("kty") == "OKP":
        return OkpJwk(jwk)
    try:
        key = josepy.JWK.from_json(jwk)
    except (josepy.errors.DeserializationError, ValueError, TypeError, KeyError, AttributeError):
        raise MalformedRequest("the jwk cannot be read") from None  # AttributeError: a number for x
    if isinstance(key, josepy.JWKOct):
        raise BadSignatureAlgorithm("symmetric keys cannot sign ACME requests")
    return key


def public_key_of(jwk: josepy.JWK):
    key = jwk.key
    return getattr(key, "_wrapped", key)


def thumbprint(jwk: josepy.JWK) -> str:
    return b64u_encode(jwk.thumbprint(hash_function=hashes.SHA256))


def verify(req: JwsRequest, jwk: josepy.JWK) -> None:
    kind, hash_cls, curve = ALGORITHMS[req.alg]
    key = public_key_of(jwk)
    try:
        if kind == "rsa" and isinstance(key, rsa.RSAPublicKey):  # size: scepd.ca.policy.check_key
            key.verify(req.signature, req.signing_input, padding.PKCS1v15(), hash_cls())
        elif kind == "okp" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(req.signature, req.signing_input)
        elif kind == "ec" and isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, curve):
            size = (key.curve.key_size + 7) // 8
            if len(req.signature) != 2 * size:
                raise UnverifiableMessage("the ECDSA signature has the wrong length")
            r = int.from_bytes(req.signature[:size], "big")
            s = int.from_bytes(req.signature[size:], "big")
            key.verify(encode_dss_signature(r, s), req.signing_input, ec.ECDSA(hash_cls()))
        else:
            raise BadSignatureAlgorithm("the key does not match the algorithm")
    except InvalidSignature:
        raise UnverifiableMessage("the JWS signature does not verify") from None
