"""The host's gatekeeping (DESIGN §7): per-peer request rates and range limits.

Sans-I/O: the host core calls these before it decodes or acts on a frame, so
hostile input costs little and changes nothing.  (Who may be whom is
:func:`protocol.types.name_matches_key`; refused handshakes are counted by the
host's shell, :mod:`broker.host`, from libzmq's socket monitor.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import Limits, ProtocolError


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """A token bucket per peer: ``rate`` frames a second, bursts of ``burst``.

    ``rate`` 0 means unlimited.  Idle peers' buckets are forgotten when more
    than ``max_peers`` are tracked (a flood of fresh routing ids cannot grow
    the table without bound; a forgotten peer starts with a full bucket, which
    it would have had anyway after an idle second).
    """

    def __init__(self, rate: int, burst: int = 0, max_peers: int = 4096) -> None:
        self.rate = float(rate)
        self.burst = float(burst or rate)
        self.max_peers = max_peers
        self._buckets: dict[Any, _Bucket] = {}

    def allow(self, peer: Any, now: float) -> bool:
        """Take one token for ``peer``; False when it has none left."""
        if self.rate <= 0:
            return True
        b = self._buckets.get(peer)
        if b is None:
            if len(self._buckets) >= self.max_peers:
                self._prune(now)
            b = self._buckets[peer] = _Bucket(self.burst, now)
        else:
            b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
            b.stamp = now
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True

    def _prune(self, now: float) -> None:
        full = self.burst / self.rate
        for peer in [p for p, b in self._buckets.items() if now - b.stamp >= full]:
            del self._buckets[peer]
        if len(self._buckets) >= self.max_peers:  # all busy: drop the oldest half
            for peer in sorted(self._buckets, key=lambda p: self._buckets[p].stamp)[: self.max_peers // 2]:
                del self._buckets[peer]


def check_admin_limits(command: str, args: dict[str, Any], limits: Limits, page_size: int, ref: int | None = None) -> None:
    """Range limits of one admin request (after ``check_admin``).

    Raises:
        ProtocolError("too_large"): a range longer than ``limits.max_range``
            bytes, or data longer than ``limits.max_frame``.
    """
    length = args.get("length")
    if isinstance(length, int) and length > limits.max_range:
        raise ProtocolError("too_large", f"{command}: length {length} exceeds {limits.max_range}", ref)
    pages = args.get("pages")
    if isinstance(pages, int) and pages * page_size > limits.max_range:
        raise ProtocolError("too_large", f"{command}: {pages} pages exceed {limits.max_range} bytes", ref)


def check_node_range(length: int, limits: Limits, ref: int | None = None) -> None:
    """A node's ``xpmem_make`` length: at most ``limits.max_range`` bytes."""
    if length > limits.max_range:
        raise ProtocolError("too_large", f"length {length} exceeds {limits.max_range}", ref)
