"""CA keys in a PKCS#11 token (an HSM; SoftHSM2 in the tests), named by RFC 7512 URIs.

    pkcs11:token=scepd;object=issuing-ca?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/scepd/pin

`open_key(uri)` and `generate_key(uri, ...)` return a TokenRsaKey / TokenEcKey: objects of pyca's
own key interfaces (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey) whose sign() and decrypt() go
to the token. pyca's certificate, CRL and OCSP builders sign with any object of those interfaces
by calling its sign() with the exact TBS bytes they encoded (tests/test_pkcs11.py checks that this
still holds), so a token key produces the same DER a file key would, and the signing code paths
(authority, CRL, OCSP, SCEP CertRep, key transport decryption) need no change. The private key
never leaves the token (CKA_SENSITIVE, not CKA_EXTRACTABLE); private_bytes() refuses.

Library: python-pkcs11 (Cython). It releases the GIL during every token call, so a slow HSM does
not stall the event loop while a signature runs in a worker thread (PyKCS11 holds the GIL
throughout: measured, see README "HSM"). It initializes the module without CKF_OS_LOCKING_OK, so
the module may assume one caller at a time: every call of this process into a module goes
through that module's lock, on one session per token, logged in once. A session is never
inherited across fork(): the first call in a new process re-initializes the module and logs in
again (and the locks are new in the child).

The PIN comes from the URI's pin-source (a file) or SCEPD_PKCS11_PIN; a URI with pin-value is
refused (the URI is stored in the state directory). Nothing here logs the PIN.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes

from cryptography.exceptions import UnsupportedAlgorithm, _Reasons
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from ..errors import Unavailable
from .pki import PkiError

log = logging.getLogger("scepd.pkcs11")

PIN_ENV = "SCEPD_PKCS11_PIN"

#: the RFC 7512 attributes we select by; any other (slot-id, model, ...) is refused rather than
#: ignored, so that a URI never silently picks a key it did not mean
_PATH_ATTRS = {"token", "serial", "object", "id", "type"}
_QUERY_ATTRS = {"module-path", "pin-source"}


class TokenError(PkiError):
    """The token, its PIN or a key object is unusable; the message is one line for the operator."""


class TokenUnavailable(TokenError, Unavailable):
    """A signature or decryption the token refused while serving (removed, session lost and not
    regained, key gone): the operator's one line in the log; the client gets Unavailable's
    answer (HTTP 503, Retry-After), with nothing of this text."""

    def __init__(self, operator_detail: str):
        Unavailable.__init__(self)
        self.operator_detail = operator_detail

    def __str__(self) -> str:
        return self.operator_detail


@dataclass(frozen=True)
class KeyUri:
    """An RFC 7512 PKCS#11 URI naming one private key."""

    text: str
    module_path: str
    token: str | None = None
    serial: str | None = None
    object: str | None = None
    id: bytes | None = None
    pin_source: str | None = None

    @property
    def where(self) -> str:
        """How messages name the key (never the PIN, which is not in the URI anyway)."""
        name = repr(self.object) if self.object is not None else f"id {self.id.hex() if self.id else ''}"
        return f"key {name} on token {self.token or self.serial!r}"


