"""``mmn soak``: the seeded schedule, a CI-sized soak on real processes, and
proof that the soak fails a deliberately broken build.

The longer run (README): ``mmn soak --seed 1 --ops 5000 --nodes 6 --faults 0.05``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from mmn.soak import (
    INJECTIONS,
    NODE_LIVENESS,
    PROCESS_INJECTIONS,
    SOAK_HOST,
    Cluster,
    Report,
    Soak,
    digest,
    node_names,
    plan,
    soak,
)

ROOT = Path(__file__).resolve().parent.parent


def test_the_schedule_is_a_function_of_the_seed_alone() -> None:
    """Same seed, same schedule (ops, pages, data, injections); another seed,
    another.  A long schedule covers every operation and every failure kind,
    mixes node kinds, and races accesses with invalidations of their pages."""
    nodes = node_names(6)
    assert nodes == [("kvm0", "kvm"), ("gru0", "gru"), ("xpmem0", "xpmem"), ("kvm1", "kvm"), ("hmm0", "hmm"),
                     ("xpmem1", "xpmem")]
    one = plan(1, 5000, nodes, 0.05)
    assert plan(1, 5000, nodes, 0.05) == one and digest(plan(1, 5000, nodes, 0.05)) == digest(one)
    assert digest(plan(2, 5000, nodes, 0.05)) != digest(one)
    ops = Counter(op["op"] for group in one for op in group)
    assert sum(n for k, n in ops.items() if k != "inject") >= 5000
    every = {"spawn", "mmap", "munmap", "mprotect", "madvise", "fork", "exit", "merge", "swap", "migrate",
             "host_write", "host_read", "node_read", "node_write", "node_fault", "xpmem_attach", "xpmem_read",
             "xpmem_write", "xpmem_detach", "inject", "hmm_migrate", "hmm_exclusive"}
    assert every <= set(ops)
    kinds = Counter(op["kind"] for group in one for op in group if op["op"] == "inject")
    assert set(kinds) == {k for k, _ in INJECTIONS}
    assert 150 < sum(kinds.values()) < 400  # ~5% of the operations
    assert {op["node"] for group in one for op in group if op["op"] in ("node_read", "node_write")} == {
        n for n, k in nodes if k in ("kvm", "gru", "hmm")}
    raced = sum(
        1 for group in one
        if any(o["op"] in ("node_read", "node_write") for o in group)
        and any(o["op"] in ("munmap", "mprotect", "madvise", "migrate", "swap") for o in group)
    )
    assert raced > 300
    assert plan(1, 500, nodes, 0.05, crash=False) != plan(1, 500, nodes, 0.05)
    # --host: no injection that needs the soak's own processes
    assert all(op.get("kind") not in PROCESS_INJECTIONS
               for group in plan(1, 2000, nodes, 0.2, crash=False) for op in group)
    assert {"crash", "reset", "host-pause"} == PROCESS_INJECTIONS <= set(kinds)
    pauses = [op["for_s"] for group in one for op in group if op.get("kind") == "host-pause"]
    window = SOAK_HOST["heartbeat_ms"] * SOAK_HOST["liveness"] / 1000
    assert pauses and all(window < p < SOAK_HOST["heartbeat_ms"] * NODE_LIVENESS / 1000 for p in pauses)
    assert any(p < 1.1 for p in pauses)  # under the stall floor of a second past a period (dc1267a)


def test_hmm_nodes_join_the_mix_from_the_fifth_node_and_smaller_runs_keep_their_schedules() -> None:
    """The kinds cycle kvm, gru, xpmem, kvm, hmm, xpmem: up to four nodes the
    names, and the schedules, are what they were before the hmm kind joined
    (the digest of one, pinned); from five on, hmm0 takes part: node reads,
    writes and faults, migrations to its memory and back (``--to sys``,
    half of them aimed at spans migrated before), exclusive access, and
    accesses by others aimed at migrated pages."""
    assert [n for n, _ in node_names(4)] == ["kvm0", "gru0", "xpmem0", "kvm1"]
    assert [n for n, _ in node_names(7)][4:] == ["hmm0", "xpmem1", "kvm2"]
    four = plan(11, 3000, node_names(4), 0.05)
    assert digest(four) == "ac1bdb420c984c41"  # as before hmm nodes (main at fbc9ffe)
    assert not any(op["op"].startswith("hmm_") or (op.get("node") or "").startswith("hmm")
               for g in four for op in g)
    schedule = plan(3, 3000, node_names(5), 0.03)  # the CI soak's
    hmm = [op for group in schedule for op in group if op["op"].startswith("hmm_")]
    assert all(op["node"] == "hmm0" for op in hmm)
    kinds = Counter((op["op"], op.get("to")) for op in hmm)
    assert kinds[("hmm_migrate", "dev")] >= 40 and kinds[("hmm_migrate", "sys")] >= 10, kinds
    assert kinds[("hmm_exclusive", None)] >= 20, kinds
    spans = {(op["mm"], op["rid"], op["page"], op["npages"]) for op in hmm if op.get("to") == "dev"}
    back = [op for op in hmm if op.get("to") != "dev" and (op["mm"], op["rid"], op["page"], op["npages"]) in spans]
    assert len(back) >= 10
    accesses = Counter(op["op"] for group in schedule for op in group if op.get("node") == "hmm0")
    assert min(accesses["node_read"], accesses["node_write"], accesses["node_fault"]) >= 50, accesses
    # at most one operation that changes contents or mappings per mm in a group, hmm ones included
    for group in schedule:
        changing = [op["mm"] for op in group if op["op"] in ("hmm_migrate", "hmm_exclusive", "host_write",
                                                               "node_write", "munmap", "mprotect", "madvise",
                                                               "fork", "exit", "mmap")]
        assert len(changing) == len(set(changing)), group


def test_xpmem_operations_are_planned_only_on_attachments_that_can_exist() -> None:
    """xpmem_attach validates a permit for read-write (EACCES for a
    read-only one): a read-only attach is planned now and then, as a denial,
    and no read, write or detach is ever planned on it."""
    schedule = plan(1, 5000, node_names(6), 0.05)
    attaches = {op["att"]: op for group in schedule for op in group if op["op"] == "xpmem_attach"}
    assert sum(not op["write"] for op in attaches.values()) >= 10
    shared = {aid for group in schedule for op in group if op["op"] == "xpmem_share" for aid, _ in op["atts"]}
    used = [op for group in schedule for op in group if op["op"] in ("xpmem_read", "xpmem_write", "xpmem_detach")]
    assert len(used) > 300 and all(op["att"] in shared or attaches[op["att"]]["write"] for op in used)


def test_removes_of_shared_segments_are_planned_with_reads_in_flight_and_accesses_after() -> None:
    """A segment one xpmem node makes and both xpmem nodes attach
    (``xpmem_share``) is removed with reads through its attachments in the
    same group; afterwards accesses through them (``xpmem_dead``, which must
    fail) are planned, and no read, write or detach as if they were still
    there.  Swap and migrate are aimed at attached pages now and then.  With
    one xpmem node, it attaches a shared segment twice."""
    schedule = plan(1, 5000, node_names(6), 0.05)
    shares = {op["seg"]: op for group in schedule for op in group if op["op"] == "xpmem_share"}
    assert len(shares) >= 30
    assert sum(len({node for _, node in op["atts"]}) == 2 for op in shares.values()) >= 10
    removed: set[int] = set()
    in_flight = 0
    for group in schedule:
        for op in group:
            if op["op"] == "xpmem_remove":
                assert op["node"] == shares[op["seg"]]["node"] and op["atts"]
                assert set(op["atts"]) <= {aid for aid, _ in shares[op["seg"]]["atts"]}
                flight = [o for o in group if o.get("removing") == op["seg"]]
                assert all(o["att"] in op["atts"] for o in flight)
                in_flight += len(flight)
                removed |= set(op["atts"])
            elif op["op"] == "xpmem_dead":
                assert op["att"] in removed
            elif op["op"] in ("xpmem_read", "xpmem_write", "xpmem_detach") and not op.get("removing"):
                assert op["att"] not in removed
    assert len(removed) >= 20 and in_flight >= 10
    assert sum(op["op"] == "xpmem_dead" for group in schedule for op in group) >= 20
    spans = {(op["mm"], op["rid"], op["page"], op["npages"]) for op in shares.values()}
    aimed = [op for group in schedule for op in group if op["op"] in ("swap", "migrate")
             and (op["mm"], op["rid"], op["page"], op["npages"]) in spans]
    assert len(aimed) >= 20
    one = plan(2, 3000, node_names(5), 0.03)
    assert any(op["op"] == "xpmem_share" and op["atts"][0][1] == op["atts"][1][1] == "xpmem0"
               for group in one for op in group)
    assert any(op["op"] == "xpmem_remove" for group in one for op in group)


def test_a_host_crash_in_the_schedule_starts_it_over_on_new_mms() -> None:
    """With ``--host-crash`` the planner now and then kills the host, in a
    group of its own.  Every mm and attachment goes with it (a host crash
    loses every mm), so what follows spawns new mms and never names an mm
    or an attachment of before.  Without the flag, no host crash."""
    nodes = node_names(6)
    schedule = plan(1, 5000, nodes, 0.05, host_crash=True)
    crashes = [i for i, group in enumerate(schedule) if group == [{"op": "host-crash"}]]
    assert 3 <= len(crashes) <= 15
    assert all(op["op"] != "host-crash" for group in plan(1, 5000, nodes, 0.05) for op in group)
    assert plan(1, 5000, nodes, 0.05, host_crash=True) == schedule

    def named(groups: list[list[dict[str, Any]]]) -> set[tuple[str, int]]:
        return {(k, op[k]) for group in groups for op in group for k in ("mm", "child", "att") if k in op}

    for n, i in enumerate(crashes):
        end = crashes[n + 1] if n + 1 < len(crashes) else len(schedule)
        assert [op["op"] for op in schedule[i + 1]] == ["spawn", "spawn"]
        after = named(schedule[i + 1:end])
        assert after and not after & named(schedule[:i])


@pytest.mark.integration
async def test_a_ci_soak_with_failures_that_fence_several_nodes_finds_nothing(tmp_path: Path) -> None:
    """3000 operations over 5 nodes (kvm, gru, xpmem, kvm, hmm) with a
    failure injected at 3% of them -- connection resets and host pauses
    among them: several nodes are fenced and come back, and there is no
    stale access, wrong read or lost write, no node fenced over a pause of
    the host, every operation within its deadline.  hmm0 migrates pages to
    its memory and back and takes exclusive access, the others' accesses
    bring pages back; no page a device lost serves bytes, no EIO comes
    where none may be lost.  On CURVE, as a deployment runs: every process
    with its own key, made for the run."""
    report = await soak(3, 3000, 5, 0.03, logs=tmp_path, curve=True)
    summary = {k: v for k, v in report.__dict__.items() if k != "violations"}
    assert report.ok(), (summary, report.violations)
    # shared segments removed with their importers' accesses refused after;
    # every attachment detached at the end, the host's pins all given back
    assert report.xpmem_removed >= 3 and report.dead_refused >= 1, summary
    assert report.pages_pinned == report.pages_unpinned > 0 and report.pins_leaked == 0, summary
    assert report.ops >= 3000 and report.injected >= 50
    assert report.nodes_fenced >= 5 and report.nodes_recovered >= 5, summary
    assert report.resets >= 5 and report.resets_unavailable == 0, summary
    assert report.host_pauses >= 2 and report.paused_fences == 0, summary
    assert report.stale_accesses == report.lost_writes == report.wrong_reads == report.late == 0
    assert report.hmm_migrated >= 20 and report.hmm_exclusive >= 10 and report.wrong_poison == 0, summary
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


@pytest.mark.integration
def test_an_importer_that_keeps_its_attachment_after_remove_fails_the_soak(tmp_path: Path) -> None:
    """The soak against a build whose xpmem nodes ack a remove of a segment
    they import and go on using their attachments of it
    (``MMN_TEST_BROKEN=keeps-attachments-on-remove``): the soak's shared
    segments (one node makes, both xpmem nodes attach) are removed with
    importers, and the accesses through them afterwards reach for the owner's
    pages on a permit that is gone.  The host catches each one: a DMA through
    the kept translation is a stale access (the oracle), a re-pin of a page
    it unpinned is refused (EACCES, no permit covers it) -- which of the two
    depends on timing, so the test asks for either on the accesses after
    the remove -- and ``mmn soak`` exits non-zero.  The correct build passes
    the same schedule, every such access refused, and the host's pinned ==
    unpinned at the end."""
    site = ROOT / "tests" / "broken_site"
    env = {**os.environ, "MMN_TEST_BROKEN": "keeps-attachments-on-remove",
           "PYTHONPATH": os.pathsep.join((str(site), str(ROOT)))}
    argv = [sys.executable, "-m", "mmn", "soak", "--seed", "7", "--ops", "2000", "--nodes", "6", "--faults", "0",
            "--json"]
    proc = subprocess.run([*argv, "--logs", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is False and report["xpmem_removed"] > 0, report
    caught = [v for v in report["violations"]
              if v.startswith("stale_accesses") or v.startswith("unexpected: op=xpmem_dead")]
    assert caught, report["violations"]
    assert report["stale_accesses"] > 0 or any("no xpmem permit covers" in v for v in caught), caught
    env.pop("MMN_TEST_BROKEN")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    good = json.loads(proc.stdout)
    assert good["schedule_digest"] == report["schedule_digest"]
    assert good["xpmem_removed"] > 0 and good["dead_refused"] > 0, good
    assert good["pages_pinned"] == good["pages_unpinned"] > 0, good


@pytest.mark.integration
def test_an_hmm_node_that_keeps_device_pages_it_gave_back_fails_the_soak(tmp_path: Path) -> None:
    """The soak against a build whose hmm nodes give a device page back to
    the host (``dmirror_devmem_fault``) and keep their copy and mirror of it
    (``MMN_TEST_BROKEN=keeps-device-pages``): the CPU writes the page once
    it is back, the node's later accesses copy its old bytes -- no DMA, the
    host's oracle sees nothing; the shadow of the contents catches it
    (``wrong_reads`` / ``lost_writes``) and ``mmn soak`` exits non-zero.
    The correct build passes the same schedule."""
    site = ROOT / "tests" / "broken_site"
    env = {**os.environ, "MMN_TEST_BROKEN": "keeps-device-pages",
           "PYTHONPATH": os.pathsep.join((str(site), str(ROOT)))}
    argv = [sys.executable, "-m", "mmn", "soak", "--seed", "7", "--ops", "1500", "--nodes", "5", "--faults", "0",
            "--json"]
    proc = subprocess.run([*argv, "--logs", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is False and report["hmm_migrated"] > 0, report
    assert report["wrong_reads"] + report["lost_writes"] > 0 and report["stale_accesses"] == 0, report
    env.pop("MMN_TEST_BROKEN")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    good = json.loads(proc.stdout)
    assert good["schedule_digest"] == report["schedule_digest"] and good["hmm_migrated"] > 0, good


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


async def test_a_group_is_checked_as_a_whole_and_a_write_is_not_its_own_excuse() -> None:
    """The runner's own path (``run_group``, outcomes fed in for the
    cluster's): a node write denied EPERM on a page mapped read-write for
    it is ``wrong_errors`` -- its own pages, which it changes, do not
    excuse it (they did, and every denied write passed).  Raced by a
    munmap of that page in its group, the denial is explained.  A
    read-only xpmem attach that succeeds is a violation; refused, a node
    error."""
    outcomes: dict[str, tuple[bool, Any, str]] = {}

    async def execute(lane: int, op: dict[str, Any], timeout: float) -> tuple[bool, Any, str]:
        return outcomes[op["op"]]

    runner = _checker()
    runner.execute = execute  # type: ignore[method-assign]
    runner.t_start = 0.0
    outcomes["node_write"] = (False, "EPERM", "refused")
    await runner.run_group([_access("node_write")])
    assert runner.report.wrong_errors == 1 and runner.pages[(1, 1, 0)] == {b"A" * PS}
    outcomes["munmap"] = (True, {}, "")
    await runner.run_group([_access("node_write", page=1), {"op": "munmap", "mm": 1, "rid": 1, "page": 1,
                                                             "npages": 1}])
    assert runner.report.wrong_errors == 1 and runner.report.node_errors == 1

    async def no_epochs() -> None:
        pass

    runner.refresh_epochs = no_epochs  # type: ignore[method-assign]
    attach = {"op": "xpmem_attach", "att": 3, "node": "xpmem0", "mm": 1, "rid": 1, "page": 0, "npages": 1,
              "write": False}
    outcomes["xpmem_attach"] = (False, "EACCES", "apid 9 is read-only")
    await runner.run_group([attach])
    assert (runner.report.wrong_errors, runner.report.unexpected, runner.report.node_errors) == (1, 0, 2)
    outcomes["xpmem_attach"] = (True, {"vaddr": 0x6000_0000_0000}, "")
    await runner.run_group([attach])
    assert runner.report.unexpected == 1 and 3 not in runner.atts


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
    runner._detaching = {7}  # a detach of it in the same group may come first
    runner._access_failed(read(), (False, "EFAULT", "no attachment"), set())
    assert runner.report.wrong_errors == 1 and runner.report.node_errors == 1
    runner._detaching = set()
    runner.prot[(1, 1, 2)] = "r"  # a read-write permit pins writable: EPERM to read it is right
    runner._access_failed(read(2), (False, "EPERM", ""), set())
    assert runner.report.wrong_errors == 1
    runner.epochs["xpmem0"] = (4, True)  # fenced and registered again
    runner._access_failed(read(), (False, "EFAULT", "no attachment"), set())
    assert runner.report.wrong_errors == 1 and runner.report.node_errors == 3
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


# --------------------------------------------------------------------------
# the injections the runner makes itself: resets, host pauses, host crashes


@contextlib.asynccontextmanager
async def _running(cluster: Cluster, nursery: Any, tmp_path: Path) -> AsyncIterator[Soak]:
    """A runner of no schedule on ``cluster`` (started here, stopped after),
    its admin clients open: drive it with ``run_group``."""
    from mmn.client import AdminClient
    from mmn.soak import STATUS_LANE

    await cluster.start(nursery)
    runner = Soak(cluster.admin, [], cluster.nodes, Report(seed=0), dict(SOAK_HOST), cluster=cluster,
                  security=cluster.security())
    try:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(STATUS_LANE + 1):
                runner.clients.append(await stack.enter_async_context(
                    AdminClient(cluster.admin, security=runner.security)))
            runner.t_start = 0.0
            runner.trace = stack.enter_context(open(tmp_path / "soak.trace", "w"))  # noqa: ASYNC230
            yield runner
    finally:
        await cluster.stop()


def _setup(mm: int = 1) -> list[list[dict[str, Any]]]:
    """mm ``mm`` with a region of two pages of "A", and xpmem0 attached to it."""
    return [[{"op": "spawn", "mm": mm}],
            [{"op": "mmap", "mm": mm, "rid": mm, "pages": 2, "fill": 0x41, "mergeable": False}],
            [{"op": "xpmem_attach", "att": mm, "node": "xpmem0", "mm": mm, "rid": mm, "page": 0, "npages": 2,
              "write": True}]]


def _xpmem(kind: str, mm: int = 1, **more: Any) -> dict[str, Any]:
    return {"op": kind, "att": mm, "node": "xpmem0", "mm": mm, "rid": mm, "page": 1, "index": 1, "offset": 8,
            "length": 4, **more}


def _pause(seconds: float) -> dict[str, Any]:
    return {"op": "inject", "node": None, "kind": "host-pause", "for_s": seconds}


@pytest.mark.integration
async def test_a_host_paused_past_its_liveness_window_keeps_every_session_and_attachment(tmp_path: Path,
                                                                                       nursery: Any) -> None:
    """The soak's host pause: SIGSTOP past the host's liveness window (0.8 s),
    for 0.95 s (under the one-second stall floor that fenced everyone, see
    dc1267a) and for 1.6 s, with an xpmem read and a kvm read racing the
    pause.  Nodes patient enough (the soak's NODE_LIVENESS) keep their
    sessions: no ``paused_fences``, and the xpmem attachment made before
    the pauses reads after them without being attached again."""
    nodes = [("kvm0", "kvm"), ("xpmem0", "xpmem")]
    cluster = Cluster(nodes, logs=tmp_path, node_liveness=NODE_LIVENESS)
    with trio.fail_after(90):
        async with _running(cluster, nursery, tmp_path) as runner:
            for group in _setup():
                await runner.run_group(group)
            read = {"op": "node_read", "node": "kvm0", "mm": 1, "rid": 1, "page": 0, "offset": 0, "length": 4}
            await runner.run_group([read])
            epochs = {name: e for name, (e, _) in runner.epochs.items()}
            for seconds in (0.95, 1.6):
                await runner.run_group([_pause(seconds), _xpmem("xpmem_read"), read])
            await runner.run_group([_xpmem("xpmem_read")])
            ok, st, _ = await runner.call(0, "status", {}, 5.0)
    report = runner.report
    assert report.ok(), report.violations
    assert report.host_pauses == 2 and report.paused_fences == 0
    assert {n["name"]: n["epoch"] for n in st["nodes"]} == epochs and st["counters"]["host_stalls"] >= 2
    assert report.reattached == 0 and (report.xpmem_reads_ok, report.xpmem_reads) == (3, 3)


@pytest.mark.integration
async def test_a_node_that_drops_its_session_over_a_host_pause_is_a_violation(tmp_path: Path,
                                                                               nursery: Any) -> None:
    """The check can fail: nodes as impatient as the host (liveness 8, a
    0.8 s window) drop their sessions on their own during a 1.5 s pause, and
    register anew -- their xpmem attachments gone -- so the pause reports
    ``paused_fences`` for each."""
    nodes = [("kvm0", "kvm"), ("xpmem0", "xpmem")]
    cluster = Cluster(nodes, logs=tmp_path)
    with trio.fail_after(60):
        async with _running(cluster, nursery, tmp_path) as runner:
            await runner.run_group([_pause(1.5)])
    assert runner.report.paused_fences == 2 and not runner.report.ok()
    assert all(v.startswith("paused_fences: ") for v in runner.report.violations), runner.report.violations


@pytest.mark.integration
async def test_a_connection_reset_under_a_node_and_it_is_live_again_within_its_window(tmp_path: Path,
                                                                                       nursery: Any) -> None:
    """The soak's reset: ``ss -K`` destroys kvm0's TCP connection to the
    host (really: the node's process holds another one afterwards).  kvm0 is
    live again within its liveness window, and reads the page the host
    wrote meanwhile.  xpmem0, reset and SIGSTOPped at once, is not: that is
    ``unrecovered``."""
    from mmn.soak import _node_connections

    nodes = [("kvm0", "kvm"), ("xpmem0", "xpmem")]
    cluster = Cluster(nodes, logs=tmp_path, node_liveness=NODE_LIVENESS, restart=False)
    reset = {"op": "inject", "node": "kvm0", "kind": "reset", "for_s": 1.0}
    with trio.fail_after(90):
        async with _running(cluster, nursery, tmp_path) as runner:
            for group in _setup()[:2]:
                await runner.run_group(group)
            await runner.run_group([{"op": "node_fault", "node": "kvm0", "mm": 1, "rid": 1, "page": 0, "pages": 2,
                                     "offset": 0, "length": 1, "write": False}])
            port = cluster.ports[0]
            before = await _node_connections(cluster.procs["kvm0"].pid, port)
            await runner.run_group([reset])
            assert runner.report.resets == 1 and runner.report.ok(), runner.report.violations
            after = await _node_connections(cluster.procs["kvm0"].pid, port)
            assert len(before) == 1 and after and not set(after) & set(before)
            await runner.run_group([{"op": "host_write", "mm": 1, "rid": 1, "page": 0, "offset": 0, "length": 4,
                                     "data": b"new!"}])
            await runner.run_group([{"op": "node_read", "node": "kvm0", "mm": 1, "rid": 1, "page": 0, "offset": 0,
                                     "length": 4}])
            assert runner.report.ok(), runner.report.violations
            pid = cluster.procs["xpmem0"].pid
            reset_connection = cluster.reset_connection

            async def reset_and_stop(name: str) -> int | None:
                destroyed = await reset_connection(name)
                os.killpg(pid, signal.SIGSTOP)  # no reconnecting, no registering
                return destroyed

            cluster.reset_connection = reset_and_stop  # type: ignore[method-assign]
            try:
                await runner.run_group([{**reset, "node": "xpmem0"}])
            finally:
                os.killpg(pid, signal.SIGCONT)
    assert runner.report.resets == 2 and runner.report.unrecovered == 1, runner.report.violations
    assert runner.report.violations[0].startswith("unrecovered: xpmem0 not live")


@pytest.mark.integration
async def test_after_a_host_crash_every_node_registers_with_the_new_host_holding_nothing(tmp_path: Path,
                                                                                       nursery: Any) -> None:
    """``--host-crash``: kvm0 maps pages, xpmem0 attaches; the host is
    killed (-9) and a new one started on the same ports and keys (CURVE).
    Every node registers with the new incarnation holding nothing; the
    shadow forgets every mm, and the schedule goes on on new ones.  Then
    gru0 is stopped (SIGSTOP) across the next host crash: it does not
    register with the new host in time -- ``not_restarted``."""
    nodes = [("kvm0", "kvm"), ("gru0", "gru"), ("xpmem0", "xpmem")]
    cluster = Cluster(nodes, logs=tmp_path, node_liveness=NODE_LIVENESS, curve=True, restart=False)
    crash = [{"op": "host-crash"}]
    with trio.fail_after(120):
        async with _running(cluster, nursery, tmp_path) as runner:
            for group in _setup():
                await runner.run_group(group)
            await runner.run_group([{"op": "node_fault", "node": "kvm0", "mm": 1, "rid": 1, "page": 0,
                                     "pages": 2, "offset": 0, "length": 1, "write": True}, _xpmem("xpmem_read")])
            ok, st, _ = await runner.call(0, "status", {}, 5.0)
            old = st["host"]["incarnation"]
            assert {n["name"]: n["mapped_pages"] for n in st["nodes"]}["kvm0"] == 2
            await runner.run_group(crash)
            assert runner.report.host_crashes == 1 and runner.report.ok(), runner.report.violations
            assert runner.pages == {} and runner.mm == {} and runner.atts == {}
            ok, st, _ = await runner.call(0, "status", {}, 5.0)
            assert st["host"]["incarnation"] != old and st["mms"] == []
            assert {n["name"]: (n["state"], n["mapped_pages"]) for n in st["nodes"]} == {
                name: ("live", 0) for name, _ in nodes}
            for group in _setup(2):
                await runner.run_group(group)
            await runner.run_group([_xpmem("xpmem_write", 2, data=b"new!")])
            await runner.run_group([_xpmem("host_read", 2)])
            assert runner.report.ok(), runner.report.violations
            assert runner.pages[(2, 2, 1)] == {b"A" * 8 + b"new!" + b"A" * (PS - 12)}

            runner.restart_s = 6.0
            os.killpg(cluster.procs["gru0"].pid, signal.SIGSTOP)
            try:
                await runner.run_group(crash)
            finally:
                os.killpg(cluster.procs["gru0"].pid, signal.SIGCONT)
    assert runner.report.host_crashes == 2 and runner.report.not_restarted == 1, runner.report.violations
    assert runner.report.violations[0].startswith("not_restarted: gru0 not registered")


@pytest.mark.integration
def test_a_node_that_says_its_writes_failed_when_they_landed_fails_the_soak(tmp_path: Path) -> None:
    """kvm nodes that do every write and then answer EPERM: the soak counts
    the denials on pages mapped for them as ``wrong_errors``, and -- since a
    denied single-page write did not land, as far as the shadow accepts --
    the bytes a host read finds there as ``wrong_reads``."""
    site = ROOT / "tests" / "broken_site"
    env = {**os.environ, "MMN_TEST_BROKEN": "says-writes-failed",
           "PYTHONPATH": os.pathsep.join((str(site), str(ROOT)))}
    proc = subprocess.run(
        [sys.executable, "-m", "mmn", "soak", "--seed", "7", "--ops", "500", "--nodes", "2", "--faults", "0",
         "--json", "--logs", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["wrong_errors"] > 0 and report["wrong_reads"] > 0, report
    assert report["stale_accesses"] == report["unexpected"] == 0, report


def test_a_page_lost_with_its_device_must_fail_eio_and_only_such_a_page_may() -> None:
    """Device page 7 held page 0 on hmm0's memory in session 3.  Session 3
    ended before the group (a fence, a crash: the host poisoned it): an
    access that serves bytes there -- "A"s, what the page held before -- is
    ``wrong_poison``, an EIO is what must come.  An EIO on page 1, in system
    memory, is ``wrong_poison``.  Session 3 still current right after the
    group: the page was alive through it, an EIO is ``wrong_poison``; ended
    during it (current before, not after): either outcome."""
    from mmn.soak import _Dev

    runner = _checker()
    runner.kind_of["hmm0"] = "hmm"
    runner.dev[7] = _Dev("hmm0", 3)
    runner.loc[(1, 1, 0)] = {7}
    read = _access("host_read")
    runner._before = runner._after = {"hmm0": (5, True)}  # lost before the group
    runner.check_read(read, (True, {"data": b"AAAA"}, ""), {}, set())
    assert runner.report.wrong_poison == 1
    runner.check_read(read, (False, "EIO", ""), {}, set())
    runner._access_failed(_access("node_read"), (False, "EIO", ""), set())
    runner._access_failed(_access("node_fault", pages=2, write=False), (False, "EIO", ""), set())
    assert runner.report.lost_refused == 3 and runner.report.wrong_poison == 1
    runner.check_read(_access("host_read", page=1), (False, "EIO", ""), {}, set())
    runner._access_failed(_access("node_read", page=1), (False, "EIO", ""), set())
    assert runner.report.wrong_poison == 3
    # a write across pages 0 and 1 of a kvm node that failed EIO: it failed
    # at page 0 (lost), so page 1 stays as it was
    runner.apply(_access("node_write", page=0, length=PS + 4), (False, "EIO", ""))
    assert runner.pages[(1, 1, 1)] == {b"A" * PS}
    runner._before = runner._after = {"hmm0": (3, True)}  # alive through the group
    runner.check_read(read, (False, "EIO", ""), {}, set())
    assert runner.report.wrong_poison == 4
    runner.check_read(read, (True, {"data": b"AAAA"}, ""), {}, set())
    runner._before, runner._after = {"hmm0": (3, True)}, {"hmm0": (5, True)}  # lost during it
    runner.check_read(read, (True, {"data": b"AAAA"}, ""), {}, set())
    runner.check_read(read, (False, "EIO", ""), {}, set())
    assert runner.report.wrong_poison == 4 and runner.report.lost_refused == 4
    assert runner.report.wrong_reads == runner.report.unexpected == 0


@pytest.mark.integration
async def test_device_pages_of_a_killed_hmm_node_fail_eio_to_everyone_and_the_host_counts_them(
        tmp_path: Path, nursery: Any) -> None:
    """hmm0 migrates two pages of three to its memory (a snapshot tells the
    shadow which, by the host's handles) and writes one of them there; its
    process is killed (SIGKILL) and its supervisor starts it again.  The
    host cannot get those pages back: the CPU's read, kvm0's fault and
    hmm0's own read in its new session fail EIO, as the shadow expects;
    the third page reads back.  At the end the read-back finds both lost
    again, and the host's status holds exactly those two poisoned."""
    nodes = [("kvm0", "kvm"), ("hmm0", "hmm")]
    cluster = Cluster(nodes, logs=tmp_path, node_liveness=NODE_LIVENESS)
    async with _running(cluster, nursery, tmp_path) as runner:
        report = runner.report
        with trio.fail_after(90):
            await runner.run_group([{"op": "spawn", "mm": 1}])
            await runner.run_group([{"op": "mmap", "mm": 1, "rid": 1, "pages": 3, "fill": 0x41, "mergeable": False}])
            await runner.run_group([{"op": "hmm_migrate", "node": "hmm0", "mm": 1, "rid": 1, "page": 0, "npages": 2,
                                     "to": "dev"}])
            assert report.hmm_migrated == 2 and len({d for k, w in runner.loc.items() for d in w}) == 2
            await runner.run_group([_access("node_write", node="hmm0", data=b"dev!")])
            await runner.run_group([_access("host_read", page=2)])
            epoch = runner.epochs["hmm0"][0]
            cluster.kill("hmm0", signal.SIGKILL)
            while True:
                ok, st, _ = await runner.call(0, "status", {}, 5.0)
                node = next((n for n in st["nodes"] if n["name"] == "hmm0"), {}) if ok else {}
                if node.get("state") == "live" and node.get("epoch", 0) > epoch:
                    break
                await trio.sleep(0.1)
            await runner.run_group([_access("host_read")])
            await runner.run_group([_access("node_fault", page=1, pages=1, write=False)])
            await runner.run_group([_access("node_read", node="hmm0", page=1)])
            await runner.run_group([_access("host_read", page=2)])
            assert report.lost_refused == 3, report.violations
            await runner.finish()
        device = runner.final_status["device_private"]
    assert report.ok(), report.violations
    assert report.lost_refused == 5 and report.device_lost == 2
    assert device["pages"] == device["poisoned_pages"] == 2 and device["by_owner"] == {"hmm0": 2}


@pytest.mark.integration
@pytest.mark.parametrize("broken", [None, "keeps-device-pages-over-a-fence"])
async def test_an_hmm_node_fenced_with_device_pages_finds_them_lost_in_its_next_session(
        tmp_path: Path, nursery: Any, broken: str | None) -> None:
    """hmm0 migrates a page to its memory, then hangs past its liveness
    window: the host fences it and poisons the page; healed, it registers
    anew.  Its own read of the page in the new session fails EIO, as the
    shadow expects.  A build whose hmm nodes keep their device memory over
    a fence (``keeps-device-pages-over-a-fence``) serves its old copy
    instead -- no DMA, the host's oracle sees nothing -- and the shadow
    calls it ``wrong_poison``."""
    env = {} if broken is None else {
        "MMN_TEST_BROKEN": broken,
        "PYTHONPATH": os.pathsep.join((str(ROOT / "tests" / "broken_site"), str(ROOT)))}
    nodes = [("kvm0", "kvm"), ("hmm0", "hmm")]
    cluster = Cluster(nodes, logs=tmp_path, node_liveness=NODE_LIVENESS, node_env=env)
    async with _running(cluster, nursery, tmp_path) as runner:
        report = runner.report
        with trio.fail_after(60):
            await runner.run_group([{"op": "spawn", "mm": 1}])
            await runner.run_group([{"op": "mmap", "mm": 1, "rid": 1, "pages": 2, "fill": 0x41, "mergeable": False}])
            await runner.run_group([{"op": "hmm_migrate", "node": "hmm0", "mm": 1, "rid": 1, "page": 0, "npages": 1,
                                     "to": "dev"}])
            assert report.hmm_migrated == 1
            epoch = runner.epochs["hmm0"][0]
            await runner.run_group([{"op": "inject", "node": "hmm0", "kind": "hang", "for_s": 1.5}])
            await trio.sleep(1.6)  # (no status meanwhile: a hung node answers status, and that is traffic)
            while True:
                ok, st, _ = await runner.call(0, "status", {}, 5.0)
                node = next((n for n in st["nodes"] if n["name"] == "hmm0"), {}) if ok else {}
                if node.get("state") == "live" and node.get("epoch", 0) > epoch and not node.get("injected"):
                    break
                await trio.sleep(0.1)
            await runner.run_group([_access("node_read", node="hmm0")])
    if broken is None:
        assert report.ok() and report.lost_refused == 1, report.violations
    else:
        assert report.wrong_poison == 1 and report.stale_accesses == 0, report.violations
        assert report.violations[0].startswith("wrong_poison: op=node_read node=hmm0"), report.violations
