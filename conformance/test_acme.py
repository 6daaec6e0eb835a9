"""ACME with stock clients against a real `scepd serve --https` on 127.0.0.1:
- Debian certbot 2.1: http-01 standalone issue, forced renewal, revoke by account and by
  certificate key, alreadyRevoked, unregister, EAB; dns-01 wildcard through manual hooks.
- the current certbot from PyPI in its own virtualenv (.venv-certbot, made by scripts/test):
  the same lifecycle plus an ARI-driven renewal after `scepd certs renew-now`, and profiles.
- lego 4.9.1: two-name order, renew, revoke; tls-alpn-01; a dns-01 wildcard (exec provider).
- dehydrated 0.7: register, issue, forced renew, revoke.
dns-01 is answered by a real DNS server on 127.0.0.1 (tests/acme_responders.DnsServer) that the
clients' hooks feed through a JSON file. Every certificate is checked with `openssl verify`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.acme_responders import DnsServer

from .conftest import free_port, require, run, start_server, stop_server

HOOK = Path(__file__).parent / "dns_hook.py"


@pytest.fixture(scope="module")
def acme_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("acme")
    https, http01, tls = free_port(), free_port(), free_port()
    records = tmp / "dns-records.json"
    with DnsServer(records) as dns:
        s = start_server(tmp, {
            "SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}", "SCEPD_ACME_HTTP01_PORT": str(http01),
            "SCEPD_ACME_TLSALPN01_PORT": str(tls), "SCEPD_ACME_RESOLVE": "*=127.0.0.1",
            "SCEPD_ACME_DNS_RESOLVER": f"127.0.0.1:{dns.port}"})
        s.directory = f"https://127.0.0.1:{https}/acme/directory"
        s.http01, s.tls, s.dns, s.records = http01, tls, dns, records
        yield s
        stop_server(s)


def _clean_env(**extra) -> dict:
    """The Debian clients run on the system Python/Go: never let them see our `acme` package."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p and "venv" not in p)
    env.update(extra)
    return env


def _certbot(srv, tmp_path, *args, extra_env=None):
    binary = require("certbot")
    return run([binary, *args, "--server", srv.directory, "--config-dir", tmp_path / "cb", "--work-dir",
                tmp_path / "cb", "--logs-dir", tmp_path / "cb", "--non-interactive"], timeout=180,
               cwd=tmp_path, env=_clean_env(REQUESTS_CA_BUNDLE=str(srv.root_pem), **(extra_env or {})))


def _records(srv) -> dict:
    import json
    return {c["serial"]: c for c in json.loads(srv.scepd("certs", "list", "--json"))}


def _revoke_both_ways(srv, tmp_path, certbot, name, first, current):
    """The current certificate revoked by the account (reason superseded), the first one with its
    own key (certbot's archive keeps it as cert1/privkey1)."""
    live, archive = tmp_path / "cb" / "live" / name, tmp_path / "cb" / "archive" / name
    out = certbot(srv, tmp_path, "revoke", "--cert-path", live / "cert.pem", "--reason", "superseded",
                  "--no-delete-after-revoke")
    assert out.returncode == 0, out.stdout + out.stderr
    out = certbot(srv, tmp_path, "revoke", "--cert-path", archive / "cert1.pem", "--key-path",
                  archive / "privkey1.pem", "--no-delete-after-revoke")
    assert out.returncode == 0, out.stdout + out.stderr
    records = _records(srv)
    assert records[format(current.serial_number, "x")]["revocation_reason"] == "superseded"
    assert records[format(first.serial_number, "x")]["state"] == "revoked"
    assert records[format(first.serial_number, "x")]["protocol"] == "acme"


