"""The enrollment pipeline: the one place issuance policy lives, for every protocol.

Boulder's split: the front ends (scepd/scep/service.py, acme/service.py, later EST) only decode
and authenticate; each turns a request into an `Authorization` (who asked, the names that
authentication grants, the profile) and hands it here with the decoded CSR. This module then
runs, in this order and for every protocol alike:

  1. name scope     every name of the request (CN and each SAN) inside the authorization's
  2. profile        the authorization's, a renewal's certificate's, or the protocol default
  3. policy         policy.approve: key limits, name syntax, subject policy, validity
  4. external check the `[policy] csr_check_command/url` (the real protocol in its payload)
  5. approval       `[policy] require_approval`: a pending request for `scepd pending approve`
  6. issuance       enrollment.issue: CA signs, store commits, challenge consumed, audit

Steps 1-3 are `authorize`, which answers quickly and touches nothing; steps 4-6 are
`complete` (ACME runs them in the background of a `processing` order).
"""
from __future__ import annotations

import base64
import datetime as dt
import fnmatch
from dataclasses import dataclass, field

from .challenges import ChallengeGrant
from ..ca.csr import CsrFacts
from .enrollment import REQUESTED_SUBJECT_PROTOCOLS, EnrollmentService, Issued
from ..config import Config, ConfigError
from ..errors import PolicyViolation, ScepdError
from .external_check import CheckRequest, ExternalCheck
from ..ca.policy import ENROLLMENT_PROFILES, IssuanceRequest, Profile, profile_named
from ..store import CertificateRecord, PendingRecord, StoreNotFound

#: what authenticated a request
AUTHORIZATION_KINDS = ("challenge", "renewal", "acme-account", "tls-client")
#: `[policy] renewal_profile`: keep the renewed certificate's profile, or use the protocol default
RENEWAL_PROFILE_MODES = ("keep", "default")


@dataclass(frozen=True)
class Authorization:
    """Who asked, and what that grants: built by a front end, judged by the pipeline."""

    kind: str  # one of AUTHORIZATION_KINDS
    protocol: str  # "scep" | "acme" | "est": the external check and approval see it
    #: shell patterns (case-insensitive); every name of the request must match one. None: any name
    names: tuple[str, ...] | None = None
    #: a second scope the credential is bound to (an ACME account's EAB identifiers pattern)
    bound_names: tuple[str, ...] | None = None
    #: the profile this authorization grants; None: the protocol default (or a renewal's own)
    profile: str | None = None
    #: the one-time challenge to consume in the issuing transaction
    challenge_id: int | None = None
    #: for the audit record: static | one-time | none | renewal | acme ...
    challenge_kind: str = ""
    #: the serial a renewal replaces
    renewal_of: str | None = None
    requester: str | None = None
    transaction_id: str | None = None
    #: the challenge as presented: only for the external check's payload (never logged)
    presented_challenge: str | None = field(default=None, repr=False)
    #: "*.name" DNS names may pass (ACME names whose wildcard dns-01 proved)
    allow_wildcard: bool = False
    #: the inventory row of `renewal_of` when the front end already read it (None: read it here)
    renewal_record: CertificateRecord | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in AUTHORIZATION_KINDS:
            raise ValueError(f"unknown authorization kind {self.kind!r}")

    @property
    def grant(self) -> ChallengeGrant:
        return ChallengeGrant(self.challenge_kind or self.kind, self.challenge_id)


@dataclass(frozen=True)
class CsrRequest:
    """What a front end decoded (never a PKIMessage or a JWS): the CSR and its facts."""

    facts: CsrFacts
    csr_der: bytes
    #: a requested (notBefore, notAfter) (ACME newOrder); None: the profile's
    window: tuple[dt.datetime | None, dt.datetime | None] | None = None
    #: the key that signed the request (SCEP polls may be signed by it); default: the CSR key
    signer_spki_sha256: str | None = None


@dataclass(frozen=True)
class Approved:
    """Steps 1-3 passed: what the CA would sign, and for whom."""

    authorization: Authorization
    csr: CsrRequest
    request: IssuanceRequest


@dataclass(frozen=True)
class Decision:
    """Either a certificate (issued) or a request waiting for an administrator (pending)."""

    issued: Issued | None = None
    pending: PendingRecord | None = None


