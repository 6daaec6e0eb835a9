"""One error hierarchy and one table.

Every failure anywhere in scepd is a ScepdError subclass. ERROR_TABLE maps each class to the
SCEP failInfo it is answered with inside a signed CertRep, the ACME problem type, and the HTTP
status used when no signed reply can be built. Messages are written for the client: they never
carry internal text (paths, exception reprs, stack traces).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class FailInfo(enum.IntEnum):
    """RFC 8894 §3.2.1.4.5 failInfo values."""

    BAD_ALG = 0
    BAD_MESSAGE_CHECK = 1
    BAD_REQUEST = 2
    BAD_TIME = 3
    BAD_CERT_ID = 4


class ScepdError(Exception):
    """Base of every failure a client may be told about. `detail` is safe to send."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class MalformedRequest(ScepdError):
    """The bytes cannot be decoded (not base64, not DER, missing required parts)."""


class UnverifiableMessage(ScepdError):
    """The message's signature or digest does not verify; nothing in it can be trusted."""


class NotForUs(ScepdError):
    """The envelope is encrypted to no certificate we hold, or cannot be decrypted."""


class PayloadTooLarge(ScepdError):
    """The request body is over the configured cap."""


class UnsupportedOperation(ScepdError):
    """An HTTP-level operation we do not know."""


class ForbiddenAlgorithm(ScepdError):
    """A cipher or digest outside the allowed set (single DES and MD5 without the legacy switch)."""


class BadMessageCheck(ScepdError):
    """An inner integrity check failed, e.g. the CSR's self-signature."""


class UnreadableEnvelope(BadMessageCheck):
    """SCEP: the pkcsPKIEnvelope could not be opened or its content could not be decoded (key
    transport, CBC padding, the plaintext's structure, the CSR or IssuerAndSerial inside).
    Every such failure gets this one answer, whatever the stage: a reply that differed would be
    a decryption oracle (SCEP runs over plain HTTP, so anyone who captured a request could
    replay its ciphertext inside a message of their own and learn its plaintext, the challenge
    password, from the differences). `reason` is for the server's log only."""

    DETAIL = "the pkcsPKIEnvelope cannot be decrypted, or its content cannot be decoded"

    def __init__(self, reason: str = ""):
        super().__init__(self.DETAIL)
        self.reason = reason


class BadRequest(ScepdError):
    """The request is well formed but refused: wrong challenge, policy violation."""


class ChallengeRejected(BadRequest):
    """The challenge password is missing, wrong, expired or already used."""


class PolicyViolation(BadRequest):
    """The requested certificate is not one our policy issues."""


class BadPublicKey(PolicyViolation):
    """A public key outside the key limits (policy.check_key): type, size, curve or exponent."""


class RenewalRefused(BadRequest):
    """A request signed by a certificate that may not authorize a renewal."""


class RequestRejected(BadRequest):
    """An administrator rejected a pending request."""


class UnknownTransaction(BadRequest):
    """A poll for a transaction this server never saw."""


class ExternalCheckDenied(BadRequest):
    """The external CSR check (executable or webhook) denied or failed."""


class UnsupportedMessageType(BadRequest):
    """A SCEP messageType this server does not handle."""


class BadTime(ScepdError):
    """signingTime is too far from our clock."""


class BadCertId(ScepdError):
    """The certificate named by the request does not exist here."""


class AlreadyRevoked(BadRequest):
    """The certificate is already revoked."""


class BadNonce(ScepdError):
    """ACME: the nonce is missing, unknown, used or expired."""


class BadSignatureAlgorithm(ScepdError):
    """ACME: a JWS algorithm outside the allowlist."""


class AccountDoesNotExist(ScepdError):
    """ACME: no account for this key / kid."""


class Unauthorized(ScepdError):
    """ACME: the account may not do this."""


class AccountDeactivated(Unauthorized):
    """ACME: the request comes from a deactivated account, by kid or jwk (RFC 8555 §7.3.6: 401)."""


class UnsupportedMediaType(MalformedRequest):
    """ACME: POST bodies must be application/jose+json."""


class OrderNotReady(ScepdError):
    """ACME: finalize before every authorization is valid."""


class ValidationFailed(ScepdError):
    """ACME: a challenge response was wrong or unreachable."""


class BadCsr(BadMessageCheck):
    """ACME: the finalize CSR is unacceptable."""


class BadRevocationReason(BadRequest):
    """ACME: a revocation reason outside the allowlist."""


class ExternalAccountRequired(ScepdError):
    """ACME: this server only creates accounts bound to an EAB key."""


class AlreadyReplaced(ScepdError):
    """ACME ARI: the certificate named in `replaces` was already replaced by another order."""


class ValidationConnection(ValidationFailed):
    """ACME: the validator could not connect to the client (http-01, tls-alpn-01)."""


class ValidationDns(ValidationFailed):
    """ACME: the DNS lookup of a dns-01 challenge failed."""


class ValidationTls(ValidationFailed):
    """ACME: the TLS handshake of a tls-alpn-01 challenge failed or offered no acme-tls/1."""


class UnsupportedIdentifier(ScepdError):
    """ACME: an identifier type this server does not issue for."""


