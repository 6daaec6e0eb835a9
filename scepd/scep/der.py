"""Minimal DER building blocks for structures whose byte order we must control
(SET OF certificates in wire order, signed attributes signed exactly as emitted)."""
from __future__ import annotations

import datetime as dt

from asn1crypto import core


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + length(len(content)) + content


def seq(*parts: bytes) -> bytes:
    return tlv(0x30, b"".join(parts))


def set_of(*parts: bytes, sort: bool = True) -> bytes:
    """SET OF: DER sorts the encodings; pass sort=False to keep wire order (degenerate PKCS#7
    certificate lists, which clients read positionally)."""
    return tlv(0x31, b"".join(sorted(parts) if sort else parts))


def explicit(n: int, content: bytes) -> bytes:
    return tlv(0xA0 | n, content)


def oid(dotted: str) -> bytes:
    return core.ObjectIdentifier(dotted).dump()


def integer(n: int) -> bytes:
    return core.Integer(n).dump()


def octet_string(b: bytes) -> bytes:
    return tlv(0x04, b)


def printable(s: str) -> bytes:
    return core.PrintableString(s).dump()


def utf8(s: str) -> bytes:
    return core.UTF8String(s).dump()


def null() -> bytes:
    return b"\x05\x00"


def utc_time(t: dt.datetime) -> bytes:
    return core.UTCTime(t.astimezone(dt.timezone.utc).replace(microsecond=0)).dump()


def algorithm(dotted: str, params: bytes | None = None) -> bytes:
    return seq(oid(dotted), params if params is not None else b"")


def read_tlv(data: bytes, pos: int = 0) -> tuple[int, int, int, int]:
    """(tag, header_end, content_end, next) for the element at pos; BER indefinite lengths
    are resolved by walking the children. Raises ValueError on truncation."""
    if pos + 2 > len(data):
        raise ValueError("truncated")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("high tag numbers are not used in SCEP")
    first = data[pos + 1]
    p = pos + 2
    if first == 0x80:  # indefinite: children until 00 00
        if not tag & 0x20:
            raise ValueError("indefinite length on a primitive")
        q = p
        while data[q:q + 2] != b"\x00\x00":
            q = read_tlv(data, q)[3]
            if q >= len(data):
                raise ValueError("truncated")
        return tag, p, q, q + 2
    if first & 0x80:
        n = first & 0x7F
        if n == 0 or n > 4 or p + n > len(data):
            raise ValueError("bad length")
        size = int.from_bytes(data[p:p + n], "big")
        p += n
    else:
        size = first
    if p + size > len(data):
        raise ValueError("truncated")
    return tag, p, p + size, p + size


def string_octets(element: bytes) -> bytes:
    """The octets of an (implicitly tagged) OCTET STRING, primitive or BER-constructed (chunks)."""
    tag, start, end, _ = read_tlv(element)
    if not tag & 0x20:
        return element[start:end]
    out = bytearray()
    pos = start
    while pos < end:
        _t, _s, _e, nxt = read_tlv(element, pos)
        out += string_octets(element[pos:nxt])
        pos = nxt
    return bytes(out)
