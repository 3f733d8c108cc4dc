"""The primary MMU: address spaces, page tables, faults, GUP and the DMA oracle.

Sans-I/O.  Every operation that must tell secondary MMUs something is a
generator (:data:`broker.effects.Op`) that yields the notifier core's
:class:`~broker.effects.Deliver` effects; a driver (``run_sync``, the host's
trio shell and the in-process cluster, through the host core) carries them and resumes the operation with the
acks.  Between two yields an operation runs without interruption.

Kernel references, by operation (DESIGN §2):

========================  ===============================================
mmap / munmap             ``mm/mmap.c`` (``do_vmi_munmap``, one
                          ``mmu_notifier_range`` over the whole range)
host read/write fault     ``mm/memory.c`` ``handle_mm_fault``:
                          ``do_anonymous_page`` (zero page on read),
                          ``do_wp_page`` / ``wp_page_copy`` (COW break:
                          start(CLEAR) of one page, ``set_pte_at_notify``
                          of the new writable pte, end)
madvise DONTNEED          ``mm/madvise.c`` -> ``zap_page_range_single``
mprotect                  ``mm/mprotect.c`` ``change_protection``
                          (PROTECTION_VMA per changed vma with populated
                          page tables, upgrades included)
fork                      ``kernel/fork.c`` ``dup_mmap`` ->
                          ``copy_page_range`` (PROTECTION_PAGE on the
                          parent; pinned pages copied at once,
                          ``page_needs_cow_for_dma``)
reclaim                   ``mm/vmscan.c`` ``shrink_folio_list``:
                          ``folio_referenced`` (pte young |
                          ``clear_flush_young`` of the nodes, every
                          mapping), then ``try_to_unmap`` (start/end
                          CLEAR per mapping, ``mm/rmap.c``), swap out
migration                 ``mm/migrate.c`` ``try_to_migrate`` (start/end
                          CLEAR per mapping), copy, repoint every mapping
get_user_pages            ``mm/gup.c``: ``check_vma_flags`` (EFAULT /
                          EPERM), ``faultin_page``; FOLL_PIN of a shared
                          anonymous page unshares it first
                          (``gup_must_unshare``)
exit                      ``mm/mmap.c`` ``exit_mmap``: ``mmu_notifier_release``
                          first
========================  ===============================================

The page tables, vmas and the pte encoding are :mod:`broker.pagetable`.

Pairing: every operation that opens an invalidation does it through
``NotifierCore.invalidate_range(rng, body)``, which sends the end after the
body on every exit path (an ENOMEM in the middle of a migration or a fork, an
exception thrown in by the driver); what the body did stays done.  See
``broker/notifier.py`` for what a driver must do on cancel.

Reverse map (:meth:`Model.rmap_walk`): anonymous pages shared by fork and KSM
pages are found in every mm that maps them, so reclaim and migration take
them.  Not modelled: reclaim and migration of shmem pages (skipped);
migration entries (the invalidations of one page's mappings nest instead);
compaction (which skips pinned pages before it isolates them, sending
nothing); transparent huge pages; file mappings.

Origins (:class:`protocol.types.Origin`, on every start and change_pte):
munmap, exit, mprotect, madvise, fork and COW faults are the owner's;
reclaim's are kswapd's, migration's migration's, KSM's ksmd's.  A pinned
page stays through the background ones: the pin holder (xpmem) keeps its
pin, and reclaim, migration and KSM check the pin after the acks and leave
the page (mm/rmap.c, mm/migrate.c, mm/ksm.c ``write_protect_page``).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from protocol.status import VMAS_SHOWN
from protocol.types import ADDRESS_LIMIT, Errno, KernelError, NotifyEvent, Origin, Range

from .devmem import DevicePrivate
from .effects import Op
from .ksm import Ksm
from .memory import (
    PG_ANON,
    PG_ANON_EXCLUSIVE,
    PG_DIRTY,
    PG_IDLE,
    PG_KSM,
    PG_SHMEM,
    PG_YOUNG,
    ZERO_PFN,
    PhysicalMemory,
    SwapFile,
)
from .notifier import NotifierCore
from .pagetable import (
    PROTS,
    PTE_DEVICE,
    PTE_DIRTY,
    PTE_EXCLUSIVE,
    PTE_KSM_ZERO,
    PTE_PRESENT,
    PTE_SHIFT,
    PTE_SWAP,
    PTE_WRITE,
    PTE_YOUNG,
    Mm,
    Prot,
    Shmem,
    Vma,
    present_pte,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: a protection's name -> the Prot (what ``Prot(name)`` finds)
_PROT_OF: dict[str, Prot] = {p.value: p for p in Prot}
# GUP-fast's (Python 3.11's EnumType.__getattr__ makes ``Prot.RW`` in an
# expression a slow attribute lookup, ~0.1 us)
_PROT_NONE, _PROT_RW = Prot.NONE, Prot.RW
#: Largest number of pages one GUP may ask for.
MAX_GUP_PAGES = 4096
#: Largest number of pages one idle-tracking call looks at (the kernel's
#: bitmap is read and written in chunks too).
IDLE_MAX_PAGES = 4096
#: Ptes from which a zap releases them in batches of array operations
#: (measured: the batch's fixed cost is about that of 48 ptes one by one).
ZAP_BATCH_MIN = 48


class Model:
    """The host's primary MMU.

    Args:
        frames: physical page frames (the zero frame included).
        page_size: bytes per page.
        swap_path: the swap file (a temporary file if None).
        swap_slots: swap slots.
        wrap_change_pte: the 3.7–6.9 mode (KSM's change_pte wrapped in
            start/end(CLEAR)).
    Concurrency:
        Synchronous and single-threaded.  The host runs at most one mutating
        operation (generator) at a time under its lock; :meth:`gup_fast`,
        :meth:`dma_read`, :meth:`dma_write`, :meth:`unpin` and
        :meth:`fence_node` may run between two yields of that operation (they
        see the primary as it was before the operation's pending change).
    """

    def __init__(
        self,
        frames: int = 4096,
        page_size: int = 4096,
        swap_path: str | None = None,
        swap_slots: int = 4096,
        wrap_change_pte: bool = False,
    ) -> None:
        self.page_size = page_size
        self.memory = PhysicalMemory(frames, page_size)
        self.swap = SwapFile(swap_slots, page_size, swap_path)
        self.notifier = NotifierCore(page_size, wrap_change_pte=wrap_change_pte)
        self.wrap_change_pte = wrap_change_pte
        self.mms: dict[int, Mm] = {}
        self._mm_ids = itertools.count(1)
        #: node -> (mm, pfn) -> Counter(addr -> pins)
        self.pins: dict[str, dict[tuple[int, int], Counter[int]]] = {}
        #: /proc/xpmem's global counters: every pin taken for a node, every pin
        #: dropped (its Unpin, a discarded reply, a fence, a revoke, the mm's
        #: exit); equal when none is held.  Counted here, where pins change.
        self.pages_pinned = 0
        self.pages_unpinned = 0
        #: (mm, addr) -> new pfn, while a set_pte_at_notify is being delivered:
        #: GUP-fast does not serve these (the kernel has cleared the pte), a
        #: node that already repointed may read the new pfn.
        self.pending: dict[tuple[int, int], int] = {}
        self.stale_accesses = 0
        self.counters: Counter[str] = Counter()
        self.ksm = Ksm(self)
        #: device-private pages of hmm nodes (broker/devmem.py)
        self.device = DevicePrivate()

    # ------------------------------------------------------------------ helpers

    def check_mm(self, mm: int) -> Mm:
        """Raises KernelError(ESRCH) if there is no such mm."""
        try:
            return self.mms[mm]
        except (KeyError, TypeError):
            raise KernelError(Errno.ESRCH, f"no mm {mm}") from None

    @staticmethod
    def _prot(prot: str) -> Prot:
        """Raises KernelError(EINVAL) for a protection that is not one of :data:`PROTS`."""
        try:
            found = _PROT_OF.get(prot)  # Prot(prot) without the enum call's lookup chain
        except TypeError:  # unhashable
            found = None
        if found is None:
            raise KernelError(Errno.EINVAL, f"protection {prot!r} is not one of {', '.join(PROTS)}")
        return found

    def _range(self, addr: int, length: int, *, allow_empty: bool = False) -> tuple[int, int]:
        """Validate ``addr`` (page aligned) and round ``length`` up to pages."""
        ps = self.page_size
        if not isinstance(addr, int) or not isinstance(length, int) or addr < 0 or length < 0:
            raise KernelError(Errno.EINVAL, "address and length must be non-negative integers")
        if addr % ps:
            raise KernelError(Errno.EINVAL, f"address {addr:#x} is not page aligned")
        if length == 0 and not allow_empty:
            raise KernelError(Errno.EINVAL, "length is zero")
        end = addr + -(-length // ps) * ps
        if end > ADDRESS_LIMIT:
            raise KernelError(Errno.ENOMEM, f"[{addr:#x}, {end:#x}) is beyond the address space")
        return addr, end

    def put_page(self, pfn: int) -> None:
        """``put_page`` that also retires a freed KSM page's stable node
        (mm/ksm.c: a KSM folio's last put frees its stable node,
        ``folio_migrate_ksm`` / ``remove_node_from_stable_tree``).  The zero
        frame is not refcounted."""
        if pfn == ZERO_PFN:
            return
        was_ksm = self.memory.flags[pfn] & PG_KSM
        if self.memory.put_page(pfn) and was_ksm:
            self.ksm.page_freed(pfn)

    def _unmap_pte(self, mm: Mm, addr: int, pte: int) -> None:
        """Drop one pte's hold on its frame or swap slot; the pte becomes none."""
        if pte & PTE_PRESENT:
            pfn = pte >> PTE_SHIFT
            if pfn != ZERO_PFN:
                self.memory.mapcount[pfn] -= 1
                self.put_page(pfn)
            elif pte & PTE_KSM_ZERO:
                self.ksm.zero_unmapped()
        elif pte & PTE_SWAP:
            self.swap.free(pte >> PTE_SHIFT)
        elif pte & PTE_DEVICE:
            self.device.put(pte >> PTE_SHIFT)
        mm.set(addr, 0)
        self.ksm.forget(mm.id, addr)

    def _zap(self, mm: Mm, start: int, end: int) -> int:
        """``zap_pte_range`` over ``[start, end)``, batched as the kernel's
        ``mmu_gather`` batches it (mm/memory.c ``zap_present_ptes``,
        mm/mmu_gather.c ``tlb_finish_mmu``): the ptes are cleared a chunk at a
        time, then the frames they mapped lose their mappings and references
        together, the swap slots their uses, and KSM its rmap items.  The
        cost follows the populated ptes, in array operations, not the range.
        Below :data:`ZAP_BATCH_MIN` ptes a plain loop per pte does the same
        (the array operations' fixed cost is some 50 us).

        Returns:
            Ptes zapped.
        """
        if mm.count_upto(start, end) < ZAP_BATCH_MIN:
            zapped = 0
            for addr, pte in list(mm.populated_in(start, end)):
                self._unmap_pte(mm, addr, pte)
                zapped += 1
            return zapped
        addrs, ptes = mm.clear_range(start, end)
        if not len(ptes):
            return 0
        present = (ptes & PTE_PRESENT) != 0
        pfns = ptes >> PTE_SHIFT
        zero = present & (pfns == ZERO_PFN)
        self.ksm.zero_unmapped(int(np.count_nonzero(zero & ((ptes & PTE_KSM_ZERO) != 0))))
        self.unmap_pages(pfns[present & ~zero])
        for slot in pfns[~present & ((ptes & PTE_SWAP) != 0)].tolist():
            self.swap.free(slot)
        for handle in pfns[~present & ((ptes & PTE_DEVICE) != 0)].tolist():
            self.device.put(handle)
        self.ksm.forget_many(mm.id, addrs)
        return len(ptes)

    def unmap_pages(self, pfns: np.ndarray) -> None:
        """Each entry's mapping and reference dropped (``folio_remove_rmap_ptes``
        + ``free_pages_and_swap_cache``); freed KSM pages retire their stable
        nodes as :meth:`put_page` does.  A pfn may be listed several times
        (a KSM page mapped at several addresses); not the zero frame."""
        if not len(pfns):
            return
        flags = np.frombuffer(self.memory.flags, dtype=np.uint8)
        ksm = np.unique(pfns[(flags[pfns] & PG_KSM) != 0]).tolist()
        self.memory.unmap_and_put(pfns)
        for pfn in ksm:
            if self.memory.is_free(pfn):
                self.ksm.page_freed(pfn)

    def _drop_vma(self, vma: Vma) -> None:
        if vma.shmem is not None:
            vma.shmem.users -= 1
            if vma.shmem.users == 0:
                for pfn in vma.shmem.pages.values():
                    self.memory.flags[pfn] &= ~PG_SHMEM
                    self.put_page(pfn)
                vma.shmem.pages.clear()

    def pte(self, mm: int, addr: int) -> tuple[int, bool, bool, bool] | None:
        """The present, accessible pte at ``addr``: (pfn, writable, dirty, young).

        None when not present, swapped, or in a PROT_NONE vma (``pte_protnone``).
        """
        m = self.mms.get(mm)
        if m is None:
            return None
        page = addr - addr % self.page_size
        pte = m.get(page)
        if not pte & PTE_PRESENT:
            return None
        vma = m.find_vma(page)
        if vma is None or vma.prot is Prot.NONE:
            return None
        return (pte >> PTE_SHIFT, bool(pte & PTE_WRITE), bool(pte & PTE_DIRTY), bool(pte & PTE_YOUNG))

    def is_pinned_by(self, node: str, mm: int, addr: int, pfn: int) -> bool:
        held = self.pins.get(node, {}).get((mm, pfn))
        return bool(held and held.get(addr - addr % self.page_size))

    # ------------------------------------------------------------- address spaces

    def spawn(self) -> int:
        """A new, empty mm; returns its id."""
        mm_id = next(self._mm_ids)
        self.mms[mm_id] = Mm(mm_id, self.page_size)
        return mm_id

    def describe_mm(self, mm_id: int) -> dict[str, Any]:
        """One mm for ``status``: its first vmas (``protocol.status.VMAS_SHOWN``;
        ``vmas_total`` counts them all), rss and subscribers.

        Raises:
            KernelError(ESRCH): no such mm.
        """
        mm = self.check_mm(mm_id)
        present, swapped = mm.rss()
        return {
            "mm": mm.id,
            "vmas": [v.describe() for v in mm.vmas[:VMAS_SHOWN]],
            "vmas_total": len(mm.vmas),
            "present": present,
            "swapped": swapped,
            "subscribers": sorted(self.notifier.subscribed(mm.id)),
        }

    def mmap(self, mm: int, npages: int, prot: str = "rw", *, shared: bool = False,
             mergeable: bool = False, fill: int | None = None) -> Op[int]:
        """``mmap(NULL, npages * page_size, prot, MAP_ANONYMOUS | ...)``.

        Args:
            fill: a byte every page is then written with, by host writes (each
                page faulted in, as a ``MAP_POPULATE`` that also stores).  All
                or nothing: if a write fails, the mapping and every frame it
                took are unmapped again before the error is raised, as
                ``mmap_region`` undoes a mapping whose setup failed
                (mm/mmap.c, ``unmap_and_free_vma``).
        Returns:
            The start address.  Without ``fill`` nothing is populated; no
            notifier traffic either way (no node can have served the new pages).
        Raises:
            KernelError: ESRCH (no mm), EINVAL (npages < 1, unknown prot),
                ENOMEM (address space full; or no frame for the fill), EFAULT (a fill of a mapping that is not
                writable).  Nothing is left mapped.
        """
        m = self.check_mm(mm)
        if not isinstance(npages, int) or npages < 1:
            raise KernelError(Errno.EINVAL, f"cannot map {npages!r} pages")
        vm_prot = self._prot(prot)
        # mergeable is MADV_MERGEABLE right after the mmap: ignored for a
        # shared mapping, as ksm_madvise ignores it (see madvise)
        mergeable = mergeable and not shared
        start = m.next_addr
        end = start + npages * self.page_size
        if end > ADDRESS_LIMIT:
            raise KernelError(Errno.ENOMEM, "address space exhausted")
        m.next_addr = end + self.page_size  # a guard gap: mappings stay separate vmas
        vma = Vma(start, end, vm_prot, shared, mergeable, Shmem(users=1) if shared else None)
        m.vmas.append(vma)
        m._reindex()
        if fill is not None:
            data = bytes([fill]) * self.page_size
            try:
                for page in range(start, end, self.page_size):
                    yield from self.write(mm, page, data)
            except BaseException:
                if mm in self.mms:
                    yield from self.munmap(mm, start, end - start)
                raise
        return start

    def munmap(self, mm: int, addr: int, length: int) -> Op[None]:
        """``munmap``: one start/end(UNMAP) over the range, ptes zapped between.

        Holes in the range are fine (the kernel returns 0).
        Raises:
            KernelError: ESRCH, EINVAL (unaligned, zero length).
        """
        m = self.check_mm(mm)
        start, end = self._range(addr, length)
        if not m.vmas_in(start, end):
            return

        def unmap(_inv: Any) -> None:
            self._zap(m, start, end)
            for vma in m.isolate(start, end):
                m.vmas.remove(vma)
                self._drop_vma(vma)
            m._reindex()

        yield from self.notifier.invalidate_range(Range(mm, start, end, NotifyEvent.UNMAP), unmap)

    def exit_mm(self, mm: int) -> Op[None]:
        """``exit_mmap``: ``mmu_notifier_release`` first (every subscriber
        drops everything), then every pte and vma goes, then the mm."""
        m = self.check_mm(mm)
        yield from self.notifier.release(mm)
        self.drop_pins(mm=mm)  # after ->release nothing of the mm may stay pinned
        for vma in list(m.vmas):
            self._zap(m, vma.start, vma.end)
            self._drop_vma(vma)
        m.vmas.clear()
        m._reindex()
        self.ksm.forget_mm(mm)
        del self.mms[mm]
        self.notifier.forget_mm(mm)

    def mprotect(self, mm: int, addr: int, length: int, prot: str) -> Op[None]:
        """``mprotect``: per vma whose protection changes (``mprotect_fixup``
        skips the others), ``change_protection`` -- one start/end(PROTECTION_VMA)
        if the vma has populated page tables, upgrades included, from the
        first populated pte table to the end of the vma's part of the range
        (mm/mprotect.c ``change_pmd_range`` / ``change_pud_range``: "invoke the
        mmu notifier if the pmd is populated", ``range.start`` = that pmd's
        address, ``range.end`` = the end of the walk).  A downgrade
        write-protects the vma's ptes inside it; an upgrade leaves the ptes
        as they are (later faults make them writable).  A vma with nothing
        populated changes with no notifier traffic.

        Raises:
            KernelError: ESRCH, EINVAL (unaligned, unknown prot), ENOMEM (the
                range has a hole: the vmas before the first hole are changed,
                as the kernel does).
        """
        m = self.check_mm(mm)
        start, end = self._range(addr, length, allow_empty=True)
        new = self._prot(prot)
        if start == end:
            return
        vmas, complete = m.covered_prefix(start, end)
        if not vmas:
            raise KernelError(Errno.ENOMEM, f"{start:#x} is not mapped")
        stop = end if complete else vmas[-1].end

        def change_protection(vma: Vma) -> None:
            if new.rank < vma.prot.rank:
                for page, pte in list(m.populated_in(vma.start, vma.end)):
                    if pte & PTE_WRITE:
                        m.set(page, pte & ~PTE_WRITE)
            vma.prot = new

        # mprotect_fixup splits a vma only where the range cuts it
        whole = vmas[0].start == start and vmas[-1].end == stop
        for vma in vmas if whole else m.isolate(start, stop):
            if vma.prot is new:
                continue
            first = next(m.populated_in(vma.start, vma.end), None)
            if first is None:
                change_protection(vma)
                continue
            table = first[0] - first[0] % m.chunk_bytes
            rng = Range(mm, max(vma.start, table), vma.end, NotifyEvent.PROTECTION_VMA)
            def change(_inv: Any, vma: Vma = vma) -> None:
                change_protection(vma)

            yield from self.notifier.invalidate_range(rng, change)
        if not complete:
            raise KernelError(Errno.ENOMEM, f"[{start:#x}, {end:#x}) has an unmapped hole at {stop:#x}")

    def madvise(self, mm: int, addr: int, length: int, advice: str, *, blockable: bool = True) -> Op[None]:
        """``madvise``: ``dontneed`` (start/end(CLEAR), zap), ``mergeable``,
        ``unmergeable`` (KSM pages of the range are unshared first).

        Args:
            blockable: False models a caller that may not sleep (the OOM
                reaper): a sleepable node's EAGAIN aborts with nothing changed.
        Raises:
            KernelError: ESRCH, EINVAL (unaligned, unknown advice), EAGAIN
                (non-blockable and a node cannot sleep), ENOMEM (the range has holes; the mapped parts were
                advised, as the kernel does).
        """
        m = self.check_mm(mm)
        advice = advice.lower() if isinstance(advice, str) else advice
        if advice not in ("dontneed", "mergeable", "unmergeable"):
            raise KernelError(Errno.EINVAL, f"unknown advice {advice!r}")
        start, end = self._range(addr, length, allow_empty=True)
        if start == end:
            return
        vmas = m.vmas_in(start, end)
        covered = sum(min(v.end, end) - max(v.start, start) for v in vmas)
        hole = covered < end - start
        if advice == "dontneed":
            if vmas:
                rng = Range(mm, start, end, NotifyEvent.CLEAR, blockable)
                yield from self.notifier.invalidate_range(rng, lambda _inv: self._zap(m, start, end))
        else:
            want = advice == "mergeable"
            for at in (start, end):
                edge = m.find_vma(at)
                # mm/ksm.c ksm_madvise: MADV_MERGEABLE of a vma KSM cannot
                # merge (VM_SHARED, ...) "return 0; /* just ignore the advice */":
                # its flags stay, so madvise_update_vma does not split it either
                if edge is not None and not (want and edge.shared):
                    m.split_at(at)
            for vma in m.vmas_in(start, end):
                if want and vma.shared:
                    continue
                if not want and vma.mergeable:
                    yield from self.ksm.unmerge_range(m, vma.start, vma.end)
                vma.mergeable = want
        if hole:
            raise KernelError(Errno.ENOMEM, f"[{start:#x}, {end:#x}) is not entirely mapped")

    def fork(self, mm: int) -> Op[int]:
        """``dup_mmap``: a child with the same vmas.  Private writable ptes of
        the parent become read-only in both (COW) after one
        start/end(PROTECTION_PAGE) per such vma; a pinned private page is
        copied for the child at once (``page_needs_cow_for_dma``); shared
        mappings share their pages; swap entries are duplicated.

        Returns:
            The child's mm id.
        Raises:
            KernelError: ESRCH, ENOMEM (not enough frames to copy pinned pages;
                the child is torn down, the open invalidation is ended; parent
                ptes already write-protected stay read-only, as after a failed
                ``dup_mmap``, and a write fault reuses them).
        """
        parent = self.check_mm(mm)
        child_id = self.spawn()
        child = self.mms[child_id]
        child.next_addr = parent.next_addr
        mem = self.memory

        def copy_ptes(vma: Vma, ptes: list[tuple[int, int]] | None) -> None:
            """``copy_pte_range`` of one vma (after the start, if any)."""
            if ptes is None:
                ptes = list(parent.populated_in(vma.start, vma.end))
            for addr, pte in ptes:
                if pte & PTE_SWAP:
                    self.swap.duplicate(pte >> PTE_SHIFT)
                    child.set(addr, pte)
                    continue
                if pte & PTE_DEVICE:
                    # copy_nonpresent_pte: both share the device page, read-only
                    # until a write migrates it back for the writer
                    self.device.get(pte >> PTE_SHIFT)
                    child.set(addr, pte)
                    continue
                pfn = pte >> PTE_SHIFT
                pte &= ~PTE_EXCLUSIVE  # the child gets an ordinary pte (copy_nonpresent_pte restores it)
                if vma.shared:
                    child.set(addr, pte & ~PTE_YOUNG)
                    mem.mapcount[pfn] += 1
                    mem.get_page(pfn)
                    continue
                if pfn != ZERO_PFN and mem.pincount[pfn]:
                    # copy_present_page: the child gets its own copy now,
                    # the parent keeps the pinned page exclusive.
                    new = mem.alloc(zero=False)
                    mem.copy(new, pfn)
                    mem.flags[new] = PG_ANON | PG_ANON_EXCLUSIVE
                    mem.mapcount[new] = 1
                    child.set(addr, present_pte(new, bool(pte & PTE_WRITE), True))
                    continue
                ro = pte & ~(PTE_WRITE | PTE_YOUNG)
                if pte & PTE_WRITE:
                    parent.set(addr, pte & ~PTE_WRITE)
                child.set(addr, ro)
                if pfn != ZERO_PFN:
                    mem.mapcount[pfn] += 1
                    mem.get_page(pfn)
                    # page_try_dup_anon_rmap: both mms map it now
                    mem.flags[pfn] &= ~PG_ANON_EXCLUSIVE
                elif pte & PTE_KSM_ZERO:
                    self.ksm.zero_mapped()

        try:
            for vma in parent.vmas:
                copy = Vma(vma.start, vma.end, vma.prot, vma.shared, vma.mergeable, vma.shmem, vma.pgoff)
                if vma.shmem is not None:
                    vma.shmem.users += 1
                child.vmas.append(copy)
                child._reindex()
                ptes = list(parent.populated_in(vma.start, vma.end))
                if not vma.shared and any(p & (PTE_WRITE | PTE_DEVICE) for _, p in ptes):
                    # An ENOMEM copying a pinned page ends the invalidation
                    # (what was write-protected stays so, as in the kernel).
                    rng = Range(mm, vma.start, vma.end, NotifyEvent.PROTECTION_PAGE)
                    def copy_all(_inv: Any, vma: Vma = vma) -> None:
                        copy_ptes(vma, None)

                    yield from self.notifier.invalidate_range(rng, copy_all)
                else:
                    copy_ptes(vma, ptes)
        except KernelError:
            yield from self.exit_mm(child_id)
            raise
        return child_id

    # ------------------------------------------------------------------- faults

    def _vma_for(self, m: Mm, addr: int, write: bool, *, gup: bool) -> Vma:
        """``check_vma_flags``.  Host CPU faults give EFAULT (SIGSEGV); GUP gives
        EFAULT for no vma / no access and EPERM for a write to a read-only vma
        (mm/gup.c)."""
        vma = m.find_vma(addr)
        if vma is None:
            raise KernelError(Errno.EFAULT, f"no vma at {addr:#x} in mm {m.id}")
        if vma.prot is Prot.NONE:
            raise KernelError(Errno.EFAULT, f"{addr:#x} in mm {m.id} is PROT_NONE")
        if write and vma.prot is not Prot.RW:
            raise KernelError(Errno.EPERM if gup else Errno.EFAULT, f"{addr:#x} in mm {m.id} is read-only")
        return vma

    def _exclusive(self, pfn: int) -> bool:
        """A private page only this pte maps (``wp_can_reuse_anon_folio``:
        not KSM, one mapping): it may be reused by a write fault, reclaimed,
        migrated.  Whether it may be *pinned* is :meth:`_anon_exclusive`."""
        mem = self.memory
        return pfn != ZERO_PFN and not mem.flags[pfn] & PG_KSM and mem.mapcount[pfn] == 1

    def _anon_exclusive(self, pfn: int) -> bool:
        """``PageAnonExclusive`` (the flag, not a guess from counts): a
        FOLL_PIN of a private page needs it (mm/gup.c ``gup_must_unshare``).
        KSM's ``write_protect_page`` clears it, so a page on its way to
        becoming a KSM page cannot be pinned by GUP-fast in the window before
        it is marked KSM."""
        return pfn != ZERO_PFN and bool(self.memory.flags[pfn] & PG_ANON_EXCLUSIVE)

    def handle_mm_fault(self, mm: int, addr: int, write: bool, *, unshare: bool = False) -> Op[tuple[int, bool]]:
        """``handle_mm_fault`` for one page after the vma check.

        Args:
            write: FAULT_FLAG_WRITE: the pte must end writable.
            unshare: FAULT_FLAG_UNSHARE: a read-only pin needs an exclusive
                page (not the zero page, not KSM, not shared by fork).
        A new pte starts old (``pte_sw_mkyoung`` is a no-op on x86; the CPU
        sets the bit on the next access, which the model counts only for host
        accesses that hit a present pte).  The secondary MMUs keep their own
        young bits (``clear_flush_young``).

        Returns:
            (pfn, writable) now mapped at ``addr``.
        Raises:
            KernelError(ENOMEM): no frame (nothing changed).
        """
        m = self.mms[mm]
        ps = self.page_size
        page = addr - addr % ps
        vma = m.find_vma(page)
        assert vma is not None
        mem = self.memory
        writable_vma = vma.prot is Prot.RW
        pte = m.get(page)
        if pte & PTE_DEVICE:
            # do_swap_page -> migrate_to_ram (dmirror_devmem_fault); EIO if poisoned
            yield from self.device.migrate_to_ram(self, m, page)
            pte = m.get(page)
        if pte & PTE_EXCLUSIVE:
            # remove_device_exclusive_entry: EXCLUSIVE invalidation, the pte is the CPU's again
            yield from self.device.restore_exclusive(self, m, page)
            pte = m.get(page)
        if pte & PTE_SWAP:
            # do_swap_page: the copy is exclusive to this mm.
            slot = pte >> PTE_SHIFT
            pfn = mem.alloc(zero=False)
            mem.write(pfn, 0, self.swap.read(slot))
            mem.flags[pfn] = PG_ANON | PG_ANON_EXCLUSIVE
            mem.mapcount[pfn] = 1
            self.swap.free(slot)
            m.set(page, present_pte(pfn, writable_vma and write, write))
            self.counters["swapins"] += 1
            pte = m.get(page)
        if not pte:
            if vma.shmem is not None:
                pgoff = vma.pgoff + (page - vma.start) // ps
                pfn = vma.shmem.pages.get(pgoff, 0)
                if not pfn:
                    pfn = mem.alloc()  # the page cache's reference
                    mem.flags[pfn] = PG_SHMEM
                    vma.shmem.pages[pgoff] = pfn
                mem.get_page(pfn)  # the pte's
                mem.mapcount[pfn] += 1
                m.set(page, present_pte(pfn, writable_vma, write))
                return pfn, writable_vma
            if write or unshare:
                pfn = mem.alloc()
                mem.flags[pfn] = PG_ANON | PG_ANON_EXCLUSIVE
                mem.mapcount[pfn] = 1
                m.set(page, present_pte(pfn, writable_vma and write, write))
                return pfn, writable_vma and write
            m.set(page, present_pte(ZERO_PFN, False))
            return ZERO_PFN, False
        pfn = pte >> PTE_SHIFT
        if write and not pte & PTE_WRITE:
            if vma.shmem is not None or self._exclusive(pfn):
                # wp_page_reuse: more permissive, no notifier traffic; a
                # reused anon page is exclusive again (do_wp_page)
                if vma.shmem is None:
                    mem.flags[pfn] |= PG_ANON_EXCLUSIVE
                m.set(page, pte | PTE_WRITE | PTE_DIRTY | PTE_YOUNG)
                return pfn, True
            pfn = yield from self.cow_break(m, page, pte, writable=True)
            return pfn, True
        if unshare and vma.shmem is None and not self._anon_exclusive(pfn):
            if self._exclusive(pfn) and not mem.pincount[pfn]:
                # do_wp_page(FAULT_FLAG_UNSHARE) -> wp_can_reuse_anon_folio:
                # only we map it; mark it exclusive, no copy
                mem.flags[pfn] |= PG_ANON_EXCLUSIVE
                return pfn, bool(pte & PTE_WRITE)
            pfn = yield from self.cow_break(m, page, pte, writable=False)
            return pfn, False
        return pfn, bool(pte & PTE_WRITE)

    def cow_break(self, m: Mm, page: int, pte: int, *, writable: bool,
                  origin: Origin = Origin.OWNER) -> Op[int]:
        """``wp_page_copy`` (``do_wp_page`` before 4.x), in the host's era:

        - 3.7–6.9 (``wrap_change_pte``): start(CLEAR) of the page, copy,
          ``set_pte_at_notify`` of the new pte (nodes that re-took the old
          page in between drop it), release the old page, end -- commit
          6bdb913f0a "mm: wrap calls to set_pte_at_notify with
          invalidate_range_start and invalidate_range_end".
        - 2.6.32–3.6 (bare): no start/end.  ``ptep_clear_flush_notify`` of
          the old pte is ``mmu_notifier_invalidate_page`` (here a one-page
          start+end, as the model sends every invalidate_page), then the
          copy and a bare ``set_pte_at_notify`` (change_pte, or its
          invalidate_page fallback to nodes without it).

        The new page is allocated before anything is sent (ENOMEM sends
        nothing) and freed again on any exit before the commit.  ``origin``:
        the owner's write fault, or ksmd's ``break_cow``."""
        mem = self.memory
        old = pte >> PTE_SHIFT
        new = mem.alloc(zero=old == ZERO_PFN)
        committed = False

        def commit() -> None:
            nonlocal committed
            self._unmap_pte(m, page, m.get(page))
            mem.mapcount[new] = 1
            m.set(page, present_pte(new, writable, writable))
            committed = True

        def copy_and_set(_inv: Any) -> Op[None]:
            if old != ZERO_PFN:
                mem.copy(new, old)  # after the acks: no node writes the old page any more
            mem.flags[new] = PG_ANON | PG_ANON_EXCLUSIVE
            yield from self.set_pte_at_notify(m.id, page, new, writable, commit, wrap=False, origin=origin)

        rng = Range(m.id, page, page + self.page_size, NotifyEvent.CLEAR, origin=origin)
        try:
            if self.wrap_change_pte:
                yield from self.notifier.invalidate_range(rng, copy_and_set)
            else:
                yield from self.notifier.invalidate_range(rng)  # ptep_clear_flush_notify
                yield from copy_and_set(None)
        finally:
            if not committed:
                mem.flags[new] = 0
                mem.put_page(new)
        self.counters["cow_breaks"] += 1
        return new

    def mm_has_notifiers(self, mm: int) -> bool:
        """``mm_has_notifiers``: anyone subscribed to ``mm``."""
        return self.notifier.has_subscribers(mm)

    def set_pte_at_notify(self, mm: int, addr: int, pfn: int, writable: bool, commit: Callable[[], T],
                           *, wrap: bool, origin: Origin = Origin.OWNER) -> Op[T]:
        """``set_pte_at_notify`` (include/linux/mmu_notifier.h): tell the nodes
        (change_pte, or a one-page invalidation for those without it), then
        ``commit()`` sets the primary pte.  While it is delivered GUP-fast does
        not serve ``addr`` (the kernel has cleared the pte) and a node that
        already repointed may read ``pfn``.  ``wrap``: the 3.7–6.9 kernels'
        start/end(CLEAR) around it (KSM's ``write_protect_page``/``replace_page``),
        the end paired on every exit path.  ``origin``: whose context
        (KSM's: ksmd), on every message it sends.

        Returns:
            What ``commit`` returns.
        """
        if not wrap and not self.mm_has_notifiers(mm):
            # mmu_notifier_change_pte: "if (mm_has_notifiers(mm))" -- nobody to
            # tell, nothing yielded, so no window for GUP-fast to see: set the pte.
            return commit()
        key = (mm, addr)

        def notify_and_commit(_inv: Any) -> Op[T]:
            self.pending[key] = pfn
            try:
                yield from self.notifier.change_pte(mm, addr, pfn, writable, origin)
                return commit()
            finally:
                self.pending.pop(key, None)

        if wrap:
            rng = Range(mm, addr, addr + self.page_size, NotifyEvent.CLEAR, origin=origin)
            return (yield from self.notifier.invalidate_range(rng, notify_and_commit))
        return (yield from notify_and_commit(None))

    # ------------------------------------------------------------ host accesses

    def _host_pages(self, mm: int, addr: int, length: int, write: bool) -> list[tuple[int, int, int]]:
        """Split a host access into (page, offset, length) after checking every vma."""
        m = self.check_mm(mm)
        if not isinstance(addr, int) or not isinstance(length, int) or addr < 0 or length < 0:
            raise KernelError(Errno.EINVAL, "address and length must be non-negative integers")
        if addr + length > ADDRESS_LIMIT:
            raise KernelError(Errno.EFAULT, "beyond the address space")
        ps = self.page_size
        out = []
        at, end = addr, addr + length
        while at < end:
            page = at - at % ps
            n = min(end, page + ps) - at
            self._vma_for(m, page, write, gup=False)
            out.append((page, at - page, n))
            at += n
        return out

    def read(self, mm: int, addr: int, length: int) -> Op[bytes]:
        """A host CPU read of ``length`` bytes (faulting pages in).

        Raises:
            KernelError: ESRCH, EFAULT (unmapped or PROT_NONE; nothing read),
                ENOMEM (no frame for a swap-in).
        """
        parts = self._host_pages(mm, addr, length, False)
        m = self.mms[mm]
        out = bytearray()
        for page, off, n in parts:
            pte = m.get(page)
            if pte & PTE_PRESENT and not pte & PTE_EXCLUSIVE:
                m.set(page, pte | PTE_YOUNG)
                pfn = pte >> PTE_SHIFT
            else:
                pfn, _ = yield from self.handle_mm_fault(mm, page, False)
            out += self.memory.read(pfn, off, n)
        return bytes(out)

    def write(self, mm: int, addr: int, data: bytes) -> Op[int]:
        """A host CPU write (faulting, COW-breaking as needed).

        Returns:
            Bytes written.
        Raises:
            KernelError: ESRCH, EFAULT (unmapped, PROT_NONE or read-only;
                nothing written), ENOMEM.
        """
        data = bytes(data)
        parts = self._host_pages(mm, addr, len(data), True)
        m = self.mms[mm]
        pos = 0
        for page, off, n in parts:
            pte = m.get(page)
            if pte & PTE_PRESENT and pte & PTE_WRITE and not pte & PTE_EXCLUSIVE:
                m.set(page, pte | PTE_YOUNG | PTE_DIRTY)
                pfn = pte >> PTE_SHIFT
            else:
                pfn, _ = yield from self.handle_mm_fault(mm, page, True)
            self.memory.write(pfn, off, data[pos : pos + n])
            pos += n
        return pos

    # ------------------------------------------------------------ get_user_pages

    def _gup_args(self, mm: int, addr: int, npages: int) -> Mm:
        m = self.check_mm(mm)
        if not isinstance(addr, int) or addr < 0 or addr % self.page_size:
            raise KernelError(Errno.EINVAL, f"GUP address {addr!r} is not page aligned")
        if not isinstance(npages, int) or not 1 <= npages <= MAX_GUP_PAGES:
            raise KernelError(Errno.EINVAL, f"GUP of {npages!r} pages (1..{MAX_GUP_PAGES})")
        return m

    def _pin(self, node: str, mm: int, addr: int, pfn: int) -> None:
        mem = self.memory
        mem.pincount[pfn] += 1
        mem.get_page(pfn)
        self.pins.setdefault(node, {}).setdefault((mm, pfn), Counter())[addr] += 1
        self.pages_pinned += 1

    def gup_fast(self, mm: int, addr: int, npages: int, write: bool, *, pin: bool = False,
                 node: str | None = None) -> list[tuple[int, int, bool]] | None:
        """``get_user_pages_fast`` without faulting: every page of the request
        (up to the end of the first vma) already present with the access
        needed, or None (take the slow path).  May run while an invalidation
        is open: it serves the primary as it is (the node's own sequence
        check discards such a reply).

        Raises:
            KernelError: as :meth:`gup` for bad arguments (ESRCH, EINVAL); a
                missing vma or protection is the slow path's to report.
        """
        m = self._gup_args(mm, addr, npages)
        if mm in self.notifier.tearing_down:
            # exit_mmap has begun (mmu_notifier_release sent, subscriptions
            # gone): nothing served now would ever be invalidated before the
            # frames are freed.  In the kernel mm_users is 0, so GUP cannot
            # even take the mm (mmget_not_zero).
            return None
        vma = m.find_vma(addr)
        if vma is None or vma.prot is _PROT_NONE or (write and vma.prot is not _PROT_RW):
            # GUP-fast looks at ptes only; the verdict on the vma belongs to the
            # slow path, under the lock an mprotect or munmap may be holding.
            return None
        ps = self.page_size
        end = min(addr + npages * ps, vma.end)
        opened = self.notifier.open.get(mm)
        if opened and any(inv.range.overlaps(addr, end) for inv in opened):
            # An invalidation is open over these pages: its start went only to
            # the nodes that held them then, so a node served now would never
            # hear of the zap that follows.  The slow path waits for it.
            return None
        out = []
        for page in range(addr, end, ps):
            pte = m.get(page)
            if not pte & PTE_PRESENT or pte & PTE_EXCLUSIVE or (mm, page) in self.pending:
                return None
            pfn = pte >> PTE_SHIFT
            writable = bool(pte & PTE_WRITE)
            if write and not writable:
                return None
            if pin and vma.shmem is None and not self._anon_exclusive(pfn):
                # gup_must_unshare: FOLL_PIN of an anon page that is not
                # PageAnonExclusive (shared by fork, write-protected by KSM)
                # goes to the slow path, which unshares it first
                return None
            out.append((page, pfn, writable))
        for page, pfn, _ in out:
            if pin:
                self._pin(node or "", mm, page, pfn)
        if node is not None:
            self.notifier.note_served(node, mm, addr, end)
        self.counters["gup_fast"] += 1
        return out

    def gup(self, mm: int, addr: int, npages: int, write: bool, *, pin: bool = False,
            node: str | None = None) -> Op[list[tuple[int, int, bool]]]:
        """``get_user_pages_remote``: fault in up to ``npages`` pages from
        ``addr`` (fault-around), stopping at the first page that cannot be
        had; FOLL_PIN when ``pin`` (the pages stay until :meth:`unpin`).

        Returns:
            [(addr, pfn, writable)], at least one entry.
        Raises:
            KernelError: ESRCH, EINVAL (bad arguments), EFAULT (no vma or no
                access at ``addr``), EPERM (write to a read-only vma), ENOMEM.
        """
        m = self._gup_args(mm, addr, npages)
        ps = self.page_size
        out: list[tuple[int, int, bool]] = []
        for i in range(npages):
            page = addr + i * ps
            try:
                self._vma_for(m, page, write, gup=True)
                pfn, writable = yield from self.handle_mm_fault(mm, page, write, unshare=pin and not write)
            except KernelError:
                if not out:
                    raise
                break
            if mm not in self.mms:  # torn down while we waited
                break
            out.append((page, pfn, writable))
        for page, pfn, _ in out:
            if pin:
                self._pin(node or "", mm, page, pfn)
        if node is not None and out:
            self.notifier.note_served(node, mm, addr, addr + len(out) * ps)
        self.counters["gup"] += 1
        return out

    def unpin(self, node: str, mm: int, pfns: list[int]) -> None:
        """``unpin_user_pages`` of pins ``node`` holds in ``mm``; a pfn listed
        twice drops two pins.

        Raises:
            KernelError(EINVAL): a pfn the node does not hold pinned (nothing
                is unpinned).
        """
        held = self.pins.get(node, {})
        want = Counter(pfns)
        for pfn, count in want.items():
            have = held.get((mm, pfn))
            if not have or sum(have.values()) < count:
                raise KernelError(Errno.EINVAL, f"{node} holds no pin of pfn {pfn} in mm {mm}")
        for pfn, count in want.items():
            have = held[(mm, pfn)]
            for _ in range(count):
                addr = next(iter(have))
                have[addr] -= 1
                if not have[addr]:
                    del have[addr]
                self._unpin_one(pfn)
            if not have:
                del held[(mm, pfn)]

    def _unpin_one(self, pfn: int) -> None:
        self.memory.pincount[pfn] -= 1
        self.pages_unpinned += 1
        self.put_page(pfn)

    def fence_node(self, node: str) -> int:
        """The node is fenced: no more notifier traffic to it, its pins dropped.

        Returns:
            Pins dropped.
        """
        self.notifier.fence(node)
        self.device.poison_owner(node)  # its device-private pages went with it (broker/devmem.py)
        return self.drop_pins(node)

    def drop_pins(self, node: str | None = None, mm: int | None = None) -> int:
        """Drop the pins ``node`` holds (every node's: None) in ``mm`` (in
        every mm: None): a fence, a revoke, or the mm's exit.  A driver
        unpins in its ``->release`` (hpc/xpmem's ``xpmem_mmu_notifier_release``
        ends every attachment); a node of this model is another process, so
        the host drops them itself rather than trust it to.

        Returns:
            Pins dropped.
        """
        dropped = 0
        for name in [node] if node is not None else list(self.pins):
            held = self.pins.get(name)
            if not held:
                continue
            for key in [k for k in held if mm is None or k[0] == mm]:
                for _ in range(sum(held.pop(key).values())):
                    self._unpin_one(key[1])
                    dropped += 1
            if not held:
                del self.pins[name]
        return dropped

    # ---------------------------------------------------------------- the oracle

    def _dma_check(self, node: str, mm: int, addr: int, pfn: int, offset: int, length: int, write: bool) -> None:
        ps = self.page_size
        if addr % ps or not 0 <= offset <= ps or length < 0 or offset + length > ps:
            raise KernelError(Errno.EINVAL, f"DMA [{offset}, {offset + length}) outside page {addr:#x}")
        if not 0 <= pfn < self.memory.nframes:
            raise KernelError(Errno.EINVAL, f"no frame {pfn}")
        if self.is_pinned_by(node, mm, addr, pfn):
            return
        pte = self.pte(mm, addr)
        if pte is not None and pte[0] == pfn and (pte[1] or not write):
            return
        if not write and self.pending.get((mm, addr)) == pfn:
            return  # change_pte delivered, the pte not yet set: the new page, same contents
        raise self.stale_access(node, mm, addr, pfn, write, f"the primary maps {pte}")

    def stale_access(self, node: str, mm: int, addr: int, pfn: int, write: bool, why: str) -> KernelError:
        """Count and log a stale access (the oracle's, or the host core's
        permit check of an xpmem access); returns the ESTALE to answer."""
        self.stale_accesses += 1
        logger.error("stale %s by %s: mm %s %#x pfn %s: %s", "write" if write else "read", node, mm, addr, pfn, why)
        return KernelError(Errno.ESTALE, f"mm {mm} {addr:#x} pfn {pfn} for {node}: {why}")

    def dma_read(self, node: str, mm: int, addr: int, pfn: int, offset: int, length: int) -> bytes:
        """A node reads through its translation; checked against the primary.

        Raises:
            KernelError(ESTALE): the primary no longer maps ``pfn`` at ``addr``
                (and the node holds no pin of it): counted in ``stale_accesses``.
        """
        self._dma_check(node, mm, addr, pfn, offset, length, False)
        return self.memory.read(pfn, offset, length)

    def dma_write(self, node: str, mm: int, addr: int, pfn: int, offset: int, data: bytes) -> None:
        """A node writes through its (writable) translation; checked as :meth:`dma_read`."""
        self._dma_check(node, mm, addr, pfn, offset, len(data), True)
        if pfn == ZERO_PFN:
            raise KernelError(Errno.EFAULT, "write to the zero page")
        m = self.mms.get(mm)
        pte = m.get(addr) if m is not None else 0
        if pte & PTE_PRESENT and pte >> PTE_SHIFT == pfn:
            m.set(addr, pte | PTE_DIRTY)  # type: ignore[union-attr]
        self.memory.flags[pfn] |= PG_DIRTY
        self.memory.write(pfn, offset, data)

    # ------------------------------------------------------- reclaim, migration

    def _rmap_candidates(self, m: Mm, start: int, end: int) -> list[tuple[int, int]]:
        """(addr, pfn) of the range's present anonymous pages that reclaim and
        migration try: private (shmem goes through its page cache, not
        modelled), not the zero page.  Each pfn once (a KSM page mapped at
        several addresses of the range is one page to move).

        Pinned pages are tried too, as the kernel does: ``try_to_unmap_one``
        and ``try_to_migrate_one`` (mm/rmap.c) raise the page's invalidation
        first, then find it pinned (``folio_try_share_anon_rmap_pte`` fails:
        ``folio_maybe_dma_pinned``), put the pte back and fail; reclaim
        keeps the folio (mm/vmscan.c ``shrink_folio_list``: activate_locked),
        migration leaves it where it is (mm/migrate.c: the folio stays
        mapped, -EAGAIN, in the end a failed page).  A pinned holder
        (xpmem) ignores those kswapd / migration invalidations and keeps its
        pin, so the commit (:meth:`_still_mapped`) refuses the page."""
        out = []
        seen: set[int] = set()
        for vma in m.vmas_in(start, end):
            if vma.shmem is not None:
                continue
            for addr, pte in m.populated_in(max(start, vma.start), min(end, vma.end)):
                if not pte & PTE_PRESENT:
                    continue
                pfn = pte >> PTE_SHIFT
                if pfn != ZERO_PFN and pfn not in seen:
                    seen.add(pfn)
                    out.append((addr, pfn))
        return out

    def rmap_walk(self, pfn: int, addr: int, owner: Mm | None = None) -> list[tuple[Mm, int]] | None:
        """Every pte mapping the anonymous page ``pfn`` found at ``addr``
        (mm/rmap.c ``rmap_walk_anon``; mm/ksm.c ``rmap_walk_ksm``).

        An anonymous page shared by fork sits at the same address in every
        mm of its ``anon_vma`` (no mremap here), so the walk looks at that
        address in every mm; a KSM page also at the address of every rmap
        item of its stable node (and, like ``rmap_walk_ksm``, at those
        addresses in the mms forked from theirs).

        Args:
            owner: the mm the page was found in, if known (an exclusive page
                is then looked up there only).
        Returns:
            [(mm, addr)], in mm order; None if the walk does not account for
            every mapping (``page_mapcount``): the caller leaves such a page.
        """
        mem = self.memory
        if mem.flags[pfn] & PG_SHMEM:
            return self._rmap_walk_file(pfn, addr, owner)
        if mem.mapcount[pfn] == 1 and not mem.flags[pfn] & PG_KSM and owner is not None:
            pte = owner.get(addr)
            return [(owner, addr)] if pte & PTE_PRESENT and pte >> PTE_SHIFT == pfn else None
        addrs = {addr}
        if mem.flags[pfn] & PG_KSM:
            node = self.ksm.stable.get(pfn)
            if node is not None:
                addrs.update(a for _mm, a in node.items)
        out = []
        for m_id in sorted(self.mms):
            m = self.mms[m_id]
            for a in sorted(addrs):
                pte = m.get(a)
                if pte & PTE_PRESENT and pte >> PTE_SHIFT == pfn:
                    out.append((m, a))
        return out if len(out) == mem.mapcount[pfn] else None

    def _rmap_walk_file(self, pfn: int, addr: int, owner: Mm | None) -> list[tuple[Mm, int]] | None:
        """``rmap_walk_file`` of a shmem page: every vma of every mm over the
        same shmem object that covers the page's offset (``i_mmap``)."""
        vma = owner.find_vma(addr) if owner is not None else None
        if vma is None or vma.shmem is None:
            return None
        shmem, pgoff = vma.shmem, vma.pgoff + (addr - vma.start) // self.page_size
        out = []
        for m_id in sorted(self.mms):
            m = self.mms[m_id]
            for other in m.vmas:
                if other.shmem is not shmem:
                    continue
                at = other.start + (pgoff - other.pgoff) * self.page_size
                if other.start <= at < other.end:
                    pte = m.get(at)
                    if pte & PTE_PRESENT and pte >> PTE_SHIFT == pfn:
                        out.append((m, at))
        return out if len(out) == self.memory.mapcount[pfn] else None

    def _still_mapped(self, pfn: int, mappings: list[tuple[Mm, int]]) -> bool:
        """The walk's result still holds (after the acks): every pte maps
        ``pfn``, nothing else does, nothing pinned it meanwhile."""
        mem = self.memory
        for m, a in mappings:
            pte = m.get(a) if m.id in self.mms else 0
            if not pte & PTE_PRESENT or pte >> PTE_SHIFT != pfn:
                return False
        return mem.mapcount[pfn] == len(mappings) and not mem.pincount[pfn]

    def _under_every_mapping(self, mappings: list[tuple[Mm, int]], commit: Callable[[], T],
                             origin: Origin) -> Op[T]:
        """``try_to_unmap`` / ``try_to_migrate`` of one page: one
        start/end(CLEAR) of the page per mapping (``try_to_unmap_one``,
        ``try_to_migrate_one``: ``mmu_notifier_range_init(&range,
        MMU_NOTIFY_CLEAR, 0, mm, address, address + folio_size)``), then
        ``commit()`` changes every pte at once.

        The kernel ends each mapping's invalidation before the next, leaving
        a migration (or swap) entry that makes every fault of it wait.  The
        model has no migration entries, so the invalidations nest instead
        (a start per mapping, the commit, the ends in reverse order): while
        they are open GUP-fast serves none of the mappings, and a cancel
        before the commit leaves every pte as it was.  ``origin``: kswapd
        (reclaim) or migration, on each start."""
        if not mappings:
            return commit()
        m, a = mappings[0]
        rng = Range(m.id, a, a + self.page_size, NotifyEvent.CLEAR, origin=origin)
        return (yield from self.notifier.invalidate_range(
            rng, lambda _inv: self._under_every_mapping(mappings[1:], commit, origin)))

    def reclaim(self, mm: int, addr: int, length: int) -> Op[int]:
        """Page out the range's anonymous pages to swap, with aging, through
        the reverse map (pages shared by fork and KSM pages included).

        Per page (mm/vmscan.c ``shrink_folio_list``): ``folio_referenced``
        walks every mapping -- the pte's young bit | ``clear_flush_young`` of
        the nodes (``folio_referenced_one``), both cleared; a referenced page
        gets a second chance.  Otherwise a swap slot, then ``try_to_unmap``
        (:meth:`_under_every_mapping`): the page written to the slot, every
        pte becomes the swap entry (``swap_duplicate`` per further mapping),
        the frame is freed.  Shmem pages are skipped; a pinned page gets its
        invalidations (origin kswapd) and stays (:meth:`_rmap_candidates`).

        Returns:
            Pages swapped out.
        Raises:
            KernelError: ESRCH, EINVAL; ENOSPC when swap is full (the pages
                swapped so far stay swapped).
        """
        m = self.check_mm(mm)
        start, end = self._range(addr, length)
        ps = self.page_size
        swapped = 0
        for page, pfn in self._rmap_candidates(m, start, end):
            mappings = self.rmap_walk(pfn, page, m) if mm in self.mms else None
            if not mappings:
                continue
            referenced = False
            for other, at in mappings:
                pte = other.get(at)
                referenced |= bool(pte & PTE_YOUNG)
                other.set(at, pte & ~PTE_YOUNG)
                referenced |= yield from self.notifier.clear_flush_young(other.id, at, at + ps)
            # folio_referenced_one: a reference clears PG_idle; and an access
            # idle tracking already harvested (PG_young) still counts
            if referenced:
                self.memory.flags[pfn] &= ~PG_IDLE
            if self.memory.flags[pfn] & PG_YOUNG:
                self.memory.flags[pfn] &= ~PG_YOUNG
                referenced = True
            if referenced:
                self.counters["reclaim_referenced"] += 1
                continue
            slot = self.swap.alloc()
            used = False

            def try_to_unmap(pfn: int = pfn, slot: int = slot, mappings: list[tuple[Mm, int]] = mappings) -> bool:
                nonlocal used
                if not self._still_mapped(pfn, mappings):
                    # changed, or pinned: try_to_unmap fails, the page stays
                    self.counters["reclaim_failed"] += 1
                    return False
                self.swap.write(slot, self.memory.page(pfn))
                for i, (other, at) in enumerate(mappings):
                    self._unmap_pte(other, at, other.get(at))
                    if i:
                        self.swap.duplicate(slot)
                    other.set(at, (slot << PTE_SHIFT) | PTE_SWAP)
                used = True
                return True

            try:
                yield from self._under_every_mapping(mappings, try_to_unmap, Origin.KSWAPD)
            finally:
                if not used:
                    self.swap.free(slot)
            if used:
                swapped += 1
        self.counters["swapouts"] += swapped
        return swapped

    def migrate(self, mm: int, addr: int, length: int) -> Op[int]:
        """``migrate_pages`` of the range's anonymous pages to new frames,
        through the reverse map: a page shared by fork or a KSM page moves
        with every mapping of it repointed (mm/migrate.c
        ``migrate_folio_unmap`` -> ``try_to_migrate``, ``remove_migration_ptes``;
        a KSM page's stable node follows it, ``folio_migrate_ksm``).  Per page:
        the new frame first (ENOMEM before anything is sent), then one
        start/end(CLEAR) per mapping (:meth:`_under_every_mapping`; ordinary
        migration raises CLEAR, MIGRATE is ``migrate_vma_*``'s, for device
        memory; origin migration), the copy, every pte repointed, the old
        frame freed.  Shmem pages stay; a pinned page gets its invalidations
        and stays (``try_to_migrate_one`` fails for it, :meth:`_rmap_candidates`).

        Returns:
            Pages migrated.
        Raises:
            KernelError: ESRCH, EINVAL, ENOMEM (no frame; pages migrated so far
                stay migrated, as migrate_pages leaves the folios it moved).
        """
        m = self.check_mm(mm)
        start, end = self._range(addr, length)
        mem = self.memory
        moved = 0
        try:
            for page, pfn in self._rmap_candidates(m, start, end):
                mappings = self.rmap_walk(pfn, page, m) if mm in self.mms else None
                if not mappings:
                    continue
                new = mem.alloc(zero=False)
                done = False

                def move(pfn: int = pfn, new: int = new, mappings: list[tuple[Mm, int]] = mappings) -> None:
                    nonlocal done
                    if not self._still_mapped(pfn, mappings):
                        self.counters["migrate_failed"] += 1  # changed, or pinned (EAGAIN)
                        return
                    mem.copy(new, pfn)  # after every node acked: no write through an old entry
                    mem.flags[new] = mem.flags[pfn]
                    if mem.flags[pfn] & PG_KSM:
                        mem.flags[pfn] &= ~PG_KSM
                        self.ksm.page_migrated(pfn, new)
                    for i, (other, at) in enumerate(mappings):
                        pte = other.get(at)
                        if i:
                            mem.get_page(new)  # the first mapping takes the allocation's reference
                        mem.mapcount[new] += 1
                        other.set(at, (new << PTE_SHIFT) | (pte & 0xFF))
                        mem.mapcount[pfn] -= 1
                        self.put_page(pfn)
                    done = True

                try:
                    yield from self._under_every_mapping(mappings, move, Origin.MIGRATION)
                finally:
                    if not done:
                        mem.flags[new] = 0
                        mem.put_page(new)
                if done:
                    moved += 1
        finally:
            self.counters["migrated"] += moved
        return moved

    # ------------------------------------------------------- idle page tracking

    def page_idle(self, mm: int, addr: int, length: int, mark: bool) -> Op[list[tuple[int, int, bool]]]:
        """``/sys/kernel/mm/page_idle/bitmap`` (mm/page_idle.c) over the pages
        ``mm`` maps in ``[addr, addr + length)``, as a user finds their pfns
        through ``/proc/pid/pagemap`` (KVM's ``access_tracking_perf_test``).

        Per page, ``page_idle_clear_pte_refs`` walks every mapping of it
        (:meth:`rmap_walk`): ``ptep_clear_young_notify`` = the pte's young
        bit cleared | ``clear_young`` of the nodes (ORed, no flush); any of
        them young clears ``PG_idle`` and sets ``PG_young``.  ``mark`` (a
        write of 1 bits) then sets ``PG_idle``; a read clears the references
        the same way (only of pages still idle) and reports ``PG_idle``.
        Pages the bitmap does not track are left out: not present, the zero
        page (``page_idle_get_folio`` takes LRU folios only).

        Returns:
            [(addr, pfn, idle)] of the tracked pages, ascending.
        Raises:
            KernelError: ESRCH, EINVAL (unaligned; more than
                :data:`IDLE_MAX_PAGES` pages).
        """
        m = self.check_mm(mm)
        start, end = self._range(addr, length)
        ps = self.page_size
        if (end - start) // ps > IDLE_MAX_PAGES:
            raise KernelError(Errno.EINVAL, f"idle tracking of more than {IDLE_MAX_PAGES} pages at once")
        mem = self.memory
        out: list[tuple[int, int, bool]] = []
        for page, pte in list(m.populated_in(start, end)):
            if mm not in self.mms:
                break
            if not pte & PTE_PRESENT or pte >> PTE_SHIFT == ZERO_PFN or m.get(page) != pte:
                continue
            pfn = pte >> PTE_SHIFT
            if mark or mem.flags[pfn] & PG_IDLE:
                mappings = self.rmap_walk(pfn, page, m) or [(m, page)]
                referenced = False
                for other, at in mappings:
                    now = other.get(at)
                    if not now & PTE_PRESENT or now >> PTE_SHIFT != pfn:
                        continue
                    referenced |= bool(now & PTE_YOUNG)
                    other.set(at, now & ~PTE_YOUNG)
                    referenced |= yield from self.notifier.clear_young(other.id, at, at + ps)
                now = m.get(page)
                if not now & PTE_PRESENT or now >> PTE_SHIFT != pfn:
                    continue  # gone while the nodes answered
                if referenced:
                    mem.flags[pfn] = (mem.flags[pfn] & ~PG_IDLE) | PG_YOUNG
                if mark:
                    mem.flags[pfn] |= PG_IDLE
            out.append((page, pfn, bool(mem.flags[pfn] & PG_IDLE)))
        self.counters["page_idle_" + ("marks" if mark else "reads")] += 1
        return out

    # ---------------------------------------------------------------- checking

    def check_invariants(self) -> None:
        """Recount everything from the page tables; raise AssertionError on a mismatch.

        O(frames + ptes): for tests.
        """
        mem = self.memory
        maps: Counter[int] = Counter()
        slots: Counter[int] = Counter()
        cache: Counter[int] = Counter()
        shmems = {}
        for m in self.mms.values():
            for vma in m.vmas:
                if vma.shmem is not None:
                    shmems[id(vma.shmem)] = vma.shmem
            for index, chunk in m.pgd.items():
                count = 0
                for slot, pte in enumerate(chunk):
                    if not pte:
                        continue
                    count += 1
                    addr = index * m.chunk_bytes + slot * self.page_size
                    assert m.find_vma(addr) is not None, f"mm {m.id} pte at {addr:#x} outside every vma"
                    if pte & PTE_PRESENT:
                        if pte >> PTE_SHIFT != ZERO_PFN:
                            maps[pte >> PTE_SHIFT] += 1
                            if pte & PTE_WRITE and mem.flags[pte >> PTE_SHIFT] & PG_ANON:
                                assert mem.flags[pte >> PTE_SHIFT] & PG_ANON_EXCLUSIVE, \
                                    f"mm {m.id} {addr:#x}: writable anon pte of a page not AnonExclusive"
                    elif pte & PTE_DEVICE:
                        assert pte >> PTE_SHIFT in self.device.pages, f"mm {m.id} {addr:#x}: no device page"
                    else:
                        assert pte & PTE_SWAP, f"mm {m.id} {addr:#x}: pte {pte:#x} neither present nor swap"
                        slots[pte >> PTE_SHIFT] += 1
                assert count == m.populated[index], f"mm {m.id} chunk {index}: populated count"
            mm_swapped = sum(1 for chunk in m.pgd.values() for pte in chunk if pte & PTE_SWAP)
            assert mm_swapped == m.swapped, f"mm {m.id}: swapped count {m.swapped}, ptes {mm_swapped}"
        for shmem in shmems.values():
            for pfn in shmem.pages.values():
                cache[pfn] += 1
        pins: Counter[int] = Counter()
        for held in self.pins.values():
            for (_mm, pfn), have in held.items():
                pins[pfn] += sum(have.values())
        n = mem.nframes
        counted = [[0] * n, [0] * n, [0] * n]
        for table, counter in zip(counted, (maps, pins, cache), strict=True):
            for pfn, count in counter.items():
                table[pfn] = count
        mapc, pinc, refc, flag_list = list(mem.mapcount), list(mem.pincount), list(mem.refcount), list(mem.flags)
        want_ref = [a + b + c for a, b, c in zip(*counted, strict=True)]
        if mapc[1:] != counted[0][1:] or pinc[1:] != counted[1][1:] or refc[1:] != want_ref[1:]:
            for pfn in range(1, n):  # the slow walk only to name the first mismatch
                assert mapc[pfn] == maps[pfn], f"pfn {pfn}: mapcount {mapc[pfn]} != ptes {maps[pfn]}"
                assert pinc[pfn] == pins[pfn], f"pfn {pfn}: pincount {pinc[pfn]} != pins {pins[pfn]}"
                assert refc[pfn] == want_ref[pfn], \
                    f"pfn {pfn}: refcount {refc[pfn]} != ptes + pins + cache {want_ref[pfn]}"
        for pfn in range(1, n):
            flags = flag_list[pfn]
            if flags & PG_KSM:
                assert not flags & PG_ANON_EXCLUSIVE, f"KSM page {pfn} is AnonExclusive"
                assert not pinc[pfn], f"KSM page {pfn} is pinned"
            if pinc[pfn] and flags & PG_ANON and not flags & PG_SHMEM:
                assert flags & PG_ANON_EXCLUSIVE, f"pinned anon page {pfn} is not AnonExclusive"
        in_use = sum(1 for ref in refc[1:] if ref)
        assert in_use == mem.in_use, f"frames in use {mem.in_use}, counted {in_use}"
        swap_map = list(self.swap.swap_map)
        want_slots = [0] * self.swap.nslots
        for slot, count in slots.items():
            want_slots[slot] = count
        if swap_map[1:] != want_slots[1:]:
            for slot in range(1, self.swap.nslots):
                assert swap_map[slot] == slots[slot], f"swap slot {slot}: {swap_map[slot]} != {slots[slot]}"
        for key, pfn in self.pending.items():
            raise AssertionError(f"set_pte_at_notify {key} -> {pfn} left pending")
        self.ksm.check_invariants()

    def close(self) -> None:
        self.memory.close()
        self.swap.close()


def run_op(op: Op[Any]) -> Any:
    """Drive an operation on a model no node is subscribed to (tests, demos)."""
    from .effects import no_nodes, run_sync

    return run_sync(op, no_nodes)


__all__ = ["Mm", "Model", "Shmem", "Vma", "run_op"]
