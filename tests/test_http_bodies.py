"""Request bodies are read whole, however they arrive (issue 11 item 2).

aiohttp's `content.read(n)` returns what is buffered, not n bytes: a body that arrived in several
TCP segments was cut at the first one. These tests talk to a real listener on 127.0.0.1 through
a raw socket (TCP_NODELAY) that sends the head, then the body in pieces a little apart, with
Content-Length or chunked, for SCEP, OCSP and ACME POSTs; and bodies over the cap get 413."""
from __future__ import annotations

import asyncio
import json
import socket

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from scepd.http.app import SERVICES, create_app, create_https_app
from scepd.ca.ocsp import MAX_REQUEST_BYTES, _issuer_hashes
from scepd.scep import wire

from .helpers import make_csr, pkcs_req, rsa_key
from .test_acme_jws import Acme, rsa_jwk, sign

PAUSE = 0.05  # between pieces, so that they arrive as separate segments (3 pieces: 0.1 s)


def split3(body: bytes) -> list[bytes]:
    a, b = len(body) // 3, 2 * len(body) // 3
    return [body[:a], body[a:b], body[b:]]


def chunked(pieces: list[bytes]) -> list[bytes]:
    framed = [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces]
    framed[-1] += b"0\r\n\r\n"
    return framed


