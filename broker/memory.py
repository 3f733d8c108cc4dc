"""Physical memory and the swap file of the host's primary MMU.

Sans-I/O (apart from the swap file itself, which is a real file).  Names follow
``include/linux/mm_types.h`` / ``mm/page_alloc.c`` / ``mm/swapfile.c``.

Memory layout, chosen so that a million mapped pages cost a few bytes each
(the kernel spends 64 bytes of ``struct page`` per frame):

=================  ==============================  ===================
per frame          storage                         bytes
=================  ==============================  ===================
contents           one anonymous ``mmap``           page_size, committed
                                                    by the OS on first
                                                    touch only
refcount           ``array('I')``                   4
mapcount           ``array('I')``                   4
pin count          ``array('I')``                   4
flags              ``array('B')``                   1
free list          bump pointer + ``array('I')``    4 per *freed* frame
=================  ==============================  ===================

Frame 0 is the shared zero frame (``ZERO_PAGE``): always zero, never
allocated or freed, not refcounted (the kernel maps it with ``pte_special``).

Refcount conventions (who holds a reference, as ``page_count`` would show):
one per pte mapping the frame (which also counts in mapcount), one per pin
(``FOLL_PIN``; also counted in the pin count), one for a shmem page cache
entry, one transient reference for the allocator's caller.  A frame goes
back to the free list when its refcount drops to zero.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from array import array
from collections.abc import Callable

import numpy as np

from protocol.types import Errno, KernelError

#: The shared zero frame (``ZERO_PAGE(0)``; ``my_zero_pfn``).
ZERO_PFN = 0

# Frame flags (a byte per frame; ``enum pageflags`` names).
PG_KSM = 0x01  #: ``PageKsm``: a KSM page (stable tree), write-protected everywhere
PG_DIRTY = 0x02  #: ``PG_dirty``
PG_REFERENCED = 0x04  #: ``PG_referenced``: accessed (young) since last aged
PG_ANON = 0x08  #: ``PageAnon``: private anonymous memory
PG_SHMEM = 0x10  #: in a shmem object's page cache (shared anonymous)
#: ``PageAnonExclusive`` (mm/rmap.c, include/linux/page-flags.h): a private
#: anonymous page known to be mapped by this one pte only and therefore safe to
#: pin (``gup_must_unshare`` in mm/gup.c refuses FOLL_PIN of an anon page
#: without it).  Set by a fresh exclusive fault, a COW copy, a swap-in or a
#: reuse; cleared when the page may become shared: fork, KSM's
#: ``write_protect_page`` (``folio_try_share_anon_rmap_pte``).  Never on a KSM page.
PG_ANON_EXCLUSIVE = 0x20
#: ``PG_idle`` / ``PG_young`` (include/linux/page_idle.h, mm/page_idle.c): set
#: by marking the page idle through ``/sys/kernel/mm/page_idle/bitmap``;
#: ``PG_idle`` is cleared by any access seen since (a young pte or a node's
#: young bit), which sets ``PG_young`` so that reclaim still counts the access
#: (``folio_referenced``).  A new page has neither; migration copies both.
PG_IDLE = 0x40
PG_YOUNG = 0x80


class PhysicalMemory:
    """A pool of page frames with their metadata in parallel arrays.

    Args:
        frames: number of frames, the zero frame included (pfn 0).
        page_size: bytes per page; a multiple of 64 (4096 by default).
    Concurrency:
        Synchronous; owned by the :class:`broker.mm.Model`.
    """

    def __init__(self, frames: int, page_size: int = 4096) -> None:
        if frames < 2:
            raise ValueError("need the zero frame and at least one more")
        if page_size <= 0 or page_size % 64:
            raise ValueError(f"page size {page_size} is not a positive multiple of 64")
        self.nframes = frames
        self.page_size = page_size
        # MAP_PRIVATE|MAP_ANONYMOUS: the OS commits a page on first touch only.
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        if flags:
            self.contents = mmap.mmap(-1, frames * page_size, flags=flags)
        else:  # pragma: no cover - non-POSIX
            self.contents = mmap.mmap(-1, frames * page_size)
        zeros = bytes(4 * frames)
        self.refcount = array("I", zeros)
        self.mapcount = array("I", zeros)
        self.pincount = array("I", zeros)
        self.flags = array("B", bytes(frames))
        #: Frames [_next_unused, frames) have never been handed out: still zero.
        self._next_unused = 1
        #: Freed frames, a LIFO stack (recently freed = cache hot, as pcp lists).
        self._free_stack = array("I")
        self._zero_page = bytes(page_size)
        self.in_use = 0
        #: Allocation-failure injection: called by every :meth:`alloc`; when it
        #: returns True the allocation raises ``KernelError(ENOMEM)`` exactly as
        #: running out of frames does (nothing allocated).  None: never fail.
        #: See :meth:`fail_allocs_after`.
        self.fail_alloc: Callable[[], bool] | None = None
        #: Called with the pfn whenever a frame's refcount reaches 0 and it is
        #: back on the free list (never for the zero frame), after the frame's
        #: metadata is cleared.  An exception from it propagates to whoever
        #: dropped the last reference.
        self.on_free: Callable[[int], None] | None = None

    # -- allocation (mm/page_alloc.c) ------------------------------------------

    def nr_free(self) -> int:
        return self.nframes - self._next_unused + len(self._free_stack)

    def alloc(self, zero: bool = True) -> int:
        """``alloc_page``: a frame with refcount 1, mapcount 0, no pins, no flags.

        Args:
            zero: the contents must read as zeros (``__GFP_ZERO``); pass False
                when the caller overwrites the whole page anyway (a copy).
        Raises:
            KernelError(ENOMEM): no free frame, or :attr:`fail_alloc` said so.
                Nothing is reclaimed first.
        """
        if self.fail_alloc is not None and self.fail_alloc():
            raise KernelError(Errno.ENOMEM, "out of page frames")
        if self._free_stack:
            pfn = self._free_stack.pop()
            if zero:
                off = pfn * self.page_size
                self.contents[off : off + self.page_size] = self._zero_page
        elif self._next_unused < self.nframes:
            pfn = self._next_unused
            self._next_unused += 1
        else:
            raise KernelError(Errno.ENOMEM, "out of page frames")
        self.refcount[pfn] = 1
        self.in_use += 1
        return pfn

    def fail_allocs_after(self, n: int | None, *, count: int | None = None) -> None:
        """Let ``n`` more allocations succeed, then fail ``count`` of them (all
        later ones if None) with ENOMEM.  ``n=None`` removes the injection."""
        if n is None:
            self.fail_alloc = None
            return
        ok, left = n, count

        def fail() -> bool:
            nonlocal ok, left
            if ok > 0:
                ok -= 1
                return False
            if left is None:
                return True
            if left > 0:
                left -= 1
                return True
            return False

        self.fail_alloc = fail

    def get_page(self, pfn: int) -> None:
        """``get_page``: take a reference (no-op for the zero frame)."""
        if pfn != ZERO_PFN:
            self.refcount[pfn] += 1

    def put_page(self, pfn: int) -> bool:
        """``put_page``: drop a reference; free the frame at zero.

        Returns:
            True if the frame was freed.
        """
        if pfn == ZERO_PFN:
            return False
        count = self.refcount[pfn]
        if count == 0:
            raise AssertionError(f"put_page of free frame {pfn}")
        count -= 1
        self.refcount[pfn] = count
        if count:
            return False
        self._free(pfn)
        return True

    def unmap_and_put(self, pfns: np.ndarray) -> list[int]:
        """Per entry, one mapping and one reference dropped, as array operations.

        The batched release of a zap: ``folio_remove_rmap_ptes`` for the
        mapcount, then ``free_pages_and_swap_cache`` / ``folios_put_refs``
        (mm/swap.c, called from ``tlb_finish_mmu``) for the references.  The
        same as ``mapcount[pfn] -= 1; put_page(pfn)`` per entry in order,
        :attr:`on_free` included, but a handful of C loops for the lot.

        Args:
            pfns: an integer array; a pfn may appear several times (a KSM page
                mapped at several addresses).  Never the zero frame.
        Returns:
            The frames freed, in the order the per-entry loop frees them
            (at each one's last entry).
        Raises:
            AssertionError: a frame with fewer mappings or references than
                entries, or freed while still pinned (nothing is changed).
        """
        if not len(pfns):
            return []
        mapc = np.frombuffer(self.mapcount, dtype=np.uint32)
        refc = np.frombuffer(self.refcount, dtype=np.uint32)
        uniq, counts = np.unique(pfns, return_counts=True)
        if uniq[0] == ZERO_PFN:
            raise AssertionError("unmap_and_put of the zero frame")
        short = (mapc[uniq] < counts) | (refc[uniq] < counts)
        if short.any():
            pfn = int(uniq[short][0])
            raise AssertionError(f"unmap_and_put of frame {pfn}: mapcount {mapc[pfn]}, refcount {refc[pfn]}")
        ending = refc[uniq] == counts  # their last reference goes
        gone = uniq[ending]
        kept_maps = mapc[gone] != counts[ending]
        pinned = np.frombuffer(self.pincount, dtype=np.uint32)[gone] != 0
        if (kept_maps | pinned).any():
            pfn = int(gone[kept_maps | pinned][0])
            raise AssertionError(f"freeing frame {pfn} still mapped {mapc[pfn] - 1} / pinned {self.pincount[pfn]}")
        mapc[uniq] -= counts.astype(np.uint32)
        refc[uniq] -= counts.astype(np.uint32)
        if not len(gone):
            return []
        if len(uniq) == len(pfns):
            freed = pfns[refc[pfns] == 0]  # in entry order
        else:  # each at its last entry
            last = len(pfns) - 1 - np.unique(pfns[::-1], return_index=True)[1]
            freed = pfns[np.sort(last[ending])]
        np.frombuffer(self.flags, dtype=np.uint8)[freed] = 0
        self._free_stack.frombytes(freed.astype(np.uint32).tobytes())
        self.in_use -= len(freed)
        out: list[int] = freed.tolist()
        if self.on_free is not None:
            for pfn in out:
                self.on_free(pfn)
        return out

    def _free(self, pfn: int) -> None:
        if self.mapcount[pfn] or self.pincount[pfn]:
            raise AssertionError(
                f"freeing frame {pfn} still mapped {self.mapcount[pfn]} / pinned {self.pincount[pfn]}"
            )
        self.flags[pfn] = 0
        self._free_stack.append(pfn)
        self.in_use -= 1
        if self.on_free is not None:
            self.on_free(pfn)

    def is_free(self, pfn: int) -> bool:
        return pfn != ZERO_PFN and self.refcount[pfn] == 0

    def free_pfns(self) -> set[int]:
        """Every free frame (for accounting checks; O(frames))."""
        free = set(self._free_stack)
        free.update(range(self._next_unused, self.nframes))
        return free

    # -- contents ----------------------------------------------------------------

    def read(self, pfn: int, offset: int = 0, length: int | None = None) -> bytes:
        if length is None:
            length = self.page_size - offset
        self._check_span(offset, length)
        off = pfn * self.page_size + offset
        return self.contents[off : off + length]

    def write(self, pfn: int, offset: int, data: bytes) -> None:
        if pfn == ZERO_PFN:
            raise AssertionError("write to the zero frame")
        self._check_span(offset, len(data))
        off = pfn * self.page_size + offset
        self.contents[off : off + len(data)] = data

    def copy(self, dst: int, src: int) -> None:
        """``copy_user_highpage``: the whole page."""
        ps = self.page_size
        self.contents[dst * ps : (dst + 1) * ps] = self.contents[src * ps : (src + 1) * ps]

    def page(self, pfn: int) -> memoryview:
        """A read-only view of one frame (no copy): for checksums and compares."""
        ps = self.page_size
        return memoryview(self.contents)[pfn * ps : (pfn + 1) * ps].toreadonly()

    def is_zero_filled(self, pfn: int) -> bool:
        ps = self.page_size
        return self.contents[pfn * ps : (pfn + 1) * ps] == self._zero_page

    def pages_identical(self, a: int, b: int) -> bool:
        """``pages_identical`` (memcmp of two frames)."""
        ps = self.page_size
        c = self.contents
        return a == b or c[a * ps : (a + 1) * ps] == c[b * ps : (b + 1) * ps]

    def _check_span(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.page_size:
            raise KernelError(Errno.EINVAL, f"[{offset}, {offset + length}) is not inside one page")

    def metadata_bytes(self) -> int:
        """Bytes of per-frame metadata (arrays' buffers; contents excluded)."""
        return sum(a.buffer_info()[1] * a.itemsize for a in self._arrays())

    def _arrays(self) -> tuple[array, ...]:
        return (self.refcount, self.mapcount, self.pincount, self.flags, self._free_stack)

    def close(self) -> None:
        self.contents.close()


class SwapFile:
    """A swap area on a real file: slots of one page, each with a use count.

    Slot 0 is never handed out (the kernel keeps the swap header there), so a
    swap entry is never zero.  ``swap_map`` counts the ptes (and shmem entries)
    referring to a slot: fork shares swap entries (``swap_duplicate``).

    Args:
        slots: number of slots, slot 0 included.
        page_size: bytes per slot.
        path: the file; when None, an unnamed temporary file (unlinked from
            the start, gone with the process).
    Durability: none, as a machine's swap.  The host keeps which slot holds
    which page only in memory, so the file means nothing to another process:
    it is truncated when a swap area opens on it, and a restarted host starts
    with empty mms and never reads what a predecessor left there.  The pages
    of the host's mms are written to it, so a named file is made ``0600``
    (an existing one is changed to it), and a symlink is refused rather than
    followed (the truncation would hit whatever it points at).
    Concurrency:
        Synchronous file I/O (``os.pwrite``/``os.pread``); owned by the Model.
    """

    def __init__(self, slots: int, page_size: int = 4096, path: str | os.PathLike[str] | None = None) -> None:
        if slots < 2:
            raise ValueError("a swap area needs the header slot and at least one more")
        self.nslots = slots
        self.page_size = page_size
        if path is None:
            self._file = tempfile.TemporaryFile(prefix="mmnotify-", suffix=".swap")
            self.path = None
        else:
            flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, 0o600)
            try:
                os.fchmod(fd, 0o600)  # O_CREAT's mode only applies to a new file
                self._file = os.fdopen(fd, "w+b")  # noqa: SIM115 - lives as long as the swap area
            except BaseException:
                os.close(fd)
                raise
            self.path = os.fspath(path)
        self._fd = self._file.fileno()
        os.ftruncate(self._fd, slots * page_size)  # sparse
        self.swap_map = array("I", bytes(4 * slots))
        self._next_unused = 1
        self._free_stack = array("I")
        self.in_use = 0
        self.writes = 0
        self.reads = 0

    def nr_free(self) -> int:
        return self.nslots - self._next_unused + len(self._free_stack)

    def alloc(self) -> int:
        """``get_swap_page``: a slot with use count 1.

        Raises:
            KernelError(ENOSPC): the swap area is full.
        """
        if self._free_stack:
            slot = self._free_stack.pop()
        elif self._next_unused < self.nslots:
            slot = self._next_unused
            self._next_unused += 1
        else:
            raise KernelError(Errno.ENOSPC, "swap area full")
        self.swap_map[slot] = 1
        self.in_use += 1
        return slot

    def duplicate(self, slot: int) -> None:
        """``swap_duplicate``: one more pte refers to ``slot`` (fork)."""
        if not self.swap_map[slot]:
            raise AssertionError(f"swap_duplicate of free slot {slot}")
        self.swap_map[slot] += 1

    def free(self, slot: int) -> bool:
        """``swap_free``: drop one use; the slot is free at zero.

        Returns:
            True if the slot was freed.
        """
        count = self.swap_map[slot]
        if not count:
            raise AssertionError(f"swap_free of free slot {slot}")
        count -= 1
        self.swap_map[slot] = count
        if count:
            return False
        self._free_stack.append(slot)
        self.in_use -= 1
        return True

    def write(self, slot: int, data: bytes | memoryview) -> None:
        """``swap_writepage``."""
        if len(data) != self.page_size:
            raise ValueError("a swap slot holds exactly one page")
        os.pwrite(self._fd, data, slot * self.page_size)
        self.writes += 1

    def read(self, slot: int) -> bytes:
        """``swap_read_folio``."""
        self.reads += 1
        data = os.pread(self._fd, self.page_size, slot * self.page_size)
        return data.ljust(self.page_size, b"\0")

    def metadata_bytes(self) -> int:
        return sum(a.buffer_info()[1] * a.itemsize for a in (self.swap_map, self._free_stack))

    def close(self) -> None:
        self._file.close()