def parse_uri(text: str) -> KeyUri:
    text = text.strip()
    if not text.startswith("pkcs11:"):
        raise TokenError("a PKCS#11 key URI starts with 'pkcs11:' (RFC 7512)")
    path, _, query = text[len("pkcs11:"):].partition("?")
    attrs: dict[str, str] = {}
    raw_id: bytes | None = None
    for part in filter(None, path.split(";")):
        name, eq, value = part.partition("=")
        if not eq or name not in _PATH_ATTRS:
            raise TokenError(f"unsupported attribute {name!r} in the PKCS#11 URI (token, serial, "
                             "object, id and type are supported)")
        if name in attrs or (name == "id" and raw_id is not None):
            raise TokenError(f"attribute {name!r} appears twice in the PKCS#11 URI")
        if name == "id":
            raw_id = unquote_to_bytes(value)
        else:
            attrs[name] = unquote(value, errors="strict")
    params: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        name, eq, value = part.partition("=")
        if name == "pin-value":
            raise TokenError("the PKCS#11 URI must not carry the PIN (pin-value): use "
                             f"pin-source=file:/path or {PIN_ENV}")
        if not eq or name not in _QUERY_ATTRS:
            raise TokenError(f"unknown query attribute {name!r} in the PKCS#11 URI "
                             "(module-path and pin-source are supported)")
        params[name] = unquote(value, errors="strict")
    if attrs.get("type", "private") != "private":
        raise TokenError("the PKCS#11 URI must name a private key (type=private)")
    if "object" not in attrs and raw_id is None:
        raise TokenError("the PKCS#11 URI must name the key: object=LABEL and/or id=%XX..")
    if "token" not in attrs and "serial" not in attrs:
        raise TokenError("the PKCS#11 URI must name the token: token=LABEL or serial=...")
    module = params.get("module-path")
    if not module:
        raise TokenError("the PKCS#11 URI needs module-path=/path/to/the/module.so")
    return KeyUri(text=text, module_path=module, token=attrs.get("token"), serial=attrs.get("serial"),
                  object=attrs.get("object"), id=raw_id, pin_source=params.get("pin-source"))


def read_pin(uri: KeyUri) -> str:
    if uri.pin_source:
        src = uri.pin_source
        if src.startswith("file://"):
            src = src[len("file://"):]
        elif src.startswith("file:"):
            src = src[len("file:"):]
        if not src.startswith("/"):
            raise TokenError("pin-source must be an absolute file path (pin-source=file:/path)")
        try:
            pin = Path(src).read_text().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"cannot read the PKCS#11 PIN file {src}: "
                             f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    else:
        pin = os.environ.get(PIN_ENV, "")
        if not pin:
            raise TokenError(f"no PIN for token {uri.token or uri.serial!r}: add pin-source=file:/path "
                             f"to the key URI or set {PIN_ENV}")
    return pin


# --- the token: one session per process, one caller at a time ------------------------------------

_registry_lock = threading.Lock()
_tokens: dict[tuple, "_Token"] = {}
_lib_pid: dict[str, int] = {}
#: one lock per module: python-pkcs11 initializes modules without CKF_OS_LOCKING_OK, so this
#: process calls each module from one thread at a time, whatever the token or session
_module_locks: dict[str, threading.RLock] = {}


def _module_lock(module_path: str) -> threading.RLock:
    with _registry_lock:
        return _module_locks.setdefault(module_path, threading.RLock())


