"""A node touches only the memory it was granted (issue 13, broker/grants.py).

The host core is driven by hand here, as a hostile node key holder would
drive it: registered, but pointed at no mm by any operator.  Every refusal
is EACCES, counted apart from ``stale_accesses``; the oracle still counts a
real stale access of a granted node.  The real-process test (a raw node
socket against ``mmn host``, the grant given with ``mmn grant``) is in
tests/test_integration.py.
"""

from __future__ import annotations

from typing import Any

from broker.core import CoreConfig, HostCore
from broker.mm import Model
from protocol.messages import (
    Ack,
    DmaRead,
    DmaReply,
    DmaWrite,
    Error,
    Gup,
    GupReply,
    InvalidateRangeEnd,
    InvalidateRangeStart,
    Ok,
    Release,
    Subscribe,
)
from test_core import admin_replies, register, sends

PS = 4096


class Admin:
    def __init__(self, core: HostCore) -> None:
        self.core = core
        self.ref = 100

    def __call__(self, command: str, **args: Any) -> Any:
        self.ref += 1
        (reply,) = admin_replies(self.core.submit_admin("cli", self.ref, command, args, 0.0))
        return reply


def setup(frames: int = 64) -> tuple[HostCore, Admin, int, int, int]:
    core = HostCore(Model(frames=frames, page_size=PS, swap_slots=64), CoreConfig(page_size=PS))
    admin = Admin(core)
    epoch = register(core).epoch
    mm = admin("spawn").result["mm"]
    addr = admin("mmap", mm=mm, pages=4, fill=0x33).result["addr"]
    return core, admin, epoch, mm, addr


def node(core: HostCore, msg: Any) -> Any:
    (reply,) = sends(core.receive_node(b"n1", msg, None, 0.0), b"n1")
    return reply


def test_a_node_no_operator_pointed_at_an_mm_is_refused_everything_and_stale_counts_nothing() -> None:
    core, _admin, epoch, mm, addr = setup()
    pfn = core.model.pte(mm, addr)[0]  # the pfn a guess would name
    sub = node(core, Subscribe(id=2, epoch=epoch, mm=mm))
    assert isinstance(sub, Error) and sub.code == "EACCES"
    gup = node(core, Gup(id=3, epoch=epoch, mm=mm, addr=addr, npages=1, write=False))
    assert isinstance(gup, Error) and gup.code == "EACCES"
    read = node(core, DmaRead(id=4, epoch=epoch, mm=mm, addr=addr, pfn=pfn, offset=0, length=4))
    write = node(core, DmaWrite(id=5, epoch=epoch, mm=mm, addr=addr, pfn=pfn, offset=0, data=b"evil"))
    assert read == DmaReply(ref=4, errno="EACCES") and write == DmaReply(ref=5, errno="EACCES")
    assert core.counters["refused_accesses"] == 4
    assert core.model.stale_accesses == 0 and core.notifier.subscribed(mm) == []
    assert core.model.memory.read(pfn, 0, 4) == b"\x33" * 4


def test_a_granted_node_guessing_a_frame_is_a_forgery_and_a_stale_translation_is_still_stale() -> None:
    core, admin, epoch, mm, addr = setup()
    assert admin("grant", node="kvm9", mm=mm).ok
    assert node(core, Subscribe(id=2, epoch=epoch, mm=mm)) == Ok(ref=2)
    gup = node(core, Gup(id=3, epoch=epoch, mm=mm, addr=addr, npages=1, write=False))
    assert isinstance(gup, GupReply) and not gup.errno
    handed = gup.pages[0][1]
    other = core.model.pte(mm, addr + PS)[0]  # populated, never handed to the node
    forged = node(core, DmaRead(id=4, epoch=epoch, mm=mm, addr=addr + PS, pfn=other, offset=0, length=4))
    assert forged == DmaReply(ref=4, errno="EACCES")
    assert core.counters["forged_accesses"] == 1 and core.model.stale_accesses == 0
    # the oracle proper: the node keeps the translation past a munmap it acked
    out = core.submit_admin("cli", 9, "munmap", {"mm": mm, "addr": addr, "length": PS}, 0.0)
    (start,) = sends(out, b"n1")
    assert isinstance(start, InvalidateRangeStart)
    (end,) = sends(core.receive_node(b"n1", Ack(ref=start.id), None, 0.0), b"n1")
    assert isinstance(end, InvalidateRangeEnd)
    stale = node(core, DmaRead(id=5, epoch=epoch, mm=mm, addr=addr, pfn=handed, offset=0, length=4))
    assert stale == DmaReply(ref=5, errno="ESTALE") and core.model.stale_accesses == 1
    assert core.counters["forged_accesses"] == 1  # unchanged: a stale access is not a forgery


