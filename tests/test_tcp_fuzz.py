"""Hostile segments: whatever the peer sends, the endpoint never raises and keeps its
promises (at most one final event, nothing but TCP segments out, sane sequence state)."""

from __future__ import annotations

from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st

from stack.events import FlowClosed, FlowReset
from stack.tcp import TcpState
from stack.wire.tcp import TcpRepr
from tests.tcp_peer import CLIENT_ISS, SERVER_ISS, Conn, make_config

MASK = 0xFFFFFFFF

near = st.integers(-70_000, 70_000)
u32 = st.integers(0, MASK)


@st.composite
def hostile_segment(draw: st.DrawFn) -> tuple[TcpRepr, bytes]:
    seq = (CLIENT_ISS + 1 + draw(near)) & MASK if draw(st.booleans()) else draw(u32)
    ack = (SERVER_ISS + 1 + draw(near)) & MASK if draw(st.booleans()) else draw(u32)
    blocks = draw(
        st.lists(
            st.tuples(
                st.integers(-70_000, 70_000).map(lambda d: (SERVER_ISS + 1 + d) & MASK),
                st.integers(-70_000, 70_000).map(lambda d: (SERVER_ISS + 1 + d) & MASK),
            ),
            max_size=3,
        )
    )
    seg = TcpRepr(
        40000,
        443,
        seq,
        ack,
        draw(st.integers(0, 0xFF)),
        draw(st.integers(0, 0xFFFF)),
        sack_blocks=tuple(blocks),
        timestamp=draw(st.none() | st.tuples(u32, u32)),
    )
    return seg, draw(st.binary(max_size=3000))


@st.composite
def actions(draw: st.DrawFn) -> list[tuple[str, object]]:
    choices = st.one_of(
        hostile_segment().map(lambda s: ("segment", s)),
        st.floats(0.0, 3.0).map(lambda dt: ("time", dt)),
        st.binary(min_size=1, max_size=5000).map(lambda d: ("send", d)),
        st.sampled_from(["shutdown", "pause", "resume", "abort"]).map(lambda a: (a, None)),
    )
    return draw(st.lists(choices, max_size=40))


@given(actions(), st.booleans())
@settings(max_examples=300, deadline=None)
def test_hostile_input_never_breaks_the_endpoint(
    script: list[tuple[str, object]], gso: bool
) -> None:
    c = Conn(config=make_config(max_payload=65000 if gso else 1460, max_retries=3))
    c.peer.write(b"hello")
    c.pump()
    events = c.take_events()
    for action, arg in script:
        if action == "segment":
            hostile, data = cast(tuple[TcpRepr, bytes], arg)
            c.ep.receive_segment(hostile, memoryview(data), c.now)
        elif action == "time":
            c.now += cast(float, arg)
            timer = c.ep.get_timer()
            if timer is not None and timer <= c.now:
                c.ep.handle_timer(c.now)
        elif action == "send":
            c.ep.send(cast(bytes, arg), c.now)
        elif action == "shutdown":
            c.ep.shutdown_write(c.now)
        elif action == "pause":
            c.ep.pause_receiving()
        elif action == "resume":
            c.ep.resume_receiving(c.now)
        elif action == "abort":
            c.ep.abort(c.now)
        for seg, payload in c.ep.segments_to_send(c.now):
            assert len(payload) <= max(c.config.max_payload, c.ep.effective_mss)
            assert seg.header_len() <= 60
            assert (seg.src_port, seg.dst_port) == (443, 40000)
        events.extend(c.take_events())
        ep = c.ep
        assert ep._snd_una <= ep._snd_max
        assert ep._ooo is None or ep._ooo.held <= c.config.receive_window + (1 << ep._rcv_shift)
        assert ep._held_bytes <= c.config.receive_window + (1 << ep._rcv_shift)
    finals = [e for e in events if isinstance(e, FlowClosed | FlowReset)]
    assert len(finals) <= 1
    if c.ep.closed:
        assert c.state() is TcpState.CLOSED
