"""CA material on disk: create a two-tier PKI, import one, load it.

Layout of DIR/ca/:
  root.pem         the trust anchor (what `scepd ca root` prints)
  root.key         the root's private key, encrypted: move it offline after `scepd init` (or
                   `init --root-key-out FILE` writes it elsewhere and keeps none here)
  ca.pem, ca.key   the online issuing intermediate (RSA for SCEP) and its key
  chain.pem        ca.pem followed by root.pem
A key kept in a PKCS#11 token (an HSM: `init --ca-key-uri`, --ra-key-uri, --root-key-uri,
`ca rollover --next-key-uri`) has no key file: KEY.uri next to where KEY would be (ca.key.uri,
ra.key.uri, root.key.uri, next/ca.key.uri, previous/<id>/ca.key.uri) holds its RFC 7512 URI,
never the PIN (scepd.ca.pkcs11).
Keys are written 0600 (scepd.ca.keyfile), optionally encrypted with a passphrase; the root key
has its own passphrase. Every key under DIR/ca, DIR/tls and DIR/ocsp must stay 0600: loading
refuses the CA when one is readable by group or others.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ..clock import Clock
from .keyfile import write_private_key


class PkiError(Exception):
    """A CA file is missing, unreadable or unsuitable; the message is for the operator."""


@dataclass(frozen=True)
class CaMaterial:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    root: x509.Certificate
    #: Certificates between `cert` and `root`, exclusive (empty for the usual two tiers).
    intermediates: tuple[x509.Certificate, ...] = ()

    @property
    def ca_id(self) -> str:
        return ca_id_of(self.cert)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Issuing CA first, root last (root omitted if the issuing CA is the root)."""
        certs = (self.cert, *self.intermediates)
        return certs if self.cert == self.root else (*certs, self.root)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def ca_id_of(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]


def ca_dir(state_dir: Path) -> Path:
    return state_dir / "ca"


def write_private(path: Path, data: bytes, replace: bool = False) -> None:
    """A private key file, 0600, never written through a symlink (see scepd.ca.keyfile);
    replace=False refuses an existing file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        write_private_key(path, data, replace=replace)
    except FileExistsError:
        raise PkiError(f"{path} already exists; refusing to overwrite a private key") from None
    except OSError as exc:
        raise PkiError(f"cannot write the private key {path}: {exc.strerror or exc}") from None


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key, passphrase: bytes | None) -> bytes:
    enc = (serialization.BestAvailableEncryption(passphrase) if passphrase
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def is_encrypted_key(key_pem: bytes) -> bool:
    """A PEM private key that cannot be read without a passphrase."""
    try:
        serialization.load_pem_private_key(key_pem, None)
    except TypeError:
        return True
    except ValueError:
        return False  # not a key at all: loading it reports that
    return False


def key_opens(key_pem: bytes, passphrase: bytes) -> bool:
    try:
        serialization.load_pem_private_key(key_pem, passphrase)
    except (TypeError, ValueError):
        return False
    return True


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _name(cn: str, org: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _key_uri(key_path: Path) -> str | None:
    """The PKCS#11 URI stored for a token key in place of `key_path`, if there is one."""
    uri_path = key_path.with_name(key_path.name + ".uri")
    return uri_path.read_text().strip() if uri_path.exists() else None


def _token_key(uri: str, cert: x509.Certificate | None = None):
    """The token key a stored URI names, checked against its certificate (TokenError, a PkiError)."""
    from .pkcs11 import open_key
    return open_key(uri, cert.public_key() if cert is not None else None)


def _new_key(uri: str | None, kind: str, bits: int):
    """A new private key: in the token the URI names (unless the object exists), or in memory."""
    if uri is not None:
        from .pkcs11 import generate_key
        return generate_key(uri, kind, bits)
    return rsa.generate_private_key(public_exponent=65537, key_size=bits) if kind == "rsa" \
        else ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key, passphrase: bytes | None) -> None:
    """A key file (0600), or KEY.uri for a token key (no secret in it)."""
    uri = getattr(key, "uri", None)
    if uri is not None:
        write_public(path.with_name(path.name + ".uri"), uri.text.encode() + b"\n")
    else:
        write_private(path, _key_pem(key, passphrase))


def exists(state_dir: Path) -> bool:
    return (ca_dir(state_dir) / "ca.pem").exists()


