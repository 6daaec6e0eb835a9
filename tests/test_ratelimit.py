"""Rate limits (scepd/ratelimit.py): the token bucket under a fixed clock, its memory bound,
the [limits] config, and the answers: a signed SCEP FAILURE for failed enrollments per address
and per transactionID, ACME 429 rateLimited with Retry-After for newNonce, newAccount, newOrder
and failed validations; every refusal counted in /metrics."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scepd import config as config_mod
from scepd.http.app import create_app, create_https_app
from scepd.clock import FixedClock
from scepd.errors import FailInfo, RateLimited, mapping_for
from scepd.ops.ratelimit import LIMITS, Rate, RateLimiter, address_key
from scepd.scep import der, wire

from .helpers import make_csr, pkcs_req, rsa_key, self_signed
from .test_acme_ari import path_of, responder  # noqa: F401  (fixture)
from .test_acme_jws import P, Acme

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone.utc)


def limiter(clock, max_keys=10_000, **rates: str) -> RateLimiter:
    return RateLimiter({name: Rate.parse(text) for name, text in rates.items()}, clock, max_keys)


# --- the bucket -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,rate", [
    ("10/1m burst 20", Rate(10, 60.0, 20)),
    ("100/s", Rate(100, 1.0, 100)),
    ("300/1h, burst 50", Rate(300, 3600.0, 50)),
    ("5 / 2d BURST 7", Rate(5, 172800.0, 7)),
    ("0", None), ("off", None), ("", None), ("0/1m", None),
])
def test_rate_parse(text, rate):
    assert Rate.parse(text) == rate


@pytest.mark.parametrize("text", ["10", "10/", "ten/1m", "10/1y", "10/1m burst", "10/1m burst 0", "-1/1m"])
def test_rate_parse_rejects_junk(text):
    with pytest.raises(ValueError):
        Rate.parse(text)


def test_burst_then_refill_by_the_clock():
    clock = FixedClock(T0)
    lim = limiter(clock, acme_new_orders_per_account="2/1m burst 3")
    for _ in range(3):  # the burst
        lim.acquire("acme_new_orders_per_account", "acct-1")
    with pytest.raises(RateLimited) as exc:
        lim.acquire("acme_new_orders_per_account", "acct-1")
    assert exc.value.retry_after == 30 and exc.value.limit == "acme_new_orders_per_account"
    assert "retry in 30 s" in exc.value.detail
    lim.acquire("acme_new_orders_per_account", "acct-2")  # other keys are untouched
    clock.advance(dt.timedelta(seconds=29))
    with pytest.raises(RateLimited) as exc:
        lim.acquire("acme_new_orders_per_account", "acct-1")
    assert exc.value.retry_after == 1
    clock.advance(dt.timedelta(seconds=1))
    lim.acquire("acme_new_orders_per_account", "acct-1")  # one token refilled in 30 s
    clock.advance(dt.timedelta(hours=5))  # refills up to the burst, never beyond
    for _ in range(3):
        lim.acquire("acme_new_orders_per_account", "acct-1")
    with pytest.raises(RateLimited):
        lim.acquire("acme_new_orders_per_account", "acct-1")


def test_failures_are_spent_and_checked_refusals_take_nothing():
    clock = FixedClock(T0)
    lim = limiter(clock, scep_failures_per_address="1/10s burst 2")
    name = "scep_failures_per_address"
    lim.ensure(name, "10.0.0.1")
    assert lim.tracked(name) == 0  # a check alone stores nothing
    lim.spend(name, "10.0.0.1")
    lim.ensure(name, "10.0.0.1")
    for _ in range(5):  # never below zero
        lim.spend(name, "10.0.0.1")
    for _ in range(3):  # refusals do not push the retry further out
        with pytest.raises(RateLimited) as exc:
            lim.ensure(name, "10.0.0.1")
        assert exc.value.retry_after == 10
    clock.advance(dt.timedelta(seconds=10))
    lim.ensure(name, "10.0.0.1")


def test_refund_gives_back_an_acquired_token():
    lim = limiter(FixedClock(T0), acme_new_accounts_per_address="1/1h")
    name = "acme_new_accounts_per_address"
    lim.acquire(name, "a")
    lim.refund(name, "a")
    lim.refund(name, "a")  # capped at the burst
    lim.acquire(name, "a")
    with pytest.raises(RateLimited):
        lim.acquire(name, "a")


def test_disabled_and_unconfigured_limits_allow_everything():
    lim = limiter(FixedClock(T0), acme_new_nonces_per_address="0")
    for _ in range(1000):
        lim.acquire("acme_new_nonces_per_address", "a")
        lim.spend("scep_failures_per_address", "a")
        lim.ensure("scep_failures_per_address", "a")
    assert lim.names() == []


def test_memory_is_bounded_when_keys_cycle():
    """An attacker cycling addresses: never more than max_keys buckets, the busiest keys kept."""
    clock = FixedClock(T0)
    lim = limiter(clock, max_keys=100, scep_failures_per_address="1/1h burst 2")
    name = "scep_failures_per_address"
    for i in range(5000):
        lim.spend(name, f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        if i % 10 == 0:
            lim.spend(name, "192.0.2.1")  # a persistent attacker stays recently used
            lim.spend(name, "192.0.2.1")
        assert lim.tracked(name) <= 100
    assert lim.tracked(name) == 100
    with pytest.raises(RateLimited):
        lim.ensure(name, "192.0.2.1")


def test_idle_buckets_that_refilled_are_dropped():
    clock = FixedClock(T0)
    lim = limiter(clock, acme_new_nonces_per_address="10/1s burst 10")
    name = "acme_new_nonces_per_address"
    for i in range(50):
        lim.acquire(name, f"10.0.0.{i}")
    assert lim.tracked(name) == 50
    clock.advance(dt.timedelta(seconds=1))  # all full again: the same as no bucket
    for i in range(30):
        lim.acquire(name, f"10.0.1.{i}")
    assert lim.tracked(name) == 30  # two old ones dropped per new key, until none is left


def test_address_keys_group_ipv6_by_64():
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key(None) == "?"


def test_refusal_maps_to_acme_429_and_scep_bad_request():
    m = mapping_for(RateLimited("x", 5, "acme_new_nonces_per_address"))
    assert (m.acme_type, m.http_status, m.fail_info) == (P + "rateLimited", 429, FailInfo.BAD_REQUEST)


# --- configuration --------------------------------------------------------------------------

def test_limits_config_defaults_env_and_errors(tmp_path):
    (tmp_path / "scepd.toml").write_text(config_mod.render_default())
    cfg = config_mod.load(tmp_path, environ={"SCEPD_LIMITS_ACME_NEW_ORDERS_PER_ACCOUNT": "5/1h burst 2",
                                             "SCEPD_LIMITS_ACME_NEW_NONCES_PER_ADDRESS": "0"})
    lim = RateLimiter.from_config(cfg.limits, FixedClock(T0))
    assert lim.rate("acme_new_orders_per_account") == Rate(5, 3600.0, 2)
    assert not lim.enabled("acme_new_nonces_per_address")
    assert lim.rate("scep_failures_per_address") == Rate(10, 60.0, 20)
    assert set(lim.names()) == set(LIMITS) - {"acme_new_nonces_per_address"}
    off = config_mod.load(tmp_path, environ={"SCEPD_LIMITS_ENABLED": "0"})
    assert RateLimiter.from_config(off.limits, FixedClock(T0)).names() == []
    bad = config_mod.load(tmp_path, environ={"SCEPD_LIMITS_SCEP_FAILURES_PER_ADDRESS": "lots"})
    with pytest.raises(config_mod.ConfigError, match="scep_failures_per_address"):
        RateLimiter.from_config(bad.limits, FixedClock(T0))


async def test_a_bad_limit_stops_the_server_from_starting(make_services):
    with pytest.raises(config_mod.ConfigError, match=r"\[limits\] acme_new_accounts_per_address"):
        await make_services({"SCEPD_LIMITS_ACME_NEW_ACCOUNTS_PER_ADDRESS": "10 per minute"})


# --- SCEP -----------------------------------------------------------------------------------

async def _metric(client, limit: str) -> float:
    text = await (await client.get("/metrics")).text()
    line = f'scepd_rate_limited_total{{limit="{limit}"}} '
    values = [float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)]
    assert values, f"{line} not in /metrics"
    return values[0]


async def _post(client, services, challenge: str, transaction_id: str | None = None, cn: str = "rl-1"):
    key = rsa_key(0)
    der, txid, _ = pkcs_req(services.ca_material.cert, key, make_csr(key, cn, challenge),
                            transaction_id=transaction_id, signer=(self_signed(key), key))
    resp = await client.post("/scep?operation=PKIOperation", data=der)
    assert resp.status == 200
    body = await resp.read()
    rep = wire.decode_cert_rep(body)
    assert rep.transaction_id == txid
    return rep, body


@pytest.fixture
async def scep_limited(aiohttp_client, make_services, clock):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_LIMITS_SCEP_FAILURES_PER_ADDRESS": "1/1m burst 3",
                                    "SCEPD_LIMITS_SCEP_FAILURES_PER_TRANSACTION": "0"})
    return await aiohttp_client(create_app(services)), services


async def test_scep_failed_attempts_per_address_get_a_signed_failure(scep_limited, clock, monkeypatch, tmp_path):
    client, services = scep_limited
    ok, _ = await _post(client, services, "static-secret", cn="rl-ok")
    assert ok.status == wire.PkiStatus.SUCCESS  # successes count for nothing
    for _ in range(3):  # the burst of failures: wrong challenge
        rep, _ = await _post(client, services, "wrong")
        assert rep.status == wire.PkiStatus.FAILURE and "challenge" in rep.fail_info_text.lower()
    opened = []
    real_open = wire.open_envelope
    monkeypatch.setattr(wire, "open_envelope", lambda *a: opened.append(1) or real_open(*a))
    for challenge in ("wrong", "static-secret"):  # limited: even the right challenge, any transactionID
        rep, body = await _post(client, services, challenge)
        assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_REQUEST
        assert rep.fail_info_text == "too many failed enrollment attempts from this address; retry in 60 s"
    assert opened == []  # refused before anything was decrypted
    # someone else's decoder: openssl verifies the CertRep's signature against our CA chain
    (tmp_path / "rep.der").write_bytes(body)
    (tmp_path / "chain.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                                  for c in services.ca_material.chain))
    out = subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-in", str(tmp_path / "rep.der"),
                          "-CAfile", str(tmp_path / "chain.pem"), "-purpose", "any", "-out", "/dev/null"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Verification successful" in out.stderr, out.stderr
    assert await _metric(client, "scep_failures_per_address") == 2
    # polls pass: a device whose request succeeded (or waits for approval) still gets its certificate
    ca = services.ca_material.cert
    poll, _, _ = pkcs_req(ca, rsa_key(0), der.seq(ca.subject.public_bytes(), x509.Name.from_rfc4514_string(
        "CN=rl-ok").public_bytes()), transaction_id=ok.transaction_id, message_type=wire.MessageType.CERT_POLL)
    rep = wire.decode_cert_rep(await (await client.post("/scep?operation=PKIOperation", data=poll)).read())
    assert rep.status == wire.PkiStatus.SUCCESS
    clock.advance(dt.timedelta(minutes=1))  # one failure forgiven per minute
    rep, _ = await _post(client, services, "static-secret", cn="rl-later")
    assert rep.status == wire.PkiStatus.SUCCESS
    rep, _ = await _post(client, services, "wrong")
    assert rep.status == wire.PkiStatus.FAILURE and "too many" not in rep.fail_info_text
    rep, _ = await _post(client, services, "static-secret", cn="rl-later")
    assert "too many failed enrollment attempts" in rep.fail_info_text


async def test_scep_envelope_failures_count_toward_the_limit(scep_limited):
    """Issue 11 item 1: forged envelopes (the padding-oracle probes) are failed attempts too."""
    client, services = scep_limited
    for _ in range(3):  # the envelope opens to something that is no CSR: the one no-oracle answer
        der, _, _ = pkcs_req(services.ca_material.cert, rsa_key(0), b"\x30\x03\x02\x01\x00garbage",
                             signer=(self_signed(rsa_key(0)), rsa_key(0)))
        rep = wire.decode_cert_rep(await (await client.post("/scep?operation=PKIOperation", data=der)).read())
        assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_MESSAGE_CHECK
    rep, _ = await _post(client, services, "static-secret", cn="rl-after-probes")
    assert rep.fail_info_text == "too many failed enrollment attempts from this address; retry in 60 s"


async def test_scep_failed_attempts_per_transaction(aiohttp_client, make_services):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_LIMITS_SCEP_FAILURES_PER_ADDRESS": "0",
                                    "SCEPD_LIMITS_SCEP_FAILURES_PER_TRANSACTION": "1/1h burst 2"})
    client = await aiohttp_client(create_app(services))
    for _ in range(2):
        rep, _ = await _post(client, services, "wrong", transaction_id="TXN-1")
        assert rep.status == wire.PkiStatus.FAILURE and "too many" not in rep.fail_info_text
    rep, _ = await _post(client, services, "static-secret", transaction_id="TXN-1")
    assert rep.fail_info_text == "too many failed attempts for this transactionID; retry in 3600 s"
    rep, _ = await _post(client, services, "static-secret", transaction_id="TXN-2")
    assert rep.status == wire.PkiStatus.SUCCESS
    assert await _metric(client, "scep_failures_per_transaction") == 1


# --- ACME -----------------------------------------------------------------------------------

async def _acme(aiohttp_client, make_services, env: dict, register: bool = True, **extra):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret", **env})
    client = await aiohttp_client(create_https_app(services))
    a = Acme(client, rsa_key(0))
    if register:
        await a.register()
    a.services = services
    return a


async def _limited(resp, retry_after: str):
    assert resp.status == 429 and resp.headers["Retry-After"] == retry_after
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body = await resp.json()
    assert body["type"] == P + "rateLimited" and body["status"] == 429
    assert f"retry in {retry_after} s" in body["detail"]


async def _acme_metric(acme, limit: str) -> float:
    from prometheus_client import generate_latest
    text = generate_latest(acme.services.metrics.registry).decode()
    line = f'scepd_rate_limited_total{{limit="{limit}"}} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


async def test_acme_new_nonce_per_address(aiohttp_client, make_services, clock):
    acme = await _acme(aiohttp_client, make_services, {"SCEPD_LIMITS_ACME_NEW_NONCES_PER_ADDRESS": "2/1s burst 3"},
                       register=False)
    for method in ("HEAD", "GET", "HEAD"):
        resp = await acme.client.request(method, "/acme/new-nonce")
        assert resp.status in (200, 204) and resp.headers["Replay-Nonce"]
    resp = await acme.client.get("/acme/new-nonce")
    await _limited(resp, "1")
    assert "Replay-Nonce" not in resp.headers and resp.headers["Cache-Control"] == "no-store"
    assert 'rel="index"' in resp.headers["Link"]
    assert (await acme.client.head("/acme/new-nonce")).status == 429
    clock.advance(dt.timedelta(milliseconds=500))
    assert (await acme.client.head("/acme/new-nonce")).status == 200
    assert await _acme_metric(acme, "acme_new_nonces_per_address") == 2


async def test_acme_new_accounts_per_address(aiohttp_client, make_services, clock):
    acme = await _acme(aiohttp_client, make_services, {"SCEPD_LIMITS_ACME_NEW_ACCOUNTS_PER_ADDRESS": "2/1h"})
    # looking up an existing account, or failing to create one, counts for nothing
    for _ in range(3):
        resp = await acme.post("/acme/new-account", {"onlyReturnExisting": True}, jwk=True)
        assert resp.status == 200
        resp = await acme.post("/acme/new-account", {"onlyReturnExisting": True}, jwk=True, key=rsa_key(3))
        assert (await resp.json())["type"] == P + "accountDoesNotExist"
    resp = await acme.post("/acme/new-account", {"termsOfServiceAgreed": True}, jwk=True, key=rsa_key(1))
    assert resp.status == 201
    resp = await acme.post("/acme/new-account", {"termsOfServiceAgreed": True}, jwk=True, key=rsa_key(2))
    await _limited(resp, "1800")
    assert "Replay-Nonce" in resp.headers
    resp = await acme.post("/acme/new-account", {}, jwk=True)  # the existing one is still found
    assert resp.status == 200 and resp.headers["Location"] == acme.kid
    clock.advance(dt.timedelta(minutes=30))
    resp = await acme.post("/acme/new-account", {"termsOfServiceAgreed": True}, jwk=True, key=rsa_key(2))
    assert resp.status == 201
    assert await _acme_metric(acme, "acme_new_accounts_per_address") == 1


async def test_acme_new_orders_per_account(aiohttp_client, make_services):
    acme = await _acme(aiohttp_client, make_services, {"SCEPD_LIMITS_ACME_NEW_ORDERS_PER_ACCOUNT": "2/1h"})
    order = {"identifiers": [{"type": "dns", "value": "rl.example.test"}]}
    resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "-bad-"}]})
    assert resp.status == 400  # refused orders count for nothing
    for _ in range(2):
        assert (await acme.post("/acme/new-order", order)).status == 201
    await _limited(await acme.post("/acme/new-order", order), "1800")
    other = Acme(acme.client, rsa_key(1))  # another account has its own bucket
    await other.register()
    assert (await other.post("/acme/new-order", order)).status == 201
    assert await _acme_metric(acme, "acme_new_orders_per_account") == 1


async def test_acme_failed_validations_per_account(aiohttp_client, make_services, responder):  # noqa: F811
    server, _tokens = responder  # knows no token: every http-01 validation fails
    acme = await _acme(aiohttp_client, make_services, {
        "SCEPD_ACME_HTTP01_PORT": str(server.port), "SCEPD_ACME_RESOLVE": "*=127.0.0.1",
        "SCEPD_LIMITS_ACME_FAILED_VALIDATIONS_PER_ACCOUNT": "1/1h burst 1"})
    from acme.server import ACME
    service = acme.client.server.app[ACME]

    async def challenge_of(name: str) -> str:
        resp = await acme.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": name}]})
        order = await resp.json()
        authz = await (await acme.post(path_of(order["authorizations"][0]), None)).json()
        return path_of(next(c["url"] for c in authz["challenges"] if c["type"] == "http-01"))

    first, second = await challenge_of("v1.example.test"), await challenge_of("v2.example.test")
    assert (await acme.post(first, {})).status == 200
    await asyncio.wait_for(asyncio.gather(*list(service._tasks)), 30)  # bounded: the validation ends
    assert (await (await acme.post(first, None)).json())["status"] == "invalid"
    await _limited(await acme.post(second, {}), "3600")
    assert (await (await acme.post(second, None)).json())["status"] == "pending"  # fetching still works
    other = Acme(acme.client, rsa_key(1))
    await other.register()
    resp = await other.post("/acme/new-order", {"identifiers": [{"type": "dns", "value": "v3.example.test"}]})
    authz = await (await other.post(path_of((await resp.json())["authorizations"][0]), None)).json()
    assert (await other.post(path_of(authz["challenges"][0]["url"]), {})).status == 200
    assert await _acme_metric(acme, "acme_failed_validations_per_account") == 1


# --- shared across worker processes ------------------------------------------------------------

@pytest.fixture
def shared_table(monkeypatch):
    """The table `serve --workers N` makes in its parent before forking (module state reset after)."""
    import scepd.ops.ratelimit as rl
    monkeypatch.setattr(rl, "_shared", None)
    return rl.share_across_processes(100)


def _in_child(fn) -> int:
    """Run fn() in a forked child; its exit code (0 when fn returned normally)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_workers_share_one_bucket_per_key(shared_table):
    """Tokens taken in one forked process are gone in another: a limit of 3 lets 3 requests
    through in all, not 3 per process; failures spent in a child count in the parent."""
    clock = FixedClock(T0)
    name = "acme_new_orders_per_account"
    parent = limiter(clock, **{name: "3/1h"})
    assert parent.shared
    assert _in_child(lambda: [limiter(clock, **{name: "3/1h"}).acquire(name, "acct") for _ in range(2)]) == 0
    parent.acquire(name, "acct")  # the third
    with pytest.raises(RateLimited):
        parent.acquire(name, "acct")
    assert _in_child(lambda: limiter(clock, **{name: "3/1h"}).acquire(name, "acct")) == 1  # refused there too
    parent.acquire(name, "other")  # another key, its own bucket
    failures = "scep_failures_per_address"
    assert _in_child(lambda: [limiter(clock, **{failures: "2/1h"}).spend(failures, "10.0.0.1") for _ in range(2)]) == 0
    with pytest.raises(RateLimited):
        limiter(clock, **{failures: "2/1h"}).ensure(failures, "10.0.0.1")
    clock.advance(dt.timedelta(minutes=31))  # one failure refilled
    limiter(clock, **{failures: "2/1h"}).ensure(failures, "10.0.0.1")


