"""Start/end pairing and frame safety on every exit path of the host's operations.

The model is driven against the real node kinds (``node.kvm``, ``node.gru``)
sans-I/O: a small bench plays the host's side of the channel (Subscribe, Gup,
DMA) and delivers the operations' notifier effects to the nodes in-line.  The
tests step generators by hand where a race needs a window, inject allocation
failures (``PhysicalMemory.fail_alloc``) or exhaust the frames for real, and
check the nodes' own counters afterwards: kvm's ``mmu_invalidate_in_progress``
and gru's ``range_active`` back at 0 means every start got its end.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from broker.effects import Deliver, Outcomes, run_sync, throw_sync
from broker.memory import PG_KSM
from broker.mm import Model
from node.base import Completion, SecondaryMMU
from node.gru import GruMMU
from node.kvm import KvmMMU
from protocol.messages import (
    Ack,
    ChangePte,
    DmaRead,
    DmaReply,
    DmaWrite,
    Gup,
    GupReply,
    InvalidateRangeEnd,
    InvalidateRangeStart,
    Ok,
    Registered,
    Release,
    Subscribe,
)
from protocol.types import Errno, KernelError

PS = 4096


def page(fill: bytes) -> bytes:
    return (fill * (PS // len(fill) + 1))[:PS]


class Bench:
    """The host side for in-line nodes, by hand.

    ``deliver`` hands each message of an effect to its node and answers with
    the node's Ack; whatever else the node says (a woken fault's Gup...) waits
    in ``later`` until :meth:`flush`, so no model code runs inside a delivery.
    ``refuse``: fake nodes (name -> status) answering every non-blockable start
    with that status (a sleepable node refusing a non-blockable start).
    """

    def __init__(self, model: Model, *nodes: SecondaryMMU, refuse: dict[str, str] | None = None) -> None:
        self.model = model
        self.nodes = {n.name: n for n in nodes}
        self.refuse = refuse or {}
        self.later: deque[tuple[str, Any]] = deque()
        self.log: list[tuple[str, Any]] = []
        for n in nodes:
            n.receive(Registered(ref=0, epoch=1, host_incarnation="h", heartbeat_ms=1000,
                                 ack_deadline_ms=1000, page_size=PS))
            model.notifier.add_node(n.name, n.ops, n.sleepable)

    def add_fake(self, name: str, *, sleepable: bool = True) -> None:
        """A node with start/end only, answered by ``refuse`` (default ok)."""
        self.model.notifier.add_node(name, {"invalidate_range_start", "invalidate_range_end"}, sleepable)

    def deliver(self, effect: Deliver) -> Outcomes:
        out: Outcomes = {}
        for name, msg in effect.sends:
            self.log.append((name, msg))
            out[name] = self.answer(name, msg) if effect.expect_ack else None
            if not effect.expect_ack:
                self.answer(name, msg)
        return out

    def answer(self, name: str, msg: Any) -> Ack | None:
        if name not in self.nodes:
            if isinstance(msg, InvalidateRangeEnd):
                return None
            refused = isinstance(msg, InvalidateRangeStart) and not msg.blockable
            return Ack(ref=msg.id, status=self.refuse.get(name, "ok") if refused else "ok")
        ack = None
        for o in self.nodes[name].receive(msg):
            if isinstance(o, Ack) and o.ref == msg.id:
                ack = o
            else:
                self.later.append((name, o))
        return ack

    def run(self, op: Any) -> Any:
        return run_sync(op, self.deliver)

    def flush(self) -> list[Completion]:
        """Serve what the nodes asked for (Subscribe, Gup, DMA), to quiescence."""
        done = []
        while self.later:
            name, o = self.later.popleft()
            node = self.nodes[name]
            if isinstance(o, Subscribe):
                try:
                    self.model.notifier.register(name, o.mm)
                    reply: Any = Ok(ref=o.id)
                except KernelError as exc:
                    from protocol.messages import Error

                    reply = Error(ref=o.id, code=exc.errno.value, message=exc.message)
                self.later.extend((name, x) for x in node.receive(reply))
            elif isinstance(o, Gup):
                try:
                    pages = self.model.gup_fast(o.mm, o.addr, o.npages, o.write, pin=o.pin, node=name)
                    if pages is None:
                        pages = self.run(self.model.gup(o.mm, o.addr, o.npages, o.write, pin=o.pin, node=name))
                    reply = GupReply(ref=o.id, mm=o.mm, pages=[[a, p, int(w)] for a, p, w in pages])
                except KernelError as exc:
                    reply = GupReply(ref=o.id, mm=o.mm, pages=[], errno=exc.errno.value)
                self.later.extend((name, x) for x in node.receive(reply))
            elif isinstance(o, (DmaRead, DmaWrite)):
                try:
                    if isinstance(o, DmaRead):
                        reply = DmaReply(ref=o.id, data=bytes(
                            self.model.dma_read(name, o.mm, o.addr, o.pfn, o.offset, o.length)))
                    else:
                        self.model.dma_write(name, o.mm, o.addr, o.pfn, o.offset, o.data)
                        reply = DmaReply(ref=o.id)
                except KernelError as exc:
                    reply = DmaReply(ref=o.id, errno=exc.errno.value)
                self.later.extend((name, x) for x in node.receive(reply))
            elif isinstance(o, Completion):
                done.append(o)
        return done

    def fault(self, name: str, mm: int, addr: int, write: bool = False) -> Completion:
        _token, out = self.nodes[name].fault(mm, addr, 1, write=write)
        self.later.extend((name, o) for o in out)
        (done,) = self.flush()
        return done

    def read(self, name: str, mm: int, addr: int, length: int = 4) -> Completion:
        _token, out = self.nodes[name].access(mm, addr, length)
        self.later.extend((name, o) for o in out)
        (done,) = self.flush()
        return done

    def quiet(self) -> None:
        """Every start got its end: the notifier has nothing open and the
        nodes' own invalidation counters are back at 0."""
        for node in self.nodes.values():
            for mm, state in node._mms.items():
                if isinstance(node, KvmMMU):
                    assert state.mmu_invalidate_in_progress == 0, (node.name, mm)
                if isinstance(node, GruMMU):
                    assert state.range_active == 0, (node.name, mm)
                assert not state.open_starts, (node.name, mm, state.open_starts)
        assert not any(self.model.notifier.open.values()), self.model.notifier.open
        assert self.model.notifier.quiescent(), self.model.notifier.orphaned_ends

    def translations_of(self, pfn: int) -> list[tuple[str, int, int]]:
        return [(name, mm, addr) for name, node in self.nodes.items()
                for mm, table in node.translations().items() for addr, p in table.items() if p == pfn]


