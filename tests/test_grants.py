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

from test_core import admin_replies, register, sends

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


# -- who may register what: kinds bound to keys, sessions bounded per key


def reg(core: HostCore, identity: bytes, name: str, kind: str, key: str) -> Any:
    from protocol.messages import Register

    out = core.receive_node(identity, Register(id=1, name=name, kind=kind, ops=_ops(kind), sleepable=kind == "xpmem",
                                               incarnation="i"), key, 0.0)
    (reply,) = sends(out, identity)
    return reply


def _ops(kind: str) -> list[str]:
    if kind == "xpmem":
        return ["invalidate_range_start", "invalidate_range_end", "release"]
    return ["invalidate_range_start", "invalidate_range_end", "change_pte", "release"]


def curve_core() -> HostCore:
    return HostCore(Model(frames=16, page_size=PS, swap_slots=8), CoreConfig(page_size=PS, authenticated=True))


def test_a_kvm_key_cannot_register_an_xpmem_node_and_an_unnamed_key_keeps_its_first_kind() -> None:
    core = curve_core()
    refused = reg(core, b"a", "kvm0", "xpmem", "kvm0")
    assert isinstance(refused, Error) and refused.code == "forbidden" and "kvm key" in refused.message
    assert reg(core, b"b", "vm-alpha", "gru", "vm-alpha").TYPE == "registered"
    refused = reg(core, b"c", "vm-alpha", "kvm", "vm-alpha")  # the same key, another kind
    assert isinstance(refused, Error) and refused.code == "forbidden"
    assert core.sessions.by_name["vm-alpha"].kind == "gru" and core.sessions.by_name["vm-alpha"].state == "live"


def test_a_live_node_is_replaced_only_by_the_key_that_registered_it() -> None:
    core = curve_core()
    first = reg(core, b"real", "kvm-a", "kvm", "kvm-a")
    assert first.TYPE == "registered"
    # the per-kind key "kvm" may also claim the name kvm-a (name_matches_key), but not while it is live
    refused = reg(core, b"other", "kvm-a", "kvm", "kvm")
    assert isinstance(refused, Error) and refused.code == "forbidden"
    assert core.sessions.by_name["kvm-a"].state == "live" and core.sessions.by_name["kvm-a"].epoch == first.epoch
    again = reg(core, b"real2", "kvm-a", "kvm", "kvm-a")  # its own restart
    assert again.TYPE == "registered" and again.epoch != first.epoch


def test_sessions_are_bounded_per_key_the_oldest_fenced_go_first() -> None:
    from broker.sessions import MAX_SESSIONS_PER_KEY

    core = curve_core()
    for i in range(MAX_SESSIONS_PER_KEY):
        assert reg(core, b"id%d" % i, f"kvm-{i}", "kvm", "kvm").TYPE == "registered"
    refused = reg(core, b"more", "kvm-more", "kvm", "kvm")
    assert isinstance(refused, Error) and refused.code == "forbidden"
    for i in range(3):
        core.fence(f"kvm-{i}", "test", 0.0)
    for i in range(3):
        assert reg(core, b"new%d" % i, f"kvm-new{i}", "kvm", "kvm").TYPE == "registered"
    names = set(core.sessions.by_name)
    assert len(names) == MAX_SESSIONS_PER_KEY and not names & {"kvm-0", "kvm-1", "kvm-2"}


# -- admin fairness


def test_a_flood_of_status_requests_costs_one_round_of_node_commands_and_others_go_first() -> None:
    from protocol.messages import Command

    core, _admin, _epoch, _mm, _addr = setup()
    commands = 0
    for i in range(500):
        commands += sum(isinstance(m, Command) for m in sends(core.submit_admin("flood", i, "status", {}, 0.0)))
    assert commands == 1 and core.counters["status_coalesced"] == 499
    out = core.submit_admin("other", 9999, "spawn", {}, 0.0)  # not behind the flood
    (spawned,) = admin_replies(out)
    assert spawned.ok and spawned.ref == 9999
    # a status asked after the spawn completed is a new one: it sees the new mm
    out = core.submit_admin("other", 10000, "status", {}, 0.0)
    (cmd,) = [m for m in sends(out) if isinstance(m, Command)]
    out = core.receive_node(b"n1", _result(cmd.id), None, 0.1)
    replies = admin_replies(out)
    assert [r.ref for r in replies] == [10000] and replies[0].result["mms_total"] == 2
    # the flood's one round ends (the node never answered it: the 1 s status
    # timeout); every one of its 500 requests gets that round's answer
    flood = admin_replies(core.tick(1.5))
    assert sorted(r.ref for r in flood) == list(range(500))
    assert all(r.ok and r.result is flood[0].result for r in flood)  # one answer, built once


def _result(ref: int) -> Any:
    from protocol.messages import CommandResult

    return CommandResult(ref=ref, ok=True, result={"mapped_pages": 0})