@dataclass(frozen=True)
class ApprovalPolicy:
    """`[policy] require_approval`: "false"/"" (never), "true" (every initial enrollment), or a
    comma list of protocols (scep, acme, est) and profiles ("profile:server"). A request waits
    when its protocol or its profile is listed. Renewals never wait."""

    every: bool = False
    protocols: frozenset[str] = frozenset()
    profiles: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str | bool) -> "ApprovalPolicy":
        if isinstance(text, bool):
            return cls(every=text)
        value = (text or "").strip().lower()
        if value in ("", "false", "0", "no", "off"):
            return cls()
        if value in ("true", "1", "yes", "on"):
            return cls(every=True)
        protocols, profiles = set(), set()
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            if item.startswith("profile:"):
                name = item.removeprefix("profile:")
                profile_named(name)  # PolicyViolation names an unknown profile
                profiles.add(name)
            elif item in ("scep", "acme", "est"):
                protocols.add(item)
            else:
                raise ValueError(f"[policy] require_approval: {item!r} is neither a protocol "
                                 "(scep, acme, est) nor profile:NAME")
        return cls(False, frozenset(protocols), frozenset(profiles))

    def requires(self, protocol: str, profile: str) -> bool:
        return self.every or protocol in self.protocols or profile in self.profiles


def names_of(facts: CsrFacts) -> list[str]:
    """Every name a certificate for `facts` would carry: the CN, then each SAN's value."""
    names = [facts.common_name] if facts.common_name else []
    return names + [san.value for san in facts.sans if san.value not in names]


def name_in_scope(name: str, patterns: tuple[str, ...]) -> bool:
    lowered = name.lower()
    # a pattern without wildcards (ACME's order names, glob-escaped) matches only itself: no
    # regular expression compiled for each new name
    return any(lowered == p.lower() if not _GLOB_CHARS.intersection(p) else fnmatch.fnmatchcase(lowered, p.lower())
               for p in patterns)


_GLOB_CHARS = frozenset("*?[")


class NameOutOfScope(PolicyViolation):
    """A name the credential does not authorize (EST answers 403; SCEP and ACME as any
    PolicyViolation)."""


def check_scope(facts: CsrFacts, auth: Authorization) -> None:
    """Step 1: NameOutOfScope naming the first name outside the authorization's scope."""
    for scope, what in ((auth.names, "authorizes"), (auth.bound_names, "is bound to")):
        if scope is None:
            continue
        for name in names_of(facts):
            if not name_in_scope(name, scope):
                raise NameOutOfScope(f"the name {name[:80]!r} is outside the subject names this "
                                      f"{_credential(auth)} {what} ({', '.join(scope)[:200]})")


def _credential(auth: Authorization) -> str:
    return {"challenge": "challenge", "renewal": "renewal", "acme-account": "ACME account",
            "tls-client": "client certificate"}[auth.kind]


