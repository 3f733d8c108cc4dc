"""An HMM device mirror: a device page table filled by ``hmm_range_fault``
under an interval notifier, after ``lib/test_hmm.c``'s "dmirror".

Kernel sources: lib/test_hmm.c (``dmirror_interval_invalidate``,
``dmirror_range_fault``, ``dmirror_fault``, ``dmirror_read``/``_write``,
``dmirror_snapshot``), mm/hmm.c (``hmm_range_fault``), mm/mmu_notifier.c and
include/linux/mmu_notifier.h (``mmu_interval_notifier_insert``,
``mmu_interval_read_begin``, ``mmu_interval_set_seq``,
``mmu_interval_read_retry``), Documentation/mm/hmm.rst.

Per mm the node holds one interval notifier, over the whole address space
as dmirror inserts it (``mmu_interval_notifier_insert(&dmirror->notifier,
mm, 0, ULONG_MAX & PAGE_MASK, ...)``); the host routes it every
invalidation the interval overlaps.  What the node keeps per mm::

    interval        the host's id of the interval notifier (0: not inserted)
    invalidate_seq  the interval's seq as this node set it (mmu_interval_set_seq)
                    on every start it took: the value each start carries
    pt              the device page table: page -> (pfn, writable)

The collision-retry loop of hmm.rst, in message form::

    node                                        host
    fault: HmmRangeFault(interval) ───────▶     (under the lock) fault in, read the
                                                ptes, seq = read_begin(interval)
              ◀───────────────────────────      invalidate_range_start(seqs=[[i, cur]])
    start: invalidate_seq = cur, zap, Ack ──▶   (sets the interval's seq to cur on the ack)
              ◀───────────────────────────      HmmRangeFaultReply(pfns, seq)
    reply: read_retry: invalidate_seq != seq  → discard, fault again (bounded: EAGAIN)
           else                               → install into pt (dmirror_do_update)

The channel is ordered, so "an invalidation ran between read_begin and the
install" is "a start carrying a newer seq arrived before the reply".

dmirror takes its mutex in the invalidate callback; with a non-blockable
range it only tries (``mutex_trylock``) and answers false (EAGAIN) when the
device holds it.  The device holds it while it copies (``dmirror_do_read``/
``_write``): here, while a DMA of the mm is in flight.

Accesses (``mmn access``) are dmirror's reads and writes: each page missing
from ``pt`` makes one fault round over the rest of the access
(``dmirror_fault``; ``faults`` counts the rounds), each page copied counts in
``cpages``; both come back in the result as dmirror's ``struct
hmm_dmirror_cmd`` reports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.hmm import (
    HMM_PFN_DEVICE_OWNER,
    HMM_PFN_DEVICE_PRIVATE,
    HMM_PFN_EXCLUSIVE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    state_of,
)
from protocol.messages import (
    Ack,
    DmaRead,
    DmaWrite,
    Error,
    HmmDevmemFault,
    HmmEvict,
    HmmEvictReply,
    HmmExclusive,
    HmmMigrate,
    HmmMigrated,
    HmmMigrateReply,
    HmmRangeFault,
    HmmRangeFaultReply,
    IntervalInsert,
    IntervalRemove,
    IntervalReply,
    InvalidateRangeStart,
    Message,
    Ok,
)
from protocol.types import ADDRESS_LIMIT, Errno, KernelError

from .base import (
    Completion,
    MmState,
    Output,
    SecondaryMMU,
    Subscription,
    Translation,
    _Access,
    _DmaRequest,
    _SubscribeRequest,
    kernel_error,
    pages_in,
)
from .fault import Fault, FaultEvent, FaultState

#: ``Fault.context`` of a snapshot (``dmirror_snapshot``: no HMM_PFN_REQ_FAULT).
SNAPSHOT = "snapshot"
#: ``Fault.context`` of migrations to this device's memory and back.
MIGRATE_TO_DEV = "migrate"
MIGRATE_TO_SYS = "migrate-sys"
#: ``Fault.context`` of ``make_device_exclusive`` (``HMM_DMIRROR_EXCLUSIVE``).
EXCLUSIVE = "exclusive"


@dataclass(slots=True)
class DeviceEntry:
    """One entry of dmirror's page table (``dmirror->pt``): the host frame
    ``pfn`` backs the page, writable or not; ``device``: ``pfn`` is the
    handle of one of this device's own pages (its contents are here)."""

    pfn: int
    writable: bool
    device: bool = False
    #: an atomic (device-exclusive) mapping: ``dmirror_atomic_map``'s DPT_XA_TAG_ATOMIC
    exclusive: bool = False