def test_certbot_issue_renew_revoke(acme_server, tmp_path):
    srv = acme_server
    out = _certbot(srv, tmp_path, "certonly", "--standalone", "--http-01-port", str(srv.http01),
                   "-d", "cb1.example.test", "--register-unsafely-without-email", "--agree-tos")
    assert out.returncode == 0, out.stdout + out.stderr
    live = tmp_path / "cb" / "live" / "cb1.example.test"
    first = srv.verify(live / "cert.pem", live / "privkey.pem")
    out = _certbot(srv, tmp_path, "renew", "--force-renewal", "--no-random-sleep-on-renew",
                   "--http-01-port", str(srv.http01))
    assert out.returncode == 0, out.stdout + out.stderr
    second = srv.verify(live / "cert.pem", live / "privkey.pem")
    assert second.serial_number != first.serial_number
    _revoke_both_ways(srv, tmp_path, _certbot, "cb1.example.test", first, second)
    # revoking again gets alreadyRevoked (certbot 2.1 then trips over its own error handling,
    # so the problem type is read from its debug log)
    out = _certbot(srv, tmp_path, "revoke", "--cert-path", live / "cert.pem", "--no-delete-after-revoke")
    assert out.returncode != 0
    assert "urn:ietf:params:acme:error:alreadyRevoked" in (tmp_path / "cb" / "letsencrypt.log").read_text()
    out = _certbot(srv, tmp_path, "unregister")
    assert out.returncode == 0, out.stdout + out.stderr


def test_certbot_failed_challenge_is_reported(acme_server, tmp_path):
    """Nobody answers on the validation port: the authorization becomes invalid at once."""
    srv = acme_server
    out = _certbot(srv, tmp_path, "certonly", "--standalone", "--http-01-port", str(free_port()),
                   "-d", "nobody.example.test", "--register-unsafely-without-email", "--agree-tos")
    assert out.returncode != 0
    assert "nobody.example.test" in out.stdout + out.stderr


def _lego(srv, tmp_path, *args, domains=("lg1.example.test", "lg2.example.test"), solver=None):
    binary = require("lego")
    names = [a for d in domains for a in ("--domains", d)]
    solver = solver or ["--http", "--http.port", f":{srv.http01}"]
    return run([binary, "--server", srv.directory, "--accept-tos", "--email", "ops@example.test",
                *names, *solver, "--path", tmp_path / "lego", *args], timeout=180,
               cwd=tmp_path, env=_clean_env(LEGO_CA_CERTIFICATES=str(srv.root_pem), EXEC_PATH=str(HOOK),
                                            SCEPD_TEST_DNS_RECORDS=str(srv.records)))


def _sans(cert: x509.Certificate) -> list[str]:
    return sorted(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                  .get_values_for_type(x509.DNSName))


def test_lego_tls_alpn01(acme_server, tmp_path):
    """RFC 8737: lego answers on the validation port with ALPN acme-tls/1."""
    srv = acme_server
    out = _lego(srv, tmp_path, "run", domains=("tl.example.test",),
                solver=["--tls", "--tls.port", f"127.0.0.1:{srv.tls}"])
    assert out.returncode == 0, out.stdout + out.stderr
    certs = tmp_path / "lego" / "certificates"
    cert = srv.verify(certs / "tl.example.test.crt", certs / "tl.example.test.key")
    assert _sans(cert) == ["tl.example.test"]
    assert "acme tls-alpn-01 valid for tl.example.test" in srv.log_text()


def test_lego_dns01_wildcard(acme_server, tmp_path):
    """A wildcard and its base name, both by dns-01 (lego's exec provider feeds our DNS server)."""
    srv = acme_server
    out = _lego(srv, tmp_path, "run", domains=("*.wl.example.test", "wl.example.test"),
                solver=["--dns", "exec", "--dns.resolvers", f"127.0.0.1:{srv.dns.port}", "--dns.disable-cp"])
    assert out.returncode == 0, out.stdout + out.stderr
    certs = tmp_path / "lego" / "certificates"
    cert = srv.verify(certs / "_.wl.example.test.crt", certs / "_.wl.example.test.key")
    assert _sans(cert) == ["*.wl.example.test", "wl.example.test"]
    assert "_acme-challenge.wl.example.test" in srv.dns.queries


def test_lego_two_names_renew_revoke(acme_server, tmp_path):
    srv = acme_server
    out = _lego(srv, tmp_path, "run")
    assert out.returncode == 0, out.stdout + out.stderr
    certs = tmp_path / "lego" / "certificates"
    first = srv.verify(certs / "lg1.example.test.crt", certs / "lg1.example.test.key")
    from cryptography import x509
    names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert sorted(names) == ["lg1.example.test", "lg2.example.test"]
    out = _lego(srv, tmp_path, "renew", "--days", "365", "--no-random-sleep")
    assert out.returncode == 0, out.stdout + out.stderr
    second = srv.verify(certs / "lg1.example.test.crt", certs / "lg1.example.test.key")
    assert second.serial_number != first.serial_number
    out = _lego(srv, tmp_path, "revoke", domains=("lg1.example.test",))  # lego files it by the first name
    assert out.returncode == 0, out.stdout + out.stderr
    assert _records(srv)[format(second.serial_number, "x")]["state"] == "revoked"


