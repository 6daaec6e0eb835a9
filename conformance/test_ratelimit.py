"""Rate limits as stock clients see them: micromdm scepclient gets a signed FAILURE (badRequest)
once its address has failed too often, even with a good challenge; certbot gets the ACME
rateLimited problem for a new order over the account's limit."""
from __future__ import annotations

import re

from .conftest import free_port, require, run, start_server, stop_server
from .test_acme import _certbot


def test_scepclient_is_refused_after_failed_attempts(tmp_path):
    binary = require("scepclient")
    # rate limits are per worker process: one process, so the limit is exact
    srv = start_server(tmp_path / "srv", {"SCEPD_SERVER_WORKERS": "1", "SCEPD_SCEP_LEGACY_ALGORITHMS": "1",
                                          "SCEPD_LIMITS_SCEP_FAILURES_PER_ADDRESS": "1/1h burst 1"})
    try:
        def enroll(cn: str, challenge: str):
            work = tmp_path / cn
            work.mkdir()
            return run([binary, "-server-url", srv.url, "-challenge", challenge, "-cn", cn,
                        "-private-key", work / "key.pem", "-certificate", work / "cert.pem"], cwd=work)

        out = enroll("rl-wrong", "not-the-challenge")
        assert out.returncode != 0 and "badRequest" in out.stdout + out.stderr
        out = enroll("rl-right", srv.new_challenge())
        assert out.returncode != 0 and "badRequest" in out.stdout + out.stderr
        assert not (tmp_path / "rl-right" / "cert.pem").exists()
        assert "too many failed enrollment attempts from this address" in srv.log_text()
    finally:
        stop_server(srv)


def test_certbot_sees_rate_limited_new_order(tmp_path):
    require("certbot")
    https, http01 = free_port(), free_port()
    srv = start_server(tmp_path / "srv", {
        "SCEPD_SERVER_WORKERS": "1", "SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}", "SCEPD_ACME_HTTP01_PORT": str(http01),
        "SCEPD_ACME_RESOLVE": "*=127.0.0.1", "SCEPD_LIMITS_ACME_NEW_ORDERS_PER_ACCOUNT": "1/1h"})
    srv.directory = f"https://127.0.0.1:{https}/acme/directory"
    try:
        common = ["certonly", "--standalone", "--http-01-port", str(http01),
                  "--register-unsafely-without-email", "--agree-tos"]
        out = _certbot(srv, tmp_path, *common, "-d", "rl1.example.test")
        assert out.returncode == 0, out.stdout + out.stderr
        out = _certbot(srv, tmp_path, *common, "-d", "rl2.example.test")
        assert out.returncode != 0
        # certbot 2.1 decodes the problem, then trips over its own error handling (AttributeError),
        # so what it understood is read from its debug log
        log = (tmp_path / "cb" / "letsencrypt.log").read_text()
        assert "acme.messages.Error: urn:ietf:params:acme:error:rateLimited :: " in log
        assert "too many new orders for this account; retry in" in log
        assert re.search(r"HTTP 429\nRetry-After: \d+\n", log)
    finally:
        stop_server(srv)
