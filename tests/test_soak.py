"""``mmn soak``: the seeded schedule, a CI-sized soak on real processes, and
proof that the soak fails a deliberately broken build.

The longer run (README): ``mmn soak --seed 1 --ops 5000 --nodes 6 --faults 0.05``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mmn.soak import INJECTIONS, digest, node_names, plan, soak

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
    within its deadline."""
    report = await soak(11, 3000, 5, 0.03, logs=tmp_path)
    summary = {k: v for k, v in report.__dict__.items() if k != "violations"}
    assert report.ok(), (summary, report.violations)
    assert report.ops >= 3000 and report.injected >= 50
    assert report.nodes_fenced >= 5 and report.nodes_recovered >= 5, summary
    assert report.stale_accesses == report.lost_writes == report.wrong_reads == report.late == 0
    assert report.slowest["ratio"] <= 1.0
    assert report.runtime_s < 150


@pytest.mark.integration
def test_a_node_that_acks_before_it_zaps_fails_the_soak(tmp_path: Path) -> None:
    """The same soak against a build whose kvm nodes ack a start and zap only
    at its end (node/broken.py, selected by MMN_TEST_BROKEN): accesses that
    cross a page being invalidated reach the old page after the host
    changed it; the oracle refuses them, and ``mmn soak`` exits non-zero."""
    env = {**os.environ, "MMN_TEST_BROKEN": "acks-before-zap", "PYTHONPATH": str(ROOT)}
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
