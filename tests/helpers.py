"""Test-side SCEP client pieces: CSRs, throwaway signer certificates, requests, reply decoding."""
from __future__ import annotations

import datetime as dt
import functools
import os
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from scepd.scep import wire

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO.parent / "shared" / "vectors" / "scep"


@functools.lru_cache(maxsize=None)
def rsa_key(index: int = 0, bits: int = 2048) -> rsa.RSAPrivateKey:
    """Keys are expensive; tests share a few, by index."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def make_csr(key, cn: str | None = "device-1", challenge: str | None = None,
             sans: list[x509.GeneralName] | None = None, hash_alg=None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if challenge is not None:
        builder = builder.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    return builder.sign(key, hash_alg or hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def self_signed(key, cn: str = "SCEP SIGNER", not_after: dt.datetime | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(not_after or now + dt.timedelta(hours=1)).sign(key, hashes.SHA256()))


def pkcs_req(ca_cert: x509.Certificate, key, csr_der: bytes, *, transaction_id: str | None = None,
             cipher: str = "aes-128-cbc", digest: str = "sha256", message_type: int = 19,
             signer: tuple[x509.Certificate, object] | None = None, nonce: bytes | None = None,
             signing_time: dt.datetime | None = None) -> tuple[bytes, str, bytes]:
    """(message DER, transactionID, senderNonce)."""
    transaction_id = transaction_id or os.urandom(16).hex().upper()
    nonce = nonce or os.urandom(16)
    signer_cert, signer_key = signer or (self_signed(key), key)
    der = wire.encode_pki_message(message_type=message_type, transaction_id=transaction_id,
                                  sender_nonce=nonce, message_data=csr_der, recipient=ca_cert,
                                  cipher=cipher, signer_cert=signer_cert, signer_key=signer_key,
                                  digest=digest, signing_time=signing_time)
    return der, transaction_id, nonce


def reply_certs(reply: wire.DecodedCertRep, signer_cert: x509.Certificate, signer_key) -> list[x509.Certificate]:
    """Decrypt a SUCCESS CertRep's envelope and return its certificates."""
    assert reply.envelope is not None
    inner = wire.open_envelope(reply.envelope, [wire.Recipient(signer_cert, signer_key)])
    return wire.certs_from_certs_only(inner)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, capture_output=True, text=kw.pop("text", True), **kw)


def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def mutants(rnd, originals: list[bytes], count: int = 400) -> list[bytes]:
    """`count` copies of randomly chosen originals with 1-3 edits each (a byte replaced, or up to
    8 bytes cut): the differential tests' inputs. Bounded; reproducible from `rnd`'s seed."""
    out = []
    for _ in range(count):
        data = bytearray(rnd.choice(originals))
        for _ in range(rnd.randint(1, 3)):
            at = rnd.randrange(len(data))
            if rnd.random() < 0.7:
                data[at] = rnd.randrange(256)
            else:
                del data[at:at + rnd.randint(1, 8)]
        out.append(bytes(data))
    return out


def statements_through_sqlalchemy(monkeypatch) -> list[str]:
    """The first word of every statement run through SQLAlchemy's Connection.execute from now
    on (the store's driver paths skip it), in order; the list grows as they run."""
    import sqlalchemy as sa
    executed: list[str] = []
    real = sa.engine.Connection.execute

    def spy(self, statement, *args, **kwargs):
        executed.append(str(statement).split()[0])
        return real(self, statement, *args, **kwargs)
    monkeypatch.setattr(sa.engine.Connection, "execute", spy)
    return executed