@dataclass(eq=False, slots=True)
class HmmMm(MmState):
    """The interval notifier of one mm, as the node holds it."""

    interval: int = 0
    invalidate_seq: int = 0
    #: the IntervalRemove in flight (0: none) and the unsubscribe token it serves
    remove_id: int = 0
    remove_token: int = 0


@dataclass(eq=False, slots=True)
class _RemoveRequest:
    state: HmmMm
    token: int


@dataclass(eq=False, slots=True)
class _EvictRequest:
    token: int


class HmmMMU(SecondaryMMU):
    """The hmm kind: ``invalidate_range_start``/``_end`` and ``release``
    (an interval notifier has only ``invalidate``; the host pairs ends with
    every start it sends, and the end is where parked faults wake).

    Args:
        name: the node's name.
        interval: ``[start, end)`` the node's interval notifier covers in
            every mm (default: the whole address space, as dmirror).
        **kwargs: see :class:`node.base.SecondaryMMU`.

    Counters (``status()["counters"]``): ``cpages`` (pages copied by
    accesses), ``fault_rounds`` (dmirror's ``faults``), ``zapped``,
    ``eagain`` (non-blockable starts refused: the mutex was held),
    ``snapshots``.
    """

    kind: ClassVar[str] = "hmm"
    sleepable: ClassVar[bool] = False

    def __init__(self, name: str, *, interval: tuple[int, int] = (0, ADDRESS_LIMIT), **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.interval = interval
        self.pt: dict[int, dict[int, DeviceEntry]] = {}
        #: device memory: handle -> contents of a device-private page
        self.device_pages: dict[int, bytearray] = {}
        #: access token -> [fault rounds, pages copied]
        self._access_stats: dict[int, list[int]] = {}
        #: a clean shutdown asked the host to take the device pages back:
        #: no more migrations to the device
        self.removing = False
        self.counters.update(cpages=0, fault_rounds=0, zapped=0, eagain=0, snapshots=0, migrate_own=0,
                             migrated_in=0, migrated_out=0)

    def _new_mm_state(self, mm: int) -> HmmMm:
        return HmmMm(mm)

    def mm_state(self, mm: int) -> HmmMm | None:
        state = self._mms.get(mm)
        assert state is None or isinstance(state, HmmMm)
        return state

    def entry(self, mm: int, addr: int) -> DeviceEntry | None:
        return self.pt.get(mm, {}).get(addr - addr % self.page_size)

    # ---------------------------------------------------- the interval notifier

    def _send_subscribe(self, state: MmState) -> list[Output]:
        """``mmu_interval_notifier_insert`` instead of ``mmu_notifier_register``."""
        if state.subscribe_id:
            return []
        sid = state.subscribe_id = self.next_id()
        state.subscription = Subscription.SUBSCRIBING
        self._pending[sid] = _SubscribeRequest(state, sid)
        start, end = self.interval
        return [IntervalInsert(id=sid, epoch=self.epoch, mm=state.mm, start=start, end=end)]

    def unsubscribe(self, mm: int) -> tuple[int, list[Output]]:
        """``mmu_interval_notifier_remove``: the host answers once no
        invalidation that may still reach the interval is active (deferred
        removal); then nothing more of ``mm`` is delivered, and the device
        page table of ``mm`` is gone."""
        token = self._new_token()
        state = self.mm_state(mm)
        if state is None or not state.subscribed or not state.interval:
            return token, self._complete(token, {"mm": mm, "subscribed": False})
        rid = state.remove_id = self.next_id()
        self._pending[rid] = _RemoveRequest(state, token)
        return token, [IntervalRemove(id=rid, epoch=self.epoch, mm=mm, interval=state.interval)]

    def shutdown(self) -> tuple[int | None, list[Output]]:
        """``dmirror_fops_release`` / ``dmirror_device_remove``: before the
        device goes, every device-private page it holds goes back to system
        memory (``dmirror_device_evict_chunk``): ``HmmEvict``; the host asks
        for each page's contents (``HmmDevmemFault``) and installs fresh
        frames.  From now on nothing migrates to this device.  The
        Completion's result is ``{"cpages", "lost"}``; ``token`` is None
        when the device holds no page (nothing to wait for)."""
        self.removing = True
        if not self.device_pages or self.epoch == 0:
            return None, []
        token = self._new_token()
        rid = self.next_id()
        self._pending[rid] = _EvictRequest(token)
        return token, [HmmEvict(id=rid, epoch=self.epoch)]

    def receive(self, msg: Message) -> list[Output]:
        if isinstance(msg, HmmEvictReply):
            self._free(msg.freed)
            request = self._pending.pop(msg.ref, None)
            if not isinstance(request, _EvictRequest):
                return []
            return self._complete(request.token, {"cpages": msg.cpages, "lost": msg.lost})
        if isinstance(msg, (IntervalReply, HmmRangeFaultReply, HmmMigrateReply)):
            if not isinstance(msg, IntervalReply):
                self._free(msg.freed)
            request = self._pending.pop(msg.ref, None) or self._dropped.pop(msg.ref, None)
            if request is None:
                return []
            return self._reply(request, msg)
        if isinstance(msg, (HmmMigrated, HmmDevmemFault)):
            if msg.id in self._answered:
                self.counters["duplicates"] += 1
                return [self._answered[msg.id]]
            return [self._migrated(msg) if isinstance(msg, HmmMigrated) else self._devmem_fault(msg)]
        return super().receive(msg)

    # ---------------------------------------------------------- device memory

    def _migrated(self, msg: HmmMigrated) -> Ack:
        """``dmirror_migrate_alloc_and_copy`` + ``_finalize_and_map``: the
        pages are this device's now; map them."""
        ps = self.page_size
        table = self.pt.setdefault(msg.mm, {})
        for i, (addr, handle, writable) in enumerate(msg.pages):
            self.device_pages[handle] = bytearray(msg.data[i * ps : (i + 1) * ps])
            table[addr] = DeviceEntry(handle, bool(writable), device=True)
        self.counters["migrated_in"] += len(msg.pages)
        return self._ack(msg.id)

    def _devmem_fault(self, msg: HmmDevmemFault) -> Ack:
        """``dmirror_devmem_fault``: give the host the page's contents; the
        mirror of that address goes (the page leaves the device for it)."""
        data = self.device_pages.get(msg.handle)
        entry = self.pt.get(msg.mm, {}).get(msg.addr)
        if entry is not None and entry.device and entry.pfn == msg.handle:
            del self.pt[msg.mm][msg.addr]
        if msg.free:
            self._free([msg.handle])
        self.counters["migrated_out"] += 1
        ack = Ack(ref=msg.id, data=bytes(data) if data is not None else b"")
        self._answered[msg.id] = ack
        return ack

    def _free(self, handles: list[int]) -> None:
        """Device pages the host no longer references: gone, with their mirrors."""
        gone = {h for h in handles if self.device_pages.pop(h, None) is not None}
        if not gone:
            return
        for table in self.pt.values():
            for addr in [a for a, e in table.items() if e.device and e.pfn in gone]:
                del table[addr]

    def exclusive(self, mm: int, addr: int, npages: int) -> tuple[int, list[Output]]:
        """``HMM_DMIRROR_EXCLUSIVE``: the pages become device-exclusive for
        this node (the CPU's ptes are device-exclusive entries until a CPU
        access restores them, through an EXCLUSIVE invalidation that drops
        this mapping).  The Completion's result is ``{"mm", "addr", "cpages", "pages"}``."""
        token = self._new_token()
        if not 1 <= npages <= self.max_gup_pages:
            return token, self._complete(token, error=KernelError(Errno.EINVAL, f"npages {npages}"))
        page = addr - addr % self.page_size
        f = Fault(mm=mm, addr=page, npages=npages, write=True, context=EXCLUSIVE, token=token)
        return token, self._fault_begin(f)

    def migrate(self, mm: int, addr: int, npages: int, to_sys: bool = False) -> tuple[int, list[Output]]:
        """``HMM_DMIRROR_MIGRATE_TO_DEV`` (or ``_TO_SYS``): the anonymous
        pages of the range move into this device's memory (or back).  The
        Completion's result is ``{"mm", "addr", "cpages"}``."""
        token = self._new_token()
        if not 1 <= npages <= self.max_gup_pages:
            return token, self._complete(token, error=KernelError(Errno.EINVAL, f"npages {npages}"))
        if self.removing and not to_sys:
            return token, self._complete(token, error=KernelError(Errno.EBUSY, "the device is being removed"))
        page = addr - addr % self.page_size
        context = MIGRATE_TO_SYS if to_sys else MIGRATE_TO_DEV
        f = Fault(mm=mm, addr=page, npages=npages, write=True, context=context, token=token)
        return token, self._fault_begin(f)

    def _reply(self, request: Any, reply: Message) -> list[Output]:
        if isinstance(request, _SubscribeRequest) and isinstance(reply, IntervalReply):
            state = request.state
            assert isinstance(state, HmmMm)
            if reply.errno:
                return self._subscribed(request, Error(ref=reply.ref, code=reply.errno))
            if state.subscribe_id == request.sid:
                state.interval = reply.interval
                state.invalidate_seq = reply.seq
            return self._subscribed(request, Ok(ref=reply.ref))
        if isinstance(request, _RemoveRequest):
            state = request.state
            if isinstance(reply, Ok):
                state.subscription = Subscription.NONE
                state.interval = 0
                state.remove_id = 0
                self._zap(state.mm, 0, ADDRESS_LIMIT)
                return self._complete(request.token, {"mm": state.mm, "subscribed": False})
            err = (kernel_error(reply.code, reply.message) if isinstance(reply, Error)
                   else KernelError(Errno.EINVAL, f"unexpected {reply.TYPE} to interval_remove"))
            return self._complete(request.token, error=err)
        if isinstance(request, Fault) and isinstance(reply, HmmRangeFaultReply):
            return self._range_fault_reply(request, reply)
        if isinstance(request, Fault) and isinstance(reply, HmmMigrateReply):
            if request.fire(FaultEvent.REPLY) is FaultState.FAILED:
                return []
            if reply.errno:
                return self._fault_failed(request, kernel_error(reply.errno, "hmm migrate"))
            request.fire(FaultEvent.INSTALL)
            return self._complete(request.token, {"mm": request.mm, "addr": request.addr, "cpages": reply.cpages})
        return super()._reply(request, reply)

    # ---------------------------------------------------------------- notifier

    def invalidate_range_start(self, state: MmState, msg: InvalidateRangeStart) -> list[Output]:
        # dmirror_interval_invalidate
        assert isinstance(state, HmmMm)
        if not msg.blockable and self._mutex_held(msg.mm):
            self.counters["eagain"] += 1
            return [self._ack(msg.id, status="EAGAIN")]
        self._open_start(state, msg)
        for interval, cur_seq in msg.seqs:
            if interval == state.interval:
                state.invalidate_seq = cur_seq  # mmu_interval_set_seq
        if msg.event == "MIGRATE" and msg.owner == self.name:
            # "if (range->event == MMU_NOTIFY_MIGRATE && range->owner ==
            # dmirror->mdevice) return true;" -- dmirror keeps its mirror, the
            # kernel holds the source pages until finalize.  This host frees
            # them inside the migration, so the system-memory entries go all
            # the same; the device's own pages stay mapped (a page leaving
            # the device drops its entry in _devmem_fault).
            self.counters["migrate_own"] += 1
            self._zap(msg.mm, msg.start, msg.end, keep_device=True)
            return [self._ack(msg.id)]
        self._zap(msg.mm, msg.start, msg.end)
        return [self._ack(msg.id)]

    def invalidate_range_end(self, state: MmState, start_id: int, rng: tuple[int, int]) -> list[Output]:
        return []

    def release(self, state: MmState) -> list[Output]:
        assert isinstance(state, HmmMm)
        self._zap(state.mm, 0, ADDRESS_LIMIT)
        self.pt.pop(state.mm, None)
        state.interval = 0
        return []

    def _mutex_held(self, mm: int) -> bool:
        """dmirror's mutex is held while the device copies (a DMA in flight)."""
        return any(m == mm for m, _ in self.dma_in_flight.values())

    def _zap(self, mm: int, start: int, end: int, *, keep_device: bool = False) -> list[Output]:
        # dmirror_do_update: xa_erase of every entry in the range
        table = self.pt.get(mm)
        if not table:
            return []
        pages = pages_in(table, start, end, self.page_size)
        if keep_device:
            pages = [p for p in pages if not table[p].device]
        for page in pages:
            del table[page]
        self.counters["zapped"] += len(pages)
        return []

    # ------------------------------------------------------------------ faults

    def read_begin(self, state: MmState, f: Fault) -> int | None:
        # The host's mmu_interval_read_begin is in the reply; here: do not ask
        # while a start over the range is open (the kernel's read_begin sleeps
        # until the end), park until the end wakes the fault.
        end = f.addr + f.npages * self.page_size
        if any(s < end and f.addr < e for s, e in state.open_starts.values()):
            return None
        assert isinstance(state, HmmMm)
        return state.invalidate_seq

    def read_retry(self, state: MmState, f: Fault, start: int, end: int) -> bool:
        # mmu_interval_read_retry(notifier, seq): seq is the reply's read_begin
        assert isinstance(state, HmmMm)
        if any(s < end and start < e for s, e in state.open_starts.values()):
            return True
        return state.invalidate_seq != f.seq

    def _gup_request(self, f: Fault, state: MmState) -> Message:
        assert isinstance(state, HmmMm)
        if f.context == EXCLUSIVE:
            return HmmExclusive(id=f.request, epoch=self.epoch, mm=f.mm, interval=state.interval, addr=f.addr,
                                npages=f.npages)
        if f.context in (MIGRATE_TO_DEV, MIGRATE_TO_SYS):
            return HmmMigrate(id=f.request, epoch=self.epoch, mm=f.mm, interval=state.interval, addr=f.addr,
                              npages=f.npages, to_sys=f.context == MIGRATE_TO_SYS)
        return HmmRangeFault(id=f.request, epoch=self.epoch, mm=f.mm, interval=state.interval, addr=f.addr,
                             npages=f.npages, write=f.write, fault=f.context != SNAPSHOT)

    def _range_fault_reply(self, f: Fault, reply: HmmRangeFaultReply) -> list[Output]:
        if f.fire(FaultEvent.REPLY) is FaultState.FAILED:
            return []
        state = self._mm(f.mm)
        assert isinstance(state, HmmMm)
        if reply.errno and reply.errno != Errno.EBUSY.value:
            return self._fault_failed(f, kernel_error(reply.errno, "hmm_range_fault"))
        end = f.addr + f.npages * self.page_size
        if not reply.errno:
            f.seq = reply.seq  # the host's read_begin, for read_retry
        if f.context == SNAPSHOT:
            # dmirror_snapshot takes the pfns as they are (no retry: a snapshot
            # may be stale the moment it is read, it installs nothing)
            if reply.errno:
                return self._fault_failed(f, kernel_error(reply.errno, "hmm_range_fault"))
            f.fire(FaultEvent.INSTALL)
            self.counters["snapshots"] += 1
            shown = [{"addr": a, "pfn": pfn, "state": state_of(flags)} for a, pfn, flags in reply.pfns]
            return self._complete(f.token, {"mm": f.mm, "addr": f.addr, "pages": shown})
        if reply.errno or self.read_retry(state, f, f.addr, end):
            # dmirror_range_fault: "if (mmu_interval_read_retry(...)) { mutex_unlock; continue; }"
            f.fire(FaultEvent.STALE)
            self.counters["stale_replies"] += 1
            f.retries += 1
            if f.retries > self.max_fault_retries:
                return self._fault_failed(f, KernelError(Errno.EAGAIN, "invalidations kept racing the fault"))
            self.counters["gup_retries"] += 1
            return self._fault_begin(f)
        own = HMM_PFN_DEVICE_PRIVATE | HMM_PFN_DEVICE_OWNER

        def mappable(pfn: int, flags: int) -> bool:
            if not flags & HMM_PFN_VALID:
                return False
            if flags & HMM_PFN_DEVICE_PRIVATE:  # only our own, and only if we hold it
                return flags & own == own and pfn in self.device_pages
            return True

        usable = [(a, pfn, flags) for a, pfn, flags in reply.pfns if mappable(pfn, flags)]
        if len(usable) < len(reply.pfns):
            return self._fault_failed(f, KernelError(Errno.EFAULT, "hmm_range_fault gave a page it cannot map"))
        f.fire(FaultEvent.INSTALL)
        table = self.pt.setdefault(f.mm, {})
        installed = []
        for a, pfn, flags in usable:
            # dmirror_do_fault: xa_store of each pfn, writable if HMM_PFN_WRITE;
            # its own device pages map as themselves (dev_private_owner)
            table[a] = DeviceEntry(pfn, bool(flags & HMM_PFN_WRITE), device=bool(flags & own),
                                   exclusive=bool(flags & HMM_PFN_EXCLUSIVE))
            installed.append([a, pfn, int(bool(flags & HMM_PFN_WRITE))])
        if f.context == EXCLUSIVE:  # dmirror_exclusive: cmd->cpages = pages mapped atomically
            return self._complete(f.token, {"mm": f.mm, "addr": f.addr, "cpages": len(installed), "pages": installed})
        return self._fault_finished(f, installed, None)

    def _fault_install(self, state: MmState, f: Fault, pages: list[list[int]]) -> tuple[list[list[int]], list[Output]]:
        table = self.pt.setdefault(f.mm, {})
        for addr, pfn, writable in pages:
            table[addr] = DeviceEntry(pfn, bool(writable))
        return pages, []

    def snapshot(self, mm: int, addr: int, npages: int) -> tuple[int, list[Output]]:
        """``HMM_DMIRROR_SNAPSHOT``: the primary's state of ``npages`` pages
        from ``addr``, without faulting.  The Completion's result is
        ``{"mm", "addr", "pages": [{"addr", "pfn", "state"}]}``, each state
        one of ``protocol.hmm.STATES``."""
        token = self._new_token()
        if not 1 <= npages <= self.max_gup_pages:
            return token, self._complete(token, error=KernelError(Errno.EINVAL, f"npages {npages}"))
        page = addr - addr % self.page_size
        f = Fault(mm=mm, addr=page, npages=npages, write=False, context=SNAPSHOT, token=token)
        return token, self._fault_begin(f)

    # ---------------------------------------------------------------- accesses

    def _translate(self, mm: int, vaddr: int, write: bool) -> Translation | None:
        page = vaddr - vaddr % self.page_size
        entry = self.pt.get(mm, {}).get(page)
        if entry is None or entry.device or (write and not entry.writable):
            return None
        return Translation(mm, page, entry.pfn, entry.writable)

    def _device_copy(self, a: _Access, vaddr: int, n: int) -> bool:
        """Copy through one of this device's own pages (no DMA: the data is
        here).  False when the page is not mapped so (fault first)."""
        page = vaddr - vaddr % self.page_size
        entry = self.pt.get(a.mm, {}).get(page)
        write = a.data is not None
        if entry is None or not entry.device or (write and not entry.writable):
            return False
        mem = self.device_pages.get(entry.pfn)
        if mem is None:
            return False
        off = vaddr - page
        if a.data is None:
            a.read += mem[off : off + n]
        else:
            mem[off : off + n] = a.data[a.pos : a.pos + n]
        a.pos += n
        a.faults_here = 0
        return True

    def _access_step(self, a: _Access) -> list[Output]:
        # dmirror_read / dmirror_write: copy what is mirrored; on a miss,
        # dmirror_fault over the rest of the access (one round), then go on.
        stats = self._access_stats.setdefault(a.token, [0, 0])
        if a.pos >= a.length:
            result: dict[str, Any] = {"data": bytes(a.read)} if a.data is None else {"written": a.length}
            result.update(faults=stats[0], cpages=stats[1])
            return self._complete(a.token, result)
        ps = self.page_size
        vaddr = a.addr + a.pos
        offset = vaddr % ps
        n = min(a.length - a.pos, ps - offset)
        write = a.data is not None
        if self._device_copy(a, vaddr, n):
            stats[1] += 1
            self.counters["cpages"] += 1
            return self._access_step(a)
        t = self._translate(a.mm, vaddr, write)
        if t is None:
            if a.faults_here >= 2:
                return self._complete(a.token, error=KernelError(Errno.EFAULT, f"no translation for {vaddr:#x}"))
            a.faults_here += 1
            first = vaddr - offset
            last = (a.addr + a.length - 1) // ps * ps
            npages = min((last - first) // ps + 1, self.max_gup_pages)
            f = self._make_fault(a.mm, vaddr, npages, write)
            f.access = a
            stats[0] += 1
            self.counters["fault_rounds"] += 1
            return self._fault_begin(f)
        stats[1] += 1
        self.counters["cpages"] += 1
        dma_id = self.next_id()
        self.dma_in_flight[dma_id] = (t.mm, t.addr)
        self._pending[dma_id] = _DmaRequest(a, dma_id, n)
        self.counters["dma"] += 1
        if a.data is None:
            return [DmaRead(id=dma_id, epoch=self.epoch, mm=t.mm, addr=t.addr, pfn=t.pfn, offset=offset, length=n)]
        chunk = a.data[a.pos : a.pos + n]
        return [DmaWrite(id=dma_id, epoch=self.epoch, mm=t.mm, addr=t.addr, pfn=t.pfn, offset=offset, data=chunk)]

    def _complete(self, token: int, result: dict[str, Any] | None = None, *,
                  error: KernelError | None = None) -> list[Output]:
        self._access_stats.pop(token, None)
        return super()._complete(token, result, error=error)

    # ------------------------------------------------------------------ status

    def _drop_kind_state(self) -> None:
        # the host poisons the device pages of a fenced session (broker/devmem.py)
        self.pt.clear()
        self.device_pages.clear()
        self._access_stats.clear()

    def mapped_pages(self) -> int:
        return sum(len(table) for table in self.pt.values())

    def translations(self) -> dict[int, dict[int, int]]:
        # host frames only: a device entry's handle names this device's own memory
        out = {mm: {a: e.pfn for a, e in table.items() if not e.device} for mm, table in self.pt.items()}
        return {mm: pages for mm, pages in out.items() if pages}

    def status(self, mm: int | None = None, cursor: str | None = None, limit: int | None = None) -> dict[str, Any]:
        status = super().status(mm, cursor, limit)
        status["device_pages"] = len(self.device_pages)
        status["exclusive_pages"] = sum(1 for t in self.pt.values() for e in t.values() if e.exclusive)
        status["intervals"] = {
            str(m): {"interval": s.interval, "invalidate_seq": s.invalidate_seq}
            for m in self.shown_mms(mm)
            if isinstance(s := self._mms[m], HmmMm) and s.interval
        }
        return status


__all__ = ["Completion", "DeviceEntry", "HmmMMU", "HmmMm", "SNAPSHOT"]
