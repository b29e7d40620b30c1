"""SVCB/HTTPS RDATA loses ipv4hint, ipv6hint and ech (RFC 9460)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunproxy.dns.svcb import SvcbError, strip_svc_params

# A real HTTPS answer's RDATA (cloudflare, as quoted in dnslib's docs):
# 1 . alpn=h3,h3-29,h2 ipv4hint=104.16.132.229,104.16.133.229 ipv6hint=2606:4700::...
CLOUDFLARE = bytes.fromhex(
    "0001000001000c0268330568332d323902683200040008681084e5681085e5"
    "00060020260647000000000000000000681084e5260647000000000000000000681085e5"
)
ALPN = bytes.fromhex("0001000c0268330568332d3239026832")


def param(key: int, value: bytes) -> bytes:
    return struct.pack("!HH", key, len(value)) + value


def rdata(priority: int, target: bytes, *params: bytes) -> bytes:
    return struct.pack("!H", priority) + target + b"".join(params)


def test_real_record_keeps_alpn_only() -> None:
    assert strip_svc_params(CLOUDFLARE) == b"\x00\x01\x00" + ALPN


def test_ech_is_stripped_and_port_kept() -> None:
    port = param(3, b"\x01\xbb")
    data = rdata(1, b"\x03svc\x04test\x00", port, param(5, b"ECHCONFIG"), param(6, b"\x00" * 16))
    assert strip_svc_params(data) == rdata(1, b"\x03svc\x04test\x00", port)


def test_mandatory_stripped_key_drops_the_record() -> None:
    data = rdata(1, b"\x00", param(0, b"\x00\x05"), param(5, b"ECH"))
    assert strip_svc_params(data) is None


def test_mandatory_other_key_is_kept() -> None:
    data = rdata(1, b"\x00", param(0, b"\x00\x03"), param(3, b"\x01\xbb"), param(4, b"\x0a" * 4))
    assert strip_svc_params(data) == rdata(1, b"\x00", param(0, b"\x00\x03"), param(3, b"\x01\xbb"))


def test_alias_mode_is_unchanged() -> None:
    data = rdata(0, b"\x03foo\x04test\x00")
    assert strip_svc_params(data) == data


@pytest.mark.parametrize(
    "data",
    [
        b"\x00",
        rdata(1, b"\x03fo"),  # target runs past the end
        rdata(1, b"\xc0\x0c"),  # compressed target
        rdata(1, b"\x00", b"\x00\x04\x00"),  # truncated param header
        rdata(1, b"\x00", b"\x00\x04\x00\x08\x01\x02"),  # truncated value
        rdata(1, b"\x00", param(0, b"\x00")),  # odd mandatory list
    ],
)
def test_malformed_rdata_raises(data: bytes) -> None:
    with pytest.raises(SvcbError):
        strip_svc_params(data)


@given(st.binary(max_size=64))
def test_random_bytes_raise_only_svcb_error(data: bytes) -> None:
    try:
        out = strip_svc_params(data)
    except SvcbError:
        return
    assert out is None or len(out) <= len(data)


@given(st.lists(st.tuples(st.integers(0, 10), st.binary(max_size=8)), max_size=6))
def test_no_stripped_key_survives(params: list[tuple[int, bytes]]) -> None:
    keys = sorted({k for k, _ in params if k != 0})
    values = dict((k, v) for k, v in params)
    data = rdata(1, b"\x00", *(param(k, values[k]) for k in keys))
    out = strip_svc_params(data)
    assert out is not None
    offset, seen = 3, []
    while offset < len(out):
        key, length = struct.unpack_from("!HH", out, offset)
        seen.append(key)
        offset += 4 + length
    assert seen == [k for k in keys if k not in (4, 5, 6)]
