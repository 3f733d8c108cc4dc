"""Integration: real ``mmn host`` and ``mmn node`` processes on loopback.

Every process is started with ``python -m mmn`` in a process group of its own,
its output in a log file under the test's temporary directory, and killed
(SIGKILL to the group) by the fixture that started it, whatever happens.  The
host binds port 0 for each endpoint and says where it landed on its "ready"
line; the nodes connect there.  Tests talk to the host as the CLI does
(``mmnotify.Client``, the public client), read the PUB event stream, open raw sockets to send
hostile frames, and run ``mmn`` itself (``main([...])`` and as a subprocess).

One cluster (host + kvm0, gru0, xpmem0) is shared by the tests that leave it as
they found it (each in an mm of its own, injections healed); tests that fence,
kill or restart something get a fresh cluster of their own.

What each test proves is in its docstring.  Every wait has a deadline.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import zmq

import mmnotify
from mmn.cli import main
from protocol import Limits, decode, encode
from protocol.messages import (
    Ack,
    AdminReply,
    AdminRequest,
    DmaRead,
    DmaReply,
    Error,
    Event,
    Gup,
    GupReply,
    Heartbeat,
    Ok,
    Register,
    Registered,
    Subscribe,
)
from protocol.types import ADDRESS_LIMIT, KernelError
from transport import connect

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
PS = 4096
KINDS = ("kvm", "gru", "xpmem")
CALL_TIMEOUT = 10.0  # one admin request
START_TIMEOUT = 20.0  # a process up and registered
HOST_READY = re.compile(r"mmn host: ready (\{.*\})")


# --------------------------------------------------------------------------
# processes


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMN_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait_for_line(proc: subprocess.Popen[bytes], log: Path, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
    """Poll ``log`` until a line matches (or the process dies, or the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = pattern.search(text)
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"{log.name}: exited {proc.returncode} before ready:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{log.name}: not ready within {timeout}s:\n{text[-3000:]}")
        time.sleep(0.02)


