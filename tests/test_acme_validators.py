"""The http-01 validator's own HTTP/1.1 GET (issue 13: a client session per validation cost
more than the fetch): every way a body can be framed, the cap on each, no redirect followed,
nothing but answers we can read, each validation on a connection of its own."""
from __future__ import annotations

import asyncio

import pytest

from acme import validators
from scepd.errors import ValidationConnection, ValidationFailed

KA = "tok.thumb"


class RawServer:
    """Answers each connection with the next canned bytes (then closes); records requests."""

    def __init__(self, answers: list[bytes]):
        self.answers, self.requests = list(answers), []

    async def handle(self, reader, writer):
        self.requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(self.answers.pop(0))
        await writer.drain()
        writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


def chunked(body: bytes, size: int = 3) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


async def validate(server: RawServer):
    settings = validators.ValidatorSettings(http01_port=server.port, resolve="*=127.0.0.1")
    await validators.http01(validators.Target("dns", "v.example.test"), "tok", KA, settings)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n" + KA.encode(),
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(KA.encode() + b"\n"),
    b"HTTP/1.0 200 OK\r\n\r\n" + KA.encode() + b"\r\n",  # delimited by the close
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n" + KA.encode(),
], ids=["content-length", "chunked", "close", "interim-1xx"])
async def test_http01_reads_every_framing(answer):
    async with RawServer([answer]) as server:
        await validate(server)
    request = server.requests[0].decode()
    assert request.startswith("GET /.well-known/acme-challenge/tok HTTP/1.1\r\n")
    assert "Host: v.example.test\r\n" in request and "Connection: close\r\n" in request


big = b"x" * (validators.MAX_BODY + 1)


@pytest.mark.parametrize("answer,error,match", [
    (b"HTTP/1.1 302 Found\r\nLocation: /.well-known/acme-challenge/other\r\nContent-Length: 0\r\n\r\n",
     ValidationFailed, "HTTP 302"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 4097\r\n\r\n" + big, ValidationFailed, "more than"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(big, 1000), ValidationFailed, "more than"),
    (b"HTTP/1.0 200 OK\r\n\r\n" + big, ValidationFailed, "more than"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nwrong.kaX", ValidationFailed, "HTTP 200 without"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", ValidationConnection, "could not fetch"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", ValidationConnection, "could not fetch"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", ValidationConnection, "could not fetch"),
    (b"HTTP/1.1 200 OK\r\nX-Long: " + b"h" * 20000 + b"\r\n\r\n", ValidationConnection, "could not fetch"),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n" + KA.encode(),
     ValidationConnection, "could not fetch"),
], ids=["redirect-not-followed", "length-over-cap", "chunked-over-cap", "close-over-cap", "wrong-body",
        "not-http", "truncated", "bad-chunk", "huge-header", "endless-interim"])
async def test_http01_refusals(answer, error, match):
    async with RawServer([answer]) as server:
        with pytest.raises(error, match=match):
            await validate(server)
    assert len(server.requests) == 1  # one connection, no redirect followed


async def test_http01_nothing_listening_is_a_connection_problem():
    from .acme_responders import free_port
    settings = validators.ValidatorSettings(http01_port=free_port(), resolve="*=127.0.0.1")
    with pytest.raises(ValidationConnection):
        await validators.http01(validators.Target("dns", "v.example.test"), "tok", KA, settings)
