"""KSM: merging identical private anonymous pages (``mm/ksm.c``).

Sans-I/O, like the model it belongs to: :meth:`Ksm.scan`, :meth:`Ksm.full_scan`
and :meth:`Ksm.unmerge_all` are operations (generators yielding notifier
deliveries).  The host runs ``scan`` every ``sleep_millisecs`` while ``run`` is 1.

The algorithm is the kernel's ``cmp_and_merge_page``, per page of a MERGEABLE
vma, in address order across the mms (one pass = one ``full_scans``):

1. a page already KSM: make sure its rmap item hangs on the stable node;
2. ``stable_tree_search``: an identical KSM page with room
   (``max_page_sharing``)?  -> ``try_to_merge_with_ksm_page``;
3. the checksum changed since the last pass -> volatile, skip this pass;
4. ``use_zero_pages`` and the page is all zeros -> merge with the zero page;
5. ``unstable_tree_search_insert``: an identical candidate seen this pass?
   -> ``try_to_merge_two_pages`` (this page becomes the KSM page, the
   candidate is merged into it) else insert the page as a candidate.

Merging one page (``try_to_merge_one_page``) is ``write_protect_page`` (the
nodes are told with change_pte -- read-only, in place -- or a one-page
invalidation, both of origin ksmd, and the page's pin count is checked only
after they acked: a node that pinned it, xpmem, keeps its pin through ksmd's
invalidation, as hpc/xpmem ignores invalidations not raised by the segment
owner, so the check fails and the page is left), then the contents are
compared -- only now, when no node can still write through an old writable
entry -- then ``replace_page`` (change_pte to the KSM page, set the pte, drop
the old page).  A page still pinned is never merged.

Trees: the stable tree is keyed by the pages' digest (a stand-in for the
kernel's memcmp-ordered rbtree; every hit is confirmed with a full compare);
the unstable tree is rebuilt every pass.  Counters follow
``/sys/kernel/mm/ksm`` and the kernel's arithmetic: ``pages_shared`` stable
nodes in use, ``pages_sharing`` the further mappings of them,
``pages_unshared`` unstable items, ``pages_volatile`` the remaining rmap items.

When the counters change (mm/ksm.c): an rmap item is counted as ksmd last
left it.  A COW break of a merged page, a munmap, MADV_UNMERGEABLE or the
exit of the mm change nothing at once; ksmd's next visit of that address
(``cmp_and_merge_page`` -> ``remove_rmap_item_from_tree``, or
``get_next_rmap_item`` / ``remove_trailing_rmap_items`` for an address that
is gone) recounts it.  ``ksm_tests.c`` ``check_ksm_unmerge`` relies on it:
"get at least 1 scan, so KSM can detect that the pages were modified".  A
merge counts at once (``stable_tree_append``), as does ``run`` = 2
(``unmerge_and_remove_all_rmap_items``).  :attr:`Ksm.accounted` is that
view; the rest of the state is the live one the merging decisions use.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from protocol.types import Errno, KernelError, Origin

from .effects import Op
from .memory import PG_ANON_EXCLUSIVE, PG_DIRTY, PG_KSM, ZERO_PFN, PhysicalMemory
from .pagetable import PTE_DIRTY, PTE_KSM_ZERO, PTE_PRESENT, PTE_SHIFT, PTE_WRITE, PTE_YOUNG, Mm, Prot, present_pte

Key = tuple[int, int]  # (mm, addr)
T = TypeVar("T")


class PrimaryMmu(Protocol):
    """What KSM uses of the primary MMU (:class:`broker.mm.Model`), by its public names."""

    memory: PhysicalMemory
    mms: dict[int, Mm]
    counters: Counter[str]
    wrap_change_pte: bool
    page_size: int

    def set_pte_at_notify(self, mm: int, addr: int, pfn: int, writable: bool, commit: Callable[[], T],
                          *, wrap: bool, origin: Origin = Origin.OWNER) -> Op[T]: ...

    def put_page(self, pfn: int) -> None: ...

    def mm_has_notifiers(self, mm: int) -> bool: ...

    def cow_break(self, m: Mm, page: int, pte: int, *, writable: bool, origin: Origin = Origin.OWNER) -> Op[int]: ...

logger = logging.getLogger(__name__)


def page_digest(page: bytes | memoryview) -> bytes:
    """``calc_checksum`` and tree key in one: 128-bit BLAKE2b of the page."""
    return hashlib.blake2b(page, digest_size=16).digest()


class RmapState(enum.Enum):
    """Where an rmap item hangs (mm/ksm.c ``UNSTABLE_FLAG`` / ``STABLE_FLAG``)."""

    VOLATILE = "volatile"  #: on no tree: volatile, or not looked at yet
    UNSTABLE = "unstable"  #: a candidate in this pass's unstable tree
    STABLE = "stable"  #: merged: on its stable node's list


@dataclass(slots=True)
class RmapItem:
    """``struct ksm_rmap_item``: one scanned page of a MERGEABLE vma."""

    oldchecksum: bytes | None = None
    state: RmapState = RmapState.VOLATILE
    kpfn: int = 0


@dataclass(slots=True)
class StableNode:
    """``struct ksm_stable_node``: one KSM page and the mappings merged into it."""

    kpfn: int
    digest: bytes
    items: set[Key] = field(default_factory=set)
    #: identity for the counters (a kpfn changes with migration and is reused)
    nid: int = 0


class Ksm:
    """KSM for one primary MMU (:class:`broker.mm.Model`).

    Knobs as ``/sys/kernel/mm/ksm``: ``run`` (0 stop, 1 run, 2 unmerge all),
    ``pages_to_scan``, ``sleep_millisecs``, ``max_page_sharing``,
    ``use_zero_pages``.
    """

    def __init__(self, model: PrimaryMmu) -> None:
        self.model = model
        self.run = 0
        self.pages_to_scan = 100
        self.sleep_millisecs = 20
        self.max_page_sharing = 256
        self.use_zero_pages = False
        self.rmap: dict[Key, RmapItem] = {}
        #: mm -> rmap items of it (so that a zap of an mm KSM never looked at costs nothing here)
        self._items_per_mm: Counter[int] = Counter()
        self.stable: dict[int, StableNode] = {}
        self.stable_index: dict[bytes, list[int]] = {}
        self.unstable: dict[bytes, Key] = {}
        #: rmap items as ksmd last left them: key -> (state, stable node id or
        #: 0).  The counters are computed from this (see the module docstring).
        self.accounted: dict[Key, tuple[RmapState, int]] = {}
        self._nids = itertools.count(1)
        self.full_scans = 0
        self.pages_scanned = 0
        self.ksm_zero_pages = 0
        self._queue: deque[Key] = deque()
        self._in_pass = False
        self._zero_digest = page_digest(bytes(model.page_size))

    # -- sysfs ------------------------------------------------------------------

    KNOBS = {"run": (0, 2), "pages_to_scan": (0, 1 << 20), "sleep_millisecs": (0, 1 << 20),
             "max_page_sharing": (2, 1 << 20), "use_zero_pages": (0, 1)}

    @classmethod
    def check_knob(cls, name: str, value: int) -> None:
        """Raises KernelError(EINVAL) for an unknown knob or a value out of range."""
        limits = cls.KNOBS.get(name)
        if limits is None or not isinstance(value, int) or not limits[0] <= value <= limits[1]:
            raise KernelError(Errno.EINVAL, f"ksm {name}={value!r}")

    def check_set_knob(self, name: str, value: int) -> None:
        """:meth:`check_knob`, and the refusals that depend on KSM's state:
        ``max_page_sharing`` cannot change while pages are shared
        (mm/ksm.c ``max_page_sharing_store``: ``if (ksm_pages_shared ||
        remove_all_stable_nodes()) err = -EBUSY``; writing the value it
        already has is a no-op).

        Raises:
            KernelError: EINVAL (unknown knob, value out of range), EBUSY.
        """
        self.check_knob(name, value)
        if name == "max_page_sharing" and value != self.max_page_sharing and self.pages_shared():
            raise KernelError(Errno.EBUSY, "max_page_sharing cannot change while pages are shared")

    def set_knob(self, name: str, value: int) -> None:
        """Set one ``/sys/kernel/mm/ksm`` knob.

        Raises:
            KernelError: EINVAL (unknown knob, value out of range), EBUSY
                (:meth:`check_set_knob`); nothing set.
        """
        self.check_set_knob(name, value)
        setattr(self, name, bool(value) if name == "use_zero_pages" else value)

    def pages_shared(self) -> int:
        """``ksm_pages_shared``: stable nodes with at least one rmap item, as counted."""
        return len({nid for state, nid in self.accounted.values() if state is RmapState.STABLE})

    def _account(self, key: Key) -> None:
        """ksmd has just dealt with ``key``: count its rmap item as it is now."""
        item = self.rmap.get(key)
        if item is None:
            self.accounted.pop(key, None)
            return
        node = self.stable.get(item.kpfn) if item.state is RmapState.STABLE else None
        if node is not None and key in node.items:
            self.accounted[key] = (RmapState.STABLE, node.nid)
        elif item.state is RmapState.UNSTABLE:
            self.accounted[key] = (RmapState.UNSTABLE, 0)
        else:
            self.accounted[key] = (RmapState.VOLATILE, 0)

    def stats(self) -> dict[str, int]:
        """Knobs and counters; the counters from :attr:`accounted`."""
        per_node: Counter[int] = Counter()
        unshared = 0
        for state, nid in self.accounted.values():
            if state is RmapState.STABLE:
                per_node[nid] += 1
            elif state is RmapState.UNSTABLE:
                unshared += 1
        shared = len(per_node)
        sharing = sum(per_node.values()) - shared
        return {
            "run": self.run,
            "pages_to_scan": self.pages_to_scan,
            "sleep_millisecs": self.sleep_millisecs,
            "max_page_sharing": self.max_page_sharing,
            "use_zero_pages": int(self.use_zero_pages),
            "pages_shared": shared,
            "pages_sharing": sharing,
            "pages_unshared": unshared,
            "pages_volatile": len(self.accounted) - shared - sharing - unshared,
            "full_scans": self.full_scans,
            "pages_scanned": self.pages_scanned,
            "ksm_zero_pages": self.ksm_zero_pages,
            "stable_node_dups": sum(len(v) - 1 for v in self.stable_index.values() if v),
        }

    # -- hooks from the model ----------------------------------------------------

    def forget(self, mm: int, addr: int) -> None:
        """The pte at (mm, addr) went away or changed page: drop its rmap item."""
        item = self.rmap.pop((mm, addr), None)
        if item is None:
            return
        self._items_per_mm[mm] -= 1
        if item.state is RmapState.STABLE:
            node = self.stable.get(item.kpfn)
            if node is not None:
                node.items.discard((mm, addr))

    def forget_many(self, mm: int, addrs: Iterable[int]) -> None:
        """:meth:`forget` of each of ``addrs`` (a zap); free when KSM has no item of ``mm``."""
        if self._items_per_mm[mm] > 0:
            for addr in addrs:
                self.forget(mm, int(addr))

    def forget_mm(self, mm: int) -> None:
        if self._items_per_mm[mm] > 0:
            for key in [k for k in self.rmap if k[0] == mm]:
                self.forget(*key)
        del self._items_per_mm[mm]

    def _rmap_item(self, key: Key) -> RmapItem:
        """``get_next_rmap_item``: the page's rmap item, made on first sight."""
        item = self.rmap.get(key)
        if item is None:
            item = self.rmap[key] = RmapItem()
            self._items_per_mm[key[0]] += 1
        return item

    def page_freed(self, pfn: int) -> None:
        """A KSM page's last reference went: its stable node goes too."""
        node = self.stable.pop(pfn, None)
        if node is None:
            return
        pfns = self.stable_index.get(node.digest, [])
        if pfn in pfns:
            pfns.remove(pfn)
        if not pfns:
            self.stable_index.pop(node.digest, None)
        for key in node.items:
            item = self.rmap.get(key)
            if item is not None and item.state is RmapState.STABLE:
                item.state = RmapState.VOLATILE

    def page_migrated(self, old: int, new: int) -> None:
        """A KSM page moved to frame ``new`` (mm/ksm.c ``folio_migrate_ksm``:
        ``stable_node->kpfn = folio_pfn(newfolio)``); its rmap items follow."""
        node = self.stable.pop(old, None)
        if node is None:
            return
        node.kpfn = new
        self.stable[new] = node
        pfns = self.stable_index.get(node.digest, [])
        self.stable_index[node.digest] = [new if p == old else p for p in pfns]
        for key in node.items:
            item = self.rmap.get(key)
            if item is not None and item.kpfn == old:
                item.kpfn = new

    def zero_mapped(self) -> None:
        self.ksm_zero_pages += 1

    def zero_unmapped(self, count: int = 1) -> None:
        self.ksm_zero_pages -= count

    # -- scanning -------------------------------------------------------------------

    def _mergeable_pages(self) -> Iterator[Key]:
        for mm_id in sorted(self.model.mms):
            m = self.model.mms[mm_id]
            for vma in list(m.vmas):
                if vma.mergeable and vma.shmem is None:
                    for addr, pte in m.populated_in(vma.start, vma.end):
                        if pte & PTE_PRESENT:
                            yield (mm_id, addr)

    def _start_pass(self) -> None:
        self.unstable.clear()  # the unstable tree is rebuilt every pass
        # every mergeable page, and every address an rmap item is counted at
        # whose page is gone (get_next_rmap_item frees those it passes)
        keys = set(self._mergeable_pages())
        keys.update(self.accounted)
        self._queue = deque(sorted(keys))
        self._in_pass = True

    def scan(self, pages: int | None = None, *, until_pass_end: bool = False) -> Op[int]:
        """``ksm_do_scan``: look at up to ``pages`` (``pages_to_scan``) pages.

        Args:
            until_pass_end: stop when the current pass ends (``full_scans`` + 1).
        Returns:
            Pages looked at.
        """
        budget = self.pages_to_scan if pages is None else pages
        done = 0
        while done < budget:
            if not self._in_pass:
                self._start_pass()
            if not self._queue:
                self._in_pass = False
                self.full_scans += 1
                if until_pass_end:
                    break
                if done == 0 and not any(True for _ in self._mergeable_pages()):
                    break  # nothing mergeable at all: do not spin
                continue
            key = self._queue.popleft()
            got = self._present(key)
            if got is None:
                # nothing to scan there any more: the item goes, uncounted
                # as a scanned page (remove_trailing_rmap_items)
                self.forget(*key)
                self.accounted.pop(key, None)
                continue
            done += 1
            self.pages_scanned += 1
            merge = self._cmp_and_merge_page(key, *got)
            if merge is not None:
                yield from merge
            self._account(key)
        return done

    def full_scan(self) -> Op[int]:
        """Scan until ``full_scans`` goes up by one (the rest of this pass, or
        a whole pass if none is under way)."""
        target = self.full_scans + 1
        done = 0
        while self.full_scans < target:
            done += yield from self.scan(max(self.pages_to_scan, 1), until_pass_end=True)
        return done

    def _present(self, key: Key) -> tuple[Mm, int] | None:
        """``(mm, pte)`` if ``key`` is a present pte of a mergeable private
        vma -- what ksmd's walk visits -- None otherwise."""
        m = self.model.mms.get(key[0])
        if m is None:
            return None
        vma = m.find_vma(key[1])
        # PROT_NONE vmas are scanned and merged like any other (mm/ksm.c
        # scan_get_next_rmap_item looks at VM_MERGEABLE only;
        # ksm_functional_tests.c test_prot_none merges a PROT_NONE range)
        if vma is None or not vma.mergeable or vma.shmem is not None:
            return None
        pte = m.get(key[1])
        return (m, pte) if pte & PTE_PRESENT else None

    def _page(self, key: Key) -> tuple[Mm, int, int] | None:
        """(mm, pte, pfn) if ``key`` is a present, non-zero page of a mergeable
        private vma; None otherwise."""
        got = self._present(key)
        if got is None or got[1] >> PTE_SHIFT == ZERO_PFN:
            return None
        return got[0], got[1], got[1] >> PTE_SHIFT

    def _notifies(self, mm: int) -> bool:
        """Whether ``set_pte_at_notify`` on ``mm`` tells anyone (the rule is
        :meth:`broker.mm.Model.set_pte_at_notify`'s: a wrapping kernel, or
        ``mm_has_notifiers``).  When it does not, a merge yields nothing and
        runs as plain calls (:meth:`_merge_one_now`)."""
        return self.model.wrap_change_pte or self.model.mm_has_notifiers(mm)

    def _cmp_and_merge_page(self, key: Key, m: Mm, pte: int) -> Op[object] | None:
        """``cmp_and_merge_page`` of ``key``, whose present pte (in ``m``) is
        ``pte`` (:meth:`_present`).  The look (trees, checksum) is synchronous;
        what it returns, if not None, is the merge it decided on: an operation,
        since merging tells the nodes.  A merge into a stable page that tells
        nobody is done here and now (:meth:`_merge_one_now`)."""
        pfn = pte >> PTE_SHIFT
        if pfn == ZERO_PFN:
            self.forget(*key)
            return None
        mem = self.model.memory
        item = self._rmap_item(key)
        state = item.state
        if state is RmapState.UNSTABLE:
            item.state = RmapState.VOLATILE  # revisited: it leaves last pass's unstable tree
        if mem.flags[pfn] & PG_KSM:
            node = self.stable.get(pfn)
            if node is not None and not (state is RmapState.STABLE and item.kpfn == pfn):
                self._append(key, item, node)
            return None
        if state is RmapState.STABLE:  # its KSM page was replaced by a copy
            self.forget(*key)
            item = self._rmap_item(key)
        digest = page_digest(mem.page(pfn))
        kpfn = self._stable_search(digest, pfn) if self.stable_index else None
        if kpfn is not None:
            if not self._notifies(m.id):
                if self._merge_one_now(m, key[1], pfn, kpfn):
                    self._append(key, item, self.stable[kpfn])
                return None
            return self._merge_with_stable_page(m, key, item, pfn, kpfn)
        if item.oldchecksum != digest:
            item.oldchecksum = digest  # volatile: look again next pass
            return None
        if self.use_zero_pages and digest == self._zero_digest and mem.is_zero_filled(pfn):
            return self._merge_with_zero_page(m, key[1], pfn)
        tree_key = self.unstable.get(digest)
        tree = self._page(tree_key) if tree_key is not None and tree_key != key else None
        if tree is not None and tree[2] == pfn:
            # unstable_tree_search_insert: "Don't substitute a ksm page for a
            # forked page" -- the same page (shared by fork) is already in the
            # tree: this rmap item is not inserted, so not counted unshared
            return None
        if tree is None or mem.flags[tree[2]] & PG_KSM \
                or not mem.pages_identical(pfn, tree[2]):
            self.unstable[digest] = key
            item.state = RmapState.UNSTABLE
            return None
        assert tree_key is not None
        return self._try_to_merge_two_pages(m, key, item, pfn, digest, tree_key, tree[0], tree[2])

    def _merge_with_stable_page(self, m: Mm, key: Key, item: RmapItem, pfn: int, kpfn: int) -> Op[None]:
        """``try_to_merge_with_ksm_page`` then ``stable_tree_append``."""
        if (yield from self._try_to_merge_with_ksm_page(m, key[1], pfn, kpfn)):
            self._append(key, item, self.stable[kpfn])

    def _append(self, key: Key, item: RmapItem, node: StableNode) -> None:
        """``stable_tree_append``."""
        node.items.add(key)
        item.state = RmapState.STABLE
        item.kpfn = node.kpfn

    def _stable_search(self, digest: bytes, pfn: int) -> int | None:
        """``stable_tree_search``: a KSM page with these contents and room
        (``max_page_sharing``; the further ones are the kernel's
        ``stable_node_dup`` chain).

        The kernel walks its tree with ``memcmp_pages`` because the tree is
        ordered by contents; here the digest, taken from the page a moment ago
        in this same step, is the walk, and a KSM page never changes (it is
        write-protected everywhere), so equal digests mean equal pages.  The
        one compare that matters stays: ``pages_identical`` after
        ``write_protect_page``, once every node has acked
        (:meth:`_try_to_merge_with_ksm_page`), which also catches a digest
        collision.
        """
        for kpfn in self.stable_index.get(digest, ()):
            if kpfn != pfn and len(self.stable[kpfn].items) < self.max_page_sharing:
                return kpfn
        return None

    def _try_to_merge_two_pages(self, m: Mm, key: Key, item: RmapItem, pfn: int, digest: bytes,
                                tree_key: Key, tm: Mm, tpfn: int) -> Op[None]:
        """This page becomes the KSM page; the candidate is merged into it.  If
        the second half fails, the first is unmerged again (``break_cow``)."""
        mem = self.model.memory
        if not (yield from self._write_protect_page(m, key[1], pfn)):
            return
        mem.flags[pfn] |= PG_KSM
        node = StableNode(pfn, digest, nid=next(self._nids))
        self.stable[pfn] = node
        self.stable_index.setdefault(digest, []).append(pfn)
        self._append(key, item, node)
        tree_item = self._rmap_item(tree_key)
        if (yield from self._try_to_merge_with_ksm_page(tm, tree_key[1], tpfn, pfn)):
            if self.unstable.get(digest) == tree_key:
                del self.unstable[digest]
            self._append(tree_key, tree_item, node)
            self._account(tree_key)  # stable_tree_append counts it now
            return
        try:
            yield from self._break_ksm(m, key[1], Origin.KSMD)
        except KernelError as exc:
            # mm/ksm.c try_to_merge_two_pages: "break_cow(rmap_item)" and its
            # result is ignored; ksmd goes on.  The page stays a KSM page with
            # one mapping (a stable node with one item), unshared by the next
            # write fault or unmerge.
            self.model.counters["ksm_break_cow_failed"] += 1
            logger.info("ksm: break_cow of %s failed (%s); the page stays merged", key, exc)

    def _try_to_merge_with_ksm_page(self, m: Mm, addr: int, pfn: int, kpfn: int) -> Op[bool]:
        """``try_to_merge_one_page``: write-protect, compare, replace.  The
        same steps as :meth:`_merge_one_now`, each telling the nodes."""
        if not (yield from self._write_protect_page(m, addr, pfn)):
            return False
        if not self._mergeable_into(pfn, kpfn):
            return False
        return (yield from self._replace_page(m, addr, pfn, kpfn))

    def _merge_one_now(self, m: Mm, addr: int, pfn: int, kpfn: int) -> bool:
        """``try_to_merge_one_page`` on an mm nobody is told about
        (:meth:`_notifies` False): there ``set_pte_at_notify`` yields nothing
        and commits at once, so the steps of :meth:`_try_to_merge_with_ksm_page`
        run as plain calls -- the same checks and commits, without an
        operation generator per step (the merge pass's per-page cost)."""
        done = self._write_protect_ready(m, addr, pfn)
        if done is None:
            done = self._write_protect_commit(m, addr, pfn)
        if not done or not self._mergeable_into(pfn, kpfn) or not self._replace_ready(m, addr, pfn):
            return False
        return self._replace_commit(m, addr, pfn, kpfn)

    def _mergeable_into(self, pfn: int, kpfn: int) -> bool:
        """Between write-protect and replace: ``kpfn`` is still a KSM page
        and ``pfn`` still has its contents."""
        mem = self.model.memory
        if not mem.flags[kpfn] & PG_KSM or kpfn not in self.stable:
            return False
        return mem.pages_identical(pfn, kpfn)  # else written before every node had acked the protection

    def _write_protect_page(self, m: Mm, addr: int, pfn: int) -> Op[bool]:
        """``write_protect_page``: the pte and every node's entry read-only;
        then the pin check (a pinned page is never merged)."""
        done = self._write_protect_ready(m, addr, pfn)
        if done is not None:
            return done
        model = self.model
        return (yield from model.set_pte_at_notify(m.id, addr, pfn, False,
                                                   lambda: self._write_protect_commit(m, addr, pfn),
                                                   wrap=model.wrap_change_pte, origin=Origin.KSMD))

    def _write_protect_ready(self, m: Mm, addr: int, pfn: int) -> bool | None:
        """The part of ``write_protect_page`` before the notification: its
        answer when nothing needs protecting (or it cannot be), None when the
        pte must be made read-only (:meth:`_write_protect_commit`)."""
        mem = self.model.memory
        pte = m.get(addr)
        if not pte & PTE_PRESENT or pte >> PTE_SHIFT != pfn:
            return False
        if not pte & (PTE_WRITE | PTE_DIRTY) and not mem.flags[pfn] & PG_ANON_EXCLUSIVE:
            return not mem.pincount[pfn]
        if not pte & (PTE_WRITE | PTE_DIRTY):
            # read-only and clean but AnonExclusive: no node can write it (it
            # was invalidated when the pte lost write), the flag must still go
            # (write_protect_page: "anon_exclusive" takes the clearing path)
            if mem.pincount[pfn]:
                return False
            mem.flags[pfn] &= ~PG_ANON_EXCLUSIVE
            return True
        return None

    def _write_protect_commit(self, m: Mm, addr: int, pfn: int) -> bool:
        """``write_protect_page``'s pte change, once the nodes were told."""
        mem = self.model.memory
        now = m.get(addr)
        if not now & PTE_PRESENT or now >> PTE_SHIFT != pfn:
            return False
        # "page_mapcount(page) + 1 + swapped != page_count(page)": a pin
        if mem.pincount[pfn]:
            return False
        m.set(addr, now & ~(PTE_WRITE | PTE_DIRTY))
        # mm/ksm.c write_protect_page, after the refcount check:
        # page_try_share_anon_rmap (folio_try_share_anon_rmap_pte since
        # 6.8): no longer AnonExclusive, so GUP-fast FOLL_PIN refuses it
        # from now on (mm/gup.c gup_must_unshare)
        mem.flags[pfn] = (mem.flags[pfn] | PG_DIRTY) & ~PG_ANON_EXCLUSIVE
        return True

    def _replace_page(self, m: Mm, addr: int, pfn: int, kpfn: int) -> Op[bool]:
        """``replace_page``: change_pte to the KSM page, set the pte, drop the old page."""
        if not self._replace_ready(m, addr, pfn):
            return False
        model = self.model
        return (yield from model.set_pte_at_notify(m.id, addr, kpfn, False,
                                                   lambda: self._replace_commit(m, addr, pfn, kpfn),
                                                   wrap=model.wrap_change_pte, origin=Origin.KSMD))

    def _replace_ready(self, m: Mm, addr: int, pfn: int) -> bool:
        """``replace_page``'s checks before the notification: ``pfn`` still
        mapped at ``addr``, read-only, unpinned."""
        pte = m.get(addr)
        return bool(pte & PTE_PRESENT) and pte >> PTE_SHIFT == pfn and not pte & PTE_WRITE \
            and not self.model.memory.pincount[pfn]

    def _replace_commit(self, m: Mm, addr: int, pfn: int, kpfn: int) -> bool:
        """``replace_page``'s pte change, once the nodes were told: map the
        KSM page, drop the old one."""
        model = self.model
        mem = model.memory
        now = m.get(addr)
        if now >> PTE_SHIFT != pfn or not now & PTE_PRESENT:
            return False
        mem.mapcount[kpfn] += 1
        mem.get_page(kpfn)
        m.set(addr, present_pte(kpfn, False, False, bool(now & PTE_YOUNG)))
        mem.mapcount[pfn] -= 1
        model.put_page(pfn)
        return True

    def _merge_with_zero_page(self, m: Mm, addr: int, pfn: int) -> Op[bool]:
        """``use_zero_pages``: an all-zero page is replaced by the zero page."""
        model = self.model
        mem = model.memory
        if not (yield from self._write_protect_page(m, addr, pfn)):
            return False
        if not mem.is_zero_filled(pfn):
            return False

        def commit() -> bool:
            now = m.get(addr)
            if now >> PTE_SHIFT != pfn or not now & PTE_PRESENT or mem.pincount[pfn]:
                return False
            m.set(addr, present_pte(ZERO_PFN, False) | PTE_KSM_ZERO)
            mem.mapcount[pfn] -= 1
            model.put_page(pfn)
            self.ksm_zero_pages += 1
            return True

        return (yield from model.set_pte_at_notify(m.id, addr, ZERO_PFN, False, commit, wrap=model.wrap_change_pte,
                                                   origin=Origin.KSMD))

    # -- unmerging ----------------------------------------------------------------------

    def _break_ksm(self, m: Mm, addr: int, origin: Origin = Origin.OWNER) -> Op[None]:
        """``break_ksm``: an unsharing fault replaces a KSM (or KSM zero) page
        by a private copy (``origin``: the owner's MADV_UNMERGEABLE, or
        ksmd's ``break_cow``)."""
        pte = m.get(addr)
        if not pte & PTE_PRESENT:
            return
        pfn = pte >> PTE_SHIFT
        if not (self.model.memory.flags[pfn] & PG_KSM if pfn != ZERO_PFN else pte & PTE_KSM_ZERO):
            return
        vma = m.find_vma(addr)
        # FAULT_FLAG_UNSHARE in a vma that cannot be written (PROT_NONE, r):
        # the copy is mapped read-only (mm/ksm.c break_ksm, mm/memory.c
        # wp_page_copy with unshare)
        writable = vma is not None and vma.prot is Prot.RW and not vma.shared
        yield from self.model.cow_break(m, addr, pte, writable=writable, origin=origin)

    def unmerge_range(self, m: Mm, start: int, end: int, origin: Origin = Origin.OWNER) -> Op[None]:
        """``unmerge_ksm_pages`` (MADV_UNMERGEABLE): every KSM page of the range unshared."""
        for addr, _pte in list(m.populated_in(start, end)):
            if m.id in self.model.mms:
                yield from self._break_ksm(m, addr, origin)
        for key in [k for k in self.rmap if k[0] == m.id and start <= k[1] < end]:
            self.forget(*key)

    def unmerge_all(self) -> Op[None]:
        """``run`` = 2: unmerge every KSM page and forget every rmap item."""
        for mm_id in sorted(self.model.mms):
            m = self.model.mms.get(mm_id)
            if m is None:
                continue
            for vma in list(m.vmas):
                if vma.mergeable:
                    # run = 2 is not the owner's doing (the sysfs writer's context)
                    yield from self.unmerge_range(m, vma.start, vma.end, Origin.KSMD)
        self.rmap.clear()
        self.accounted.clear()
        self._items_per_mm.clear()
        self.unstable.clear()
        self._queue.clear()
        self._in_pass = False

    # -- checking --------------------------------------------------------------------------

    def check_invariants(self) -> None:
        mem = self.model.memory
        # live rmap items are made by ksmd's visits, which count them
        assert set(self.rmap) <= set(self.accounted), set(self.rmap) - set(self.accounted)
        for kpfn, node in self.stable.items():
            assert mem.flags[kpfn] & PG_KSM and mem.refcount[kpfn], f"stable node {kpfn} without its page"
            for key in node.items:
                item = self.rmap.get(key)
                assert item is not None and item.state is RmapState.STABLE and item.kpfn == kpfn, (key, item)
                m = self.model.mms[key[0]]
                assert m.get(key[1]) >> PTE_SHIFT == kpfn, f"{key} merged into {kpfn} maps another page"
        zero = 0
        for m in self.model.mms.values():
            for chunk in m.pgd.values():
                for pte in chunk:
                    if pte & PTE_KSM_ZERO:
                        zero += 1
        assert zero == self.ksm_zero_pages, f"ksm_zero_pages {self.ksm_zero_pages}, ptes {zero}"
        for pfn in range(1, mem.nframes):
            if mem.flags[pfn] & PG_KSM and mem.refcount[pfn]:
                assert pfn in self.stable, f"KSM page {pfn} has no stable node"
