"""An XPMEM-like secondary MMU: attachments of segments exported by other mms.

Kernel sources (XPMEM, github.com/hpc/xpmem): kernel/xpmem_make.c, xpmem_get.c
(segments and access permits, ``xpmem_check_permit_mode``), xpmem_attach.c
(``xpmem_attach``, ``xpmem_detach``, ``xpmem_fault_handler``,
``xpmem_validate_access``), xpmem_pfn.c (``xpmem_pin_page``: pages are pinned
while attached), xpmem_mmu_notifier.c (clearing the attachments' ptes when the
exporter's range is invalidated, ``xpmem_mmu_release``).  Blockable vs not:
mm/mmu_notifier.c, ``mmu_notifier_range_blockable``.

Objects (node-side)::

    make(mm, addr, length, mode) ── XpmemMake ──▶ segid        (host keeps the segment)
    get(segid, write)            ── XpmemGet  ──▶ apid + mode  (an access permit)
    attach(apid, offset, length)  ─ local ─────▶ vaddr        (in the node's own space)
    detach(vaddr) / xpmem_release(apid) / remove(segid): unmap, Unpin, tell the host
    XpmemRemoved(segid) from the host (another node removed it): every
                   attachment of it is zapped and unpinned (after its DMAs
                   drain), then Ack; it stays, failing with ENOENT

A fault on an attachment GUPs the exporter's mm with ``pin=True``; every page
mapped holds one pin, dropped (``Unpin``) whenever the page is unmapped:
detach, release, invalidation, a GUP reply that is discarded or redundant.

Only the owner's invalidations reach the attachments (xpmem_mmu_notifier.c
``xpmem_invalidate_range``: "if (seg_tg->tgid != current->tgid) return;")::

    start(range, origin ksmd / kswapd / migration)
                                   → Ack(kept=True if it maps a page there):
                                     nothing unmapped, no pin dropped; the
                                     host finds the page pinned and leaves it

The owner's (origin ``owner``: munmap, mprotect, madvise, COW, exit) are
**sleepable**::

    start(range, blockable=False)  → Ack(EAGAIN), nothing changes
    start(range)                   → in_progress++, unmap the range's ptes
                                     (no new access can use them: it faults and
                                     the fault waits for the end), then
       no DMA in flight in range   → Unpin, Ack                  (at once)
       DMA in flight in range      → hold Unpin + Ack until the last of those
                                     DMAs is answered (the drain)
    end                            → seq++, in_progress--, wake parked faults

GUP replies follow KVM's rule (``node.kvm``): discarded (and unpinned) if an
invalidation in progress overlaps them or the seq moved since the request.
(A slow drain is injected by the runtime, ``slow-drain``: nothing here reads
a clock.)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, ClassVar

from protocol.messages import (
    Error,
    InvalidateRangeStart,
    Message,
    XpmemGet,
    XpmemMake,
    XpmemRelease,
    XpmemRemove,
    XpmemRemoved,
    XpmemReply,
)
from protocol.status import LIST_SHOWN
from protocol.types import ADDRESS_LIMIT, Errno, KernelError, Origin

from .base import MmState, Output, SecondaryMMU, Translation, kernel_error, pages_in
from .fault import Fault

#: Where attachments are placed in the node's own address space.
DEFAULT_ATTACH_BASE = 0x6000_0000_0000


@dataclass(frozen=True, slots=True)
class AccessPermit:
    """``struct xpmem_access_permit``: the right to attach segment ``segid``
    (``[addr, addr+length)`` of ``mm``), read-write or read-only."""

    apid: int
    segid: int
    mm: int
    addr: int
    length: int
    write: bool


@dataclass(eq=False, slots=True)
class Attachment:
    """``struct xpmem_attachment``: ``[vaddr, vaddr+size)`` of the node maps
    ``[seg_vaddr, seg_vaddr+size)`` of exporter ``mm``.  ``ptes``: exporter
    page -> (pinned pfn, writable)."""

    vaddr: int
    size: int
    apid: int
    mm: int
    seg_vaddr: int
    write: bool
    user_vaddr: int
    user_length: int
    ptes: dict[int, tuple[int, bool]] = field(default_factory=dict)
    #: its segment was removed (``XPMEM_FLAG_DESTROYING``): every use is ENOENT
    removed: bool = False

    def exporter_addr(self, vaddr: int) -> int:
        return self.seg_vaddr + (vaddr - self.vaddr)


@dataclass(eq=False, slots=True)
class XpmemMm(MmState):
    """Invalidation state of an exporter's mm, as KVM keeps it."""

    mmu_invalidate_seq: int = 0
    mmu_invalidate_in_progress: int = 0

    def invalidating(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self.open_starts.values())


