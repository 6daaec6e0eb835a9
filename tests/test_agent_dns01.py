"""The agent's dns-01 hook (`--dns01-hook`, agent/acme_client.py): the environment the hook gets,
its failures and timeout as one-line errors, the choice of challenge, and orders against the real
ACME app whose dns-01 validator asks a DNS server on loopback that the hook writes: a wildcard
issued, `clear` run after every `set`, also when validation or the hook fails."""
from __future__ import annotations

import json
import sys

import pytest
from cryptography import x509

from agent.acme_client import (AcmeClient, choose_challenge, dns01_environment, dns01_txt_value, run_dns01_hook,
                               thumbprint)
from agent.core import acme_client_for
from agent.files import AgentDir
from agent.protocol import AgentError, Identity
from agent.scep_client import new_key
from scepd.http.app import create_https_app

from .acme_responders import DnsServer, free_port
from .helpers import ec_key

HOOK = """import json, os, sys
records, log = sys.argv[1], sys.argv[2]
env = {k: v for k, v in os.environ.items() if k.startswith("SCEPD_DNS01_")}
with open(log, "a") as f:
    f.write(json.dumps(env) + "\\n")
if os.environ.get("FAIL_ON") == env["SCEPD_DNS01_ACTION"]:
    sys.exit("provider refused")
try:
    data = json.load(open(records))
except (FileNotFoundError, ValueError):
    data = {}
values = data.setdefault(env["SCEPD_DNS01_NAME"].rstrip("."), [])
value = os.environ.get("OVERRIDE_VALUE", env["SCEPD_DNS01_VALUE"])
if env["SCEPD_DNS01_ACTION"] == "set":
    values.append(value)
elif value in values:
    values.remove(value)
json.dump(data, open(records, "w"))
"""


def test_environment_of_the_hook():
    env = dns01_environment("set", "*.w.lab.test", "VALUE", base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "SCEPD_DNS01_ACTION": "set", "SCEPD_DNS01_NAME": "_acme-challenge.w.lab.test.",
                   "SCEPD_DNS01_VALUE": "VALUE", "SCEPD_DNS01_DOMAIN": "w.lab.test"}


def test_txt_value_is_the_digest_of_the_key_authorization():
    import base64
    import hashlib
    key = ec_key()
    digest = hashlib.sha256(f"tok.{thumbprint(key)}".encode()).digest()
    assert dns01_txt_value("tok", key) == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def test_hook_runs_with_the_environment(tmp_path):
    out = tmp_path / "env.txt"
    await run_dns01_hook(f'echo "$SCEPD_DNS01_ACTION $SCEPD_DNS01_NAME $SCEPD_DNS01_DOMAIN $SCEPD_DNS01_VALUE" > {out}',
                         "clear", "h.example", "v1")
    assert out.read_text() == "clear _acme-challenge.h.example. h.example v1\n"


async def test_hook_failure_and_timeout_are_one_line_errors():
    with pytest.raises(AgentError) as info:
        await run_dns01_hook('echo noise; echo "zone not found" >&2; exit 4', "set", "h.example", "v")
    assert str(info.value) == "dns-01 hook (set _acme-challenge.h.example.) exited with status 4: zone not found"
    with pytest.raises(AgentError, match=r"^dns-01 hook \(set _acme-challenge.h.example.\) exited with status 127"):
        await run_dns01_hook("/nonexistent/hook", "set", "h.example", "v")
    with pytest.raises(AgentError, match=r"^dns-01 hook \(clear _acme-challenge.h.example.\) killed after 0 s$"):
        await run_dns01_hook("exec sleep 30", "clear", "h.example", "v", timeout=0.2)


def test_choice_of_challenge():
    both = {"identifier": {"value": "h"}, "challenges": [{"type": "http-01"}, {"type": "dns-01"}]}
    assert choose_challenge(both, dns01=False)["type"] == "http-01"
    assert choose_challenge(both, dns01=True)["type"] == "dns-01"
    wildcard = {"identifier": {"value": "w"}, "wildcard": True, "challenges": [{"type": "dns-01"}]}
    assert choose_challenge(wildcard, dns01=True)["type"] == "dns-01"
    with pytest.raises(AgentError, match=r"no http-01 challenge offered for \*\.w: answer dns-01 with --dns01-hook"):
        choose_challenge(wildcard, dns01=False)
    http_only = {"identifier": {"value": "h"}, "challenges": [{"type": "http-01"}]}
    assert choose_challenge(http_only, dns01=True)["type"] == "http-01"  # the hook is not needed there
    with pytest.raises(AgentError, match=r"offered: tls-alpn-01"):
        choose_challenge({"identifier": {"value": "h"}, "challenges": [{"type": "tls-alpn-01"}]}, dns01=True)


# --- against the real ACME app ---------------------------------------------------------------------

@pytest.fixture
async def lab(aiohttp_client, make_services, tmp_path):
    records = tmp_path / "records.json"
    with DnsServer(records) as dns:
        services = await make_services({"SCEPD_ACME_DNS_RESOLVER": f"127.0.0.1:{dns.port}",
                                        # http-01 would knock on a port nobody listens on
                                        "SCEPD_ACME_HTTP01_PORT": str(free_port()),
                                        "SCEPD_ACME_RESOLVE": "*=127.0.0.1"})
        client = await aiohttp_client(create_https_app(services))
        script = tmp_path / "hook.py"
        script.write_text(HOOK)

        class Lab:
            pass
        lab = Lab()
        lab.dns, lab.records, lab.log = dns, records, tmp_path / "hook.log"
        lab.hook = f'"{sys.executable}" "{script}" "{records}" "{lab.log}"'
        lab.directory = str(client.make_url("/acme/directory"))
        lab.anchor = services.ca_material.root
        yield lab


