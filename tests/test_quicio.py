"""quicio's packet-size arithmetic and its flush batching, with bytes and a hand-set clock."""

from __future__ import annotations

from typing import Any

import pytest

from tunproxy.quicio import MIN_DATAGRAM_SIZE, datagram_size, flush, sendable_size


@pytest.mark.parametrize(
    ("mtu", "ipv6", "cap", "size"),
    [
        (1500, False, 65527, 1472),
        (1500, True, 65527, 1452),
        (9000, False, 65527, 8972),
        (9000, True, 8000, 8000),
        (1280, True, 65527, 1232),
        (1220, True, 65527, MIN_DATAGRAM_SIZE),  # never below what every QUIC path carries
        (65536, False, 65527, 65508),
    ],
)
def test_datagram_size(mtu: int, ipv6: bool, cap: int, size: int) -> None:
    assert datagram_size(mtu, ipv6, cap) == size


class _Core:
    def __init__(self, transmits: list[tuple[bytes, Any]]) -> None:
        self.transmits = list(transmits)
        self.polled_at: list[float] = []

    def poll_transmit(self, now: float) -> tuple[bytes, Any] | None:
        self.polled_at.append(now)
        return self.transmits.pop(0) if self.transmits else None


class _Params:
    def __init__(self, size: int | None) -> None:
        self.max_udp_payload_size = size


class _Quic:
    def __init__(self, core: _Core, timer: float | None) -> None:
        self._core = core
        self._quic_logger = None
        self._applied_transport_parameters: _Params | None = None
        self.timer = timer

    def get_timer(self) -> float | None:
        return self.timer


class _Loop:
    def __init__(self) -> None:
        self.armed: list[float] = []

    def call_at(self, when: float, callback: Any) -> Any:
        self.armed.append(when)
        return _Handle()


class _Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Protocol:
    def __init__(self, quic: _Quic) -> None:
        self._quic = quic
        self._loop = _Loop()
        self._timer: Any = None
        self._timer_at: float | None = None
        self._transmit_task: Any = object()
        self.sent: list[tuple[list[bytes], Any]] = []
        self._sendto_many = lambda datagrams, addr: self.sent.append((list(datagrams), addr))

    def _loop_time(self) -> float:
        return 12.5

    def _handle_timer(self) -> None:
        pass


def test_flush_sends_one_batch_per_run_of_one_destination_and_arms_the_timer() -> None:
    a, b = ("10.0.0.1", 443), ("10.0.0.2", 443)
    core = _Core([(b"1" * 1400, a), (b"2" * 1400, a), (b"3" * 90, a), (b"4" * 1400, b),
                  (b"5" * 50, a)])
    protocol = _Protocol(_Quic(core, timer=13.0))
    flush(protocol)
    assert protocol.sent == [([b"1" * 1400, b"2" * 1400, b"3" * 90], a), ([b"4" * 1400], b),
                             ([b"5" * 50], a)]
    assert set(core.polled_at) == {12.5}  # the caller's clock, once per flush
    assert protocol._transmit_task is None
    assert protocol._loop.armed == [13.0] and protocol._timer_at == 13.0
    # Nothing due: no send, and the same deadline is not armed twice.
    flush(protocol)
    assert len(protocol.sent) == 3 and protocol._loop.armed == [13.0]
    # A new deadline replaces the old timer.
    old = protocol._timer
    protocol._quic.timer = 14.0
    flush(protocol)
    assert old.cancelled and protocol._loop.armed == [13.0, 14.0]


def test_sendable_size_is_bounded_by_what_the_peer_announced() -> None:
    quic = _Quic(_Core([]), None)
    assert sendable_size(quic, 8952) == 8952  # before the handshake: our own
    quic._applied_transport_parameters = _Params(1472)
    assert sendable_size(quic, 8952) == 1472
    assert sendable_size(quic, 1200) == 1200
    quic._applied_transport_parameters = _Params(None)  # absent: RFC 9000's 65527
    assert sendable_size(quic, 8952) == 8952


def test_flush_with_a_quic_logger_takes_the_librarys_way_with_the_same_batches() -> None:
    a, b = ("10.0.0.1", 443), ("10.0.0.2", 443)

    class _LoggedQuic(_Quic):
        def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
            self.asked_at = now
            return [(b"x" * 1200, a), (b"y" * 1200, a), (b"z" * 40, b)]

    quic = _LoggedQuic(_Core([(b"never", a)]), timer=None)
    quic._quic_logger = object()  # type: ignore[assignment]
    protocol = _Protocol(quic)
    flush(protocol)
    assert protocol.sent == [([b"x" * 1200, b"y" * 1200], a), ([b"z" * 40], b)]
    assert quic.asked_at == 12.5 and quic._core.polled_at == []
    assert protocol._loop.armed == [] and protocol._timer is None
