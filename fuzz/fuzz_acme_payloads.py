"""Fuzz the ACME JSON payload handling of acme/service.py: newAccount (contact,
onlyReturnExisting, externalAccountBinding), account update, newOrder (identifiers, profile,
notBefore/notAfter, replaces), finalize (csr), revokeCert (certificate, reason) and keyChange,
each given the input as the payload of a signed request.

The service is the real one, built once at start as `scepd serve` builds it (a fresh CA, SQLite
in a temporary directory) and holding an account, a single-use EAB key and a ready order for
a.example. Each input is signed by the account's key (kid) and by a key no account holds (jwk),
and each operation runs as the server runs it: `open` (the nonce), `precheck` (url, jwk
signature), then the handler with its read unit. Only the request's write unit is left out
(`_write` raises _Reached: the database never grows and nothing is issued or revoked); reaching
it means parsing and checking accepted the payload, which ends the operation as a success.
Allowed: ScepdError, and each one must render as the problem document the server sends.
"""
from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import hmac as std_hmac
import json
import shutil
import sys
import tempfile
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
    from acme.service import AcmeService, AcmeSettings, problem
    from scepd import config as config_mod
    from scepd.ca import pki
    from scepd.clock import FixedClock
    from scepd.errors import ScepdError
    from scepd.http.app import open_services

NAME = "acme_payloads"
ALLOWED = (ScepdError,)
NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc)
URL = "https://127.0.0.1/acme/new-acct"
DEVICE_DER = x509.load_pem_x509_certificate(common.vector("pki/old.pem")).public_bytes(serialization.Encoding.DER)
ACCOUNT_KEY = ec.generate_private_key(ec.SECP256R1())  # holds the account
ACCOUNT_JWK = josepy.JWKEC(key=ACCOUNT_KEY.public_key())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())  # holds none: newAccount, revocation by certificate key
OTHER_JWK = josepy.JWKEC(key=OTHER_KEY.public_key())
LOOP = asyncio.new_event_loop()


class _Reached(Exception):
    """The request's write unit was reached: parsing and checking accepted the payload."""


async def _write(auth, fn=None):
    raise _Reached


async def _setup():
    state = Path(tempfile.mkdtemp(prefix="fuzz-acme-"))
    atexit.register(shutil.rmtree, state, ignore_errors=True)
    pki.create(state, FixedClock(NOW - dt.timedelta(days=1)), cn="Fuzz", org="scepd-fuzz", root_bits=2048)
    (state / config_mod.CONFIG_NAME).write_text(config_mod.render_default())
    services = await open_services(config_mod.load(state, environ={}), FixedClock(NOW))
    service = AcmeService(services, AcmeSettings())
    nonce = await service.new_nonce()  # never spent below (no write unit runs), and the clock stands still
    kid, eab_key = await service.create_eab(dt.timedelta(days=1), None, "fuzz")
    auth = await service.open(jws.parse(make_jws(ACCOUNT_KEY, "ES256", b'{"termsOfServiceAgreed": true}',
                                                 nonce=await service.new_nonce(), url=URL)))
    await service.precheck(auth, URL, jwk_required=True)
    account, _ = await service.new_account(auth, None)
    az = dict(id="authz-1", order_id="order-1", account_id=account["id"], type="dns", value="a.example",
              wildcard=False, status="valid", expires=NOW + dt.timedelta(days=1))
    order = dict(id="order-1", account_id=account["id"], status="pending",
                 identifiers=[{"type": "dns", "value": "a.example"}], expires=NOW + dt.timedelta(days=1),
                 created_at=NOW, profile=None, not_before=None, not_after=None)
    await service._writes.write(lambda conn: acme_store.insert_order(conn, order, [az], [], None))
    service._write = _write  # from here on every write unit is refused with _Reached
    return service, nonce, account["id"], kid, jws.b64u_decode(eab_key)


SERVICE, NONCE, ACCOUNT_ID, EAB_KID, EAB_KEY = LOOP.run_until_complete(_setup())
KID = f"https://127.0.0.1/acme/acct/{ACCOUNT_ID}"
CA = SERVICE.services.ca_material.cert


async def _run(body: bytes, handler, **precheck):
    auth = await SERVICE.open(jws.parse(body))
    await SERVICE.precheck(auth, URL, **precheck)
    return await handler(auth)


async def _new_account(auth):
    return await SERVICE.new_account(auth, await SERVICE.account_for_key(auth))


def operations(payload: bytes):
    """Each operation as acme/server.py runs it: the same payload signed by the account (kid)
    and by a key no account holds (jwk)."""
    by_kid = make_jws(ACCOUNT_KEY, "ES256", payload, kid=KID, nonce=NONCE, url=URL)
    by_jwk = make_jws(OTHER_KEY, "ES256", payload, nonce=NONCE, url=URL)
    yield _run(by_jwk, _new_account, jwk_required=True)
    yield _run(by_kid, lambda auth: SERVICE.update_account(auth, ACCOUNT_ID))
    yield _run(by_kid, SERVICE.new_order)
    yield _run(by_kid, lambda auth: SERVICE.finalize(auth, "order-1"))
    yield _run(by_kid, SERVICE.revoke, allow_jwk=True)
    yield _run(by_jwk, SERVICE.revoke, allow_jwk=True)  # signed with the certificate's key
    yield _run(by_kid, lambda auth: SERVICE.key_change(auth, URL))


async def _all(ops) -> list:
    return await asyncio.gather(*ops, return_exceptions=True)


def check(data: bytes) -> None:
    """The operations run concurrently (none writes): their thread hops (store thread,
    signature checks) overlap."""
    for outcome in LOOP.run_until_complete(_all(list(operations(data)))):
        if not isinstance(outcome, BaseException) or isinstance(outcome, _Reached):
            continue
        if not isinstance(outcome, ALLOWED + common.TOLERATED):
            raise outcome
        if isinstance(outcome, ScepdError):
            json.dumps(problem(outcome))


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


def _eab() -> dict:
    protected = jws.b64u_encode(json.dumps({"alg": "HS256", "kid": EAB_KID, "url": URL}).encode())
    payload = jws.b64u_encode(json.dumps(OTHER_JWK.to_partial_json()).encode())
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
        {"account": KID, "oldKey": ACCOUNT_JWK.to_partial_json()}).encode(),
        nonce=None, url=URL)
    out.append(inner)
    out += [b"\1" + bytes(range(i, i + 64)) for i in range(0, 192, 16)]  # structured: any bytes do
    return out


if __name__ == "__main__":
    common.main(NAME, TestOneInput, seeds, dictionary="json.dict")