def test_a_worker_dying_inside_the_lock_does_not_stop_the_others(shared_table):
    """The lock between processes is a POSIX record lock: the kernel releases it with the process
    (a semaphore would stay taken, and every worker would hang on its next check)."""
    import threading

    def die_holding_it():
        shared_table.__enter__()
        os._exit(9)
    assert _in_child(die_holding_it) == 9
    done = threading.Event()
    clock = FixedClock(T0)
    name = "acme_new_nonces_per_address"

    def check():
        limiter(clock, **{name: "5/1m"}).acquire(name, "127.0.0.1")
        done.set()
    t = threading.Thread(target=check, daemon=True)
    t.start()
    t.join(timeout=10)
    assert done.is_set(), "the rate-limit lock stayed held after its process died"


def test_the_shared_table_is_bounded_and_a_key_cycling_flood_only_evicts(shared_table):
    clock = FixedClock(T0)
    name = "scep_failures_per_transaction"
    lim = limiter(clock, **{name: "1/1d"})
    for i in range(5000):
        lim.spend(name, f"txn-{i}")
    assert lim.tracked(name) <= shared_table.slots
    lim.spend(name, "victim")
    with pytest.raises(RateLimited):
        lim.ensure(name, "victim")


async def test_acme_new_order_limit_taken_in_the_orders_unit(aiohttp_client, make_services, monkeypatch):
    """Issue 13: newOrder is one unit (SQLite, account key cached) and takes its token there,
    once authenticated. Here the peek before the unit always passes (as when another request
    takes the last token meanwhile): the refusal comes from the unit's own acquire, inserts no
    order, spends the nonce in that same unit and is counted once."""
    import sqlalchemy as sa

    from acme.store import orders

    from .test_acme_jws import sql_trace

    acme = await _acme(aiohttp_client, make_services, {"SCEPD_LIMITS_ACME_NEW_ORDERS_PER_ACCOUNT": "2/1h"})
    monkeypatch.setattr(acme.services.limits, "allows", lambda name, key: True)
    order = {"identifiers": [{"type": "dns", "value": "rl.example.test"}]}
    for _ in range(2):
        assert (await acme.post("/acme/new-order", order)).status == 201
    seen = sql_trace(acme.services.store)
    await _limited(await acme.post("/acme/new-order", order), "1800")
    assert [s.split()[0] for s in seen if s.split()[0] in ("BEGIN", "INSERT")] == ["BEGIN", "INSERT"], seen
    assert "acme_used_nonces" in next(s for s in seen if s.startswith("INSERT"))
    count = await acme.services.store.read(
        lambda conn: conn.execute(sa.select(sa.func.count()).select_from(orders)).scalar())
    assert count == 2
    assert await _acme_metric(acme, "acme_new_orders_per_account") == 1