def fill_memory(m: Model, leave: int = 0) -> None:
    """Map and touch pages in a fresh mm until only ``leave`` frames are free."""
    mm = m.spawn()
    n = m.memory.nr_free() - leave
    if n <= 0:
        return
    base = run_sync(m.mmap(mm, n), lambda e: {})
    for i in range(n):
        run_sync(m.write(mm, base + i * PS, b"\xff"), lambda e: {})
    assert m.memory.nr_free() == leave


# -- defect 1: the EAGAIN compensation erased a page served during its end ---------------


def test_page_served_while_the_compensating_end_is_in_flight_is_invalidated_later() -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8)
    kvm = KvmMMU("kvm")
    bench = Bench(m, kvm, refuse={"xpmem": "EAGAIN"})
    bench.add_fake("xpmem", sleepable=True)
    mm = m.spawn()
    base = bench.run(m.mmap(mm, 2))
    bench.run(m.write(mm, base, page(b"old!")))
    assert bench.fault("kvm", mm, base).ok
    m.notifier.register("xpmem", mm)
    m.notifier.note_served("xpmem", mm, base, base + PS)
    pfn = m.pte(mm, base)[0]

    gen = m.madvise(mm, base, PS, "dontneed", blockable=False)
    effect = next(gen)  # the start, to kvm and xpmem
    assert sorted(effect.nodes) == ["kvm", "xpmem"]
    outcomes = bench.deliver(effect)  # kvm zaps and acks, xpmem refuses
    assert outcomes["xpmem"].status == "EAGAIN"
    effect = gen.send(outcomes)  # the compensating end, to kvm
    assert effect.nodes == ("kvm",) and isinstance(effect.sends[0][1], InvalidateRangeEnd)
    bench.deliver(effect)  # kvm has the end: its invalidation is over ...
    assert bench.fault("kvm", mm, base).ok  # ... so it faults again and GUP-fast serves it
    assert kvm.translations()[mm][base] == pfn
    with pytest.raises(KernelError) as err:
        gen.send({"kvm": None})  # the driver resumes after the end
    assert err.value.errno is Errno.EAGAIN
    # what was served during the end is still known: the munmap addresses kvm
    assert m.notifier.served("kvm", mm).overlaps(base, base + PS)
    bench.run(m.munmap(mm, base, PS))
    assert base not in kvm.translations().get(mm, {})
    assert m.memory.is_free(pfn)
    bench.quiet()
    assert m.stale_accesses == 0


