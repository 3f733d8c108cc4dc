"""The primary MMU model, operation by operation, with exact values and errors.

Most tests run the model with no node at all (``run_op``); the ones about
notifier traffic subscribe recording nodes and answer every delivery with an
ok ack, keeping the messages for inspection.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.effects import Deliver, Outcomes, run_sync
from broker.memory import PG_KSM, ZERO_PFN
from broker.mm import Model, run_op
from broker.pagetable import CHUNK_PAGES, MMAP_BASE, Mm
from protocol.messages import Ack, ChangePte, ClearFlushYoung, InvalidateRangeEnd, InvalidateRangeStart, Release
from protocol.types import Errno, KernelError

PS = 4096
ALL_OPS = ["invalidate_range_start", "invalidate_range_end", "change_pte", "clear_flush_young", "release"]


class Recorder:
    """Nodes that ack everything ok and remember what they got, in order."""

    def __init__(self, model: Model, young: bool = False) -> None:
        self.model = model
        self.log: list[tuple[str, Any]] = []
        self.young = young

    def __call__(self, effect: Deliver) -> Outcomes:
        out: Outcomes = {}
        for node, msg in effect.sends:
            self.log.append((node, msg))
            out[node] = Ack(ref=msg.id, status="ok", young=self.young) if effect.expect_ack else None
        return out

    def run(self, op: Any) -> Any:
        return run_sync(op, self)

    def types(self, node: str | None = None) -> list[str]:
        return [type(m).__name__ for n, m in self.log if node is None or n == node]


def model(frames: int = 64, **kw: Any) -> Model:
    return Model(frames=frames, page_size=PS, swap_slots=kw.pop("swap_slots", 64), **kw)


def page(fill: bytes) -> bytes:
    return (fill * (PS // len(fill) + 1))[:PS]


def subscribed(m: Model, mm: int, name: str = "kvm", ops: list[str] = ALL_OPS, sleepable: bool = False) -> None:
    m.notifier.add_node(name, ops, sleepable)
    m.notifier.register(name, mm)


# -- mmap and host accesses --------------------------------------------------------------


def test_mmap_places_mappings_apart_and_validates() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 2))
    b = run_op(m.mmap(mm, 1, "r"))
    assert a == MMAP_BASE and b == a + 3 * PS  # a guard page between
    assert [(v.start, v.end, v.prot) for v in m.mms[mm].vmas] == [(a, a + 2 * PS, "rw"), (b, b + PS, "r")]
    for bad, errno in [((mm, 0), Errno.EINVAL), ((mm, 1, "rwx"), Errno.EINVAL), ((99, 1), Errno.ESRCH)]:
        with pytest.raises(KernelError) as err:
            run_op(m.mmap(*bad))
        assert err.value.errno is errno
    assert len(m.mms[mm].vmas) == 2  # the refused ones changed nothing
    # MADV_MERGEABLE of a shared mapping is ignored, not refused (ksm_madvise)
    c = run_op(m.mmap(mm, 2, shared=True, mergeable=True))
    assert not m.mms[mm].find_vma(c).mergeable
    run_op(m.madvise(mm, c, PS, "mergeable"))
    assert len(m.mms[mm].vmas) == 3 and not m.mms[mm].find_vma(c).mergeable


def test_read_maps_the_zero_page_and_write_allocates() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 2))
    assert run_op(m.read(mm, a + 10, 4)) == b"\0" * 4
    assert m.pte(mm, a) == (ZERO_PFN, False, False, False)
    assert m.memory.in_use == 0
    assert run_op(m.write(mm, a + PS - 2, b"abcd")) == 4  # spans two pages
    assert run_op(m.read(mm, a + PS - 2, 4)) == b"abcd"
    p0, p1 = m.pte(mm, a)[0], m.pte(mm, a + PS)[0]
    assert ZERO_PFN not in (p0, p1) and p0 != p1
    assert m.memory.in_use == 2 and m.memory.mapcount[p0] == 1 and m.memory.refcount[p0] == 1
    m.check_invariants()


@pytest.mark.parametrize(
    ("prot", "write", "errno"),
    [("none", False, Errno.EFAULT), ("none", True, Errno.EFAULT), ("r", True, Errno.EFAULT)],
)
def test_host_access_faults_like_sigsegv(prot: str, write: bool, errno: Errno) -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 1, prot))
    with pytest.raises(KernelError) as err:
        run_op(m.write(mm, a, b"x") if write else m.read(mm, a, 1))
    assert err.value.errno is errno
    with pytest.raises(KernelError) as err:
        run_op(m.read(mm, a + 5 * PS, 1))  # no vma at all
    assert err.value.errno is Errno.EFAULT
    assert m.memory.in_use == 0


def test_a_write_across_an_unmapped_page_writes_nothing() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 1))
    with pytest.raises(KernelError):
        run_op(m.write(mm, a + PS - 2, b"abcd"))  # the second page is the guard gap
    assert m.memory.in_use == 0 and m.pte(mm, a) is None


# -- munmap, madvise, mprotect ---------------------------------------------------------------


def test_munmap_sends_one_unmap_over_the_range_and_frees() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 4))
    run_op(m.write(mm, a, page(b"1")))
    run_op(m.write(mm, a + 2 * PS, page(b"3")))
    subscribed(m, mm)
    assert m.gup_fast(mm, a, 1, False, node="kvm") is not None
    r = Recorder(m)
    r.run(m.munmap(mm, a + PS, 3 * PS))  # the served page 0 is outside: nobody hears
    assert r.log == []
    r.run(m.munmap(mm, a, PS))
    start, end = (msg for _, msg in r.log)
    assert isinstance(start, InvalidateRangeStart) and (start.start, start.end, start.event) == (a, a + PS, "UNMAP")
    assert isinstance(end, InvalidateRangeEnd) and end.start_id == start.id
    assert m.memory.in_use == 0 and m.mms[mm].vmas == [] and m.mms[mm].pgd == {}
    run_op(m.munmap(mm, a, 64 * PS))  # nothing mapped: fine
    for args in [(a + 1, PS), (a, 0)]:
        with pytest.raises(KernelError) as err:
            run_op(m.munmap(mm, *args))
        assert err.value.errno is Errno.EINVAL
    m.check_invariants()


def test_munmap_in_the_middle_splits_the_vma() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 3))
    run_op(m.write(mm, a, page(b"a") * 3))
    run_op(m.munmap(mm, a + PS, PS))
    assert [(v.start, v.end) for v in m.mms[mm].vmas] == [(a, a + PS), (a + 2 * PS, a + 3 * PS)]
    assert run_op(m.read(mm, a + 2 * PS, 1)) == b"a"
    assert m.memory.in_use == 2
    m.check_invariants()


def test_dontneed_zeroes_keeps_the_vma_and_reports_holes_after_applying() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 2))
    run_op(m.write(mm, a, page(b"x") * 2))
    with pytest.raises(KernelError) as err:
        run_op(m.madvise(mm, a + PS, 3 * PS, "dontneed"))  # runs into the gap
    assert err.value.errno is Errno.ENOMEM
    assert run_op(m.read(mm, a + PS, 2)) == b"\0\0"  # zapped anyway, as the kernel does
    assert run_op(m.read(mm, a, 2)) == b"xx"
    with pytest.raises(KernelError) as err:
        run_op(m.madvise(mm, a, PS, "willneed-ish"))
    assert err.value.errno is Errno.EINVAL
    m.check_invariants()


def test_non_blockable_dontneed_refused_by_a_sleepable_node_changes_nothing() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 1))
    run_op(m.write(mm, a, b"keep"))
    subscribed(m, mm, "xpmem", sleepable=True)
    m.gup_fast(mm, a, 1, False, node="xpmem")

    def refuse(effect: Deliver) -> Outcomes:
        return {n: Ack(ref=msg.id, status="EAGAIN") if effect.expect_ack else None for n, msg in effect.sends}

    with pytest.raises(KernelError) as err:
        run_sync(m.madvise(mm, a, PS, "dontneed", blockable=False), refuse)
    assert err.value.errno is Errno.EAGAIN
    assert run_op(m.read(mm, a, 4)) == b"keep"


def test_mprotect_invalidates_the_populated_part_of_each_vma_it_changes() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 2))
    run_op(m.write(mm, a, page(b"p") * 2))
    subscribed(m, mm)
    m.gup_fast(mm, a, 2, True, node="kvm")
    r = Recorder(m)
    r.run(m.mprotect(mm, a, PS, "r"))
    assert r.types() == ["InvalidateRangeStart", "InvalidateRangeEnd"]
    assert r.log[0][1].event == "PROTECTION_VMA" and (r.log[0][1].start, r.log[0][1].end) == (a, a + PS)
    assert m.pte(mm, a)[1] is False and m.pte(mm, a + PS)[1] is True
    with pytest.raises(KernelError) as err:
        run_op(m.write(mm, a, b"no"))
    assert err.value.errno is Errno.EFAULT
    r.log.clear()
    # an upgrade notifies too (change_protection does not look at the direction)
    m.gup_fast(mm, a, 1, False, node="kvm")
    r.run(m.mprotect(mm, a, PS, "rw"))
    assert r.types() == ["InvalidateRangeStart", "InvalidateRangeEnd"]
    assert r.log[0][1].event == "PROTECTION_VMA" and (r.log[0][1].start, r.log[0][1].end) == (a, a + PS)
    r.log.clear()
    r.run(m.mprotect(mm, a, 2 * PS, "rw"))  # no vma changes: nothing at all
    assert r.log == []
    run_op(m.write(mm, a, b"ok"))  # reuse: the page is exclusive
    assert run_op(m.read(mm, a, 2)) == b"ok"
    r.run(m.mprotect(mm, a, 2 * PS, "none"))
    assert m.pte(mm, a) is None  # pte_protnone: not accessible
    with pytest.raises(KernelError) as err:
        run_op(m.mprotect(mm, a + 5 * PS, PS, "r"))
    assert err.value.errno is Errno.ENOMEM
    with pytest.raises(KernelError) as err:
        run_op(m.mprotect(mm, a, PS, "x"))
    assert err.value.errno is Errno.EINVAL
    m.check_invariants()


def test_mprotect_notifies_from_the_first_populated_page_table_and_skips_empty_vmas() -> None:
    m = model(frames=16)
    mm = m.spawn()
    chunk = CHUNK_PAGES * PS
    a = run_op(m.mmap(mm, 3 * CHUNK_PAGES))
    b = run_op(m.mmap(mm, 4))  # never touched: no page tables
    page_at = (a // chunk + 1) * chunk + 5 * PS  # in the vma's second pte table
    run_op(m.write(mm, page_at, b"x"))
    subscribed(m, mm)
    m.gup_fast(mm, page_at, 1, False, node="kvm")
    r = Recorder(m)
    r.run(m.mprotect(mm, a, 3 * CHUNK_PAGES * PS, "r"))
    r.run(m.mprotect(mm, b, 4 * PS, "r"))
    starts = [msg for _, msg in r.log if isinstance(msg, InvalidateRangeStart)]
    table = page_at - page_at % chunk
    assert [(s.start, s.end, s.event) for s in starts] == [(max(a, table), a + 3 * chunk, "PROTECTION_VMA")]
    assert [v.prot for v in m.mms[mm].vmas] == ["r", "r"]
    m.check_invariants()


def test_mprotect_changes_the_vmas_before_the_first_hole() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 1))
    b = run_op(m.mmap(mm, 1))
    with pytest.raises(KernelError) as err:
        run_op(m.mprotect(mm, a, b + PS - a, "r"))
    assert err.value.errno is Errno.ENOMEM
    assert [v.prot for v in m.mms[mm].vmas] == ["r", "rw"]


# -- fork and COW ------------------------------------------------------------------------------


def test_fork_makes_private_pages_cow_and_a_write_copies() -> None:
    m = model()
    parent = m.spawn()
    a = run_op(m.mmap(parent, 2))
    run_op(m.write(parent, a, page(b"P")))
    subscribed(m, parent)
    m.gup_fast(parent, a, 1, True, node="kvm")
    r = Recorder(m)
    child = r.run(m.fork(parent))
    assert r.types() == ["InvalidateRangeStart", "InvalidateRangeEnd"]
    assert r.log[0][1].event == "PROTECTION_PAGE"
    pfn = m.pte(parent, a)[0]
    assert m.pte(child, a) == (pfn, False, True, False) and m.pte(parent, a)[1] is False
    assert m.memory.mapcount[pfn] == 2 and m.memory.refcount[pfn] == 2
    assert m.pte(child, a + PS) is None  # never touched: nothing to share
    r.log.clear()
    m.gup_fast(parent, a, 1, False, node="kvm")  # kvm maps the shared page read-only
    r.run(m.write(parent, a, b"mine"))  # COW break in the parent
    assert r.types() == ["InvalidateRangeStart", "InvalidateRangeEnd"]
    new = m.pte(parent, a)[0]
    assert new != pfn and m.pte(child, a)[0] == pfn and m.memory.mapcount[pfn] == 1
    assert run_op(m.read(child, a, 4)) == b"PPPP" and run_op(m.read(parent, a, 4)) == b"mine"
    run_op(m.write(child, a, b"kid!"))  # the last mapper reuses the page: no copy
    assert m.pte(child, a)[0] == pfn
    m.check_invariants()


@pytest.mark.parametrize("wrap", [False, True])
def test_a_cow_break_notifies_as_its_era_does(wrap: bool) -> None:
    """2.6.32–3.6: ``ptep_clear_flush_notify`` (invalidate_page, here a
    one-page start+end) of the old pte, then the copy and a bare
    ``set_pte_at_notify``: the end reaches the node before the new pte
    exists.  3.7–6.9 (``wrap_change_pte``): start, copy, ``set_pte_at_notify``
    (change_pte to the node the start addressed), end after the new pte."""
    m = model(wrap_change_pte=wrap)
    parent = m.spawn()
    a = run_op(m.mmap(parent, 1))
    run_op(m.write(parent, a, page(b"E")))
    run_op(m.fork(parent))
    subscribed(m, parent)
    m.gup_fast(parent, a, 1, False, node="kvm")
    old = m.pte(parent, a)[0]
    log: list[tuple[str, int]] = []

    def deliver(effect: Deliver) -> Outcomes:
        for _, msg in effect.sends:
            log.append((type(msg).__name__, m.pte(parent, a)[0]))  # the pfn mapped when it is sent
        return {n: Ack(ref=msg.id) if effect.expect_ack else None for n, msg in effect.sends}

    run_sync(m.write(parent, a, b"w"), deliver)
    new = m.pte(parent, a)[0]
    if wrap:
        assert log == [("InvalidateRangeStart", old), ("ChangePte", old), ("InvalidateRangeEnd", new)]
    else:
        assert log == [("InvalidateRangeStart", old), ("InvalidateRangeEnd", old)]
    assert m.pending == {} and m.stale_accesses == 0
    m.check_invariants()


def test_fork_copies_a_pinned_page_for_the_child_at_once() -> None:
    m = model()
    parent = m.spawn()
    a = run_op(m.mmap(parent, 1))
    run_op(m.write(parent, a, b"pin"))
    (entry,) = m.gup_fast(parent, a, 1, True, pin=True, node="dma")
    child = run_op(m.fork(parent))
    assert m.pte(parent, a)[:2] == (entry[1], True)  # untouched, still writable
    assert m.pte(child, a)[0] != entry[1]
    run_op(m.write(parent, a, b"PIN"))
    assert run_op(m.read(child, a, 3)) == b"pin"
    assert m.memory.read(entry[1], 0, 3) == b"PIN"  # the device sees the parent's writes
    m.unpin("dma", parent, [entry[1]])
    m.check_invariants()


def test_fork_duplicates_swap_entries() -> None:
    m = model()
    parent = m.spawn()
    a = run_op(m.mmap(parent, 1))
    run_op(m.write(parent, a, b"swapme"))
    assert run_op(m.reclaim(parent, a, PS)) == 1
    child = run_op(m.fork(parent))
    assert m.swap.in_use == 1 and m.swap.swap_map[1] == 2
    assert run_op(m.read(child, a, 6)) == b"swapme" and run_op(m.read(parent, a, 6)) == b"swapme"
    assert m.swap.in_use == 0
    m.check_invariants()


def test_shared_anonymous_memory_is_shared_with_the_child() -> None:
    m = model()
    parent = m.spawn()
    a = run_op(m.mmap(parent, 1, shared=True))
    run_op(m.write(parent, a, b"both"))
    child = run_op(m.fork(parent))
    run_op(m.write(child, a, b"BOTH"))
    assert run_op(m.read(parent, a, 4)) == b"BOTH"
    pfn = m.pte(parent, a)[0]
    assert m.memory.refcount[pfn] == 3  # two ptes and the page cache
    run_op(m.exit_mm(child))
    run_op(m.munmap(parent, a, PS))
    assert m.memory.in_use == 0
    m.check_invariants()


# -- exit -------------------------------------------------------------------------------------


def test_exit_releases_first_then_frees_and_register_fails_meanwhile() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 3))
    run_op(m.write(mm, a, page(b"e") * 3))
    subscribed(m, mm)
    m.gup_fast(mm, a, 3, False, node="kvm")
    seen: list[str] = []

    def deliver(effect: Deliver) -> Outcomes:
        seen.extend(type(msg).__name__ for _, msg in effect.sends)
        with pytest.raises(KernelError) as err:
            m.notifier.register("kvm", mm)
        assert err.value.errno is Errno.EINTR
        return {n: Ack(ref=msg.id) for n, msg in effect.sends}

    run_sync(m.exit_mm(mm), deliver)
    assert seen == ["Release"]
    assert mm not in m.mms and m.memory.in_use == 0
    with pytest.raises(KernelError) as err:
        run_op(m.read(mm, a, 1))
    assert err.value.errno is Errno.ESRCH
    m.check_invariants()


# -- GUP -----------------------------------------------------------------------------------------


def test_gup_errors_as_the_kernel_returns_them() -> None:
    m = model()
    mm = m.spawn()
    ro = run_op(m.mmap(mm, 1, "r"))
    no = run_op(m.mmap(mm, 1, "none"))
    cases = [((mm, ro, 1, True), Errno.EPERM), ((mm, no, 1, False), Errno.EFAULT),
             ((mm, no + 8 * PS, 1, False), Errno.EFAULT), ((mm, ro + 1, 1, False), Errno.EINVAL),
             ((mm, ro, 0, False), Errno.EINVAL), ((42, ro, 1, False), Errno.ESRCH)]
    for args, errno in cases:
        with pytest.raises(KernelError) as err:
            run_op(m.gup(*args))
        assert err.value.errno is errno, args
    # GUP-fast leaves the vma verdict to the slow path, which runs under the
    # lock an mprotect or munmap in progress holds (the answer after it)
    assert m.gup_fast(mm, ro, 1, True) is None and m.gup_fast(mm, no, 1, False) is None
    assert m.memory.in_use == 0


def test_gup_faults_around_and_stops_at_the_end_of_the_vma() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 3))
    assert m.gup_fast(mm, a, 3, True) is None  # nothing present: the slow path
    pages = run_op(m.gup(mm, a + PS, 8, True, node="kvm"))
    assert [p[0] for p in pages] == [a + PS, a + 2 * PS] and all(p[2] for p in pages)
    assert m.gup_fast(mm, a + PS, 2, True) == pages
    reads = run_op(m.gup(mm, a, 1, False))
    assert reads == [(a, ZERO_PFN, False)]  # a read maps the zero page
    m.check_invariants()


def test_pinning_unshares_the_zero_page_and_unpin_frees() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 2))
    run_op(m.read(mm, a, 1))
    assert m.gup_fast(mm, a, 1, False, pin=True, node="x") is None  # zero page: slow path
    (entry,) = run_op(m.gup(mm, a, 1, False, pin=True, node="x"))
    pfn = entry[1]
    assert pfn != ZERO_PFN and m.memory.pincount[pfn] == 1 and m.memory.refcount[pfn] == 2
    assert m.is_pinned_by("x", mm, a, pfn) and not m.is_pinned_by("y", mm, a, pfn)
    with pytest.raises(KernelError) as err:
        m.unpin("x", mm, [pfn, pfn])  # holds one pin only: nothing happens
    assert err.value.errno is Errno.EINVAL and m.memory.pincount[pfn] == 1
    run_op(m.munmap(mm, a, PS))
    assert not m.memory.is_free(pfn)  # the pin keeps the frame
    m.unpin("x", mm, [pfn])
    assert m.memory.is_free(pfn)
    m.check_invariants()


def test_fence_drops_the_nodes_pins() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 2))
    pages = run_op(m.gup(mm, a, 2, True, pin=True, node="x"))
    run_op(m.munmap(mm, a, 2 * PS))
    assert m.memory.in_use == 2
    assert m.fence_node("x") == 2
    assert m.memory.in_use == 0 and all(m.memory.is_free(p[1]) for p in pages)
    m.check_invariants()


# -- the oracle ---------------------------------------------------------------------------------


def test_dma_through_a_stale_translation_is_refused_and_counted() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 1))
    run_op(m.write(mm, a, b"live"))
    pfn = m.pte(mm, a)[0]
    assert m.dma_read("kvm", mm, a, pfn, 0, 4) == b"live"
    m.dma_write("kvm", mm, a, pfn, 0, b"LIVE")
    assert run_op(m.read(mm, a, 4)) == b"LIVE"
    run_op(m.munmap(mm, a, PS))
    with pytest.raises(KernelError) as err:
        m.dma_read("kvm", mm, a, pfn, 0, 4)
    assert err.value.errno is Errno.ESTALE and m.stale_accesses == 1
    with pytest.raises(KernelError) as err:
        m.dma_read("kvm", mm, a, pfn, PS - 2, 4)  # outside the page: bad input, not stale
    assert err.value.errno is Errno.EINVAL and m.stale_accesses == 1


def test_dma_write_through_a_read_only_pte_is_stale() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 1))
    run_op(m.write(mm, a, b"ro"))
    run_op(m.mprotect(mm, a, PS, "r"))
    pfn = m.pte(mm, a)[0]
    with pytest.raises(KernelError) as err:
        m.dma_write("kvm", mm, a, pfn, 0, b"no")
    assert err.value.errno is Errno.ESTALE and m.stale_accesses == 1


# -- reclaim and migration -----------------------------------------------------------------------


def test_reclaim_ages_through_the_nodes_then_swaps_and_swaps_in() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 2))
    run_op(m.write(mm, a, page(b"s") * 2))
    subscribed(m, mm)
    m.gup_fast(mm, a, 2, False, node="kvm")
    young = Recorder(m, young=True)
    assert young.run(m.reclaim(mm, a, 2 * PS)) == 0  # the node says both are young
    assert young.types() == ["ClearFlushYoung", "ClearFlushYoung"]
    old = Recorder(m)
    assert old.run(m.reclaim(mm, a, 2 * PS)) == 2
    assert old.types() == ["ClearFlushYoung", "InvalidateRangeStart", "InvalidateRangeEnd"] * 2
    assert m.memory.in_use == 0 and m.swap.in_use == 2 and m.pte(mm, a) is None
    assert run_op(m.read(mm, a + PS, 2)) == b"ss"
    assert m.swap.in_use == 1 and m.memory.in_use == 1
    run_op(m.read(mm, a, 1))
    run_op(m.read(mm, a, 1))  # a hit: the pte is young now
    assert run_op(m.reclaim(mm, a, PS)) == 0
    m.check_invariants()


def test_reclaim_fails_cleanly_when_swap_is_full() -> None:
    m = model(swap_slots=2)  # slot 0 is never used
    mm = m.spawn()
    a = run_op(m.mmap(mm, 2))
    run_op(m.write(mm, a, page(b"f") * 2))
    with pytest.raises(KernelError) as err:
        run_op(m.reclaim(mm, a, 2 * PS))
    assert err.value.errno is Errno.ENOSPC
    assert run_op(m.read(mm, a, 1)) == b"f" and run_op(m.read(mm, a + PS, 1)) == b"f"
    m.check_invariants()


def test_migrate_moves_private_and_forked_pages_but_not_pinned_ones() -> None:
    """mm/migrate.c through the rmap: a page shared by fork moves with both
    mappings repointed, one start/end(CLEAR) per mapping (try_to_migrate_one);
    the pinned page gets its start too (try_to_migrate_one invalidates before
    ``folio_try_share_anon_rmap_pte`` finds the pin) and stays.  Every start
    is of origin migration."""
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 3))
    run_op(m.write(mm, a, page(b"m") * 3))
    subscribed(m, mm)
    m.gup_fast(mm, a, 3, False, node="kvm")
    pinned = run_op(m.gup(mm, a + PS, 1, True, pin=True, node="x"))[0][1]
    child = run_op(m.fork(mm))  # pages 0 and 2 shared COW with the child; the pinned page copied
    m.notifier.register("kvm", child)
    run_op(m.write(mm, a, b"m"))  # page 0 exclusive again (a copy)
    m.gup_fast(mm, a, 3, False, node="kvm")
    m.gup_fast(child, a + 2 * PS, 1, False, node="kvm")
    before = [m.pte(mm, a + i * PS)[0] for i in range(3)]
    r = Recorder(m)
    assert r.run(m.migrate(mm, a, 3 * PS)) == 2
    starts = [msg for _, msg in r.log if isinstance(msg, InvalidateRangeStart)]
    assert {s.event for s in starts} == {"CLEAR"} and {s.origin for s in starts} == {"migration"}
    assert sorted((s.mm, s.start) for s in starts) == sorted(
        [(mm, a), (mm, a + PS), (mm, a + 2 * PS), (child, a + 2 * PS)])
    assert m.counters["migrate_failed"] == 1
    after = [m.pte(mm, a + i * PS)[0] for i in range(3)]
    assert after[0] != before[0] and after[1] == pinned and after[2] != before[2]
    assert m.pte(child, a + 2 * PS)[0] == after[2] and m.memory.mapcount[after[2]] == 2
    # the old frames went back (one is reused by the second move): five frames in
    # use, the parent's three and the child's copy of page 0 and of the pinned page
    assert m.memory.in_use == 5 and run_op(m.read(mm, a, 1)) == b"m"
    assert run_op(m.read(child, a + 2 * PS, 1)) == b"m"
    m.unpin("x", mm, [pinned])
    m.check_invariants()


def test_migrate_a_ksm_page_repoints_every_mapping_and_its_stable_node() -> None:
    """tools/testing/selftests/mm/rmap.c ``migrate_ksm``: a KSM page merged
    from two mms migrates; every mapping follows, KSM keeps it merged."""
    m = model()
    one, two = m.spawn(), m.spawn()
    a = run_op(m.mmap(one, 1, mergeable=True, fill=0x4B))
    b = run_op(m.mmap(two, 1, mergeable=True, fill=0x4B))
    run_op(m.ksm.full_scan())
    run_op(m.ksm.full_scan())
    kpfn = m.pte(one, a)[0]
    assert m.pte(two, b)[0] == kpfn and m.memory.flags[kpfn] & PG_KSM
    r = Recorder(m)
    subscribed(m, two)
    m.gup_fast(two, b, 1, False, node="kvm")
    assert r.run(m.migrate(one, a, PS)) == 1
    new = m.pte(one, a)[0]
    assert new != kpfn and m.pte(two, b)[0] == new and m.memory.flags[new] & PG_KSM
    assert m.memory.is_free(kpfn) and new in m.ksm.stable
    assert [(type(msg).__name__, msg.mm) for _, msg in r.log] == [
        ("InvalidateRangeStart", two), ("InvalidateRangeEnd", two)]  # only kvm holds it, in mm two
    assert m.ksm.stats()["pages_shared"] == 1 and m.ksm.stats()["pages_sharing"] == 1
    run_op(m.write(two, b, b"x"))  # still write-protected: a COW break
    assert m.pte(two, b)[0] != new and run_op(m.read(one, a, 1)) == b"K"
    m.check_invariants()


def test_reclaim_swaps_out_a_page_shared_by_fork_from_both_mms() -> None:
    """mm/vmscan.c + mm/rmap.c ``try_to_unmap``: every mapping becomes the
    swap entry (one slot, two uses), each with its CLEAR; both swap back in."""
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 1, fill=0x46))
    child = run_op(m.fork(mm))
    subscribed(m, mm)
    m.notifier.register("kvm", child)
    m.gup_fast(mm, a, 1, False, node="kvm")
    m.gup_fast(child, a, 1, False, node="kvm")
    r = Recorder(m)
    assert r.run(m.reclaim(mm, a, PS)) == 1
    assert r.types() == ["ClearFlushYoung", "ClearFlushYoung", "InvalidateRangeStart", "InvalidateRangeStart",
                         "InvalidateRangeEnd", "InvalidateRangeEnd"]
    assert m.memory.in_use == 0 and m.swap.in_use == 1 and m.mms[child].swapped == 1
    assert run_op(m.read(child, a, 1)) == b"F" and run_op(m.read(mm, a, 1)) == b"F"
    assert m.swap.in_use == 0
    m.check_invariants()


# -- the change_pte window --------------------------------------------------------------------------


def test_set_pte_at_notify_tells_the_nodes_before_the_pte_changes_and_gup_fast_waits() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 2, mergeable=True))
    run_op(m.write(mm, a, page(b"same") * 2))
    subscribed(m, mm)
    m.gup_fast(mm, a, 2, False, node="kvm")
    old = [m.pte(mm, a)[0], m.pte(mm, a + PS)[0]]
    changes: list[tuple[int, int, bool]] = []

    def deliver(effect: Deliver) -> Outcomes:
        for _, msg in effect.sends:
            if isinstance(msg, ChangePte):
                changes.append((msg.addr, msg.pfn, msg.writable))
                assert m.gup_fast(mm, a, 2, False, node="kvm") is None  # the pte is "cleared"
                assert m.pte(mm, msg.addr)[0] == old[(msg.addr - a) // PS]  # not set yet
                # a node that already repointed reads the new page: not stale
                m.dma_read("kvm", mm, msg.addr, msg.pfn, 0, 4)
        return {n: Ack(ref=msg.id) if effect.expect_ack else None for n, msg in effect.sends}

    run_sync(m.ksm.full_scan(), deliver)
    run_sync(m.ksm.full_scan(), deliver)
    kpfn = m.pte(mm, a)[0]
    # write_protect_page of both (same pfn, read-only), then replace_page of one
    assert sorted(changes) == sorted([(a, old[0], False), (a + PS, old[1], False),
                                      (a if kpfn == old[1] else a + PS, kpfn, False)])
    assert m.stale_accesses == 0 and m.pending == {}
    m.check_invariants()


# -- page table --------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4 * CHUNK_PAGES), st.sampled_from([0, 1, 3, 0x10, 0x510])), max_size=60),
       st.integers(0, 4 * CHUNK_PAGES), st.integers(1, 4 * CHUNK_PAGES))
def test_page_table_matches_a_dict(writes: list[tuple[int, int]], lo: int, span: int) -> None:
    """Mm.set/get/populated_in against a plain dict, with populated counts and
    empty chunks freed."""
    mm = Mm(1, PS)
    shadow: dict[int, int] = {}
    for index, value in writes:
        mm.set(index * PS, value)
        if value:
            shadow[index * PS] = value
        else:
            shadow.pop(index * PS, None)
    for addr, value in shadow.items():
        assert mm.get(addr) == value
    start, end = lo * PS, (lo + span) * PS
    assert list(mm.populated_in(start, end)) == sorted((a, v) for a, v in shadow.items() if start <= a < end)
    assert sum(mm.populated.values()) == len(shadow)
    swapped = sum(1 for v in shadow.values() if v & 0x10)
    assert mm.rss() == (len(shadow) - swapped, swapped)
    assert set(mm.pgd) == {a // (PS * CHUNK_PAGES) for a in shadow}


def test_a_ksm_page_is_flagged_and_never_reused_by_a_write() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 2, mergeable=True))
    run_op(m.write(mm, a, page(b"k") * 2))
    run_op(m.ksm.full_scan())
    run_op(m.ksm.full_scan())
    kpfn = m.pte(mm, a)[0]
    assert m.pte(mm, a + PS)[0] == kpfn and m.memory.flags[kpfn] & PG_KSM
    run_op(m.munmap(mm, a + PS, PS))  # one mapping left: still KSM, still not reused
    run_op(m.write(mm, a, b"w"))
    assert m.pte(mm, a)[0] != kpfn and m.memory.is_free(kpfn)
    run_op(m.ksm.full_scan())  # the counters follow at ksmd's next visit
    assert m.ksm.stats()["pages_shared"] == 0
    m.check_invariants()


def test_release_reaches_only_subscribers() -> None:
    m = model()
    mm = m.spawn()
    subscribed(m, mm, "kvm")
    m.notifier.add_node("gru", ALL_OPS, False)
    r = Recorder(m)
    r.run(m.exit_mm(mm))
    assert [(n, type(msg)) for n, msg in r.log] == [("kvm", Release)]


def test_clear_flush_young_messages_carry_the_page() -> None:
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 1))
    run_op(m.write(mm, a, b"y"))
    subscribed(m, mm)
    m.gup_fast(mm, a, 1, False, node="kvm")
    r = Recorder(m, young=True)
    r.run(m.reclaim(mm, a, PS))
    (msg,) = [msg for _, msg in r.log]
    assert isinstance(msg, ClearFlushYoung) and (msg.start, msg.end) == (a, a + PS)


def _zap_world(freed: list[int]) -> tuple[Model, int, int, int]:
    """An mm whose range holds every kind of pte: private pages (one pinned,
    one shared with a fork child), KSM pages mapped several times, KSM zero
    pages, zero-page reads, swap entries (one shared with the child) and a
    shared anonymous mapping; a second mergeable mm keeps rmap items too."""
    m = model(frames=1024, swap_slots=64)
    m.ksm.use_zero_pages = True
    mm = m.spawn()
    a = run_op(m.mmap(mm, 3 * CHUNK_PAGES, mergeable=True))
    for i in range(0, 3 * CHUNK_PAGES, 7):
        fill = b"\0" if i % 5 == 0 else bytes([1 + i % 3]) if i % 2 else bytes([i % 251 + 1, 9])
        run_op(m.write(mm, a + i * PS, page(fill)))
    for i in range(3, 3 * CHUNK_PAGES, 50):
        run_op(m.read(mm, a + i * PS, 1))
    run_op(m.ksm.full_scan())
    run_op(m.ksm.full_scan())
    assert m.ksm.stats()["pages_sharing"] and m.ksm.ksm_zero_pages
    run_op(m.madvise(mm, a + 600 * PS, 400 * PS, "unmergeable"))
    run_op(m.reclaim(mm, a + 600 * PS, 200 * PS))
    run_op(m.reclaim(mm, a + 600 * PS, 200 * PS))  # the second look swaps the aged pages
    assert m.swap.in_use
    run_op(m.gup(mm, a + 805 * PS, 1, True, pin=True, node="x"))
    s = run_op(m.mmap(mm, 100, shared=True))
    for i in range(0, 100, 3):
        run_op(m.write(mm, s + i * PS, page(b"sh")))
    child = run_op(m.fork(mm))
    for i in range(2, 3 * CHUNK_PAGES, 4):  # the parent's own pages again, COW breaks among them
        run_op(m.write(mm, a + i * PS, page(bytes([i % 7 + 1]))))
    other = m.spawn()
    o = run_op(m.mmap(other, 64, mergeable=True))
    for i in range(64):
        run_op(m.write(other, o + i * PS, page(bytes([1 + i % 3]))))
    run_op(m.ksm.full_scan())
    m.memory.on_free = freed.append
    m.check_invariants()
    return m, mm, child, a


def _state(m: Model) -> Any:
    mem = m.memory
    return (list(mem.refcount), list(mem.mapcount), list(mem.pincount), list(mem.flags), list(mem._free_stack),
            mem.in_use, list(m.swap.swap_map), list(m.swap._free_stack), m.ksm.stats(), sorted(m.ksm.rmap),
            {k: sorted(v.items) for k, v in m.ksm.stable.items()},
            {mm: (dict(x.populated), x.swapped, [(v.start, v.end) for v in x.vmas]) for mm, x in m.mms.items()})


@pytest.mark.parametrize("op", ["munmap_part", "munmap_all", "dontneed", "exit"])
def test_a_batched_zap_leaves_exactly_what_zapping_pte_by_pte_leaves(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import broker.mm

    results = []
    for batch_min in (1 << 30, 0):  # pte by pte, then always batched
        monkeypatch.setattr(broker.mm, "ZAP_BATCH_MIN", batch_min)
        freed: list[int] = []
        m, mm, child, a = _zap_world(freed)
        if op == "munmap_part":  # starts and ends inside chunks
            run_op(m.munmap(mm, a + 5 * PS, (3 * CHUNK_PAGES - 300) * PS))
        elif op == "munmap_all":
            run_op(m.munmap(mm, MMAP_BASE, 1 << 30))
        elif op == "dontneed":
            run_op(m.madvise(mm, a + 100 * PS, 1200 * PS, "dontneed"))
        else:
            run_op(m.exit_mm(mm))
            run_op(m.exit_mm(child))
        m.check_invariants()
        results.append((_state(m), freed))
        m.close()
    assert results[0] == results[1]
    assert results[0][1]  # frames were freed, and on_free heard of each in the same order


def test_unmap_and_put_drops_one_mapping_per_entry_and_frees_at_the_last() -> None:
    import numpy as np

    from broker.memory import PhysicalMemory

    mem = PhysicalMemory(8, PS)
    pfns = [mem.alloc() for _ in range(4)]  # 1, 2, 3, 4
    for pfn in pfns:
        mem.mapcount[pfn] = 1
    mem.mapcount[2] = 3  # mapped three times, one more reference held elsewhere
    mem.refcount[2] = 4
    mem.mapcount[3] = 2
    mem.refcount[3] = 2
    freed: list[int] = []
    mem.on_free = freed.append
    assert mem.unmap_and_put(np.array([3, 1, 2, 2, 3, 4, 2], dtype=np.uint64)) == [1, 3, 4]
    assert freed == [1, 3, 4] and list(mem._free_stack) == [1, 3, 4] and mem.in_use == 1
    assert (mem.refcount[2], mem.mapcount[2]) == (1, 0)
    mem.pincount[2] = 1
    mem.mapcount[2] = 1
    with pytest.raises(AssertionError, match="pinned"):
        mem.unmap_and_put(np.array([2], dtype=np.uint64))
    assert (mem.refcount[2], mem.mapcount[2]) == (1, 1)  # refused whole: nothing changed
    with pytest.raises(AssertionError, match="frame 1"):
        mem.unmap_and_put(np.array([1], dtype=np.uint64))


@pytest.mark.parametrize("shared", [False, True])
def test_a_failed_mmap_fill_leaves_nothing_behind(shared: bool) -> None:
    m = model(frames=64)
    mm = m.spawn()
    keep = run_op(m.mmap(mm, 2, fill=1))
    rec = Recorder(m)
    subscribed(m, mm)
    m.memory.fail_allocs_after(5)
    with pytest.raises(KernelError) as err:
        rec.run(m.mmap(mm, 16, shared=shared, fill=7))
    assert err.value.errno == Errno.ENOMEM
    assert [(v.start, v.end) for v in m.mms[mm].vmas] == [(keep, keep + 2 * PS)]  # the new mapping is gone
    assert m.memory.in_use == 2 and m.mms[mm].rss() == (2, 0)  # and every frame its fill took
    assert rec.types() == []  # no node had served a page of it: nothing to tell
    m.check_invariants()
    m.memory.fail_allocs_after(None)
    addr = run_op(m.mmap(mm, 16, shared=shared, fill=7))  # the frames are there for the next one
    assert run_op(m.read(mm, addr + 15 * PS, 2)) == b"\x07\x07" and m.memory.in_use == 18
    with pytest.raises(KernelError) as err:
        run_op(m.mmap(mm, 4, "r", fill=1))
    assert err.value.errno == Errno.EFAULT and len(m.mms[mm].vmas) == 2
    m.check_invariants()


# -- idle page tracking ----------------------------------------------------------------------------


def test_idle_page_tracking_marks_then_reads_back_what_was_touched() -> None:
    """mm/page_idle.c: marking clears every mapping's young bit (the pte's and
    the nodes' ``clear_young``) and sets PG_idle; an access since, on the host
    or through a node, clears it on the next read; reclaim still counts it."""
    m = model()
    mm = m.spawn()
    a = run_op(m.mmap(mm, 4, fill=0x49))
    run_op(m.read(mm, a + 3 * PS, 1))  # page 3 only read: still the written page
    subscribed(m, mm, ops=ALL_OPS + ["clear_young"])
    m.gup_fast(mm, a, 4, False, node="kvm")
    r = Recorder(m)
    marked = r.run(m.page_idle(mm, a, 4 * PS, True))
    assert [(p, idle) for p, _pfn, idle in marked] == [(a + i * PS, True) for i in range(4)]
    assert r.types() == ["ClearYoung"] * 4
    assert all(m.pte(mm, a + i * PS)[3] is False for i in range(4))  # every pte old now
    run_op(m.read(mm, a + PS, 1))  # the host touches page 1
    young = Recorder(m, young=True)  # the node saw every page accessed
    r.log.clear()
    back = r.run(m.page_idle(mm, a, 2 * PS, False))
    assert [idle for _, _, idle in back] == [True, False]
    back = young.run(m.page_idle(mm, a + 2 * PS, 2 * PS, False))
    assert [idle for _, _, idle in back] == [False, False]
    assert run_op(m.reclaim(mm, a + PS, PS)) == 0  # PG_young: folio_referenced counts the access
    with pytest.raises(KernelError) as err:
        run_op(m.page_idle(mm, a, 5000 * PS, False))
    assert err.value.errno is Errno.EINVAL
    m.check_invariants()