class InvalidProfile(ScepdError):
    """ACME: newOrder names a profile the directory does not advertise (draft-ietf-acme-profiles)."""


class RejectedIdentifiers(PolicyViolation):
    """ACME: several identifiers refused at once; each is a subproblem (RFC 8555 §6.7.1)."""

    def __init__(self, detail: str, subproblems: list[tuple[ScepdError, dict]]):
        super().__init__(detail)
        self.subproblems = subproblems


class NotFound(ScepdError):
    """A named object (certificate, challenge) does not exist."""


class Unavailable(ScepdError):
    """Something the answer needs is down for now (the CA key's PKCS#11 token): HTTP 503 with
    Retry-After, never a SCEP FAILURE (which a client takes as final) and never internal text."""

    DETAIL = "the server cannot sign right now; retry later"

    def __init__(self, detail: str = DETAIL, retry_after: int = 30):
        super().__init__(detail)
        self.retry_after = retry_after


class RateLimited(ScepdError):
    """A rate limit (scepd/ratelimit.py) refuses the request; retry after `retry_after` seconds."""

    def __init__(self, detail: str, retry_after: int, limit: str):
        super().__init__(detail)
        self.retry_after = retry_after
        self.limit = limit


@dataclass(frozen=True)
class ErrorMapping:
    fail_info: FailInfo
    acme_type: str
    http_status: int


_ACME = "urn:ietf:params:acme:error:"

#: The one table. Order does not matter: lookup walks the class's MRO.
ERROR_TABLE: dict[type[ScepdError], ErrorMapping] = {
    ScepdError: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "serverInternal", 500),
    MalformedRequest: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "malformed", 400),
    UnverifiableMessage: ErrorMapping(FailInfo.BAD_MESSAGE_CHECK, _ACME + "malformed", 400),
    NotForUs: ErrorMapping(FailInfo.BAD_MESSAGE_CHECK, _ACME + "malformed", 400),
    PayloadTooLarge: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "malformed", 413),
    UnsupportedOperation: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "malformed", 400),
    ForbiddenAlgorithm: ErrorMapping(FailInfo.BAD_ALG, _ACME + "badSignatureAlgorithm", 400),
    BadMessageCheck: ErrorMapping(FailInfo.BAD_MESSAGE_CHECK, _ACME + "badCSR", 400),
    UnreadableEnvelope: ErrorMapping(FailInfo.BAD_MESSAGE_CHECK, _ACME + "malformed", 400),
    BadRequest: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "malformed", 400),
    ChallengeRejected: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "unauthorized", 403),
    PolicyViolation: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "rejectedIdentifier", 400),
    BadPublicKey: ErrorMapping(FailInfo.BAD_ALG, _ACME + "badPublicKey", 400),
    RenewalRefused: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "unauthorized", 403),
    RequestRejected: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "rejectedIdentifier", 403),
    UnknownTransaction: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "malformed", 404),
    ExternalCheckDenied: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "unauthorized", 403),
    UnsupportedMessageType: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "malformed", 400),
    AlreadyRevoked: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "alreadyRevoked", 400),
    BadTime: ErrorMapping(FailInfo.BAD_TIME, _ACME + "malformed", 400),
    BadCertId: ErrorMapping(FailInfo.BAD_CERT_ID, _ACME + "malformed", 404),
    NotFound: ErrorMapping(FailInfo.BAD_CERT_ID, _ACME + "malformed", 404),
    BadCsr: ErrorMapping(FailInfo.BAD_MESSAGE_CHECK, _ACME + "badCSR", 400),
    BadRevocationReason: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "badRevocationReason", 400),
    ExternalAccountRequired: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "externalAccountRequired", 403),
    AlreadyReplaced: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "alreadyReplaced", 409),
    BadNonce: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "badNonce", 400),
    BadSignatureAlgorithm: ErrorMapping(FailInfo.BAD_ALG, _ACME + "badSignatureAlgorithm", 400),
    AccountDoesNotExist: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "accountDoesNotExist", 400),
    Unauthorized: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "unauthorized", 403),
    AccountDeactivated: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "unauthorized", 401),
    UnsupportedMediaType: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "malformed", 415),
    OrderNotReady: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "orderNotReady", 403),
    ValidationFailed: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "incorrectResponse", 403),
    ValidationConnection: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "connection", 400),
    ValidationDns: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "dns", 400),
    ValidationTls: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "tls", 400),
    UnsupportedIdentifier: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "unsupportedIdentifier", 400),
    InvalidProfile: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "invalidProfile", 400),
    RejectedIdentifiers: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "rejectedIdentifier", 400),
    RateLimited: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "rateLimited", 429),
    Unavailable: ErrorMapping(FailInfo.BAD_REQUEST, _ACME + "serverInternal", 503),
}


def mapping_for(error: ScepdError | type[ScepdError]) -> ErrorMapping:
    cls = error if isinstance(error, type) else type(error)
    for klass in cls.__mro__:
        if klass in ERROR_TABLE:
            return ERROR_TABLE[klass]  # type: ignore[index]
    raise KeyError(cls)
