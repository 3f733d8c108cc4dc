"""The hmm kind: tools/testing/selftests/mm/hmm-tests.c's scenarios that make
sense without THP and hugetlb, on real processes (a host and hmm nodes over
ZeroMQ on loopback), plus the collision-retry race at the node's core.

hmm-tests.c -> here:
  anon_read, anon_write          test_anon_read_counts_one_fault_round / _write_
  anon_read_prot, anon_write_prot test_protection_errors
  anon_read_child (fork)         test_fork_then_read_in_the_child
  anon_read_multiple             test_anon_read_counts_one_fault_round (second read: no fault)
  zero page (dmirror ZERO)       test_zero_page_read_and_snapshot
  partial_unmap                  test_partial_munmap
  anon snapshot                  test_snapshot_states
  read_begin racing an invalidation  test_an_invalidation_racing_read_begin_is_retried (node core)
  migrate_release (device removed)   test_a_device_stopped_cleanly_hands_its_pages_back
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from test_integration import PS, Cluster, _start_cluster, counter, nodes, watching

from mmn.cli import main
from node.hmm import HmmMMU
from protocol.messages import (
    Ack,
    HmmEvict,
    HmmEvictReply,
    HmmMigrated,
    HmmRangeFault,
    HmmRangeFaultReply,
    IntervalInsert,
    IntervalReply,
    InvalidateRangeEnd,
    InvalidateRangeStart,
    Registered,
)
from protocol.types import KernelError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hmmc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """host + hmm0, hmm1, kvm0."""
    c = _start_cluster(tmp_path_factory.mktemp("hmm"), ("hmm", "kvm"))
    try:
        c.start_node("hmm", "hmm1")
        yield c
    finally:
        c.close()


async def _mm(c: Cluster, pages: int, **kw: Any) -> tuple[int, int]:
    mm = (await c.call("spawn"))["mm"]
    addr = (await c.call("mmap", mm=mm, pages=pages, **kw))["addr"]
    return mm, addr


async def _snapshot(c: Cluster, node: str, mm: int, addr: int, pages: int) -> list[str]:
    result = await c.call("hmm", node=node, op="snapshot", mm=mm, addr=addr, pages=pages)
    return [p["state"] for p in result["pages"]]


async def test_anon_read_counts_one_fault_round(hmmc: Cluster) -> None:
    # hmm-tests anon_read: faults == 1, cpages == npages, the data matches;
    # a second read copies again and faults no more (anon_read_multiple)
    npages = 16
    mm, addr = await _mm(hmmc, npages)
    data = bytes(i % 251 for i in range(npages * PS))
    await hmmc.call("write", mm=mm, addr=addr, data=data)
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=npages * PS)
    assert r["data"] == data and r["faults"] == 1 and r["cpages"] == npages
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=npages * PS)
    assert r["data"] == data and r["faults"] == 0 and r["cpages"] == npages
    assert await _snapshot(hmmc, "hmm0", mm, addr, 2) == ["write", "write"]


async def test_anon_write_counts_one_fault_round(hmmc: Cluster) -> None:
    # hmm-tests anon_write: the device writes, the CPU reads it back
    npages = 8
    mm, addr = await _mm(hmmc, npages)
    data = bytes((7 * i) % 256 for i in range(npages * PS))
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=len(data), data=data)
    assert r == {"written": len(data), "faults": 1, "cpages": npages}
    assert (await hmmc.call("read", mm=mm, addr=addr, length=len(data)))["data"] == data
    # the CPU writes one page: an invalidation reaches hmm0, which faults it again
    await hmmc.call("write", mm=mm, addr=addr, data=b"cpu!")
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=4)
    assert r["data"] == b"cpu!"
    status = await hmmc.status()
    assert status["stale_accesses"] == 0


async def test_zero_page_read_and_snapshot(hmmc: Cluster) -> None:
    # a read of never-written anonymous memory maps the shared zero page
    mm, addr = await _mm(hmmc, 4)
    assert await _snapshot(hmmc, "hmm0", mm, addr, 4) == ["none"] * 4
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=4 * PS)
    assert r["data"] == bytes(4 * PS) and r["faults"] == 1 and r["cpages"] == 4
    assert await _snapshot(hmmc, "hmm0", mm, addr, 4) == ["zero"] * 4
    # a write through the device breaks the zero page: write
    await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=2, data=b"hi")
    assert await _snapshot(hmmc, "hmm0", mm, addr, 2) == ["write", "zero"]


async def test_protection_errors(hmmc: Cluster) -> None:
    # hmm-tests anon_write_prot: read-only memory reads but does not write
    # (EPERM), and writes after mprotect(RW); anon_read_prot: PROT_NONE
    # fails the read (EFAULT)
    mm, addr = await _mm(hmmc, 2, fill=0x42)
    await hmmc.call("mprotect", mm=mm, addr=addr, length=2 * PS, prot="r")
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=8)
    assert r["data"] == b"\x42" * 8
    with pytest.raises(KernelError) as err:
        await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=4, data=b"nope")
    assert err.value.errno.value == "EPERM"
    assert await _snapshot(hmmc, "hmm0", mm, addr, 1) == ["read"]
    await hmmc.call("mprotect", mm=mm, addr=addr, length=2 * PS, prot="rw")
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=4, data=b"okay")
    assert r["written"] == 4
    await hmmc.call("mprotect", mm=mm, addr=addr, length=2 * PS, prot="none")
    with pytest.raises(KernelError) as err:
        await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=4)
    assert err.value.errno.value == "EFAULT"
    assert await _snapshot(hmmc, "hmm0", mm, addr, 2) == ["error", "error"]
    with pytest.raises(KernelError) as err:
        await hmmc.call("fault", node="hmm0", mm=mm, addr=addr, pages=1)
    assert err.value.errno.value == "EFAULT"


async def test_partial_munmap(hmmc: Cluster) -> None:
    # hmm-tests partial_unmap: unmap the middle of a mirrored range; the
    # device loses exactly those pages, a read across the hole fails, the
    # rest still reads
    mm, addr = await _mm(hmmc, 4, fill=0x33)
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=4 * PS)
    assert r["faults"] == 1
    await hmmc.call("munmap", mm=mm, addr=addr + PS, length=PS)
    mirrored = nodes(await hmmc.call("status", mm=mm))["hmm0"]["mms"][str(mm)]
    assert sorted(int(a, 16) for a in mirrored) == [addr, addr + 2 * PS, addr + 3 * PS]
    assert await _snapshot(hmmc, "hmm0", mm, addr, 4) == ["write", "error", "write", "write"]
    with pytest.raises(KernelError) as err:
        await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=3 * PS)
    assert err.value.errno.value == "EFAULT"
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr + 2 * PS, length=2 * PS)
    assert r["data"] == b"\x33" * 2 * PS and r["faults"] == 0


async def test_fork_then_read_in_the_child(hmmc: Cluster) -> None:
    # hmm-tests anon_read_child: the child reads the parent's data through
    # the device; the device's writes into the child stay out of the parent
    mm, addr = await _mm(hmmc, 4)
    data = b"parent" * 1000
    await hmmc.call("write", mm=mm, addr=addr, data=data)
    await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=len(data))
    child = (await hmmc.call("fork", mm=mm))["mm"]
    # fork write-protected the parent: its mirror was invalidated
    assert await _snapshot(hmmc, "hmm1", mm, addr, 1) == ["read"]
    r = await hmmc.call("access", node="hmm1", mm=child, addr=addr, length=len(data))
    assert r["data"] == data and r["faults"] == 1
    await hmmc.call("access", node="hmm1", mm=child, addr=addr, length=5, data=b"child")
    assert (await hmmc.call("read", mm=child, addr=addr, length=6))["data"] == b"childt"
    assert (await hmmc.call("read", mm=mm, addr=addr, length=6))["data"] == b"parent"
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=6)
    assert r["data"] == b"parent"
    assert (await hmmc.status())["stale_accesses"] == 0


async def test_snapshot_states(hmmc: Cluster) -> None:
    # none, zero, read, write, error side by side; a snapshot faults nothing
    mm, addr = await _mm(hmmc, 5)
    await hmmc.call("read", mm=mm, addr=addr + PS, length=1)  # zero page
    await hmmc.call("write", mm=mm, addr=addr + 2 * PS, data=b"w")  # write
    await hmmc.call("write", mm=mm, addr=addr + 3 * PS, data=b"r")
    await hmmc.call("mprotect", mm=mm, addr=addr + 3 * PS, length=PS, prot="r")  # read
    await hmmc.call("mprotect", mm=mm, addr=addr + 4 * PS, length=PS, prot="none")  # error
    before = counter(await hmmc.node("hmm0"), "faults")
    assert await _snapshot(hmmc, "hmm0", mm, addr, 5) == ["none", "zero", "write", "read", "error"]
    hmm0 = await hmmc.node("hmm0")
    assert counter(hmm0, "faults") == before and str(mm) not in hmm0["mms"]  # nothing mirrored
    # the interval notifier of hmm0 on mm is on the host
    assert any(i[1] == "hmm0" for i in (await hmmc.call("status", mm=mm))["intervals"][str(mm)]["intervals"])


def test_cli_access_and_snapshot_json(hmmc: Cluster, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MMN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MMN_HOST", hmmc.admin)

    def mmn(*argv: object) -> tuple[int, str]:
        code = main([str(a) for a in argv])
        return code, capsys.readouterr().out

    code, out = mmn("spawn", "--json")
    mm = json.loads(out)["mm"]
    code, out = mmn("mmap", "--mm", mm, "--pages", 2, "--fill", "0x61", "--json")
    addr = json.loads(out)["addr"]
    code, out = mmn("access", "hmm0", "--mm", mm, hex(addr), "--len", 2 * PS, "--json")
    result = json.loads(out)
    assert code == 0 and result["faults"] == 1 and result["cpages"] == 2
    code, out = mmn("access", "hmm0", "--mm", mm, hex(addr), "--write", "6869", "--json")
    assert code == 0 and json.loads(out) == {"written": 2, "faults": 0, "cpages": 1}
    code, out = mmn("hmm", "snapshot", "hmm0", "--mm", mm, hex(addr), "--pages", 2, "--json")
    assert code == 0 and [p["state"] for p in json.loads(out)["pages"]] == ["write", "write"]
    code, out = mmn("hmm", "snapshot", "hmm0", "--mm", mm, hex(addr), "--pages", 2)
    assert code == 0 and re.search(rf"{addr:#x}\s+\d+\s+write", out)
    code, out = mmn("fault", "hmm1", "--mm", mm, hex(addr), "--pages", 2)
    assert code == 0 and f"{addr + PS:#x}" in out
    code, _ = mmn("hmm", "snapshot", "kvm0", "--mm", mm, hex(addr))
    assert code == 1  # not an hmm node


# -- the collision-retry loop at the node's core ------------------------------------------


def _hmm_node() -> tuple[HmmMMU, int]:
    node = HmmMMU("hmm0")
    node.receive(Registered(ref=0, epoch=1, host_incarnation="h", heartbeat_ms=0, ack_deadline_ms=1000, page_size=PS))
    _, out = node.fault(1, 0x10000, 1)
    (insert,) = out
    assert isinstance(insert, IntervalInsert)
    (request,) = node.receive(IntervalReply(ref=insert.id, interval=7, seq=1))
    assert isinstance(request, HmmRangeFault) and request.interval == 7
    return node, request.id


def test_an_invalidation_racing_read_begin_is_retried() -> None:
    # The host read the ptes at seq 1 (its read_begin), then an invalidation
    # of the interval started (cur_seq 3) and reached the node before the
    # reply: read_retry says so, the reply is discarded, the fault parks
    # until the end and asks again; the second reply (seq 3) installs.
    node, first = _hmm_node()
    start = InvalidateRangeStart(id=100, mm=1, start=0x10000, end=0x11000, event="CLEAR", seqs=[[7, 3]])
    assert node.receive(start) == [Ack(ref=100)]
    assert node.receive(HmmRangeFaultReply(ref=first, mm=1, seq=1, pfns=[[0x10000, 5, 3]])) == []
    assert node.counters["stale_replies"] == 1 and node.entry(1, 0x10000) is None
    (again,) = node.receive(InvalidateRangeEnd(id=101, mm=1, start=0x10000, end=0x11000, start_id=100))
    assert isinstance(again, HmmRangeFault)
    (done,) = node.receive(HmmRangeFaultReply(ref=again.id, mm=1, seq=3, pfns=[[0x10000, 9, 3]]))
    assert done.ok and done.result["pages"] == [[0x10000, 9, 1]]
    assert node.entry(1, 0x10000).pfn == 9


def test_a_reply_read_before_an_acked_invalidation_is_retried_after_the_end() -> None:
    # the start and its end both arrive before the reply: no invalidation is
    # open any more, only the seq tells the reply is older than the zap
    node, first = _hmm_node()
    node.receive(InvalidateRangeStart(id=100, mm=1, start=0, end=1 << 40, event="UNMAP", seqs=[[7, 3]]))
    node.receive(InvalidateRangeEnd(id=101, mm=1, start=0, end=1 << 40, start_id=100))
    (again,) = node.receive(HmmRangeFaultReply(ref=first, mm=1, seq=1, pfns=[[0x10000, 5, 3]]))
    assert isinstance(again, HmmRangeFault) and node.entry(1, 0x10000) is None
    # a start for another interval (not ours) does not disturb it
    node.receive(InvalidateRangeStart(id=102, mm=1, start=0, end=1 << 40, event="UNMAP", seqs=[[8, 5]]))
    node.receive(InvalidateRangeEnd(id=103, mm=1, start=0, end=1 << 40, start_id=102))
    (done,) = node.receive(HmmRangeFaultReply(ref=again.id, mm=1, seq=3, pfns=[[0x10000, 9, 1]]))
    assert done.ok and node.entry(1, 0x10000).writable is False


def test_non_blockable_start_while_copying_is_refused() -> None:
    # dmirror_interval_invalidate: mutex_trylock fails while the device
    # copies -> false (EAGAIN); a blockable one waits and is taken
    node, first = _hmm_node()
    node.receive(HmmRangeFaultReply(ref=first, mm=1, seq=1, pfns=[[0x10000, 5, 3]]))
    _, out = node.access(1, 0x10000, 4)
    assert out and out[0].TYPE == "dma_read"
    refused = node.receive(InvalidateRangeStart(id=200, mm=1, start=0x10000, end=0x11000, event="CLEAR",
                                                blockable=False, seqs=[[7, 3]]))
    assert refused == [Ack(ref=200, status="EAGAIN")] and node.entry(1, 0x10000) is not None
    taken = node.receive(InvalidateRangeStart(id=201, mm=1, start=0x10000, end=0x11000, event="CLEAR", seqs=[[7, 3]]))
    assert taken == [Ack(ref=201)] and node.entry(1, 0x10000) is None


def test_shutdown_asks_the_host_to_take_the_device_pages_back() -> None:
    # dmirror_fops_release at the node's core: nothing held, nothing to wait
    # for; pages held: one HmmEvict, and its reply completes the shutdown;
    # from then on nothing migrates to the device
    node, _ = _hmm_node()
    assert node.shutdown() == (None, [])
    node.removing = False
    assert node.receive(HmmMigrated(id=300, mm=1, pages=[[0x20000, 41, 1]], data=bytes(PS))) == [Ack(ref=300)]
    token, out = node.shutdown()
    (evict,) = out
    assert isinstance(evict, HmmEvict) and evict.epoch == node.epoch and token is not None
    (done,) = node.receive(HmmEvictReply(ref=evict.id, cpages=1, freed=[41]))
    assert done.token == token and done.result == {"cpages": 1, "lost": 0} and not node.device_pages
    _, refused = node.migrate(1, 0x20000, 1)
    assert refused[0].error is not None and refused[0].error.errno.value == "EBUSY"


# -- device-private migration (hmm-tests migrate, migrate_fault, migrate_shared...) ----------


async def test_migrate_and_read_back(hmmc: Cluster) -> None:
    # hmm-tests migrate: the pages move into hmm0's memory (the host's frames
    # are freed, its ptes become device-private entries); hmm0 reads them
    # without faulting; another device sees them as remote; the CPU reading
    # them brings them back (migrate_to_ram), fresh frames, same bytes
    npages = 4
    mm, addr = await _mm(hmmc, npages)
    data = bytes((i * 13) % 256 for i in range(npages * PS))
    await hmmc.call("write", mm=mm, addr=addr, data=data)
    free = (await hmmc.status())["frames"]["free"]
    r = await hmmc.call("hmm", node="hmm0", op="migrate", mm=mm, addr=addr, pages=npages)
    assert r["cpages"] == npages
    assert (await hmmc.status())["frames"]["free"] == free + npages
    assert await _snapshot(hmmc, "hmm0", mm, addr, npages) == ["device-private"] * npages
    assert await _snapshot(hmmc, "hmm1", mm, addr, npages) == ["device-private-remote"] * npages
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=len(data))
    assert r["data"] == data and r["faults"] == 0 and r["cpages"] == npages
    await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=3, data=b"dev")  # in device memory
    # the CPU touches page 0, kvm0 faults page 1, hmm1 reads page 2: each comes back
    assert (await hmmc.call("read", mm=mm, addr=addr, length=4))["data"] == b"dev" + data[3:4]
    await hmmc.call("fault", node="kvm0", mm=mm, addr=addr + PS, pages=1)
    r = await hmmc.call("access", node="hmm1", mm=mm, addr=addr + 2 * PS, length=PS)
    assert r["data"] == data[2 * PS : 3 * PS]
    assert await _snapshot(hmmc, "hmm0", mm, addr, npages) == ["write", "write", "write", "device-private"]
    # --to sys brings the rest back
    r = await hmmc.call("hmm", node="hmm0", op="migrate", mm=mm, addr=addr, pages=npages, to="sys")
    assert r["cpages"] == 1
    assert (await hmmc.call("read", mm=mm, addr=addr, length=len(data)))["data"] == b"dev" + data[3:]
    status = await hmmc.status()
    assert status["stale_accesses"] == 0 and status["device_private"]["by_owner"].get("hmm0", 0) == 0


async def test_migrate_then_fork(hmmc: Cluster) -> None:
    # hmm-tests (migrate + fork, as in hmm_cow_in_device): the child shares
    # the device pages read-only; a write on either side migrates the page
    # back for the writer only
    mm, addr = await _mm(hmmc, 2)
    await hmmc.call("write", mm=mm, addr=addr, data=b"A" * PS + b"B" * PS)
    await hmmc.call("hmm", node="hmm0", op="migrate", mm=mm, addr=addr, pages=2)
    child = (await hmmc.call("fork", mm=mm))["mm"]
    assert await _snapshot(hmmc, "hmm0", child, addr, 2) == ["device-private"] * 2
    await hmmc.call("write", mm=child, addr=addr, data=b"child")
    assert (await hmmc.call("read", mm=mm, addr=addr, length=5))["data"] == b"AAAAA"
    assert (await hmmc.call("read", mm=child, addr=addr, length=5))["data"] == b"child"
    # the device writes the parent's second page: it was shared, so it comes back first
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr + PS, length=2, data=b"pp")
    assert r["written"] == 2
    assert (await hmmc.call("read", mm=child, addr=addr + PS, length=3))["data"] == b"BBB"
    assert (await hmmc.call("read", mm=mm, addr=addr + PS, length=3))["data"] == b"ppB"
    assert (await hmmc.status())["stale_accesses"] == 0


async def test_a_dead_device_poisons_its_pages(tmp_path: Path) -> None:
    # a device killed while it holds device-private pages: the host cannot
    # get them back; they are poisoned (EIO on every access, counted), never
    # served stale; pages it did not hold are untouched
    c = _start_cluster(tmp_path, ("hmm", "kvm"))
    try:
        mm, addr = await _mm(c, 3, fill=0x77)
        await c.call("hmm", node="hmm0", op="migrate", mm=mm, addr=addr, pages=2)
        c.kill("hmm0")
        await c.call("inject", node="kvm0", kind="delay-acks", delay_ms=0)  # any request: the host is live
        with trio.fail_after(30):
            while nodes(await c.status())["hmm0"]["state"] == "live":
                await trio.sleep(0.1)  # the heartbeat watchdog fences it
        with pytest.raises(KernelError) as err:
            await c.call("read", mm=mm, addr=addr, length=1)
        assert err.value.errno.value == "EIO"
        with pytest.raises(KernelError) as err:
            await c.call("fault", node="kvm0", mm=mm, addr=addr + PS, pages=1)
        assert err.value.errno.value == "EIO"
        assert (await c.call("read", mm=mm, addr=addr + 2 * PS, length=2))["data"] == b"\x77\x77"
        status = await c.status()
        assert status["device_private"]["poisoned_pages"] == 2 and status["stale_accesses"] == 0
        await c.call("munmap", mm=mm, addr=addr, length=3 * PS)
        assert (await c.status())["device_private"]["pages"] == 0
    finally:
        c.close()


def _terminate(c: Cluster, key: str, timeout: float = 10.0) -> tuple[int, float]:
    """SIGTERM a process group; its exit status and how long it took."""
    proc = c.procs.pop(key)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=timeout)
    return code, time.monotonic() - t0


async def _gone(c: Cluster, name: str) -> None:
    await c.call("inject", node="kvm0", kind="delay-acks", delay_ms=0)  # any request: the host is live
    with trio.fail_after(30):
        while nodes(await c.status())[name]["state"] == "live":
            await trio.sleep(0.1)


async def test_a_device_stopped_cleanly_hands_its_pages_back(tmp_path: Path) -> None:
    # dmirror_fops_release -> dmirror_device_evict_chunk: a device that goes
    # away cleanly (SIGTERM) first migrates every device-private page back to
    # system memory -- pages the device wrote, pages fork shares with a
    # child -- so the host reads the right bytes afterwards, nothing poisoned
    c = _start_cluster(tmp_path, ("hmm", "kvm"))
    try:
        mm, addr = await _mm(c, 3)
        data = bytes((i * 7) % 256 for i in range(3 * PS))
        await c.call("write", mm=mm, addr=addr, data=data)
        assert (await c.call("hmm", node="hmm0", op="migrate", mm=mm, addr=addr, pages=3))["cpages"] == 3
        await c.call("access", node="hmm0", mm=mm, addr=addr, length=3, data=b"dev")  # only on the device
        child = (await c.call("fork", mm=mm))["mm"]  # shares the device pages
        before = (await c.status())["device_private"]
        assert before["by_owner"] == {"hmm0": 3} and before["poisoned_pages"] == 0
        code, took = _terminate(c, "hmm0")
        assert code == 0 and took < 5
        await _gone(c, "hmm0")  # the host noticed it went: a dead device's pages would be poisoned now
        want = b"dev" + data[3:]
        assert (await c.call("read", mm=mm, addr=addr, length=len(want)))["data"] == want
        assert (await c.call("read", mm=child, addr=addr, length=len(want)))["data"] == want
        await c.call("write", mm=child, addr=addr, data=b"kid")  # COW as usual, the parent keeps its bytes
        assert (await c.call("read", mm=mm, addr=addr, length=3))["data"] == b"dev"
        status = await c.status()
        device = status["device_private"]
        assert device["pages"] == 0 and device["poisoned_pages"] == 0 and device["poisoned_accesses"] == 0
        assert device["migrated_to_ram"] == 6  # three pages, each in the parent and the child
        assert status["stale_accesses"] == 0
    finally:
        c.close()


async def test_a_device_whose_host_does_not_answer_leaves_within_its_deadline(tmp_path: Path) -> None:
    # the host is stopped (SIGSTOP) when the device is told to go: the device
    # waits for the host at most its evict deadline, then exits; the host,
    # resumed, finds it gone and poisons what it held, as for a crash
    c = _start_cluster(tmp_path, ("hmm", "kvm"), node_args=("--evict-timeout-ms", "500"))
    try:
        mm, addr = await _mm(c, 2, fill=0x5A)
        await c.call("hmm", node="hmm0", op="migrate", mm=mm, addr=addr, pages=2)
        host = c.procs["host"]
        os.kill(host.pid, signal.SIGSTOP)
        try:
            code, took = _terminate(c, "hmm0")
        finally:
            os.kill(host.pid, signal.SIGCONT)
        assert code == 0 and 0.4 < took < 3
        await _gone(c, "hmm0")
        with pytest.raises(KernelError) as err:
            await c.call("read", mm=mm, addr=addr, length=1)
        assert err.value.errno.value == "EIO"
        status = await c.status()
        assert status["device_private"]["poisoned_pages"] == 2 and status["stale_accesses"] == 0
    finally:
        c.close()


async def test_exclusive_then_cpu_write(hmmc: Cluster) -> None:
    # hmm-tests hmm_exclusive: the device gets exclusive (atomic) access; a
    # CPU write afterwards restores the normal pte through an EXCLUSIVE
    # invalidation (seen on the event stream, as `mmn watch` shows it), and
    # the device loses its atomic mapping
    mm, addr = await _mm(hmmc, 2, fill=0x10)
    async with watching(hmmc) as events:
        r = await hmmc.call("hmm", node="hmm0", op="exclusive", mm=mm, addr=addr, pages=2)
        assert r["cpages"] == 2
        assert await _snapshot(hmmc, "hmm0", mm, addr, 2) == ["exclusive", "exclusive"]
        assert await _snapshot(hmmc, "hmm1", mm, addr, 2) == ["none", "none"]  # not present to any other walker
        r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=4, data=b"atom")
        assert r == {"written": 4, "faults": 0, "cpages": 1}
        await hmmc.call("write", mm=mm, addr=addr + 1, data=b"C")
        await events.wait_for(lambda e: e.kind == "invalidate_range_start" and e.fields.get("event") == "EXCLUSIVE"
                              and e.fields.get("mm") == mm and e.fields.get("start") == addr
                              and e.fields.get("node") == "hmm0")
    assert await _snapshot(hmmc, "hmm0", mm, addr, 2) == ["write", "exclusive"]
    assert (await hmmc.call("read", mm=mm, addr=addr, length=5))["data"] == b"aCom\x10"
    # the device's next write faults again (its atomic mapping went with the restore)
    r = await hmmc.call("access", node="hmm0", mm=mm, addr=addr, length=1, data=b"A")
    assert r["faults"] == 1
    assert (await hmmc.status())["stale_accesses"] == 0