# -- defect 2: an allocation failure between start and end --------------------------------


def kvm_and_gru_holding(m: Model, npages: int = 2) -> tuple[Bench, int, int]:
    bench = Bench(m, KvmMMU("kvm"), GruMMU("gru"))
    mm = m.spawn()
    base = bench.run(m.mmap(mm, npages))
    for i in range(npages):
        bench.run(m.write(mm, base + i * PS, page(bytes([65 + i]))))
        assert bench.fault("kvm", mm, base + i * PS).ok
        assert bench.fault("gru", mm, base + i * PS).ok
    return bench, mm, base


@pytest.mark.parametrize("moved_first", [0, 1])
def test_migration_without_a_free_frame_ends_its_invalidation(moved_first: int) -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8)
    bench, mm, base = kvm_and_gru_holding(m)
    old = [m.pte(mm, base + i * PS)[0] for i in range(2)]
    if moved_first:
        m.memory.fail_allocs_after(1)  # the first page gets its frame, the second none
    else:
        fill_memory(m)  # really out of frames
    with pytest.raises(KernelError) as err:
        bench.run(m.migrate(mm, base, 2 * PS))
    assert err.value.errno is Errno.ENOMEM
    bench.quiet()  # kvm's mmu_invalidate_in_progress and gru's range_active are 0
    if moved_first:
        m.memory.fail_allocs_after(None)
    now = [m.pte(mm, base + i * PS)[0] for i in range(2)]
    if moved_first:  # the first page moved and stays moved, the second stays put
        assert now[0] != old[0] and m.memory.is_free(old[0]) and now[1] == old[1]
    else:
        assert now == old
    assert m.counters["migrated"] == moved_first
    for i in range(2):  # the nodes fault again and see the primary as it is
        assert bench.read("kvm", mm, base + i * PS).result == {"data": bytes([65 + i]) * 4}
        assert bench.read("gru", mm, base + i * PS).result == {"data": bytes([65 + i]) * 4}
        assert m.notifier.served("kvm", mm).overlaps(base + i * PS, base + (i + 1) * PS)
    assert kvm_state(bench, mm).mmu_invalidate_in_progress == 0
    assert m.stale_accesses == 0
    m.check_invariants()


def kvm_state(bench: Bench, mm: int) -> Any:
    return bench.nodes["kvm"].mm_state(mm)


def test_fork_without_a_frame_for_a_pinned_page_ends_its_invalidation() -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8)
    bench, mm, base = kvm_and_gru_holding(m)
    run_sync(m.gup(mm, base + PS, 1, True, pin=True, node="pinner"), bench.deliver)  # fork must copy it
    fill_memory(m)
    with pytest.raises(KernelError) as err:
        bench.run(m.fork(mm))
    assert err.value.errno is Errno.ENOMEM
    bench.quiet()
    assert sorted(m.mms) == [mm, mm + 1]  # the filler; the child is gone
    assert bench.read("kvm", mm, base).result == {"data": b"AAAA"}
    bench.run(m.write(mm, base, b"new!"))  # the write-protected parent page is reused
    assert bench.read("gru", mm, base).result == {"data": b"new!"}
    assert m.stale_accesses == 0
    m.check_invariants()


def test_cow_break_without_a_frame_opens_nothing() -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8)
    bench, mm, base = kvm_and_gru_holding(m, 1)
    child = bench.run(m.fork(mm))
    fill_memory(m)
    with pytest.raises(KernelError) as err:
        bench.run(m.write(mm, base, b"cow!"))
    assert err.value.errno is Errno.ENOMEM
    bench.quiet()
    assert bench.run(m.read(child, base, 1)) == b"A"
    m.check_invariants()


# -- throw and close -----------------------------------------------------------------------


