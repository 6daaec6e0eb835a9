"""The enrollment pipeline (scepd/pipeline.py): the order of its checks, each refusal, the
profile rule for renewals, approval per protocol or profile, and the configuration around it."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from scepd import config as config_mod
from scepd.enroll.challenges import ChallengeGrant
from scepd.cli import main
from scepd.config import ConfigError
from scepd.ca.csr import decode_csr
from scepd.errors import BadPublicKey, ExternalCheckDenied, PolicyViolation
from scepd.enroll.pipeline import ApprovalPolicy, Authorization, CsrRequest, Pipeline, approval_policy, startup_warnings

from .helpers import make_csr, rsa_key


class RecordingCheck:
    """An external check that records what it saw and allows, or denies with a reason."""

    enabled = True

    def __init__(self, deny: str | None = None):
        self.deny = deny
        self.seen = []

    async def check(self, req) -> None:
        self.seen.append(req)
        if self.deny:
            raise ExternalCheckDenied(f"denied by the external CSR check: {self.deny}")


def csr(cn="dev-1.example", sans=(), key_index=1, key=None) -> CsrRequest:
    der = make_csr(key or rsa_key(key_index), cn, None, [x509.DNSName(n) for n in sans] or None)
    return CsrRequest(decode_csr(der), der)


def challenge(**kw) -> Authorization:
    return Authorization("challenge", protocol="scep", challenge_kind="one-time", transaction_id="T1", **kw)


def pipeline(services, **kw) -> Pipeline:
    kw.setdefault("default_profiles", {"scep": "device", "acme": "server"})
    return Pipeline(services.enrollment, **kw)


# --- 1. name scope ------------------------------------------------------------------------------

async def test_a_san_outside_the_scope_is_refused_by_name_before_anything_else(services):
    check = RecordingCheck()
    p = pipeline(services, external_check=check, approval=ApprovalPolicy(every=True))
    with pytest.raises(PolicyViolation, match="'www.other.example' is outside") as exc:
        await p.enroll(challenge(names=("dev-*.example",)), csr(sans=["www.other.example"]))
    assert "dev-*.example" in exc.value.detail
    assert check.seen == [] and await services.store.list_pending(None) == []  # nothing ran after
    with pytest.raises(PolicyViolation, match="'prod-1.example' is outside"):  # the CN too
        await p.enroll(challenge(names=("dev-*.example",)), csr("prod-1.example"))
    decision = await p.enroll(challenge(names=("dev-*.example", "*.dev.example")),
                              csr("DEV-1.example", sans=["dev-1.example", "a.dev.example"]))
    assert decision.pending is not None  # inside the scope (case-insensitively): on to approval


async def test_unrestricted_scope_and_the_bound_scope(services):
    p = pipeline(services)
    decision = await p.enroll(challenge(), csr("anything.example", sans=["www.other.example"]))
    assert decision.issued is not None
    acme = Authorization("acme-account", protocol="acme", names=("[*].w.example", "w.example"),
                         bound_names=("*.w.example",), allow_wildcard=True, transaction_id="O1")
    with pytest.raises(PolicyViolation, match="'w.example' is outside the subject names this ACME "
                                              "account is bound to"):
        await p.authorize(acme, csr(None, sans=["*.w.example", "w.example"]))
    with pytest.raises(PolicyViolation, match="'x.w.example' is outside"):  # literal, not a pattern
        await p.authorize(acme, csr(None, sans=["x.w.example"]))


# --- 2. profile ---------------------------------------------------------------------------------

def ekus(cert) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


async def test_profile_from_authorization_protocol_default_and_renewal(services):
    p = pipeline(services)
    d = await p.enroll(challenge(profile="agent"), csr())
    assert d.issued.record.profile == "agent" and ekus(d.issued.cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    d = await p.enroll(challenge(), csr(key_index=2))
    assert d.issued.record.profile == "device"  # [scep] profile
    old = (await p.enroll(Authorization("acme-account", protocol="acme", profile="agent",
                                        transaction_id="O1"), csr(key_index=3))).issued.record
    renewal = Authorization("renewal", protocol="scep", renewal_of=old.serial, transaction_id="T9")
    d = await p.enroll(renewal, csr(key_index=4))
    assert d.issued.record.profile == "agent" and ekus(d.issued.cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    d = await pipeline(services, renewal_profile="default").enroll(renewal, csr(key_index=5))
    assert d.issued.record.profile == "device"
    # an admin API certificate renewed by its holder does not stay an admin certificate
    admin = (await p.enroll(Authorization("tls-client", protocol="scep", profile="admin", transaction_id="A1"),
                            csr(key_index=6))).issued.record
    d = await p.enroll(Authorization("renewal", protocol="scep", renewal_of=admin.serial, transaction_id="A2"),
                       csr(key_index=7))
    assert d.issued.record.profile == "device"
    with pytest.raises(PolicyViolation, match="unknown profile"):
        await p.enroll(challenge(profile="nope"), csr())


# --- 3. policy before 4. the external check; 5. approval; 6. issuance ----------------------------

async def test_policy_refusal_comes_before_the_external_check(services):
    check = RecordingCheck()
    p = pipeline(services, external_check=check)
    with pytest.raises(BadPublicKey):
        await p.enroll(challenge(), csr(key=rsa_key(7, bits=1024)))
    with pytest.raises(PolicyViolation, match="invalid DNS name"):
        await p.enroll(challenge(), csr(sans=["bad_name.example"]))
    assert check.seen == []


async def test_external_check_sees_the_protocol_and_its_denial_stops_everything(services):
    check = RecordingCheck(deny="not in the CMDB")
    p = pipeline(services, external_check=check, approval=ApprovalPolicy(every=True))
    acme = Authorization("acme-account", protocol="acme", names=("web.example",), transaction_id="O7")
    with pytest.raises(ExternalCheckDenied, match="not in the CMDB"):
        await p.enroll(acme, csr(None, sans=["web.example"]))
    [seen] = check.seen
    assert (seen.protocol, seen.profile, seen.authorization, seen.transaction_id, seen.challenge) == \
        ("acme", "server", "acme-account", "O7", None)
    assert await services.store.list_pending(None) == []
    certs, pendings = await services.store.find_transaction("O7")
    assert certs == [] and pendings == []


async def test_approval_per_protocol_and_profile_renewals_never_wait(services):
    p = pipeline(services, approval=ApprovalPolicy.parse("acme, profile:agent"))
    assert (await p.enroll(challenge(), csr())).issued is not None  # scep, device: no
    waits = await p.enroll(challenge(profile="agent"), csr(key_index=2))  # profile agent: waits
    assert waits.pending is not None and waits.pending.profile == "agent" and waits.pending.protocol == "scep"
    acme = Authorization("acme-account", protocol="acme", names=("web.example",), transaction_id="O2")
    waits = await p.enroll(acme, csr(None, sans=["web.example"], key_index=3))
    assert waits.pending is not None and waits.pending.transaction_id == "O2"
    issued = await services.enrollment.approve_pending(waits.pending.id, "test")
    assert issued.record.protocol == "acme" and issued.record.transaction_id == "O2"
    renewal = Authorization("renewal", protocol="acme", renewal_of=issued.record.serial, transaction_id="O3")
    assert (await p.enroll(renewal, csr(None, sans=["web.example"], key_index=4))).issued is not None


async def test_one_time_challenge_is_consumed_by_the_issuance(services):
    import datetime as dt
    secret = await services.challenges.create(dt.timedelta(hours=1), names=["dev-*"], profile="agent")
    grant = await services.challenges.verify(secret)
    assert (grant.kind, grant.names, grant.profile) == ("one-time", ("dev-*",), "agent")
    p = pipeline(services)
    auth = challenge(names=grant.names, profile=grant.profile, challenge_id=grant.one_time_id)
    with pytest.raises(PolicyViolation):  # a refusal spends nothing
        await p.enroll(auth, csr("prod-1"))
    assert (await p.enroll(auth, csr("dev-1"))).issued.record.profile == "agent"
    with pytest.raises(Exception, match="already used"):
        await services.challenges.verify(secret)


def test_approval_policy_parse():
    assert not ApprovalPolicy.parse("false").requires("scep", "device")
    assert not ApprovalPolicy.parse("").requires("acme", "server")
    assert ApprovalPolicy.parse("true").requires("acme", "server")
    assert ApprovalPolicy.parse(True).requires("scep", "device")
    mixed = ApprovalPolicy.parse("scep, profile:server")
    assert mixed.requires("scep", "agent") and mixed.requires("acme", "server")
    assert not mixed.requires("acme", "agent")
    for bad, message in (("sometimes", "neither a protocol"), ("profile:gold", "unknown profile")):
        with pytest.raises(Exception, match=message):
            ApprovalPolicy.parse(bad)


# --- configuration ------------------------------------------------------------------------------

def test_policy_keys_and_deprecated_scep_keys(state_dir):
    env = {"SCEPD_SCEP_CSR_CHECK_COMMAND": "/bin/check", "SCEPD_SCEP_REQUIRE_APPROVAL": "true",
           "SCEPD_SCEP_CSR_CHECK_TIMEOUT": "3"}
    cfg = config_mod.load(state_dir, environ=env)
    assert (cfg.policy.csr_check_command, cfg.policy.require_approval, cfg.policy.csr_check_timeout) == \
        ("/bin/check", "scep", 3)
    assert len(cfg.deprecations) == 3 and all("deprecated" in d and "[policy]" in d for d in cfg.deprecations)
    assert approval_policy(cfg) == ApprovalPolicy(protocols=frozenset({"scep"}))
    # the [policy] key wins over the deprecated one
    cfg = config_mod.load(state_dir, environ={**env, "SCEPD_POLICY_CSR_CHECK_COMMAND": "/bin/other",
                                              "SCEPD_POLICY_REQUIRE_APPROVAL": "acme"})
    assert (cfg.policy.csr_check_command, cfg.policy.require_approval) == ("/bin/other", "acme")
    cfg = config_mod.load(state_dir, environ={"SCEPD_POLICY_REQUIRE_APPROVAL": "acme,profile:server"})
    assert cfg.deprecations == [] and approval_policy(cfg).requires("scep", "server")
    with pytest.raises(ConfigError, match="require_approval"):
        approval_policy(config_mod.load(state_dir, environ={"SCEPD_POLICY_REQUIRE_APPROVAL": "maybe"}))
    with pytest.raises(ConfigError, match="renewal_profile"):
        config_mod.load(state_dir, environ={"SCEPD_POLICY_RENEWAL_PROFILE": "upgrade"})
    with pytest.raises(ConfigError, match="csr_check_allow_http"):
        config_mod.load(state_dir, environ={"SCEPD_POLICY_CSR_CHECK_URL": "http://127.0.0.1:9/c"})


def test_serve_warns_about_an_unrestricted_static_challenge_with_server_auth(state_dir):
    def warnings(**env):
        return startup_warnings(config_mod.load(state_dir, environ=env))
    assert warnings() == []
    [warning] = warnings(SCEPD_SCEP_STATIC_CHALLENGE="s3cret")  # [scep] profile = device: serverAuth
    assert "static_challenge_names" in warning and "serverAuth" in warning
    assert warnings(SCEPD_SCEP_STATIC_CHALLENGE="s3cret", SCEPD_SCEP_STATIC_CHALLENGE_NAMES="*.dev.example") == []
    assert warnings(SCEPD_SCEP_STATIC_CHALLENGE="s3cret", SCEPD_SCEP_PROFILE="agent") == []
    [deprecated] = warnings(SCEPD_SCEP_CSR_CHECK_URL="https://hooks.example/c")
    assert "[scep] csr_check_url" in deprecated


async def test_static_challenge_names_scope_the_static_challenge(make_services):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_STATIC_CHALLENGE_NAMES": "*.dev.example, dev-*"})
    grant = await services.challenges.verify("static-secret")
    assert grant == ChallengeGrant("static", names=("*.dev.example", "dev-*"))


def test_cli_challenge_create_names_profile_and_cn_alias(state_dir):
    import asyncio

    from scepd.http.app import open_services
    from scepd.enroll.challenges import secret_hash
    runner = CliRunner()
    out = runner.invoke(main, ["challenge", "create", "--state-dir", str(state_dir), "--names", "dev-*.example",
                               "--names", "*.dev.example", "--profile", "agent"])
    assert out.exit_code == 0, out.output
    alias = runner.invoke(main, ["challenge", "create", "--state-dir", str(state_dir), "--cn", "router-*"])
    assert alias.exit_code == 0, alias.output
    for profile in ("gold", "admin", "ocsp"):  # unknown, or made by the server itself only
        bad = runner.invoke(main, ["challenge", "create", "--state-dir", str(state_dir), "--profile", profile])
        assert bad.exit_code == 1 and "cannot be granted" in bad.output and "Traceback" not in bad.output

    async def records():
        services = await open_services(config_mod.load(state_dir, environ={}))
        try:
            return [await services.store.find_challenge(secret_hash(r.output.strip())) for r in (out, alias)]
        finally:
            await services.close()
    scoped, aliased = asyncio.run(records())
    assert (scoped.names, scoped.profile) == (("dev-*.example", "*.dev.example"), "agent")
    assert (aliased.names, aliased.profile) == (("router-*",), None)


async def test_a_challenge_row_from_before_the_names_column_reads_its_cn_pattern(services, clock):
    import datetime as dt

    from scepd.enroll.challenges import secret_hash
    async with services.store.transaction() as tx:  # as the old code wrote it
        await tx.insert_challenge(secret_hash("old-one"), "router-*", clock.now(),
                                  clock.now() + dt.timedelta(hours=1))
    grant = await services.challenges.verify("old-one")
    assert grant.names == ("router-*",) and grant.profile is None
