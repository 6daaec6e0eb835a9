"""No decryption oracle on PKIOperation (issue 11 item 1).

SCEP runs over plain HTTP. Whoever captured a request can wrap its encrypted key and ciphertext
(possibly altered) in a message of their own, signed by their own self-signed certificate. If the
reply told "bad padding" from "good padding, bad content", the captured plaintext (the challenge
password) would fall byte by byte. So every failure from the moment decryption starts must get
one indistinguishable answer. The forgeries below use a real sscep capture's encrypted key."""
from __future__ import annotations

import logging
import os
import subprocess

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from scepd.errors import FailInfo, UnreadableEnvelope
from scepd.scep import der, wire

from .helpers import VECTORS, rsa_key, self_signed
from .test_mutations import vector_client  # noqa: F401  (fixture: the vectors' CA as ours)
from .test_vectors import load_pair

CAPTURE = "sscep-0.10.0-pkcsreq-aes128-sha256-post"


class Capture:
    """What an eavesdropper has (the encrypted key, IV and ciphertext of a real request) and,
    for building the cases only, what the test knows besides (the key and the plaintext)."""

    def __init__(self):
        msg = wire.decode_pki_message((VECTORS / f"{CAPTURE}.der").read_bytes())
        env = cms.EnvelopedData.load(msg.envelope.enveloped_der)
        ktri = env["recipient_infos"][0].chosen
        eci = env["encrypted_content_info"]
        self.ca = load_pair("ca")
        self.encrypted_key = ktri["encrypted_key"].native
        self.iv = eci["content_encryption_algorithm"]["parameters"].native
        self.ciphertext = eci["encrypted_content"].native
        self.cek = self.ca.key.decrypt(self.encrypted_key, padding.PKCS1v15())
        self.plaintext = wire.open_envelope(msg.envelope, [self.ca])  # the CSR

    def padded(self, plaintext: bytes | None = None) -> bytes:
        padder = sym_padding.PKCS7(128).padder()
        return padder.update(self.plaintext if plaintext is None else plaintext) + padder.finalize()

    def cbc(self, plaintext: bytes, pad: bool = True) -> bytes:
        if pad:
            plaintext = self.padded(plaintext)
        enc = Cipher(algorithms.AES(self.cek), modes.CBC(self.iv)).encryptor()
        return enc.update(plaintext) + enc.finalize()