def test_an_exception_thrown_while_the_start_awaits_its_acks_ends_it_everywhere() -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8)
    bench, mm, base = kvm_and_gru_holding(m)
    gen = m.munmap(mm, base, PS)
    start = next(gen)
    for name, msg in start.sends:  # the nodes got the start (acks not yet in)
        bench.answer(name, msg)
    end = gen.throw(KernelError(Errno.EINTR, "cancelled"))  # the driver gives up
    assert sorted(end.nodes) == ["gru", "kvm"] and not end.expect_ack
    assert all(isinstance(msg, InvalidateRangeEnd) and msg.start_id == start.sends[0][1].id for _, msg in end.sends)
    bench.deliver(end)
    with pytest.raises(KernelError) as err:
        gen.send({"gru": None, "kvm": None})
    assert err.value.errno is Errno.EINTR
    bench.quiet()
    assert m.pte(mm, base) is not None  # nothing was unmapped
    assert m.notifier.served("kvm", mm).overlaps(base, base + PS)  # still addressed next time
    bench.run(m.munmap(mm, base, PS))
    assert not bench.translations_of(0) and base not in bench.nodes["kvm"].translations()[mm]
    bench.quiet()


@pytest.mark.parametrize("wrap", [False, True])
def test_an_exception_thrown_into_a_ksm_change_pte_ends_the_wrapping_start(wrap: bool) -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8, wrap_change_pte=wrap)
    bench = Bench(m, KvmMMU("kvm"), GruMMU("gru"))
    mm = m.spawn()
    base = bench.run(m.mmap(mm, 1, mergeable=True))
    bench.run(m.write(mm, base, page(b"same")))
    for name in ("kvm", "gru"):
        assert bench.fault(name, mm, base, write=True).ok
    m.check_invariants()
    pfn = m.pte(mm, base)[0]
    mm_ = m.mms[mm]
    gen = m.ksm._write_protect_page(mm_, base, pfn)
    effect = next(gen)
    while not any(isinstance(msg, ChangePte) for _, msg in effect.sends):
        effect = gen.send(bench.deliver(effect))
    for name, msg in effect.sends:
        bench.answer(name, msg)
    with pytest.raises(KernelError) as err:
        throw_sync(gen, KernelError(Errno.EINTR, "cancelled"), bench.deliver)
    assert err.value.errno is Errno.EINTR
    bench.quiet()
    assert not m.pending
    assert m.pte(mm, base)[1]  # not committed: still writable
    m.check_invariants()


def test_a_cancelled_slow_gup_ends_its_cow_break_and_keeps_the_pages_it_had() -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8)
    bench, mm, base = kvm_and_gru_holding(m)
    child = bench.run(m.fork(mm))  # both pages COW-shared now
    for i in range(2):  # read again by kvm: each COW break has a node to tell
        assert bench.fault("kvm", mm, base + i * PS).ok
    gen = m.gup(mm, base, 2, True, node="kvm")  # a write GUP breaks both
    effect = next(gen)
    while not any(isinstance(msg, InvalidateRangeStart) and msg.start == base + PS for _, msg in effect.sends):
        effect = gen.send(bench.deliver(effect))
    for name, msg in effect.sends:  # the second page's start is out
        bench.answer(name, msg)
    pages = throw_sync(gen, KernelError(Errno.EINTR, "cancelled"), bench.deliver)
    assert [p[0] for p in pages] == [base]  # GUP keeps the first page, as on any error
    bench.quiet()
    assert m.pte(mm, base + PS)[0] == m.pte(child, base + PS)[0]  # the second stayed shared
    m.check_invariants()


def test_close_mid_invalidation_owes_the_end_and_end_orphans_pays_it() -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8)
    bench, mm, base = kvm_and_gru_holding(m)
    gen = m.migrate(mm, base, 2 * PS)
    start = next(gen)
    bench.deliver(start)
    gen.close()  # what an abandoned generator gets; no end can be yielded
    assert not m.notifier.open.get(mm)  # GUP-fast is not refused forever
    assert [inv.range.start for inv in m.notifier.orphaned_ends] == [base]
    assert not m.notifier.quiescent()
    assert kvm_state(bench, mm).mmu_invalidate_in_progress == 1
    assert bench.run(m.notifier.end_orphans()) == 1
    bench.quiet()
    assert m.counters["migrated"] == 0


