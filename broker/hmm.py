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

from typing import Any

from protocol.hmm import HMM_PFN_ERROR, HMM_PFN_VALID, HMM_PFN_WRITE, HMM_PFN_ZERO
from protocol.messages import (
    Error,
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
from .pagetable import PTE_PRESENT, PTE_SHIFT, PTE_WRITE, Prot
from .tasks import Locked, Task

#: Requests of the hmm kind the host answers here.
HMM_REQUESTS = (IntervalInsert, IntervalRemove, HmmRangeFault)


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
    assert isinstance(msg, HmmRangeFault)
    if not core.may_reach(name, msg.mm, msg.write and msg.fault):
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


def _range_fault_task(core: Any, session: Any, msg: HmmRangeFault) -> Task[None]:
    reply = yield Locked(hmm_range_fault(core, session.name, msg))
    if core._still(session):
        core._send(session.identity, reply)


def hmm_range_fault(core: Any, name: str, msg: HmmRangeFault) -> Op[HmmRangeFaultReply]:
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
    if not core.may_reach(name, msg.mm, msg.write and msg.fault):
        return fail(Errno.EACCES)
    end = msg.addr + msg.npages * ps
    if msg.addr % ps or not 1 <= msg.npages <= core.config.limits.max_pages or not sub.start <= msg.addr < end <= sub.end:
        return fail(Errno.EINVAL)
    try:
        m = model.check_mm(msg.mm)
        if msg.fault:
            for page in range(msg.addr, end, ps):
                model._vma_for(m, page, msg.write, gup=True)  # fails the whole range, as hmm_vma_walk does
            pages = yield from model.gup(msg.mm, msg.addr, msg.npages, msg.write)
            if len(pages) < msg.npages:
                return fail(Errno.EFAULT)
    except KernelError as exc:
        return fail(exc.errno)
    if msg.mm not in model.mms:
        return fail(Errno.ESRCH)
    seq = intervals.read_begin(sub)
    if seq is None:
        return fail(Errno.EBUSY)
    pfns = snapshot(model, msg.mm, msg.addr, msg.npages)
    core._hand(name, [(a, pfn, bool(f & HMM_PFN_WRITE)) for a, pfn, f in pfns if f & HMM_PFN_VALID])
    return HmmRangeFaultReply(ref=msg.id, mm=msg.mm, seq=seq, pfns=[list(p) for p in pfns])


def snapshot(model: Any, mm: int, addr: int, npages: int) -> list[tuple[int, int, int]]:
    """The ptes of ``npages`` pages from ``addr`` as ``(addr, pfn, flags)``
    (``hmm_vma_handle_pte`` without faulting).  No vma or PROT_NONE: ERROR;
    not present (none, swapped): 0."""
    m = model.mms[mm]
    ps = model.page_size
    out = []
    for page in range(addr, addr + npages * ps, ps):
        vma = m.find_vma(page)
        if vma is None or vma.prot is Prot.NONE:
            out.append((page, 0, HMM_PFN_ERROR))
            continue
        pte = m.get(page)
        if not pte & PTE_PRESENT:
            out.append((page, 0, 0))
            continue
        pfn = pte >> PTE_SHIFT
        flags = HMM_PFN_VALID
        if pfn == ZERO_PFN:
            flags |= HMM_PFN_ZERO
        elif pte & PTE_WRITE:
            flags |= HMM_PFN_WRITE
        out.append((page, pfn, flags))
    return out