def test_dehydrated_register_issue_renew_revoke(acme_server, tmp_path):
    """dehydrated writes the http-01 token into a directory; a plain static file server on
    127.0.0.1 serves it on the validation port, as a web server would."""
    import subprocess
    import sys
    binary = require("dehydrated")
    srv = acme_server
    www = tmp_path / "www"
    (www / ".well-known" / "acme-challenge").mkdir(parents=True)
    config = tmp_path / "config"
    config.write_text(f'CA="{srv.directory}"\nBASEDIR="{tmp_path}"\n'
                      f'WELLKNOWN="{www}/.well-known/acme-challenge"\n'
                      f'CURL_OPTS="--cacert {srv.root_pem}"\nCONTACT_EMAIL="ops@example.test"\n')
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(srv.http01), "--bind", "127.0.0.1"],
                           cwd=www, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env = _clean_env()
        out = run([binary, "-f", config, "--register", "--accept-terms"], env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        out = run([binary, "-f", config, "-c", "-d", "dh1.example.test"], env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        cert_file = tmp_path / "certs" / "dh1.example.test" / "cert.pem"
        first = srv.verify(cert_file, tmp_path / "certs" / "dh1.example.test" / "privkey.pem")
        out = run([binary, "-f", config, "-c", "-d", "dh1.example.test", "--force"], env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        second = srv.verify(cert_file, tmp_path / "certs" / "dh1.example.test" / "privkey.pem")
        assert second.serial_number != first.serial_number
        out = run([binary, "-f", config, "-r", cert_file.resolve()], env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        assert _records(srv)[format(second.serial_number, "x")]["state"] == "revoked"
    finally:
        web.kill()
        web.wait(timeout=10)


def test_certbot_with_external_account_binding(tmp_path):
    """SCEPD_ACME_EAB_REQUIRED=1: certbot registers with a key from `scepd eab create`; without
    one it is refused; the binding limits what the account may order."""
    https, http01 = free_port(), free_port()
    srv = start_server(tmp_path / "srv", {"SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}",
                                          "SCEPD_ACME_HTTP01_PORT": str(http01),
                                          "SCEPD_ACME_RESOLVE": "*=127.0.0.1", "SCEPD_ACME_EAB_REQUIRED": "1"})
    srv.directory, srv.http01 = f"https://127.0.0.1:{https}/acme/directory", http01
    try:
        work = tmp_path / "cb"
        work.mkdir()
        out = _certbot(srv, work, "register", "--register-unsafely-without-email", "--agree-tos")
        assert out.returncode != 0
        created = srv.scepd("eab", "create", "--identifiers", "*.lab.example.test", "--ttl", "1h")
        kid = created.split("kid: ")[1].split()[0]
        key = created.split("hmac: ")[1].split()[0]
        out = _certbot(srv, work, "certonly", "--standalone", "--http-01-port", str(http01), "-d",
                       "eab1.lab.example.test", "--register-unsafely-without-email", "--agree-tos",
                       "--eab-kid", kid, "--eab-hmac-key", key)
        assert out.returncode == 0, out.stdout + out.stderr
        live = work / "cb" / "live" / "eab1.lab.example.test"
        srv.verify(live / "cert.pem", live / "privkey.pem")
        out = _certbot(srv, work, "certonly", "--standalone", "--http-01-port", str(http01), "-d",
                       "outside.example.test")
        assert out.returncode != 0
    finally:
        stop_server(srv)


def test_certbot_dns01_wildcard_manual_hooks(acme_server, tmp_path):
    """Debian certbot 2.1, manual plugin with auth/cleanup hooks writing the TXT records."""
    srv = acme_server
    out = _certbot(srv, tmp_path, "certonly", "--manual", "--preferred-challenges", "dns",
                   "--manual-auth-hook", f"{HOOK} certbot-auth", "--manual-cleanup-hook", f"{HOOK} certbot-cleanup",
                   "-d", "*.cw.example.test", "-d", "cw.example.test",
                   "--register-unsafely-without-email", "--agree-tos", extra_env={"SCEPD_TEST_DNS_RECORDS": str(srv.records)})
    assert out.returncode == 0, out.stdout + out.stderr
    live = tmp_path / "cb" / "live" / "cw.example.test"
    cert = srv.verify(live / "cert.pem", live / "privkey.pem")
    assert _sans(cert) == ["*.cw.example.test", "cw.example.test"]
    assert json.loads(srv.records.read_text()).get("_acme-challenge.cw.example.test") == []  # cleaned up


PYPI_CERTBOT = os.environ.get("SCEPD_CERTBOT_PYPI",
                              str(Path(__file__).resolve().parent.parent / ".venv-certbot" / "bin" / "certbot"))


def _pypi_certbot(srv, tmp_path, *args):
    binary = require(PYPI_CERTBOT)
    return run([binary, *args, "--server", srv.directory, "--config-dir", tmp_path / "cb", "--work-dir",
                tmp_path / "cb", "--logs-dir", tmp_path / "cb", "--non-interactive"], timeout=180,
               cwd=tmp_path, env=_clean_env(REQUESTS_CA_BUNDLE=str(srv.root_pem)))


def test_pypi_certbot_lifecycle_with_ari(acme_server, tmp_path):
    """The current certbot (PyPI, own virtualenv): register, certonly (http-01 standalone, profile
    `agent`), renew --force-renewal, an ARI-driven renewal after `scepd certs renew-now` (and
    none while the window lies ahead), revoke by account and by key, unregister."""
    srv = acme_server
    port = ["--http-01-port", str(srv.http01)]
    out = _pypi_certbot(srv, tmp_path, "--version")
    assert out.returncode == 0, out.stdout + out.stderr
    version = (out.stdout + out.stderr).split()[-1]
    assert tuple(int(p) for p in version.split(".")[:2]) >= (4, 1), f"certbot {version} predates ARI"
    out = _pypi_certbot(srv, tmp_path, "register", "--register-unsafely-without-email", "--agree-tos")
    assert out.returncode == 0, out.stdout + out.stderr
    out = _pypi_certbot(srv, tmp_path, "certonly", "--standalone", *port, "-d", "pypi.example.test",
                        "--required-profile", "agent")
    assert out.returncode == 0, out.stdout + out.stderr
    live = tmp_path / "cb" / "live" / "pypi.example.test"
    first = srv.verify(live / "cert.pem", live / "privkey.pem")
    assert list(first.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    out = _pypi_certbot(srv, tmp_path, "renew", "--force-renewal", "--no-random-sleep-on-renew", *port)
    assert out.returncode == 0, out.stdout + out.stderr
    second = srv.verify(live / "cert.pem", live / "privkey.pem")
    assert second.serial_number != first.serial_number
    # ARI: the window lies ahead -> no renewal; after renew-now it lies in the past -> renewal
    out = _pypi_certbot(srv, tmp_path, "renew", "--no-random-sleep-on-renew", *port)
    assert out.returncode == 0, out.stdout + out.stderr
    assert srv.verify(live / "cert.pem").serial_number == second.serial_number
    srv.scepd("certs", "renew-now", format(second.serial_number, "x"))
    # certbot honours our Retry-After (6 h) and keeps it in the renewal config: let those 6 h pass
    conf = tmp_path / "cb" / "renewal" / "pypi.example.test.conf"
    text = conf.read_text()
    assert "ari_retry_after" in text  # it did ask the server
    conf.write_text("\n".join(line for line in text.splitlines() if "ari_retry_after" not in line) + "\n")
    out = _pypi_certbot(srv, tmp_path, "renew", "--no-random-sleep-on-renew", *port)
    assert out.returncode == 0, out.stdout + out.stderr
    third = srv.verify(live / "cert.pem", live / "privkey.pem")
    assert third.serial_number != second.serial_number, out.stdout + out.stderr
    # (certbot 5.x does not send `replaces`; scepd-agent does: tests/test_acme_ari.py, test_agent.py)
    _revoke_both_ways(srv, tmp_path, _pypi_certbot, "pypi.example.test", first, third)
    out = _pypi_certbot(srv, tmp_path, "unregister")
    assert out.returncode == 0, out.stdout + out.stderr
