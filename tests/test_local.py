"""The whole stack in one process (mmn.local.LocalCluster): scenarios with exact values.

Each test drives the real primary-MMU model, the real notifier core and the
real node kinds through the in-process host, and ends with the oracle's
verdict: ``check()`` returns the stale access count, 0 in a correct system.
The last tests break a node on purpose and watch the oracle catch it.
"""

from __future__ import annotations

from typing import Any

import pytest
from broken_kinds import AcksBeforeZapping, NeverZaps

from mmnotify.local import LocalCluster, Stuck
from node.kvm import KvmMMU
from protocol.messages import Ack, DmaRead, Gup, InvalidateRangeStart, Unpin
from protocol.types import Errno, KernelError

PS = 4096


def cluster(*kinds: str, **kw: Any) -> LocalCluster:
    return LocalCluster(frames=kw.pop("frames", 128), nodes=list(kinds), **kw)


def page(fill: bytes) -> bytes:
    return (fill * (PS // len(fill) + 1))[:PS]


def pfns(c: LocalCluster, name: str, mm: int) -> dict[int, int]:
    return dict(c.node(name).translations().get(mm, {}))


def primary_pfn(c: LocalCluster, mm: int, addr: int) -> int | None:
    pte = c.model.pte(mm, addr)
    return None if pte is None else pte[0]


# -- faults racing invalidations ----------------------------------------------------


@pytest.mark.parametrize("op", ["munmap", "dontneed"])
def test_kvm_fault_racing_a_held_invalidation_is_retried_never_installed_stale(op: str) -> None:
    c = cluster("kvm")
    mm = c.spawn()
    base = c.mmap(mm, 2)
    c.write(mm, base, page(b"old!"))
    c.write(mm, base + PS, page(b"keep"))
    c.fault("kvm", mm, base + PS)  # subscribed; kvm holds page 1
    c.fault("kvm", mm, base)
    old = primary_pfn(c, mm, base)
    assert pfns(c, "kvm", mm)[base] == old

    gen = c.model.munmap(mm, base, PS) if op == "munmap" else c.model.madvise(mm, base, PS, "dontneed")
    handle = c.begin(gen)  # invalidate_range_start queued to kvm, lock held
    (start,) = c.ports["kvm"].to_node
    assert isinstance(start, InvalidateRangeStart) and (start.start, start.end) == (base, base + PS)
    c.node("kvm").sptes[mm].pop(base)  # the guest lost the spte (TLB pressure) ...
    token = c.submit_fault("kvm", mm, base)  # ... and faults again before seeing the start
    (gup,) = c.ports["kvm"].to_host
    assert isinstance(gup, Gup)
    c.pump()
    # The start was read first (zap, in_progress).  GUP-fast serves nothing
    # under an open invalidation (a node the start did not address would
    # never hear of the zap); the slow path waits for the lock.  A reply
    # served anyway would be discarded by the node's sequence check.
    assert c.result("kvm", token) is None
    assert c.node("kvm").counters["stale_replies"] <= 1
    assert base not in pfns(c, "kvm", mm)
    c.finish(handle)  # ptes changed, end sent: the parked fault goes again
    done = c.result("kvm", token)
    if op == "munmap":
        assert done.error is not None and done.error.errno is Errno.EFAULT
        assert base not in pfns(c, "kvm", mm)
    else:
        assert done.ok
        new = pfns(c, "kvm", mm)[base]
        assert new != old and new == primary_pfn(c, mm, base)
        assert c.access("kvm", mm, base, 4) == b"\0\0\0\0"
    assert c.access("kvm", mm, base + PS, 4) == b"keep"
    assert c.check() == 0


def test_a_node_the_start_did_not_address_is_not_served_until_the_end() -> None:
    # Found by `mmn soak`: the start goes only to the nodes that hold the
    # range; a node that held nothing there and faults while the start awaits
    # its acks must not get the old page (it would never hear of the zap).
    c = cluster("kvm")
    c.add_node("kvm", "kvm2")
    mm = c.spawn()
    base = c.mmap(mm, 2)
    c.write(mm, base, page(b"old!"))
    c.fault("kvm", mm, base)  # kvm holds the page
    c.fault("kvm2", mm, base + PS)  # kvm2 is subscribed, holds only the next one
    handle = c.begin(c.model.madvise(mm, base, PS, "dontneed"))
    (start,) = c.ports["kvm"].to_node
    assert isinstance(start, InvalidateRangeStart)
    assert not c.ports["kvm2"].to_node  # kvm2 holds nothing: no start for it
    token = c.submit_fault("kvm2", mm, base)
    c.pump()
    assert c.result("kvm2", token) is None  # GUP-fast served nothing
    c.finish(handle)
    assert c.result("kvm2", token).ok
    assert pfns(c, "kvm2", mm)[base] == primary_pfn(c, mm, base)
    assert c.access("kvm2", mm, base, 4) == b"\0\0\0\0"
    assert c.check() == 0


def test_gru_miss_during_a_held_invalidation_waits_for_the_end() -> None:
    c = cluster("gru")
    mm = c.spawn()
    base = c.mmap(mm, 2)
    c.write(mm, base, page(b"gru0"))
    c.fault("gru", mm, base)
    c.fault("gru", mm, base + PS)
    handle = c.begin(c.model.munmap(mm, base + PS, PS))
    c.pump()  # the start purges and sets range_active
    token = c.submit_access("gru", mm, base, 4)  # a miss? no: page 0 still in the TLB
    assert c.wait("gru", token).result == {"data": b"gru0"}
    c.node("gru").tlb.clear()  # now a real miss
    token = c.submit_access("gru", mm, base, 4)
    with pytest.raises(Stuck):
        c.wait("gru", token)  # range_active > 0: the drop-in waits
    assert c.node("gru").counters["waits"] >= 1
    c.finish(handle)
    assert c.result("gru", token).result == {"data": b"gru0"}
    assert c.check() == 0


# -- KSM and change_pte ---------------------------------------------------------------


def _ksm_scenario(wrap: bool) -> tuple[LocalCluster, int, int, dict[str, Any]]:
    c = cluster("kvm", "gru", "xpmem", wrap_change_pte=wrap)
    mm = c.spawn()
    base = c.mmap(mm, 2, mergeable=True)
    c.write(mm, base, page(b"same"))
    c.write(mm, base + PS, page(b"same"))
    before = {a: primary_pfn(c, mm, a) for a in (base, base + PS)}
    assert before[base] != before[base + PS]
    c.fault("kvm", mm, base, 2)
    c.fault("gru", mm, base, 2)
    segid = c.xpmem_make("xpmem", mm, base, 2 * PS)
    vaddr = c.xpmem_attach("xpmem", c.xpmem_get("xpmem", segid))
    assert c.access("xpmem", 0, vaddr + PS, 4) == b"same"
    assert c.node("xpmem").translations() == {mm: {base + PS: before[base + PS]}}
    # A page an attachment pins is never merged (tests/test_xpmem.py): the
    # xpmem node detaches first; its served range stays, so it still hears
    # ksmd's one-page invalidations, and acks them with nothing kept.
    c.xpmem_detach("xpmem", vaddr)
    faults = {n: c.node(n).counters["faults"] + c.node(n).counters["gups"] for n in ("kvm", "gru", "xpmem")}
    stats = c.merge(2)
    return c, mm, base, {"before": before, "vaddr": vaddr, "stats": stats, "faults": faults}


def test_ksm_merge_repoints_kvm_by_change_pte_and_invalidates_gru_and_xpmem() -> None:
    c, mm, base, s = _ksm_scenario(wrap=False)
    assert (s["stats"]["pages_shared"], s["stats"]["pages_sharing"]) == (1, 1)
    merged = primary_pfn(c, mm, base)
    assert merged == primary_pfn(c, mm, base + PS)
    kvm = c.node("kvm")
    # kvm: both sptes repointed in place to the KSM page, read-only, no refault
    assert pfns(c, "kvm", mm) == {base: merged, base + PS: merged}
    assert not kvm.spte(mm, base).writable and not kvm.spte(mm, base + PS).writable
    assert kvm.counters["change_pte_hits"] >= 1
    assert merged != s["before"][base + PS] or merged != s["before"][base]
    # gru was invalidated where the pte changed
    assert set(pfns(c, "gru", mm)) <= {a for a in (base, base + PS) if s["before"][a] == merged}
    assert pfns(c, "xpmem", mm) == {} and c.node("xpmem").counters["background_kept"] == 0
    gups = {n: c.node(n).counters["gups"] for n in ("kvm", "gru", "xpmem")}
    assert c.access("kvm", mm, base + PS, 4) == b"same"
    assert c.node("kvm").counters["gups"] == gups["kvm"]  # no refault
    assert c.access("gru", mm, base + PS, 4) == b"same"
    assert c.node("gru").counters["gups"] > gups["gru"] or s["before"][base + PS] == merged
    # a write through kvm breaks COW: a fresh copy, the merged page untouched
    c.access("kvm", mm, base, data=b"mine")
    assert primary_pfn(c, mm, base) != merged
    assert c.read(mm, base, 4) == b"mine" and c.read(mm, base + PS, 4) == b"same"
    assert c.check() == 0


def test_wrapped_change_pte_zaps_kvm_too_so_it_refaults() -> None:
    c, mm, base, s = _ksm_scenario(wrap=True)
    merged = primary_pfn(c, mm, base)
    assert merged == primary_pfn(c, mm, base + PS)
    kvm = c.node("kvm")
    # start(CLEAR) zapped kvm before change_pte arrived: nothing to repoint
    assert kvm.counters["change_pte_hits"] == 0
    changed = [a for a in (base, base + PS) if s["before"][a] != merged]
    assert changed and all(a not in pfns(c, "kvm", mm) for a in changed)
    gups = kvm.counters["gups"]
    assert c.access("kvm", mm, changed[0], 4) == b"same"
    assert kvm.counters["gups"] == gups + 1  # refault
    assert pfns(c, "kvm", mm)[changed[0]] == merged
    assert c.check() == 0


# -- xpmem ------------------------------------------------------------------------------


def test_xpmem_invalidation_waits_for_its_in_flight_dma_to_drain() -> None:
    c = cluster("xpmem")
    mm = c.spawn()
    base = c.mmap(mm, 1)
    c.write(mm, base, page(b"xpm!"))
    segid = c.xpmem_make("xpmem", mm, base, PS)
    vaddr = c.xpmem_attach("xpmem", c.xpmem_get("xpmem", segid))
    c.fault("xpmem", 0, vaddr)
    pfn = primary_pfn(c, mm, base)
    assert c.model.memory.pincount[pfn] == 1
    token = c.submit_access("xpmem", 0, vaddr, 4)  # DmaRead on the wire
    (dma,) = c.ports["xpmem"].to_host
    assert isinstance(dma, DmaRead) and dma.pfn == pfn
    handle = c.begin(c.model.munmap(mm, base, PS))
    assert c.step_node("xpmem")  # the start: unmapped, but the ack waits for the DMA
    assert list(c.ports["xpmem"].to_host) == [dma]
    assert c.node("xpmem").status()["draining"] == 1
    assert c.step_host("xpmem")  # the DMA is served: the primary still maps pfn
    assert c.step_node("xpmem")  # its reply ends the drain: Unpin, then Ack
    unpin, ack = c.ports["xpmem"].to_host
    assert isinstance(unpin, Unpin) and unpin.pfns == [pfn] and isinstance(ack, Ack)
    c.finish(handle)
    assert c.result("xpmem", token).result == {"data": b"xpm!"}
    assert c.model.memory.is_free(pfn)
    assert c.check() == 0


def test_non_blockable_invalidation_gets_eagain_from_xpmem_and_the_caller_retries() -> None:
    c = cluster("kvm", "xpmem")
    mm = c.spawn()
    base = c.mmap(mm, 1)
    c.write(mm, base, page(b"oom?"))
    c.fault("kvm", mm, base)
    vaddr = c.xpmem_attach("xpmem", c.xpmem_get("xpmem", c.xpmem_make("xpmem", mm, base, PS)))
    c.fault("xpmem", 0, vaddr)
    pfn = primary_pfn(c, mm, base)
    with pytest.raises(KernelError) as err:
        c.run(c.model.madvise(mm, base, PS, "dontneed", blockable=False))
    assert err.value.errno is Errno.EAGAIN
    # kvm acked its start and got the compensating end; the ptes are untouched
    assert c.node("kvm").mm_state(mm).mmu_invalidate_in_progress == 0
    assert primary_pfn(c, mm, base) == pfn
    assert c.node("xpmem").counters["eagain"] == 1
    assert c.access("xpmem", 0, vaddr, 4) == b"oom?"
    c.run(c.model.madvise(mm, base, PS, "dontneed"))  # the blockable retry succeeds
    assert c.read(mm, base, 4) == b"\0\0\0\0"
    assert c.node("xpmem").translations() == {} and c.model.memory.is_free(pfn)
    assert c.check() == 0


def test_a_fenced_nodes_pins_are_dropped_and_the_invalidation_proceeds() -> None:
    c = cluster("xpmem")
    mm = c.spawn()
    base = c.mmap(mm, 2)
    c.write(mm, base, page(b"pin0"))
    c.write(mm, base + PS, page(b"pin1"))
    vaddr = c.xpmem_attach("xpmem", c.xpmem_get("xpmem", c.xpmem_make("xpmem", mm, base, 2 * PS)))
    c.fault("xpmem", 0, vaddr, 2)
    frames = [primary_pfn(c, mm, base), primary_pfn(c, mm, base + PS)]
    assert [c.model.memory.pincount[p] for p in frames] == [1, 1]
    c.hold("xpmem")  # hangs: the start will never be acked
    c.munmap(mm, base, 2 * PS)
    assert c.ports["xpmem"].state == "fenced" and c.counters["fenced_ack_deadline"] == 1
    assert all(c.model.memory.is_free(p) for p in frames)
    assert sum(c.model.memory.pincount) == 0
    c.heal("xpmem")
    c.pump()  # the node reads its backlog: its late ack is refused, then Fenced
    assert c.node("xpmem").translations() == {} and c.node("xpmem").epoch == 0
    assert c.counters["refused"] >= 1
    c.register("xpmem")
    with pytest.raises(KernelError) as err:
        c.access("xpmem", 0, vaddr, 4)  # its attachments went with the session
    assert err.value.errno is Errno.EFAULT
    assert c.check() == 0


# -- the other notifier events -----------------------------------------------------------


def test_cow_break_on_a_page_mapped_by_nodes() -> None:
    c = cluster("kvm", "gru")
    parent = c.spawn()
    base = c.mmap(parent, 1)
    c.write(parent, base, page(b"orig"))
    child = c.fork(parent)
    shared = primary_pfn(c, parent, base)
    assert primary_pfn(c, child, base) == shared
    assert c.access("kvm", parent, base, 4) == b"orig"
    assert c.access("gru", child, base, 4) == b"orig"
    assert pfns(c, "kvm", parent) == {base: shared} and pfns(c, "gru", child) == {base: shared}
    c.write(parent, base, b"new!")  # COW break in the parent
    mine = primary_pfn(c, parent, base)
    assert mine != shared and primary_pfn(c, child, base) == shared
    assert base not in pfns(c, "kvm", parent)  # the old translation went
    assert c.access("kvm", parent, base, 4) == b"new!"
    assert pfns(c, "kvm", parent) == {base: mine}
    assert c.access("gru", child, base, 4) == b"orig"
    c.access("gru", child, base, data=b"kid!")  # the child's own COW break
    assert c.read(child, base, 4) == b"kid!" and c.read(parent, base, 4) == b"new!"
    assert c.check() == 0


def test_reclaim_skips_a_page_a_node_says_is_young() -> None:
    c = cluster("kvm")
    mm = c.spawn()
    base = c.mmap(mm, 2)
    c.write(mm, base, page(b"hot!"))
    c.write(mm, base + PS, page(b"cold"))
    c.access("kvm", mm, base, 4)  # kvm's A bit on page 0
    c.fault("kvm", mm, base + PS)
    c.node("kvm").spte(mm, base + PS).accessed = False  # page 1 aged on kvm
    swapped = c.reclaim(mm, base, 2 * PS)
    assert swapped == 1
    assert primary_pfn(c, mm, base) is not None and primary_pfn(c, mm, base + PS) is None
    assert pfns(c, "kvm", mm) == {base: primary_pfn(c, mm, base)}
    assert c.reclaim(mm, base, 2 * PS) == 1  # page 0's A bit was cleared by the first pass
    assert c.access("kvm", mm, base + PS, 4) == b"cold"  # swap-in on the node's fault
    assert c.read(mm, base, 4) == b"hot!"
    assert c.check() == 0


def test_migration_repoints() -> None:
    c = cluster("kvm", "gru")
    mm = c.spawn()
    base = c.mmap(mm, 1)
    c.write(mm, base, page(b"move"))
    c.fault("kvm", mm, base)
    c.fault("gru", mm, base)
    old = primary_pfn(c, mm, base)
    assert c.migrate(mm, base, PS) == 1
    new = primary_pfn(c, mm, base)
    assert new != old and c.model.memory.is_free(old)
    assert pfns(c, "kvm", mm) == {} and pfns(c, "gru", mm) == {}
    assert c.access("kvm", mm, base, 4) == b"move" and c.access("gru", mm, base, 4) == b"move"
    assert pfns(c, "kvm", mm) == {base: new} and pfns(c, "gru", mm) == {base: new}
    assert c.check() == 0


def test_exit_releases_every_node_and_frees_everything() -> None:
    c = cluster("kvm", "gru", "xpmem")
    mm = c.spawn()
    base = c.mmap(mm, 3)
    for i in range(3):
        c.write(mm, base + i * PS, page(bytes([65 + i])))
    c.fault("kvm", mm, base, 3)
    c.fault("gru", mm, base, 3)
    vaddr = c.xpmem_attach("xpmem", c.xpmem_get("xpmem", c.xpmem_make("xpmem", mm, base, 3 * PS)))
    c.fault("xpmem", 0, vaddr, 3)
    assert sum(c.model.memory.pincount) == 3
    c.exit(mm)
    for name in ("kvm", "gru", "xpmem"):
        assert c.node(name).translations() == {}, name
    assert c.model.memory.in_use == 0 and sum(c.model.memory.pincount) == 0
    assert c.notifier.subscriptions.get(mm) is None
    with pytest.raises(KernelError) as err:
        c.access("xpmem", 0, vaddr, 1)
    assert err.value.errno is Errno.ESRCH  # the exporting mm is gone, its segments with it
    assert c.check() == 0


# -- the oracle can fail ----------------------------------------------------------------


@pytest.mark.parametrize("broken", [NeverZaps, AcksBeforeZapping])
def test_a_broken_node_is_caught_at_the_frame_free(broken: type[KvmMMU]) -> None:
    """Frame safety checked where it matters: the moment the model frees a
    frame a live node still maps, before any access could go stale."""
    c = LocalCluster(frames=64)
    c.add_node(node=broken("bad"))
    mm = c.spawn()
    base = c.mmap(mm, 1)
    c.write(mm, base, page(b"mine"))
    c.fault("bad", mm, base)
    with pytest.raises(AssertionError, match="freed while bad still maps it"):
        c.munmap(mm, base, PS)


@pytest.mark.parametrize("broken", [NeverZaps, AcksBeforeZapping])
def test_a_broken_node_makes_the_oracle_count_a_stale_access(broken: type[KvmMMU]) -> None:
    c = LocalCluster(frames=64, check_frees=False)  # let the free happen: the oracle's turn
    c.add_node(node=broken("bad"))
    mm = c.spawn()
    base = c.mmap(mm, 1)
    c.write(mm, base, page(b"mine"))
    c.fault("bad", mm, base)
    old = primary_pfn(c, mm, base)
    if broken is NeverZaps:
        c.munmap(mm, base, PS)  # frees the frame the node still maps
        with pytest.raises(AssertionError, match="the primary does not"):
            c.check()  # quiescent: the stale translation is seen before any access
        token = c.submit_access("bad", mm, base, 4)
    else:
        handle = c.begin(c.model.munmap(mm, base, PS))
        c.pump()  # acked, but still mapped
        token = c.submit_access("bad", mm, base, 4)  # a DMA behind the ack
        c.finish(handle)  # the frame is freed before the host reads that DMA
    done = c.wait("bad", token)
    assert done.error is not None and done.error.errno is Errno.ESTALE
    assert c.model.memory.is_free(old)
    assert c.stale_accesses == 1


def test_explicit_subscribe_and_unsubscribe_commands() -> None:
    """``mmn subscribe``/``unsubscribe``: register without a fault; unregister
    releases the node's mappings of the mm and nothing reaches it afterwards."""
    c = cluster("kvm", "gru")
    mm = c.spawn()
    base = c.mmap(mm, 2)
    c.write(mm, base, page(b"subs"))
    assert c.subscribe("gru", mm) == {"mm": mm, "subscribed": True}
    assert c.notifier.subscribed(mm) == ["gru"]
    assert c.subscribe("gru", mm) == {"mm": mm, "subscribed": True}  # idempotent
    c.fault("kvm", mm, base, 2)
    assert pfns(c, "kvm", mm)
    assert c.unsubscribe("kvm", mm) == {"mm": mm, "subscribed": False}
    assert pfns(c, "kvm", mm) == {} and c.node("kvm").counters["gups"] == 1
    assert sorted(c.notifier.subscribed(mm)) == ["gru"]
    c.munmap(mm, base, 2 * PS)  # kvm hears nothing of it
    assert c.unsubscribe("kvm", mm) == {"mm": mm, "subscribed": False}  # not subscribed: nothing to do
    with pytest.raises(KernelError) as err:
        c.subscribe("kvm", 999)
    assert err.value.errno is Errno.ESRCH
    assert c.check() == 0