def create(state_dir: Path, clock: Clock, cn: str = "scepd", org: str | None = None,
           passphrase: bytes | None = None, root_bits: int = 4096, ca_bits: int = 2048,
           ca_key_type: str = "rsa", root_passphrase: bytes | None = None,
           root_key_path: Path | None = None, ca_key_uri: str | None = None,
           root_key_uri: str | None = None) -> CaMaterial:
    """A new root (RSA-4096, 20 years) and online RSA-2048 intermediate (5 years).

    The root key goes to `root_key_path` (default DIR/ca/root.key), encrypted with
    `root_passphrase` (None: unencrypted, for tests; `scepd init` always asks for one).
    `ca_key_uri` / `root_key_uri`: that key is created in a PKCS#11 token instead (or taken from
    it, when the object exists)."""
    d = ca_dir(state_dir)
    if exists(state_dir):
        raise PkiError(f"a CA already exists in {d}; refusing to overwrite it")
    root_key_path = root_key_path or d / "root.key"
    if root_key_uri is None and (root_key_path.exists() or root_key_path.is_symlink()):
        raise PkiError(f"{root_key_path} already exists; refusing to overwrite a private key")
    now = clock.now().replace(microsecond=0)
    root_key = _new_key(root_key_uri, "rsa", root_bits)
    root_name = _name(f"{cn} Root CA", org)
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name).issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365 * 20 + 5))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(root_ski, critical=False)
        .sign(root_key, hashes.SHA256())
    )
    ca_key = _new_key(ca_key_uri, ca_key_type, ca_bits)
    ca_cert = issue_intermediate(root, root_key, ca_key.public_key(), _name(f"{cn} Issuing CA", org),
                                 now, dt.timedelta(days=365 * 5 + 1))
    material = CaMaterial(cert=ca_cert, key=ca_key, root=root)
    _write_key(d / "root.key" if root_key_uri else root_key_path, root_key, root_passphrase)
    _write_material(d, material, passphrase)
    return material


def issue_intermediate(root: x509.Certificate, root_key, public_key, name: x509.Name,
                       now: dt.datetime, lifetime: dt.timedelta) -> x509.Certificate:
    """An issuing CA: keyUsage lets it sign certificates/CRLs and, for SCEP, sign CertReps and
    decrypt requests (digitalSignature, keyEncipherment)."""
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(root.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + lifetime, root.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=is_rsa, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.public_key()),
                       critical=False)
        .sign(root_key, hashes.SHA256())
    )


def _write_material(d: Path, m: CaMaterial, passphrase: bytes | None) -> None:
    write_public(d / "root.pem", _pem(m.root))
    write_public(d / "ca.pem", _pem(m.cert))
    write_public(d / "chain.pem", _pem(*m.chain))
    _write_key(d / "ca.key", m.key, passphrase)


def import_ca(state_dir: Path, cert_pem: bytes, key_pem: bytes | None, chain_pem: bytes,
              import_passphrase: bytes | None, passphrase: bytes | None,
              key_uri: str | None = None) -> CaMaterial:
    """Bring-your-own: an issuing CA certificate + key and the chain up to the root. `key_uri`
    instead of `key_pem`: the key is already in a PKCS#11 token."""
    if exists(state_dir):
        raise PkiError(f"a CA already exists in {ca_dir(state_dir)}; refusing to overwrite it")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise PkiError("the CA certificate or chain is not PEM X.509") from None
    try:
        key = _token_key(key_uri) if key_uri is not None else \
            serialization.load_pem_private_key(key_pem or b"", import_passphrase)
    except (ValueError, TypeError):
        raise PkiError("the CA key cannot be read (wrong passphrase or not a PEM private key)") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PkiError("the issuing CA key must be RSA: SCEP clients encrypt requests to the CA "
                       "with RSA key transport (an EC CA needs a separate RSA RA)")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise PkiError("the CA key does not match the CA certificate")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise PkiError("the imported certificate is not a CA (basicConstraints CA:TRUE missing)")
    roots = [c for c in chain if c.issuer == c.subject]
    if not roots:
        raise PkiError("the chain must end in a self-signed root certificate")
    root = roots[-1]
    intermediates = tuple(c for c in chain if c is not root and c != cert)
    m = CaMaterial(cert=cert, key=key, root=root, intermediates=intermediates)
    _verify_chain(m)
    _write_material(ca_dir(state_dir), m, passphrase)
    if intermediates:
        write_public(ca_dir(state_dir) / "intermediates.pem", _pem(*intermediates))
    return m


