#!/usr/bin/env python3
"""Long-running fuzzer for ``stack.Stack.receive_packet`` (outside CI).

Three ways to fuzz the stack for a long time:

1. The hypothesis target, with many more examples than CI runs::

       TUNPROXY_FUZZ_EXAMPLES=500000 python3 -m pytest -q tests/test_fuzz_stack.py

2. This script's own mutation loop (no extra dependency): valid seed packets
   (TCP handshakes and data, UDP, ICMP, IPv4 fragments, with and without a
   virtio-net header) are mutated (bit flips, byte sets, truncation, splicing)
   and fed to a Stack together with random commands; every emitted packet is
   checked by ``tests.ippeer.parse_out``. A crashing input is written to
   ``--crash-dir`` and the script exits non-zero::

       python3 bench/fuzz_stack.py --seconds 3600 --seed 1

3. Coverage-guided with atheris (``pip install atheris``; not a project
   dependency), same checks, one input = a sequence of length-prefixed packets::

       python3 bench/fuzz_stack.py --atheris -- -max_total_time=3600
"""

from __future__ import annotations

import argparse
import pathlib
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from stack import FlowOpened, Refusal, Stack, StackConfig
from stack.wire import tcp
from tests.ippeer import (
    A4,
    A6,
    B4,
    B6,
    icmp4_echo,
    icmp6_msg,
    ip_packet,
    parse_out,
    tcp_l4,
    udp_l4,
    with_vnet,
)


