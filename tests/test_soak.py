"""``mmn soak``: the seeded schedule, a CI-sized soak on real processes, and
proof that the soak fails a deliberately broken build.

The longer run (README): ``mmn soak --seed 1 --ops 5000 --nodes 6 --faults 0.05``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from mmn.soak import INJECTIONS, SOAK_HOST, Cluster, Report, Soak, digest, node_names, plan, soak

ROOT = Path(__file__).resolve().parent.parent


def test_the_schedule_is_a_function_of_the_seed_alone() -> None:
    """Same seed, same schedule (ops, pages, data, injections); another seed,
    another.  A long schedule covers every operation and every failure kind,
    mixes node kinds, and races accesses with invalidations of their pages."""
    nodes = node_names(6)
    assert [k for _, k in nodes] == ["kvm", "gru", "xpmem"] * 2
    one = plan(1, 5000, nodes, 0.05)
    assert plan(1, 5000, nodes, 0.05) == one and digest(plan(1, 5000, nodes, 0.05)) == digest(one)
    assert digest(plan(2, 5000, nodes, 0.05)) != digest(one)
    ops = Counter(op["op"] for group in one for op in group)
    assert sum(n for k, n in ops.items() if k != "inject") >= 5000
    every = {"spawn", "mmap", "munmap", "mprotect", "madvise", "fork", "exit", "merge", "swap", "migrate",
             "host_write", "host_read", "node_read", "node_write", "node_fault", "xpmem_attach", "xpmem_read",
             "xpmem_write", "xpmem_detach", "inject"}
    assert every <= set(ops)
    kinds = Counter(op["kind"] for group in one for op in group if op["op"] == "inject")
    assert set(kinds) == {k for k, _ in INJECTIONS}
    assert 150 < sum(kinds.values()) < 400  # ~5% of the operations
    assert {op["node"] for group in one for op in group if op["op"] in ("node_read", "node_write")} == {
        n for n, k in nodes if k in ("kvm", "gru")}
    raced = sum(
        1 for group in one
        if any(o["op"] in ("node_read", "node_write") for o in group)
        and any(o["op"] in ("munmap", "mprotect", "madvise", "migrate", "swap") for o in group)
    )
    assert raced > 300
    assert plan(1, 500, nodes, 0.05, crash=False) != plan(1, 500, nodes, 0.05)
    assert all(op.get("kind") != "crash" for group in plan(1, 2000, nodes, 0.2, crash=False) for op in group)


@pytest.mark.integration
async def test_a_ci_soak_with_failures_that_fence_several_nodes_finds_nothing(tmp_path: Path) -> None:
    """3000 operations over 5 nodes (kvm, gru, xpmem, kvm, gru) with a
    failure injected at 3% of them: several nodes are fenced and come back,
    and there is no stale access, wrong read or lost write, every operation
    within its deadline.  On CURVE, as a deployment runs: every process
    with its own key, made for the run."""
    report = await soak(11, 3000, 5, 0.03, logs=tmp_path, curve=True)
    summary = {k: v for k, v in report.__dict__.items() if k != "violations"}
    assert report.ok(), (summary, report.violations)
    assert report.ops >= 3000 and report.injected >= 50
    assert report.nodes_fenced >= 5 and report.nodes_recovered >= 5, summary
    assert report.stale_accesses == report.lost_writes == report.wrong_reads == report.late == 0
    assert report.slowest["ratio"] <= 1.0
    assert report.runtime_s < 150
    assert (tmp_path / "keys" / "nodes" / "kvm0.key_secret").exists()


@pytest.mark.integration
def test_a_node_that_acks_before_it_zaps_fails_the_soak(tmp_path: Path) -> None:
    """The same soak against a build whose kvm nodes ack a start and zap only
    at its end (tests/broken_kinds.py, put in every process of the soak by
    tests/broken_site/sitecustomize.py when MMN_TEST_BROKEN is set): accesses that
    cross a page being invalidated reach the old page after the host
    changed it; the oracle refuses them, and ``mmn soak`` exits non-zero."""
    site = ROOT / "tests" / "broken_site"
    env = {**os.environ, "MMN_TEST_BROKEN": "acks-before-zap", "PYTHONPATH": os.pathsep.join((str(site), str(ROOT)))}
    proc = subprocess.run(
        [sys.executable, "-m", "mmn", "soak", "--seed", "7", "--ops", "4000", "--nodes", "4", "--faults", "0",
         "--json", "--logs", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=170,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is False and report["stale_accesses"] > 0, report
    assert any(v.startswith("stale_accesses") for v in report["violations"])
    # the correct build passes the very same schedule
    env.pop("MMN_TEST_BROKEN")
    proc = subprocess.run(
        [sys.executable, "-m", "mmn", "soak", "--seed", "7", "--ops", "4000", "--nodes", "4", "--faults", "0",
         "--json"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout)["schedule_digest"] == report["schedule_digest"]


# --------------------------------------------------------------------------
# the checker: node failures against the shadow


PS = 4096


def _checker(prot: str = "rw", pages: int = 3) -> Soak:
    """A Soak's shadow (no cluster): mm 1, region 1 of ``pages`` pages of "A"."""
    runner = Soak("tcp://127.0.0.1:9", [], [("kvm0", "kvm"), ("xpmem0", "xpmem")], Report(seed=0), dict(SOAK_HOST))
    runner.mm[1] = 1
    runner.base[(1, 1)] = 0x1000_0000
    for i in range(pages):
        runner.pages[(1, 1, i)] = {b"A" * PS}
        runner.history[(1, 1, i)] = []
        runner.prot[(1, 1, i)] = prot
    return runner