def _verify_chain(m: CaMaterial) -> None:
    certs = list(m.chain)
    for child, parent in zip(certs, certs[1:]):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, Exception) as exc:  # InvalidSignature and friends
            raise PkiError(f"chain does not verify: {child.subject.rfc4514_string()} is not "
                           f"issued by {parent.subject.rfc4514_string()} ({type(exc).__name__})") from None


def load(state_dir: Path, passphrase: bytes | None) -> CaMaterial:
    d = ca_dir(state_dir)
    try:
        cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        root = x509.load_pem_x509_certificate((d / "root.pem").read_bytes())
        inter_path = d / "intermediates.pem"
        intermediates = tuple(x509.load_pem_x509_certificates(inter_path.read_bytes())) \
            if inter_path.exists() else ()
        uri = _key_uri(d / "ca.key")
        key_bytes = (d / "ca.key").read_bytes() if uri is None else b""
    except FileNotFoundError as exc:
        raise PkiError(f"missing CA file {exc.filename}; run `scepd init`") from None
    check_private_key_modes(state_dir)
    if uri is not None:
        return CaMaterial(cert=cert, key=_token_key(uri, cert), root=root, intermediates=intermediates)
    try:
        key = serialization.load_pem_private_key(key_bytes, passphrase)
    except TypeError:
        raise PkiError("the CA key is encrypted: set the passphrase environment variable "
                       "(ca.key_passphrase_env)") from None
    except ValueError:
        raise PkiError("the CA key cannot be decrypted or parsed (wrong passphrase?)") from None
    return CaMaterial(cert=cert, key=key, root=root, intermediates=intermediates)


#: Where the server keeps private keys: CA, root (until moved offline), RA, next and previous CAs
#: (ca/), its TLS key (tls/server.key), the delegated OCSP responder's key (ocsp/responder.key).
PRIVATE_KEY_DIRS = ("ca", "tls", "ocsp")


def private_key_files(state_dir: Path) -> list[Path]:
    """Every private key file the server keeps (PRIVATE_KEY_DIRS, `*.key`)."""
    found: list[Path] = []
    for sub in PRIVATE_KEY_DIRS:
        base = state_dir / sub
        if base.is_dir():
            found.extend(sorted(base.rglob("*.key")))
    return found


def loose_mode(mode: int) -> int | None:
    """The permission bits of a key file whose group or others may read or write it, else None."""
    return mode & 0o777 if mode & 0o077 else None


def check_private_key_modes(state_dir: Path) -> None:
    """Refuse to start with a private key that group or others may read or write."""
    for path in private_key_files(state_dir):
        try:
            loose = loose_mode(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if loose is not None:
            raise PkiError(f"{path} is readable by group or others (mode {loose:o}); chmod 600 it")


def pem(*certs: x509.Certificate) -> str:
    return _pem(*certs).decode()


def create_ra(state_dir: Path, ca: CaMaterial, clock: Clock, passphrase: bytes | None,
              cn: str = "scepd SCEP RA", org: str | None = None,
              key_uri: str | None = None) -> x509.Certificate:
    """A separate RSA RA (CA:FALSE; digitalSignature + keyEncipherment), issued by the issuing
    CA: it decrypts requests and signs CertReps, so the issuing CA may be EC."""
    d = ca_dir(state_dir)
    if (d / "ra.pem").exists():
        raise PkiError(f"an RA already exists in {d}")
    now = clock.now().replace(microsecond=0)
    key = _new_key(key_uri, "rsa", 2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, org)).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=365 * 2), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=True, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key()),  # type: ignore[arg-type]
                       critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    write_public(d / "ra.pem", _pem(cert))
    _write_key(d / "ra.key", key, passphrase)
    return cert


def load_ra(state_dir: Path, passphrase: bytes | None) -> tuple[x509.Certificate, rsa.RSAPrivateKey] | None:
    """An optional SCEP RA (DIR/ca/ra.pem + ra.key): it decrypts requests and signs CertReps."""
    d = ca_dir(state_dir)
    if not (d / "ra.pem").exists():
        return None
    cert = x509.load_pem_x509_certificate((d / "ra.pem").read_bytes())
    uri = _key_uri(d / "ra.key")
    try:
        key = _token_key(uri, cert) if uri is not None else \
            serialization.load_pem_private_key((d / "ra.key").read_bytes(), passphrase)
    except FileNotFoundError:
        raise PkiError(f"{d / 'ra.pem'} exists but {d / 'ra.key'} does not") from None
    except (TypeError, ValueError):
        raise PkiError("the RA key cannot be read (passphrase?)") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PkiError("the RA key must be RSA")
    return cert, key


