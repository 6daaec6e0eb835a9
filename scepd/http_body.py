"""Whole HTTP bodies, bounded in size and time.

aiohttp's `StreamReader.read(n)` returns what is buffered, up to n bytes, not n bytes: a body that
arrives in several TCP segments would be cut at the first one. These helpers read to the end of
the body (Content-Length or chunked transfer-encoding alike: aiohttp decodes the framing) with a
cap and a deadline. Used by the SCEP, OCSP and ACME handlers and the http-01 validator.
"""
from __future__ import annotations

import asyncio

from .errors import MalformedRequest, PayloadTooLarge

#: Seconds for a whole request body to arrive (a client that stalls mid-body gets a 400).
BODY_TIMEOUT = 30.0


async def read_stream(stream, limit: int, timeout: float = BODY_TIMEOUT) -> bytes:
    """Everything up to EOF from an aiohttp StreamReader (request.content or response.content).
    PayloadTooLarge as soon as more than `limit` bytes arrived, MalformedRequest when the end
    does not come within `timeout` seconds."""
    if stream.is_eof():  # the whole body came with the head (a small POST, mostly): take what is
        body = stream.read_nowait(limit + 1)  # buffered, with no deadline to arm and no wait;
        if len(body) > limit:  # fewer than limit + 1 bytes means the buffer is empty now
            raise PayloadTooLarge(f"request body over {limit} bytes")
        return body
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while len(body) <= limit:  # bounded: every turn reads >= 1 byte, or stops at EOF
                chunk = await stream.read(limit + 1 - len(body))
                if not chunk:
                    break
                body += chunk
    except TimeoutError:
        raise MalformedRequest("the request body did not arrive in time") from None
    if len(body) > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    return bytes(body)


async def read_body(request, limit: int, timeout: float = BODY_TIMEOUT) -> bytes:
    """The whole body of an aiohttp request, at most `limit` bytes (PayloadTooLarge, before
    reading anything when Content-Length already says so)."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    return await read_stream(request.content, limit, timeout)
