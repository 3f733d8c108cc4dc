"""Issue 12's host-model items, on real processes (``mmn up``) through the admin API.

Each test starts a cluster with the ``mmnotify`` pytest plugin and checks a
kernel behaviour as a user of ``mmn`` sees it: idle page tracking
(mm/page_idle.c, KVM's ``access_tracking_perf_test``), reclaim and migration
through the reverse map (mm/rmap.c, mm/migrate.c, mm/vmscan.c;
``tools/testing/selftests/mm/rmap.c``), KSM (mm/ksm.c,
``ksm_functional_tests.c``) and mprotect's notifications (mm/mprotect.c).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import mmnotify

pytestmark = pytest.mark.integration

PS = 4096


async def counter(c: mmnotify.Client, name: str) -> int:
    return (await c.status()).counters.get(name, 0)


async def test_access_tracking_marks_idle_and_reads_back_every_page_a_node_touched(
        mmn_cluster_factory: Callable[..., Any]) -> None:
    """``access_tracking_perf_test``: mark a range idle, let the guest (a kvm
    node) touch every page, read idleness back: all accessed.  A second
    round where it touches half reads the other half idle; the touched half
    may read idle too, as on real hardware: ``clear_young`` does not flush
    the secondary TLB (virt/kvm/kvm_main.c ``kvm_mmu_notifier_clear_young``),
    so accesses through cached entries set no accessed bit -- the reason the
    kernel's test tolerates a share of pages still idle."""
    c = mmn_cluster_factory(kvm=1, gru=0, xpmem=0).client
    pages = 16
    mm = await c.spawn()
    addr = await c.mmap(mm, pages, fill=0x41)
    await c.fault("kvm0", mm=mm, addr=addr, pages=pages)
    marked = await c.call("idle", mm=mm, addr=addr, length=pages * PS, op="mark")
    assert marked["idle"] == pages and [p[0] for p in marked["pages"]] == [addr + i * PS for i in range(pages)]
    for i in range(pages):
        await c.access("kvm0", mm=mm, addr=addr + i * PS, length=1)
    back = await c.call("idle", mm=mm, addr=addr, length=pages * PS, op="read")
    assert back["idle"] == 0 and back["accessed"] == pages
    await c.call("idle", mm=mm, addr=addr, length=pages * PS, op="mark")
    for i in range(0, pages, 2):
        await c.access("kvm0", mm=mm, addr=addr + i * PS, length=1)
    back = await c.call("idle", mm=mm, addr=addr, length=pages * PS, op="read")
    assert all(p[2] for i, p in enumerate(back["pages"]) if i % 2) and back["idle"] >= pages // 2
    assert (await c.status()).stale_accesses == 0


async def test_migrate_and_swap_take_forked_and_ksm_pages_through_the_reverse_map(
        mmn_cluster_factory: Callable[..., Any]) -> None:
    """rmap.c's migrate-a-forked-page and migrate-a-KSM-page with ``mmn
    migrate``: every mapping is repointed, each with its CLEAR invalidation
    (``try_to_migrate_one``), the nodes refault the new page; ``mmn swap`` of
    a forked page swaps it out of both mms."""
    c = mmn_cluster_factory(kvm=1, gru=1, xpmem=0).client
    mm = await c.spawn()
    addr = await c.mmap(mm, 2, fill=0x46)
    child = await c.fork(mm)
    for node in ("kvm0", "gru0"):
        await c.fault(node, mm=child, addr=addr, pages=1)
    before = (await c.fault("kvm0", mm=mm, addr=addr)).pages[0].pfn
    starts = await counter(c, "notifier_invalidate_range_start")
    assert await c.migrate(mm, addr, PS) == 1
    assert await counter(c, "notifier_invalidate_range_start") > starts
    moved = (await c.fault("kvm0", mm=child, addr=addr)).pages[0].pfn
    assert moved != before and (await c.fault("kvm0", mm=mm, addr=addr)).pages[0].pfn == moved
    assert (await c.access("gru0", mm=child, addr=addr, length=2)).data == b"FF"
    # reclaim of the second page, shared by fork: out of both mms
    assert await c.swap(mm, addr + PS, PS) == 1
    assert [m.swapped for m in (await c.status()).mms if m.mm in (mm, child)] == [1, 1]
    assert await c.read(child, addr + PS, 1) == b"F" and await c.read(mm, addr + PS, 1) == b"F"
    # a KSM page merged across two mms migrates with its stable node
    one, two = await c.spawn(), await c.spawn()
    a = await c.mmap(one, 1, mergeable=True, fill=0x4B)
    b = await c.mmap(two, 1, mergeable=True, fill=0x4B)
    stats = await c.merge(2)
    assert (stats["pages_shared"], stats["pages_sharing"]) == (1, 1)
    kpfn = (await c.fault("kvm0", mm=two, addr=b)).pages[0].pfn
    assert await c.migrate(one, a, PS) == 1
    new = (await c.fault("kvm0", mm=two, addr=b)).pages[0].pfn
    assert new != kpfn and (await c.fault("kvm0", mm=one, addr=a)).pages[0].pfn == new
    stats = await c.merge(1)
    assert (stats["pages_shared"], stats["pages_sharing"]) == (1, 1)
    assert (await c.status()).stale_accesses == 0


