"""Fuzz the ACME JSON payload handling of acme/service.py: newAccount (contact,
onlyReturnExisting, externalAccountBinding), account update, newOrder (identifiers, profile,
notBefore/notAfter, replaces), finalize (csr), revokeCert (certificate, reason) and keyChange,
each given the input as its (already authenticated) JWS payload.

The service runs against stubs that answer "nothing stored" (and an EAB key `kid-1`, and a
ready order for a.example), so only parsing and checking is exercised; a stub that would
write or issue raises _Reached, which ends the operation as a success.
Allowed: ScepdError, and each one must render as the problem document the server sends.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hmac as std_hmac
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's acme wins
sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris  # noqa: E402

import common  # noqa: E402
from fuzz_jws import make_jws  # noqa: E402

with atheris.instrument_imports(include=["acme", "scepd"]):
    import josepy
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from acme import jws
    from acme.service import AcmeService, AcmeSettings, problem
    from scepd.ca import policy
    from scepd.clock import FixedClock
    from scepd.errors import ScepdError
    from scepd.store import StoreNotFound

NAME = "acme_payloads"
ALLOWED = (ScepdError,)
NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc)
URL = "https://127.0.0.1/acme/new-acct"
CA = x509.load_pem_x509_certificate(common.vector("pki/ca.pem"))
DEVICE_DER = x509.load_pem_x509_certificate(common.vector("pki/old.pem")).public_bytes(serialization.Encoding.DER)
ACCOUNT_KEY = ec.generate_private_key(ec.SECP256R1())
ACCOUNT_JWK = josepy.JWKEC(key=ACCOUNT_KEY.public_key())
EAB_KEY = b"k" * 32
ACCOUNT = {"id": "abc", "status": "valid", "thumbprint": jws.thumbprint(ACCOUNT_JWK),
           "jwk": json.dumps(ACCOUNT_JWK.to_partial_json()), "contact": "[]"}


class _Reached(Exception):
    """A stub was asked to write or issue: parsing and checking accepted the payload."""


class _Db:
    async def account_by_thumbprint(self, tp):
        return None

    async def get_eab(self, kid):
        if kid != "kid-1":
            return None
        return {"kid": kid, "hmac_key": jws.b64u_encode(EAB_KEY), "used_at": None,
                "expires_at": NOW + dt.timedelta(days=1)}

    async def create_account(self, *args):
        raise _Reached

    async def create_account_bound(self, *args):
        raise _Reached

    async def insert(self, *args, **kw):
        raise _Reached

    async def update(self, *args, **kw):
        raise _Reached

    async def get(self, table, key):
        return dict(ACCOUNT)

    async def find(self, *args, **kw):
        return []

    async def create_order(self, *args):
        return False


class _Enrollment:
    key_limits = policy.KeyLimits()

    def check_window(self, window, profile):
        policy.check_window(window, NOW, profile.validity, CA.not_valid_after_utc)

    def approve(self, *args, **kw):
        raise _Reached


class _Store:
    async def get_certificate(self, serial):
        raise StoreNotFound(serial)


SERVICE = AcmeService.__new__(AcmeService)
SERVICE.services = types.SimpleNamespace(clock=FixedClock(NOW), enrollment=_Enrollment(), store=_Store(),
                                         ca_material=types.SimpleNamespace(cert=CA))
SERVICE.clock = FixedClock(NOW)
SERVICE.db = _Db()
SERVICE.settings = AcmeSettings()
SERVICE._tasks, SERVICE._finalizing = set(), set()


async def _ready_order(order_id, account=None):
    return {"id": order_id, "status": "ready", "identifiers": [{"type": "dns", "value": "a.example"}],
            "authzs": [{"wildcard": False}], "profile": None, "not_before": None, "not_after": None}


SERVICE.order = _ready_order
LOOP = asyncio.new_event_loop()


def _request(payload: bytes) -> jws.JwsRequest:
    return jws.JwsRequest(alg="ES256", nonce="n", url=URL, jwk=ACCOUNT_JWK.to_partial_json(), kid=None,
                          payload=payload, signing_input=b"", signature=b"", protected={})


def operations(req: jws.JwsRequest):
    yield SERVICE.new_account(req, ACCOUNT_JWK)
    yield SERVICE.update_account(dict(ACCOUNT), req)
    yield SERVICE.new_order(dict(ACCOUNT), req)
    yield SERVICE.finalize("order-1", dict(ACCOUNT), req, ACCOUNT_JWK)
    yield SERVICE.revoke(req, dict(ACCOUNT), ACCOUNT_JWK)
    yield SERVICE.revoke(req, None, ACCOUNT_JWK)
    yield SERVICE.key_change(dict(ACCOUNT), req, URL)


def check(data: bytes) -> None:
    for op in operations(_request(data)):
        try:
            LOOP.run_until_complete(op)
        except _Reached:
            pass
        except ALLOWED + common.TOLERATED as err:
            if isinstance(err, ScepdError):
                json.dumps(problem(err))


def payload_of(data: bytes) -> bytes:
    """First byte 0x01: a payload object of JSON values of any type drawn from the rest
    (structure-aware: type confusion). Anything else: the payload as it is."""
    if data[:1] != b"\1":
        return data
    fdp = atheris.FuzzedDataProvider(data[1:])
    obj = {k: common.json_value(fdp) for k in ("identifiers", "notBefore", "notAfter", "profile", "contact",
                                               "status", "reason", "certificate", "csr", "replaces",
                                               "externalAccountBinding") if fdp.ConsumeBool()}
    if fdp.ConsumeBool():
        obj["identifiers"] = [common.json_object(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    obj.update(common.json_object(fdp))
    return json.dumps(obj).encode()


def TestOneInput(data: bytes) -> None:
    check(payload_of(data))


def _eab(kid: str = "kid-1") -> dict:
    protected = jws.b64u_encode(json.dumps({"alg": "HS256", "kid": kid, "url": URL}).encode())
    payload = jws.b64u_encode(json.dumps(ACCOUNT_JWK.to_partial_json()).encode())
    mac = std_hmac.new(EAB_KEY, f"{protected}.{payload}".encode(), "sha256").digest()
    return {"protected": protected, "payload": payload, "signature": jws.b64u_encode(mac)}


def _csr_b64(name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
           .sign(key, hashes.SHA256()))
    return jws.b64u_encode(csr.public_bytes(serialization.Encoding.DER))


def seeds() -> list[bytes]:
    ski = CA.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    idents = [{"type": "dns", "value": "a.example"}, {"type": "ip", "value": "192.0.2.1"},
              {"type": "dns", "value": "*.b.example"}]
    payloads = [
        {"termsOfServiceAgreed": True, "contact": ["mailto:a@example.com"]},
        {"termsOfServiceAgreed": True, "externalAccountBinding": _eab()},
        {"onlyReturnExisting": True},
        {"status": "deactivated"},
        {"contact": []},
        {"identifiers": idents, "notBefore": "2026-11-27T12:00:00Z", "notAfter": "2026-11-28T12:00:00+00:00",
         "profile": "server"},
        {"identifiers": idents[:1], "replaces": jws.b64u_encode(ski) + "." + jws.b64u_encode(bytes([1, 2]))},
        {"identifiers": [{"type": "dns", "value": "bad..name"}, {"type": "email", "value": "x"}]},
        {"csr": _csr_b64("a.example")},
        {"certificate": jws.b64u_encode(DEVICE_DER), "reason": 1},
    ]
    out = [json.dumps(p).encode() for p in payloads]
    inner = make_jws(ec.generate_private_key(ec.SECP256R1()), "ES256", json.dumps(
        {"account": "https://127.0.0.1/acme/acct/abc", "oldKey": ACCOUNT_JWK.to_partial_json()}).encode(),
        nonce=None, url=URL)
    out.append(inner)
    out += [b"\1" + bytes(range(i, i + 64)) for i in range(0, 192, 16)]  # structured: any bytes do
    return out


if __name__ == "__main__":
    common.main(NAME, TestOneInput, seeds, dictionary="json.dict")
