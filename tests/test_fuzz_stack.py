"""Fuzz target for ``Stack.receive_packet`` and the commands around it.

Hostile input may only ever be dropped and counted: no exception escapes, every
packet the stack emits is well formed (``parse_out`` verifies IP and L4
checksums, completing NEEDS_CSUM sums), and the flow gauges stay consistent.

CI runs a few hundred examples. For a long run outside CI::

    TUNPROXY_FUZZ_EXAMPLES=200000 python3 -m pytest -q tests/test_fuzz_stack.py

(``bench/fuzz_stack.py`` runs the same target under atheris when it is installed.)
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stack import FlowOpened, Refusal, Stack, StackConfig
from stack.wire import tcp, virtio
from stack.wire.checksum import pseudo_header_sum
from tests.ippeer import A4, A6, B4, B6, icmp4_echo, icmp6_msg, ip_packet, parse_out, tcp_l4, udp_l4

EXAMPLES = int(os.environ.get("TUNPROXY_FUZZ_EXAMPLES", "300"))

ports = st.sampled_from([1, 53, 443, 40000, 40000, 40000, 0, 65535])
u32 = st.sampled_from([0, 1000, 1001, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF)
tcp_flags = st.sampled_from(
    [tcp.SYN, tcp.SYN, tcp.ACK, tcp.ACK | tcp.PSH, tcp.FIN | tcp.ACK, tcp.RST, tcp.RST | tcp.ACK]
) | st.integers(0, 255)


def _sometimes(draw: st.DrawFn, one_in: int) -> bool:
    return draw(st.integers(0, one_in - 1)) == 0


@st.composite
def structured_packet(draw: st.DrawFn, vnet: bool) -> bytes:
    v6 = draw(st.booleans())
    a, b = (A6, B6) if v6 else (A4, B4)
    if _sometimes(draw, 10):
        b = bytes([224]) + b[1:] if not v6 else bytes([0xFF]) + b[1:]
    kind = draw(st.sampled_from(["tcp", "udp", "icmp", "frag"]))
    payload = draw(st.binary(max_size=64))
    if kind == "tcp":
        seg = tcp.TcpRepr(
            draw(ports), draw(ports), draw(u32), draw(u32), draw(tcp_flags),
            draw(st.integers(0, 0xFFFF)),
            mss=draw(st.none() | st.integers(0, 0xFFFF)),
            window_scale=draw(st.none() | st.integers(0, 20)),
            sack_permitted=draw(st.booleans()),
            timestamp=draw(st.none() | st.tuples(u32, u32)),
        )  # fmt: skip
        l4 = tcp_l4(a, b, seg, payload)
        proto = 6
    elif kind == "udp":
        l4 = udp_l4(a, b, draw(ports), draw(ports), payload)
        proto = 17
    elif kind == "icmp":
        t = draw(st.sampled_from([0, 3, 8, 11, 1, 128, 129, 133, 135, 143]))
        l4 = icmp6_msg(a, b, t, 1, 2, payload) if v6 else icmp4_echo(1, 2, payload, t)
        proto = 58 if v6 else 1
    else:
        l4 = payload + bytes(8)
        proto = 17
    flags_frag = 0x4000
    if kind == "frag" and not v6:
        flags_frag = draw(st.integers(0, 0x3FFF))
    elif kind == "frag":  # an IPv6 fragment header in front of the datagram piece
        off_m = draw(st.integers(0, 3)) * 8 | draw(st.integers(0, 1))
        l4 = bytes([17, 0]) + off_m.to_bytes(2, "big") + bytes(3) + bytes([draw(
            st.integers(0, 3))]) + l4  # fmt: skip
        proto = 44
    pkt = bytearray(ip_packet(a, b, proto, l4, ident=draw(st.integers(0, 3)),
                              flags_frag=flags_frag))  # fmt: skip
    for _ in range(draw(st.integers(0, 2)) if _sometimes(draw, 3) else 0):  # a few mutations
        if pkt:
            at = draw(st.integers(0, len(pkt) - 1))
            pkt[at] = draw(st.integers(0, 255))
    if _sometimes(draw, 6):
        pkt = pkt[: draw(st.integers(0, len(pkt)))]
    if vnet:
        hdr = bytearray(10)
        needs = draw(st.booleans())
        gso = draw(st.sampled_from([0, 0, 1, 4, 5, 3, 7]))
        virtio.emit_header(hdr, 0, int(needs) | draw(st.sampled_from([0, 2])), gso, 0,
                           draw(st.integers(0, 2000)), 0, 0)  # fmt: skip
        if needs and proto in (6, 17) and len(pkt) > (40 if v6 else 20) + 8:
            ip_len = 40 if v6 else 20
            at = ip_len + (16 if proto == 6 else 6)
            if at + 2 <= len(pkt):
                struct.pack_into("!H", pkt, at,
                                 pseudo_header_sum(a, b, proto, len(pkt) - ip_len))  # fmt: skip
        return bytes(hdr) + bytes(pkt)
    return bytes(pkt)


commands = st.sampled_from(
    ["accept", "refuse-reset", "refuse-unreach", "refuse-drop", "refuse-prohibited", "send",
     "shutdown", "abort", "pause", "resume", "datagram", "timer"]
)  # fmt: skip


def _check(s: Stack) -> None:
    for raw in s.packets_to_send():
        parse_out(raw, s.config.vnet_hdr)
    c = s.counters
    assert c["flows.open"] == c["flows.tcp"] + c["flows.udp"]
    assert 0 <= c["flows.half_open"] <= c["flows.tcp"]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data(), vnet=st.booleans(), gso=st.booleans())
def test_fuzz_receive_and_commands(data: st.DataObject, vnet: bool, gso: bool) -> None:
    s = Stack(StackConfig(vnet_hdr=vnet, gso=gso, max_flows=8, max_half_open=4,
                          reassembly_limit=4096, seed=1))  # fmt: skip
    now = 0.0
    flows: list[int] = []
    for _ in range(data.draw(st.integers(1, 12))):
        if not _sometimes(data.draw, 4):
            packet = data.draw(structured_packet(vnet))
        else:
            packet = data.draw(st.binary(max_size=120))
        s.receive_packet(packet, now)
        while (ev := s.next_event()) is not None:
            if isinstance(ev, FlowOpened):
                flows.append(ev.flow)
        if flows and not _sometimes(data.draw, 3):
            flow = data.draw(st.sampled_from([*flows, 999]))
            cmd = data.draw(commands)
            if cmd == "accept":
                s.accept(flow, now)
            elif cmd.startswith("refuse"):
                how = {"reset": Refusal.RESET, "unreach": Refusal.UNREACHABLE,
                       "drop": Refusal.DROP, "prohibited": Refusal.PROHIBITED}[cmd[7:]]  # fmt: skip
                s.refuse(flow, how, now)
            elif cmd == "send":
                s.send(flow, data.draw(st.binary(max_size=3000)), now)
            elif cmd == "shutdown":
                s.shutdown_write(flow, now)
            elif cmd == "abort":
                s.abort(flow, now)
            elif cmd == "pause":
                s.pause_receiving(flow)
            elif cmd == "resume":
                s.resume_receiving(flow, now)
            elif cmd == "datagram":
                s.send_datagram(flow, data.draw(st.binary(max_size=2000)), now)
            s.send_buffer_free(flow)
            s.flow_key(flow)
        _check(s)
        now += data.draw(st.sampled_from([0.0, 0.01, 0.5, 5.0, 40.0, 100.0]))
        timer = s.get_timer()
        if timer is not None and timer <= now:
            s.handle_timer(now)
            _check(s)
    # Eventually every UDP session, handshake and fragment times out: nothing leaks.
    for _ in range(200):
        timer = s.get_timer()
        if timer is None:
            break
        now = max(now, timer)
        s.handle_timer(now)
        while s.next_event() is not None:
            pass
        _check(s)
    c = s.counters
    event(f"flows opened: {min(len(flows), 3)}+, packets out: {min(c['packets.out'], 3)}+")
    assert c["reassembly.bytes"] == 0 and c["flows.udp"] == 0 and c["flows.half_open"] == 0
