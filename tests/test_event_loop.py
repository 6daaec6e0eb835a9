"""`[server] event_loop`: the serving processes run on uvloop by default, on asyncio's own loop
when asked, and say so in one line when uvloop is missing. On uvloop, request bodies that arrive
in pieces are still read whole, over plain HTTP and TLS, and a client that drops its connection
half-way through a body costs nothing (the in-process tests of the same run on asyncio's loop:
tests/test_http_bodies.py)."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
from dataclasses import dataclass

import pytest
import uvloop

from scepd.config import ConfigError, load
from scepd.http import eventloop
from scepd.scep import wire

from .helpers import make_csr, pkcs_req, rsa_key
from .test_acme_jws import rsa_jwk, sign
from .test_http_bodies import chunked, exchange, split3
from .test_workers import _ca_cert, _free_port, serve, stop


def test_loop_factory_names_the_loop():
    assert eventloop.loop_factory("asyncio") is None
    assert eventloop.loop_factory("uvloop") is uvloop.new_event_loop
    with pytest.raises(ConfigError, match="event_loop must be uvloop or asyncio"):
        eventloop.loop_factory("trio")


def test_run_runs_the_coroutine_on_the_named_loop():
    async def name() -> str:
        return eventloop.running_loop_name()
    assert eventloop.run(name(), "uvloop") == "uvloop"
    assert eventloop.run(name(), "asyncio") == "asyncio"


def test_the_configuration_refuses_an_unknown_loop(tmp_path):
    assert load(tmp_path, {}).server.event_loop == "uvloop"
    assert load(tmp_path, {"SCEPD_SERVER_EVENT_LOOP": "asyncio"}).server.event_loop == "asyncio"
    with pytest.raises(ConfigError, match="event_loop must be uvloop or asyncio"):
        load(tmp_path, {"SCEPD_SERVER_EVENT_LOOP": "tornado"})


def _loops_in_log(text: str) -> list[str]:
    return re.findall(r"serving on the (\w+) event loop", text)


@dataclass
class _Listener:
    host: str
    port: int


def _scep_pieces(message: bytes, framing: str) -> tuple[dict[str, str], list[bytes]]:
    headers = {"Content-Type": "application/x-pki-message"}
    if framing == "chunked":
        headers["Transfer-Encoding"] = "chunked"
        return headers, chunked(split3(message))
    headers["Content-Length"] = str(len(message))
    return headers, split3(message)


def _dropped_half_way(port: int, head: bytes, first_piece: bytes) -> None:
    """A client that sends the head and part of the body, then resets the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head + first_piece)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close


def test_workers_serve_on_uvloop_and_read_bodies_in_pieces(tmp_path):
    state = tmp_path / "state"
    https = _free_port()
    served = serve(state, "--workers", "2", env={"SCEPD_SERVER_HTTPS": f"127.0.0.1:{https}",
                                                 "SCEPD_SCEP_STATIC_CHALLENGE": "loop-secret"})
    try:
        ca = _ca_cert(served.port)
        plain = _Listener("127.0.0.1", served.port)
        # SCEP over plain HTTP, the body in three segments a little apart, both framings
        for framing in ("content-length", "chunked"):
            key = rsa_key(1)
            message, _txid, nonce = pkcs_req(ca, key, make_csr(key, f"uvloop-{framing}", "loop-secret"))
            headers, pieces = _scep_pieces(message, framing)
            status, fields, body = asyncio.run(exchange(plain, "POST", "/scep?operation=PKIOperation",
                                                        headers, pieces))
            assert status == 200, body[:200]
            rep = wire.decode_cert_rep(body)
            assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
            assert rep.recipient_nonce == nonce
        # a client gone half-way through a body: the next request is answered as ever
        _dropped_half_way(served.port, b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/x-pki-message\r\nContent-Length: 5000\r\n\r\n", b"0" * 100)
        assert _ca_cert(served.port) == ca
        # ACME over TLS (uvloop's own TLS), the JWS in three segments
        tls = ssl.create_default_context(cafile=str(state / "ca" / "root.pem"))
        conn = http.client.HTTPSConnection("127.0.0.1", https, timeout=30, context=tls)
        conn.request("HEAD", "/acme/new-nonce")
        resp = conn.getresponse()
        resp.read()
        nonce = resp.headers["Replay-Nonce"]
        conn.close()
        key = rsa_key(2)
        url = f"https://127.0.0.1:{https}/acme/new-account"
        jws = sign(key, {"alg": "RS256", "nonce": nonce, "jwk": rsa_jwk(key), "url": url},
                   json.dumps({"termsOfServiceAgreed": True}).encode())
        status, fields, body = asyncio.run(exchange(
            _Listener("127.0.0.1", https), "POST", "/acme/new-account",
            {"Content-Type": "application/jose+json", "Content-Length": str(len(jws))}, split3(jws), tls=tls))
        assert status == 201, body[:300]
        assert json.loads(body)["status"] == "valid" and "/acme/acct/" in fields["Location"]
    finally:
        assert stop(served) == 0
    # both workers said which loop they serve on (the log is complete once they stopped)
    assert _loops_in_log(served.log_text()) == ["uvloop", "uvloop"], served.log_text()[-2000:]


def test_event_loop_asyncio_serves_on_the_standard_loop(tmp_path):
    served = serve(tmp_path / "state", "--workers", "1", "--no-demo-challenge",
                   env={"SCEPD_SERVER_EVENT_LOOP": "asyncio"})
    try:
        assert _ca_cert(served.port).subject  # GetCACert answers
    finally:
        assert stop(served) == 0
    assert _loops_in_log(served.log_text()) == ["asyncio"]


def test_serve_without_uvloop_says_so_in_one_line(tmp_path):
    """uvloop not importable (a stand-in package that fails to import, first on the path):
    `serve` stops before forking, with one line naming the fix, and no traceback."""
    fake = tmp_path / "fake"
    (fake / "uvloop").mkdir(parents=True)
    (fake / "uvloop" / "__init__.py").write_text("raise ImportError('no uvloop here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "SCEPD_SERVER_HTTP": f"127.0.0.1:{_free_port()}"}
    state = tmp_path / "state"
    out = subprocess.run([sys.executable, "-m", "scepd", "serve", "--state-dir", str(state), "--no-demo-challenge"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "uvloop is not installed: pip install uvloop, or set event_loop = asyncio" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    assert "listening on" not in out.stdout
    # and with event_loop = asyncio the same machine serves
    served = serve(state, "--workers", "1", "--no-demo-challenge",
                   env={"PYTHONPATH": env["PYTHONPATH"], "SCEPD_SERVER_EVENT_LOOP": "asyncio"})
    try:
        assert _ca_cert(served.port).subject
    finally:
        assert stop(served) == 0
