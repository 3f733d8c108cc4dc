"""The host core (broker/core.py): events in, actions out -- and one rule in one place.

The first tests drive :class:`broker.core.HostCore` by hand, as h11's tests
drive a ``Connection``: an ack resumes the operation in the same event, a
missed ack deadline fences through ``tick``, duplicates get the first
answer, a relayed command times out, a connection's key is bound.

The last test runs one scripted scenario -- admin commands and a hand-played
node's messages, errors included -- through ``mmn host``'s service (real
sockets) and through the in-process cluster, and compares every reply and
the counters: what the core decides, both decide identically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import zmq

from broker.core import CoreConfig, HostCore, Publish, ReplyAdmin, SendNode
from broker.host import Host, HostConfig
from broker.mm import Model
from mmnotify.local import LocalCluster
from protocol import decode, encode
from protocol.messages import (
    Ack,
    AdminReply,
    AdminRequest,
    Command,
    CommandResult,
    DmaRead,
    DmaReply,
    Error,
    Fenced,
    Gup,
    GupReply,
    Heartbeat,
    InvalidateRangeEnd,
    InvalidateRangeStart,
    Message,
    Ok,
    Register,
    Registered,
    Subscribe,
)
from transport import connect

PS = 4096
OPS = ["invalidate_range_start", "invalidate_range_end", "change_pte", "clear_flush_young", "clear_young",
       "test_young", "release"]


def new_core(**cfg: Any) -> HostCore:
    model = Model(frames=64, page_size=PS, swap_slots=64)
    return HostCore(model, CoreConfig(page_size=PS, **cfg))


def sends(actions: list[Any], identity: bytes | None = None) -> list[Message]:
    return [a.msg for a in actions if isinstance(a, SendNode) and (identity is None or a.identity == identity)]


def admin_replies(actions: list[Any]) -> list[AdminReply]:
    return [a.reply for a in actions if isinstance(a, ReplyAdmin)]


def register(core: HostCore, identity: bytes = b"n1", name: str = "kvm9", now: float = 0.0, key: str | None = None
             ) -> Registered:
    out = core.receive_node(identity, Register(id=1, name=name, kind="kvm", ops=OPS, sleepable=False,
                                               incarnation="i"), key, now)
    (reply,) = sends(out, identity)
    assert isinstance(reply, Registered), reply
    return reply


def mapped_and_served(core: HostCore, identity: bytes = b"n1") -> tuple[int, int, int, int]:
    """An mm with one written page, subscribed and GUPed by the node: (mm, addr, pfn, epoch)."""
    epoch = register(core, identity).epoch
    done: list[Any] = []
    out = core.submit_admin("cli", 1, "spawn", {}, 0.0)
    mm = admin_replies(out)[0].result["mm"]
    out = core.submit_admin("cli", 2, "mmap", {"mm": mm, "pages": 2, "fill": 7}, 0.0)
    addr = admin_replies(out)[0].result["addr"]
    assert admin_replies(core.submit_admin("cli", 3, "grant", {"node": "kvm9", "mm": mm}, 0.0))[0].ok
    assert sends(core.receive_node(identity, Subscribe(id=2, epoch=epoch, mm=mm), None, 0.0)) == [Ok(ref=2)]
    (reply,) = sends(core.receive_node(identity, Gup(id=3, epoch=epoch, mm=mm, addr=addr, npages=1, write=False),
                                       None, 0.0))
    assert isinstance(reply, GupReply) and not reply.errno, (reply, done)
    return mm, addr, reply.pages[0][1], epoch


def test_the_ack_that_completes_a_start_resumes_the_operation_in_the_same_event() -> None:
    core = new_core()
    mm, addr, _pfn, epoch = mapped_and_served(core)
    out = core.submit_admin("cli", 5, "munmap", {"mm": mm, "addr": addr, "length": PS}, 0.0)
    (start,) = sends(out, b"n1")
    assert isinstance(start, InvalidateRangeStart) and not admin_replies(out)
    assert core.lock_held and core.next_deadline() == pytest.approx(2.0)
    out = core.receive_node(b"n1", Ack(ref=start.id), None, 0.5)
    (end,) = sends(out, b"n1")  # no task switch: the end leaves with the ack's own event
    assert isinstance(end, InvalidateRangeEnd) and end.start_id == start.id
    (reply,) = admin_replies(out)
    assert reply.ok and reply.ref == 5 and not core.lock_held
    assert core.next_deadline() is None  # the ack deadline went with the ack


def test_a_missed_ack_deadline_fences_the_node_at_the_tick_and_the_operation_goes_on() -> None:
    core = new_core(ack_deadline_ms=1000)
    mm, addr, _pfn, epoch = mapped_and_served(core)
    out = core.submit_admin("cli", 5, "munmap", {"mm": mm, "addr": addr, "length": PS}, 0.0)
    assert isinstance(sends(out, b"n1")[0], InvalidateRangeStart)
    assert core.tick(0.999) == []  # not yet
    out = core.tick(1.0)
    msgs = sends(out, b"n1")
    assert [type(m) for m in msgs] == [Fenced]  # no end for a node that never started
    (reply,) = admin_replies(out)
    assert reply.ok and core.counters["fenced_ack_deadline"] == 1
    assert core.sessions.by_name["kvm9"].state == "fenced"
    # its late ack is refused with "fenced": it must register anew
    (late,) = sends(core.receive_node(b"n1", Ack(ref=1), None, 1.5))
    assert isinstance(late, Error) and late.code == "fenced"


def test_a_duplicate_request_gets_the_first_answer_again() -> None:
    core = new_core()
    mm, addr, pfn, epoch = mapped_and_served(core)
    read = DmaRead(id=9, epoch=epoch, mm=mm, addr=addr, pfn=pfn, offset=0, length=4)
    (first,) = sends(core.receive_node(b"n1", read, None, 0.0))
    assert isinstance(first, DmaReply) and first.data == b"\x07" * 4
    (again,) = sends(core.receive_node(b"n1", read, None, 0.0))
    assert again is first and core.counters["duplicates"] == 1


def test_answers_kept_for_duplicates_are_bounded_by_their_pages_and_an_old_duplicate_is_not_served_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import broker.core as core_module

    monkeypatch.setattr(core_module, "_REPLY_PAGES", 3)
    core = new_core()
    mm, addr, pfn, epoch = mapped_and_served(core)  # Gup id 3: one page

    def gup(msg_id: int, page: int) -> list[Message]:
        return sends(core.receive_node(b"n1", Gup(id=msg_id, epoch=epoch, mm=mm, addr=addr + page * PS, npages=1,
                                                  write=False), None, 0.0))

    (second,) = gup(4, 1)
    assert isinstance(second, GupReply) and len(second.pages) == 1
    assert gup(4, 1) == [second]  # two pages kept: the first answer again
    gups = core.counters["gup_fast"]
    (third,) = gup(5, 0)
    (fourth,) = gup(6, 1)  # four pages of answers: the oldest body (id 3) goes
    assert gup(3, 0) == []  # its duplicate: not answered, not GUPed again
    assert gup(4, 1) == [second]  # three pages kept still
    assert core.counters["gup_fast"] == gups + 2  # ids 5 and 6, each once
    assert core.counters["duplicates"] == 3
    assert core._replies[b"n1"].weight <= 3


def test_a_relayed_command_times_out_at_the_tick_and_a_fence_ends_it_with_eintr() -> None:
    core = new_core(command_timeout_ms=3000)
    register(core)
    out = core.submit_admin("cli", 1, "fault", {"node": "kvm9", "mm": 1, "addr": 0x10000000}, 0.0)
    (cmd,) = sends(out, b"n1")
    assert isinstance(cmd, Command) and cmd.command == "fault"
    (reply,) = admin_replies(core.tick(3.0))
    assert not reply.ok and reply.errno == "ETIMEDOUT"
    out = core.submit_admin("cli", 2, "fault", {"node": "kvm9", "mm": 1, "addr": 0x10000000}, 4.0)
    (reply,) = admin_replies(core.fence("kvm9", "test", 4.5))
    assert not reply.ok and reply.errno == "EINTR"
    (reply,) = admin_replies(core.submit_admin("cli", 3, "fault", {"node": "kvm9", "mm": 1, "addr": 0}, 5.0))
    assert reply.errno == "ESRCH"


def test_answered_commands_leave_no_timers_behind_and_the_one_unanswered_still_times_out() -> None:
    """A command's timer is cancelled by its result: the core drops it (in
    sweeps), so a thousand answered commands do not leave a thousand
    deadlines 3 s out in the heap; the one still waiting keeps its own."""
    core = new_core(command_timeout_ms=3000)
    register(core)
    out = core.submit_admin("cli", 1, "fault", {"node": "kvm9", "mm": 1, "addr": 0x10000000}, 0.0)
    (waiting,) = sends(out, b"n1")
    for ref in range(2, 1002):
        out = core.submit_admin("cli", ref, "fault", {"node": "kvm9", "mm": 1, "addr": 0x10000000}, 0.001)
        (cmd,) = sends(out, b"n1")
        (reply,) = admin_replies(core.receive_node(b"n1", CommandResult(ref=cmd.id, ok=True, result={"n": ref}),
                                                    None, 0.001))
        assert reply.ok and reply.ref == ref and reply.result == {"n": ref}
    assert core.timer_entries <= 2 * 1 + 64  # one live timer; the cancelled ones were swept
    assert core.next_deadline() == pytest.approx(3.0)
    (reply,) = admin_replies(core.tick(3.5))  # the waiting one times out; no answered one fires again
    assert reply.ref == 1 and reply.errno == "ETIMEDOUT"
    assert core.next_deadline() is None and core.timer_entries == 0
    assert waiting.id not in core._commands


def test_with_curve_a_connection_is_bound_to_the_key_that_registered_it() -> None:
    core = new_core(authenticated=True)
    out = core.receive_node(b"n1", Register(id=1, name="kvm9", kind="kvm", ops=OPS, sleepable=False,
                                            incarnation="i"), "gru0", 0.0)
    (refused,) = sends(out)
    assert isinstance(refused, Error) and refused.code == "forbidden"
    epoch = register(core, key="kvm9").epoch
    (refused,) = sends(core.receive_node(b"n1", Heartbeat(id=2, epoch=epoch), "kvm8", 0.0))
    assert isinstance(refused, Error) and refused.code == "forbidden"
    assert core.counters["forbidden"] == 2


def test_heartbeats_and_silence_are_the_cores_deadlines() -> None:
    core = new_core(heartbeat_ms=500, liveness=2)
    core.start(0.0)
    register(core, now=0.0)
    out = core.tick(0.5)
    assert [type(m) for m in sends(out, b"n1")] == [Heartbeat]
    out = core.tick(1.5)  # silent for 1.5 s > 2 x 0.5 s
    assert Fenced in [type(m) for m in sends(out, b"n1")] and core.counters["fenced_heartbeat"] == 1


def test_an_event_is_published_only_while_someone_listens() -> None:
    core = new_core()
    assert not [a for a in core.start(0.0) if isinstance(a, Publish)]
    core.listening = True
    register(core)
    core.publish("x", a=1)
    assert [a.kind for a in core.drain() if isinstance(a, Publish)] == ["x"]


# --------------------------------------------------------------------------
# one scenario, two worlds


class World:
    """What a scenario needs of a host: admin requests and one hand-played node."""

    admin_begin: Callable[..., Awaitable[Any]]
    admin_reply: Callable[[Any], Awaitable[AdminReply]]
    node_send: Callable[[Message], Awaitable[None]]
    node_recv: Callable[[], Awaitable[Message]]


def _normal(msg: Message | AdminReply) -> dict[str, Any]:
    out = {"type": msg.TYPE, **dataclasses.asdict(msg)}
    for varying in ("host_incarnation", "heartbeat_ms"):
        out.pop(varying, None)
    if out["type"] == "admin_reply":
        out.pop("ref")
    return out


async def scenario(world: World) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = []

    async def admin(command: str, **args: Any) -> dict[str, Any]:
        reply = await world.admin_reply(await world.admin_begin(command, **args))
        log.append(_normal(reply))
        return reply.result

    async def node(msg: Message) -> Message:
        await world.node_send(msg)
        reply = await world.node_recv()
        log.append(_normal(reply))
        return reply

    mm = (await admin("spawn"))["mm"]
    addr = (await admin("mmap", mm=mm, pages=4, fill=0x41))["addr"]
    await admin("write", mm=mm, addr=addr + PS, data=b"second")
    registered = await node(Register(id=1, name="kvm9", kind="kvm", ops=OPS, sleepable=False, incarnation="s"))
    epoch = registered.epoch  # type: ignore[attr-defined]
    await admin("grant", node="kvm9", mm=mm)
    await node(Subscribe(id=2, epoch=epoch, mm=mm))
    gup = await node(Gup(id=3, epoch=epoch, mm=mm, addr=addr, npages=2, write=False))
    pfn = gup.pages[0][1]  # type: ignore[attr-defined]
    read = DmaRead(id=4, epoch=epoch, mm=mm, addr=addr, pfn=pfn, offset=0, length=8)
    await node(read)
    await node(read)  # a duplicate: the first answer again
    await node(Gup(id=5, epoch=epoch, mm=mm, addr=addr + 64 * PS, npages=1, write=False))  # EFAULT
    await node(Gup(id=6, epoch=epoch + 7, mm=mm, addr=addr, npages=1, write=False))  # not its epoch
    # munmap of a page the node holds: the start reaches it, the reply waits for its ack
    ref = await world.admin_begin("munmap", mm=mm, addr=addr, length=PS)
    start = await world.node_recv()
    log.append(_normal(start))
    await world.node_send(Ack(ref=start.id))  # type: ignore[attr-defined]
    log.append(_normal(await world.node_recv()))  # the end
    log.append(_normal(await world.admin_reply(ref)))
    await node(DmaRead(id=7, epoch=epoch, mm=mm, addr=addr, pfn=pfn, offset=0, length=8))  # stale now
    # the fork's write protection reaches the node, which does not answer:
    # fenced at the ack deadline in both worlds
    child = (await admin("fork", mm=mm))["mm"]
    await admin("read", mm=child, addr=addr + PS, length=6)
    await admin("mprotect", mm=mm, addr=addr + PS, length=PS, prot="r")
    await admin("madvise", mm=mm, addr=addr + 2 * PS, length=PS, advice="dontneed")
    await admin("swap", mm=mm, addr=addr + 3 * PS, length=PS)
    await admin("migrate", mm=child, addr=addr, length=4 * PS)
    for bad in (("munmap", {"mm": mm, "addr": addr + 1, "length": PS}),  # EINVAL
                ("read", {"mm": mm, "addr": addr, "length": 4}),  # EFAULT: unmapped now
                ("read", {"mm": 999, "addr": addr, "length": 4}),  # ESRCH
                ("mprotect", {"mm": mm, "addr": addr + PS, "length": 8 * PS, "prot": "r"}),  # ENOMEM
                ("fault", {"node": "nobody", "mm": mm, "addr": addr})):  # ESRCH
        try:
            await admin(bad[0], **bad[1])
        except Exception as exc:  # noqa: BLE001 - recorded in the log already
            raise AssertionError(exc) from exc
    await admin("exit", mm=child)
    status = await admin("status")
    log.pop()  # the whole status differs in its endpoints; compare what the core decided
    log.append({
        "frames": status["frames"],
        "stale_accesses": status["stale_accesses"],
        "mms": status["mms"],
        "counters": {k: v for k, v in status["counters"].items()
                     if k.startswith("notifier_") or k in ("duplicates", "refused", "admin_requests",
                                                           "bad_admin_frames", "fences", "registrations",
                                                           "acks_late", "fenced_ack_deadline")},
        "ksm": status["ksm"],
    })
    return log


def local_world(c: LocalCluster) -> World:
    world = World()
    identity = b"scripted"
    inbox = c.connect_raw(identity)

    async def admin_begin(command: str, **args: Any) -> int:
        return c.admin_begin(command, **args)

    async def admin_reply(ref: int) -> AdminReply:
        return c.admin_reply(ref)

    async def node_send(msg: Message) -> None:
        c.send_raw(identity, msg)

    async def node_recv() -> Message:
        while c.step():  # the clock stands still: the node is about to answer
            pass
        return inbox.popleft()

    world.admin_begin, world.admin_reply, world.node_send, world.node_recv = (
        admin_begin, admin_reply, node_send, node_recv)
    return world


async def service_world(endpoints: dict[str, str], nursery: trio.Nursery) -> World:
    world = World()
    node = connect(zmq.DEALER, endpoints["node"])
    admin = connect(zmq.DEALER, endpoints["admin"])
    ids = iter(range(1, 1 << 30))
    replies: dict[int, AdminReply] = {}

    async def admin_begin(command: str, **args: Any) -> int:
        ref = next(ids)
        await admin.send_multipart([encode(AdminRequest(id=ref, command=command, args=args))])
        return ref

    async def admin_reply(ref: int) -> AdminReply:
        with trio.fail_after(10):
            while ref not in replies:
                reply = decode((await admin.recv_multipart())[-1])
                replies[reply.ref] = reply  # type: ignore[union-attr]
        return replies.pop(ref)

    async def node_send(msg: Message) -> None:
        await node.send_multipart([encode(msg)])

    async def node_recv() -> Message:
        with trio.fail_after(10):
            while True:
                msg = decode((await node.recv_multipart())[-1])
                if not isinstance(msg, Heartbeat):
                    return msg

    world.admin_begin, world.admin_reply, world.node_send, world.node_recv = (
        admin_begin, admin_reply, node_send, node_recv)
    world.sockets = (node, admin)  # type: ignore[attr-defined]
    return world


async def test_the_service_and_the_in_process_cluster_decide_identically() -> None:
    local = LocalCluster(frames=64, swap_slots=64, ack_deadline_ms=500)
    try:
        expected = await scenario(local_world(local))
    finally:
        local.model.close()
    config = HostConfig(node_port=0, admin_port=0, events_port=0, frames=64, swap_slots=64, heartbeat_ms=60_000,
                        ack_deadline_ms=500, insecure=True)
    host = Host(config)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            endpoints = await nursery.start(host.serve)
            world = await service_world(endpoints, nursery)
            try:
                got = await scenario(world)
            finally:
                for sock in world.sockets:  # type: ignore[attr-defined]
                    sock.close()
            nursery.cancel_scope.cancel()
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a == b, f"step {i}: service {a} != in-process {b}"
    # the scenario went where it meant to: errors, a duplicate, a stale access, a refusal
    kinds = [e.get("errno") or e.get("code") for e in expected]
    for wanted in ("EINVAL", "EFAULT", "ESRCH", "ENOMEM", "fenced"):
        assert wanted in kinds, (wanted, kinds)
    assert expected[-1]["stale_accesses"] == 1 and expected[-1]["counters"]["duplicates"] == 1


def test_a_stalled_host_does_not_blame_the_nodes_for_its_own_silence() -> None:
    """A host paused (SIGSTOP, a long GC) for longer than the liveness window
    judges a node's silence only over time it was running to hear it; a node
    that stays silent after the host resumes is still fenced, and an ack
    deadline still passes."""
    core = new_core(heartbeat_ms=500, liveness=2, ack_deadline_ms=1000)
    core.start(0.0)
    epoch = register(core, now=0.0).epoch
    core.tick(0.5)
    core.receive_node(b"n1", Heartbeat(id=5, epoch=epoch), None, 0.6)
    out = core.tick(10.0)  # the host did not run from 0.6 to 10.0
    assert Fenced not in [type(m) for m in sends(out)] and core.counters["host_stalls"] == 1
    assert core.sessions.by_name["kvm9"].state == "live"
    fenced_at = None
    for step in range(1, 10):
        now = 10.0 + step * 0.5
        if Fenced in [type(m) for m in sends(core.tick(now))]:
            fenced_at = now
            break
    assert fenced_at is not None and fenced_at <= 12.0, fenced_at  # silent past liveness while running
    assert core.counters["fenced_heartbeat"] == 1


def test_a_stall_just_past_a_short_liveness_window_is_a_stall_too() -> None:
    """A 100 ms x 8 host (a 0.8 s window) stopped for 0.95 s: a gap under
    the one-second floor, but one that would fence every node on resume.
    It counts as a stall (found by ``mmn soak``'s host pauses); a gap of a
    period and a half still does not."""
    core = new_core(heartbeat_ms=100, liveness=8, ack_deadline_ms=400)
    core.start(0.0)
    epoch = register(core, now=0.0).epoch
    core.receive_node(b"n1", Heartbeat(id=5, epoch=epoch), None, 0.1)
    core.tick(0.25)  # 1.5 periods: scheduling jitter, no stall
    assert core.counters.get("host_stalls", 0) == 0
    out = core.tick(1.2)  # stopped from 0.25 to 1.2
    assert Fenced not in [type(m) for m in sends(out)] and core.counters["host_stalls"] == 1
    assert core.sessions.by_name["kvm9"].state == "live"


def test_a_node_gets_no_page_of_an_mm_it_is_not_subscribed_to() -> None:
    """Pages served to a node outside any subscription would be recorded
    nowhere (no invalidation would ever reach it): refused, nothing pinned."""
    core = new_core()
    epoch = register(core).epoch
    mm = admin_replies(core.submit_admin("cli", 1, "spawn", {}, 0.0))[0].result["mm"]
    addr = admin_replies(core.submit_admin("cli", 2, "mmap", {"mm": mm, "pages": 1, "fill": 1}, 0.0))[0].result["addr"]
    assert admin_replies(core.submit_admin("cli", 4, "grant", {"node": "kvm9", "mm": mm}, 0.0))[0].ok
    (reply,) = sends(core.receive_node(b"n1", Gup(id=3, epoch=epoch, mm=mm, addr=addr, npages=1, write=False, pin=True),
                                       None, 0.0))
    assert isinstance(reply, GupReply) and reply.errno == "EINVAL" and not reply.pages
    assert sum(core.model.memory.pincount) == 0 and not core.notifier.served("kvm9", mm)


def test_a_heartbeat_from_a_connection_the_host_does_not_know_is_answered_unregistered() -> None:
    """After a reset the node's heartbeats arrive on a connection the host
    never saw register: it says so, and the node registers anew at once
    (node/base.py SESSION_REFUSALS) instead of waiting out its watchdog."""
    core = new_core()
    (reply,) = sends(core.receive_node(b"stranger", Heartbeat(id=5, epoch=3), None, 0.0))
    assert isinstance(reply, Error) and reply.code == "unregistered" and reply.ref == 5
    assert sends(core.receive_node(b"stranger", Ack(ref=77), None, 0.0)) == []  # an ack it could not place