@dataclass(eq=False, slots=True)
class _XpmemCall:
    """An xpmem request waiting for its XpmemReply (``op``: make, get,
    release or remove; ``segid``/``apid``: what the result names)."""

    token: int
    op: str
    segid: int = 0
    apid: int = 0


@dataclass(eq=False, slots=True)
class _Drain:
    """A start whose Unpin + Ack wait for DMAs in its range to be answered."""

    mm: int
    dma: set[int]
    pfns: list[int]


class XpmemMMU(SecondaryMMU):
    """The xpmem kind: sleepable invalidate_range_start/_end and release.

    Args:
        name: the node's name.
        attach_base: lowest node-local address handed out by :meth:`attach`.
        **kwargs: see :class:`node.base.SecondaryMMU`.

    Addresses given to :meth:`fault` and :meth:`access` are attachment
    addresses in the node's own space; their ``mm`` argument must be 0 or the
    exporter's mm.

    Counters: ``pins_taken`` / ``pins_released`` (pages pinned by GUP replies /
    listed in Unpin), ``pins_dropped_by_host`` (held when a session ended),
    ``drains`` (starts, or removes, that waited for DMA), ``eagain``,
    ``background_kept`` (background starts acked with pins kept).  Status
    shows ``pages_pinned`` / ``pages_unpinned`` as /proc/xpmem does.
    """

    kind: ClassVar[str] = "xpmem"
    sleepable: ClassVar[bool] = True

    def __init__(self, name: str, *, attach_base: int = DEFAULT_ATTACH_BASE, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.attach_base = attach_base
        self._next_vaddr = attach_base
        self.permits: dict[int, AccessPermit] = {}
        self.attachments: dict[int, Attachment] = {}  # by vaddr
        self._att_starts: list[int] = []  # sorted vaddrs of attachments
        self._drains: dict[int, _Drain] = {}  # start id (or XpmemRemoved id) -> drain
        self._removed_apids: set[int] = set()  # permits of removed segments
        self.counters.update(drains=0, eagain=0, pins_dropped_by_host=0, background_kept=0)

    def _new_mm_state(self, mm: int) -> XpmemMm:
        return XpmemMm(mm)

    def mm_state(self, mm: int) -> XpmemMm | None:
        state = self._mms.get(mm)
        assert state is None or isinstance(state, XpmemMm)
        return state

    # ------------------------------------------------------ xpmem calls

    def make(self, mm: int, addr: int, length: int, mode: int = 0o600) -> tuple[int, list[Output]]:
        """``xpmem_make``: export ``[addr, addr+length)`` of ``mm``.

        Returns:
            ``(token, outputs)``; result ``{"segid": int}``.  Errors from the host.
        """
        token = self._new_token()
        rid = self.next_id()
        self._pending[rid] = _XpmemCall(token, "make")
        return token, [XpmemMake(id=rid, epoch=self.epoch, mm=mm, addr=addr, length=length, mode=mode)]

    def get(self, segid: int, write: bool = True) -> tuple[int, list[Output]]:
        """``xpmem_get``: an access permit (apid) for ``segid``.

        Returns:
            ``(token, outputs)``; result ``{"apid", "segid", "mm", "addr",
            "length", "write"}``.  Errors: EACCES if the segment's mode does not
            allow it (decided by the host).
        """
        token = self._new_token()
        rid = self.next_id()
        self._pending[rid] = _XpmemCall(token, "get", segid=segid)
        return token, [XpmemGet(id=rid, epoch=self.epoch, segid=segid, write=write)]

    def attach(self, apid: int, offset: int = 0, length: int | None = None) -> tuple[int, list[Output]]:
        """``xpmem_attach``: map part of a permit's segment into the node's space.

        Nothing is faulted in or pinned yet.  ``xpmem_attach`` always
        validates the permit for ``XPMEM_RDWR``, so every attachment is
        read-write and a read-only permit cannot be attached.

        Returns:
            ``(token, outputs)`` with the Completion already among the outputs:
            ``{"vaddr", "length", "write"}``.  Errors: EINVAL (unknown apid, bad
            offset or length), EACCES (a read-only permit) --
            ``xpmem_validate_access``.
        """
        token = self._new_token()
        if apid in self._removed_apids:
            return token, self._complete(token, error=KernelError(Errno.ENOENT, f"apid {apid}: segment removed"))
        permit = self.permits.get(apid)
        if length is None and permit is not None:
            length = permit.length - offset
        if permit is None:
            return token, self._complete(token, error=KernelError(Errno.EINVAL, f"unknown apid {apid}"))
        if not permit.write:
            return token, self._complete(token, error=KernelError(Errno.EACCES, f"apid {apid} is read-only"))
        if length is None or offset < 0 or offset % self.page_size or not 0 < length <= permit.length - offset:
            return token, self._complete(token, error=KernelError(Errno.EINVAL, "offset/length outside segment"))
        seg_addr = permit.addr + offset
        in_page = seg_addr % self.page_size
        size = -(-(length + in_page) // self.page_size) * self.page_size
        base = self._next_vaddr
        if base + size > ADDRESS_LIMIT:
            return token, self._complete(token, error=KernelError(Errno.ENOMEM, "node address space full"))
        self._next_vaddr = base + size + self.page_size  # a guard page between attachments
        att = Attachment(
            vaddr=base,
            size=size,
            apid=apid,
            mm=permit.mm,
            seg_vaddr=seg_addr - in_page,
            write=permit.write,
            user_vaddr=base + in_page,
            user_length=length,
        )
        self.attachments[base] = att
        bisect.insort(self._att_starts, base)
        return token, self._complete(token, {"vaddr": att.user_vaddr, "length": length, "write": att.write})

    def detach(self, vaddr: int) -> tuple[int, list[Output]]:
        """``xpmem_detach``: unmap the attachment holding ``vaddr``, unpin its pages.

        Returns:
            ``(token, outputs)``: Unpin messages and the Completion
            ``{"vaddr", "unpinned"}``.  No attachment at ``vaddr`` is a no-op
            with ``unpinned`` 0, as ``xpmem_detach`` returns 0 when it finds
            no xpmem vma there.
        """
        token = self._new_token()
        att = self._attachment_at(vaddr)
        if att is None:
            return token, self._complete(token, {"vaddr": vaddr, "unpinned": 0})
        unpinned = len(att.ptes)
        outputs = self._detach(att)
        return token, outputs + self._complete(token, {"vaddr": att.user_vaddr, "unpinned": unpinned})

    def xpmem_release(self, apid: int) -> tuple[int, list[Output]]:
        """``xpmem_release``: detach every attachment of ``apid``, give the permit back.

        Returns:
            ``(token, outputs)``; result ``{"apid"}``.  Errors: EINVAL (unknown apid).
        """
        token = self._new_token()
        if apid in self._removed_apids:
            self._removed_apids.discard(apid)
            outputs = self._drop_permit(apid)  # its attachments hold no pins any more
            return token, outputs + self._complete(token, error=KernelError(Errno.ENOENT, f"apid {apid}: segment removed"))
        if apid not in self.permits:
            return token, self._complete(token, error=KernelError(Errno.EINVAL, f"unknown apid {apid}"))
        outputs = self._drop_permit(apid)
        rid = self.next_id()
        self._pending[rid] = _XpmemCall(token, "release", apid=apid)
        return token, [*outputs, XpmemRelease(id=rid, epoch=self.epoch, apid=apid)]

    def remove(self, segid: int) -> tuple[int, list[Output]]:
        """``xpmem_remove``: the exporter withdraws ``segid``.  The host sends
        every importer, this node too if it holds permits of it,
        ``XpmemRemoved`` and replies once all have acked (their attachments
        zapped and unpinned), as ``xpmem_remove_seg`` returns after
        ``xpmem_clear_PTEs``.

        Returns:
            ``(token, outputs)``; result ``{"segid"}``.  Errors from the host
            (ENOENT: no such segment, EACCES: not the exporter).
        """
        token = self._new_token()
        rid = self.next_id()
        self._pending[rid] = _XpmemCall(token, "remove", segid=segid)
        return token, [XpmemRemove(id=rid, epoch=self.epoch, segid=segid)]

    def _reply(self, request: Any, reply: Message) -> list[Output]:
        if not isinstance(request, _XpmemCall):
            return super()._reply(request, reply)
        token = request.token
        if isinstance(reply, Error):
            return self._complete(token, error=kernel_error(reply.code, reply.message))
        if not isinstance(reply, XpmemReply):
            return self._complete(token, error=KernelError(Errno.EINVAL, f"unexpected {reply.TYPE}"))
        if reply.errno:
            return self._complete(token, error=kernel_error(reply.errno))
        if request.op == "make":
            return self._complete(token, {"segid": reply.value})
        if request.op == "release":
            return self._complete(token, {"apid": request.apid})
        if request.op == "remove":
            return self._complete(token, {"segid": request.segid})
        permit = AccessPermit(reply.value, request.segid, reply.mm, reply.addr, reply.length, reply.write)
        self.permits[permit.apid] = permit
        return self._complete(token, {
            "apid": permit.apid,
            "segid": permit.segid,
            "mm": permit.mm,
            "addr": permit.addr,
            "length": permit.length,
            "write": permit.write,
        })

    def receive(self, msg: Message) -> list[Output]:
        if isinstance(msg, XpmemRemoved):
            return self._receive_removed(msg)
        return super().receive(msg)

    def _receive_removed(self, msg: XpmemRemoved) -> list[Output]:
        """``xpmem_remove_seg`` reached this importer: ``xpmem_clear_PTEs`` of
        every attachment of the segment, pins dropped once the DMAs in flight
        on them are answered (the same drain as a start), then the Ack."""
        if msg.id in self._drains:
            return []  # a duplicate while draining: the Ack comes with the drain
        if msg.id in self._answered:
            self.counters["duplicates"] += 1
            return [self._answered[msg.id]]
        drains: dict[int, _Drain] = {}
        for apid in [a for a, p in self.permits.items() if p.segid == msg.segid]:
            self._removed_apids.add(apid)
            for att in [a for a in self.attachments.values() if a.apid == apid]:
                att.removed = True
                drain = drains.setdefault(att.mm, _Drain(att.mm, set(), []))
                drain.pfns += [pfn for pfn, _ in att.ptes.values()]
                drain.dma |= {
                    i
                    for i, (mm, addr) in self.dma_in_flight.items()
                    if mm == att.mm and att.seg_vaddr <= addr < att.seg_vaddr + att.size
                }
                att.ptes.clear()
        outputs: list[Output] = []
        for drain in drains.values():  # one mm per segment: at most one drain
            if drain.dma:
                self.counters["drains"] += 1
                self._drains[msg.id] = drain
                return outputs
            outputs += self._unpin(drain.mm, drain.pfns)
        return [*outputs, self._ack(msg.id)]

    def _drop_permit(self, apid: int) -> list[Output]:
        self.permits.pop(apid, None)
        outputs: list[Output] = []
        for att in [a for a in self.attachments.values() if a.apid == apid]:
            outputs += self._detach(att)
        return outputs

    def _detach(self, att: Attachment) -> list[Output]:
        del self.attachments[att.vaddr]
        self._att_starts.remove(att.vaddr)
        pfns = [pfn for pfn, _ in att.ptes.values()]
        att.ptes.clear()
        return self._unpin(att.mm, pfns)

    def _usable_attachment(self, mm: int, vaddr: int) -> Attachment:
        """The attachment an access or fault at ``vaddr`` goes through.
        Raises KernelError: EFAULT (none there), ENOENT (its segment was
        removed: the kernel's SIGBUS from ``xpmem_ensure_valid_PFN``)."""
        att = self._attachment_at(vaddr)
        if att is None or mm not in (0, att.mm) or not att.user_vaddr <= vaddr < att.user_vaddr + att.user_length:
            raise KernelError(Errno.EFAULT, f"no attachment at {vaddr:#x}")
        if att.removed:
            raise KernelError(Errno.ENOENT, f"segment of the attachment at {vaddr:#x} was removed")
        return att

    def _attachment_at(self, vaddr: int) -> Attachment | None:
        i = bisect.bisect_right(self._att_starts, vaddr) - 1
        if i < 0:
            return None
        att = self.attachments[self._att_starts[i]]
        return att if vaddr < att.vaddr + att.size else None

    # --------------------------------------------------------- notifier

    def invalidate_range_start(self, state: MmState, msg: InvalidateRangeStart) -> list[Output]:
        assert isinstance(state, XpmemMm)
        if msg.origin != Origin.OWNER.value:
            # kernel/xpmem_mmu_notifier.c: an invalidation from another
            # context (ksmd, kswapd, migration) returns at once; the
            # attachments keep their ptes and their pins, which is what makes
            # KSM's write_protect_page count check, try_to_unmap and
            # try_to_migrate fail for the page.  Not opened: nothing to end.
            kept = self._maps_pages(state.mm, msg.start, msg.end)
            self.counters["background_kept"] += kept
            return [self._ack(msg.id, kept=kept)]
        if not msg.blockable and self._maps_any(state.mm, msg.start, msg.end):
            # A sleepable subscriber cannot wait here: mn_hlist_invalidate_range_start
            # takes -EAGAIN, ends the others and the caller retries later.  With
            # nothing mapped in the range there is nothing to sleep for (the
            # trylock pattern of mmu_notifier_range_blockable users): ack.
            self.counters["eagain"] += 1
            return [self._ack(msg.id, status="EAGAIN")]
        self._open_start(state, msg)
        state.mmu_invalidate_in_progress += 1
        pfns = self._unmap(state.mm, msg.start, msg.end)
        dma = {
            i
            for i, (mm, addr) in self.dma_in_flight.items()
            if mm == state.mm and addr < msg.end and msg.start < addr + self.page_size
        }
        if dma:
            self.counters["drains"] += 1
            self._drains[msg.id] = _Drain(state.mm, dma, pfns)
            return []
        return [*self._unpin(state.mm, pfns), self._ack(msg.id)]

    def _duplicate_start(self, state: MmState, msg: InvalidateRangeStart) -> list[Output]:
        if msg.id in self._drains:  # the Ack comes when the drain ends
            return []
        return [self._ack(msg.id)]

    def _dma_finished(self, dma_id: int) -> list[Output]:
        outputs: list[Output] = []
        for start_id, drain in list(self._drains.items()):
            drain.dma.discard(dma_id)
            if not drain.dma:
                outputs += self._finish_drain(start_id)
        return outputs

    def _finish_drain(self, start_id: int) -> list[Output]:
        drain = self._drains.pop(start_id)
        return [*self._unpin(drain.mm, drain.pfns), self._ack(start_id)]

    def invalidate_range_end(self, state: MmState, start_id: int, rng: tuple[int, int]) -> list[Output]:
        assert isinstance(state, XpmemMm)
        outputs: list[Output] = []
        if start_id in self._drains:
            # The host ended the range without our ack (it gave up waiting):
            # stop draining, give the pins back.
            outputs = self._finish_drain(start_id)
        state.mmu_invalidate_seq += 1
        state.mmu_invalidate_in_progress -= 1
        return outputs

    def release(self, state: MmState) -> list[Output]:
        # xpmem_mmu_release: the exporter's mm is going; nothing of it stays mapped.
        assert isinstance(state, XpmemMm)
        state.mmu_invalidate_seq += 1
        return self._unpin(state.mm, self._unmap(state.mm, 0, ADDRESS_LIMIT))

    def _zap(self, mm: int, start: int, end: int) -> list[Output]:
        state = self._mm(mm)
        assert isinstance(state, XpmemMm)
        state.mmu_invalidate_seq += 1
        return self._unpin(mm, self._unmap(mm, start, end))

    def _maps_any(self, mm: int, start: int, end: int) -> bool:
        """Does an attachment map a page of ``[start, end)`` of exporter ``mm``,
        or is a DMA of it in flight?"""
        if self._maps_pages(mm, start, end):
            return True
        return any(m == mm and a < end and start < a + self.page_size for m, a in self.dma_in_flight.values())

    def _maps_pages(self, mm: int, start: int, end: int) -> bool:
        """Does an attachment map (and pin) a page of ``[start, end)`` of exporter ``mm``?"""
        for att in self.attachments.values():
            if att.mm == mm and att.seg_vaddr < end and start < att.seg_vaddr + att.size:
                if pages_in(att.ptes, start, end, self.page_size):
                    return True
        return False

    def _unmap(self, mm: int, start: int, end: int) -> list[int]:
        """Clear the attachments' ptes of ``[start, end)`` of exporter ``mm``;
        returns the pfns whose pins are to be dropped (``xpmem_clear_PTEs_range``)."""
        pfns: list[int] = []
        for att in self.attachments.values():
            if att.mm != mm or not (att.seg_vaddr < end and start < att.seg_vaddr + att.size):
                continue
            for page in pages_in(att.ptes, start, end, self.page_size):
                pfns.append(att.ptes.pop(page)[0])
        return pfns

    # ----------------------------------------------------------- faults

    def _make_fault(self, mm: int, addr: int, npages: int, write: bool) -> Fault:
        att = self._usable_attachment(mm, addr)
        if write and not att.write:
            # xpmem_validate_access: a read-write use of a read-only permit.
            raise KernelError(Errno.EACCES, "read-only attachment")
        page = addr - addr % self.page_size
        npages = min(npages, (att.vaddr + att.size - page) // self.page_size)
        # The Gup says what the access needs; the host pins writable whenever
        # the exporter's vma is writable (xpmem_pin_page's FOLL_WRITE follows
        # the source vma), so a later write needs no second pin, and a read
        # of a vma the owner made read-only still succeeds.
        return Fault(
            mm=att.mm,
            addr=att.exporter_addr(page),
            npages=npages,
            write=write,
            pin=True,
            context=att,
        )

    def read_begin(self, state: MmState, f: Fault) -> int | None:
        # An invalidation (XPMEM's recall) in progress over the range: wait for its end.
        assert isinstance(state, XpmemMm)
        if state.invalidating(f.addr, f.addr + f.npages * self.page_size):
            return None
        return state.mmu_invalidate_seq

    def read_retry(self, state: MmState, f: Fault, start: int, end: int) -> bool:
        assert isinstance(state, XpmemMm)
        if state.invalidating(start, end):
            return True
        return state.mmu_invalidate_seq != f.seq

    def _fault_install(
        self, state: MmState, f: Fault, pages: list[list[int]]
    ) -> tuple[list[list[int]], list[Output]]:
        att = f.context
        assert isinstance(att, Attachment)
        live = self.attachments.get(att.vaddr) is att and not att.removed
        installed: list[list[int]] = []
        extra: list[int] = []
        for addr, pfn, writable in pages:
            inside = att.seg_vaddr <= addr < att.seg_vaddr + att.size
            old = att.ptes.get(addr)
            if not live or not inside or (old is not None and (old[1] or not writable)):
                # Detached meanwhile, outside the attachment, or already mapped
                # by a racing fault (xpmem_fault_handler drops the extra pin).
                extra.append(pfn)
                continue
            if old is not None:
                extra.append(old[0])  # a writable pin replaces a read-only one
            att.ptes[addr] = (pfn, bool(writable))
            installed.append([addr, pfn, writable])
        return installed, self._unpin(f.mm, extra)

    def _translate(self, mm: int, vaddr: int, write: bool) -> Translation | None:
        att = self._usable_attachment(mm, vaddr)
        if write and not att.write:
            raise KernelError(Errno.EACCES, "read-only attachment")
        page = att.exporter_addr(vaddr - vaddr % self.page_size)
        pte = att.ptes.get(page)
        if pte is None or (write and not pte[1]):
            return None
        return Translation(att.mm, page, pte[0], pte[1])

    # ----------------------------------------------------------- status

    def _drop_kind_state(self) -> None:
        # The session's permits, attachments and pins are the host's to drop.
        self.counters["pins_dropped_by_host"] += self.pinned_pages()
        self.permits.clear()
        self.attachments.clear()
        self._att_starts.clear()
        self._drains.clear()
        self._removed_apids.clear()

    def pinned_pages(self) -> int:
        """Pins this node holds: mapped pages plus those awaiting a drain."""
        return self.mapped_pages() + sum(len(d.pfns) for d in self._drains.values())

    def mapped_pages(self) -> int:
        return sum(len(att.ptes) for att in self.attachments.values())

    def translations(self) -> dict[int, dict[int, int]]:
        out: dict[int, dict[int, int]] = {}
        for att in self.attachments.values():
            for page, (pfn, _) in att.ptes.items():
                out.setdefault(att.mm, {})[page] = pfn
        return out

    def status(self, mm: int | None = None, cursor: str | None = None, limit: int | None = None) -> dict[str, Any]:
        status = super().status(mm, cursor, limit)
        permits = [p for p in self.permits.values() if mm is None or p.mm == mm]
        attachments = [a for a in self.attachments.values() if mm is None or a.mm == mm]
        status["permits_total"], status["attachments_total"] = len(permits), len(attachments)
        status["permits"] = [
            {
                "apid": p.apid,
                "segid": p.segid,
                "mm": p.mm,
                "addr": hex(p.addr),
                "length": p.length,
                "write": p.write,
            }
            for p in permits[:LIST_SHOWN]
        ]
        status["attachments"] = [
            {
                "vaddr": hex(a.user_vaddr),
                "length": a.user_length,
                "apid": a.apid,
                "mm": a.mm,
                "addr": hex(a.seg_vaddr + (a.user_vaddr - a.vaddr)),
                "write": a.write,
                "mapped": len(a.ptes),
                "removed": a.removed,
            }
            for a in attachments[:LIST_SHOWN]
        ]
        status["pinned_pages"] = self.pinned_pages()
        # /proc/xpmem's global counters, for this node: pages pinned by its
        # faults, pages unpinned (its Unpins, and those the host dropped when
        # the session ended); equal once it holds no pin
        # (in its counters: ``mmn status`` shows every node's counters)
        c = self.counters
        status["counters"] = {
            **status.get("counters", {}),
            "pages_pinned": c["pins_taken"],
            "pages_unpinned": c["pins_released"] + c["pins_dropped_by_host"],
        }
        status["draining"] = len(self._drains)
        return status