def test_close_while_the_start_is_in_flight_owes_the_end_to_every_addressed_node() -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8)
    bench, mm, base = kvm_and_gru_holding(m)
    gen = m.munmap(mm, base, PS)
    start = next(gen)
    for name, msg in start.sends:
        bench.answer(name, msg)
    gen.close()
    assert not m.notifier.open.get(mm)
    bench.run(m.notifier.end_orphans())
    bench.quiet()


# -- defect 3: ksmd survives a failed break_cow --------------------------------------------


def test_ksm_scan_survives_enomem_breaking_the_first_half_of_a_failed_two_page_merge() -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8)
    mm = m.spawn()
    base = run_sync(m.mmap(mm, 2, mergeable=True), lambda e: {})
    for i in range(2):
        run_sync(m.write(mm, base + i * PS, page(b"twin")), lambda e: {})
    # pin the first page (scanned first: the unstable tree's candidate), so the
    # second half of the merge fails and the KSM page must be broken again
    run_sync(m.gup(mm, base, 1, True, pin=True, node="pinner"), lambda e: {})
    fill_memory(m)
    run_sync(m.ksm.full_scan(), lambda e: {})  # checksums recorded
    run_sync(m.ksm.full_scan(), lambda e: {})  # merge attempt: break_cow finds no frame
    assert m.counters["ksm_break_cow_failed"] == 1
    kpfn = m.pte(mm, base + PS)[0]
    assert m.memory.flags[kpfn] & PG_KSM and m.memory.pincount[kpfn] == 0
    assert m.pte(mm, base)[0] != kpfn  # the pinned page was never merged
    m.check_invariants()
    run_sync(m.ksm.scan(10), lambda e: {})  # ksmd goes on
    m.check_invariants()


# -- defect 4: a page on its way to KSM cannot be pinned ----------------------------------


@pytest.mark.parametrize("wrap", [False, True])
def test_gup_fast_pin_cannot_take_a_page_that_is_becoming_a_ksm_page(wrap: bool) -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8, wrap_change_pte=wrap)
    bench = Bench(m, KvmMMU("kvm"))
    mm = m.spawn()
    base = bench.run(m.mmap(mm, 2, mergeable=True))
    for i in range(2):
        bench.run(m.write(mm, base + i * PS, page(b"twin")))
        assert bench.fault("kvm", mm, base + i * PS).ok  # kvm holds both: every step is delivered
    bench.run(m.ksm.full_scan())  # checksums recorded
    gen = m.ksm.full_scan()
    pinned: list[int] = []
    try:
        effect = next(gen)
        while True:
            # at every delivery of the merge, a pinning GUP-fast races it
            for i in range(2):
                got = m.gup_fast(mm, base + i * PS, 1, False, pin=True, node="xpmem")
                if got:
                    pinned.append(got[0][1])
            effect = gen.send(bench.deliver(effect))
    except StopIteration:
        pass
    ksm_pages = [p for p in range(1, m.memory.nframes) if m.memory.flags[p] & PG_KSM and m.memory.refcount[p]]
    for kpfn in ksm_pages:
        assert m.memory.pincount[kpfn] == 0, f"KSM page {kpfn} pinned (pins taken on {pinned})"
    m.check_invariants()
    # the slow path unshares a KSM page before pinning it (FAULT_FLAG_UNSHARE)
    got = bench.run(m.gup(mm, base, 1, False, pin=True, node="xpmem"))
    assert got[0][1] not in ksm_pages
    m.check_invariants()
    assert m.stale_accesses == 0


def test_fork_shares_pages_so_gup_fast_will_not_pin_them_until_unshared() -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8)
    mm = m.spawn()
    base = run_sync(m.mmap(mm, 1), lambda e: {})
    run_sync(m.write(mm, base, b"x"), lambda e: {})
    assert m.gup_fast(mm, base, 1, False, pin=True, node="p") is not None
    m.unpin("p", mm, [m.pte(mm, base)[0]])
    child = run_sync(m.fork(mm), lambda e: {})
    assert m.gup_fast(mm, base, 1, False, pin=True, node="p") is None
    run_sync(m.exit_mm(child), lambda e: {})
    # only the parent maps it now; the slow path marks it exclusive without a copy
    pfn = m.pte(mm, base)[0]
    (got,) = run_sync(m.gup(mm, base, 1, False, pin=True, node="p"), lambda e: {})
    assert got[1] == pfn
    m.check_invariants()


# -- exit: nothing is served once release went out ----------------------------------------


