"""Configuration: DIR/scepd.toml, then SCEPD_<SECTION>_<KEY> environment overrides.

Every key below can be overridden from the environment, e.g. SCEPD_SCEP_STATIC_CHALLENGE or
SCEPD_SCEP_LEGACY_ALGORITHMS=1. Unknown keys in the file are an error (typos must not silently
weaken security).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

CONFIG_NAME = "scepd.toml"
#: [server] log_level values
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ServerConfig:
    http: str = "127.0.0.1:8080"
    #: The URL clients use to reach this server; CRL distribution point and AIA URLs are built
    #: from it. Empty: derived from `http`.
    base_url: str = ""
    #: host:port of the HTTPS listener (ACME, admin API); empty = off
    https: str = ""
    #: host:port of the mutual-TLS listener for agents; empty = off
    mtls: str = ""
    #: extra DNS names / IPs for the server's own TLS certificate, comma separated
    tls_names: str = ""
    log_format: str = "text"
    #: one line per HTTP request on the scepd.access logger (secrets redacted)
    access_log: bool = True
    #: worker processes of `scepd serve` (0 = one per CPU core; 1 = a single process, no fork)
    workers: int = 0
    #: the serving processes' event loop: uvloop (libuv, the default) or asyncio (the standard
    #: library's); a restart applies a change
    event_loop: str = "uvloop"
    #: host:port of the private admin listener (admin API, TLS); empty = the admin API is on `https`
    admin: str = ""
    #: /metrics on the admin listener only (instead of the plain-HTTP listener); needs `admin`
    metrics_on_admin: bool = False
    #: debug, info, warning or error (`serve -v` = debug); SIGHUP applies a change
    log_level: str = "info"


@dataclass
class CAConfig:
    default_validity: str = "90d"
    #: Name of an environment variable holding the passphrase of the CA keys ("" = unencrypted).
    key_passphrase_env: str = "SCEPD_CA_KEY_PASSPHRASE"
    #: CRL validity (nextUpdate - thisUpdate); a new CRL is signed after half of it has passed.
    crl_validity: str = "24h"
    #: Sign OCSP responses with a delegated responder certificate (EKU OCSPSigning, ocsp-nocheck,
    #: issued and renewed by the server) instead of the issuing CA key.
    ocsp_delegated: bool = False


@dataclass
class ScepConfig:
    #: A shared challenge password; empty = none (one-time challenges only).
    static_challenge: str = ""
    #: Accept single DES and MD5 (forbidden by RFC 8894 §2.9). Off by default.
    legacy_algorithms: bool = False
    #: Require a challenge for initial enrollment.
    challenge_required: bool = True
    #: GetCACert answers with the chain (issuing CA first, then root) as a degenerate PKCS#7
    #: (RFC 8894 §4.2.1.2: "the CA has an intermediate"), so clients that verify the CertRep
    #: signer against GetCACert (certmonger) find a trust anchor. false: the issuing CA alone, DER.
    getcacert_chain: bool = True
    #: Advertise POSTPKIOperation and SCEPStandard (false: clients use GET, as with old NDES).
    advertise_post: bool = True
    profile: str = "device"
    max_body_bytes: int = 256 * 1024
    #: Maximum |signingTime - now| in seconds; 0 disables the check (devices without NTP).
    max_clock_skew: int = 0
    #: Deprecated: `[policy] require_approval = "scep"` (true here means that).
    require_approval: bool = False
    #: How long after expiry a certificate may still authorize its own renewal ("0" = not at all).
    renewal_grace: str = "0"
    #: Allow renewal with the same key (micromdm scepclient does that); default: new key required.
    renewal_same_key: bool = False
    #: allow | revoke (the renewed certificate is revoked as superseded) | refuse (a second valid
    #: certificate for the same subject is refused)
    duplicate_subjects: str = "allow"
    #: Deprecated: the `[policy]` keys of the same names (every protocol's requests).
    csr_check_command: str = ""
    csr_check_url: str = ""
    csr_check_timeout: int = 10
    csr_check_allow_http: bool = False
    #: Name patterns (comma separated) the static challenge authorizes: the CN and every SAN of
    #: a request it authenticates must match one. Empty = any name.
    static_challenge_names: str = ""


#: `[scep]` keys that moved to `[policy]` (they keep working, with a warning at start)
DEPRECATED_SCEP_KEYS = ("csr_check_command", "csr_check_url", "csr_check_timeout",
                        "csr_check_allow_http", "require_approval")


@dataclass
class AcmeConfig:
    #: Port the http-01 validator connects to (clients choose only where they listen).
    http01_port: int = 80
    #: Port the tls-alpn-01 validator connects to.
    tlsalpn01_port: int = 443
    #: Name -> address overrides for the http-01 and tls-alpn-01 validators, e.g. "*=127.0.0.1".
    resolve: str = ""
    #: DNS servers dns-01 asks, "addr[:port],..."; empty = the system resolver (/etc/resolv.conf).
    dns_resolver: str = ""
    #: Profile of orders that name none (draft-ietf-acme-profiles): server, agent or device.
    default_profile: str = "server"
    terms_of_service: str = ""
    #: Accounts must be bound with a single-use key from `scepd eab create`.
    eab_required: bool = False


@dataclass
class EstConfig:
    """EST (RFC 7030) on the HTTPS listener: /.well-known/est/ and /.well-known/est/<label>/."""

    #: Profile of requests under /.well-known/est/ (no label).
    profile: str = "device"
    #: Labels and the profile each selects, "label=profile,..." (e.g. "servers=server,iot=device");
    #: any other label is answered 404.
    labels: str = ""
    #: Key that serverkeygen generates: rsa2048, rsa3072, rsa4096, p256 or p384.
    serverkeygen_key: str = "rsa2048"
    #: csrattrs: OIDs (dotted) a CSR should carry, comma separated; empty = 204 No Content.
    csr_attributes: str = ""
    #: Retry-After (seconds) of a 202 while a request waits for approval.
    retry_after: int = 60
    max_body_bytes: int = 64 * 1024


@dataclass
class PolicyConfig:
    #: Largest RSA modulus accepted (CSRs, SCEP signer certificates, ACME account keys):
    #: 2048 to 8192; RSA keys of fewer than 2048 bits are always refused.
    max_rsa_bits: int = 4096
    #: keep: issue the CSR's subject DN exactly (SCEP); cn-only: CN=<the CSR's CN> alone.
    #: ACME subjects always come from the order's identifiers.
    subject: str = "keep"
    #: Subject attribute types allowed in keep mode, comma separated (names such as CN, O, OU,
    #: emailAddress, DC, UID, or dotted OIDs); empty = the RFC 5280/4519 set plus PKCS#9
    #: emailAddress/unstructuredName/unstructuredAddress, DC and UID. Others are refused.
    subject_attributes: str = ""
    #: External CSR check of every request (SCEP, ACME): an executable (JSON on stdin, exit 0 =
    #: allow) and/or a webhook URL (https; http only with csr_check_allow_http).
    csr_check_command: str = ""
    csr_check_url: str = ""
    csr_check_timeout: int = 10
    #: Allow an http:// csr_check_url (the payload carries the challenge password): off, https only.
    csr_check_allow_http: bool = False
    #: Initial enrollments that wait for `scepd pending approve`: "false", "true" (all), or a comma
    #: list of protocols (scep, acme, est) and profiles ("profile:server"). Renewals never wait.
    require_approval: str = "false"
    #: keep: a renewal keeps the profile of the certificate it renews; default: the protocol's
    renewal_profile: str = "keep"


@dataclass
class LimitsConfig:
    """Rate limits (scepd/ratelimit.py): "COUNT/PERIOD burst N" per key; "0" disables one."""

    #: false: no rate limit at all
    enabled: bool = True
    #: signed SCEP FAILUREs of PKCSReq/RenewalReq per client address (IPv6: per /64)
    scep_failures_per_address: str = "10/1m burst 20"
    #: signed SCEP FAILUREs of PKCSReq/RenewalReq per transactionID
    scep_failures_per_transaction: str = "5/1m burst 10"
    #: EST enrollments answered 400/401/403 per client address (IPv6: per /64)
    est_failures_per_address: str = "10/1m burst 20"
    acme_new_accounts_per_address: str = "20/1m burst 20"
    acme_new_orders_per_account: str = "300/1h burst 300"
    acme_failed_validations_per_account: str = "60/1h burst 30"
    acme_new_nonces_per_address: str = "100/1s burst 200"
    #: buckets kept per limit (least recently used dropped first): bounds memory under floods
    max_keys: int = 10000


@dataclass
class OcspConfig:
    #: Pre-signed responses kept in memory (least recently used dropped first); 0 = sign every
    #: response. About 1.3 KB each with an RSA-2048 CA (2 KB with a delegated responder certificate).
    cache_size: int = 100_000
    #: How often at most the revocation counter is read: a revocation made by another process
    #: (worker, `scepd certs revoke`) is served within this bound. "0" = on every request.
    status_poll: str = "1s"


@dataclass
class RetentionConfig:
    """What expires is purged on a schedule (scepd/ops/retention.py); certificates and audit
    rows never are."""

    #: how often the primary worker purges ("0" = never)
    interval: str = "1h"
    #: one-time challenges used or expired longer ago than this
    spent_challenges: str = "30d"
    #: pending requests decided, or left undecided, longer ago than this
    pending_requests: str = "90d"
    #: ACME orders expired longer ago than this, with their authorizations and challenges
    acme_orders: str = "30d"


@dataclass
class DatabaseConfig:
    #: SQLAlchemy async URL; empty = SQLite file DIR/scepd.db.
    url: str = ""


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    ca: CAConfig = field(default_factory=CAConfig)
    scep: ScepConfig = field(default_factory=ScepConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    acme: AcmeConfig = field(default_factory=AcmeConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    est: EstConfig = field(default_factory=EstConfig)
    ocsp: OcspConfig = field(default_factory=OcspConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    state_dir: Path = Path(".")
    #: deprecation warnings about the keys given (`serve` logs them once at start)
    deprecations: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return (self.server.base_url or f"http://{self.server.http}").rstrip("/")

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite+aiosqlite:///{self.state_dir / 'scepd.db'}"

    @property
    def sqlite_path(self) -> Path | None:
        """The database file when the database is SQLite (None for PostgreSQL)."""
        url = self.database_url
        if not url.startswith("sqlite") or ":///" not in url:
            return None
        return Path(url.split(":///", 1)[1])


#: the values of [server] event_loop (scepd/http/eventloop.py runs them)
EVENT_LOOPS = ("uvloop", "asyncio")


class ConfigError(ValueError):
    pass


_SECTIONS = {"server": ServerConfig, "ca": CAConfig, "scep": ScepConfig, "database": DatabaseConfig,
             "acme": AcmeConfig, "policy": PolicyConfig, "limits": LimitsConfig, "est": EstConfig,
             "ocsp": OcspConfig, "retention": RetentionConfig}


def _coerce(kind: type, raw: object, where: str) -> object:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{where}: expected a boolean, got {raw!r}")
    if kind is int:
        try:
            return int(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {raw!r}") from None
    return str(raw)


def load(state_dir: Path, environ: dict[str, str] | None = None) -> Config:
    environ = dict(os.environ if environ is None else environ)
    data: dict = {}
    path = state_dir / CONFIG_NAME
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cfg = Config(state_dir=state_dir)
    given: set[tuple[str, str]] = set()  # (section, key) set in the file or the environment
    for section, cls in _SECTIONS.items():
        target = getattr(cfg, section)
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        kinds = {name: {"bool": bool, "int": int, "str": str}[t if isinstance(t, str) else t.__name__]
                 for name, t in types.items()}
        for key, raw in (data.get(section) or {}).items():
            if key not in kinds:
                raise ConfigError(f"{path}: unknown key [{section}] {key}")
            setattr(target, key, _coerce(kinds[key], raw, f"[{section}] {key}"))
            given.add((section, key))
        for key, kind in kinds.items():
            env = f"SCEPD_{section.upper()}_{key.upper()}"
            if env in environ:
                setattr(target, key, _coerce(kind, environ[env], env))
                given.add((section, key))
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}")
    for key in DEPRECATED_SCEP_KEYS:
        if ("scep", key) not in given:
            continue
        cfg.deprecations.append(f"[scep] {key} (SCEPD_SCEP_{key.upper()}) is deprecated: use [policy] "
                                f"{key} (SCEPD_POLICY_{key.upper()}), which covers every protocol")
        # the [policy] key wins when it is given a value of its own (not its default, which
        # `scepd init` writes into every new file)
        if getattr(cfg.policy, key) == getattr(PolicyConfig(), key):
            value = getattr(cfg.scep, key)
            if key == "require_approval":
                value = "scep" if value else "false"
            setattr(cfg.policy, key, value)
    validate_url(cfg.policy.csr_check_url, cfg.policy.csr_check_allow_http)
    if cfg.policy.renewal_profile not in ("keep", "default"):
        raise ConfigError(f"[policy] renewal_profile must be keep or default, got {cfg.policy.renewal_profile!r}")
    if cfg.server.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"[server] log_level must be one of {', '.join(LOG_LEVELS)}, got {cfg.server.log_level!r}")
    if cfg.server.workers < 0:
        raise ConfigError(f"[server] workers must be 0 (one per CPU core) or more, got {cfg.server.workers}")
    if cfg.server.event_loop not in EVENT_LOOPS:
        raise ConfigError(f"[server] event_loop must be {' or '.join(EVENT_LOOPS)}, got {cfg.server.event_loop!r}")
    if not 2048 <= cfg.policy.max_rsa_bits <= 8192:
        raise ConfigError(f"[policy] max_rsa_bits must lie between 2048 and 8192, "
                          f"got {cfg.policy.max_rsa_bits}")
    return cfg


def safe_url(url: str) -> str:
    """The webhook URL for log lines: scheme, host, port and path (no credentials, no query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def validate_url(url: str, allow_http: bool) -> None:
    """The webhook gets the challenge password: https:// only, unless allow_http says otherwise."""
    if not url:
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError("csr_check_url is not a valid URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"csr_check_url must be an https:// URL, got {safe_url(url)!r}")
    if parts.scheme == "http" and not allow_http:
        raise ConfigError(f"csr_check_url {safe_url(url)} is plain http: the request payload carries the "
                          "challenge password. Use https://, or set csr_check_allow_http = true "
                          "(e.g. a webhook on the loopback interface)")


def render_default(http: str = "127.0.0.1:8080") -> str:
    """The config file `scepd init` writes: every key, commented."""
    return f"""# scepd configuration. Every key can be overridden by SCEPD_<SECTION>_<KEY>.

[server]
http = "{http}"
# URL clients reach this server at; CRL and AIA URLs in certificates are built from it.
base_url = ""
# HTTPS listener for ACME and the admin API, e.g. "127.0.0.1:8443"; empty = off
https = ""
# mutual-TLS listener for agents, e.g. "127.0.0.1:8444"; empty = off
mtls = ""
# extra names for the server's own TLS certificate (comma separated)
tls_names = ""
# "text" or "json" (one JSON object a line)
log_format = "text"
# one line per HTTP request (method, target with message= and secrets redacted, status, bytes,
# duration, request id, peer), on the scepd.access logger
access_log = true
# worker processes of `scepd serve`; 0 = one per CPU core, 1 = a single process
workers = 0
# the serving processes' event loop: "uvloop" (libuv; faster) or "asyncio" (the standard library's)
event_loop = "uvloop"
# private admin listener (admin API over TLS), e.g. "127.0.0.1:8445"; empty = the admin API is
# served on the HTTPS listener
admin = ""
# true: /metrics only on the admin listener, not on the plain-HTTP one
metrics_on_admin = false
# debug, info, warning or error; `kill -HUP` applies a change
log_level = "info"

[ca]
default_validity = "90d"
# environment variable holding the CA key passphrase (keys are encrypted when it is set at init)
key_passphrase_env = "SCEPD_CA_KEY_PASSPHRASE"
# CRL validity (nextUpdate); a new CRL is published after half of it, and on every revocation
crl_validity = "24h"
# sign OCSP responses with a delegated responder certificate instead of the CA key
ocsp_delegated = false

[scep]
# shared challenge password; empty = none (use `scepd challenge create` one-time challenges)
static_challenge = ""
# accept single DES and MD5, which RFC 8894 forbids; only for old devices
legacy_algorithms = false
challenge_required = true
# GetCACert returns issuing CA + root (PKCS#7); false = issuing CA only (DER)
getcacert_chain = true
# advertise POSTPKIOperation/SCEPStandard; false makes clients use GET
advertise_post = true
profile = "device"
max_body_bytes = {256 * 1024}
# maximum signingTime skew in seconds; 0 = not checked
max_clock_skew = 0
# how long after expiry a certificate may still authorize its renewal ("0", "7d", ...)
renewal_grace = "0"
# allow renewal with the same key (micromdm scepclient renews that way)
renewal_same_key = false
# allow | revoke (renewed certificate revoked as superseded) | refuse (one valid cert per subject)
duplicate_subjects = "allow"
# name patterns the static challenge authorizes (comma separated; CN and every SAN must match
# one), e.g. "*.devices.example"; empty = any name
static_challenge_names = ""

[acme]
# ports the http-01 and tls-alpn-01 validators connect to; name=address overrides
# ("*=127.0.0.1") for labs
http01_port = 80
tlsalpn01_port = 443
resolve = ""
# DNS servers dns-01 queries ("10.0.0.53,127.0.0.1:5353"); empty = /etc/resolv.conf
dns_resolver = ""
# profile of orders naming none: server (serverAuth), agent (clientAuth), device (both)
default_profile = "server"
terms_of_service = ""
# accounts must be bound with a single-use key from `scepd eab create`
eab_required = false

[policy]
# largest RSA key accepted in CSRs, SCEP signer certificates and ACME account keys (2048..8192);
# RSA exponents must be odd, 3 < e < 2^32; EC keys P-256, P-384, P-521 (Ed25519 for ACME accounts)
max_rsa_bits = 4096
# subject DN of SCEP certificates: keep (as in the CSR: same RDNs, order and string types) or
# cn-only (CN alone). ACME certificates always carry the order's names.
subject = "keep"
# attribute types allowed in a kept subject, e.g. "CN, O, OU, C"; empty = CN C O OU L ST street
# serialNumber title surname givenName initials generationQualifier dnQualifier pseudonym
# postalCode postalAddress businessCategory name description postOfficeBox
# physicalDeliveryOfficeName telephoneNumber houseIdentifier organizationIdentifier
# emailAddress unstructuredName unstructuredAddress DC UID. Any other type is refused (badRequest).
subject_attributes = ""
# external CSR check of every request (SCEP and ACME): executable (JSON on stdin; exit 0 allows,
# its first output line is the reason) and/or webhook URL
csr_check_command = ""
csr_check_url = ""
csr_check_timeout = 10
# the webhook receives the challenge password: http:// URLs are refused unless this is true
csr_check_allow_http = false
# initial enrollments that wait for `scepd pending approve`: false, true (all), or a list of
# protocols and profiles, e.g. "scep, profile:server". Renewals never wait.
require_approval = "false"
# keep: a renewal keeps the profile of the certificate it renews; default: the protocol's profile
renewal_profile = "keep"

[est]
# EST (RFC 7030) on the HTTPS listener: https://HOST:PORT/.well-known/est/[LABEL/]
# profile of requests without a label
profile = "device"
# labels and the profile each selects, e.g. "servers=server, iot=device"; other labels are 404
labels = ""
# key serverkeygen generates: rsa2048, rsa3072, rsa4096, p256, p384
serverkeygen_key = "rsa2048"
# OIDs csrattrs asks for (comma separated, dotted); empty = 204 No Content
csr_attributes = ""
# Retry-After (seconds) of a 202 while a request waits for approval
retry_after = 60
max_body_bytes = 65536

[limits]
# rate limits, "COUNT/PERIOD burst N" (period s, m, h, d, w; burst defaults to COUNT); "0" disables one.
# Refused requests get ACME 429 rateLimited with Retry-After, or a signed SCEP FAILURE (badRequest).
enabled = true
# failed SCEP enrollments (PKCSReq/RenewalReq answered FAILURE) per client address (IPv6: per /64)
scep_failures_per_address = "10/1m burst 20"
# ...and per transactionID
scep_failures_per_transaction = "5/1m burst 10"
# EST enrollments answered 400/401/403 per client address
est_failures_per_address = "10/1m burst 20"
acme_new_accounts_per_address = "20/1m burst 20"
acme_new_orders_per_account = "300/1h burst 300"
# failed challenge validations per account; over it, challenge responses are refused
acme_failed_validations_per_account = "60/1h burst 30"
acme_new_nonces_per_address = "100/1s burst 200"
# buckets kept per limit (least recently used dropped first): bounds memory
max_keys = 10000

[ocsp]
# pre-signed responses (requests without a nonce) kept in memory, least recently used dropped
# first; about 1.3 KB each (2 KB with ocsp_delegated); 0 = sign every response
cache_size = 100000
# a revocation by another process (worker, CLI) is served within this bound ("0" = every request)
status_poll = "1s"

[retention]
# expired rows purged by the primary worker every interval ("0" = never); certificates and audit
# rows are never purged. Expired ACME nonces go at once.
interval = "1h"
spent_challenges = "30d"
pending_requests = "90d"
acme_orders = "30d"

[database]
# empty = SQLite file in the state directory; e.g. postgresql+asyncpg://user@host/db
url = ""
"""


def parse_hostport(text: str) -> tuple[str, int]:
    """'host:port' (IPv6 in brackets; an empty host is 127.0.0.1); ConfigError otherwise."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected host:port, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> dt.timedelta:
    """'90d', '1h', '30m', '45s', '2w'; a bare number is seconds."""
    m = _DURATION.match(text or "")
    if not m:
        raise ConfigError(f"not a duration: {text!r} (use e.g. 90d, 12h, 30m)")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return dt.timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit])
