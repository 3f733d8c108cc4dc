"""XPMEM as hpc/xpmem does it (kernel/xpmem_attach.c, xpmem_pfn.c,
xpmem_make.c, xpmem_mmu_notifier.c): the in-process stack first (exact
values), then the real processes through the admin API.
"""

from __future__ import annotations

from typing import Any

import pytest

import mmnotify
from mmnotify.local import LocalCluster
from protocol.types import Errno, KernelError

PS = 4096


def cluster(**kinds: str) -> LocalCluster:
    return LocalCluster(frames=128, nodes=kinds or {"xpmem": "xpmem"})


def attached(c: LocalCluster, name: str, mm: int, base: int, npages: int, segid: int | None = None) -> tuple[int, int]:
    """(segid, vaddr): ``name`` attaches ``npages`` of ``mm`` at ``base``
    through a read-write permit (exported by ``xpmem`` unless ``segid``)."""
    if segid is None:
        segid = c.xpmem_make("xpmem", mm, base, npages * PS)
    return segid, c.xpmem_attach(name, c.xpmem_get(name, segid))


def errno_of(call: Any) -> Errno | None:
    try:
        call()
    except KernelError as exc:
        return exc.errno
    return None


# -- the pin's write flag follows the source vma (xpmem_pin_page) ------------------


def test_after_owners_mprotect_ro_reads_refault_and_succeed_writes_fail() -> None:
    c = cluster()
    mm = c.spawn()
    base = c.mmap(mm, 2)
    c.write(mm, base, b"hello")
    _, vaddr = attached(c, "xpmem", mm, base, 2)
    # a read of a writable vma pins writable (FOLL_WRITE): a later write needs no new GUP
    assert c.access("xpmem", 0, vaddr, 5) == b"hello"
    gups = c.node("xpmem").counters["gups"]
    assert c.access("xpmem", 0, vaddr, data=b"HELLO") == 5
    assert c.node("xpmem").counters["gups"] == gups
    c.mprotect(mm, base, 2 * PS, "r")
    assert c.node("xpmem").translations() == {}  # the owner's mprotect zapped it
    assert c.access("xpmem", 0, vaddr, 5) == b"HELLO"  # re-faults, pinned read-only
    assert c.node("xpmem").counters["gups"] > gups
    assert errno_of(lambda: c.access("xpmem", 0, vaddr, data=b"x")) is Errno.EPERM
    assert c.access("xpmem", 0, vaddr + PS, 4) == bytes(4)
    assert c.check() == 0


# -- remove reaches every importer (xpmem_remove_seg -> xpmem_clear_PTEs) ------------


def test_remove_zaps_and_unpins_every_importers_attachments() -> None:
    c = cluster(xpmem="xpmem", xpmem2="xpmem", xpmem3="xpmem")
    mm = c.spawn()
    base = c.mmap(mm, 2)
    c.write(mm, base, b"secret")
    segid, own = attached(c, "xpmem", mm, base, 2)
    _, other = attached(c, "xpmem2", mm, base, 2, segid)
    apid3 = c.xpmem_get("xpmem3", segid)  # a permit, nothing attached
    for name, vaddr in (("xpmem", own), ("xpmem2", other)):
        assert c.access(name, 0, vaddr, 6) == b"secret"
        assert c.access(name, 0, vaddr + PS, data=b"x") == 1
    assert c.node("xpmem2").pinned_pages() == 2
    assert c.xpmem_remove("xpmem", segid) == {"segid": segid}
    for name, vaddr in (("xpmem", own), ("xpmem2", other)):
        xp = c.node(name)
        assert xp.pinned_pages() == 0 and xp.translations() == {}
        assert errno_of(lambda: c.access(name, 0, vaddr, 6)) is Errno.ENOENT
        assert errno_of(lambda: c.access(name, 0, vaddr, data=b"y")) is Errno.ENOENT
        assert errno_of(lambda: c.fault(name, 0, vaddr)) is Errno.ENOENT
        assert errno_of(lambda: c.xpmem_get(name, segid)) is Errno.ENOENT
    assert errno_of(lambda: c.xpmem_attach("xpmem3", apid3)) is Errno.ENOENT
    assert c.xpmem_detach("xpmem2", other)["unpinned"] == 0
    assert c.read(mm, base, 6) == b"secret"  # nothing written after the remove
    assert all(not c.model.pins.get(n) for n in ("xpmem", "xpmem2", "xpmem3"))  # the host's side too
    assert c.check() == 0


