"""The external CSR check: https-only webhook, bounded answers, and the challenge never in logs."""
from __future__ import annotations

import logging
import socket

import pytest
from aiohttp import web
from click.testing import CliRunner

from scepd import config as config_mod
from scepd.http.app import create_app
from scepd.cli import main
from scepd.config import ConfigError
from scepd.errors import ExternalCheckDenied, FailInfo
from scepd.enroll.external_check import MAX_RESPONSE_BYTES, CheckRequest, ExternalCheck
from scepd.scep import wire

from .helpers import make_csr, pkcs_req, rsa_key, self_signed
from .test_lifecycle import post

SECRET = "Chal-9f27c1d4e5b6a8"


def _request() -> CheckRequest:
    return CheckRequest(csr_pem="-----BEGIN CERTIFICATE REQUEST-----\n", challenge=SECRET,
                        transaction_id="TXN-1", common_name="dev-1", sans=(), protocol="scep")


def test_plain_http_webhook_is_refused_at_config_load(state_dir):
    env = {"SCEPD_SCEP_CSR_CHECK_URL": "http://127.0.0.1:9/check"}
    with pytest.raises(ConfigError, match="csr_check_allow_http = true"):
        config_mod.load(state_dir, environ=env)
    with pytest.raises(ConfigError, match="https"):
        config_mod.load(state_dir, environ={"SCEPD_SCEP_CSR_CHECK_URL": "file:///etc/passwd"})
    with pytest.raises(ConfigError, match="plain http"):
        ExternalCheck(url="http://127.0.0.1:9/check")
    cfg = config_mod.load(state_dir, environ={**env, "SCEPD_SCEP_CSR_CHECK_ALLOW_HTTP": "true"})
    assert cfg.scep.csr_check_allow_http
    assert config_mod.load(state_dir, environ={"SCEPD_SCEP_CSR_CHECK_URL": "https://hooks.example/c"})
    # every command loads the configuration first: a clear error, no traceback
    result = CliRunner().invoke(main, ["challenge", "create", "--state-dir", str(state_dir)], env=env)
    assert result.exit_code == 1 and "csr_check_allow_http" in result.output
    assert "Traceback" not in result.output


async def test_webhook_answer_over_64_kib_denies(aiohttp_server, caplog):
    async def big(_request):
        return web.json_response({"allow": True, "padding": "x" * MAX_RESPONSE_BYTES})

    async def fits(_request):
        return web.json_response({"allow": True, "padding": "x" * (MAX_RESPONSE_BYTES - 100)})
    app = web.Application()
    app.router.add_post("/big", big)
    app.router.add_post("/fits", fits)
    server = await aiohttp_server(app)
    caplog.set_level(logging.INFO, logger="scepd")
    await ExternalCheck(url=str(server.make_url("/fits")), allow_http=True).check(_request())
    with pytest.raises(ExternalCheckDenied, match="too large"):
        await ExternalCheck(url=str(server.make_url("/big")), allow_http=True).check(_request())
    assert any("more than 65536 bytes" in r.getMessage() for r in caplog.records)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_challenge_is_never_logged_nor_echoed(aiohttp_server, tmp_path, caplog):
    """Every way a check can fail, including checks that print back the payload they were given."""
    async def echo_deny(request):
        return web.json_response({"allow": False, "reason": (await request.read()).decode()})

    async def echo_500(request):
        return web.Response(status=500, body=await request.read())

    async def big(request):
        return web.Response(body=(await request.read()) * (MAX_RESPONSE_BYTES // 100))
    app = web.Application()
    app.router.add_post("/deny", echo_deny)
    app.router.add_post("/500", echo_500)
    app.router.add_post("/big", big)
    server = await aiohttp_server(app)

    def script(name: str, body: str):
        path = tmp_path / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
        return str(path)
    checks = [
        ExternalCheck(command=script("stdout.sh", "cat; exit 1")),
        ExternalCheck(command=script("stderr.sh", "cat >&2; exit 3")),
        ExternalCheck(command=script("prefix.sh", "printf 'bad challenge '; cat; exit 1")),
        ExternalCheck(command=str(tmp_path / "missing.sh")),
        ExternalCheck(command=script("slow.sh", "cat >/dev/null; sleep 5"), timeout=0.3),
        ExternalCheck(url=str(server.make_url("/deny")), allow_http=True),
        ExternalCheck(url=str(server.make_url("/500")), allow_http=True),
        ExternalCheck(url=str(server.make_url("/big")), allow_http=True),
        ExternalCheck(url=f"http://127.0.0.1:{_closed_port()}/check", allow_http=True),
    ]
    caplog.set_level(logging.DEBUG)
    reasons = []
    for check in checks:
        with pytest.raises(ExternalCheckDenied) as denied:
            await check.check(_request())
        reasons.append(str(denied.value))
    assert SECRET not in caplog.text
    assert all(SECRET not in r for r in reasons), reasons
    assert "[challenge]" in reasons[0] and "csr_pem" in reasons[0]  # the rest of the echo stays


async def test_scep_failure_log_line_carries_no_challenge(aiohttp_client, make_services, tmp_path, caplog):
    """Through the SCEP service: a check that echoes its input denies; the logged FAILURE and the
    failInfoText name no challenge."""
    script = tmp_path / "echo.sh"
    script.write_text("#!/bin/sh\n"  # names the challenge it got, as a careless check would
                      "sed -n 's/.*\"challenge\": \"\\([^\"]*\\)\".*/unknown challenge \\1/p'; exit 1\n")
    script.chmod(0o755)
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": SECRET,
                                    "SCEPD_SCEP_CSR_CHECK_COMMAND": str(script)})
    client = await aiohttp_client(create_app(services))
    caplog.set_level(logging.DEBUG)
    key = rsa_key(0)
    req, _, _ = pkcs_req(services.ca_material.cert, key, make_csr(key, "echoed", SECRET),
                         signer=(self_signed(key), key))
    rep = await post(client, req)
    assert rep.status == wire.PkiStatus.FAILURE and rep.fail_info == FailInfo.BAD_REQUEST
    assert "denied by the external CSR check" in rep.fail_info_text
    assert SECRET not in rep.fail_info_text
    assert any("SCEP FAILURE" in r.getMessage() for r in caplog.records)
    assert SECRET not in caplog.text
    assert rep.fail_info_text.endswith("unknown challenge [challenge]")