async def test_ksm_merges_prot_none_ignores_shared_and_refuses_max_page_sharing_while_shared(
        mmn_cluster_factory: Callable[..., Any]) -> None:
    """ksm_functional_tests.c ``test_prot_none``; ``ksm_madvise`` ignoring a
    shared mapping; ``max_page_sharing_store``'s EBUSY; a page shared by fork
    counted once (``unstable_tree_search_insert``)."""
    c = mmn_cluster_factory(kvm=1, gru=0, xpmem=0).client
    await c.ksm(run=0)  # the scans below are ours
    mm = await c.spawn()
    addr = await c.mmap(mm, 4, mergeable=True, fill=0x11)
    await c.mprotect(mm, addr, 4 * PS, "none")
    stats = await c.merge(2)
    assert (stats["pages_shared"], stats["pages_sharing"]) == (1, 3)
    with pytest.raises(mmnotify.KernelError) as err:
        await c.ksm(max_page_sharing=16)
    assert err.value.errno is mmnotify.Errno.EBUSY
    await c.madvise(mm, addr, 4 * PS, "unmergeable")
    await c.mprotect(mm, addr, 4 * PS, "r")
    assert await c.read(mm, addr + 3 * PS, 1) == b"\x11"
    await c.ksm(run=2)  # unmerge all: nothing shared, the knob may change
    assert (await c.ksm(max_page_sharing=16))["max_page_sharing"] == 16
    shared = await c.mmap(mm, 2, shared=True, fill=0x22)
    await c.madvise(mm, shared, 2 * PS, "mergeable")  # ignored, not EINVAL
    assert not any(v["mergeable"] for v in (await c.status(mm=mm)).mms[0].vmas if v["start"] == shared)
    other = await c.spawn()
    lone = await c.mmap(other, 1, mergeable=True, fill=0x33)
    await c.fork(other)
    await c.ksm(run=0)
    stats = await c.merge(2)
    assert await c.read(other, lone, 1) == b"3"
    assert (stats["pages_shared"], stats["pages_unshared"]) == (0, 1)


async def test_mprotect_upgrades_notify_the_node_that_maps_the_range(
        mmn_cluster_factory: Callable[..., Any]) -> None:
    """mm/mprotect.c ``change_protection``: PROTECTION_VMA start/end for the
    populated range of every vma it changes, an upgrade as much as a
    downgrade; an unpopulated vma changes silently."""
    c = mmn_cluster_factory(kvm=1, gru=0, xpmem=0).client
    mm = await c.spawn()
    addr = await c.mmap(mm, 2, prot="r", fill=None)
    await c.fault("kvm0", mm=mm, addr=addr, pages=2)
    starts = await counter(c, "notifier_invalidate_range_start")
    await c.mprotect(mm, addr, 2 * PS, "rw")
    assert await counter(c, "notifier_invalidate_range_start") == starts + 1
    empty = await c.mmap(mm, 2)
    await c.mprotect(mm, empty, 2 * PS, "r")
    assert await counter(c, "notifier_invalidate_range_start") == starts + 1
