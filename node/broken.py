"""Deliberately broken node kinds, for the tests that must catch them.

Selected in a node process by the hidden environment variable
``MMN_TEST_BROKEN`` (``acks-before-zap`` or ``never-zaps``; kvm nodes only,
other kinds are left correct).  ``mmn soak`` and tests/test_soak.py use it to
show that the soak's oracle and shadow model do fail a build that breaks the
notifier contract.  Never set it otherwise.
"""

from __future__ import annotations

from typing import Any

from .base import MmState, Output, SecondaryMMU
from .kinds import node_class
from .kvm import KvmMMU


class AcksBeforeZapping(KvmMMU):
    """Acks a start at once and zaps only when its end arrives: between the
    ack and the end it still reaches the old pages."""

    def _invalidate_range_start(self, state: MmState, msg: Any) -> list[Output]:
        self._open_start(state, msg)
        state.mmu_invalidate_in_progress += 1  # type: ignore[attr-defined]
        state.mmu_invalidate_range_start, state.mmu_invalidate_range_end = msg.start, msg.end  # type: ignore[attr-defined]
        return [self._ack(msg.id)]

    def _invalidate_range_end(self, state: MmState, start_id: int, rng: tuple[int, int]) -> list[Output]:
        out = super()._invalidate_range_end(state, start_id, rng)
        self._zap(state.mm, *rng)
        return out


class NeverZaps(KvmMMU):
    """Acks every start and keeps its sptes."""

    def _zap(self, mm: int, start: int, end: int) -> list:  # type: ignore[override]
        return []


BROKEN = {"acks-before-zap": AcksBeforeZapping, "never-zaps": NeverZaps}


def broken_class(kind: str, broken: str) -> type[SecondaryMMU]:
    """The broken class ``broken`` for kvm nodes; other kinds stay correct."""
    if kind != "kvm":
        return node_class(kind)
    try:
        return BROKEN[broken]
    except KeyError:
        raise ValueError(f"MMN_TEST_BROKEN must be one of {', '.join(BROKEN)}, not {broken!r}") from None
