"""A GRU-like secondary MMU: a bounded TLB and nothing else.

Kernel sources: drivers/misc/sgi-gru/grutlbpurge.c (``gru_invalidate_range_start``
/ ``_end``, ``gru_release``, ``gru_flush_tlb_range``) and grufault.c
(``gru_try_dropin``: a TLB miss is served by walking the process's page table;
while ``ms_range_active`` it fails and the user waits).

The GRU has no page table of its own: every translation is a TLB entry,
filled ("dropped in") from the host on a miss and lost on eviction or purge.
Per mm (``struct gru_mm_struct``)::

    range_active   starts begun and not ended (a counter: ranges nest)
    tlb_epoch      bumped by every purge of the mm's TLB entries

A drop-in computed from a GUP requested under an older ``tlb_epoch`` may carry
a pte the purge was meant to remove, so it is discarded and the miss retried::

    node                                   host
    miss: epoch0 = tlb_epoch; Gup ─────▶   gup serves the old pte
                 ◀──────────────────────   invalidate_range_start
    start: range_active++, purge,
           tlb_epoch++, Ack ───────────▶   (changes the pte)
                 ◀──────────────────────   GupReply (old pfn)
    reply: tlb_epoch != epoch0 → discard; the miss waits (range_active > 0)
                 ◀──────────────────────   invalidate_range_end
    end:   range_active-- → 0: the waiting miss sends a fresh Gup

No change_pte (the host sends a one-page start/end instead) and no aging.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.messages import InvalidateRangeStart

from .base import MmState, Output, SecondaryMMU, Translation
from .fault import Fault

#: TLB entries of one GRU context.
DEFAULT_TLB_ENTRIES = 64


@dataclass(eq=False, slots=True)
class GruMm(MmState):
    """``struct gru_mm_struct``'s invalidation state."""

    range_active: int = 0
    tlb_epoch: int = 0


class GruMMU(SecondaryMMU):
    """The gru kind: invalidate_range_start/_end and release only.

    Args:
        name: the node's name.
        tlb_entries: TLB capacity; the least recently used entry is evicted.
        **kwargs: see :class:`node.base.SecondaryMMU`.

    Counters: ``tlb_hits``, ``tlb_misses``, ``tlb_dropins``, ``tlb_evictions``,
    ``tlb_purges``, ``waits`` (misses parked while ``range_active``).
    """

    kind: ClassVar[str] = "gru"
    sleepable: ClassVar[bool] = False

    def __init__(self, name: str, *, tlb_entries: int = DEFAULT_TLB_ENTRIES, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        if tlb_entries < 1:
            raise ValueError("tlb_entries must be positive")
        self.tlb_entries = tlb_entries
        # (mm, page) -> (pfn, writable), least recently used first
        self.tlb: OrderedDict[tuple[int, int], tuple[int, bool]] = OrderedDict()
        self.counters.update(tlb_hits=0, tlb_misses=0, tlb_dropins=0, tlb_evictions=0, tlb_purges=0, waits=0)

    def _new_mm_state(self, mm: int) -> GruMm:
        return GruMm(mm)

    def mm_state(self, mm: int) -> GruMm | None:
        """The invalidation state of ``mm`` (None if never touched)."""
        state = self._mms.get(mm)
        assert state is None or isinstance(state, GruMm)
        return state

    # --------------------------------------------------------- notifier

    def invalidate_range_start(self, state: MmState, msg: InvalidateRangeStart) -> list[Output]:
        # gru_invalidate_range_start: atomic_inc(&gms->ms_range_active), then
        # gru_flush_tlb_range; in-line, never blocks.
        assert isinstance(state, GruMm)
        self._open_start(state, msg)
        state.range_active += 1
        self._purge(state, msg.start, msg.end)
        return [self._ack(msg.id)]

    def invalidate_range_end(self, state: MmState, start_id: int, rng: tuple[int, int]) -> list[Output]:
        # gru_invalidate_range_end: atomic_dec(&gms->ms_range_active) and
        # wake_up_all(&gms->ms_wait_queue) -- the base wakes the parked misses.
        assert isinstance(state, GruMm)
        state.range_active -= 1
        return []

    def release(self, state: MmState) -> list[Output]:
        # gru_release: the mm is going; nothing of it may stay in the TLB.
        assert isinstance(state, GruMm)
        self._purge(state, 0, 1 << 64)
        return []

    def _zap(self, mm: int, start: int, end: int) -> list[Output]:
        state = self._mm(mm)
        assert isinstance(state, GruMm)
        self._purge(state, start, end)
        return []

    def _purge(self, state: GruMm, start: int, end: int) -> None:
        """``gru_flush_tlb_range``: drop the mm's entries in range, new epoch."""
        state.tlb_epoch += 1
        self.counters["tlb_purges"] += 1
        doomed = [k for k in self.tlb if k[0] == state.mm and start < k[1] + self.page_size and k[1] < end]
        for key in doomed:
            del self.tlb[key]

    # ----------------------------------------------------------- faults

    def read_begin(self, state: MmState, f: Fault) -> int | None:
        # gru_try_dropin: "range invalidate active" -> the miss waits for the
        # end (no spinning: it is parked and woken by the end).  Otherwise the
        # drop-in is judged against the TLB epoch it started under.
        assert isinstance(state, GruMm)
        if state.range_active > 0:
            self.counters["waits"] += 1
            return None
        return state.tlb_epoch

    def read_retry(self, state: MmState, f: Fault, start: int, end: int) -> bool:
        assert isinstance(state, GruMm)
        return state.tlb_epoch != f.seq

    def _fault_install(
        self, state: MmState, f: Fault, pages: list[list[int]]
    ) -> tuple[list[list[int]], list[Output]]:
        for addr, pfn, writable in pages:
            key = (f.mm, addr)
            self.tlb[key] = (pfn, bool(writable))
            self.tlb.move_to_end(key)
            self.counters["tlb_dropins"] += 1
            while len(self.tlb) > self.tlb_entries:
                self.tlb.popitem(last=False)
                self.counters["tlb_evictions"] += 1
        return pages, []

    def _translate(self, mm: int, vaddr: int, write: bool) -> Translation | None:
        page = vaddr - vaddr % self.page_size
        key = (mm, page)
        entry = self.tlb.get(key)
        if entry is None or (write and not entry[1]):
            self.counters["tlb_misses"] += 1
            return None
        self.tlb.move_to_end(key)
        self.counters["tlb_hits"] += 1
        return Translation(mm, page, entry[0], entry[1])

    # ----------------------------------------------------------- status

    def _drop_kind_state(self) -> None:
        self.tlb.clear()

    def mapped_pages(self) -> int:
        return len(self.tlb)

    def translations(self) -> dict[int, dict[int, int]]:
        out: dict[int, dict[int, int]] = {}
        for (mm, page), (pfn, _) in self.tlb.items():
            out.setdefault(mm, {})[page] = pfn
        return out

    def status(self, mm: int | None = None, cursor: str | None = None, limit: int | None = None) -> dict[str, Any]:
        status = super().status(mm, cursor, limit)
        states = ((m, self._mms[m]) for m in self.shown_mms(mm))
        status["gru"] = {
            str(m): {"range_active": s.range_active, "tlb_epoch": s.tlb_epoch}
            for m, s in states
            if isinstance(s, GruMm)
        }
        return status