def forged_envelope(ca_cert, encrypted_key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    ktri = der.seq(der.integer(0), der.seq(ca_cert.issuer.public_bytes(), der.integer(ca_cert.serial_number)),
                   der.algorithm(wire.OID_RSA, der.null()), der.octet_string(encrypted_key))
    eci = der.seq(der.oid(wire.OID_DATA), der.algorithm(wire.CIPHERS["aes-128-cbc"][0], der.octet_string(iv)),
                  der.tlv(0x80, ciphertext))
    return der.seq(der.oid(wire.OID_ENVELOPED_DATA), der.explicit(0, der.seq(der.integer(0), der.set_of(ktri), eci)))


def attacker_message(envelope: bytes, message_type: int = 19) -> bytes:
    """The attacker's own PKIMessage (own key, own self-signed certificate) around `envelope`."""
    key = rsa_key(3)
    cert = self_signed(key, "attacker")
    attrs = [wire._attribute(wire.OID_CONTENT_TYPE, der.oid(wire.OID_DATA)),
             wire._attribute(wire.OID_MESSAGE_TYPE, der.printable(str(message_type))),
             wire._attribute(wire.OID_TRANSACTION_ID, der.printable("ORACLE-PROBE")),
             wire._attribute(wire.OID_SENDER_NONCE, der.octet_string(os.urandom(16)))]
    return wire._signed_data(envelope, attrs, cert, key, "sha256", [cert])


def forgeries() -> dict[str, tuple[bytes, bytes, int]]:
    """name -> (encrypted key, ciphertext, messageType), one per stage that can fail."""
    c = Capture()
    bad_sig_csr = bytearray(c.plaintext)
    bad_sig_csr[-1] ^= 0x01
    n = c.ca.cert.public_key().public_numbers().n
    not_rsa = (n - 12345).to_bytes(256, "big")  # < n, but not a PKCS#1 v1.5 block for us
    short_key = c.ca.cert.public_key().encrypt(b"12345", padding.PKCS1v15())
    return {
        "bad CBC padding": (c.encrypted_key, c.cbc(bytes(range(31)) + b"\x00", pad=False), 19),
        "good padding around garbage": (c.encrypted_key, c.cbc(bytes(range(31)) + b"\x01", pad=False), 19),
        "padding good, one garbage byte": (c.encrypted_key, c.cbc(b"\x30"), 19),
        "not a CSR": (c.encrypted_key, c.cbc(der.integer(5)), 19),
        "CSR whose signature fails": (c.encrypted_key, c.cbc(bytes(bad_sig_csr)), 19),
        # the captured ciphertext, then blocks of one's choosing (asn1crypto ignores trailing bytes)
        "blocks appended after the CSR": (c.encrypted_key, c.cbc(c.padded() + b"\xa5" * 16), 19),
        "wrong RSA key transport": (not_rsa, c.ciphertext, 19),
        "RSA key of the wrong length": (short_key, c.ciphertext, 19),
        "the CSR replayed as GetCert": (c.encrypted_key, c.ciphertext, 21),
        "the CSR replayed as CertPoll": (c.encrypted_key, c.ciphertext, 20),
    }


def _signed_attrs(reply: bytes) -> dict[str, bytes]:
    ci = cms.ContentInfo.load(reply)
    return {a["type"].dotted: a["values"].dump() for a in ci["content"]["signer_infos"][0]["signed_attrs"]}


async def test_every_decryption_failure_gets_one_answer(vector_client, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="scepd.scep")
    c = Capture()
    replies = {}
    for name, (encrypted_key, ciphertext, message_type) in forgeries().items():
        body = attacker_message(forged_envelope(c.ca.cert, encrypted_key, c.iv, ciphertext), message_type)
        resp = await vector_client.post("/scep?operation=PKIOperation", data=body)
        replies[name] = (resp.status, resp.headers["Content-Type"], await resp.read())

    shapes = {name: (status, ctype, len(reply)) for name, (status, ctype, reply) in replies.items()}
    assert len(set(shapes.values())) == 1, shapes
    assert next(iter(shapes.values()))[:2] == (200, "application/x-pki-message")
    varying = {wire.OID_SIGNING_TIME, wire.OID_SENDER_NONCE, wire.OID_RECIPIENT_NONCE, wire.OID_MESSAGE_DIGEST}
    fixed = {name: {k: v for k, v in _signed_attrs(reply).items() if k not in varying}
             for name, (_, _, reply) in replies.items()}
    assert all(attrs == fixed["bad CBC padding"] for attrs in fixed.values()), fixed
    for name, (_, _, reply) in replies.items():
        rep = wire.decode_cert_rep(reply)
        assert (rep.status, rep.fail_info, rep.fail_info_text) == (
            wire.PkiStatus.FAILURE, FailInfo.BAD_MESSAGE_CHECK, UnreadableEnvelope.DETAIL), name
        assert rep.transaction_id == "ORACLE-PROBE"

    # someone else's decoder: OpenSSL verifies the signature and sees the same failInfo attributes
    (tmp_path / "rep.der").write_bytes(replies["bad CBC padding"][2])
    printed = subprocess.run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in",
                              tmp_path / "rep.der"], check=True, capture_output=True, text=True).stdout
    assert "2.16.840.1.113733.1.9.4" in printed and "1.3.6.1.5.5.7.24.1" in printed
    subprocess.run(["openssl", "cms", "-verify", "-noverify", "-inform", "DER", "-in", tmp_path / "rep.der",
                    "-out", os.devnull], check=True, capture_output=True)

    # control: the same forging path with nothing altered enrolls, so the failures above come
    # from the alterations, not from the forging
    body = attacker_message(forged_envelope(c.ca.cert, c.encrypted_key, c.iv, c.ciphertext))
    rep = wire.decode_cert_rep(await (await vector_client.post("/scep?operation=PKIOperation", data=body)).read())
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text

    # the server's log keeps the real reasons
    logged = caplog.text
    assert "bad CBC padding" in logged and "the CSR:" in logged and "not exactly one" in logged


def _envelope(c: Capture, encrypted_key: bytes, ciphertext: bytes) -> wire.Envelope:
    ci = cms.ContentInfo.load(forged_envelope(c.ca.cert, encrypted_key, c.iv, ciphertext))
    return wire.Envelope(enveloped_der=ci["content"].untag().dump(), cipher="aes-128-cbc")


def test_key_transport_failure_still_runs_cbc_decryption(monkeypatch):
    """Implicit rejection: no early exit when the RSA step fails; a random key of the right
    length stands in and the CBC decryption runs as for a good key."""
    c = Capture()
    calls = []
    real = wire._cbc_decrypt

    def spy(cipher, key, iv, ciphertext):
        calls.append((key, len(ciphertext)))
        return real(cipher, key, iv, ciphertext)
    monkeypatch.setattr(wire, "_cbc_decrypt", spy)
    short_key = c.ca.cert.public_key().encrypt(b"12345", padding.PKCS1v15())
    for encrypted_key in (b"\x00" * 256, short_key, b"\x01\x02"):
        with pytest.raises(UnreadableEnvelope) as info:
            wire.open_envelope(_envelope(c, encrypted_key, c.ciphertext), [c.ca])
        assert info.value.detail == UnreadableEnvelope.DETAIL and info.value.reason == "key transport failed"
    assert len(calls) == 3
    assert all(len(key) == 16 and key != c.cek and n == len(c.ciphertext) for key, n in calls)