# --- CA rollover --------------------------------------------------------------------------------


def next_dir(state_dir: Path) -> Path:
    return ca_dir(state_dir) / "next"


def previous_dir(state_dir: Path) -> Path:
    return ca_dir(state_dir) / "previous"


def rollover(state_dir: Path, clock: Clock, root_key_pem: bytes | None, root_passphrase: bytes | None,
             passphrase: bytes | None, cn: str | None = None, next_key_uri: str | None = None,
             root_key_uri: str | None = None) -> x509.Certificate:
    """Create the next issuing CA under the same root (needs the root key, brought back online
    for the occasion: a PEM, or `root_key_uri` in a token). It is published by GetNextCACert
    until `activate_next`. `next_key_uri`: the new key is created in a PKCS#11 token."""
    current = load(state_dir, passphrase)
    if (next_dir(state_dir) / "ca.pem").exists():
        raise PkiError(f"a next CA already exists in {next_dir(state_dir)}; activate it first")
    try:
        root_key = _token_key(root_key_uri) if root_key_uri is not None else \
            serialization.load_pem_private_key(root_key_pem or b"", root_passphrase)
    except (TypeError, ValueError):
        raise PkiError("the root key cannot be read (wrong passphrase?)") from None
    if root_key.public_key().public_numbers() != current.root.public_key().public_numbers():
        raise PkiError("that key is not the root CA's key")
    new_key = _new_key(next_key_uri, "rsa" if isinstance(current.key, rsa.RSAPrivateKey) else "ec", 2048)
    if new_key.public_key().public_numbers() == current.key.public_key().public_numbers():
        raise PkiError("the next CA key is the current CA's key: name a new object in --next-key-uri")
    name = current.cert.subject
    if cn:
        name = x509.Name([a if a.oid != NameOID.COMMON_NAME else x509.NameAttribute(NameOID.COMMON_NAME, cn)
                          for a in current.cert.subject])
    cert = issue_intermediate(current.root, root_key, new_key.public_key(), name,
                              clock.now().replace(microsecond=0), dt.timedelta(days=365 * 5 + 1))
    d = next_dir(state_dir)
    write_public(d / "ca.pem", _pem(cert))
    _write_key(d / "ca.key", new_key, passphrase)
    return cert


def load_next(state_dir: Path) -> x509.Certificate | None:
    path = next_dir(state_dir) / "ca.pem"
    return x509.load_pem_x509_certificate(path.read_bytes()) if path.exists() else None


def activate_next(state_dir: Path) -> x509.Certificate:
    """Switch issuing to the next CA; the current one moves to previous/<ca-id>/ and keeps
    decrypting requests and authorizing renewals of the certificates it issued."""
    d = ca_dir(state_dir)
    nxt = load_next(state_dir)
    if nxt is None:
        raise PkiError("no next CA: run `scepd ca rollover` first")
    current = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    old = previous_dir(state_dir) / ca_id_of(current)
    old.mkdir(parents=True, exist_ok=True)
    os.replace(d / "ca.pem", old / "ca.pem")
    for name in ("ca.key", "ca.key.uri"):  # a key file, or the URI of a token key
        if (d / name).exists():
            os.replace(d / name, old / name)
    os.replace(next_dir(state_dir) / "ca.pem", d / "ca.pem")
    for name in ("ca.key", "ca.key.uri"):
        if (next_dir(state_dir) / name).exists():
            os.replace(next_dir(state_dir) / name, d / name)
    root = x509.load_pem_x509_certificate((d / "root.pem").read_bytes())
    write_public(d / "chain.pem", _pem(nxt, root))
    return nxt


def load_previous(state_dir: Path, passphrase: bytes | None) -> list[tuple[x509.Certificate, object]]:
    out = []
    base = previous_dir(state_dir)
    if not base.exists():
        return out
    for sub in sorted(base.iterdir()):
        try:
            cert = x509.load_pem_x509_certificate((sub / "ca.pem").read_bytes())
            uri = _key_uri(sub / "ca.key")
            key = _token_key(uri, cert) if uri is not None else \
                serialization.load_pem_private_key((sub / "ca.key").read_bytes(), passphrase)
        except (FileNotFoundError, TypeError, ValueError):
            raise PkiError(f"previous CA in {sub} cannot be loaded") from None
        out.append((cert, key))
    return out
