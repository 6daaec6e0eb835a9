"""Inputs that crashed a fuzz harness (fuzz/), each now answered with a typed ScepdError.

Inputs are under tests/data/fuzz/<harness>/ (see its README), where tests/test_fuzz_short.py
also replays them through the harnesses. Every case raised something outside the ScepdError
hierarchy before its fix (an HTTP 500)."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from acme import jws
from acme.service import AcmeService, AcmeSettings, Auth
from scepd.ca.csr import decode_csr
from scepd.errors import BadMessageCheck, BadSignatureAlgorithm, MalformedRequest, ScepdError, ValidationFailed
from scepd.scep import der, wire

from .helpers import VECTORS

DATA = Path(__file__).resolve().parent / "data" / "fuzz"


def _recipients() -> list[wire.Recipient]:
    out = []
    for stem in ("ca", "ra"):
        cert = x509.load_pem_x509_certificate((VECTORS / "pki" / f"{stem}.pem").read_bytes())
        key = serialization.load_pem_private_key((VECTORS / "pki" / f"{stem}.key").read_bytes(), None)
        out.append(wire.Recipient(cert, key))
    return out


def _resign(data: bytes) -> bytes:
    """fuzz_scep_envelope's input format: 2-byte length, raw signed attributes, content;
    signed here with a throwaway P-256 key so the decoder gets past the signature."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz signer")])
    t0 = dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(t0).not_valid_after(t0 + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    n = int.from_bytes(data[:2], "big")
    attrs = [wire._attribute(wire.OID_CONTENT_TYPE, der.oid(wire.OID_DATA)), data[2:2 + n]]
    return wire._signed_data(data[2 + n:], attrs, cert, key, "sha256", [cert])


# --- SCEP --------------------------------------------------------------------------------------


def test_signer_certificate_with_an_invalid_version_is_malformed(vectors):
    with pytest.raises(MalformedRequest):
        wire.decode_pki_message((DATA / "scep_message" / "signer-invalid-version.der").read_bytes())


@pytest.mark.parametrize("name", ["bad-recipient-info.bin", "recipient-info-attribute-error.bin"])
def test_envelope_with_an_undecodable_recipient_info_is_refused(vectors, name):
    # refused (never a crash) by whichever stage sees it first: the bounded outer parse, the
    # recipient infos, or the one no-oracle answer once decryption has started
    with pytest.raises(ScepdError):
        msg = wire.decode_pki_message(_resign((DATA / "scep_envelope" / name).read_bytes()))
        wire.open_envelope(msg.envelope, _recipients())


# --- CSR ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unsupported-curve.der", "invalid-version.der", "reencode-attribute-error.der",
                                  "reencode-index-error.der", "subject-bitstring-type.der"])
@pytest.mark.parametrize("verify", [True, False])
def test_undecodable_csr_is_refused(name, verify):
    with pytest.raises((MalformedRequest, BadMessageCheck)):
        decode_csr((DATA / "csr" / name).read_bytes(), verify_signature=verify)


# --- ACME JWS and payloads ----------------------------------------------------------------------


def _body(header: dict | bytes, payload: bytes = b"{}") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return json.dumps({"protected": jws.b64u_encode(raw), "payload": jws.b64u_encode(payload),
                       "signature": ""}).encode()


def test_jws_body_nested_deeper_than_the_stack_is_malformed():
    with pytest.raises(MalformedRequest):
        jws.parse((DATA / "jws" / "deep-nesting.json").read_bytes())


def test_jws_protected_header_nested_deeper_than_the_stack_is_malformed():
    with pytest.raises(MalformedRequest):  # the body is fine, the header inside it is not
        jws.parse(_body(b"[" * 50_000))


def test_jws_payload_nested_deeper_than_the_stack_is_malformed():
    req = jws.parse(_body({"alg": "ES256", "kid": "https://x/acct/1", "nonce": "n", "url": "u"},
                          b"[" * 50_000))
    with pytest.raises(MalformedRequest):
        req.payload_json()


def test_jws_alg_list_from_the_corpus_is_refused():
    with pytest.raises(BadSignatureAlgorithm):
        jws.parse((DATA / "jws" / "alg-not-a-string.json").read_bytes())


@pytest.mark.parametrize("alg", [["ES256"], {"a": 1}])
def test_jws_alg_that_is_not_a_string_is_refused(alg):
    with pytest.raises(BadSignatureAlgorithm):
        jws.parse(_body({"alg": alg, "kid": "https://x/acct/1", "nonce": "n", "url": "u"}))


def test_jwk_with_a_number_for_a_coordinate_is_malformed():
    req = jws.parse((DATA / "jws" / "jwk-member-not-a-string.json").read_bytes())
    with pytest.raises(MalformedRequest):
        jws.load_jwk(req.jwk)


def test_eab_protected_header_nested_deeper_than_the_stack_is_malformed():
    outer = jws.parse(_body({"alg": "ES256", "jwk": {"kty": "EC"}, "nonce": "n", "url": "u"}))
    binding = json.loads((DATA / "acme_payloads" / "eab-deep-nesting.json").read_bytes())["externalAccountBinding"]
    with pytest.raises(MalformedRequest):
        asyncio.run(AcmeService._verify_eab(None, binding, outer))  # refused before any lookup


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_order_time_outside_the_datetime_range_in_utc_is_malformed(value):
    with pytest.raises(MalformedRequest):
        AcmeService._time({"notBefore": value}, "notBefore")



def _invalid_version_certificate() -> bytes:
    payload = json.loads((DATA / "acme_payloads" / "revoke-certificate-invalid-version.json").read_bytes())
    return jws.b64u_decode(payload["certificate"])


async def test_revoke_of_a_certificate_with_an_invalid_version_is_malformed(make_services, clock, monkeypatch):
    # revokeCert's payload as the fuzzer sent it (x509.InvalidVersion is no ValueError), from a
    # key no account holds (authenticated: the request's read unit finds no account)
    services = await make_services()
    service = AcmeService(services, AcmeSettings())
    looked_up = []

    async def get_certificate(serial):
        looked_up.append(serial)
    monkeypatch.setattr(services.store, "get_certificate", get_certificate)
    req = jws.JwsRequest(alg="ES256", nonce="n", url="https://127.0.0.1/acme/revoke-cert", jwk={}, kid=None,
                         payload=(DATA / "acme_payloads" / "revoke-certificate-invalid-version.json").read_bytes(),
                         signing_input=b"", signature=b"", protected={})
    auth = Auth(req, "n", clock.now(), None, thumbprint="no-account-holds-this-key")
    with pytest.raises(MalformedRequest):
        await service.revoke(auth)
    assert looked_up == []  # refused before any lookup


def test_tls_alpn01_certificate_with_an_invalid_version_fails_validation():
    from acme.validators import check_tlsalpn01_certificate
    with pytest.raises(ValidationFailed):
        check_tlsalpn01_certificate(_invalid_version_certificate(), None, "key-authorization")


# --- nested BER (the RecursionError found first by the fuzzer; der.py reads iteratively now) ----


@pytest.mark.parametrize("data", [b"\x30\x80" * 3000, b"\x24\x80" * 3000 + b"\x00\x00" * 3000],
                         ids=["indefinite", "constructed-octet-string"])
def test_deeply_nested_ber_is_a_value_error(data):
    with pytest.raises(ValueError):
        der.read_tlv(data)
    with pytest.raises(ValueError):
        der.string_octets(data)
