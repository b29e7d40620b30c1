"""DNS-over-TCP framing: messages survive any segmentation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunproxy.dns.framing import TcpFramer


def test_two_messages_in_one_segment_and_one_split() -> None:
    framer = TcpFramer()
    stream = TcpFramer.frame(b"first") + TcpFramer.frame(b"second")
    assert framer.receive(stream[:9]) == [b"first"]
    assert framer.pending == 2
    assert framer.receive(stream[9:]) == [b"second"]
    assert framer.pending == 0


def test_empty_message_and_oversize() -> None:
    assert TcpFramer().receive(b"\x00\x00") == [b""]
    with pytest.raises(ValueError):
        TcpFramer.frame(b"x" * 65536)


@given(
    st.lists(st.binary(max_size=300), max_size=8),
    st.lists(st.integers(min_value=1, max_value=50), max_size=40),
)
def test_any_segmentation_reassembles(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(TcpFramer.frame(m) for m in messages)
    framer = TcpFramer()
    out: list[bytes] = []
    offset = 0
    for size in cuts:
        out += framer.receive(stream[offset : offset + size])
        offset += size
    out += framer.receive(stream[offset:])
    assert out == messages and framer.pending == 0
