"""Every TCP state transition, in one place (RFC 9293 3.3.2, Figure 5).

Rule (as in h11's ``_state.py``): the endpoint never assigns ``state`` itself;
it reports what happened as a ``TcpEvent`` and ``next_state`` looks the answer
up in ``TRANSITIONS``. A pair missing from the table is our own bug and raises
``TcpStateError`` loudly instead of silently wandering into a wrong state.

We are always the passive side of a connection the local application opened,
so LISTEN and SYN_SENT never occur: an endpoint is born in SYN_RECEIVED from
the peer's SYN (RFC 9293 3.10.7.2), with the SYN-ACK held back until the
application accepts the flow.

::

    SYN_RECEIVED --ACK of SYN--> ESTABLISHED --rcv FIN--> CLOSE_WAIT --CLOSE--> LAST_ACK
         |                            |                                             |
         |                          CLOSE                                   ACK of FIN
         v                            v                                             v
    (CLOSE queued until           FIN_WAIT_1 --ACK of FIN--> FIN_WAIT_2          CLOSED
     ESTABLISHED)                     |                          |
                                   rcv FIN                    rcv FIN
                                      v                          v
                                   CLOSING --ACK of FIN-->    TIME_WAIT --timeout--> CLOSED

    any state --RST / ABORT / TIMEOUT--> CLOSED
"""

from __future__ import annotations

import enum

from mypy_extensions import mypyc_attr

__all__ = ["TRANSITIONS", "TcpEvent", "TcpState", "TcpStateError", "next_state"]


class TcpState(enum.Enum):
    """Connection states named as RFC 9293 3.3.2 names them."""

    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"
    CLOSED = "CLOSED"


class TcpEvent(enum.Enum):
    RCV_ACK_OF_SYN = "rcv ACK of SYN"  # RFC 9293 3.10.7.4, SYN-RECEIVED STATE, fifth check
    RCV_FIN = "rcv FIN"  # RFC 9293 3.10.7.4, eighth check (in order)
    CLOSE = "CLOSE"  # the application shut down its write side (RFC 9293 3.10.4)
    RCV_ACK_OF_FIN = "rcv ACK of FIN"  # our FIN acknowledged (RFC 9293 3.10.7.4, fifth check)
    TIME_WAIT_TIMEOUT = "2MSL timeout"  # our short TIME-WAIT expired (RFC 9293 3.10.8)
    RCV_RST = "rcv RST"  # a valid RST (RFC 9293 3.10.7.4 second check, RFC 5961 3.2)
    ABORT = "ABORT"  # the application (or a refusal) reset the flow (RFC 9293 3.10.5)
    TIMEOUT = "timeout"  # retransmission / accept give-up (RFC 9293 3.8.3, 3.10.8)


S = TcpState
E = TcpEvent

TRANSITIONS: dict[tuple[TcpState, TcpEvent], TcpState] = {
    (S.SYN_RECEIVED, E.RCV_ACK_OF_SYN): S.ESTABLISHED,
    (S.ESTABLISHED, E.RCV_FIN): S.CLOSE_WAIT,
    (S.ESTABLISHED, E.CLOSE): S.FIN_WAIT_1,
    (S.FIN_WAIT_1, E.RCV_ACK_OF_FIN): S.FIN_WAIT_2,
    (S.FIN_WAIT_1, E.RCV_FIN): S.CLOSING,  # simultaneous close
    (S.FIN_WAIT_2, E.RCV_FIN): S.TIME_WAIT,
    (S.CLOSING, E.RCV_ACK_OF_FIN): S.TIME_WAIT,
    (S.CLOSE_WAIT, E.CLOSE): S.LAST_ACK,
    (S.LAST_ACK, E.RCV_ACK_OF_FIN): S.CLOSED,
    (S.TIME_WAIT, E.TIME_WAIT_TIMEOUT): S.CLOSED,
}
# RFC 9293 3.10.7.4 (second check) and 3.10.5: a reset ends every state.
for _state in TcpState:
    if _state is not S.CLOSED:
        for _event in (E.RCV_RST, E.ABORT, E.TIMEOUT):
            TRANSITIONS[(_state, _event)] = S.CLOSED

# States in which the peer may still send us data (its FIN not yet received).
RECEIVING = frozenset({S.SYN_RECEIVED, S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2})
# States in which our FIN has been queued (the application shut its write side).
FIN_QUEUED = frozenset({S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSING, S.LAST_ACK, S.TIME_WAIT})


@mypyc_attr(native_class=False)  # mypyc compiles no subclass of RuntimeError natively
class TcpStateError(RuntimeError):
    """An event the state machine has no transition for: a bug in the endpoint."""


def next_state(state: TcpState, event: TcpEvent) -> TcpState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TcpStateError(f"no transition from {state.value} on {event.value}") from None
