"""The page-table layer of the primary MMU: pte encoding, ``Mm``, ``Vma``, shmem.

Pure data structures: no frames, no notifier, no KSM.  :mod:`broker.mm` (the
operations) and :mod:`broker.ksm` both build on this module and on nothing of
each other's.

Page table entries are 64-bit integers in per-mm chunks of 512 (one
``array('Q')`` per populated 2 MiB of address space with 4 KiB pages, as one
page of ptes under a pmd in ``arch/x86``), so a mapped page costs 8 bytes of
page table plus 13 bytes of frame metadata::

    bit 0 PRESENT   bit 1 WRITE   bit 2 DIRTY   bit 3 YOUNG
    bit 4 SWAP      bit 5 KSM_ZERO (a zero page KSM merged, is_ksm_zero_pte)
    bit 6 DEVICE    (a device-private entry: bits 8.. a device page handle)
    bit 7 EXCLUSIVE (with PRESENT: a device-exclusive entry)
    bits 8.. pfn (present) or swap slot (swapped); 0 = pte_none
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

PTE_PRESENT = 0x01
PTE_WRITE = 0x02
PTE_DIRTY = 0x04
PTE_YOUNG = 0x08
PTE_SWAP = 0x10
PTE_KSM_ZERO = 0x20
#: a device-private entry (``is_device_private_entry``): not present; bits 8..
#: are the device page's handle (broker/devmem.py), the contents are on the device
PTE_DEVICE = 0x40
#: a device-exclusive entry (``make_device_exclusive``): the frame stays mapped
#: (PRESENT, accounted as before) but the CPU may not use it: a CPU access or
#: GUP restores it first, through an EXCLUSIVE invalidation (broker/devmem.py)
PTE_EXCLUSIVE = 0x80
PTE_SHIFT = 8

CHUNK_PAGES = 512
#: First address mmap hands out (below it: nothing, like mmap_min_addr and the binary).
MMAP_BASE = 0x10000000

_NONZERO = re.compile(rb"[^\x00]")


class Prot(StrEnum):
    """A vma's protection (``PROT_NONE`` / ``PROT_READ`` / ``PROT_READ|PROT_WRITE``).

    A ``str`` on the wire and in status (``"none"``, ``"r"``, ``"rw"``).
    """

    NONE = "none"
    R = "r"
    RW = "rw"

    @property
    def rank(self) -> int:
        """Order of permissiveness: a change to a lower rank is a downgrade."""
        return _PROT_RANK[self]


_PROT_RANK = {Prot.NONE: 0, Prot.R: 1, Prot.RW: 2}
PROTS = tuple(p.value for p in Prot)


def present_pte(pfn: int, writable: bool, dirty: bool = False, young: bool = False) -> int:
    """``pfn_pte`` + ``pte_mkwrite`` / ``pte_mkdirty`` / ``pte_mkyoung``."""
    return (
        (pfn << PTE_SHIFT)
        | PTE_PRESENT
        | (PTE_WRITE if writable else 0)
        | (PTE_DIRTY if dirty else 0)
        | (PTE_YOUNG if young else 0)
    )


@dataclass(slots=True)
class Shmem:
    """A shared anonymous object (``shmem_zero_setup``): its page cache.

    Each cached page holds one reference.  The object lives while a vma maps it.
    """

    pages: dict[int, int] = field(default_factory=dict)  # page offset -> pfn
    users: int = 0


@dataclass(slots=True)
class Vma:
    """``struct vm_area_struct`` of an anonymous mapping."""

    start: int
    end: int
    prot: Prot
    shared: bool = False
    mergeable: bool = False
    shmem: Shmem | None = None
    #: Page offset of ``start`` in the shmem object.
    pgoff: int = 0

    def split(self, at: int, page_size: int) -> Vma:
        """Cut at ``at``; self keeps ``[start, at)``, returns ``[at, end)``."""
        tail = Vma(at, self.end, self.prot, self.shared, self.mergeable, self.shmem,
                   self.pgoff + (at - self.start) // page_size)
        if self.shmem is not None:
            self.shmem.users += 1
        self.end = at
        return tail

    def describe(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "prot": self.prot.value, "shared": self.shared,
                "mergeable": self.mergeable}


class Mm:
    """``struct mm_struct``: vmas (sorted, disjoint) and a chunked page table."""

    __slots__ = ("id", "vmas", "starts", "pgd", "populated", "swapped", "next_addr", "page_size", "chunk_bytes")

    def __init__(self, mm_id: int, page_size: int) -> None:
        self.id = mm_id
        self.vmas: list[Vma] = []
        self.starts: list[int] = []
        #: chunk index -> 512 ptes; populated[chunk] = number of non-none ptes in it
        self.pgd: dict[int, array] = {}
        self.populated: dict[int, int] = {}
        #: swap entries among the ptes (the rest of the populated ones are present)
        self.swapped = 0
        self.next_addr = MMAP_BASE
        self.page_size = page_size
        self.chunk_bytes = page_size * CHUNK_PAGES

    # -- vmas -------------------------------------------------------------------

    def find_vma(self, addr: int) -> Vma | None:
        i = bisect_right(self.starts, addr) - 1
        if i >= 0 and self.vmas[i].end > addr:
            return self.vmas[i]
        return None

    def _reindex(self) -> None:
        self.vmas.sort(key=lambda v: v.start)
        self.starts = [v.start for v in self.vmas]

    def vmas_in(self, start: int, end: int) -> list[Vma]:
        i = max(bisect_right(self.starts, start) - 1, 0)
        out = []
        for vma in self.vmas[i:]:
            if vma.start >= end:
                break
            if vma.end > start:
                out.append(vma)
        return out

    def split_at(self, addr: int) -> None:
        """Make ``addr`` a vma boundary if a vma spans it (``split_vma``)."""
        vma = self.find_vma(addr)
        if vma is not None and vma.start < addr:
            self.vmas.append(vma.split(addr, self.page_size))
            self._reindex()

    def isolate(self, start: int, end: int) -> list[Vma]:
        """Split so that ``[start, end)`` is covered by whole vmas; return them."""
        self.split_at(start)
        self.split_at(end)
        return self.vmas_in(start, end)

    def covered_prefix(self, start: int, end: int) -> tuple[list[Vma], bool]:
        """The vmas covering ``[start, end)`` from ``start`` up to the first hole.

        Returns:
            (vmas, complete): complete is False if a hole lies in the range.
        """
        out: list[Vma] = []
        at = start
        for vma in self.vmas_in(start, end):
            if vma.start > at:
                return out, False
            out.append(vma)
            at = vma.end
        return out, at >= end

    # -- page table ---------------------------------------------------------------

    def get(self, addr: int) -> int:
        chunk = self.pgd.get(addr // self.chunk_bytes)
        if chunk is None:
            return 0
        return chunk[(addr % self.chunk_bytes) // self.page_size]

    def set(self, addr: int, pte: int) -> None:
        index = addr // self.chunk_bytes
        chunk = self.pgd.get(index)
        slot = (addr % self.chunk_bytes) // self.page_size
        if chunk is None:
            if not pte:
                return
            chunk = self.pgd[index] = array("Q", bytes(8 * CHUNK_PAGES))
            self.populated[index] = 0
        old = chunk[slot]
        chunk[slot] = pte
        if (old ^ pte) & PTE_SWAP:
            self.swapped += 1 if pte & PTE_SWAP else -1
        if bool(old) != bool(pte):
            count = self.populated[index] + (1 if pte else -1)
            if count:
                self.populated[index] = count
            else:
                del self.pgd[index]
                del self.populated[index]

    def _chunk_indexes(self, start: int, end: int) -> list[int]:
        """Indexes of the populated chunks meeting ``[start, end)``, ascending.

        O(min(chunks of the range, populated chunks of the mm)).
        """
        first, last = start // self.chunk_bytes, (end - 1) // self.chunk_bytes
        if last - first + 1 <= len(self.pgd):
            return [i for i in range(first, last + 1) if i in self.pgd]
        return sorted(i for i in self.pgd if first <= i <= last)

    def _slots(self, index: int, start: int, end: int) -> tuple[int, int]:
        """The slice of chunk ``index``'s slots that ``[start, end)`` covers."""
        base = index * self.chunk_bytes
        ps = self.page_size
        return max(0, (start - base) // ps), min(CHUNK_PAGES, -(-(end - base) // ps))

    def populated_in(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """(addr, pte) of every non-none pte in ``[start, end)``, ascending.

        Costs O(populated chunks of the mm + ptes in the chunks touched): a
        1 GiB range with one page populated visits one chunk.  The caller may
        change ptes between two items (a chunk emptied meanwhile is skipped).
        """
        ps = self.page_size
        first = start // self.chunk_bytes
        # a range inside one chunk (a page, a small vma): no index list to build
        indexes = (first,) if first == (end - 1) // self.chunk_bytes else self._chunk_indexes(start, end)
        for index in indexes:
            chunk = self.pgd.get(index)
            if chunk is None:
                continue
            base = index * self.chunk_bytes
            lo, hi = max(0, (start - base) // ps), min(CHUNK_PAGES, -(-(end - base) // ps))  # _slots
            if self.populated[index] * 16 < hi - lo:
                # sparse: every non-none pte has PRESENT or SWAP in its low
                # byte, so the nonzero low bytes (found in C) are the ptes
                low = chunk.tobytes()[lo * 8 : hi * 8 : 8]
                slots: Any = (lo + m.start() for m in _NONZERO.finditer(low))
            else:
                slots = range(lo, hi)
            for slot in slots:
                pte = chunk[slot]
                if pte:
                    yield base + slot * ps, pte

    def count_upto(self, start: int, end: int) -> int:
        """An upper bound of the non-none ptes in ``[start, end)``: those of
        the populated chunks it meets (exact when it covers them whole)."""
        return sum(self.populated[i] for i in self._chunk_indexes(start, end))

    def clear_range(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Every pte of ``[start, end)`` becomes none, a chunk at a time.

        The pte loop of ``zap_pte_range`` (mm/memory.c: ``ptep_get_and_clear_full``
        per pte) as array operations over each chunk: the populated and swapped
        counts follow, an emptied chunk is freed (``free_pte_range``).  What
        the ptes held (frames, swap slots) is the caller's to release.

        Returns:
            (addrs, ptes): the address and old value of every pte cleared,
            ascending, as ``uint64`` arrays.  Costs a few array operations per
            populated chunk of the range, O(ptes cleared) of them in C.
        """
        indexes = self._chunk_indexes(start, end)
        if not indexes:
            empty = np.zeros(0, dtype=np.uint64)
            return empty, empty
        # One copy of the chunks touched, one scan of it in C: cheaper than a
        # few array operations per chunk when the chunks are sparse.
        flat = np.frombuffer(b"".join([self.pgd[i] for i in indexes]), dtype=np.uint64)
        mask = flat != 0
        lo, _ = self._slots(indexes[0], start, end)
        _, hi = self._slots(indexes[-1], start, end)
        mask[:lo] = False  # only the first and the last chunk can be partly outside
        mask[(len(indexes) - 1) * CHUNK_PAGES + hi :] = False
        pos = np.flatnonzero(mask)
        ptes = flat[pos]
        which = pos // CHUNK_PAGES
        bases = np.array(indexes, dtype=np.uint64) * self.chunk_bytes
        addrs = bases[which] + (pos % CHUNK_PAGES).astype(np.uint64) * self.page_size
        self.swapped -= int(np.count_nonzero(ptes & PTE_SWAP))
        cleared = np.bincount(which, minlength=len(indexes)).tolist()
        for index, count in zip(indexes, cleared, strict=True):
            left = self.populated[index] - count
            if left:  # a chunk partly outside the range keeps the rest
                lo, hi = self._slots(index, start, end)
                self.pgd[index][lo:hi] = array("Q", bytes(8 * (hi - lo)))
                self.populated[index] = left
            else:
                del self.pgd[index]
                del self.populated[index]
        return addrs, ptes

    def rss(self) -> tuple[int, int]:
        """(present ptes, swapped ptes), from the counts ``set`` keeps."""
        return sum(self.populated.values()) - self.swapped, self.swapped



__all__ = [
    "CHUNK_PAGES", "MMAP_BASE", "PROTS", "PTE_DEVICE", "PTE_DIRTY", "PTE_EXCLUSIVE", "PTE_KSM_ZERO", "PTE_PRESENT", "PTE_SHIFT", "PTE_SWAP",
    "PTE_WRITE", "PTE_YOUNG", "Mm", "Prot", "Shmem", "Vma", "present_pte",
]
