"""Fuzz the BER helpers of scepd/scep/der.py: read_tlv (definite and indefinite lengths) and
string_octets (primitive and BER-constructed OCTET STRINGs), plus a round trip through the
DER builders (tlv / octet_string) that read_tlv and string_octets must undo exactly.

Seeds: nested BER made at start, and the encrypted contents of the captured messages.
Allowed: ValueError (read_tlv documents it for truncation and bad lengths).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's scepd wins
sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris  # noqa: E402

import common  # noqa: E402

with atheris.instrument_imports(include=["scepd"]):
    from asn1crypto import cms

    from scepd.scep import der

NAME = "der"
ALLOWED = (ValueError,)


def check(data: bytes) -> None:
    try:
        tag, start, end, nxt = der.read_tlv(data)
        assert 0 < start <= end <= nxt <= len(data)
        der.string_octets(data)
    except ALLOWED + common.TOLERATED:
        pass
    # the builders and the readers agree (tag from a small set of low tag numbers)
    content = data[1:]
    tag = (0x04, 0x30, 0x31, 0x80, 0xA0)[data[0] % 5] if data else 0x04
    enc = der.tlv(tag, content)
    t, s, e, n = der.read_tlv(enc)
    assert (t, enc[s:e], n) == (tag, content, len(enc)), "read_tlv does not undo tlv"
    assert der.string_octets(der.octet_string(content)) == content


def TestOneInput(data: bytes) -> None:
    check(data)


def seeds() -> list[bytes]:
    out = [
        b"\x04\x03abc",
        b"\x24\x80\x04\x02ab\x04\x01c\x00\x00",  # constructed, indefinite
        b"\x24\x0a\x04\x02ab\x24\x04\x04\x02cd",  # constructed, nested, definite
        b"\x30\x80\x30\x80\x04\x00\x00\x00\x00\x00",
        b"\x04\x82\x01\x00" + bytes(256),
    ]
    for path in common.vector_ders()[:6]:
        try:
            sd = cms.ContentInfo.load(path.read_bytes())["content"]
            out.append(sd["encap_content_info"]["content"].native or b"")
        except ValueError:
            continue
    return out


if __name__ == "__main__":
    common.main(NAME, TestOneInput, seeds)
