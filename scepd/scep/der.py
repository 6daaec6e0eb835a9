"""Minimal DER building blocks for structures whose byte order we must control
(SET OF certificates in wire order, signed attributes signed exactly as emitted)."""
from __future__ import annotations

import datetime as dt
import functools

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


@functools.lru_cache(maxsize=256)
def oid(dotted: str) -> bytes:
    return core.ObjectIdentifier(dotted).dump()


def integer(n: int) -> bytes:
    if n < 0:
        return core.Integer(n).dump()
    return tlv(0x02, n.to_bytes((n.bit_length() + 8) // 8, "big"))  # room for the sign bit


def octet_string(b: bytes) -> bytes:
    return tlv(0x04, b)


def printable(s: str) -> bytes:
    """PrintableString, encoded as asn1crypto encodes one (latin-1 octets, not checked
    against the PrintableString alphabet), without building one."""
    if not isinstance(s, str):
        raise TypeError(f"PrintableString value must be a unicode string, not {type(s).__name__}")
    return tlv(0x13, s.encode("latin1"))


def utf8(s: str) -> bytes:
    if not isinstance(s, str):
        raise TypeError(f"UTF8String value must be a unicode string, not {type(s).__name__}")
    return tlv(0x0C, s.encode("utf-8"))


def null() -> bytes:
    return b"\x05\x00"


def utc_time(t: dt.datetime) -> bytes:
    """UTCTime (YYMMDDHHMMSSZ) as asn1crypto's UTCTime encodes it, without building one (every
    reply carries a signingTime): years 1950-2049 only; a naive time is local time, as before."""
    t = t.astimezone(dt.timezone.utc)
    if not 1950 <= t.year <= 2049:
        raise ValueError("Year of the UTCTime is not in range [1950, 2049], use GeneralizedTime instead")
    return b"\x17\x0d" + t.strftime("%y%m%d%H%M%SZ").encode("ascii")


def algorithm(dotted: str, params: bytes | None = None) -> bytes:
    return seq(oid(dotted), params if params is not None else b"")


#: Deepest nesting accepted in anything we parse (constructed elements, plus DER carried inside
#: OCTET/BIT STRINGs). Real SCEP, CSR and OCSP messages stay under 25; the bound keeps every
#: walker here iterative-and-bounded and keeps asn1crypto (which recurses) far from Python's
#: recursion limit.
MAX_DEPTH = 64


def _header(data: bytes, pos: int) -> tuple[int, int, int | None]:
    """(tag, header_end, content_end) of the element at pos; content_end None: indefinite."""
    if pos + 2 > len(data):
        raise ValueError("truncated")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("high tag numbers are not used in SCEP")
    first = data[pos + 1]
    p = pos + 2
    if first == 0x80:
        if not tag & 0x20:
            raise ValueError("indefinite length on a primitive")
        return tag, p, None
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
    return tag, p, p + size


def read_tlv(data: bytes, pos: int = 0, max_depth: int = MAX_DEPTH) -> tuple[int, int, int, int]:
    """(tag, header_end, content_end, next) for the element at pos; BER indefinite lengths
    are resolved by walking forward (no recursion; at most `max_depth` open indefinite
    levels). Raises ValueError on truncation or deeper nesting."""
    tag, start, end = _header(data, pos)
    if end is not None:
        return tag, start, end, end
    open_levels, q = 1, start
    while True:  # bounded: q advances by at least 2 bytes each turn
        if q + 2 > len(data):
            raise ValueError("truncated")
        if data[q] == 0 and data[q + 1] == 0:
            open_levels -= 1
            q += 2
            if open_levels == 0:
                return tag, start, q - 2, q
            continue
        _t, h, e = _header(data, q)
        if e is None:
            open_levels += 1
            if open_levels > max_depth:
                raise ValueError("nested too deeply")
            q = h
        else:
            q = e


def string_octets(element: bytes, max_depth: int = 8) -> bytes:
    """The octets of an (implicitly tagged) OCTET STRING, primitive or BER-constructed (chunks,
    themselves OCTET STRINGs, nested at most `max_depth` levels). Iterative."""
    tag, start, end, _ = read_tlv(element)
    if not tag & 0x20:
        return element[start:end]
    out = bytearray()
    stack = [(start, end, 1)]  # regions still to walk, innermost last
    while stack:  # bounded: every turn consumes one element or one exhausted region
        pos, stop, depth = stack.pop()
        if pos >= stop:
            continue
        t, s, e, nxt = read_tlv(element, pos)
        if nxt > stop or t & 0x1F != 0x04:
            raise ValueError("a constructed OCTET STRING chunk is not an OCTET STRING")
        stack.append((nxt, stop, depth))
        if t & 0x20:
            if depth >= max_depth:
                raise ValueError("nested too deeply")
            stack.append((s, e, depth + 1))
        else:
            out += element[s:e]
    return bytes(out)


class NestingTooDeep(ValueError):
    """Nested deeper than the bound (see MAX_DEPTH)."""


def check_nesting(data: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Raise ValueError unless `data` is a run of complete BER elements nested at most
    `max_depth` deep (NestingTooDeep when too deep). DER carried inside a primitive OCTET STRING
    or BIT STRING (certificate extensions, subjectPublicKey, eContent) counts one level deeper
    when it parses as such, since asn1crypto will parse it too; when it does not parse it is
    just octets. One forward pass, no recursion: a cheap pre-scan before handing untrusted bytes
    to a parser that recurses."""
    size = len(data)
    # open regions, innermost last: (end or None for indefinite, bound, speculative)
    frames: list[tuple[int | None, int, bool]] = [(size, size, False)]
    end, bound = size, size
    pos = 0
    while frames:  # bounded: each turn advances pos or closes a region opened by an earlier turn
        try:
            if pos == end:
                frames.pop()
                if frames:
                    end, bound = frames[-1][0], frames[-1][1]
                continue
            if pos + 2 > bound:
                raise ValueError("truncated")
            tag = data[pos]
            first = data[pos + 1]
            if end is None and tag == 0 and first == 0:
                frames.pop()
                pos += 2
                if frames:
                    end, bound = frames[-1][0], frames[-1][1]
                continue
            if len(frames) > max_depth:
                raise NestingTooDeep("nested too deeply")
            # _header, inlined with the current region kept in locals: this loop runs for every
            # element of every message (some 250 for a PKCSReq: message, envelope, CSR)
            if tag & 0x1F == 0x1F:
                raise ValueError("high tag numbers are not used in SCEP")
            p = pos + 2
            if first == 0x80:
                if not tag & 0x20:
                    raise ValueError("indefinite length on a primitive")
                frames.append((None, bound, False))
                end = None
                pos = p
                continue
            if first & 0x80:
                n = first & 0x7F
                if n == 0 or n > 4 or p + n > size:
                    raise ValueError("bad length")
                length = int.from_bytes(data[p:p + n], "big")
                p += n
            else:
                length = first
            content_end = p + length
            if content_end > size:
                raise ValueError("truncated")
            if content_end > bound:
                raise ValueError("an element overruns its parent")
            if tag & 0x20:
                frames.append((content_end, content_end, False))
                end = bound = content_end
                pos = p
                continue
            pos = content_end
            inner = p + 1 if tag == 0x03 else p
            if content_end - inner >= 2 and (tag == 0x04 or (tag == 0x03 and data[p] == 0)):
                frames.append((content_end, content_end, True))  # maybe encapsulated DER
                end = bound = content_end
                pos = inner
        except NestingTooDeep:
            raise
        except ValueError:
            while frames and not frames[-1][2]:  # not DER after all: skip that string's octets
                frames.pop()
            if not frames:
                raise
            pos = frames.pop()[0]
            if frames:
                end, bound = frames[-1][0], frames[-1][1]
