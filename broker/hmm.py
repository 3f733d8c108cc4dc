"""The host's half of the hmm kind: interval notifier insert/remove and
``hmm_range_fault`` for nodes (mm/hmm.c, mm/mmu_notifier.c).

Sans-I/O: :class:`broker.core.HostCore` hands these requests to
:func:`on_request`, which answers at once (insert, remove when no
invalidation is active) or spawns a host task (``hmm_range_fault`` takes the
lock, as the kernel's takes ``mmap_read_lock``; a deferred remove answers when
the last end of the active invalidations releases it).

``hmm_range_fault`` here, with ``fault`` (``HMM_PFN_REQ_FAULT``): every page
of the range must be had, or the whole call fails (EFAULT: no vma or
PROT_NONE; EPERM: write to a read-only vma), as ``hmm_vma_walk_hole`` /
``hmm_pte_need_fault`` do; the missing pages are faulted in (COW breaks
included: their invalidations reach the asking node too, which bumps its
interval's seq), then the ptes are read under the same lock step together
with ``read_begin`` of the interval.  Without ``fault`` (a snapshot) nothing
is faulted: each page is reported as it is (``protocol.hmm`` flags).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from protocol.hmm import (
    HMM_PFN_DEVICE_OWNER,
    HMM_PFN_DEVICE_PRIVATE,
    HMM_PFN_ERROR,
    HMM_PFN_EXCLUSIVE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    HMM_PFN_ZERO,
)
from protocol.messages import (
    Error,
    HmmEvict,
    HmmEvictReply,
    HmmExclusive,
    HmmMigrate,
    HmmMigrateReply,
    HmmRangeFault,
    HmmRangeFaultReply,
    IntervalInsert,
    IntervalRemove,
    IntervalReply,
    Message,
    Ok,
)
from protocol.types import Errno, KernelError

from .effects import Op
from .memory import ZERO_PFN
from .pagetable import PTE_DEVICE, PTE_EXCLUSIVE, PTE_PRESENT, PTE_SHIFT, PTE_WRITE, Prot
from .tasks import Locked, Task

#: Requests of the hmm kind the host answers here.
HMM_REQUESTS = (IntervalInsert, IntervalRemove, HmmRangeFault, HmmMigrate, HmmExclusive, HmmEvict)


def on_request(core: Any, session: Any, msg: Message) -> None:
    """Answer one of :data:`HMM_REQUESTS` of ``session`` (a live node session)."""
    name = session.name
    notifier = core.notifier
    if isinstance(msg, IntervalInsert):
        core._send(session.identity, _insert(core, name, msg))
        return
    if isinstance(msg, IntervalRemove):
        sub = notifier.intervals.get(msg.interval, name, msg.mm)
        if sub is None:
            core._send(session.identity, Error(ref=msg.id, code=Errno.ENOENT.value,
                                               message=f"no interval {msg.interval} of {name} on mm {msg.mm}"))
            return

        def released() -> None:
            if core._still(session):
                core._send(session.identity, Ok(ref=msg.id))

        if notifier.intervals.remove(sub, released):
            core._send(session.identity, Ok(ref=msg.id))
        else:
            core.publish("interval_remove_deferred", node=name, mm=msg.mm, interval=msg.interval)
        return
    if isinstance(msg, HmmEvict):
        # no grant check: a device always may hand back what it holds
        core._spawn(_evict_task(core, session, msg), "hmm_evict")
        return
    if isinstance(msg, HmmMigrate):
        if not core.may_reach(name, msg.mm, True):
            core._send(session.identity, Error(ref=msg.id, code=Errno.EACCES.value,
                                               message=core._refused(name, msg.mm, "hmm migrate")))
            return
        core._spawn(_migrate_task(core, session, msg), "hmm_migrate")
        return
    assert isinstance(msg, HmmRangeFault | HmmExclusive)
    write = True if isinstance(msg, HmmExclusive) else msg.write and msg.fault
    if not core.may_reach(name, msg.mm, write):
        core._send(session.identity, Error(ref=msg.id, code=Errno.EACCES.value,
                                           message=core._refused(name, msg.mm, "hmm_range_fault")))
        return
    core._spawn(_range_fault_task(core, session, msg), "hmm_range_fault")


def _insert(core: Any, name: str, msg: IntervalInsert) -> Message:
    """``mmu_interval_notifier_insert``: registers the node on the mm first
    (``__mmu_notifier_register(NULL, mm)``), so ``->release`` reaches it."""
    try:
        core.model.check_mm(msg.mm)
        if not core.may_reach(name, msg.mm):
            raise KernelError(Errno.EACCES, core._refused(name, msg.mm, "interval insert"))
        if msg.start % core.config.page_size or msg.end % core.config.page_size or msg.start >= msg.end:
            raise KernelError(Errno.EINVAL, f"interval [{msg.start:#x}, {msg.end:#x}) is not page aligned")
        core.notifier.register(name, msg.mm)
    except KernelError as exc:
        return IntervalReply(ref=msg.id, errno=exc.errno.value)
    sub = core.notifier.intervals.insert(name, msg.mm, msg.start, msg.end)
    return IntervalReply(ref=msg.id, interval=sub.id, seq=sub.invalidate_seq)


def _range_fault_task(core: Any, session: Any, msg: HmmRangeFault | HmmExclusive) -> Task[None]:
    reply = yield Locked(hmm_range_fault(core, session.name, msg))
    if core._still(session):
        core._send(session.identity, replace(reply, freed=core.model.device.take_freed(session.name)))


def _migrate_task(core: Any, session: Any, msg: HmmMigrate) -> Task[None]:
    reply = yield Locked(hmm_migrate(core, session.name, msg))
    if core._still(session):
        core._send(session.identity, replace(reply, freed=core.model.device.take_freed(session.name)))


def _evict_task(core: Any, session: Any, msg: HmmEvict) -> Task[None]:
    reply = yield Locked(hmm_evict(core, session.name, msg))
    if core._still(session):
        core._send(session.identity, replace(reply, freed=core.model.device.take_freed(session.name)))


def hmm_evict(core: Any, name: str, msg: HmmEvict) -> Op[HmmEvictReply]:
    """The device ``name`` goes away cleanly: every device page it holds
    back to system memory (:meth:`broker.devmem.DevicePrivate.evict`), under
    the lock.  What could not come back is ``lost`` (poisoned when the
    device goes, as for a dead one)."""
    moved, lost = yield from core.model.device.evict(core.model, name)
    core.publish("hmm_evict", node=name, pages=moved, lost=lost)
    return HmmEvictReply(ref=msg.id, cpages=moved, lost=lost)


def hmm_migrate(core: Any, name: str, msg: HmmMigrate) -> Op[HmmMigrateReply]:
    """``HMM_DMIRROR_MIGRATE_TO_DEV`` / ``_TO_SYS`` (broker/devmem.py), under the lock.

    Returns:
        The reply: ``cpages`` migrated, or ``errno``: ENOENT (no interval),
        EINVAL (outside it), EACCES, ESRCH, EIO (the device did not take them).
    """
    ps = core.config.page_size
    sub = core.notifier.intervals.get(msg.interval, name, msg.mm)
    end = msg.addr + msg.npages * ps

    def fail(errno: Errno) -> HmmMigrateReply:
        return HmmMigrateReply(ref=msg.id, mm=msg.mm, errno=errno.value)

    if sub is None:
        return fail(Errno.ENOENT)
    if not core.may_reach(name, msg.mm, True):
        return fail(Errno.EACCES)
    if msg.addr % ps or not 1 <= msg.npages <= core.config.limits.max_pages or not sub.start <= msg.addr < end <= sub.end:
        return fail(Errno.EINVAL)
    device = core.model.device
    try:
        if msg.to_sys:
            moved = yield from device.migrate_to_system(core.model, name, msg.mm, msg.addr, msg.npages)
        else:
            moved = yield from device.migrate_to_device(core.model, name, msg.mm, msg.addr, msg.npages)
    except KernelError as exc:
        return fail(exc.errno)
    core.publish("hmm_migrate", node=name, mm=msg.mm, addr=msg.addr, pages=moved, to="sys" if msg.to_sys else "device")
    return HmmMigrateReply(ref=msg.id, mm=msg.mm, cpages=moved)


def hmm_range_fault(core: Any, name: str, msg: HmmRangeFault | HmmExclusive) -> Op[HmmRangeFaultReply]:
    """``hmm_range_fault`` for node ``name``: an operation for the lock.

    Returns:
        The reply: ``pfns`` and the interval's ``read_begin``, or ``errno``:
        ENOENT (no such interval of the node: removed, or never inserted),
        EINVAL (the range is not inside it), EBUSY (an invalidation of it is
        still active: the node retries), EFAULT / EPERM (a page cannot be
        faulted), EACCES (the grant went meanwhile), ESRCH (no mm).
    """
    model = core.model
    intervals = core.notifier.intervals
    ps = core.config.page_size

    def fail(errno: Errno) -> HmmRangeFaultReply:
        return HmmRangeFaultReply(ref=msg.id, mm=msg.mm, seq=0, errno=errno.value)

    sub = intervals.get(msg.interval, name, msg.mm)
    if sub is None or name not in core.notifier.subscriptions.get(msg.mm, ()):
        return fail(Errno.ENOENT)
    if isinstance(msg, HmmExclusive):
        exclusive, fault, want_write = True, False, True
    else:
        exclusive, fault, want_write = False, msg.fault, msg.write
    if not core.may_reach(name, msg.mm, want_write and (fault or exclusive)):
        return fail(Errno.EACCES)
    end = msg.addr + msg.npages * ps
    if msg.addr % ps or not 1 <= msg.npages <= core.config.limits.max_pages or not sub.start <= msg.addr < end <= sub.end:
        return fail(Errno.EINVAL)
    try:
        m = model.check_mm(msg.mm)
        if exclusive:
            yield from model.device.make_exclusive(model, name, msg.mm, msg.addr, msg.npages)
        elif fault:
            for page in range(msg.addr, end, ps):
                model._vma_for(m, page, want_write, gup=True)  # fails the whole range, as hmm_vma_walk does
            for page in range(msg.addr, end, ps):
                if msg.mm not in model.mms:
                    return fail(Errno.ESRCH)
                _, _, flags = _entry(model, m, page, name)
                # hmm_pte_need_fault: a page this device holds is mapped as is
                # (dev_private_owner); any other missing or read-only page is faulted
                remote = flags & HMM_PFN_DEVICE_PRIVATE and not flags & HMM_PFN_DEVICE_OWNER
                if flags & HMM_PFN_VALID and not remote and (flags & HMM_PFN_WRITE or not want_write):
                    continue
                pages = yield from model.gup(msg.mm, page, 1, want_write)
                if not pages:
                    return fail(Errno.EFAULT)
    except KernelError as exc:
        return fail(exc.errno)
    if msg.mm not in model.mms:
        return fail(Errno.ESRCH)
    seq = intervals.read_begin(sub)
    if seq is None:
        return fail(Errno.EBUSY)
    pfns = snapshot(model, msg.mm, msg.addr, msg.npages, name)
    if (exclusive or fault) and any(not f & HMM_PFN_VALID or f & HMM_PFN_ERROR for _, _, f in pfns):
        return fail(Errno.EFAULT)
    core._hand(name, [(a, pfn, bool(f & HMM_PFN_WRITE)) for a, pfn, f in pfns
                      if f & HMM_PFN_VALID and not f & HMM_PFN_DEVICE_PRIVATE])
    return HmmRangeFaultReply(ref=msg.id, mm=msg.mm, seq=seq, pfns=[list(p) for p in pfns])


def snapshot(model: Any, mm: int, addr: int, npages: int, node: str) -> list[tuple[int, int, int]]:
    """The ptes of ``npages`` pages from ``addr`` as ``(addr, pfn, flags)``
    (``hmm_vma_handle_pte`` without faulting), as ``node`` sees them."""
    m = model.mms[mm]
    ps = model.page_size
    return [_entry(model, m, page, node) for page in range(addr, addr + npages * ps, ps)]


def _entry(model: Any, m: Any, page: int, node: str) -> tuple[int, int, int]:
    """One hmm_pfns entry.  No vma, PROT_NONE or a poisoned device page:
    ERROR; not present (none, swapped): 0; a device-private page: VALID |
    DEVICE_PRIVATE, with DEVICE_OWNER (and the handle as pfn, WRITE if only
    this pte references it in a writable vma) when ``node`` holds it."""
    vma = m.find_vma(page)
    if vma is None or vma.prot is Prot.NONE:
        return (page, 0, HMM_PFN_ERROR)
    pte = m.get(page)
    if pte & PTE_DEVICE:
        dev = model.device.owned(pte)
        if dev is None or dev.poisoned:
            return (page, 0, HMM_PFN_ERROR)
        if dev.owner != node:
            return (page, 0, HMM_PFN_VALID | HMM_PFN_DEVICE_PRIVATE)
        flags = HMM_PFN_VALID | HMM_PFN_DEVICE_PRIVATE | HMM_PFN_DEVICE_OWNER
        if dev.refs == 1 and vma.prot is Prot.RW:
            flags |= HMM_PFN_WRITE
        return (page, pte >> PTE_SHIFT, flags)
    if not pte & PTE_PRESENT:
        return (page, 0, 0)
    pfn = pte >> PTE_SHIFT
    if pte & PTE_EXCLUSIVE:
        # a device-exclusive entry: its holder maps it (atomic); for any other
        # walker it is not present (hmm_range_fault faults it: restored)
        if model.device.exclusive_owner(m.id, page, pte) == node:
            return (page, pfn, HMM_PFN_VALID | HMM_PFN_WRITE | HMM_PFN_EXCLUSIVE)
        return (page, 0, 0)
    flags = HMM_PFN_VALID
    if pfn == ZERO_PFN:
        flags |= HMM_PFN_ZERO
    elif pte & PTE_WRITE:
        flags |= HMM_PFN_WRITE
    return (page, pfn, flags)