def _access(kind: str, page: int = 0, length: int = 4, **more: object) -> dict:
    op = {"op": kind, "node": "kvm0", "mm": 1, "rid": 1, "page": page, "offset": 0, "length": length, **more}
    if kind == "node_write":
        op.setdefault("data", b"B" * length)
    return op


def test_a_node_access_denied_on_a_page_the_shadow_maps_for_it_is_a_violation() -> None:
    """EFAULT/EPERM of a kvm or gru access is what the shadow must explain:
    the page unmapped or protected against it, or changed by its group.
    Otherwise it is ``wrong_errors``; the failures the injected faults
    explain (EINTR, ESRCH, ETIMEDOUT, EAGAIN) are node errors."""
    runner = _checker()
    runner._access_failed(_access("node_read"), (False, "EFAULT", ""), set())
    runner._access_failed(_access("node_write", page=1, length=PS + 4), (False, "EPERM", ""), set())
    runner._access_failed(_access("node_fault", pages=2, write=True), (False, "EFAULT", ""), set())
    assert runner.report.wrong_errors == 3 and not runner.report.ok()
    assert all(v.startswith("wrong_errors") for v in runner.report.violations)

    runner = _checker()
    runner.prot[(1, 1, 0)] = "none"
    runner.prot[(1, 1, 2)] = "r"
    del runner.pages[(1, 1, 1)]  # munmapped
    runner._access_failed(_access("node_read"), (False, "EFAULT", ""), set())  # PROT_NONE
    runner._access_failed(_access("node_read", page=1), (False, "EFAULT", ""), set())  # no vma
    runner._access_failed(_access("node_write", page=2), (False, "EPERM", ""), set())  # read-only
    runner._access_failed(_access("node_read", page=2, length=4), (False, "EFAULT", ""), {(1, 1, 2)})  # raced
    for errno in ("EINTR", "ESRCH", "ETIMEDOUT", "EAGAIN"):
        runner._access_failed(_access("node_read", page=2), (False, errno, ""), set())
    assert runner.report.ok() and runner.report.node_errors == 8
    runner._access_failed(_access("node_read", page=2), (False, "ENOMEM", ""), set())  # nothing explains it
    assert runner.report.unexpected == 1