def _after_fork_in_child() -> None:
    """A lock held by another thread at fork() would stay held forever in the child: start with
    fresh ones (sessions are reopened anyway: see _Token.session)."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _module_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _pkcs11():
    try:
        import pkcs11
    except ImportError:
        raise TokenError("python-pkcs11 is not installed: pip install 'scepd[server]'") from None
    return pkcs11


def _load_lib(module_path: str):
    """The module, initialized in this process (re-initialized after a fork)."""
    pkcs11 = _pkcs11()
    with _registry_lock:
        try:
            lib = pkcs11.lib(module_path)
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"cannot load the PKCS#11 module {module_path}: {exc}") from None
        pid = os.getpid()
        if _lib_pid.setdefault(module_path, pid) != pid:
            try:  # a child of the process that initialized it: start over (PKCS#11 §5.4)
                lib.finalize()
            except pkcs11.PKCS11Error:
                pass
            lib.initialize()
            _lib_pid[module_path] = pid
        return lib


@dataclass(eq=False)
class _Token:
    module_path: str
    label: str | None
    serial: str | None
    pin: str = field(repr=False)
    _session: object = None
    _pid: int | None = None
    generation: int = 0

    @property
    def name(self) -> str:
        return repr(self.label or self.serial)

    @property
    def lock(self) -> threading.RLock:
        return _module_lock(self.module_path)

    def session(self):
        """The logged-in session of this process (call with `lock` held)."""
        if self._session is not None and self._pid == os.getpid():
            return self._session
        pkcs11 = _pkcs11()
        lib = _load_lib(self.module_path)
        try:
            token = lib.get_token(**({"token_label": self.label} if self.label else {}),
                                  **({"token_serial": self.serial.encode()} if self.serial else {}))
        except pkcs11.NoSuchToken:
            raise TokenError(f"no PKCS#11 token {self.name} in {self.module_path}") from None
        except pkcs11.MultipleTokensReturned:
            raise TokenError(f"more than one PKCS#11 token matches {self.name}") from None
        try:
            try:
                session = token.open(rw=True, user_pin=self.pin)
            except pkcs11.UserAlreadyLoggedIn:
                session = token.open(rw=True)
        except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange):
            raise TokenError(f"the PIN for PKCS#11 token {self.name} is wrong") from None
        except pkcs11.PinLocked:
            raise TokenError(f"the PIN of PKCS#11 token {self.name} is locked") from None
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"cannot log in to PKCS#11 token {self.name}: {type(exc).__name__}") from None
        self._session, self._pid = session, os.getpid()
        self.generation += 1
        return session

    def reset(self) -> None:
        """Forget the session (the token went away); the next call opens a new one."""
        session, self._session = self._session, None
        if session is not None and self._pid == os.getpid():
            try:
                session.close()
            except Exception:
                pass


def _token_for(uri: KeyUri) -> _Token:
    pin = read_pin(uri)
    key = (uri.module_path, uri.token, uri.serial)
    with _registry_lock:
        tok = _tokens.get(key)
        if tok is None or tok.pin != pin:
            tok = _tokens[key] = _Token(uri.module_path, uri.token, uri.serial, pin)
        return tok


def _template(uri: KeyUri, object_class) -> dict:
    pkcs11 = _pkcs11()
    attrs = {pkcs11.Attribute.CLASS: object_class}
    if uri.object is not None:
        attrs[pkcs11.Attribute.LABEL] = uri.object
    if uri.id is not None:
        attrs[pkcs11.Attribute.ID] = uri.id
    return attrs


def _find(session, uri: KeyUri, object_class):
    found = list(session.get_objects(_template(uri, object_class)))
    if len(found) > 1:
        raise TokenError(f"more than one object matches {uri.where}: add id=... to the URI")
    return found[0] if found else None


# --- keys -----------------------------------------------------------------------------------

#: DER DigestInfo prefixes (RFC 8017 §9.2 note 1): CKM_RSA_PKCS signs DigestInfo || digest
_DIGEST_INFO = {
    "md5": bytes.fromhex("3020300c06082a864886f70d020505000410"),
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
#: errors about the session or device, not about the data: reopen the session and retry once
_SESSION_ERRORS = ("SessionHandleInvalid", "SessionClosed", "UserNotLoggedIn", "DeviceRemoved",
                   "TokenNotPresent", "ObjectHandleInvalid", "KeyHandleInvalid")


def _digest(data: bytes, algorithm) -> tuple[str, bytes]:
    if isinstance(algorithm, utils.Prehashed):
        return algorithm._algorithm.name, data
    h = hashes.Hash(algorithm)
    h.update(data)
    return algorithm.name, h.finalize()


class _TokenKey:
    """What TokenRsaKey and TokenEcKey share: the URI, the public key and the token call."""

    def __init__(self, uri: KeyUri, token: _Token, public):
        self.uri = uri
        self._token = token
        self._public = public
        self._handle = None
        self._generation = -1

    def _call(self, op):
        """op(private key object) under the token lock; one retry on a lost session."""
        pkcs11 = _pkcs11()
        with self._token.lock:
            for attempt in (0, 1):
                try:
                    session = self._token.session()
                    if self._generation != self._token.generation or self._handle is None:
                        self._handle = _find(session, self.uri, pkcs11.ObjectClass.PRIVATE_KEY)
                        self._generation = self._token.generation
                        if self._handle is None:
                            log.error("PKCS#11 token %s: no private %s", self._token.name, self.uri.where)
                            raise TokenUnavailable(f"no private {self.uri.where}")
                    return op(self._handle)
                except pkcs11.PKCS11Error as exc:
                    if type(exc).__name__ in _SESSION_ERRORS and attempt == 0:
                        self._token.reset()
                        self._handle = None
                        continue
                    log.error("PKCS#11 token %s, %s: %s", self._token.name, self.uri.where, type(exc).__name__)
                    raise TokenUnavailable(f"PKCS#11 token {self._token.name}, {self.uri.where}: "
                                           f"{type(exc).__name__}") from None
        raise AssertionError("unreachable")

    def public_key(self):
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def private_bytes(self, *_args, **_kwargs):
        raise TypeError(f"the {self.uri.where} cannot be exported (it lives in the token)")

    def private_numbers(self):
        raise TypeError(f"the {self.uri.where} cannot be exported (it lives in the token)")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri.where}>"

    def ping(self) -> None:
        """A signature through the token, verified with the public key (readiness)."""
        data = b"scepd token check"
        if isinstance(self, rsa.RSAPrivateKey):
            sig = self.sign(data, padding.PKCS1v15(), hashes.SHA256())
            self._public.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            sig = self.sign(data, ec.ECDSA(hashes.SHA256()))
            self._public.verify(sig, data, ec.ECDSA(hashes.SHA256()))


class TokenRsaKey(_TokenKey, rsa.RSAPrivateKey):
    def sign(self, data: bytes, padding_: padding.AsymmetricPadding, algorithm) -> bytes:
        if not isinstance(padding_, padding.PKCS1v15):
            raise UnsupportedAlgorithm("token keys sign with PKCS#1 v1.5 only",
                                       _Reasons.UNSUPPORTED_PADDING)
        name, digest = _digest(data, algorithm)
        if name not in _DIGEST_INFO:
            raise UnsupportedAlgorithm(f"digest {name} is not supported for token keys",
                                       _Reasons.UNSUPPORTED_HASH)
        mech = _pkcs11().Mechanism.RSA_PKCS
        return self._call(lambda k: k.sign(_DIGEST_INFO[name] + digest, mechanism=mech))

    def decrypt(self, ciphertext: bytes, padding_: padding.AsymmetricPadding) -> bytes:
        """RSA PKCS#1 v1.5 key transport in the token. Every failure the data can cause is the
        same ValueError (as pyca raises), whatever the token reported; the SCEP envelope code
        then continues with a random stand-in key (implicit rejection, scepd.scep.wire)."""
        if not isinstance(padding_, padding.PKCS1v15):
            raise UnsupportedAlgorithm("token keys decrypt PKCS#1 v1.5 only", _Reasons.UNSUPPORTED_PADDING)
        pkcs11 = _pkcs11()
        mech = pkcs11.Mechanism.RSA_PKCS
        try:
            return self._call(lambda k: k.decrypt(ciphertext, mechanism=mech))
        except (pkcs11.PKCS11Error, TokenError):
            raise ValueError("Decryption failed") from None


class TokenEcKey(_TokenKey, ec.EllipticCurvePrivateKey):
    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithm("token keys sign with ECDSA only",
                                       _Reasons.UNSUPPORTED_PUBLIC_KEY_ALGORITHM)
        _name, digest = _digest(data, signature_algorithm.algorithm)
        mech = _pkcs11().Mechanism.ECDSA
        raw = self._call(lambda k: k.sign(digest, mechanism=mech))
        half = len(raw) // 2
        return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                          int.from_bytes(raw[half:], "big"))

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    def exchange(self, *_args, **_kwargs):
        raise UnsupportedAlgorithm("token CA keys do not do key agreement",
                                   _Reasons.UNSUPPORTED_EXCHANGE_ALGORITHM)


TokenKey = TokenRsaKey | TokenEcKey

_CURVES = {"1.2.840.10045.3.1.7": ec.SECP256R1(), "1.3.132.0.34": ec.SECP384R1()}


def _public_of(session, uri: KeyUri, private):
    """The pyca public key of a token key pair (from the private object for RSA, from the
    public object for EC)."""
    from asn1crypto import core, keys

    pkcs11 = _pkcs11()
    A = pkcs11.Attribute
    if private.key_type == pkcs11.KeyType.RSA:
        n = int.from_bytes(private[A.MODULUS], "big")
        e = int.from_bytes(private[A.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if private.key_type == pkcs11.KeyType.EC:
        public = _find(session, uri, pkcs11.ObjectClass.PUBLIC_KEY)
        if public is None:
            raise TokenError(f"the {uri.where} has no public key object next to it")
        curve_oid = keys.ECDomainParameters.load(public[A.EC_PARAMS]).chosen
        curve = _CURVES.get(getattr(curve_oid, "dotted", ""))
        if curve is None:
            raise TokenError(f"the {uri.where} is on an unsupported curve (P-256 and P-384 are)")
        point = core.OctetString.load(public[A.EC_POINT]).native
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    raise TokenError(f"the {uri.where} is neither RSA nor EC")


def _wrap(uri: KeyUri, token: _Token, session, private) -> TokenKey:
    public = _public_of(session, uri, private)
    cls = TokenRsaKey if isinstance(public, rsa.RSAPublicKey) else TokenEcKey
    key = cls(uri, token, public)
    key._handle, key._generation = private, token.generation
    return key


def open_key(uri_text: str, expected_public=None) -> TokenKey:
    """The private key a URI names, checked now: module, token, PIN and object (TokenError, one
    line, otherwise). `expected_public`: the certificate's key it must match."""
    uri = parse_uri(uri_text)
    token = _token_for(uri)
    pkcs11 = _pkcs11()
    with token.lock:
        try:
            session = token.session()
            private = _find(session, uri, pkcs11.ObjectClass.PRIVATE_KEY)
            if private is None:
                raise TokenError(f"no private {uri.where}")
            key = _wrap(uri, token, session, private)
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"PKCS#11 token {token.name}: {type(exc).__name__}") from None
    if expected_public is not None and expected_public.public_numbers() != key.public_key().public_numbers():
        raise TokenError(f"the {uri.where} does not match its certificate")
    return key


