"""A KVM-like secondary MMU: shadow page table entries plus a secondary TLB.

Kernel sources: virt/kvm/kvm_main.c (the ``kvm_mmu_notifier_*`` callbacks,
``kvm_mmu_invalidate_begin/_end``), include/linux/kvm_host.h
(``mmu_invalidate_retry_gfn``), arch/x86/kvm/mmu/mmu.c (``kvm_faultin_pfn``,
``kvm_set_pte_rmap``, ``kvm_age_rmap``).

Per subscribed mm (a VM's memory is one mm) the node keeps::

    mmu_invalidate_seq          bumped by every end (and change_pte, release)
    mmu_invalidate_in_progress  starts begun and not ended: a counter, ranges nest
    mmu_invalidate_range_*      union of the ranges in progress (reset when the
                                counter leaves 0)

The fault race, as the comment above ``mmu_invalidate_retry_gfn`` tells it::

    node                                   host
    fault: seq0 = mmu_invalidate_seq
           Gup ─────────────────────────▶  gup serves the old pte
                 ◀───────────────────────  invalidate_range_start
    start: in_progress++, zap, Ack ─────▶  (changes the pte, frees the frame)
                 ◀───────────────────────  GupReply (old pfn!)
    reply: in_progress && overlaps  → retry (park until end, Gup again)
                 ◀───────────────────────  invalidate_range_end
    end:   seq++, in_progress--     → the parked fault sends a fresh Gup
    (reply after end: seq != seq0   → retry)

All callbacks are in-line: the Ack leaves in the same ``receive`` as the start.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.messages import ChangePte, ClearFlushYoung, ClearYoung, InvalidateRangeStart, TestYoung

from .base import MmState, Output, SecondaryMMU, Translation, pages_in, zap_range
from .fault import Fault

#: Entries of the secondary TLB.
DEFAULT_TLB_ENTRIES = 64


@dataclass(slots=True)
class Spte:
    """A shadow pte: the guest page ``addr`` maps host frame ``pfn``."""

    pfn: int
    writable: bool
    accessed: bool = True


@dataclass(eq=False, slots=True)
class KvmMm(MmState):
    """``struct kvm``'s notifier bookkeeping, per mm."""

    mmu_invalidate_seq: int = 0
    mmu_invalidate_in_progress: int = 0
    mmu_invalidate_range_start: int = 0
    mmu_invalidate_range_end: int = 0

    def invalidating(self, start: int, end: int) -> bool:
        """An invalidation in progress covers part of ``[start, end)``."""
        return (
            self.mmu_invalidate_in_progress > 0
            and self.mmu_invalidate_range_start < end
            and start < self.mmu_invalidate_range_end
        )