def test_remove_of_unknown_or_foreign_segment_changes_nothing() -> None:
    c = cluster(xpmem="xpmem", xpmem2="xpmem")
    mm = c.spawn()
    base = c.mmap(mm, 1)
    segid, vaddr = attached(c, "xpmem", mm, base, 1)
    assert errno_of(lambda: c.xpmem_remove("xpmem", segid + 7)) is Errno.ENOENT
    assert errno_of(lambda: c.xpmem_remove("xpmem2", segid)) is Errno.EACCES
    assert c.access("xpmem", 0, vaddr, 1) == b"\0"


# -- pin accounting (/proc/xpmem's global pinned / unpinned page counters) ----------


def pins(c: LocalCluster, *names: str) -> list[tuple[int, int]]:
    """(pinned, unpinned) of the host, then of each node."""
    out = [(c.model.pages_pinned, c.model.pages_unpinned)]
    for name in names:
        counters = c.node(name).status()["counters"]
        out.append((counters["pages_pinned"], counters["pages_unpinned"]))
    return out


def balanced(c: LocalCluster, *names: str) -> bool:
    c.pump()  # a detach completes before the host has read its Unpins
    return all(p == u for p, u in pins(c, *names)) and all(not c.model.pins.get(n) for n in names)


def test_pinned_equals_unpinned_after_detach_release_remove_exit_and_fence() -> None:
    c = cluster(xpmem="xpmem", xpmem2="xpmem")
    names = ("xpmem", "xpmem2")
    mm = c.spawn()
    base = c.mmap(mm, 4)

    def touch(name: str, vaddr: int, npages: int) -> None:
        for i in range(npages):
            c.access(name, 0, vaddr + i * PS, 1)

    segid, vaddr = attached(c, "xpmem", mm, base, 4)
    touch("xpmem", vaddr, 4)
    assert pins(c, *names)[:2] == [(4, 0), (4, 0)]
    c.xpmem_detach("xpmem", vaddr)  # detach
    assert balanced(c, *names) and pins(c)[0] == (4, 4)
    apid = c.xpmem_get("xpmem2", segid)
    touch("xpmem2", c.xpmem_attach("xpmem2", apid), 2)
    assert not balanced(c, *names)
    c.xpmem_release("xpmem2", apid)  # release
    assert balanced(c, *names)
    _, v2 = attached(c, "xpmem2", mm, base, 4, segid)
    touch("xpmem2", v2, 3)
    c.xpmem_remove("xpmem", segid)  # remove, from the other node
    assert balanced(c, *names)
    seg2, v3 = attached(c, "xpmem2", mm, base, 4)
    touch("xpmem2", v3, 4)
    c.run(c.model.exit_mm(mm))  # exit of the exporter
    assert balanced(c, *names)
    mm2 = c.spawn()
    b2 = c.mmap(mm2, 2)
    _, v4 = attached(c, "xpmem2", mm2, b2, 2, c.xpmem_make("xpmem2", mm2, b2, 2 * PS))
    touch("xpmem2", v4, 2)
    c.fence("xpmem2")  # the host drops a fenced node's pins
    c.pump()
    assert balanced(c, *names)
    # a revoke: the host drops the node's pins of that mm itself, and counts them
    mm3 = c.spawn()
    b3 = c.mmap(mm3, 3)
    _, v5 = attached(c, "xpmem", mm3, b3, 3)
    touch("xpmem", v5, 3)
    assert pins(c)[0] == (4 + 2 + 3 + 4 + 2 + 3, 4 + 2 + 3 + 4 + 2)
    c.admin("revoke", node="xpmem", mm=mm3)
    c.pump()
    assert pins(c)[0] == (4 + 2 + 3 + 4 + 2 + 3,) * 2 and balanced(c, *names)
    assert c.check() == 0


# -- the real processes (mmn up), through the admin API ------------------------------


async def fails(call: Any) -> mmnotify.Errno:
    with pytest.raises(mmnotify.KernelError) as err:
        await call
    return err.value.errno


