"""The lean SCEP path (issue 13): an enrollment reads the store in ONE read unit and writes its
whole issuance (challenge spent, certificate, audit) in ONE write unit; a serial collision voids
that unit whole and draws another serial; the common PKIMessage and its EnvelopedData are read
without asn1crypto, with the same answers; an enrollment is two thread hops."""
from __future__ import annotations

import asyncio
import datetime as dt
import random
from pathlib import Path

import pytest
from cryptography import x509

import scepd.enroll.challenges
import scepd.enroll.enrollment
from scepd.errors import ScepdError
from scepd.http.app import SERVICES
from scepd.render import serial_hex
from scepd.scep import wire

from . import helpers
from .helpers import VECTORS, make_csr, pkcs_req, reply_certs, rsa_key, self_signed

FUZZ_DATA = Path(__file__).resolve().parent / "data" / "fuzz"


@pytest.fixture
def units(client, monkeypatch):
    """Counts of the store's read units, write units and old-style transactions."""
    store = client.server.app[SERVICES].store
    counts = {"read": 0, "write": 0, "transaction": 0}
    for name in counts:
        real = getattr(store, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(store, name, spy)
    return counts


async def enroll(client, key, cn: str, challenge: str | None, signer=None, csr=None):
    ca = client.server.app[SERVICES].ca_material.cert
    signer = signer or (self_signed(key), key)
    der_bytes = pkcs_req(ca, key, csr or make_csr(key, cn, challenge), signer=signer)[0]
    resp = await client.post("/scep?operation=PKIOperation", data=der_bytes)
    assert resp.status == 200, await resp.text()
    rep = wire.decode_cert_rep(await resp.read())
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    return reply_certs(rep, *signer)[0]


async def test_a_one_time_challenge_enrollment_is_one_read_unit_and_one_write_unit(client, units):
    services = client.server.app[SERVICES]
    secret = await services.challenges.create(dt.timedelta(hours=1))
    units.update(read=0, write=0, transaction=0)
    cert = await enroll(client, rsa_key(0), "lean-1", secret)
    assert units == {"read": 1, "write": 1, "transaction": 0}
    serial = serial_hex(cert.serial_number)
    assert (await services.store.get_certificate(serial)).subject == "CN=lean-1"
    issued = [a for a in await services.store.list_audit() if a.event == "certificate.issued"]
    assert [(a.serial, a.details["challenge"]) for a in issued] == [(serial, "one-time")]


async def test_a_renewal_is_one_read_unit_and_one_write_unit(client, units):
    key = rsa_key(0)
    cert = await enroll(client, key, "lean-renew", "static-secret")
    units.update(read=0, write=0, transaction=0)
    new_key = rsa_key(1)
    renewed = await enroll(client, new_key, "lean-renew", None, signer=(cert, key),
                           csr=make_csr(new_key, "lean-renew"))
    assert units == {"read": 1, "write": 1, "transaction": 0}
    assert renewed.serial_number != cert.serial_number


@pytest.fixture
async def hops(monkeypatch):
    """The event loop's hand-offs to threads (asyncio.to_thread through loop.run_in_executor,
    the store's SQLite units through its own store threads, _Lane.run): each costs the loop a
    submit, a wake-up and a callback."""
    from scepd.store import sql
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    real = loop.run_in_executor

    def spy(executor, func, *args):
        calls.append(getattr(func, "__qualname__", repr(func)))
        return real(executor, func, *args)
    monkeypatch.setattr(loop, "run_in_executor", spy)
    real_lane = sql._Lane.run

    def lane_spy(self, func, *args):
        calls.append(f"{self._name}:{getattr(func, '__qualname__', repr(func))}")
        return real_lane(self, func, *args)
    monkeypatch.setattr(sql._Lane, "run", lane_spy)
    return calls


async def test_an_enrollment_is_two_thread_hops(client, units, hops):
    """Decode, verify, rate-limit gate, decrypt, the CSR's checks and the read unit are one hop;
    signing, the reply and the write unit another (the signing thread hands the unit to the
    store's writer itself). Each hop saved is a submit, a wake-up and a callback of the loop."""
    await enroll(client, rsa_key(0), "hops-1", "static-secret")
    units.update(read=0, write=0, transaction=0)
    hops.clear()
    await enroll(client, rsa_key(1), "hops-2", "static-secret")
    assert len(hops) == 2, hops
    assert units == {"read": 1, "write": 1, "transaction": 0}


async def test_a_renewal_is_two_thread_hops(client, hops):
    key = rsa_key(0)
    cert = await enroll(client, key, "hops-renew", "static-secret")
    hops.clear()
    new_key = rsa_key(1)
    await enroll(client, new_key, "hops-renew", None, signer=(cert, key), csr=make_csr(new_key, "hops-renew"))
    assert len(hops) == 2, hops


async def test_a_serial_collision_voids_the_unit_and_draws_another_serial(client, monkeypatch):
    services = client.server.app[SERVICES]
    first = await enroll(client, rsa_key(0), "first", "static-secret")
    secret = await services.challenges.create(dt.timedelta(hours=1))
    fresh = scepd.enroll.enrollment.random_serial()
    draws = iter([first.serial_number, fresh])
    monkeypatch.setattr(scepd.enroll.enrollment, "random_serial", lambda: next(draws))
    second = await enroll(client, rsa_key(1), "second", secret)
    assert second.serial_number == fresh
    # the colliding attempt left nothing: the first certificate is untouched, the challenge was
    # spent by the certificate that was stored, one issuance audited for each
    assert (await services.store.get_certificate(serial_hex(first.serial_number))).subject == "CN=first"
    challenge = await services.store.find_challenge(scepd.enroll.challenges.secret_hash(secret))
    assert challenge.used_by_serial == serial_hex(fresh)
    issued = [a.serial for a in await services.store.list_audit() if a.event == "certificate.issued"]
    assert sorted(issued) == sorted([serial_hex(first.serial_number), serial_hex(fresh)])


def _outcome(data: bytes, fast: bool, monkeypatch) -> tuple:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(wire, "_parse_signed_data_fast", lambda _m: None)
            m.setattr(wire, "_envelope_fast", lambda _c: None)
        try:
            msg = wire.decode_pki_message(data, lambda _key: None)
        except ScepdError as err:
            return type(err).__name__, err.detail
        except wire.SignerKeyRefused:  # pragma: no cover - the check above refuses nothing
            return ("refused",)
        return (msg.message_type, msg.transaction_id, msg.sender_nonce, msg.signer_cert_der, msg.digest,
                msg.signing_time, msg.envelope)


def test_the_fast_pkimessage_parser_answers_as_the_tolerant_one(monkeypatch):
    """The byte-walking parser of the common case reads the stock clients' messages, and on
    every capture, fuzz regression input and mutant of them answers exactly what the asn1crypto
    parser answers (it hands anything unusual to it)."""
    inputs = [p.read_bytes() for p in sorted(VECTORS.glob("*.der"))]
    inputs += [p.read_bytes() for p in sorted(FUZZ_DATA.rglob("*")) if p.is_file()]
    key = rsa_key(0)
    inputs += [pkcs_req(self_signed(key, "CA"), key, make_csr(key, "d", "x"), cipher=cipher)[0]
               for cipher in ("aes-128-cbc", "des-ede3-cbc")]
    fast_read = sum(wire._parse_signed_data_fast(d) is not None for d in inputs)
    assert fast_read >= 20, fast_read  # the captures (all but the BER/odd ones) and ours
    rnd = random.Random(13)
    mutants = helpers.mutants(rnd, inputs)  # bounded: 400 mutants of 1-3 edits each
    for data in inputs + mutants:
        assert _outcome(data, True, monkeypatch) == _outcome(data, False, monkeypatch)


def _envelope_outcome(envelope: wire.Envelope, recipients, fast: bool, monkeypatch) -> tuple:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(wire, "_enveloped_fast", lambda _d: None)
        try:
            return ("ok", wire.open_envelope(envelope, recipients))
        except ScepdError as err:
            return type(err).__name__, err.detail


def test_the_fast_envelopeddata_reader_answers_as_the_tolerant_one(monkeypatch):
    """The byte-walking EnvelopedData reader reads the stock clients' envelopes and ours, and on
    each of them and 400 mutants open_envelope answers exactly what it answers with the
    asn1crypto reader alone (the fast one hands anything unusual to it)."""
    from cryptography.hazmat.primitives import serialization

    pki_dir = VECTORS / "pki"
    load = serialization.load_pem_private_key
    recipients = [wire.Recipient(x509.load_pem_x509_certificate((pki_dir / f"{name}.pem").read_bytes()),
                                 load((pki_dir / f"{name}.key").read_bytes(), None))
                  for name in ("ra", "ca", "old")]
    key = rsa_key(0)
    ours = self_signed(key, "CA")
    recipients.append(wire.Recipient(ours, key))
    envelopes = []
    for data in [p.read_bytes() for p in sorted(VECTORS.glob("*.der"))] + [
            pkcs_req(ours, key, make_csr(key, "e", "x"), cipher=c)[0] for c in ("aes-128-cbc", "des-ede3-cbc")]:
        envelope = wire.decode_pki_message(data).envelope
        if envelope is not None:
            envelopes.append(envelope)
    fast_read = sum(wire._enveloped_fast(e.enveloped_der) is not None for e in envelopes)
    assert fast_read >= 15, fast_read
    rnd = random.Random(8894)
    mutants = []
    for envelope in (rnd.choice(envelopes) for _ in range(400)):  # bounded: 400 mutants, 1-3 edits each
        [data] = helpers.mutants(rnd, [envelope.enveloped_der], 1)
        mutants.append(wire.Envelope(data, envelope.cipher))
    answers = set()
    for envelope in envelopes + mutants:
        fast = _envelope_outcome(envelope, recipients, True, monkeypatch)
        assert fast == _envelope_outcome(envelope, recipients, False, monkeypatch)
        answers.add(fast[0])
    assert {"ok", "MalformedRequest", "NotForUs", "UnreadableEnvelope"} <= answers, answers


def _reader_outcome(read, value: bytes) -> tuple:
    try:
        result = read(value)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as err:
        return ("error", type(err).__name__)
    return ("ok", result, getattr(result, "tzinfo", None))


def _short_mutants(rnd, originals: list[bytes], count: int = 400) -> list[bytes]:
    """helpers.mutants for values of a few octets: 1-3 edits, each a byte replaced, a byte cut
    or a byte added, never leaving nothing to edit."""
    out = []
    for _ in range(count):
        data = bytearray(rnd.choice(originals))
        for _ in range(rnd.randint(1, 3)):
            at = rnd.randrange(len(data) + 1)
            edit = rnd.random()
            if edit < 0.6 and at < len(data):
                data[at] = rnd.choice((rnd.randrange(256), 0x04, 0x13, 0x17, 0x18, 0x24, 0x80, 0x81))
            elif edit < 0.8 and len(data) > 1:
                del data[min(at, len(data) - 1)]
            else:
                data[at:at] = bytes([rnd.randrange(256)])
        out.append(bytes(data))
    return out


def test_the_direct_attribute_readers_answer_as_asn1crypto():
    """decode_pki_message reads messageDigest, messageType, transactionID, senderNonce and
    signingTime without asn1crypto when they are plain DER: on every signed attribute value of
    the captures and ours, and 400 mutants of each kind, each reader answers exactly what
    asn1crypto answers (it hands anything unusual to it)."""
    from asn1crypto import cms, core

    key = rsa_key(0)
    messages = [p.read_bytes() for p in sorted(VECTORS.glob("*.der"))]
    messages += [pkcs_req(self_signed(key, "CA"), key, make_csr(key, "a", "x"),
                          signing_time=dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc))[0],
                 pkcs_req(self_signed(key, "CA"), key, make_csr(key, "b", "x"),
                          signing_time=dt.datetime(2026, 2, 28, 1, 2, 3, tzinfo=dt.timezone.utc))[0]]
    readers = {  # the attributes each reader reads -> (direct reader, asn1crypto's reading)
        (wire.OID_MESSAGE_DIGEST, wire.OID_SENDER_NONCE, wire.OID_RECIPIENT_NONCE):
            (wire._octets, lambda v: core.OctetString.load(v).native),
        (wire.OID_MESSAGE_TYPE, wire.OID_TRANSACTION_ID):
            (wire._printable_value, lambda v: wire._printable(core.PrintableString.load(v))),
        (wire.OID_SIGNING_TIME,): (wire._signing_time, lambda v: cms.Time.load(v).native),
    }
    rnd = random.Random(8894)
    direct_reads = 0
    for oids, (direct, tolerant) in readers.items():
        values = [v for m in messages for oid in oids for v in wire._parse_signed_data(m).attrs.get(oid, [])]
        assert len(values) >= 20, (oids, len(values))
        for value in values + _short_mutants(rnd, values):  # bounded: 400 mutants per reader
            answer = _reader_outcome(direct, value)
            assert answer == _reader_outcome(tolerant, value), value
            direct_reads += answer[0] == "ok" and bool(value) and wire._contents(value, value[0]) is not None
    assert direct_reads >= 60, direct_reads  # the plain DER values were read directly