class KvmMMU(SecondaryMMU):
    """The kvm kind.  Implements every callback of ``struct mmu_notifier_ops``.

    Args:
        name: the node's name.
        tlb_entries: capacity of the secondary TLB (LRU).
        **kwargs: see :class:`node.base.SecondaryMMU`.

    Counters (``status()["counters"]``): ``change_pte_hits`` / ``_misses`` (a
    miss: no spte to repoint -- what every change_pte is when the host wraps it
    in start/end, the 3.7-6.9 mode), ``tlb_hits`` / ``tlb_misses``,
    ``tlb_flushes``, ``zapped``.
    """

    kind: ClassVar[str] = "kvm"
    sleepable: ClassVar[bool] = False

    def __init__(self, name: str, *, tlb_entries: int = DEFAULT_TLB_ENTRIES, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.tlb_entries = tlb_entries
        self.sptes: dict[int, dict[int, Spte]] = {}
        # (mm, page) -> (pfn, writable): a cache of sptes, flushed whenever one changes
        self.tlb: OrderedDict[tuple[int, int], tuple[int, bool]] = OrderedDict()
        self.counters.update(
            change_pte_hits=0, change_pte_misses=0, tlb_hits=0, tlb_misses=0, tlb_flushes=0, zapped=0
        )

    def _new_mm_state(self, mm: int) -> KvmMm:
        return KvmMm(mm)

    def mm_state(self, mm: int) -> KvmMm | None:
        """The notifier bookkeeping of ``mm`` (None if never touched)."""
        state = self._mms.get(mm)
        assert state is None or isinstance(state, KvmMm)
        return state

    def spte(self, mm: int, addr: int) -> Spte | None:
        """The spte of the page holding ``addr``, if any."""
        return self.sptes.get(mm, {}).get(addr - addr % self.page_size)

    # --------------------------------------------------------- notifier

    def invalidate_range_start(self, state: MmState, msg: InvalidateRangeStart) -> list[Output]:
        # kvm_mmu_notifier_invalidate_range_start -> kvm_mmu_invalidate_begin,
        # then kvm_unmap_gfn_range and a remote TLB flush; never blocks.
        assert isinstance(state, KvmMm)
        self._open_start(state, msg)
        state.mmu_invalidate_in_progress += 1
        if state.mmu_invalidate_in_progress == 1:
            state.mmu_invalidate_range_start = msg.start
            state.mmu_invalidate_range_end = msg.end
        else:
            state.mmu_invalidate_range_start = min(state.mmu_invalidate_range_start, msg.start)
            state.mmu_invalidate_range_end = max(state.mmu_invalidate_range_end, msg.end)
        self._zap(msg.mm, msg.start, msg.end)
        return [self._ack(msg.id)]

    def invalidate_range_end(self, state: MmState, start_id: int, rng: tuple[int, int]) -> list[Output]:
        # kvm_mmu_invalidate_end: "This sequence increase will notify the kvm
        # page fault that the page that is going to be mapped in the spte could
        # have been freed."  seq first, then the counter.
        assert isinstance(state, KvmMm)
        state.mmu_invalidate_seq += 1
        state.mmu_invalidate_in_progress -= 1
        return []

    def change_pte(self, msg: ChangePte) -> list[Output]:
        # kvm_mmu_notifier_change_pte -> kvm_set_spte_gfn -> kvm_set_pte_rmap
        # (arch/x86/kvm/mmu/mmu.c): a writable new pte zaps the spte; a
        # read-only one repoints it in place, write-protected and marked for
        # access tracking.  Older kvm_main.c also bumped the notifier seq here,
        # so a fault that GUP'd the old pte retries; so do we.  (Kernels that
        # still had change_pte returned early unless an invalidation was in
        # progress; the seed's unwrapped set_pte_at_notify is modelled instead.)
        state = self._mm(msg.mm)
        assert isinstance(state, KvmMm)
        state.mmu_invalidate_seq += 1
        page = msg.addr - msg.addr % self.page_size
        table = self.sptes.get(msg.mm, {})
        spte = table.get(page)
        if spte is None:
            self.counters["change_pte_misses"] += 1
        else:
            self.counters["change_pte_hits"] += 1
            if msg.writable:
                del table[page]
                self.counters["zapped"] += 1
            else:
                spte.pfn = msg.pfn
                spte.writable = False
                spte.accessed = False
            self._flush_tlb(msg.mm)
        return [self._ack(msg.id)]

    def clear_flush_young(self, msg: ClearFlushYoung) -> list[Output]:
        # kvm_mmu_notifier_clear_flush_young -> kvm_age_rmap, then a remote flush.
        return self._age(msg)

    def clear_young(self, msg: ClearYoung) -> list[Output]:
        # kvm_mmu_notifier_clear_young: "we never issue secondary TLB flushes
        # from clear_young" -- accesses through cached entries go unseen.
        return self._age(msg)

    def test_young(self, msg: TestYoung) -> list[Output]:
        # kvm_mmu_notifier_test_young -> kvm_test_age_rmap: nothing cleared.
        return self._age(msg)

    def _age(self, msg: ClearFlushYoung | ClearYoung | TestYoung) -> list[Output]:
        # The A bit is set when an access walks the sptes (a TLB fill).
        table = self.sptes.get(msg.mm, {})
        young = False
        for page in pages_in(table, msg.start, msg.end, self.page_size):
            spte = table[page]
            young = young or spte.accessed
            if not isinstance(msg, TestYoung):
                spte.accessed = False
        if young and isinstance(msg, ClearFlushYoung):
            self._flush_tlb(msg.mm)
        return [self._ack(msg.id, young=young)]

    def release(self, state: MmState) -> list[Output]:
        # kvm_mmu_notifier_release -> kvm_flush_shadow_all: every spte goes.
        assert isinstance(state, KvmMm)
        state.mmu_invalidate_seq += 1
        table = self.sptes.pop(state.mm, {})
        self.counters["zapped"] += len(table)
        if table:
            self._flush_tlb(state.mm)
        return []

    def _zap(self, mm: int, start: int, end: int) -> list[Output]:
        table = self.sptes.get(mm)
        if not table:
            return []
        zapped = zap_range(table, start, end, self.page_size)
        if zapped:
            self.counters["zapped"] += zapped
            self._flush_tlb(mm)
        return []

    def _flush_tlb(self, mm: int) -> None:
        """``kvm_flush_remote_tlbs``: every cached translation of the VM goes."""
        self.counters["tlb_flushes"] += 1
        if not self.tlb:  # nothing cached (a node that only faults): no walk
            return
        for key in [k for k in self.tlb if k[0] == mm]:
            del self.tlb[key]

    # ----------------------------------------------------------- faults

    def read_begin(self, state: MmState, f: Fault) -> int | None:
        # kvm_faultin_pfn: mmu_seq = kvm->mmu_invalidate_seq, and the
        # mmu_invalidate_retry_gfn_unsafe() pre-check: do not even GUP while an
        # invalidation covers the gfn; the guest retries the fault, modelled
        # as parking it until an end.
        assert isinstance(state, KvmMm)
        if state.invalidating(f.addr, f.addr + f.npages * self.page_size):
            return None
        return state.mmu_invalidate_seq

    def read_retry(self, state: MmState, f: Fault, start: int, end: int) -> bool:
        # mmu_invalidate_retry_gfn (include/linux/kvm_host.h).
        assert isinstance(state, KvmMm)
        if state.invalidating(start, end):
            return True
        return state.mmu_invalidate_seq != f.seq

    def _fault_install(
        self, state: MmState, f: Fault, pages: list[list[int]]
    ) -> tuple[list[list[int]], list[Output]]:
        table = self.sptes.setdefault(f.mm, {})
        for addr, pfn, writable in pages:
            table[addr] = Spte(pfn, bool(writable), accessed=True)
            self.tlb.pop((f.mm, addr), None)
        return pages, []

    def _translate(self, mm: int, vaddr: int, write: bool) -> Translation | None:
        page = vaddr - vaddr % self.page_size
        key = (mm, page)
        cached = self.tlb.get(key)
        if cached is not None and (cached[1] or not write):
            self.tlb.move_to_end(key)
            self.counters["tlb_hits"] += 1
            return Translation(mm, page, cached[0], cached[1])
        self.counters["tlb_misses"] += 1
        spte = self.sptes.get(mm, {}).get(page)
        if spte is None or (write and not spte.writable):
            return None
        spte.accessed = True
        self.tlb[key] = (spte.pfn, spte.writable)
        self.tlb.move_to_end(key)
        while len(self.tlb) > self.tlb_entries:
            self.tlb.popitem(last=False)
        return Translation(mm, page, spte.pfn, spte.writable)

    # ----------------------------------------------------------- status

    def _drop_kind_state(self) -> None:
        self.sptes.clear()
        self.tlb.clear()

    def mapped_pages(self) -> int:
        return sum(len(table) for table in self.sptes.values())

    def translations(self) -> dict[int, dict[int, int]]:
        return {mm: {a: s.pfn for a, s in table.items()} for mm, table in self.sptes.items() if table}

    def status(self, mm: int | None = None, cursor: str | None = None, limit: int | None = None) -> dict[str, Any]:
        status = super().status(mm, cursor, limit)
        status["tlb"] = len(self.tlb)
        states = ((m, self._mms[m]) for m in self.shown_mms(mm))
        status["mmu_invalidate"] = {
            str(m): {"seq": s.mmu_invalidate_seq, "in_progress": s.mmu_invalidate_in_progress}
            for m, s in states
            if isinstance(s, KvmMm)
        }
        return status