@pytest.mark.mmn_cluster(kvm=0, gru=0, xpmem=3)
async def test_real_processes_attach_detach_mprotect_and_remove(mmn_cluster: Any) -> None:
    c = mmn_cluster.client
    E = mmnotify.Errno
    mm = await c.spawn()
    addr = await c.mmap(mm, pages=2, fill=0x41)
    segid = await c.xpmem_make("xpmem0", mm=mm, addr=addr, length=2 * PS, mode=0o666)
    # attach asks for RDWR: a read-only permit is refused
    ro = await c.xpmem_get("xpmem1", segid=segid, write=False)
    assert await fails(c.xpmem_attach("xpmem1", apid=ro, length=2 * PS)) is E.EACCES
    own = await c.xpmem_attach("xpmem0", apid=await c.xpmem_get("xpmem0", segid=segid, write=True), length=2 * PS)
    other = await c.xpmem_attach("xpmem1", apid=await c.xpmem_get("xpmem1", segid=segid),  # RDWR by default
                                 length=2 * PS)
    # detach where nothing is attached: 0
    await c.xpmem_detach("xpmem2", addr=other)
    for node, vaddr in (("xpmem0", own), ("xpmem1", other)):
        assert (await c.access(node, mm=mm, addr=vaddr, length=2)).data == b"AA"
    # the owner's mprotect(RO): reads re-fault and succeed, writes fail
    await c.mprotect(mm, addr, 2 * PS, "r")
    assert (await c.access("xpmem1", mm=mm, addr=other, length=2)).data == b"AA"
    assert await fails(c.access("xpmem1", mm=mm, addr=other, data=b"x")) is E.EPERM
    await c.mprotect(mm, addr, 2 * PS, "rw")
    assert (await c.access("xpmem1", mm=mm, addr=other + PS, data=b"B")).written == 1
    # remove reaches every importer: zapped, unpinned, ENOENT from then on
    await c.xpmem_remove("xpmem0", segid=segid)
    status = await c.status()
    for node, vaddr in (("xpmem0", own), ("xpmem1", other)):
        assert status.node(node).mapped_pages == 0
        assert await fails(c.access(node, mm=mm, addr=vaddr, length=1)) is E.ENOENT
        assert await fails(c.fault(node, mm=mm, addr=vaddr)) is E.ENOENT
    assert await fails(c.xpmem_get("xpmem2", segid=segid, write=True)) is E.ENOENT
    assert await fails(c.xpmem_attach("xpmem1", apid=ro, length=PS)) is E.ENOENT
    assert (await c.read(mm, addr + PS, 2)) == b"BA"
    assert status.stale_accesses == 0
    # /proc/xpmem's counters: every pin taken was given back, host-wide and per node
    assert status.counters["pages_pinned"] == status.counters["pages_unpinned"] > 0
    for node in ("xpmem0", "xpmem1", "xpmem2"):
        counters = status.node(node).counters
        assert counters["pages_pinned"] == counters["pages_unpinned"], (node, counters)
    assert status.node("xpmem1").counters["pages_pinned"] > 0


# -- pins hold against background work (xpmem_mmu_notifier.c: the owner's context only)


def test_ksm_reclaim_and_migration_leave_an_attached_page_until_it_is_detached() -> None:
    """ksmd's, kswapd's and migration's invalidations reach the xpmem node,
    which acks them keeping its pin (``Ack.kept``); KSM's write_protect_page
    count check, try_to_unmap and try_to_migrate then find the page pinned
    and leave it.  The owner's munmap still reaches the node afterwards (its
    served range was kept).  Once detached, all three proceed."""
    c = cluster(xpmem="xpmem", kvm="kvm")
    mm = c.spawn()
    base = c.mmap(mm, 3, mergeable=True)
    for i in range(2):
        c.write(mm, base + i * PS, b"twin")  # pages 0 and 1 identical; page 2 stays zero
    segid, vaddr = attached(c, "xpmem", mm, base, 1)
    assert c.access("xpmem", 0, vaddr, 4) == b"twin"
    c.fault("kvm", mm, base, 2)
    pfn = c.model.pte(mm, base)[0]
    stats = c.merge(2)
    assert (stats["pages_shared"], stats["pages_sharing"]) == (0, 0)  # its twin has nothing to merge with
    assert c.migrate(mm, base, PS) == 0
    assert c.reclaim(mm, base, PS) == 0  # a young pte gets a second chance, else try_to_unmap fails
    assert c.reclaim(mm, base, PS) == 0
    assert c.model.pte(mm, base)[0] == pfn and c.model.memory.pincount[pfn] == 1
    xp = c.node("xpmem")
    assert xp.translations() == {mm: {base: pfn}} and xp.counters["background_kept"] >= 3
    assert c.model.counters["migrate_failed"] == 1 and c.model.counters["reclaim_failed"] >= 1
    assert c.access("xpmem", 0, vaddr, data=b"TWIN") == 4 and c.read(mm, base, 4) == b"TWIN"
    c.write(mm, base, b"twin")
    assert c.check() == 0
    # detached: ksmd merges it, migration moves it, reclaim swaps it out
    c.xpmem_detach("xpmem", vaddr)
    c.pump()
    stats = c.merge(2)
    assert (stats["pages_shared"], stats["pages_sharing"]) == (1, 1)
    kpfn = c.model.pte(mm, base)[0]
    assert c.migrate(mm, base, PS) == 1 and c.model.pte(mm, base)[0] not in (kpfn, 0)
    # the KSM page, both mappings in one slot (a young pte: a second pass)
    assert c.reclaim(mm, base, 2 * PS) + c.reclaim(mm, base, 2 * PS) == 1
    assert c.model.pte(mm, base) is None and c.model.pte(mm, base + PS) is None
    assert c.read(mm, base, 4) == c.read(mm, base + PS, 4) == b"twin"
    assert balanced(c, "xpmem") and c.check() == 0


