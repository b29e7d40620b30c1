"""The TCP engine: one ``TcpEndpoint`` per connection, driven by ``stack.Stack``.

Modules:
  ``endpoint``   the connection (RFC 9293) with SACK/NewReno loss recovery, RTO,
                 tail loss probes, window scaling, timestamps, flow control
  ``state``      every state transition, as a table (RFC 9293 3.3.2)
  ``seqnum``     sequence arithmetic mod 2**32 and unwrapping to stream offsets
  ``sendbuf``    the send buffer (chunks, zero-copy segment views)
  ``reassembly`` out-of-order data held above RCV.NXT
  ``scoreboard`` the sender's SACK scoreboard (RFC 6675)
  ``rtt``        SRTT/RTTVAR/RTO (RFC 6298)

Counters the engine increments in the stack's ``counters``: ``tcp.retransmits``
(segments sent again), ``tcp.rto``, ``tcp.fast_retransmits`` (recovery episodes),
``tcp.tail_loss_probes``, ``tcp.lost_retransmits``, ``tcp.dsacks``,
``tcp.spurious_retransmits``, ``tcp.undo``, ``tcp.window_probes``,
``tcp.challenge_acks``, ``tcp.paws_drops``, ``tcp.out_of_order``, ``tcp.beyond_window``.
"""

from stack.tcp.endpoint import TcpConfig, TcpEndpoint
from stack.tcp.state import TcpState

__all__ = ["TcpConfig", "TcpEndpoint", "TcpState"]