class Cluster:
    """A host and its nodes, each a real process; ``close()`` kills them all."""

    def __init__(self, logs: Path, host_args: tuple[str, ...] = (), node_args: tuple[str, ...] = ()) -> None:
        self.logs = logs
        self.host_args = list(host_args)
        self.node_args = list(node_args)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.endpoints: dict[str, str] = {}
        self._starts = 0

    # -- processes (synchronous: fixtures call them outside trio too)

    def _spawn(self, key: str, args: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        self._starts += 1
        log = self.logs / f"{key}.{self._starts}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mmn", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=ROOT,
                env=_env(),
                start_new_session=True,  # its own process group: killpg takes everything
            )
        self.procs[key] = proc
        return proc, log

    def start_host(self, *, same_ports: bool = False) -> dict[str, str]:
        """Start ``mmn host`` on OS-chosen ports (or on the last host's ports)."""
        ports = {"node": "0", "admin": "0", "events": "0"}
        if same_ports:
            ports = {k: v.rsplit(":", 1)[1] for k, v in self.endpoints.items()}
        args = ["host", "--node-port", ports["node"], "--admin-port", ports["admin"],
                "--events-port", ports["events"], *self.host_args]
        proc, log = self._spawn("host", args)
        found = _wait_for_line(proc, log, HOST_READY, START_TIMEOUT)
        self.endpoints = ast.literal_eval(found.group(1))
        return self.endpoints

    def start_node(self, kind: str, name: str) -> None:
        """Start ``mmn node``; returns once it has registered (its ready line)."""
        args = ["node", "--kind", kind, "--name", name, "--host", self.endpoints["node"], *self.node_args]
        proc, log = self._spawn(name, args)
        _wait_for_line(proc, log, re.compile(rf"mmn node {name}: ready"), START_TIMEOUT)

    def kill(self, key: str) -> None:
        """SIGKILL a process group and reap it."""
        proc = self.procs.pop(key)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self) -> None:
        for key in list(self.procs):
            self.kill(key)

    # -- admin (async)

    @property
    def admin(self) -> str:
        return self.endpoints["admin"]

    async def call(self, command: str, **args: Any) -> dict[str, Any]:
        # through the public client, as a user's own test would (mmnotify.Client)
        client = mmnotify.Client.at(self.admin, timeout=CALL_TIMEOUT)
        return await client.call(command, **args)

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def node(self, name: str) -> dict[str, Any]:
        return nodes(await self.status())[name]

    async def wait_status(self, pred: Callable[[dict[str, Any]], bool], timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Poll ``status`` until ``pred`` holds (fails at the deadline)."""
        with trio.fail_after(timeout):
            while True:
                status = await self.status()
                if pred(status):
                    return status
                await trio.sleep(0.05)

    async def mapping(self, mm: int, pages: int, fill: int | None = None, **kw: Any) -> int:
        return (await self.call("mmap", mm=mm, pages=pages, fill=fill, **kw))["addr"]

    async def xpmem_attach(self, node: str, mm: int, addr: int, length: int, write: bool = True) -> int:
        # xpmem_attach needs a read-write permit (XPMEM_RDWR)
        segid = (await self.call("xpmem", node=node, op="make", mm=mm, addr=addr, length=length, mode=0o666))["segid"]
        apid = (await self.call("xpmem", node=node, op="get", segid=segid, write=write))["apid"]
        return (await self.call("xpmem", node=node, op="attach", apid=apid, length=length))["vaddr"]


def nodes(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in status["nodes"]}


def node_pfns(node: dict[str, Any], mm: int) -> dict[int, int]:
    """A node's own translations of ``mm``: {page address: pfn}."""
    return {int(a, 16): pfn for a, pfn in node["mms"].get(str(mm), {}).items()}


def counter(node: dict[str, Any], name: str) -> int:
    return int(node["counters"].get(name, 0))


def all_live(names: tuple[str, ...]) -> Callable[[dict[str, Any]], bool]:
    def pred(status: dict[str, Any]) -> bool:
        by = nodes(status)
        return all(n in by and by[n]["state"] == "live" for n in names)

    return pred


def _start_cluster(logs: Path, kinds: tuple[str, ...] = KINDS, **kw: Any) -> Cluster:
    c = Cluster(logs, **kw)
    try:
        c.start_host()
        for kind in kinds:
            c.start_node(kind, f"{kind}0")
    except BaseException:
        c.close()
        raise
    return c


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The shared cluster: host + kvm0, gru0, xpmem0, default deadlines."""
    c = _start_cluster(tmp_path_factory.mktemp("shared"))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """A factory of clusters for tests that fence, kill or restart things."""
    made: list[Cluster] = []

    def make(kinds: tuple[str, ...] = KINDS, **kw: Any) -> Cluster:
        logs = tmp_path / f"cluster{len(made)}"
        logs.mkdir()
        c = _start_cluster(logs, kinds, **kw)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


# --------------------------------------------------------------------------
# the event stream


class Events:
    """Everything the host publishes on its PUB socket, from subscription on."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, Event]] = []
        self._changed = trio.Event()

    async def _run(self, endpoint: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limits = Limits()
        async with connect(zmq.SUB, endpoint) as sub:
            sub.socket.setsockopt(zmq.SUBSCRIBE, b"")
            task_status.started()
            while True:
                frames = await sub.recv_multipart()
                event = decode(frames[-1], limits)
                assert isinstance(event, Event)
                self.seen.append((trio.current_time(), event))
                self._changed.set()
                self._changed = trio.Event()

    async def wait_for(self, pred: Callable[[Event], bool], timeout: float = 10.0) -> tuple[float, Event]:
        """The first event (seen so far or later) that satisfies ``pred``."""
        with trio.fail_after(timeout):
            checked = 0
            while True:
                for when, event in self.seen[checked:]:
                    if pred(event):
                        return when, event
                checked = len(self.seen)
                await self._changed.wait()

    def of(self, kind: str, **fields: Any) -> list[Event]:
        return [e for _, e in self.seen if e.kind == kind and all(e.fields.get(k) == v for k, v in fields.items())]


@contextlib.asynccontextmanager
async def watching(c: Cluster) -> AsyncIterator[Events]:
    """Subscribe to the host's events; returns once the subscription is live
    (a PUB drops what it sends before a subscriber joins: "slow joiner")."""
    events = Events()
    async with trio.open_nursery() as nursery:
        await nursery.start(events._run, c.endpoints["events"])
        scratch = (await c.call("spawn"))["mm"]
        with trio.fail_after(10):
            while not events.of("munmap", mm=scratch):
                await c.call("munmap", mm=scratch, addr=0x10000000, length=PS)  # publishes, changes nothing
                with trio.move_on_after(0.1):
                    await events.wait_for(lambda e: e.kind == "munmap" and e.fields.get("mm") == scratch)
        yield events
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# ordering


async def test_subscribe_and_unsubscribe_commands_reach_the_notifier(cluster: Cluster) -> None:
    """``mmn subscribe NODE --mm`` registers the node without a fault;
    ``unsubscribe`` releases what it maps and it hears nothing more."""
    c = cluster
    with trio.fail_after(30):
        mm = (await c.call("spawn"))["mm"]
        addr = await c.mapping(mm, 2, fill=0x55)
        assert await c.call("subscribe", node="gru0", mm=mm) == {"mm": mm, "subscribed": True}
        await c.call("fault", node="kvm0", mm=mm, addr=addr, pages=2)
        subs = [m["subscribers"] for m in (await c.status())["mms"] if m["mm"] == mm][0]
        assert sorted(subs) == ["gru0", "kvm0"]
        assert await c.call("unsubscribe", node="kvm0", mm=mm) == {"mm": mm, "subscribed": False}
        status = await c.status()
        assert [m["subscribers"] for m in status["mms"] if m["mm"] == mm][0] == ["gru0"]
        assert nodes(status)["kvm0"]["mms"].get(str(mm), {}) == {}  # released: kvm0 maps nothing of it
        await c.call("exit", mm=mm)
        assert (await c.status())["stale_accesses"] == 0


async def test_invalidation_is_start_then_every_ack_then_end(cluster: Cluster) -> None:
    """A munmap sends start to exactly the nodes holding the range, waits for
    every ack (a 200 ms late one included), and only then sends end, once to
    each node that got the start, naming that start; the host frees nothing
    before; nodes that do not hold the range hear nothing."""
    c = cluster
    with trio.fail_after(30):
        mm = (await c.call("spawn"))["mm"]
        addr = await c.mapping(mm, 4, fill=0x33)
        for name in ("kvm0", "gru0"):
            await c.call("fault", node=name, mm=mm, addr=addr, pages=4)
        before = nodes(await c.status())
        await c.call("inject", node="gru0", kind="delay-acks", delay_ms=200)
        try:
            async with watching(c) as events:
                t0 = trio.current_time()
                await c.call("munmap", mm=mm, addr=addr, length=4 * PS)
                elapsed = trio.current_time() - t0
                await events.wait_for(lambda e: e.kind == "munmap" and e.fields.get("mm") == mm)
        finally:
            await c.call("heal", node="gru0")

        seq = {id(e): e.seq for _, e in events.seen}
        starts = {e.fields["node"]: e for e in events.of("invalidate_range_start", mm=mm)}
        assert set(starts) == {"kvm0", "gru0"}  # not xpmem0: it holds nothing of mm
        assert all((e.fields["start"], e.fields["end"]) == (addr, addr + 4 * PS) for e in starts.values())
        assert {e.fields["event"] for e in starts.values()} == {"UNMAP"}
        acks = {n: [a for a in events.of("ack", node=n, ref=s.fields["id"])] for n, s in starts.items()}
        ends = {e.fields["node"]: e for e in events.of("invalidate_range_end", mm=mm)}
        assert set(ends) == {"kvm0", "gru0"} and len(events.of("invalidate_range_end", mm=mm)) == 2
        for name, start in starts.items():
            (ack,) = acks[name]
            assert ack.fields["status"] == "ok" and ack.fields["late"] is False
            assert ends[name].fields["start_id"] == start.fields["id"]
            assert seq[id(start)] < seq[id(ack)]
        last_ack = max(seq[id(a)] for (a,) in acks.values())
        assert all(seq[id(e)] > last_ack for e in ends.values())  # no end before every ack
        (done,) = events.of("munmap", mm=mm)
        assert seq[id(done)] > max(seq[id(e)] for e in ends.values())
        assert elapsed >= 0.2  # waited for gru0's late ack

        after = nodes(await c.status())
        for name in ("kvm0", "gru0"):
            assert node_pfns(after[name], mm) == {}
            assert counter(after[name], "invalidations") == counter(before[name], "invalidations") + 1
            assert after[name]["state"] == "live" and after[name]["epoch"] == before[name]["epoch"]
        assert counter(after["xpmem0"], "invalidations") == counter(before["xpmem0"], "invalidations")
        assert (await c.status())["stale_accesses"] == 0


# --------------------------------------------------------------------------
# faults racing invalidations


async def test_kvm_fault_during_a_held_invalidation_waits_for_the_end_and_installs_the_new_page(cluster: Cluster) -> None:
    """kvm0 acks a start 400 ms late (delay-acks): while the invalidation is
    open, a fault on the range is parked (mmu_invalidate_in_progress), not
    served from the old pte; it completes only after the end, with the page
    the primary maps then (zeroed by DONTNEED), and a read through it sees
    that page; the oracle counts no stale access."""
    c = cluster
    with trio.fail_after(30):
        mm = (await c.call("spawn"))["mm"]
        addr = await c.mapping(mm, 2, fill=0x11)
        await c.call("fault", node="kvm0", mm=mm, addr=addr, pages=2)
        gups = counter(await c.node("kvm0"), "gups")
        await c.call("inject", node="kvm0", kind="delay-acks", delay_ms=400)
        try:
            async with watching(c) as events, trio.open_nursery() as nursery:
                nursery.start_soon(partial_call(c, "madvise", mm=mm, addr=addr, length=PS, advice="dontneed"))
                seen, _ = await events.wait_for(
                    lambda e: e.kind == "invalidate_range_start" and e.fields.get("mm") == mm
                )
                fault = await c.call("fault", node="kvm0", mm=mm, addr=addr, pages=1, write=True)
                waited = trio.current_time() - seen
        finally:
            await c.call("heal", node="kvm0")
        assert waited >= 0.3  # parked until the late ack let the end go out
        (page,) = fault["pages"]
        assert page[0] == addr and page[2] == 1
        kvm = await c.node("kvm0")
        assert node_pfns(kvm, mm)[addr] == page[1]
        assert counter(kvm, "gups") == gups + 1  # one GUP, after the end: nothing served while open
        data = await c.call("access", node="kvm0", mm=mm, addr=addr, length=4)
        assert data["data"] == b"\0\0\0\0"  # the new page, not the old 0x11 one
        await c.call("access", node="kvm0", mm=mm, addr=addr, length=4, data=b"kvm!")
        assert (await c.call("read", mm=mm, addr=addr, length=4))["data"] == b"kvm!"
        assert (await c.call("read", mm=mm, addr=addr + PS, length=4))["data"] == b"\x11" * 4
        assert (await c.status())["stale_accesses"] == 0


def partial_call(c: Cluster, command: str, **args: Any) -> Callable[[], Any]:
    async def run() -> None:
        await c.call(command, **args)

    return run


async def test_gup_reply_that_crosses_an_invalidation_is_discarded_and_the_fault_retried(cluster: Cluster) -> None:
    """mmu_invalidate_seq: kvm0's fault GUPs a page that is not present, so
    the host serves it on the slow path, behind an invalidation of kvm0's
    range that was already queued (the host's mmap_lock is held meanwhile by
    a DONTNEED waiting 1 s for gru0's late ack).  The reply reaches kvm0
    after that invalidation's end changed the sequence number: kvm0 discards
    it (stale_replies) and faults again (gup_retries); what it installs is
    what the primary maps, and nothing stale is ever accessed."""
    c = cluster
    with trio.fail_after(40):
        mm = (await c.call("spawn"))["mm"]
        a = await c.mapping(mm, 1, fill=0xAA)  # gru0's page
        b = await c.mapping(mm, 2)  # kvm0's: page 0 written and mapped, page 1 never touched
        await c.call("write", mm=mm, addr=b, data=b"b0b0" * (PS // 4))
        await c.call("fault", node="gru0", mm=mm, addr=a)
        await c.call("fault", node="kvm0", mm=mm, addr=b)
        before = await c.node("kvm0")
        await c.call("inject", node="gru0", kind="delay-acks", delay_ms=1000)
        try:
            async with watching(c) as events, trio.open_nursery() as nursery:
                base = (await c.status())["counters"]["admin_requests"]  # this status included
                # T1 holds the lock until gru0's ack (1 s)
                nursery.start_soon(partial_call(c, "madvise", mm=mm, addr=a, length=PS, advice="dontneed"))
                await events.wait_for(lambda e: e.kind == "invalidate_range_start" and e.fields.get("node") == "gru0"
                                      and e.fields.get("mm") == mm)
                # T2 queues on the lock: it will invalidate kvm0's range
                nursery.start_soon(partial_call(c, "madvise", mm=mm, addr=b, length=2 * PS, advice="dontneed"))
                # Once the host has received T2, T2 waits on the lock before any
                # later request is answered (its handler parks at its first step;
                # a status needs node round trips).  Requests so far: T1, T2, polls.
                polls = 0
                with trio.fail_after(10):
                    while (await c.status())["counters"]["admin_requests"] - base - (polls := polls + 1) < 2:
                        pass
                # the fault's GUP finds page 1 not present: slow path, queued behind T2
                fault = await c.call("fault", node="kvm0", mm=mm, addr=b + PS)
        finally:
            await c.call("heal", node="gru0")
        kvm_start = events.of("invalidate_range_start", mm=mm, node="kvm0")
        assert len(kvm_start) == 1 and kvm_start[0].fields["start"] == b
        after = await c.node("kvm0")
        assert counter(after, "stale_replies") >= counter(before, "stale_replies") + 1
        assert counter(after, "gup_retries") >= counter(before, "gup_retries") + 1
        (page,) = [p for p in fault["pages"] if p[0] == b + PS]
        assert node_pfns(after, mm).get(b + PS) == page[1]
        assert b not in node_pfns(after, mm)  # zapped by T2, not refaulted
        assert (await c.call("access", node="kvm0", mm=mm, addr=b + PS, length=4))["data"] == b"\0" * 4
        assert (await c.call("access", node="kvm0", mm=mm, addr=b, length=4))["data"] == b"\0" * 4
        assert (await c.status())["stale_accesses"] == 0


async def test_many_concurrent_faults_and_accesses_during_munmaps_never_reach_a_stale_page(cluster: Cluster) -> None:
    """Stress on real sockets: kvm0 and gru0 fault and read pages while the
    same ranges are DONTNEEDed, munmapped and mapped again, round after round.
    Every read returns what the primary held (the round's fill, or zeros after
    DONTNEED), every failure is the honest EFAULT of an unmapped address, the
    nodes' translations end up equal to what a fresh read sees, and the
    oracle counts no stale access."""
    c = cluster
    rounds, npages = 8, 8
    failures: list[str] = []
    with trio.fail_after(60):
        mm = (await c.call("spawn"))["mm"]
        before = {n: await c.node(n) for n in ("kvm0", "gru0")}

        async def fault_and_read(node: str, addr: int, fill: int) -> None:
            for i in range(npages):
                page = addr + (i * 3 % npages) * PS
                try:
                    await c.call("fault", node=node, mm=mm, addr=page, pages=1)
                    data = (await c.call("access", node=node, mm=mm, addr=page, length=8))["data"]
                except KernelError as exc:
                    if exc.errno not in ("EFAULT", "EAGAIN"):
                        failures.append(f"{node} {page:#x}: {exc}")
                    continue
                if data not in (bytes([fill]) * 8, b"\0" * 8):
                    failures.append(f"{node} {page:#x}: read {data!r}, fill {fill:#x}")

        async def invalidate(addr: int) -> None:
            for i in range(0, npages, 2):
                await c.call("madvise", mm=mm, addr=addr + i * PS, length=PS, advice="dontneed")
            await c.call("munmap", mm=mm, addr=addr + npages // 2 * PS, length=npages // 2 * PS)

        for r in range(rounds):
            fill = 0x40 + r
            addr = await c.mapping(mm, npages, fill=fill)
            for node in ("kvm0", "gru0"):
                await c.call("fault", node=node, mm=mm, addr=addr, pages=npages)
            async with trio.open_nursery() as nursery:
                for node in ("kvm0", "gru0", "kvm0", "gru0"):
                    nursery.start_soon(fault_and_read, node, addr, fill)
                nursery.start_soon(invalidate, addr)
            await c.call("munmap", mm=mm, addr=addr, length=npages * PS)
            # a new mapping reuses the address and, often, the frames
        assert failures == []
        status = await c.status()
        assert status["stale_accesses"] == 0
        for node in ("kvm0", "gru0"):
            n = nodes(status)[node]
            assert node_pfns(n, mm) == {}, node  # every range was munmapped at the end of its round
            assert counter(n, "invalidations") > counter(before[node], "invalidations")
        print("stale_replies", {n: counter(nodes(status)[n], "stale_replies") - counter(before[n], "stale_replies")
                                for n in ("kvm0", "gru0")})


# --------------------------------------------------------------------------
# KSM and change_pte


async def test_ksm_merge_repoints_kvm_by_change_pte_and_invalidates_gru_and_xpmem(cluster: Cluster) -> None:
    """Two identical MERGEABLE pages mapped by all three nodes, then two full
    KSM scans: one KSM page shared by both.  kvm0 (change_pte) is repointed in
    place to the merged pfn, read-only, and reads without a new GUP; gru0 and
    xpmem0 (no change_pte) were sent the one-page invalidation instead: they
    hold nothing until they refault, and then map the merged pfn.  A write
    through kvm0 breaks COW and leaves the other page merged.  (xpmem0
    detaches before the merge: a page it pins is never merged, see
    tests/test_xpmem.py; attached again afterwards, its read-only pin of the
    KSM page unshares it, as ``gup_must_unshare`` does.)"""
    c = cluster
    with trio.fail_after(40):
        mm = (await c.call("spawn"))["mm"]
        addr = await c.mapping(mm, 2, fill=0x41, mergeable=True)
        first = await c.call("fault", node="kvm0", mm=mm, addr=addr, pages=2)
        before_pfns = {p[0]: p[1] for p in first["pages"]}
        assert len(set(before_pfns.values())) == 2
        await c.call("fault", node="gru0", mm=mm, addr=addr, pages=2)
        vaddr = await c.xpmem_attach("xpmem0", mm, addr, 2 * PS)
        await c.call("fault", node="xpmem0", mm=mm, addr=vaddr, pages=2)
        status = await c.status()
        for name in ("kvm0", "gru0", "xpmem0"):
            assert node_pfns(nodes(status)[name], mm) == before_pfns, name
        before = nodes(status)
        ksm_before = status["ksm"]
        await c.call("xpmem", node="xpmem0", op="detach", addr=vaddr)

        stats = await c.call("merge", full_scans=2)
        assert stats["pages_shared"] - ksm_before["pages_shared"] == 1
        assert stats["pages_sharing"] - ksm_before["pages_sharing"] == 1

        after = nodes(await c.status())
        kvm = after["kvm0"]
        (merged,) = set(node_pfns(kvm, mm).values())
        assert set(node_pfns(kvm, mm)) == {addr, addr + PS} and merged in before_pfns.values()
        assert counter(kvm, "change_pte_hits") - counter(before["kvm0"], "change_pte_hits") >= 2
        for name in ("gru0", "xpmem0"):
            assert node_pfns(after[name], mm) == {}, name
            assert counter(after[name], "invalidations") > counter(before[name], "invalidations"), name

        for page in (addr, addr + PS):
            assert (await c.call("access", node="kvm0", mm=mm, addr=page, length=4))["data"] == b"AAAA"
            assert (await c.call("access", node="gru0", mm=mm, addr=page, length=4))["data"] == b"AAAA"
        refault = nodes(await c.status())
        assert counter(refault["kvm0"], "gups") == counter(kvm, "gups")  # no refault on kvm0
        assert counter(refault["gru0"], "gups") > counter(after["gru0"], "gups")
        assert node_pfns(refault["gru0"], mm) == {addr: merged, addr + PS: merged}
        vaddr = await c.xpmem_attach("xpmem0", mm, addr, 2 * PS)

        # xpmem0 refaults as well; its read-only pin unshares the KSM page
        # (gup_must_unshare): it pins a private copy, and that COW takes the
        # others' translations of the page with it (kvm0 refaults to the copy).
        assert (await c.call("access", node="xpmem0", mm=mm, addr=vaddr + PS, length=4))["data"] == b"AAAA"
        xp = nodes(await c.status())
        assert counter(xp["xpmem0"], "gups") > counter(after["xpmem0"], "gups")
        copy = node_pfns(xp["xpmem0"], mm)[addr + PS]
        assert copy != merged
        for name in ("kvm0", "gru0"):
            assert node_pfns(xp[name], mm).get(addr + PS) is None, name
            assert node_pfns(xp[name], mm)[addr] == merged, name
        assert (await c.call("access", node="kvm0", mm=mm, addr=addr + PS, length=4))["data"] == b"AAAA"
        assert node_pfns(await c.node("kvm0"), mm)[addr + PS] == copy

        # a write through kvm0's read-only spte of the merged page: COW break
        await c.call("access", node="kvm0", mm=mm, addr=addr, length=4, data=b"mine")
        final = nodes(await c.status())
        mine = node_pfns(final["kvm0"], mm)[addr]
        assert mine not in (merged, copy)
        assert addr not in node_pfns(final["gru0"], mm)  # the COW break invalidated its old pte
        assert (await c.call("read", mm=mm, addr=addr, length=4))["data"] == b"mine"
        assert (await c.call("access", node="gru0", mm=mm, addr=addr, length=4))["data"] == b"mine"
        assert (await c.call("access", node="xpmem0", mm=mm, addr=vaddr, length=4))["data"] == b"mine"
        assert node_pfns(await c.node("xpmem0"), mm) == {addr: mine, addr + PS: copy}
        assert (await c.status())["stale_accesses"] == 0
        await c.call("exit", mm=mm)


# --------------------------------------------------------------------------
# xpmem: a sleepable invalidation


async def test_xpmem_invalidation_blocks_until_its_slow_drain_finishes(cluster: Cluster) -> None:
    """xpmem0 (sleepable) takes 600 ms to drain before it acks (slow-drain):
    the munmap waits for it, at least 600 ms and less than the ack deadline,
    and xpmem0 is not fenced for it; its pins are dropped, its translations
    gone and the frames freed only then."""
    c = cluster
    with trio.fail_after(30):
        mm = (await c.call("spawn"))["mm"]
        free0 = (await c.status())["frames"]["free"]
        addr = await c.mapping(mm, 2, fill=0x58)
        vaddr = await c.xpmem_attach("xpmem0", mm, addr, 2 * PS)
        await c.call("fault", node="xpmem0", mm=mm, addr=vaddr, pages=2)
        status = await c.status()
        before = nodes(status)["xpmem0"]
        assert len(node_pfns(before, mm)) == 2 and status["frames"]["free"] == free0 - 2
        deadline_ms = status["host"]["ack_deadline_ms"]
        await c.call("inject", node="xpmem0", kind="slow-drain", delay_ms=600)
        try:
            t0 = trio.current_time()
            await c.call("munmap", mm=mm, addr=addr, length=2 * PS)
            elapsed = trio.current_time() - t0
        finally:
            await c.call("heal", node="xpmem0")
        assert 0.6 <= elapsed < deadline_ms / 1000
        status = await c.status()
        after = nodes(status)["xpmem0"]
        assert after["state"] == "live" and after["epoch"] == before["epoch"]
        assert after["fenced_count"] == before["fenced_count"]
        assert node_pfns(after, mm) == {}
        assert counter(after, "pins_released") == counter(before, "pins_released") + 2
        assert status["frames"]["free"] == free0
        assert status["stale_accesses"] == 0


# --------------------------------------------------------------------------
# failures: fencing, restarts


async def test_nodes_that_never_ack_are_fenced_at_the_deadline_and_the_munmap_completes(
    fresh: Callable[..., Cluster],
) -> None:
    """kvm0 drops its acks, gru0 hangs (stops processing) for 1.5 s: a munmap
    of pages both map waits the 300 ms ack deadline, not longer, fences both,
    frees the frames and returns; xpmem0 is untouched.  Each fenced node,
    once it hears of it, drops every translation and registers again under
    a new epoch; the hung one's late ack is refused."""
    c = fresh(host_args=("--ack-deadline-ms", "300"))
    with trio.fail_after(60):
        mm = (await c.call("spawn"))["mm"]
        free0 = (await c.status())["frames"]["free"]
        addr = await c.mapping(mm, 4, fill=0x66)
        for name in ("kvm0", "gru0"):
            await c.call("fault", node=name, mm=mm, addr=addr, pages=4)
        before = await c.status()
        epochs = {n["name"]: n["epoch"] for n in before["nodes"]}
        await c.call("inject", node="kvm0", kind="drop-acks")
        await c.call("inject", node="gru0", kind="hang", for_s="1.5")
        async with watching(c) as events:
            t0 = trio.current_time()
            await c.call("munmap", mm=mm, addr=addr, length=4 * PS)
            elapsed = trio.current_time() - t0
            for name in ("kvm0", "gru0"):  # events travel on their own socket: they may trail the reply
                await events.wait_for(lambda e, name=name: e.kind == "fenced" and e.fields.get("node") == name)
        assert 0.3 <= elapsed < 1.5
        fenced = {e.fields["node"]: e.fields for e in events.of("fenced")}
        assert set(fenced) == {"kvm0", "gru0"}
        assert all("no ack" in f["reason"] and f["epoch"] == epochs[n] for n, f in fenced.items())
        status = await c.status()
        assert status["counters"]["fenced_ack_deadline"] == 2
        assert status["frames"]["free"] == free0  # the operation went on without them
        assert [m for m in status["mms"] if m["mm"] == mm][0]["present"] == 0
        by = nodes(status)
        for name in ("kvm0", "gru0"):
            assert by[name]["fenced_count"] == 1, by[name]  # (it may be back already, under a new epoch)
        assert by["xpmem0"]["state"] == "live" and by["xpmem0"]["epoch"] == epochs["xpmem0"]

        def back(status: dict[str, Any]) -> bool:
            by = nodes(status)
            return all(by[n]["state"] == "live" and by[n]["epoch"] > epochs[n] for n in ("kvm0", "gru0"))

        status = await c.wait_status(back, timeout=20)
        for name in ("kvm0", "gru0"):
            n = nodes(status)[name]
            assert n["mapped_pages"] == 0 and n["mms"] == {}, n
            assert counter(n, "drops") >= 2  # the first registration's, and the fence's
        assert status["counters"]["refused"] >= 1  # gru0's ack, sent after its hang, for a retired epoch
        await c.call("heal", node="kvm0")
        # the re-registered nodes work: fault, write through, read back
        addr = await c.mapping(mm, 1, fill=0x67)
        assert (await c.call("access", node="kvm0", mm=mm, addr=addr, length=2))["data"] == b"gg"
        await c.call("access", node="gru0", mm=mm, addr=addr, length=2, data=b"hi")
        assert (await c.call("read", mm=mm, addr=addr, length=2))["data"] == b"hi"
        assert (await c.status())["stale_accesses"] == 0


async def test_a_restarted_node_registers_clean_with_a_new_epoch(fresh: Callable[..., Cluster]) -> None:
    """kill -9 kvm0 and xpmem0 (which pins 4 pages), start them again under
    the same names: each registers under a new epoch with no translation; the
    host fenced the old sessions, so their pins are gone and a munmap sends
    them nothing and frees every frame; xpmem0's old attachment is gone."""
    c = fresh(kinds=("kvm", "xpmem"))
    with trio.fail_after(60):
        mm = (await c.call("spawn"))["mm"]
        free0 = (await c.status())["frames"]["free"]
        addr = await c.mapping(mm, 4, fill=0x72)
        await c.call("fault", node="kvm0", mm=mm, addr=addr, pages=4)
        vaddr = await c.xpmem_attach("xpmem0", mm, addr, 4 * PS)
        await c.call("fault", node="xpmem0", mm=mm, addr=vaddr, pages=4)
        before = nodes(await c.status())
        assert {n: before[n]["mapped_pages"] for n in before} == {"kvm0": 4, "xpmem0": 4}

        for name, kind in (("kvm0", "kvm"), ("xpmem0", "xpmem")):
            c.kill(name)
            await trio.to_thread.run_sync(c.start_node, kind, name)
        status = await c.wait_status(
            lambda s: all(nodes(s)[n]["epoch"] > before[n]["epoch"] and nodes(s)[n]["state"] == "live"
                          for n in ("kvm0", "xpmem0"))
        )
        for name in ("kvm0", "xpmem0"):
            n = nodes(status)[name]
            assert n["mapped_pages"] == 0 and n["mms"] == {}, n
            # the old session: connection gone, or registered again (a loaded machine may
            # also see the new process's first Register time out and be sent again)
            assert n["fenced_count"] >= 1, n
            assert counter(n, "faults") == 0  # a new process
        assert status["counters"]["registrations"] >= 4

        sent = status["counters"]["notifier_messages"]
        t0 = trio.current_time()
        await c.call("munmap", mm=mm, addr=addr, length=4 * PS)
        assert trio.current_time() - t0 < 1.0  # waited for no one (the ack deadline is 2 s)
        status = await c.status()
        assert status["counters"]["notifier_messages"] == sent  # nobody holds the range any more
        assert status["frames"]["free"] == free0  # the dead node's pins went with its session
        with pytest.raises(KernelError) as err:
            await c.call("access", node="xpmem0", mm=mm, addr=vaddr, length=4)
        assert err.value.errno == "EFAULT"
        assert status["stale_accesses"] == 0


async def test_a_restarted_host_makes_every_node_drop_its_translations(fresh: Callable[..., Cluster]) -> None:
    """kill -9 the host and start a new one on the same ports: every node
    notices the silence (or the new incarnation), drops every translation and
    registers with the new host, which serves them from scratch."""
    c = fresh(host_args=("--heartbeat-ms", "200", "--liveness", "10"), node_args=("--liveness", "4"))
    with trio.fail_after(60):
        mm = (await c.call("spawn"))["mm"]
        addr = await c.mapping(mm, 3, fill=0x68)
        await c.call("fault", node="kvm0", mm=mm, addr=addr, pages=3)
        await c.call("fault", node="gru0", mm=mm, addr=addr, pages=3)
        vaddr = await c.xpmem_attach("xpmem0", mm, addr, 3 * PS)
        await c.call("fault", node="xpmem0", mm=mm, addr=vaddr, pages=3)
        old = await c.status()
        assert [n["mapped_pages"] for n in old["nodes"]] == [3, 3, 3]

        c.kill("host")
        await trio.to_thread.run_sync(lambda: c.start_host(same_ports=True))
        status = await c.wait_status(lambda s: all_live(("kvm0", "gru0", "xpmem0"))(s))
        assert status["host"]["incarnation"] != old["host"]["incarnation"]
        assert status["host"]["endpoints"] == old["host"]["endpoints"]
        assert status["mms"] == [] and status["counters"]["registrations"] == 3
        for n in status["nodes"]:
            assert n["mapped_pages"] == 0 and n["mms"] == {}, n
            assert counter(n, "drops") >= 2 and counter(n, "reconnects") >= 1, n
        # the new host works with them
        mm = (await c.call("spawn"))["mm"]
        addr = await c.mapping(mm, 1, fill=0x69)
        for name in ("kvm0", "gru0"):
            assert (await c.call("access", node=name, mm=mm, addr=addr, length=2))["data"] == b"ii"
        assert (await c.status())["stale_accesses"] == 0


# --------------------------------------------------------------------------
# hostile input on both channels


CODES = ("bad_message", "bad_version", "unknown_type", "too_large")  # protocol.errors.ProtocolError


def _pack(body: dict[str, Any] | list[Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _state(status: dict[str, Any]) -> dict[str, Any]:
    """What bad input must not change: everything but the counters."""
    return {
        "nodes": [{k: n[k] for k in ("name", "state", "epoch", "mapped_pages", "mms", "fenced_count")}
                  for n in status["nodes"]],
        "mms": status["mms"],
        "frames": status["frames"],
        "ksm": status["ksm"],
        "stale_accesses": status["stale_accesses"],
        "registrations": status["counters"]["registrations"],
        "fences": status["counters"]["fences"],
    }


async def _exchange(sock: Any, frames: list[bytes]) -> Any:
    await sock.send_multipart(frames)
    with trio.fail_after(10):
        (reply,) = await sock.recv_multipart()
    return decode(reply, Limits())


async def test_bad_frames_on_the_node_and_admin_channels_get_error_replies_and_change_nothing(cluster: Cluster) -> None:
    """Garbage bytes, a map that is not a message, an unknown type, a wrong
    field type, a bad version, an impossible address, a contradictory
    registration and a well-formed request from a stranger on the node
    channel; the same kinds of thing, plus unknown commands and arguments, on
    the admin channel.  Each gets one typed error reply (a multi-frame
    message is counted and dropped), the bad-frame counters count them, and
    the host's state -- nodes, epochs, mms, frames, KSM -- is exactly as
    before; the nodes go on working."""
    c = cluster
    with trio.fail_after(60):
        mm = (await c.call("spawn"))["mm"]
        addr = await c.mapping(mm, 1, fill=0x42)
        await c.call("fault", node="kvm0", mm=mm, addr=addr)
        before = await c.status()

        node_garbage = [
            b"\xc1\xc1 not msgpack at all",
            _pack([1, 2, 3]),
            _pack({"v": 1, "t": "no_such_message", "id": 7}),
            _pack({"v": 1, "t": "gup", "id": 8, "epoch": "one", "mm": mm, "addr": addr, "npages": 1, "write": False}),
            _pack({"v": 99, "t": "heartbeat", "id": 9, "epoch": 1}),
            _pack({"v": 1, "t": "gup", "id": 10, "epoch": 1, "mm": mm, "addr": ADDRESS_LIMIT, "npages": 1, "write": 0}),
            _pack({"v": 1, "t": "dma_write", "id": 11, "epoch": 1, "mm": mm, "addr": addr, "pfn": 1, "offset": 0,
                   "data": "not bytes"}),
        ]
        async with connect(zmq.DEALER, c.endpoints["node"]) as sock:
            # two frames from a DEALER: no reply, or it would come first below
            await sock.send_multipart([b"frame one", b"frame two"])
            for frame in node_garbage:
                reply = await _exchange(sock, [frame])
                assert isinstance(reply, Error) and reply.code in CODES, (frame, reply)
            # well-formed, but from no registered node: refused
            reply = await _exchange(sock, [encode(Gup(id=12, epoch=1, mm=mm, addr=addr, npages=1, write=True))])
            assert isinstance(reply, Error) and reply.ref == 12 and reply.code == "unregistered", reply
            # a registration that contradicts itself (start without end): refused, nobody registered
            bad = Register(id=13, name="kvm0", kind="kvm", ops=["invalidate_range_start"], sleepable=False,
                           incarnation="x")
            reply = await _exchange(sock, [encode(bad)])
            assert isinstance(reply, Error) and reply.ref == 13 and reply.code == "bad_message", reply

        admin_garbage: list[tuple[bytes, int]] = [
            (b"\x00\xff garbage", 0),
            (_pack({"v": 1, "t": "admin_request", "id": 21, "command": "mmap", "args": {"mm": mm, "pages": "4"}}), 21),
            (encode(AdminRequest(id=22, command="format_disk", args={})), 22),
            (encode(AdminRequest(id=23, command="status", args={"verbose": True})), 23),
            (encode(AdminRequest(id=24, command="munmap", args={"mm": mm, "addr": ADDRESS_LIMIT + 1, "length": PS})), 24),
            (_pack({"v": 1, "t": "admin_request", "id": 25, "command": "spawn", "args": [1]}), 25),
            (encode(Heartbeat(id=26, epoch=1)), 26),
        ]
        async with connect(zmq.DEALER, c.admin) as sock:
            await sock.send_multipart([b"one", b"two", b"three"])
            for frame, ref in admin_garbage:
                reply = await _exchange(sock, [frame])
                assert isinstance(reply, AdminReply) and not reply.ok and reply.errno == "EINVAL", (frame, reply)
                assert reply.ref in (ref, 0), reply
            # the same socket still gets served
            reply = await _exchange(sock, [encode(AdminRequest(id=27, command="read", args={"mm": mm, "addr": addr,
                                                                                              "length": 2}))])
            assert isinstance(reply, AdminReply) and reply.ok and reply.result["data"] == b"BB"

        after = await c.status()
        assert _state(after) == _state(before)
        bc, ac = before["counters"], after["counters"]
        assert ac["bad_node_frames"] - bc["bad_node_frames"] == len(node_garbage) + 1
        assert ac["bad_admin_frames"] - bc["bad_admin_frames"] == len(admin_garbage) + 1
        assert ac["refused"] - bc["refused"] == 1
        assert (await c.call("access", node="kvm0", mm=mm, addr=addr, length=2))["data"] == b"BB"
        assert (await c.status())["stale_accesses"] == 0


# --------------------------------------------------------------------------
# the CLI, as a user drives it


def test_cli_main_as_a_user_would(cluster: Cluster, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``mmn`` commands through ``mmn.cli.main``: map, fault into a node,
    read and write through nodes, read back on the host, munmap, status; and
    the exit codes of a failed operation (1), a usage error (2) and an
    unreachable host (3)."""
    for name in list(os.environ):
        if name.startswith("MMN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MMN_HOST", cluster.admin)

    def mmn(*argv: object) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = mmn("spawn", "--json")
    assert code == 0
    mm = json.loads(out)["mm"]
    code, out, _ = mmn("mmap", "--mm", mm, "--pages", 2, "--fill", "0x5a")
    assert code == 0
    addr = int(re.search(r"addr\s+(0x[0-9a-f]+)", out).group(1), 16)  # type: ignore[union-attr]
    code, out, _ = mmn("fault", "kvm0", "--mm", mm, hex(addr), "--pages", 2)
    assert code == 0
    assert out.split("\n")[0].split() == ["ADDR", "PFN", "WRITABLE"]
    assert f"{addr:#x}" in out and f"{addr + PS:#x}" in out
    code, out, _ = mmn("access", "gru0", "--mm", mm, hex(addr), "--len", 4)
    assert code == 0 and "5a 5a 5a 5a" in out and "|ZZZZ|" in out
    code, out, _ = mmn("access", "kvm0", "--mm", mm, hex(addr + PS), "--write", "c0ffee")
    assert code == 0 and re.search(r"written\s+3", out)
    code, out, _ = mmn("read", "--mm", mm, hex(addr + PS), 4)
    assert code == 0 and "c0 ff ee 5a" in out
    code, out, _ = mmn("status")
    assert code == 0 and re.search(r"stale_accesses\s+0", out)
    for name in ("kvm0", "gru0", "xpmem0"):
        assert re.search(rf"^{name}\s+\w+\s+live", out, re.M), out
    # every node's own mappings, and the mm's vma
    assert re.search(rf"^kvm0\s+{mm}\s+{addr:#x}=\d+ {addr + PS:#x}=\d+$", out, re.M), out
    assert re.search(rf"^gru0\s+{mm}\s+{addr:#x}=\d+$", out, re.M), out
    assert f"{addr:#x}-{addr + 2 * PS:#x} rw private" in out
    code, out, _ = mmn("munmap", "--mm", mm, hex(addr), 2 * PS)
    assert code == 0
    code, out, _ = mmn("--json", "status")
    status = json.loads(out)
    assert all(str(mm) not in n["mms"] for n in status["nodes"])
    assert status["stale_accesses"] == 0

    code, out, err = mmn("fault", "nosuch0", "--mm", mm, hex(addr))
    assert (code, out) == (1, "") and "ESRCH" in err
    code, out, err = mmn("--json", "read", "--mm", mm, hex(addr), 4)  # munmapped
    assert code == 1 and json.loads(out)["errno"] == "EFAULT"
    code, out, err = mmn("mmap", "--mm", mm, "--pages", "zero")
    assert (code, out) == (2, "") and "usage" in err
    code, out, err = mmn("--host", "tcp://127.0.0.1:1", "--timeout", "0.5", "status")
    assert (code, out) == (3, "") and "unreachable" in err


def test_cli_as_a_subprocess(cluster: Cluster) -> None:
    """``python -m mmn`` as a separate process: ``watch --json`` prints one
    JSON document per event the host publishes; ``status --json`` sees every
    node live; a failed operation exits 1 with one line on stderr."""
    env = {**_env(), "MMN_HOST": cluster.admin}
    cmd = [sys.executable, "-m", "mmn"]
    watch = subprocess.Popen([*cmd, "watch", "--json", "--count", "3"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd=ROOT, start_new_session=True)
    try:
        mm = trio.run(cluster.call, "spawn")["mm"]
        deadline = time.monotonic() + 30
        while watch.poll() is None:  # the watcher subscribes after its status call: publish until it has 3
            assert time.monotonic() < deadline, "mmn watch saw no events"
            trio.run(lambda: cluster.call("munmap", mm=mm, addr=0x10000000, length=PS))
            time.sleep(0.05)
        out, err = watch.communicate(timeout=10)
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
            watch.wait(timeout=10)
    assert watch.returncode == 0, err
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert len(lines) == 3 and all(e["kind"] == "munmap" and e["fields"]["mm"] == mm for e in lines)
    assert [e["seq"] for e in lines] == sorted(e["seq"] for e in lines)

    done = subprocess.run([*cmd, "status", "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert {n["name"]: n["state"] for n in status["nodes"]} == {"kvm0": "live", "gru0": "live", "xpmem0": "live"}
    assert status["stale_accesses"] == 0

    done = subprocess.run([*cmd, "munmap", "--mm", "999", "0x10000000", "4096"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=30)
    assert done.returncode == 1 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done
    assert "ESRCH" in done.stderr


# --------------------------------------------------------------------------
# mmn up's children live as long as mmn up, not as long as a thread

_STAND_IN_PARENT = """
import os, subprocess, sys, threading, time
env = dict(os.environ, MMN_PARENT_PID=str(os.getpid()))
def spawn():  # as trio.lowlevel.open_process does: Popen in a worker thread, which then ends
    p = subprocess.Popen([sys.executable, "-m", "mmn", "node", "--kind", "kvm", "--name", "orphan0",
                          "--host", sys.argv[1]], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(p.pid, flush=True)
    time.sleep(1.0)  # idle, as trio's cached worker is for 10 s, then gone
t = threading.Thread(target=spawn)
t.start()
t.join()
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_of_mmn_up_outlives_the_thread_that_spawned_it_but_not_its_parent(tmp_path: Path) -> None:
    """``mmn up`` starts its services with trio's ``open_process``, which forks
    from a worker thread that trio retires after 10 s idle.  A service must not
    die with that thread (``PR_SET_PDEATHSIG`` made every child of ``mmn up``
    stop 10 s after it started), yet must stop when ``mmn up`` itself is
    SIGKILLed."""
    parent = subprocess.Popen([sys.executable, "-c", _STAND_IN_PARENT, "tcp://127.0.0.1:9"], stdout=subprocess.PIPE,
                              env=_env(), cwd=ROOT, start_new_session=True)
    child = None
    try:
        assert parent.stdout is not None
        ready, _, _ = select.select([parent.stdout], [], [], 20)
        assert ready, "the stand-in parent printed no pid"
        child = int(parent.stdout.readline())
        time.sleep(2.0)  # the spawning thread ended 1 s ago
        assert _alive(child), "the child died with the thread that spawned it"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the child outlived mmn up"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)  # the child too: same process group
        parent.wait(timeout=10)


async def test_a_migration_without_a_free_frame_fails_and_leaves_no_invalidation_in_progress(
        fresh: Callable[..., Cluster]) -> None:
    """The host-core issue's defect 2, as a user meets it: ``mmn host --frames
    64``, two nodes fault 4 pages, the rest of memory filled, ``mmn migrate``
    fails with ENOMEM -- and its start was paired with an end anyway: the next
    kvm and gru faults in that range answer, and neither node has an
    invalidation in progress (on main they waited forever)."""
    c = fresh(("kvm", "gru"), host_args=("--frames", "64"))
    mm = (await c.call("spawn"))["mm"]
    addr = await c.mapping(mm, 4, fill=0x5A)
    for node in ("kvm0", "gru0"):
        await c.call("fault", node=node, mm=mm, addr=addr, pages=4, write=False)
    filler = await c.mapping(mm, 128)
    with pytest.raises(KernelError) as full:
        await c.call("write", mm=mm, addr=filler, data=b"\x01" * (128 * PS))
    assert full.value.errno == "ENOMEM"
    with pytest.raises(KernelError) as failed:
        await c.call("migrate", mm=mm, addr=addr, length=4 * PS)
    assert failed.value.errno == "ENOMEM"
    for node in ("kvm0", "gru0"):
        got = await c.call("fault", node=node, mm=mm, addr=addr, pages=1, write=False)
        assert [p[0] for p in got["pages"]] == [addr]
        data = await c.call("access", node=node, mm=mm, addr=addr, length=4)
        assert data["data"] == b"\x5a" * 4
    status = await c.status()
    assert all(n["invalidations_in_progress"] == 0 for n in status["nodes"]), status["nodes"]
    assert status["stale_accesses"] == 0


async def test_a_host_stopped_past_the_liveness_window_fences_nobody_on_resume(
        fresh: Callable[..., Cluster]) -> None:
    """SIGSTOP the host for 5 s (its liveness window is 6 x 500 ms = 3 s):
    on resume it judges the nodes' silence only over time it was running to
    hear them, so nobody is fenced and the xpmem attachment still reads.  The
    nodes are told to be patient (40 missed heartbeats: 20 s), so what is
    tested is the host's judgement."""
    c = fresh(node_args=("--liveness", "40"))
    mm = (await c.call("spawn"))["mm"]
    addr = await c.mapping(mm, 2, fill=0x33)
    vaddr = await c.xpmem_attach("xpmem0", mm, addr, 2 * PS, write=True)
    await c.call("fault", node="kvm0", mm=mm, addr=addr, pages=2, write=False)
    before = (await c.status())["counters"]
    host = c.procs["host"]
    os.killpg(host.pid, signal.SIGSTOP)
    try:
        await trio.sleep(5)
    finally:
        os.killpg(host.pid, signal.SIGCONT)
    await trio.sleep(1.5)  # three heartbeat periods of running time
    status = await c.status()
    assert all(n["state"] == "live" for n in status["nodes"]), status["nodes"]
    assert status["counters"]["fenced_heartbeat"] == before["fenced_heartbeat"]
    assert status["counters"]["host_stalls"] >= 1
    got = await c.call("access", node="xpmem0", mm=mm, addr=vaddr, length=4)
    assert got["data"] == b"\x33" * 4
    assert status["stale_accesses"] == 0


async def test_status_and_the_health_check_stay_within_the_frame_at_500000_mapped_pages(
        fresh: Callable[..., Cluster], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A kvm node mapping 500,000 pages: ``mmn status`` answers (a bounded
    summary, the node live), the container health check says healthy, and
    ``status --node kvm0 --cursor`` pages through every translation the node
    holds.  Before the paging the node's status reply was over the frame
    limit: the status failed and the node lost its connection for good."""
    from mmn import health

    c = fresh(kinds=("kvm",))
    mm = (await c.call("spawn"))["mm"]
    half = 250_000
    starts = [await c.mapping(mm, half) for _ in range(2)]
    chunks = [(s + i * PS, min(512, half - i)) for s in starts for i in range(0, half, 512)]

    async def worker(todo: list[tuple[int, int]]) -> None:
        while todo:
            addr, pages = todo.pop()
            await c.call("fault", node="kvm0", mm=mm, addr=addr, pages=pages)

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(worker, chunks)
    status = await c.status()
    kvm = nodes(status)["kvm0"]
    assert kvm["state"] == "live" and kvm["mapped_pages"] == 2 * half
    assert sum(len(p) for p in kvm["mms"].values()) < 2 * half and kvm["mms_next"]
    assert len(encode(AdminReply(ref=1, ok=True, result=status))) < 1 << 20

    for name in list(os.environ):
        if name.startswith("MMN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MMN_HOST", c.admin)
    assert await trio.to_thread.run_sync(main, ["status"]) == 0
    assert re.search(r"^kvm0\s+kvm\s+live\s+\d+\s+500000", capsys.readouterr().out, re.M)
    assert await trio.to_thread.run_sync(health.main, ["--host", c.admin]) == 0

    seen, cursor = 0, None
    with trio.fail_after(120):
        while True:
            try:
                page = nodes(await c.call("status", node="kvm0", cursor=cursor, limit=8192))["kvm0"]
            except mmnotify.KernelError as exc:  # a page late on a loaded machine: ask again
                assert exc.errno is mmnotify.Errno.ETIMEDOUT, exc
                continue
            seen += sum(len(p) for p in page["mms"].values())
            cursor = page["mms_next"]
            if cursor is None:
                break
    assert seen == 2 * half
    assert nodes(await c.status())["kvm0"]["state"] == "live"  # nothing cost it its connection


async def test_a_node_reaches_only_the_mm_an_operator_granted_it(
        cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A node acting on its own (here a raw node socket: what any holder of a
    node key can send) gets EACCES for an mm no operator pointed it at:
    subscribe, GUP and DMA are refused and counted as refused, not stale.
    After ``mmn grant NODE --mm M`` it may subscribe and fault; after
    ``mmn revoke`` it is refused again."""
    c = cluster
    for name in list(os.environ):
        if name.startswith("MMN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MMN_HOST", c.admin)
    ops = ["invalidate_range_start", "invalidate_range_end", "change_pte", "release"]
    with trio.fail_after(60):
        mm = (await c.call("spawn"))["mm"]
        addr = await c.mapping(mm, 1, fill=0x42)
        await c.call("fault", node="kvm0", mm=mm, addr=addr)
        pfn = node_pfns(await c.node("kvm0"), mm)[addr]
        before = await c.status()
        async with connect(zmq.DEALER, c.endpoints["node"]) as sock:
            reg = await _answer(sock, [encode(Register(id=1, name="kvm-rogue", kind="kvm", ops=ops, sleepable=False,
                                                         incarnation="r"))])
            assert isinstance(reg, Registered)
            e = reg.epoch
            for msg in (Subscribe(id=2, epoch=e, mm=mm), Gup(id=3, epoch=e, mm=mm, addr=addr, npages=1, write=False)):
                refused = await _answer(sock, [encode(msg)])
                assert isinstance(refused, Error) and refused.code == "EACCES", refused
            read = await _answer(sock, [encode(DmaRead(id=4, epoch=e, mm=mm, addr=addr, pfn=pfn, offset=0, length=4))])
            assert read == DmaReply(ref=4, errno="EACCES")
            after = await c.status()
            assert after["stale_accesses"] == before["stale_accesses"]
            assert after["counters"]["refused_accesses"] == before["counters"]["refused_accesses"] + 3

            assert await trio.to_thread.run_sync(main, ["grant", "kvm-rogue", "--mm", str(mm)]) == 0
            assert await _answer(sock, [encode(Subscribe(id=5, epoch=e, mm=mm))]) == Ok(ref=5)
            gup = await _answer(sock, [encode(Gup(id=6, epoch=e, mm=mm, addr=addr, npages=1, write=False))])
            assert isinstance(gup, GupReply) and not gup.errno and gup.pages[0][1] == pfn
            read = await _answer(sock, [encode(DmaRead(id=7, epoch=e, mm=mm, addr=addr, pfn=pfn, offset=0, length=2))])
            assert read == DmaReply(ref=7, data=b"\x42\x42")

            # revoke: the host sends ->release and waits for this node's ack
            async with trio.open_nursery() as nursery:
                codes: list[int] = []
                nursery.start_soon(lambda: _run_into(codes, ["revoke", "kvm-rogue", "--mm", str(mm)]))
                release = await _next(sock, lambda m: m.TYPE == "release")
                assert release.TYPE == "release" and release.mm == mm
                await sock.send_multipart([encode(Ack(ref=release.id))])
            assert codes == [0]
            refused = await _answer(sock, [encode(Gup(id=8, epoch=e, mm=mm, addr=addr, npages=1, write=False))])
            assert isinstance(refused, Error) and refused.code == "EACCES"
        capsys.readouterr()


async def _run_into(codes: list[int], argv: list[str]) -> None:
    codes.append(await trio.to_thread.run_sync(main, argv))


async def _next(sock: Any, want: Callable[[Any], bool]) -> Any:
    """The next message ``want`` accepts; what the host sends any node
    meanwhile (heartbeats, status commands) is passed over."""
    with trio.fail_after(10):
        while True:
            (frame,) = await sock.recv_multipart()
            msg = decode(frame, Limits())
            if want(msg):
                return msg


async def _answer(sock: Any, frames: list[bytes]) -> Any:
    """Send one request of a hand-driven node; its answer (by ref)."""
    ref = getattr(decode(frames[0], Limits()), "id", None)
    await sock.send_multipart(frames)
    return await _next(sock, lambda m: getattr(m, "ref", None) == ref)


async def test_mmn_up_restart_brings_a_killed_host_back_and_the_nodes_follow(tmp_path: Path) -> None:
    """``mmn up --restart``: SIGKILL the host; up starts a new incarnation on
    the same ports, every node drops what it held and registers with it, and
    the old incarnation's mms are gone (a host crash is a machine crash)."""
    from mmnotify.pytest_plugin import start_cluster

    cluster = await trio.to_thread.run_sync(
        lambda: start_cluster(tmp_path / "up", kvm=1, gru=1, xpmem=0, args=["--restart"]))
    try:
        c = cluster.client
        mm = await c.spawn()
        addr = await c.mmap(mm, pages=2, fill=0x33)
        await c.fault("kvm0", mm=mm, addr=addr, pages=2)
        first = await c.status()
        os.kill(cluster.ready["host"]["pid"], signal.SIGKILL)
        with trio.fail_after(40):
            while True:
                await trio.sleep(0.2)
                try:
                    now = await c.status()
                except Exception:  # noqa: BLE001 - the host is down for a moment
                    continue
                if now.incarnation != first.incarnation and all(n.state == "live" for n in now.nodes) \
                        and sorted(n.name for n in now.nodes) == ["gru0", "kvm0"]:
                    break
        assert now.mms_total == 0 and now.node("kvm0").mapped_pages == 0 and now.stale_accesses == 0
        assert cluster.process is not None and cluster.process.poll() is None  # up itself went on
        mm = await c.spawn()  # the new incarnation serves
        addr = await c.mmap(mm, pages=1, fill=0x44)
        assert (await c.access("gru0", mm=mm, addr=addr, length=1)).data == b"\x44"
    finally:
        await trio.to_thread.run_sync(cluster.stop)