class Pipeline:
    """One protocol-neutral enrollment path (the registration authority)."""

    def __init__(self, enrollment: EnrollmentService, external_check: ExternalCheck | None = None,
                 approval: ApprovalPolicy = ApprovalPolicy(),
                 default_profiles: dict[str, str] | None = None, renewal_profile: str = "keep"):
        if renewal_profile not in RENEWAL_PROFILE_MODES:
            raise ValueError(f"renewal_profile must be one of {', '.join(RENEWAL_PROFILE_MODES)}")
        self.enrollment = enrollment
        self.external_check = external_check or ExternalCheck()
        self.approval = approval
        #: the profile of a protocol's requests whose authorization names none
        self.default_profiles = dict(default_profiles or {})
        self.renewal_profile = renewal_profile

    async def enroll(self, auth: Authorization, csr: CsrRequest, finish=None) -> Decision:
        """`finish(cert)`: see EnrollmentService.issue (its result is `decision.issued.reply`)."""
        return await self.complete(await self.authorize(auth, csr), finish=finish)

    async def profile_for(self, auth: Authorization) -> Profile:
        """Step 2. A renewal keeps the profile of the certificate it renews (an ACME `agent`
        certificate renewed over SCEP stays clientAuth) unless `renewal_profile = default`, or
        the profile is one the server keeps for itself (admin, ocsp): then the protocol's."""
        if auth.profile:
            return profile_named(auth.profile)
        if auth.renewal_of and self.renewal_profile == "keep":
            old = auth.renewal_record
            if old is None or old.serial != auth.renewal_of:
                try:
                    old = await self.enrollment.store.get_certificate(auth.renewal_of)
                except StoreNotFound:
                    old = None  # signed by our CA key before the inventory existed
            # the server's own profiles (admin, ocsp) are never extended by a client's renewal
            if old is not None and old.profile in ENROLLMENT_PROFILES:
                return profile_named(old.profile)
        return profile_named(self.default_profiles.get(auth.protocol, "device"))

    async def authorize(self, auth: Authorization, csr: CsrRequest) -> Approved:
        """Steps 1-3; raises the ScepdError that refuses the request. Stores nothing."""
        check_scope(csr.facts, auth)
        profile = await self.profile_for(auth)
        request = self.enrollment.approve(csr.facts, profile, csr.window, allow_wildcard=auth.allow_wildcard,
                                          requested_subject=auth.protocol in REQUESTED_SUBJECT_PROTOCOLS)
        return Approved(auth, csr, request)

    async def complete(self, approved: Approved, finish=None, also=None) -> Decision:
        """Steps 4-6: external check, approval, issuance (with its audit record). `finish`,
        `also`: see EnrollmentService.issue."""
        auth, csr, request = approved.authorization, approved.csr, approved.request
        facts = csr.facts
        if self.external_check.enabled:
            await self.external_check.check(CheckRequest(
                csr_pem=pem_csr(csr.csr_der), challenge=auth.presented_challenge,
                transaction_id=auth.transaction_id, common_name=facts.common_name,
                sans=tuple(str(s) for s in facts.sans), protocol=auth.protocol,
                renewal_of=auth.renewal_of, profile=request.profile.name, authorization=auth.kind))
        if auth.renewal_of is None and self.approval.requires(auth.protocol, request.profile.name):
            pending = await self.enrollment.create_pending(
                request, auth.grant, protocol=auth.protocol, transaction_id=auth.transaction_id or "",
                requester=auth.requester, spki_sha256=facts.spki_sha256,
                signer_spki_sha256=csr.signer_spki_sha256 or facts.spki_sha256, csr_der=csr.csr_der)
            return Decision(pending=pending)
        issued = await self.enrollment.issue(
            request, auth.grant, protocol=auth.protocol, transaction_id=auth.transaction_id,
            requester=auth.requester, spki_sha256=facts.spki_sha256, renewal_of=auth.renewal_of,
            finish=finish, also=also)
        return Decision(issued=issued)


def pem_csr(csr_der: bytes) -> str:
    b64 = base64.b64encode(csr_der).decode()
    return "-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(
        b64[i:i + 64] for i in range(0, len(b64), 64)) + "\n-----END CERTIFICATE REQUEST-----\n"


def startup_warnings(config) -> list[str]:
    """What `serve` warns about once at start: deprecated keys, and a static challenge that
    authorizes any name while its profile includes serverAuth (whoever knows the shared secret
    could get a TLS server certificate for any DNS name, which ACME would make him prove)."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    warnings = list(config.deprecations)
    scep = config.scep
    if scep.static_challenge and not scep.static_challenge_names.strip():
        try:
            profile = profile_named(scep.profile)
        except PolicyViolation:
            profile = None
        if profile is not None and ExtendedKeyUsageOID.SERVER_AUTH in profile.extended_key_usages:
            warnings.append(f"the static challenge authorizes any name and [scep] profile = "
                            f"{profile.name!r} includes serverAuth: set [scep] static_challenge_names "
                            "(e.g. \"*.devices.example\") or a clientAuth-only profile")
    return warnings


def approval_policy(cfg: Config) -> ApprovalPolicy:
    """`[policy] require_approval` as an ApprovalPolicy; ConfigError naming what is wrong."""
    try:
        return ApprovalPolicy.parse(cfg.policy.require_approval)
    except ScepdError as exc:  # an unknown profile:NAME
        raise ConfigError(f"[policy] require_approval: {exc.detail}") from None
    except ValueError as exc:  # a word that is neither a protocol nor profile:NAME
        raise ConfigError(str(exc)) from None
