"""ACME with stock clients against a real `scepd serve --https` on 127.0.0.1: Debian certbot 2.1
(http-01 standalone: issue, forced renewal, revoke by account and by certificate key) and lego
4.9.1 (two-name order, renew, revoke). Every certificate is checked with `openssl verify`."""
from __future__ import annotations

import os

import pytest

from .conftest import free_port, require, run, start_server, stop_server


@pytest.fixture(scope="module")
def acme_server(tmp_path_factory):
    https, http01 = free_port(), free_port()
    s = start_server(tmp_path_factory.mktemp("acme"), {
        "SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}", "SCEPD_ACME_HTTP01_PORT": str(http01),
        "SCEPD_ACME_RESOLVE": "*=127.0.0.1"})
    s.directory = f"https://127.0.0.1:{https}/acme/directory"
    s.http01 = http01
    yield s
    stop_server(s)


def _clean_env(**extra) -> dict:
    """The Debian clients run on the system Python/Go: never let them see our `acme` package."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p and "venv" not in p)
    env.update(extra)
    return env


def _certbot(srv, tmp_path, *args):
    binary = require("certbot")
    return run([binary, *args, "--server", srv.directory, "--config-dir", tmp_path / "cb", "--work-dir",
                tmp_path / "cb", "--logs-dir", tmp_path / "cb", "--non-interactive"], timeout=180,
               cwd=tmp_path, env=_clean_env(REQUESTS_CA_BUNDLE=str(srv.root_pem)))


def _records(srv) -> dict:
    import json
    return {c["serial"]: c for c in json.loads(srv.scepd("certs", "list", "--json"))}


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
    # revoke the renewed certificate as the account, the first one with its own key
    out = _certbot(srv, tmp_path, "revoke", "--cert-path", live / "cert.pem", "--reason", "superseded",
                   "--no-delete-after-revoke")
    assert out.returncode == 0, out.stdout + out.stderr
    archive = tmp_path / "cb" / "archive" / "cb1.example.test"
    out = _certbot(srv, tmp_path, "revoke", "--cert-path", archive / "cert1.pem", "--key-path",
                   archive / "privkey1.pem", "--no-delete-after-revoke")
    assert out.returncode == 0, out.stdout + out.stderr
    records = _records(srv)
    assert records[format(second.serial_number, "x")]["revocation_reason"] == "superseded"
    assert records[format(first.serial_number, "x")]["state"] == "revoked"
    assert records[format(first.serial_number, "x")]["protocol"] == "acme"
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


def _lego(srv, tmp_path, *args, domains=("lg1.example.test", "lg2.example.test")):
    binary = require("lego")
    names = [a for d in domains for a in ("--domains", d)]
    return run([binary, "--server", srv.directory, "--accept-tos", "--email", "ops@example.test",
                *names, "--http",
                "--http.port", f":{srv.http01}", "--path", tmp_path / "lego", *args], timeout=180,
               cwd=tmp_path, env=_clean_env(LEGO_CA_CERTIFICATES=str(srv.root_pem)))


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
