"""KSM (broker/ksm.py) with exact counters, as /sys/kernel/mm/ksm would show them."""

from __future__ import annotations

import pytest

from broker.effects import Deliver, Outcomes, run_sync
from broker.memory import PG_KSM, ZERO_PFN
from broker.mm import Model, run_op
from protocol.messages import Ack, ChangePte
from protocol.types import Errno, KernelError

PS = 4096


def page(fill: bytes) -> bytes:
    return (fill * (PS // len(fill) + 1))[:PS]


def setup(npages: int, fills: list[bytes], **kw: object) -> tuple[Model, int, int]:
    m = Model(frames=kw.pop("frames", 128), page_size=PS, swap_slots=16)  # type: ignore[arg-type]
    mm = m.spawn()
    a = run_op(m.mmap(mm, npages, mergeable=True))
    for i, fill in enumerate(fills):
        run_op(m.write(mm, a + i * PS, page(fill)))
    return m, mm, a


def counters(m: Model) -> tuple[int, int, int, int]:
    s = m.ksm.stats()
    return s["pages_shared"], s["pages_sharing"], s["pages_unshared"], s["pages_volatile"]


def test_ten_identical_pages_give_one_shared_and_nine_sharing() -> None:
    m, mm, a = setup(10, [b"ten!"] * 10)
    run_op(m.ksm.full_scan())
    assert counters(m) == (0, 0, 0, 10)  # the first pass only takes checksums
    run_op(m.ksm.full_scan())
    assert counters(m) == (1, 9, 0, 0)
    assert m.ksm.stats()["full_scans"] == 2 and m.ksm.stats()["pages_scanned"] == 20
    kpfns = {m.pte(mm, a + i * PS)[0] for i in range(10)}
    assert len(kpfns) == 1 and m.memory.in_use == 1
    (kpfn,) = kpfns
    assert m.memory.flags[kpfn] & PG_KSM and m.memory.mapcount[kpfn] == 10
    assert all(not m.pte(mm, a + i * PS)[1] for i in range(10))  # read-only everywhere
    assert run_op(m.read(mm, a + 5 * PS, 4)) == b"ten!"
    m.check_invariants()


def test_distinct_pages_stay_unshared_and_a_changing_page_is_volatile() -> None:
    m, mm, a = setup(3, [b"a", b"b", b"c"])
    run_op(m.ksm.full_scan())
    run_op(m.ksm.full_scan())
    assert counters(m) == (0, 0, 3, 0)
    run_op(m.write(mm, a, b"changed"))
    run_op(m.ksm.full_scan())
    assert counters(m) == (0, 0, 2, 1)
    m.check_invariants()


def test_max_page_sharing_starts_a_second_stable_node() -> None:
    m, mm, a = setup(5, [b"dup"] * 5)
    m.ksm.set_knob("max_page_sharing", 2)
    run_op(m.ksm.full_scan())
    run_op(m.ksm.full_scan())
    # pages 0+1 -> node A (full at 2), pages 2+3 -> node B, page 4 waits in the unstable tree
    assert counters(m) == (2, 2, 1, 0)
    assert m.ksm.stats()["stable_node_dups"] == 1
    m.check_invariants()


def test_use_zero_pages_merges_zero_pages_with_the_zero_page() -> None:
    m, mm, a = setup(3, [b"\0", b"\0", b"x"])
    m.ksm.set_knob("use_zero_pages", 1)
    run_op(m.ksm.full_scan())
    run_op(m.ksm.full_scan())
    assert m.ksm.stats()["ksm_zero_pages"] == 2
    assert m.pte(mm, a)[0] == ZERO_PFN and m.pte(mm, a + PS)[0] == ZERO_PFN
    assert m.memory.in_use == 1
    run_op(m.write(mm, a, b"w"))  # a write allocates; the counter follows
    assert m.ksm.stats()["ksm_zero_pages"] == 1
    m.check_invariants()


def test_a_pinned_page_is_never_merged() -> None:
    m, mm, a = setup(2, [b"pin", b"pin"])
    (entry,) = m.gup_fast(mm, a, 1, True, pin=True, node="dma")  # nobody will unpin it
    for _ in range(3):
        run_op(m.ksm.full_scan())
    assert counters(m)[:2] == (0, 0)
    assert m.pte(mm, a)[0] == entry[1] and m.pte(mm, a + PS)[0] != entry[1]
    m.unpin("dma", mm, [entry[1]])
    run_op(m.ksm.full_scan())
    assert counters(m)[:2] == (1, 1)
    m.check_invariants()


def test_contents_are_compared_only_after_the_nodes_acked_the_write_protection() -> None:
    """A node writes through its old writable entry before it acks the
    write protection: the merge must see that write and give up."""
    m, mm, a = setup(2, [b"same"] * 2)
    m.notifier.add_node("kvm", ["invalidate_range_start", "invalidate_range_end", "change_pte"], False)
    m.notifier.register("kvm", mm)
    served = m.gup_fast(mm, a, 2, True, node="kvm")
    run_op(m.ksm.full_scan())

    def deliver(effect: Deliver) -> Outcomes:
        for _, msg in effect.sends:
            if isinstance(msg, ChangePte) and msg.addr == a + PS:
                # the node's last write through its writable spte, before it processes the change
                m.dma_write("kvm", mm, a + PS, served[1][1], 0, b"late")
        return {n: Ack(ref=msg.id) if effect.expect_ack else None for n, msg in effect.sends}

    run_sync(m.ksm.full_scan(), deliver)
    assert m.pte(mm, a)[0] != m.pte(mm, a + PS)[0]
    assert run_op(m.read(mm, a + PS, 4)) == b"late" and run_op(m.read(mm, a, 4)) == b"same"
    assert m.stale_accesses == 0
    m.check_invariants()


def test_unmergeable_and_run_2_unshare_every_ksm_page() -> None:
    m, mm, a = setup(4, [b"u"] * 4)
    run_op(m.ksm.full_scan())
    run_op(m.ksm.full_scan())
    assert counters(m) == (1, 3, 0, 0)
    run_op(m.madvise(mm, a, 2 * PS, "unmergeable"))
    assert counters(m) == (1, 3, 0, 0)  # counted as ksmd left them, until its next visit
    assert len({m.pte(mm, a + i * PS)[0] for i in range(4)}) == 3
    run_op(m.ksm.full_scan())
    assert counters(m) == (1, 1, 0, 0)
    assert not m.mms[mm].find_vma(a).mergeable and m.mms[mm].find_vma(a + 2 * PS).mergeable
    run_op(m.ksm.unmerge_all())
    assert counters(m) == (0, 0, 0, 0) and m.memory.in_use == 4
    assert run_op(m.read(mm, a + 3 * PS, 1)) == b"u"
    run_op(m.write(mm, a + 3 * PS, b"W"))  # writable without another copy
    m.check_invariants()


def test_fork_child_pages_join_the_stable_node_on_the_next_scan() -> None:
    m, mm, a = setup(2, [b"f"] * 2)
    run_op(m.ksm.full_scan())
    run_op(m.ksm.full_scan())
    child = run_op(m.fork(mm))
    run_op(m.ksm.full_scan())
    assert counters(m) == (1, 3, 0, 0)
    run_op(m.exit_mm(mm))
    run_op(m.ksm.full_scan())  # the exited mm's items go when ksmd reaches them
    assert counters(m) == (1, 1, 0, 0)
    run_op(m.exit_mm(child))
    assert m.memory.in_use == 0
    run_op(m.ksm.full_scan())
    assert counters(m) == (0, 0, 0, 0)
    m.check_invariants()


def test_scan_respects_pages_to_scan_and_knobs_are_validated() -> None:
    m, mm, a = setup(5, [b"s"] * 5)
    m.ksm.set_knob("pages_to_scan", 2)
    assert run_op(m.ksm.scan()) == 2
    assert m.ksm.stats()["pages_scanned"] == 2 and m.ksm.stats()["full_scans"] == 0
    for name, value in [("run", 3), ("max_page_sharing", 1), ("nonsense", 1), ("pages_to_scan", -1)]:
        with pytest.raises(KernelError) as err:
            m.ksm.set_knob(name, value)
        assert err.value.errno is Errno.EINVAL
    assert m.ksm.pages_to_scan == 2


def test_scanning_with_nothing_mergeable_terminates() -> None:
    m = Model(frames=8, page_size=PS, swap_slots=4)
    assert run_op(m.ksm.scan()) == 0
    run_op(m.ksm.full_scan())
    assert m.ksm.stats()["full_scans"] >= 1


def test_prot_none_pages_are_merged_and_unmerged_like_any_others() -> None:
    """ksm_functional_tests.c ``test_prot_none``: a mergeable PROT_NONE range
    is merged; MADV_UNMERGEABLE unshares it (mapped read-only, PROT_NONE)."""
    m, mm, a = setup(4, [b"n"] * 4)
    run_op(m.mprotect(mm, a, 4 * PS, "none"))
    run_op(m.ksm.full_scan())
    run_op(m.ksm.full_scan())
    assert counters(m) == (1, 3, 0, 0) and m.memory.in_use == 1
    run_op(m.madvise(mm, a + 2 * PS, 2 * PS, "unmergeable"))
    assert m.memory.in_use == 3
    run_op(m.ksm.full_scan())
    assert counters(m) == (1, 1, 0, 0)
    run_op(m.mprotect(mm, a, 4 * PS, "r"))
    assert [run_op(m.read(mm, a + i * PS, 1)) for i in range(4)] == [b"n"] * 4
    m.check_invariants()


def test_max_page_sharing_cannot_change_while_pages_are_shared() -> None:
    """mm/ksm.c ``max_page_sharing_store``: EBUSY while ``ksm_pages_shared``."""
    m, mm, a = setup(2, [b"b"] * 2)
    m.ksm.set_knob("max_page_sharing", 16)  # nothing shared yet: fine
    run_op(m.ksm.full_scan())
    run_op(m.ksm.full_scan())
    assert counters(m)[0] == 1
    with pytest.raises(KernelError) as err:
        m.ksm.set_knob("max_page_sharing", 8)
    assert err.value.errno is Errno.EBUSY and m.ksm.max_page_sharing == 16
    m.ksm.set_knob("max_page_sharing", 16)  # the same value: no change, no error
    run_op(m.ksm.unmerge_all())
    m.ksm.set_knob("max_page_sharing", 8)
    assert m.ksm.max_page_sharing == 8


def test_a_page_shared_by_fork_is_not_counted_twice() -> None:
    """unstable_tree_search_insert: "Don't substitute a ksm page for a forked
    page": the child's rmap item of the same page is not inserted, so one
    page shared by fork is one unshared item, not two."""
    m, mm, a = setup(1, [b"k"])
    child = run_op(m.fork(mm))
    run_op(m.ksm.full_scan())
    run_op(m.ksm.full_scan())
    assert counters(m) == (0, 0, 1, 1)
    assert m.pte(mm, a)[0] == m.pte(child, a)[0] and not m.memory.flags[m.pte(mm, a)[0]] & PG_KSM
    m.check_invariants()


def test_counters_change_when_ksmd_next_visits_not_at_cow_time() -> None:
    """ksm_tests.c ``check_ksm_unmerge``: write to merged pages, then "get at
    least 1 scan, so KSM can detect that the pages were modified" -- the COW
    break itself changes no counter; the next pass recounts every item."""
    m, mm, a = setup(3, [b"c"] * 3)
    run_op(m.ksm.full_scan())
    run_op(m.ksm.full_scan())
    assert counters(m) == (1, 2, 0, 0)
    run_op(m.write(mm, a, b"-"))
    run_op(m.write(mm, a + PS, b"+"))
    assert counters(m) == (1, 2, 0, 0)  # COW broken, not yet seen
    run_op(m.munmap(mm, a + 2 * PS, PS))
    assert counters(m) == (1, 2, 0, 0)  # the KSM page is freed, its items still counted
    run_op(m.ksm.full_scan())
    assert counters(m) == (0, 0, 0, 2)  # the written pages volatile, the unmapped one gone
    m.check_invariants()