def test_an_xpmem_efault_on_an_attachment_of_the_current_session_is_a_violation() -> None:
    """An xpmem access through an attachment made in the node's current
    session, on a page mapped for the permit, may not fail EFAULT; once the
    node's epoch moved on (a fence drops every attachment) it may, and the
    runner no longer counts the attachment as current (it attaches again
    before the next access)."""
    runner = _checker()
    runner.att_spec[7] = {"op": "xpmem_attach", "att": 7, "node": "xpmem0", "mm": 1, "rid": 1, "page": 0,
                          "npages": 3, "write": True}
    runner.atts[7] = (0x6000_0000_0000, 0)
    runner.att_gen[7] = 1
    runner.gen_epoch[1] = 3
    runner.epochs["xpmem0"] = (3, True)
    assert runner._current(7)

    def read(page: int = 1) -> dict:
        op = {"op": "xpmem_read", "att": 7, "node": "xpmem0", "mm": 1, "rid": 1, "page": page, "index": page,
              "offset": 0, "length": 4}
        runner._op_gen[id(op)] = 1
        return op

    runner._access_failed(read(), (False, "EFAULT", "no attachment"), set())
    assert runner.report.wrong_errors == 1
    runner.prot[(1, 1, 2)] = "r"  # a read-write permit pins writable: EPERM to read it is right
    runner._access_failed(read(2), (False, "EPERM", ""), set())
    assert runner.report.wrong_errors == 1
    runner.epochs["xpmem0"] = (4, True)  # fenced and registered again
    runner._access_failed(read(), (False, "EFAULT", "no attachment"), set())
    assert runner.report.wrong_errors == 1 and runner.report.node_errors == 2
    assert not runner._current(7)


def test_a_failed_node_write_widens_the_shadow_only_where_it_may_have_landed() -> None:
    """A write the host never relayed (ESRCH) or that failed before its DMA
    leaves the page as it was: reading the write's bytes afterwards is a
    wrong read.  One whose outcome is unknown (EINTR) may have landed.  A
    multi-page write denied at its third page did land on the first two:
    reading their old bytes is a lost write."""
    runner = _checker()
    write = _access("node_write", data=b"BBBB")
    runner.apply(write, (False, "ESRCH", "no live node"))
    assert runner.pages[(1, 1, 0)] == {b"A" * PS}
    runner.check_read(_access("node_read"), (True, {"data": b"BBBB"}, ""), {}, set())
    assert runner.report.wrong_reads == 1

    runner = _checker()
    runner.apply(write, (False, "EINTR", "fenced"))
    assert runner.pages[(1, 1, 0)] == {b"A" * PS, b"BBBB" + b"A" * (PS - 4)}
    runner.check_read(_access("node_read"), (True, {"data": b"BBBB"}, ""), {}, set())
    assert runner.report.ok()

    runner = _checker()
    runner.prot[(1, 1, 2)] = "r"
    wide = _access("node_write", length=2 * PS + 4)
    runner.apply(wide, (False, "EPERM", "read-only"))
    assert runner.pages[(1, 1, 0)] == {b"B" * PS} and runner.pages[(1, 1, 1)] == {b"B" * PS}
    assert runner.pages[(1, 1, 2)] == {b"A" * PS}
    runner.check_read(_access("host_read"), (True, {"data": b"AAAA"}, ""), {}, set())
    assert runner.report.lost_writes == 1


