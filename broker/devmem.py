"""Device-private memory on the host: ``ZONE_DEVICE`` pages of hmm nodes.

Modelled on mm/migrate_device.c (``migrate_vma_setup/pages/finalize``),
include/linux/memremap.h (``dev_pagemap_ops.migrate_to_ram``) and
lib/test_hmm.c (``dmirror_migrate_to_device``, ``dmirror_devmem_fault``,
``dmirror_migrate_to_system``).  Sans-I/O: the operations are generators of
the primary MMU (:mod:`broker.mm`), driven under the host's lock.

A device page is a *handle*: the host keeps who owns it (the hmm node
holding its contents) and how many ptes reference it (fork shares it, as
``copy_nonpresent_pte`` does); the contents live only on the device.  A pte
referencing it is ``PTE_DEVICE | handle << PTE_SHIFT`` (not present).  Its
life::

    migrate to device   MIGRATE(owner) start/end; inside: contents read, the
                        device stores them (HmmMigrated, acked), the pte becomes
                        a device entry, the frame is freed
    CPU access, another
    node's fault,
    migrate --to sys    MIGRATE(owner) of the page; inside: a fresh frame, the
                        device answers HmmDevmemFault with the contents (Ack.data),
                        the pte maps the frame; the last reference frees the
                        device page (``free``)
    munmap, exit        the reference goes; the last one frees the device page
                        (the device learns it with its next reply, ``freed``)

A device that goes away cleanly (SIGTERM, ``mmn down``) hands its pages back
first, as the kernel requires of a driver (lib/test_hmm.c ``dmirror_fops_release``
-> ``dmirror_device_evict_chunk`` -> mm/migrate_device.c ``migrate_device_range``):
``hmm_evict`` brings each of them back (:meth:`DevicePrivate.evict`), bounded by
the node's deadline.  A device that dies or is fenced holding device pages (a
crashed process cannot hand anything back), or whose eviction ran out of time: the
host cannot get the contents back, so those pages are **poisoned**: the ptes
stay device entries, every access to them -- a host CPU read or write, any
node's fault or hmm_range_fault -- fails with EIO (the SIGBUS of a
hardware-poisoned page), a snapshot reports them as ``error``, and
``poisoned_pages`` counts them in status.  Nothing stale is ever served: the
only copy is gone, and the loss is reported.  A HmmDevmemFault that gets no
contents back (the device fenced while answering, or a short answer) poisons
the page the same way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from protocol.messages import Ack, HmmDevmemFault, HmmMigrated
from protocol.types import ADDRESS_LIMIT, Errno, KernelError, NotifyEvent, Range

from .effects import Deliver, Op, Outcomes
from .memory import PG_ANON, PG_ANON_EXCLUSIVE, PG_KSM, ZERO_PFN
from .pagetable import PTE_DEVICE, PTE_EXCLUSIVE, PTE_PRESENT, PTE_SHIFT, Mm, Prot, present_pte


@dataclass(eq=False, slots=True)
class DevicePage:
    """One device-private page: its owner (the hmm node) and its references."""

    owner: str
    refs: int = 1
    poisoned: bool = False


@dataclass(eq=False, slots=True)
class DevicePrivate:
    """Every device-private page of the host.  ``freed``: per owner, the
    handles whose last reference went without the device being asked (it
    drops them when told, piggybacked on its next reply)."""

    pages: dict[int, DevicePage] = field(default_factory=dict)
    freed: dict[str, list[int]] = field(default_factory=dict)
    #: (mm, page) -> the node holding a device-exclusive entry there
    exclusive: dict[tuple[int, int], str] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: {
        "migrated_to_device": 0, "migrated_to_ram": 0, "poisoned_pages": 0, "poisoned_accesses": 0,
        "made_exclusive": 0, "exclusive_restored": 0})
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def alloc(self, owner: str) -> int:
        handle = next(self._ids)
        self.pages[handle] = DevicePage(owner)
        return handle

    def get(self, handle: int) -> None:
        self.pages[handle].refs += 1

    def put(self, handle: int, *, told: bool = False) -> None:
        """A reference goes; the last frees the page (``told``: the device
        already dropped it, e.g. it answered a ``free`` devmem fault)."""
        page = self.pages.get(handle)
        if page is None:
            return
        page.refs -= 1
        if page.refs <= 0:
            del self.pages[handle]
            if not told and not page.poisoned:
                self.freed.setdefault(page.owner, []).append(handle)

    def take_freed(self, owner: str) -> list[int]:
        return self.freed.pop(owner, [])

    def poison_owner(self, owner: str) -> int:
        """The device is gone (fenced, dead): its pages' contents with it."""
        lost = 0
        for page in self.pages.values():
            if page.owner == owner and not page.poisoned:
                page.poisoned = True
                lost += 1
        self.counters["poisoned_pages"] += lost
        self.freed.pop(owner, None)
        return lost

    def poison(self, handle: int) -> None:
        page = self.pages.get(handle)
        if page is not None and not page.poisoned:
            page.poisoned = True
            self.counters["poisoned_pages"] += 1

    def owned(self, pte: int) -> DevicePage | None:
        """The device page a device pte references (None: not one)."""
        if not pte & PTE_DEVICE:
            return None
        return self.pages.get(pte >> PTE_SHIFT)

    def check(self, pte: int) -> DevicePage:
        """The live device page of ``pte``.

        Raises:
            KernelError(EIO): poisoned (its device went with its contents).
        """
        page = self.pages.get(pte >> PTE_SHIFT)
        if page is None or page.poisoned:
            self.counters["poisoned_accesses"] += 1
            raise KernelError(Errno.EIO, "device-private page lost with its device (poisoned)")
        return page

    # -- migrate_to_ram ----------------------------------------------------------

    def migrate_to_ram(self, model: Any, m: Mm, page: int) -> Op[None]:
        """``dmirror_devmem_fault``: bring the device page at ``page`` back
        to a fresh frame (writable when this pte was its only reference and
        the vma is writable; read-only while fork shares it).  MIGRATE with the device as owner: its own notifier skips
        what it does not hold.

        Raises:
            KernelError: EIO (poisoned, or the device gave no contents:
                poisoned now), ENOMEM (no frame; nothing changed).
        """
        pte = m.get(page)
        dev = self.check(pte)
        handle = pte >> PTE_SHIFT
        ps = model.page_size
        rng = Range(m.id, page, page + ps, NotifyEvent.MIGRATE, owner=dev.owner)

        def body(_inv: Any) -> Op[None]:
            if m.get(page) != pte:
                return  # changed while the start was acknowledged
            mem = model.memory
            pfn = mem.alloc(zero=False)  # before the device drops its copy
            msg = HmmDevmemFault(id=next(model.notifier._ids), mm=m.id, addr=page, handle=handle,
                                 free=dev.refs == 1)
            try:
                outcomes: Outcomes = yield Deliver(((dev.owner, msg),))
            except BaseException:
                mem.put_page(pfn)
                raise
            ack = outcomes.get(dev.owner)
            if not isinstance(ack, Ack) or len(ack.data) != ps:
                mem.put_page(pfn)
                self.poison(handle)
                self.counters["poisoned_accesses"] += 1
                raise KernelError(Errno.EIO, f"device {dev.owner} gave no contents for {page:#x}: poisoned")
            mem.write(pfn, 0, ack.data)
            mem.flags[pfn] = PG_ANON | PG_ANON_EXCLUSIVE
            mem.mapcount[pfn] = 1
            # remove_migration_ptes: writable again if nothing else shares it
            vma = m.find_vma(page)
            writable = dev.refs == 1 and vma is not None and vma.prot is Prot.RW and not vma.shared
            m.set(page, present_pte(pfn, writable, True))
            self.put(handle, told=msg.free)
            self.counters["migrated_to_ram"] += 1

        yield from model.notifier.invalidate_range(rng, body)

    # -- a device going away cleanly ------------------------------------------------

    def evict(self, model: Any, owner: str) -> Op[tuple[int, int]]:
        """``dmirror_device_evict_chunk``: every device page of ``owner``,
        wherever it is mapped (fork shares them), back to system memory:
        ``migrate_to_ram`` of each pte referencing one (the last reference
        frees the device page).  The kernel's ``migrate_device_range`` walks
        the device's pfns and raises CLEAR through ``try_to_migrate``; here
        each page is one MIGRATE(owner) invalidation, as a devmem fault, with
        the same outcome: fresh frames holding the device's contents.

        Returns:
            ``(moved, lost)``: ptes brought back, and pages of ``owner`` left
            behind (no frame, or no contents: those are poisoned, or will be
            when the device goes).
        """
        moved = 0
        for m in list(model.mms.values()):
            targets = [page for page, pte in m.populated_in(0, ADDRESS_LIMIT)
                       if (dev := self.owned(pte)) is not None and dev.owner == owner and not dev.poisoned]
            for page in targets:
                if model.mms.get(m.id) is not m:
                    break  # the mm exited meanwhile
                dev = self.owned(m.get(page))
                if dev is None or dev.owner != owner or dev.poisoned:
                    continue  # gone or moved since (another fault brought it back)
                try:
                    yield from self.migrate_to_ram(model, m, page)
                except KernelError:
                    continue  # EIO: poisoned now; ENOMEM: left, poisoned when the device goes
                moved += 1
        lost = sum(1 for page in self.pages.values() if page.owner == owner)
        return moved, lost

    # -- migrate to the device ------------------------------------------------------

    def migratable(self, model: Any, m: Mm, page: int) -> bool:
        """``migrate_vma_collect_pmd``: an anonymous private page only this
        pte maps (none and the zero page too: the device gets zeros); not
        swapped, shared, KSM, pinned or already on a device."""
        vma = m.find_vma(page)
        if vma is None or vma.shmem is not None or vma.shared or vma.prot is Prot.NONE:
            return False
        pte = m.get(page)
        if not pte:
            return True
        if not pte & PTE_PRESENT or pte & PTE_EXCLUSIVE:  # a device-exclusive entry is not present
            return False
        pfn = pte >> PTE_SHIFT
        if pfn == ZERO_PFN:
            return True
        mem = model.memory
        return (mem.mapcount[pfn] == 1 and not mem.flags[pfn] & PG_KSM and not mem.pincount[pfn]
                and (m.id, page) not in model.pending)

    def migrate_to_device(self, model: Any, owner: str, mm: int, addr: int, npages: int) -> Op[int]:
        """``dmirror_migrate_to_device``: the migratable pages of the range
        move to ``owner``'s memory.  Inside one MIGRATE(owner) start/end: the
        contents are read, the device stores them (``HmmMigrated``, acked:
        only then are the ptes switched and the frames freed), and the ptes
        become device entries.  A device that does not ack keeps nothing:
        the pages stay in system memory.

        Returns:
            Pages migrated (``cpages``).
        """
        m = model.check_mm(mm)
        ps = model.page_size
        end = addr + npages * ps
        if not any(self.migratable(model, m, p) for p in range(addr, end, ps)):
            return 0
        rng = Range(mm, addr, end, NotifyEvent.MIGRATE, owner=owner)

        def body(_inv: Any) -> Op[int]:
            mem = model.memory
            chosen = [p for p in range(addr, end, ps) if self.migratable(model, m, p)]
            if not chosen:
                return 0
            data = bytearray()
            pages = []
            handles = []
            for page in chosen:
                pte = m.get(page)
                pfn = pte >> PTE_SHIFT if pte & PTE_PRESENT else ZERO_PFN
                data += mem.read(pfn, 0, ps) if pfn != ZERO_PFN else bytes(ps)
                handle = self.alloc(owner)
                handles.append(handle)
                vma = m.find_vma(page)
                writable = vma is not None and vma.prot is Prot.RW
                pages.append([page, handle, int(writable)])
            msg = HmmMigrated(id=next(model.notifier._ids), mm=mm, pages=pages, data=bytes(data))
            try:
                outcomes: Outcomes = yield Deliver(((owner, msg),))
            except BaseException:
                for handle in handles:
                    del self.pages[handle]
                raise
            if not isinstance(outcomes.get(owner), Ack):
                for handle in handles:  # the device went: nothing moved
                    del self.pages[handle]
                raise KernelError(Errno.EIO, f"device {owner} did not take the pages")
            for page, handle in zip(chosen, handles, strict=True):
                pte = m.get(page)
                if pte & PTE_PRESENT:
                    pfn = pte >> PTE_SHIFT
                    if pfn != ZERO_PFN:
                        mem.mapcount[pfn] -= 1
                        model.put_page(pfn)
                m.set(page, PTE_DEVICE | (handle << PTE_SHIFT))
            self.counters["migrated_to_device"] += len(chosen)
            return len(chosen)

        return (yield from model.notifier.invalidate_range(rng, body))

    def migrate_to_system(self, model: Any, owner: str, mm: int, addr: int, npages: int) -> Op[int]:
        """``dmirror_migrate_to_system``: ``owner``'s device pages of the
        range come back (``migrate_to_ram`` each).  Returns: pages moved."""
        m = model.check_mm(mm)
        ps = model.page_size
        moved = 0
        for page in range(addr, addr + npages * ps, ps):
            dev = self.owned(m.get(page))
            if dev is not None and dev.owner == owner and not dev.poisoned:
                yield from self.migrate_to_ram(model, m, page)
                moved += 1
        return moved

    # -- device-exclusive entries (make_device_exclusive, mm/rmap.c) -----------------

    def exclusive_owner(self, mm: int, page: int, pte: int) -> str | None:
        return self.exclusive.get((mm, page)) if pte & PTE_EXCLUSIVE else None

    def make_exclusive(self, model: Any, owner: str, mm: int, addr: int, npages: int) -> Op[int]:
        """``make_device_exclusive``: fault each page in for write (FOLL_WRITE),
        then EXCLUSIVE(owner) start/end, inside which the pte becomes a
        device-exclusive entry (the frame stays; the CPU may not use it).

        Returns:
            Pages made exclusive.
        Raises:
            KernelError: what the write fault raises (EFAULT, EPERM, ENOMEM).
        """
        m = model.check_mm(mm)
        ps = model.page_size
        done = 0
        for page in range(addr, addr + npages * ps, ps):
            model._vma_for(m, page, True, gup=True)
            vma = m.find_vma(page)
            if vma is None or vma.shared or vma.shmem is not None:
                raise KernelError(Errno.EINVAL, f"{page:#x}: device-exclusive entries are for private anonymous memory")
            pages = yield from model.gup(mm, page, 1, True)
            if not pages or mm not in model.mms:
                break
            rng = Range(mm, page, page + ps, NotifyEvent.EXCLUSIVE, owner=owner)

            def body(_inv: Any, page: int = page) -> None:
                pte = m.get(page)
                if pte & PTE_PRESENT and pte >> PTE_SHIFT != ZERO_PFN:
                    m.set(page, pte | PTE_EXCLUSIVE)
                    self.exclusive[(mm, page)] = owner

            yield from model.notifier.invalidate_range(rng, body)
            done += 1
        self.counters["made_exclusive"] += done
        return done

    def restore_exclusive(self, model: Any, m: Mm, page: int) -> Op[None]:
        """``remove_device_exclusive_entry``: a CPU access (or another
        node's GUP) takes the page back: EXCLUSIVE invalidation (the device
        drops its mapping), then the pte is an ordinary one again."""
        owner = self.exclusive.pop((m.id, page), "")
        rng = Range(m.id, page, page + model.page_size, NotifyEvent.EXCLUSIVE, owner=owner)

        def body(_inv: Any) -> None:
            m.set(page, m.get(page) & ~PTE_EXCLUSIVE)

        yield from model.notifier.invalidate_range(rng, body)
        self.counters["exclusive_restored"] += 1

    def describe(self) -> dict[str, Any]:
        owners: dict[str, int] = {}
        for page in self.pages.values():
            owners[page.owner] = owners.get(page.owner, 0) + 1
        return {"pages": len(self.pages), "by_owner": owners, **self.counters}
