"""``mmn bench --quick --json`` runs and reports every figure with its ratio.

No timing is asserted (the machine may be loaded): only that each figure is
measured, has a floor from the same run, and a finite ratio, and that the
munmap sends one start and one end per node.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from benchmarks import suite

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def doc() -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "mmn", "bench", "--quick", "--json", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_every_figure_has_a_ratio(doc: dict) -> None:
    plan = suite.Plan.quick()
    assert [r["k"] for r in doc["invalidate"]["inline"]] == list(plan.ks)
    assert [r["k"] for r in doc["invalidate"]["xpmem"]] == list(plan.xpmem_ks)
    assert [r["k"] for r in doc["invalidate"]["hmm"]] == list(plan.hmm_ks) == [1]
    for rows in doc["invalidate"].values():
        for r in rows:
            for key in ("p50_us", "p99_us", "floor_p50_us", "floor_p99_us", "p50_ratio", "p99_ratio"):
                assert _finite(r[key]), (r, key)
    assert {(r["kind"], r["mode"]) for r in doc["fault"]} == {("kvm", "single"), ("kvm", "around"), ("gru", "single")}
    assert all(_finite(r["faults_per_s"]) and _finite(r["ratio"]) for r in doc["fault"])
    assert [r["populated"] for r in doc["munmap"]] == list(plan.munmap_pages)
    for r in doc["munmap"]:
        assert _finite(r["ratio"]) and r["messages"] == r["messages_expected"] == 2 * r["nodes"]
    assert _finite(doc["ksm"]["ratio"]) and doc["ksm"]["pages_sharing"] > 0
    assert _finite(doc["memory"]["ratio"]) and doc["memory"]["pages"] == plan.memory_pages
    scale = doc["scale"]
    assert scale["nodes"] >= plan.scale_nodes and scale["invalidate"]["k"] == plan.scale_nodes
    assert _finite(scale["invalidate"]["p50_ratio"]) and _finite(scale["heartbeat"]["ratio"])
    # the flat list the table prints: every figure, each with a floor and a ratio
    assert len(doc["figures"]) == 2 * (len(plan.ks) + len(plan.xpmem_ks) + len(plan.hmm_ks)) + 3 + len(plan.munmap_pages) + 2 + 3
    for row in doc["figures"]:
        assert _finite(row["floor"]) and _finite(row["ratio"]), row
    names = [r["figure"] for r in doc["figures"]]
    assert "invalidate hmm K=1 p50" in names and "invalidate hmm K=1 p99" in names
    assert doc["seconds"] < 120


def test_table_renders_every_figure(doc: dict) -> None:
    text = suite.table(doc)
    for row in doc["figures"]:
        assert row["figure"] in text


def test_plot_without_matplotlib_fails_clearly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    from mmn.cli import main

    assert main(["bench", "--quick", "--plot", "x.png"]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_the_machine_record_says_how_much_cpu_was_stolen_and_how_idle_cpus_wait(tmp_path, doc: dict) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 0 0 10 40 0 0\ncpu0 1 2 3\n")
    before = suite.cpu_times(str(stat))
    assert before == [100, 0, 50, 800, 0, 0, 10, 40, 0, 0]
    stat.write_text("cpu  160 0 70 900 0 0 10 60 0 0\n")
    assert suite.steal_pct(before, suite.cpu_times(str(stat))) == 10.0  # 20 of 200 ticks
    assert suite.steal_pct(None, before) is None and suite.cpu_times(str(tmp_path / "none")) is None
    stat.write_text("intr 1 2\n")
    assert suite.cpu_times(str(stat)) is None
    (tmp_path / "devices/system/cpu/cpuidle").mkdir(parents=True)
    (tmp_path / "devices/system/cpu/cpuidle/current_driver").write_text("haltpoll\n")
    (tmp_path / "module/haltpoll/parameters").mkdir(parents=True)
    (tmp_path / "module/haltpoll/parameters/guest_halt_poll_ns").write_text("0\n")
    idle = suite.cpuidle(str(tmp_path))
    assert idle == {"driver": "haltpoll", "guest_halt_poll_ns": 0}
    machine = dict(doc["machine"], steal_pct=2.5, cpuidle=idle, kept_awake=[0, 1])
    assert ("stolen by the hypervisor 2.5%; CPUs 0,1 kept awake (SCHED_IDLE spinners); "
            "cpuidle haltpoll (guest halt poll 0 ns)") in suite.table(dict(doc, machine=machine))
    assert "steal_pct" in doc["machine"] and isinstance(doc["machine"]["cpuidle"], dict)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_keep_awake_runs_one_idle_priority_spinner_per_cpu_and_none_outlives_the_bench(doc: dict) -> None:
    assert doc["machine"]["kept_awake"] == sorted(os.sched_getaffinity(0))
    with suite.keep_awake(True) as cpus:
        spinners = _children(os.getpid())
        assert cpus == sorted(os.sched_getaffinity(0)) and len(spinners) == len(cpus)
        time.sleep(0.3)  # each has set its policy and affinity
        assert all(os.sched_getscheduler(p) == os.SCHED_IDLE for p in spinners)
        assert sorted(c for p in spinners for c in os.sched_getaffinity(p)) == cpus
    assert not set(spinners) & set(_children(os.getpid()))
    with suite.keep_awake(False) as none:
        assert none == []
    # a bench killed in the middle: its spinners see their parent go and stop
    code = ("import os; from benchmarks import suite; cm = suite.keep_awake(True); cm.__enter__(); "
            "print(open(f'/proc/{os.getpid()}/task/{os.getpid()}/children').read(), flush=True); os._exit(0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    orphans = [int(x) for x in proc.stdout.split()]
    assert len(orphans) == len(cpus)
    deadline = time.monotonic() + 10
    while orphans and time.monotonic() < deadline:
        orphans = [p for p in orphans if _spinning(p)]
        time.sleep(0.05)
    assert not orphans


def _spinning(pid: int) -> bool:
    """``pid`` is alive (not a zombie) and a spinner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return state != "Z" and b"SCHED_IDLE" in cmdline


def test_a_spinner_that_cannot_take_idle_priority_stops_and_is_not_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite, "_SPINNER", "raise SystemExit(1)")
    with suite.keep_awake(True) as cpus:
        assert cpus == []