@pytest.mark.integration
async def test_a_node_that_is_not_live_again_after_the_final_heal_fails_the_soak(tmp_path: Path,
                                                                                 nursery: Any) -> None:
    """gru0 is stopped (SIGSTOP: not killed, not restarted) before a short
    soak runs.  The host fences it; its operations fail as they may (ESRCH,
    ETIMEDOUT); healed at the end, it is not live within its liveness
    window: ``unrecovered``, the run fails -- and with gru0 running, the
    very same schedule passes."""
    nodes = [("kvm0", "kvm"), ("gru0", "gru")]
    schedule = plan(3, 60, nodes, 0.0, crash=False)
    for stop in (True, False):
        cluster = Cluster(nodes, logs=tmp_path / str(stop), restart=False)
        report = Report(seed=3)
        await cluster.start(nursery)
        pgid = cluster.procs["gru0"].pid
        try:
            if stop:
                os.killpg(pgid, signal.SIGSTOP)
            with trio.fail_after(120):
                await Soak(cluster.admin, schedule, nodes, report, dict(SOAK_HOST), cluster=cluster).run()
        finally:
            os.killpg(pgid, signal.SIGCONT)
            await cluster.stop()
        if stop:
            assert report.unrecovered == 1 and not report.ok(), report
            assert all(v.startswith("unrecovered: gru0 not live") for v in report.violations), report.violations
        else:
            assert report.ok(), report.violations
            assert report.recovery_s < SOAK_HOST["heartbeat_ms"] * SOAK_HOST["liveness"] / 1000


@pytest.mark.integration
async def test_an_xpmem_attachment_a_restart_dropped_is_attached_again_before_it_is_used(tmp_path: Path,
                                                                                       nursery: Any) -> None:
    """xpmem0 attaches a span and reads through it; then its process is
    killed and its supervisor starts it again: the new process holds no
    attachment.  The next read and write planned on that attachment are
    not wasted on an EFAULT: the runner sees the new epoch, attaches the
    span again in the new session, and both succeed -- the write readable
    by the host."""
    import contextlib

    from mmn.client import AdminClient
    from mmn.soak import STATUS_LANE

    nodes = [("xpmem0", "xpmem")]
    cluster = Cluster(nodes, logs=tmp_path)
    await cluster.start(nursery)
    report = Report(seed=0)
    runner = Soak(cluster.admin, [], nodes, report, dict(SOAK_HOST), cluster=cluster)

    def access(kind: str, **more: Any) -> dict[str, Any]:
        return {"op": kind, "att": 1, "node": "xpmem0", "mm": 1, "rid": 1, "page": 1, "index": 1, "offset": 8,
                "length": 4, **more}

    try:
        with trio.fail_after(90):
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(STATUS_LANE + 1):
                    runner.clients.append(await stack.enter_async_context(AdminClient(cluster.admin)))
                runner.t_start = 0.0
                runner.trace = stack.enter_context(open(tmp_path / "soak.trace", "w"))
                await runner.run_group([{"op": "spawn", "mm": 1}])
                await runner.run_group([{"op": "mmap", "mm": 1, "rid": 1, "pages": 2, "fill": 0x41,
                                         "mergeable": False}])
                await runner.run_group([{"op": "xpmem_attach", "att": 1, "node": "xpmem0", "mm": 1, "rid": 1,
                                         "page": 0, "npages": 2, "write": True}])
                await runner.run_group([access("xpmem_read")])
                assert (report.xpmem_reads_ok, report.reattached) == (1, 0)
                epoch = runner.epochs["xpmem0"][0]
                cluster.kill("xpmem0", signal.SIGKILL)

                async def back() -> bool:
                    ok, st, _ = await runner.call(0, "status", {}, 5.0)
                    node = st["nodes"][0] if ok else {}
                    return node.get("state") == "live" and node.get("epoch", 0) > epoch

                while not await back():
                    await trio.sleep(0.1)
                assert cluster.restarts == 1
                await runner.run_group([access("xpmem_read")])
                await runner.run_group([access("xpmem_write", data=b"new!")])
                await runner.run_group([access("host_read")])
    finally:
        await cluster.stop()
    assert report.ok(), report.violations
    assert report.reattached == 1 and runner.epochs["xpmem0"][0] > epoch
    assert (report.xpmem_reads_ok, report.xpmem_reads, report.xpmem_writes_ok) == (2, 2, 1)
    assert runner.pages[(1, 1, 1)] == {b"A" * 8 + b"new!" + b"A" * (PS - 12)}