async def exchange(server, method: str, target: str, headers: dict[str, str],
                   pieces: list[bytes], tls=None) -> tuple[int, dict[str, str], bytes]:
    """Send the head, then each piece after a pause, while reading the answer (the server may
    answer before everything is sent: 413). Connection: close, so the answer ends at EOF.
    `server`: anything with .host and .port; `tls`: an SSLContext for an HTTPS listener."""
    reader, writer = await asyncio.open_connection(server.host, server.port, ssl=tls)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = [f"{method} {target} HTTP/1.1", f"Host: {server.host}:{server.port}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())

    async def send():
        try:
            await writer.drain()
            for piece in pieces:
                await asyncio.sleep(PAUSE)
                writer.write(piece)
                await writer.drain()
        except ConnectionError:
            pass  # the server answered and closed early
    sender = asyncio.create_task(send())
    try:
        raw = await asyncio.wait_for(reader.read(), timeout=20)
    finally:
        sender.cancel()
        writer.close()
    head_raw, _, body = raw.partition(b"\r\n\r\n")
    lines = head_raw.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    if fields.get("Transfer-Encoding") == "chunked":
        body = _unchunk(body)
    return int(lines[0].split()[1]), fields, body


def _unchunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:  # bounded by len(data): pos only grows
        line_end = data.index(b"\r\n", pos)
        size = int(data[pos:line_end], 16)
        if size == 0:
            return bytes(out)
        out += data[line_end + 2:line_end + 2 + size]
        pos = line_end + 4 + size


# --- SCEP ---------------------------------------------------------------------------------------

def _pkcs_req(client) -> tuple[bytes, bytes]:
    key = rsa_key(0)
    ca = client.server.app[SERVICES].ca_material.cert
    message, _txid, nonce = pkcs_req(ca, key, make_csr(key, "segments", "static-secret"))
    return message, nonce


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_scep_post_in_segments_enrolls(client, framing):
    message, nonce = _pkcs_req(client)
    headers = {"Content-Type": "application/x-pki-message"}
    if framing == "chunked":
        headers["Transfer-Encoding"] = "chunked"
        pieces = chunked(split3(message))
    else:
        headers["Content-Length"] = str(len(message))
        pieces = split3(message)
    status, fields, body = await exchange(client.server, "POST", "/scep?operation=PKIOperation", headers, pieces)
    assert status == 200, body
    assert fields["Content-Type"] == "application/x-pki-message"
    rep = wire.decode_cert_rep(body)
    assert rep.status == wire.PkiStatus.SUCCESS, rep.fail_info_text
    assert rep.recipient_nonce == nonce


async def test_scep_chunked_body_over_the_cap_is_413(aiohttp_client, make_services):
    """(With Content-Length, test_scep_http.py::test_body_cap_413.)"""
    services = await make_services({"SCEPD_SCEP_MAX_BODY_BYTES": "4096"})
    client = await aiohttp_client(create_app(services))
    status, _, text = await exchange(client.server, "POST", "/scep?operation=PKIOperation",
                                     {"Transfer-Encoding": "chunked"}, chunked(split3(b"\x30" * 5000)))
    assert status == 413, text
    assert text == b"request body over 4096 bytes\n"


# --- OCSP ---------------------------------------------------------------------------------------

def _ocsp_request(services) -> bytes:
    """For a serial our CA never issued: answered "unknown", a full signed response."""
    name_hash, key_hash = _issuer_hashes(services.ca_material.cert, "sha1")
    return ocsp.OCSPRequestBuilder().add_certificate_by_hash(name_hash, key_hash, 0x5E6, hashes.SHA1()) \
        .build().public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_ocsp_post_in_segments_is_answered(client, services, framing):
    request = _ocsp_request(services)
    headers = {"Content-Type": "application/ocsp-request"}
    if framing == "chunked":
        headers["Transfer-Encoding"] = "chunked"
        pieces = chunked(split3(request))
    else:
        headers["Content-Length"] = str(len(request))
        pieces = split3(request)
    status, fields, body = await exchange(client.server, "POST", "/ocsp", headers, pieces)
    assert status == 200 and fields["Content-Type"] == "application/ocsp-response"
    answer = ocsp.load_der_ocsp_response(body)
    assert answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert answer.serial_number == 0x5E6 and answer.certificate_status == ocsp.OCSPCertStatus.UNKNOWN


async def test_ocsp_body_over_the_cap_is_413(client):
    body = b"\x30" * (MAX_REQUEST_BYTES + 100)
    status, _, _ = await exchange(client.server, "POST", "/ocsp", {"Transfer-Encoding": "chunked"},
                                  chunked(split3(body)))
    assert status == 413


# --- ACME ---------------------------------------------------------------------------------------

@pytest.fixture
async def acme_server(aiohttp_client, services):
    return Acme(await aiohttp_client(create_https_app(services)), rsa_key(2))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_acme_new_account_in_segments(acme_server, framing):
    server = acme_server.client.server
    protected = {"alg": "RS256", "nonce": await acme_server.nonce(), "jwk": rsa_jwk(acme_server.key),
                 "url": f"http://{server.host}:{server.port}/acme/new-account"}
    jws = sign(acme_server.key, protected, json.dumps({"termsOfServiceAgreed": True}).encode())
    headers = {"Content-Type": "application/jose+json"}
    if framing == "chunked":
        headers["Transfer-Encoding"] = "chunked"
        pieces = chunked(split3(jws))
    else:
        headers["Content-Length"] = str(len(jws))
        pieces = split3(jws)
    status, fields, body = await exchange(server, "POST", "/acme/new-account", headers, pieces)
    assert status == 201, body
    assert json.loads(body)["status"] == "valid" and "/acme/acct/" in fields["Location"]


async def test_acme_body_over_the_cap_is_413_problem(acme_server):
    from acme.server import MAX_BODY
    body = b" " * (MAX_BODY + 1)
    status, fields, text = await exchange(acme_server.client.server, "POST", "/acme/new-account",
                                          {"Content-Type": "application/jose+json", "Transfer-Encoding": "chunked"},
                                          chunked(split3(body)))
    assert status == 413 and fields["Content-Type"].startswith("application/problem+json")
    problem = json.loads(text)
    assert problem["type"] == "urn:ietf:params:acme:error:malformed" and problem["status"] == 413
    assert "Replay-Nonce" in fields


# --- the http-01 validator reads the client's whole answer too -------------------------------

async def test_http01_answer_in_segments_validates():
    from acme import validators

    key_authorization = "token-abc." + "k" * 43
    answer = key_authorization.encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(answer)}\r\nConnection: close\r\n\r\n".encode()

    async def respond(reader, writer):
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        for piece in split3(answer):
            await writer.drain()
            await asyncio.sleep(PAUSE)
            writer.write(piece)
        await writer.drain()
        writer.close()
    responder = await asyncio.start_server(respond, "127.0.0.1", 0)
    port = responder.sockets[0].getsockname()[1]
    try:
        await validators.http01(validators.Target("dns", "seg.example.test"), "token-abc", key_authorization,
                                validators.ValidatorSettings(http01_port=port, resolve="*=127.0.0.1"))
    finally:
        responder.close()
        await responder.wait_closed()


# --- a body that came whole with the head ------------------------------------------------------

def _arrived(*pieces: bytes):
    from unittest import mock
    from aiohttp.streams import StreamReader
    stream = StreamReader(mock.Mock(_reading_paused=False), 2 ** 16, loop=asyncio.get_running_loop())
    for piece in pieces:
        stream.feed_data(piece)
    stream.feed_eof()
    return stream


async def test_a_body_already_received_is_taken_whole_with_no_deadline_armed(monkeypatch):
    """The common case (a small POST in the head's segment): read from the buffer at once; the
    cap holds on that path too."""
    from scepd import http_body
    from scepd.errors import PayloadTooLarge

    def no_deadline(*_args):
        raise AssertionError("a deadline was armed for a body that had already arrived")
    monkeypatch.setattr(http_body.asyncio, "timeout", no_deadline)
    assert await http_body.read_stream(_arrived(b"a" * 700, b"b" * 300), 1000) == b"a" * 700 + b"b" * 300
    assert await http_body.read_stream(_arrived(), 1000) == b""
    with pytest.raises(PayloadTooLarge):
        await http_body.read_stream(_arrived(b"a" * 700, b"b" * 301), 1000)