def calls(lab) -> list[tuple[str, str, str]]:
    if not lab.log.exists():
        return []
    return [(e["SCEPD_DNS01_ACTION"], e["SCEPD_DNS01_NAME"], e["SCEPD_DNS01_VALUE"])
            for e in map(json.loads, lab.log.read_text().splitlines())]


def client_for(lab, tmp_path, hook: str | None) -> AcmeClient:
    d = AgentDir(tmp_path / "agent")
    d.create()
    d.save_state({"server": lab.directory, "protocol": "acme",
                  "acme": {"http01_address": "127.0.0.1", "http01_port": free_port(), "dns01_hook": hook}})
    return acme_client_for(d.load_state(), d, lab.anchor)


async def test_dns01_issues_a_wildcard_and_clears_every_record(lab, tmp_path):
    client = client_for(lab, tmp_path, lab.hook)
    key = new_key()
    issued = await client.enroll(key, Identity("w.lab.test", ("DNS:*.w.lab.test",)), "")
    names = issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(names.get_values_for_type(x509.DNSName)) == ["*.w.lab.test", "w.lab.test"]
    seen = calls(lab)
    assert [c[0] for c in seen] == ["set", "set", "clear", "clear"]
    assert {c[1] for c in seen} == {"_acme-challenge.w.lab.test."}
    assert sorted(c[2] for c in seen[:2]) == sorted(c[2] for c in seen[2:])
    assert "_acme-challenge.w.lab.test" in lab.dns.queries
    assert json.loads(lab.records.read_text()) == {"_acme-challenge.w.lab.test": []}
    # a renewal (a new order, replaces) goes through the hook again
    renewed = await client.renew(new_key(), issued.cert, key)
    assert renewed.cert.serial_number != issued.cert.serial_number
    assert [c[0] for c in calls(lab)][4:] == ["set", "set", "clear", "clear"]


async def test_without_a_hook_a_wildcard_is_a_clear_error(lab, tmp_path):
    client = client_for(lab, tmp_path, None)
    with pytest.raises(AgentError, match=r"no http-01 challenge offered for \*\.n\.lab\.test: answer dns-01"):
        await client.enroll(new_key(), Identity("*.n.lab.test"), "")
    assert calls(lab) == []


async def test_clear_runs_when_validation_or_the_hook_fails(lab, tmp_path, monkeypatch):
    client = client_for(lab, tmp_path, lab.hook)
    monkeypatch.setenv("OVERRIDE_VALUE", "not-the-digest")  # the server finds a wrong TXT value
    with pytest.raises(AgentError, match="authorization for v.lab.test is invalid"):
        await client.enroll(new_key(), Identity("v.lab.test"), "")
    assert [c[0] for c in calls(lab)] == ["set", "clear"]
    monkeypatch.delenv("OVERRIDE_VALUE")
    lab.log.unlink()
    monkeypatch.setenv("FAIL_ON", "set")
    with pytest.raises(AgentError, match=r"^dns-01 hook \(set _acme-challenge.f.lab.test.\) exited with status 1: "
                                         "provider refused$"):
        await client.enroll(new_key(), Identity("f.lab.test"), "")
    assert [c[0] for c in calls(lab)] == ["set", "clear"]
    # a failing clear is logged, not fatal: the certificate was issued
    lab.log.unlink()
    monkeypatch.setenv("FAIL_ON", "clear")
    issued = await client.enroll(new_key(), Identity("c.lab.test"), "")
    assert issued.cert is not None and [c[0] for c in calls(lab)] == ["set", "clear"]


def test_enroll_options_for_dns01_and_est(tmp_path):
    from click.testing import CliRunner

    from agent.cli import main
    runner = CliRunner()
    base = ["enroll", "--dir", str(tmp_path / "d"), "--ca-fingerprint", "AB" * 32]
    out = runner.invoke(main, base + ["--protocol", "acme", "--server", "https://ca:8443/acme/directory",
                                      "--cn", "x.example", "--san", "DNS:*.x.example"])
    assert out.exit_code == 1 and "a wildcard is validated by dns-01 only: pass --dns01-hook" in out.output
    out = runner.invoke(main, base + ["--server", "http://ca:8080/scep", "--cn", "x", "--challenge", "c",
                                      "--dns01-hook", "true"])
    assert out.exit_code == 1 and "--dns01-hook goes with --protocol acme" in out.output
    out = runner.invoke(main, base + ["--protocol", "est", "--server", "http://ca:8080/.well-known/est",
                                      "--cn", "x", "--challenge", "c"])
    assert out.exit_code == 1 and "the EST URL must be https://" in out.output
    out = runner.invoke(main, base + ["--protocol", "est", "--server", "https://ca:8443/.well-known/est",
                                      "--cn", "x"], env={"SCEPD_AGENT_CHALLENGE": ""})
    assert out.exit_code == 1 and "--challenge is required for EST enrollment" in out.output
    assert not (tmp_path / "d").exists()