def seeds() -> list[bytes]:
    out = []
    for a, b in ((A4, B4), (A6, B6)):
        for flags in (tcp.SYN, tcp.ACK, tcp.ACK | tcp.PSH, tcp.FIN | tcp.ACK, tcp.RST):
            seg = tcp.TcpRepr(40000, 443, 1000, 0, flags, 65535, mss=1460, window_scale=7,
                              sack_permitted=True, timestamp=(1, 0))  # fmt: skip
            out.append(ip_packet(a, b, 6, tcp_l4(a, b, seg, b"data" * (flags & tcp.PSH))))
        out.append(ip_packet(a, b, 17, udp_l4(a, b, 5353, 53, b"query")))
    out.append(ip_packet(A4, B4, 1, icmp4_echo(1, 2, b"ping")))
    out.append(ip_packet(A6, B6, 58, icmp6_msg(A6, B6, 128, 1, 2, b"ping")))
    l4 = udp_l4(A4, B4, 1, 2, bytes(3000))
    for off in range(0, len(l4), 1480):
        flags = (off // 8) | (0x2000 if off + 1480 < len(l4) else 0)
        out.append(ip_packet(A4, B4, 17, l4[off : off + 1480], ident=3, flags_frag=flags))
    l4 = udp_l4(A6, B6, 1, 2, bytes(3000))
    for off in range(0, len(l4), 1232):
        more = off + 1232 < len(l4)
        frag = bytes([17, 0]) + (off | more).to_bytes(2, "big") + (5).to_bytes(4, "big")
        out.append(ip_packet(A6, B6, 44, frag + l4[off : off + 1232]))
    return out


def mutate(rng: random.Random, packet: bytes, pool: list[bytes]) -> bytes:
    buf = bytearray(packet)
    for _ in range(rng.choice((0, 0, 1, 1, 2, 4))):
        op = rng.randrange(4)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            del buf[rng.randrange(len(buf) + 1) :]
        else:
            other = rng.choice(pool)
            cut = rng.randrange(len(other) + 1)
            buf[rng.randrange(len(buf) + 1) :] = other[cut:]
    return bytes(buf)


def check(stack: Stack) -> None:
    for raw in stack.packets_to_send():
        parse_out(raw, stack.config.vnet_hdr)
    c = stack.counters
    assert c["flows.open"] == c["flows.tcp"] + c["flows.udp"]
    assert 0 <= c["flows.half_open"] <= c["flows.tcp"]


def run_case(rng: random.Random, pool: list[bytes], vnet: bool) -> list[bytes]:
    stack = Stack(StackConfig(vnet_hdr=vnet, gso=rng.random() < 0.5, max_flows=16,
                              max_half_open=8, reassembly_limit=8192, seed=1))  # fmt: skip
    now = 0.0
    flows: list[int] = []
    fed: list[bytes] = []
    for _ in range(rng.randrange(1, 30)):
        packet = mutate(rng, rng.choice(pool), pool)
        if vnet:
            packet = with_vnet(packet, flags=rng.choice((0, 1, 2)),
                               gso_type=rng.choice((0, 0, 1, 4, 5)),
                               gso_size=rng.randrange(0, 3000))  # fmt: skip
        fed.append(packet)
        stack.receive_packet(packet, now)
        while (ev := stack.next_event()) is not None:
            if isinstance(ev, FlowOpened):
                flows.append(ev.flow)
        if flows:
            flow = rng.choice(flows)
            cmd = rng.randrange(9)
            if cmd == 0:
                stack.accept(flow, now)
            elif cmd == 1:
                stack.refuse(flow, rng.choice((Refusal.RESET, Refusal.UNREACHABLE,
                                               Refusal.DROP, Refusal.PROHIBITED)), now)  # fmt: skip
            elif cmd == 2:
                stack.send(flow, bytes(rng.randrange(5000)), now)
            elif cmd == 3:
                stack.shutdown_write(flow, now)
            elif cmd == 4:
                stack.abort(flow, now)
            elif cmd == 5:
                stack.send_datagram(flow, bytes(rng.randrange(3000)), now)
            elif cmd == 6:
                stack.pause_receiving(flow)
            elif cmd == 7:
                stack.resume_receiving(flow, now)
        check(stack)
        now += rng.choice((0.0, 0.01, 0.3, 3.0, 50.0))
        timer = stack.get_timer()
        if timer is not None and timer <= now:
            stack.handle_timer(now)
            check(stack)
    return fed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--crash-dir", type=pathlib.Path, default=pathlib.Path("fuzz-crashes"))
    parser.add_argument("--atheris", action="store_true", help="coverage-guided (needs atheris)")
    args, rest = parser.parse_known_args()
    if args.atheris:
        return run_atheris(rest)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    pool = seeds()
    print(f"fuzzing for {args.seconds:.0f}s, seed {seed}")
    deadline = time.monotonic() + args.seconds
    cases = 0
    while time.monotonic() < deadline:
        case_seed = rng.randrange(1 << 63)
        try:
            fed = run_case(random.Random(case_seed), pool, vnet=case_seed & 1 == 1)
        except Exception:
            args.crash_dir.mkdir(parents=True, exist_ok=True)
            path = args.crash_dir / f"case-{case_seed}.txt"
            path.write_text(f"seed {seed} case_seed {case_seed}\n")
            print(f"CRASH: reproduce with run_case(random.Random({case_seed}), ...); {path}")
            raise
        cases += 1
        if len(fed) > 3 and rng.random() < 0.01:
            pool.append(rng.choice(fed))  # grow the pool with mutated survivors
    print(f"{cases} cases, no failure")
    return 0


def run_atheris(argv: list[str]) -> int:
    import atheris  # type: ignore[import-not-found]

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        vnet = fdp.ConsumeBool()
        stack = Stack(StackConfig(vnet_hdr=vnet, max_flows=16, seed=1))
        now = 0.0
        while fdp.remaining_bytes():
            stack.receive_packet(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2000)), now)
            while (ev := stack.next_event()) is not None:
                if isinstance(ev, FlowOpened) and fdp.ConsumeBool():
                    stack.accept(ev.flow, now)
            check(stack)
            now += fdp.ConsumeIntInRange(0, 100) / 10
            if (t := stack.get_timer()) is not None and t <= now:
                stack.handle_timer(now)
                check(stack)

    atheris.Setup([sys.argv[0], *argv], one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
