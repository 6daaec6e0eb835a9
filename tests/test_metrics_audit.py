"""/metrics across an enrollment and a revocation; the audit trail (filters, append-only); logs
carry the transaction id and never a challenge."""
from __future__ import annotations

import datetime as dt
import json
import logging

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from scepd.http.app import create_app
from scepd.ops.audit import list_audit
from scepd.cli import main
from scepd.ops.logctx import ContextFilter, JsonFormatter
from scepd.ca.revocation import RevocationReason
from scepd.store.sql import audit as audit_table

from .helpers import rsa_key
from .test_revocation_tls import _issue
from .test_scep_http import enroll


async def _scrape(client) -> dict[tuple[str, tuple], float]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _get(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_follow_enrollment_and_revocation(client, services):
    before = await _scrape(client)
    assert _get(before, "scepd_certificates_active") == 0
    assert _get(before, "scepd_pending_approvals") == 0
    assert _get(before, "scepd_agents_seen", within="1h") == 0

    rep, _ = await enroll(client, rsa_key(0), cn="metrics-1")  # a real SCEP enrollment (90 days)
    assert rep.status == 0
    soon = await _issue(services, "metrics-2", rsa_key(1))  # agent profile through the service
    after = await _scrape(client)
    assert _get(after, "scepd_certificates_issued_total", protocol="scep", profile="device") == 1
    assert _get(after, "scepd_certificates_issued_total", protocol="test", profile="agent") == 1
    assert _get(after, "scepd_certificates_active") == 2
    assert _get(after, "scepd_certificates_expiring", within_days="30") == 0
    assert _get(after, "scepd_scep_operation_duration_seconds_count", operation="pkioperation") == 1
    assert _get(after, "scepd_http_request_duration_seconds_count", endpoint="/scep", method="POST") == 1

    # move to 10 days before expiry: both certificates are now expiring within 30 days, not 7
    services.clock.advance(soon.record.not_after - services.clock.now() - dt.timedelta(days=10))
    later = await _scrape(client)
    assert _get(later, "scepd_certificates_expiring", within_days="30") == 2
    assert _get(later, "scepd_certificates_expiring", within_days="7") == 0

    await services.revocation.revoke(soon.record.serial, RevocationReason.KEY_COMPROMISE, "test")
    revoked = await _scrape(client)
    assert _get(revoked, "scepd_certificates_revoked_total", reason="keyCompromise") == 1
    assert _get(revoked, "scepd_certificates_active") == 1
    assert _get(revoked, "scepd_certificates_expiring", within_days="30") == 1
    assert _get(revoked, "scepd_crl_number", ca_id=services.authority.ca_id) >= 1


async def test_scep_failures_counted_by_fail_info(client):
    rep, _ = await enroll(client, rsa_key(0), challenge="wrong", cn="nope")
    assert rep.status == 2
    samples = await _scrape(client)
    assert _get(samples, "scepd_scep_failures_total", fail_info="badRequest") == 1
    await client.post("/scep?operation=PKIOperation", data=b"junk")  # undecodable: HTTP 400
    await client.get("/no/such/path")
    samples = await _scrape(client)
    assert _get(samples, "scepd_http_responses_total", endpoint="/scep", status="400") == 1
    assert _get(samples, "scepd_http_responses_total", endpoint="/scep", status="200") == 1
    assert _get(samples, "scepd_http_responses_total", endpoint="unmatched", status="404") == 1


async def test_acme_problem_and_hook_api(client, services):
    services.metrics.acme_problem("urn:ietf:params:acme:error:badNonce")

    async def hook(m):
        m.agents_seen.labels(within="1h").set(3)
    services.metrics.add_scrape_hook(hook)
    samples = await _scrape(client)
    assert _get(samples, "scepd_acme_problems_total", type="badNonce") == 1
    assert _get(samples, "scepd_agents_seen", within="1h") == 3


async def test_registries_are_per_app(make_services, aiohttp_client):
    a = await make_services()
    b = await make_services()
    a.metrics.acme_problem("x")
    ca = await aiohttp_client(create_app(a))
    cb = await aiohttp_client(create_app(b))
    assert _get(await _scrape(ca), "scepd_acme_problems_total", type="x") == 1
    assert _get(await _scrape(cb), "scepd_acme_problems_total", type="x") == 0


# --- audit --------------------------------------------------------------------------------------

async def test_audit_records_each_action_and_filters(services):
    secret = await services.challenges.create(dt.timedelta(hours=1), actor="test")
    one = await _issue(services, "audit-1", rsa_key(0))
    two = await _issue(services, "audit-2", rsa_key(1))
    services.clock.advance(dt.timedelta(hours=2))
    await services.revocation.revoke(two.record.serial, RevocationReason.SUPERSEDED, "test")
    events = [r.event for r in await list_audit(services.store)]
    assert events[0] == "certificate.revoked"
    assert events.count("certificate.issued") == 2 and "challenge.created" in events
    assert secret not in json.dumps([r.details for r in await list_audit(services.store)])

    by_serial = await list_audit(services.store, serial=two.record.serial)
    assert {r.event for r in by_serial} == {"certificate.issued", "certificate.revoked"}
    assert [r.serial for r in await list_audit(services.store, event="certificate.issued")] == \
        [two.record.serial, one.record.serial]
    assert {r.event for r in await list_audit(services.store, event="certificate.*")} == \
        {"certificate.issued", "certificate.revoked"}
    recent = await list_audit(services.store, since=services.clock.now() - dt.timedelta(hours=1))
    assert [r.event for r in recent] == ["certificate.revoked"]


async def test_audit_rows_cannot_be_updated_or_deleted(services):
    await services.challenges.create(dt.timedelta(hours=1), actor="test")
    for statement in (audit_table.update().values(event="forged"), audit_table.delete()):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            async with services.store.transaction() as tx:
                await tx.connection.execute(statement)
    assert [r.event for r in await list_audit(services.store)] == ["challenge.created"]
    # and the store API offers no way to do it
    from scepd.store.sql import SqlStore, Transaction
    for cls in (SqlStore, Transaction):
        assert not [n for n in dir(cls) if "audit" in n and any(w in n for w in ("update", "delete", "remove"))]


def test_audit_list_cli_filters(state_dir):
    runner = CliRunner()
    args = ["--state-dir", str(state_dir)]
    assert runner.invoke(main, ["challenge", "create", *args]).exit_code == 0
    assert runner.invoke(main, ["admin", "token", "create", "--name", "ci", *args]).exit_code == 0
    out = runner.invoke(main, ["audit", "list", "--event", "admin.token.created", *args])
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.output.splitlines()]
    assert [r["event"] for r in lines] == ["admin.token.created"]
    out = runner.invoke(main, ["audit", "list", "--since", "1h", *args])
    assert {json.loads(line)["event"] for line in out.output.splitlines()} == {"challenge.created",
                                                                                "admin.token.created"}
    out = runner.invoke(main, ["audit", "list", "--since", "2999-01-01T00:00:00Z", *args])
    assert out.exit_code == 0 and out.output == ""
    bad = runner.invoke(main, ["audit", "list", "--since", "yesterday-ish", *args])
    assert bad.exit_code != 0 and "--since" in bad.output
    bad = runner.invoke(main, ["audit", "list", "--serial", "xyz", *args])
    assert bad.exit_code != 0 and "hexadecimal" in bad.output


