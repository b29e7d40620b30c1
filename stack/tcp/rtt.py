"""Round-trip time estimation and the retransmission timeout (RFC 6298)."""

from __future__ import annotations

__all__ = ["RttEstimator"]

_K = 4
_ALPHA = 0.125
_BETA = 0.25
_CLOCK_GRANULARITY = 0.001  # G in RFC 6298 2: our timestamps tick in milliseconds


class RttEstimator:
    """SRTT/RTTVAR smoothing (RFC 6298 2) with exponential backoff (5.5)."""

    __slots__ = ("_backoff", "max_rto", "min_rto", "rttvar", "srtt")

    def __init__(self, min_rto: float, max_rto: float) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.min_rto = min_rto
        self.max_rto = max_rto
        self._backoff = 0

    def sample(self, rtt: float) -> None:
        """RFC 6298 2.2 / 2.3. A new sample also ends any backoff (5.7 "collapse")."""
        rtt = max(rtt, 0.0)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(self.srtt - rtt)
            self.srtt = (1 - _ALPHA) * self.srtt + _ALPHA * rtt
        self._backoff = 0

    @property
    def rto(self) -> float:
        """RFC 6298 2.1 (initial 1 s), 2.4 (lower bound), 2.5 (upper bound), 5.5 (backoff)."""
        srtt = self.srtt
        base = 1.0 if srtt is None else srtt + max(_CLOCK_GRANULARITY, _K * self.rttvar)
        base = max(base, self.min_rto)
        return min(base * (1 << self._backoff), self.max_rto)

    def backoff(self) -> None:
        """RFC 6298 5.5: double the RTO after a retransmission timeout."""
        if self._backoff < 16:
            self._backoff += 1

    def reset_backoff(self) -> None:
        self._backoff = 0