def test_owners_munmap_still_unpins_after_a_background_invalidation_kept_the_pin() -> None:
    """The host still counts the range as served to the node that kept it, so
    the owner's munmap reaches it: zapped, unpinned, pins balanced."""
    c = cluster()
    mm = c.spawn()
    base = c.mmap(mm, 1)
    c.write(mm, base, b"pinned")
    _, vaddr = attached(c, "xpmem", mm, base, 1)
    assert c.access("xpmem", 0, vaddr, 6) == b"pinned"
    assert c.migrate(mm, base, PS) == 0
    assert c.node("xpmem").counters["background_kept"] == 1
    c.munmap(mm, base, PS)
    assert c.node("xpmem").translations() == {} and balanced(c, "xpmem")
    assert c.check() == 0


@pytest.mark.mmn_cluster(kvm=1, gru=0, xpmem=1)
def test_real_processes_mmn_merge_migrate_swap_leave_an_attached_page(
        mmn_cluster: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """On ``mmn up``: an xpmem node attaches a page and reads it; ``mmn
    merge``, ``mmn migrate`` and ``mmn swap`` leave it (same pfn, same pin)
    while attached, and take it once detached."""
    import json

    from mmn.cli import main

    c = mmn_cluster.sync()
    flags = ["--host", mmn_cluster.admin, *(["--keys", mmn_cluster.keys] if mmn_cluster.keys else []), "--json"]

    def mmn(*argv: str) -> dict[str, Any]:
        capsys.readouterr()
        assert main([*flags, *argv]) == 0
        return json.loads(capsys.readouterr().out)

    mm = c.spawn()
    addr = c.mmap(mm, pages=2, fill=0x54, mergeable=True)  # two identical pages
    segid = c.xpmem_make("xpmem0", mm=mm, addr=addr, length=PS, mode=0o600)
    vaddr = c.xpmem_attach("xpmem0", apid=c.xpmem_get("xpmem0", segid=segid, write=True), length=PS)
    assert c.access("xpmem0", mm=mm, addr=vaddr, length=2).data == b"TT"
    pfn = c.fault("kvm0", mm=mm, addr=addr).pages[0].pfn
    ksm = mmn("merge", "--full-scans", "2")
    assert (ksm["pages_shared"], ksm["pages_sharing"]) == (0, 0)
    assert mmn("migrate", "--mm", str(mm), hex(addr), str(PS))["migrated"] == 0
    for _ in range(2):  # the first pass may find it young
        assert mmn("swap", "--mm", str(mm), hex(addr), str(PS))["swapped"] == 0
    assert c.fault("kvm0", mm=mm, addr=addr).pages[0].pfn == pfn
    status = c.status()
    assert status.node("xpmem0").mapped_pages == 1 and status.node("xpmem0").counters["background_kept"] >= 3
    assert c.access("xpmem0", mm=mm, addr=vaddr, length=2).data == b"TT"
    c.xpmem_detach("xpmem0", addr=vaddr)
    ksm = mmn("merge", "--full-scans", "2")
    assert (ksm["pages_shared"], ksm["pages_sharing"]) == (1, 1)
    kpfn = c.fault("kvm0", mm=mm, addr=addr).pages[0].pfn
    assert mmn("migrate", "--mm", str(mm), hex(addr), str(PS))["migrated"] == 1
    assert c.fault("kvm0", mm=mm, addr=addr).pages[0].pfn != kpfn
    swapped = sum(mmn("swap", "--mm", str(mm), hex(addr), str(2 * PS))["swapped"] for _ in range(2))
    assert swapped == 1  # the KSM page, both mappings, in one slot
    assert c.read(mm, addr, 2) == b"TT" and c.read(mm, addr + PS, 2) == b"TT"
    status = c.status()
    assert status.stale_accesses == 0
    assert status.counters["pages_pinned"] == status.counters["pages_unpinned"] > 0
