"""Fuzz the ACME JSON payload handling of acme/service.py: newAccount (contact,
onlyReturnExisting, externalAccountBinding), account update, newOrder (identifiers, profile,
notBefore/notAfter, replaces), finalize (csr), revokeCert (certificate, reason) and keyChange,
each given the input as the payload of an already authenticated request (an `Auth`).

The service's database units are replaced at their two seams: `_read` (the request's read unit)
hands its `fn` a connection answering from a small table (the account `abc`, a ready order
`order-1` for a.example; nothing else stored), `_write` (the request's write unit) raises
_Reached. The remaining `db` calls (EAB key `kid-1`, key lookups) are stubs too, and the store
knows no certificate. A write or an approval means parsing and checking accepted the payload:
the operation ends as a success. The acme_store read functions and the enrollment Pipeline's
scope checks are the real ones.
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
    from acme import store as acme_store
    from acme.service import AcmeService, AcmeSettings, Auth, problem
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


ORDER = {"id": "order-1", "account_id": "abc", "status": "ready",
         "identifiers": json.dumps([{"type": "dns", "value": "a.example"}]), "profile": None,
         "not_before": None, "not_after": None, "expires": NOW + dt.timedelta(days=1), "created_at": NOW,
         "processing_at": None, "error": None, "cert_serial": None}
AUTHZ = {"id": "authz-1", "order_id": "order-1", "account_id": "abc", "type": "dns", "value": "a.example",
         "wildcard": False, "status": "valid", "expires": NOW + dt.timedelta(days=1)}


class _Reached(Exception):
    """A stub was asked to write or issue: parsing and checking accepted the payload."""


class _Conn:
    """The connection a read unit's `fn` gets: rows by prebuilt statement (acme/store.py)."""
    ROWS = {id(acme_store._ORDER_BY_ID): [ORDER], id(acme_store._AUTHZS_OF_ORDER): [AUTHZ]}

    def execute(self, stmt, params=None):
        return _Result(types.SimpleNamespace(_mapping=dict(r)) for r in self.ROWS.get(id(stmt), []))


class _Result(list):
    def first(self):
        return self[0] if self else None

    def all(self):
        return list(self)


async def _read(auth: Auth, fn=None, *, spend: bool = False, then=None, prepare=None):
    """AcmeService._read with the database left out: the account the kid names (its key is the
    request's, as the real unit verifies), or none for a jwk no account holds. `spend` (the
    nonce spent in the same unit) is taken as done; `then` (the request's own writes in that
    unit, where the real one may run them) is left to the service's other path, as on
    PostgreSQL. `prepare` (the request's CPU work, before the unit) runs first, as in the real one."""
    if prepare is not None:
        prepare()
    account = dict(ACCOUNT) if auth.kid_account == "abc" else None
    data = None if fn is None else fn(_Conn())
    if account is not None:
        auth.key, auth.thumbprint = ACCOUNT_JWK, account["thumbprint"]
    auth.account = account
    if spend:
        auth.spent = True
    auth.then_result = None
    return account, data


async def _write(auth: Auth, fn=None):
    raise _Reached


class _Writes:
    """The service's write batcher: a write unit ends the request (as `_write`)."""

    async def write(self, fn):
        raise _Reached


class _Db:
    async def account_by_thumbprint(self, tp):
        return None

    async def get_eab(self, kid):
        if kid != "kid-1":
            return None
        return {"kid": kid, "hmac_key": jws.b64u_encode(EAB_KEY), "used_at": None,
                "expires_at": NOW + dt.timedelta(days=1)}

    async def insert(self, *args, **kw):
        raise _Reached

    async def update(self, *args, **kw):
        raise _Reached

    async def get(self, table, key):
        return dict(ACCOUNT)

    async def find(self, *args, **kw):
        return []


class _Enrollment:
    key_limits = policy.KeyLimits()

    def check_window(self, window, profile):
        policy.check_window(window, NOW, profile.validity, CA.not_valid_after_utc)

    def approve(self, *args, **kw):
        raise _Reached


class _Store:
    dialect = "sqlite"

    async def get_certificate(self, serial):
        raise StoreNotFound(serial)

    async def find_transaction(self, transaction_id):
        return [], []


SERVICE = AcmeService.__new__(AcmeService)
SERVICE.services = types.SimpleNamespace(clock=FixedClock(NOW), enrollment=_Enrollment(), store=_Store(),
                                         ca_material=types.SimpleNamespace(cert=CA), pipeline=None)
SERVICE.clock = FixedClock(NOW)
SERVICE.db = _Db()
SERVICE.settings = AcmeSettings()
SERVICE._tasks, SERVICE._finalizing, SERVICE._keys = set(), set(), {}
SERVICE._read, SERVICE._write, SERVICE._writes = _read, _write, _Writes()
LOOP = asyncio.new_event_loop()


def _auth(payload: bytes, kid: bool) -> Auth:
    """An authenticated request with this payload: by the account's kid, or by a jwk (precheck's
    work done: key and thumbprint set) that no account holds."""
    req = jws.JwsRequest(alg="ES256", nonce="n", url=URL, jwk=None if kid else ACCOUNT_JWK.to_partial_json(),
                         kid="https://127.0.0.1/acme/acct/abc" if kid else None,
                         payload=payload, signing_input=b"", signature=b"", protected={})
    auth = Auth(req, "n", NOW + dt.timedelta(hours=1), None)
    if kid:
        auth.kid_account = "abc"
    else:
        auth.key, auth.thumbprint = ACCOUNT_JWK, ACCOUNT["thumbprint"]
    return auth


def operations(payload: bytes):
    yield SERVICE.new_account(_auth(payload, kid=False), None)
    yield SERVICE.update_account(_auth(payload, kid=True), "abc")
    yield SERVICE.new_order(_auth(payload, kid=True))
    yield SERVICE.finalize(_auth(payload, kid=True), "order-1")
    yield SERVICE.revoke(_auth(payload, kid=True))
    yield SERVICE.revoke(_auth(payload, kid=False))  # signed with the certificate's key
    yield SERVICE.key_change(_auth(payload, kid=True), URL)


def check(data: bytes) -> None:
    for op in operations(data):
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
