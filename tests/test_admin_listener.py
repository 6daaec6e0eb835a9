"""[server] admin: the admin API (scepd's and the front-ends', e.g. ACME's EAB keys) only on the
private admin listener, 404 on the HTTPS listener; unchanged without it; /metrics placement
([server] metrics_on_admin); and a real `scepd serve --admin` with workers (TLS, bearer token)."""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys

import pytest

from scepd.admin.service import AdminService
from scepd.http.app import create_admin_app, create_app, create_https_app

from .test_workers import serve, stop

API = "/api/v1/admin"
ADMIN_ENV = {"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret", "SCEPD_SERVER_ADMIN": "127.0.0.1:8445"}


async def _token(services) -> dict:
    _id, value = await AdminService(services.store, services.clock).create_token("tests", actor="test")
    return {"Authorization": f"Bearer {value}"}


async def test_with_an_admin_listener_the_admin_api_is_there_only(make_services, aiohttp_client):
    services = await make_services(ADMIN_ENV)
    auth = await _token(services)
    https = await aiohttp_client(create_https_app(services))
    admin = await aiohttp_client(create_admin_app(services))
    for path in (f"{API}/whoami", f"{API}/certificates"):
        assert (await https.get(path, headers=auth)).status == 404
        assert (await admin.get(path)).status == 401  # same authentication as before
        resp = await admin.get(path, headers=auth)
        assert resp.status == 200, await resp.text()
    # ACME's part of the admin API moves too; ACME itself stays on the HTTPS listener
    assert (await https.post(f"{API}/eab", headers=auth, json={})).status == 404
    resp = await admin.post(f"{API}/eab", headers=auth, json={})
    assert resp.status == 201 and "hmac_key" in await resp.json()
    assert (await https.get("/acme/directory")).status == 200
    assert (await admin.get("/acme/directory")).status == 404
    assert (await admin.get("/healthz")).status == 200


async def test_without_an_admin_listener_the_admin_api_stays_on_https(make_services, aiohttp_client):
    services = await make_services({"SCEPD_SCEP_STATIC_CHALLENGE": "static-secret"})
    auth = await _token(services)
    https = await aiohttp_client(create_https_app(services))
    assert (await https.get(f"{API}/whoami")).status == 401
    assert (await https.get(f"{API}/whoami", headers=auth)).status == 200
    assert (await https.post(f"{API}/eab", headers=auth, json={})).status == 201
    assert (await (await aiohttp_client(create_app(services))).get("/metrics")).status == 200


@pytest.mark.parametrize("on_admin, admin_set", [("1", True), ("0", True), ("1", False)])
async def test_metrics_placement(make_services, aiohttp_client, on_admin, admin_set):
    env = {"SCEPD_SERVER_METRICS_ON_ADMIN": on_admin}
    if admin_set:
        env["SCEPD_SERVER_ADMIN"] = "127.0.0.1:8445"
    services = await make_services(env)
    plain = await aiohttp_client(create_app(services))
    admin = await aiohttp_client(create_admin_app(services))
    moved = on_admin == "1" and admin_set
    resp = await plain.get("/metrics")
    assert resp.status == (404 if moved else 200)
    resp = await admin.get("/metrics")
    assert resp.status == (200 if moved else 404)
    if moved:
        assert "scepd_certificates_issued" in await resp.text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _https_get(port: int, path: str, root_pem: bytes, headers: dict) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cadata=root_pem.decode())
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("count", ["1", "2"])
def test_serve_admin_listener_with_workers(state_dir, count):
    https, admin = _free_port(), _free_port()
    token = subprocess.run([sys.executable, "-m", "scepd", "admin", "token", "create", "--name", "t",
                            "--state-dir", str(state_dir)], capture_output=True, text=True, timeout=120)
    assert token.returncode == 0, token.stderr
    auth = {"Authorization": f"Bearer {token.stdout.strip()}"}
    served = serve(state_dir, "--workers", count, "--no-demo-challenge", "--https", f"127.0.0.1:{https}",
                   "--admin", f"127.0.0.1:{admin}", env={"SCEPD_SERVER_METRICS_ON_ADMIN": "1"})
    try:
        root = (state_dir / "ca" / "root.pem").read_bytes()
        status, body = _https_get(admin, f"{API}/whoami", root, auth)
        assert status == 200 and json.loads(body)["actor"].startswith("token:"), body
        assert _https_get(admin, f"{API}/whoami", root, {})[0] == 401
        assert _https_get(https, f"{API}/whoami", root, auth)[0] == 404
        assert _https_get(https, "/acme/directory", root, {})[0] == 200
        assert _https_get(admin, "/metrics", root, {})[0] == 200
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 404
        conn.close()
    finally:
        code = stop(served)
    assert code == 0, served.log_text()