def test_gup_fast_serves_nothing_while_exit_releases_the_nodes() -> None:
    m = Model(frames=16, page_size=PS, swap_slots=8)
    bench, mm, base = kvm_and_gru_holding(m, 1)
    freed: list[int] = []
    m.memory.on_free = freed.append
    gen = m.exit_mm(mm)
    effect = next(gen)
    assert all(isinstance(msg, Release) for _, msg in effect.sends)
    bench.deliver(effect)
    # the release is out, the subscriptions are gone: whatever GUP-fast served
    # now would never be invalidated before exit frees the frames
    assert m.gup_fast(mm, base, 1, False, node="kvm") is None
    with pytest.raises(StopIteration):
        gen.send({name: None for name in effect.nodes})
    assert freed and not any(bench.translations_of(p) for p in freed)


# -- frame safety under injected allocation failures ---------------------------------------


OPS = ("write", "read", "fault_kvm", "fault_gru", "fork", "migrate", "reclaim", "munmap", "dontneed",
       "mprotect", "ksm", "exit_child", "access_kvm", "access_gru", "pin", "unpin", "child_write",
       "write", "write", "ksm", "ksm")  # weighted: twins and two passes make KSM merge


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 3), st.integers(0, 1),
                                         st.integers(0, 3)), min_size=8, max_size=30))
def test_any_allocation_may_fail_and_no_node_keeps_a_freed_frame(wrap: bool, steps: list) -> None:
    m = Model(frames=24, page_size=PS, swap_slots=16, wrap_change_pte=wrap)
    bench = Bench(m, KvmMMU("kvm"), GruMMU("gru"))
    parent = m.spawn()
    base = bench.run(m.mmap(parent, 4, mergeable=True))
    children: list[int] = []

    def no_translation(pfn: int) -> None:
        assert not bench.translations_of(pfn), f"frame {pfn} freed while {bench.translations_of(pfn)} map it"

    m.memory.on_free = no_translation
    for op, i, v, fail in steps:
        addr = base + i * PS
        # fail: 0 never; else let fail-1 allocations succeed, then fail one
        m.memory.fail_allocs_after(None if fail == 0 else fail - 1, count=1)
        try:
            if op == "write":  # two contents only: KSM finds twins
                bench.run(m.write(parent, addr, bytes([v + 1]) * 8))
            elif op == "child_write" and children:
                bench.run(m.write(children[-1], addr, bytes([v + 3]) * 8))
            elif op == "pin":  # what xpmem does; fork must then copy the page
                bench.run(m.gup(parent, addr, 1, bool(v), pin=True, node="pinner"))
            elif op == "unpin" and m.pins.get("pinner"):
                pin_mm, pin_pfn = sorted(m.pins["pinner"])[0]
                m.unpin("pinner", pin_mm, [pin_pfn])
            elif op == "read":
                bench.run(m.read(parent, addr, 8))
            elif op in ("fault_kvm", "fault_gru"):
                bench.fault(op[6:], parent, addr, write=bool(i % 2))
            elif op in ("access_kvm", "access_gru"):
                done = bench.read(op[7:], parent, addr)
                assert done.error is None or done.error.errno is not Errno.ESTALE
            elif op == "fork":
                children.append(bench.run(m.fork(parent)))
            elif op == "migrate":
                bench.run(m.migrate(parent, base, 4 * PS))
            elif op == "reclaim":
                bench.run(m.reclaim(parent, addr, PS))
            elif op == "munmap":
                bench.run(m.munmap(parent, addr, PS))
            elif op == "dontneed":
                bench.run(m.madvise(parent, addr, PS, "dontneed"))
            elif op == "mprotect":
                bench.run(m.mprotect(parent, addr, PS, "r" if i % 2 else "rw"))
            elif op == "ksm":
                bench.run(m.ksm.scan(16))
                if m.ksm.stats()["pages_sharing"]:
                    event("ksm merged")
            elif op == "exit_child" and children:
                bench.run(m.exit_mm(children.pop()))
        except KernelError as exc:
            assert exc.errno in (Errno.ENOMEM, Errno.EFAULT, Errno.ENOSPC, Errno.EPERM), exc
            event(f"{op} {exc.errno.value}")
        finally:
            m.memory.fail_allocs_after(None)
        bench.flush()
        bench.quiet()
        m.check_invariants()
    assert m.stale_accesses == 0