def test_a_read_only_grant_refuses_writes() -> None:
    core, admin, epoch, mm, addr = setup()
    assert admin("grant", node="kvm9", mm=mm, read_only=True).ok
    assert node(core, Subscribe(id=2, epoch=epoch, mm=mm)) == Ok(ref=2)
    write_gup = node(core, Gup(id=3, epoch=epoch, mm=mm, addr=addr, npages=1, write=True))
    assert isinstance(write_gup, Error) and write_gup.code == "EACCES"
    gup = node(core, Gup(id=4, epoch=epoch, mm=mm, addr=addr, npages=1, write=False))
    assert isinstance(gup, GupReply) and not gup.errno
    pfn = gup.pages[0][1]
    assert node(core, DmaWrite(id=5, epoch=epoch, mm=mm, addr=addr, pfn=pfn, offset=0, data=b"x")) == \
        DmaReply(ref=5, errno="EACCES")
    read = node(core, DmaRead(id=6, epoch=epoch, mm=mm, addr=addr, pfn=pfn, offset=0, length=2))
    assert read == DmaReply(ref=6, data=b"\x33\x33")


def pin_two(core: HostCore, epoch: int, mm: int, addr: int) -> None:
    """Pin two pages through an XPMEM permit of the node's own segment."""
    seg = core.segments.make("kvm9", mm, addr, 2 * PS, 0o600)
    core.segments.get("kvm9", seg.segid, True)
    gup = node(core, Gup(id=3, epoch=epoch, mm=mm, addr=addr, npages=2, write=True, pin=True))
    assert isinstance(gup, GupReply) and not gup.errno and len(gup.pages) == 2
    assert sum(core.model.memory.pincount) == 2


def test_revoke_releases_the_mm_on_the_node_drops_its_pins_and_refuses_what_follows() -> None:
    core, admin, epoch, mm, addr = setup()
    assert admin("grant", node="kvm9", mm=mm).ok
    assert node(core, Subscribe(id=2, epoch=epoch, mm=mm)) == Ok(ref=2)
    pin_two(core, epoch, mm, addr)
    out = core.submit_admin("cli", 20, "revoke", {"node": "kvm9", "mm": mm}, 0.0)
    (release,) = sends(out, b"n1")
    assert isinstance(release, Release) and release.mm == mm and not admin_replies(out)
    (reply,) = admin_replies(core.receive_node(b"n1", Ack(ref=release.id), None, 0.0))
    assert reply.ok and reply.result["unpinned"] == 2 and core.notifier.subscribed(mm) == []
    assert sum(core.model.memory.pincount) == 0 and not core.segments.permits
    for msg in (Gup(id=4, epoch=epoch, mm=mm, addr=addr, npages=1, write=False), Subscribe(id=5, epoch=epoch, mm=mm)):
        refused = node(core, msg)
        assert isinstance(refused, Error) and refused.code == "EACCES"
    again = admin("revoke", node="kvm9", mm=mm)
    assert not again.ok and again.errno == "ENOENT"
    core.model.check_invariants()


def test_an_exited_mm_releases_every_pin_and_every_grant() -> None:
    """hpc/xpmem ends every attachment in its ->release; here the host drops
    the pins itself: 2 pinned pages of an mm that exits leave no frame behind."""
    core, admin, epoch, mm, addr = setup()
    assert admin("grant", node="kvm9", mm=mm).ok
    assert node(core, Subscribe(id=2, epoch=epoch, mm=mm)) == Ok(ref=2)
    pin_two(core, epoch, mm, addr)
    out = core.submit_admin("cli", 30, "exit", {"mm": mm}, 0.0)
    msgs = sends(out, b"n1")
    assert [type(m) for m in msgs] == [Release]
    (reply,) = admin_replies(core.receive_node(b"n1", Ack(ref=msgs[0].id), None, 0.0))
    assert reply.ok
    assert sum(core.model.memory.pincount) == 0 and core.model.memory.in_use == 0
    assert core.grants.of("kvm9") == {} and not core.segments.permits
    core.model.check_invariants()


def test_grant_checks_its_arguments_and_changes_nothing_when_refused() -> None:
    core, admin, _epoch, mm, _addr = setup()
    bad = admin("grant", node="kvm9", mm=mm + 5)
    assert not bad.ok and bad.errno == "ESRCH"
    bad = admin("grant", node="never-registered", mm=mm)
    assert not bad.ok and bad.errno == "ESRCH"
    assert core.grants.by_node == {}
