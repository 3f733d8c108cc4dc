"""XPMEM as hpc/xpmem does it (kernel/xpmem_attach.c, xpmem_pfn.c,
xpmem_make.c, xpmem_mmu_notifier.c): the in-process stack first (exact
values), then the real processes through the admin API.
"""

from __future__ import annotations

from typing import Any

import pytest

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