def generate_key(uri_text: str, kind: str = "rsa", bits: int = 2048) -> TokenKey:
    """A new key pair in the token under the URI's label/id (RSA `bits`, or EC P-256), unless a
    private key with that label/id exists: then that one is used."""
    uri = parse_uri(uri_text)
    if uri.object is None:
        raise TokenError("to create a key the PKCS#11 URI needs object=LABEL")
    token = _token_for(uri)
    pkcs11 = _pkcs11()
    A = pkcs11.Attribute
    private_template = {A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False,
                        A.SIGN: True, A.DECRYPT: kind == "rsa"}
    public_template = {A.TOKEN: True, A.VERIFY: True, A.ENCRYPT: kind == "rsa"}
    with token.lock:
        try:
            session = token.session()
            private = _find(session, uri, pkcs11.ObjectClass.PRIVATE_KEY)
            if private is None:
                key_id = uri.id if uri.id is not None else os.urandom(16)
                if kind == "rsa":
                    _pub, private = session.generate_keypair(
                        pkcs11.KeyType.RSA, bits, id=key_id, label=uri.object, store=True,
                        public_template=public_template, private_template=private_template)
                else:
                    from pkcs11.util.ec import encode_named_curve_parameters
                    params = session.create_domain_parameters(
                        pkcs11.KeyType.EC, {A.EC_PARAMS: encode_named_curve_parameters("1.2.840.10045.3.1.7")},
                        local=True)
                    _pub, private = params.generate_keypair(
                        id=key_id, label=uri.object, store=True,
                        public_template=public_template, private_template=private_template)
            return _wrap(uri, token, session, private)
        except pkcs11.PKCS11Error as exc:
            raise TokenError(f"PKCS#11 token {token.name}: cannot create the {uri.where}: "
                             f"{type(exc).__name__}") from None


def is_token_key(key) -> bool:
    return isinstance(key, _TokenKey)