# --- logs ---------------------------------------------------------------------------------------

async def test_logs_carry_transaction_id_and_never_the_challenge(client, services, caplog):
    caplog.handler.addFilter(ContextFilter())
    secret = await services.challenges.create(dt.timedelta(hours=1), actor="test")
    with caplog.at_level(logging.DEBUG):
        rep, _ = await enroll(client, rsa_key(0), challenge=secret, cn="logged")
    assert rep.status == 0
    issued = [r for r in caplog.records if r.name == "scepd.enrollment" and "issued" in r.getMessage()]
    assert issued and issued[0].transaction_id == rep.transaction_id
    assert issued[0].request_id
    line = json.loads(JsonFormatter().format(issued[0]))
    assert line["transaction_id"] == rep.transaction_id and line["message"].startswith("issued")
    from scepd.ops.logctx import TextFormatter
    assert f"transaction_id={rep.transaction_id}]" in TextFormatter().format(issued[0])
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert secret not in text
    pem = services.ca_material.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()).decode()
    assert pem.splitlines()[1] not in text


async def test_append_only_and_crl_numbers_on_both_backends(database_url, services):
    """SQLite and PostgreSQL: the audit triggers refuse UPDATE/DELETE; two CRL services on one
    database (two replicas) never reuse a CRL number."""
    from scepd.ca.crl import CrlService, Signer
    from scepd.http.assembly import open_store
    from scepd.store import AuditRecord
    store = await open_store(database_url)
    try:
        async with store.transaction() as tx:
            await tx.audit(AuditRecord(at=services.clock.now(), event="test.event"))
        for statement in (audit_table.update().values(event="forged"), audit_table.delete()):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"):
                async with store.transaction() as tx:
                    await tx.connection.execute(statement)
        signer = Signer(services.ca_material.cert, services.ca_material.key)
        replicas = [CrlService(store, services.clock, [signer]) for _ in range(2)]
        numbers = []
        for i in range(4):
            services.clock.advance(dt.timedelta(hours=13))
            numbers.append((await replicas[i % 2].current()).number)
        assert numbers == [1, 2, 3, 4]
        assert (await replicas[0].current()).number == 4  # fresh: the other replica's CRL is reused
    finally:
        await store.close()


def test_bad_crl_validity_is_a_one_line_error(state_dir, monkeypatch):
    monkeypatch.setenv("SCEPD_CA_CRL_VALIDITY", "bogus")
    monkeypatch.setenv("SCEPD_SERVER_HTTP", "127.0.0.1:0")
    out = CliRunner().invoke(main, ["serve", "--state-dir", str(state_dir), "--no-demo-challenge"])
    assert out.exit_code == 1 and "not a duration: 'bogus'" in out.output and "Traceback" not in out.output


async def test_superseded_by_renewal_is_counted_and_in_the_crl(aiohttp_client, make_services):
    from cryptography import x509 as _x509

    from scepd.http.app import create_app

    from .test_lifecycle import _enroll, _issued
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret",
                                    "SCEPD_SCEP_DUPLICATE_SUBJECTS": "revoke"})
    client = await aiohttp_client(create_app(services))
    old = await _issued(client, rsa_key(0))
    rep, _ = await _enroll(client, rsa_key(1), challenge=None, signer=(old, rsa_key(0)))
    assert rep.status.name == "SUCCESS"
    samples = await _scrape(client)
    assert _get(samples, "scepd_certificates_revoked_total", reason="superseded") == 1
    crl = _x509.load_der_x509_crl(await services.crl.current_der())
    assert crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None
