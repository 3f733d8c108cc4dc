"""``mmn bench`` marks each figure held or short against its goal, and
``--check`` exits non-zero when one is short.  Nothing is timed here: the
marking is tested on given figures, and ``--check`` on a given document."""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks import suite
from mmn.cli import main


def doc_with(inv_ratio: float = 1.2, p99_ratio: float = 1.8, ksm_ratio: float = 0.8, messages: int = 4,
             fault_ratio: float = 0.5, munmap_us: float = 29_000.0, heartbeat_ratio: float = 1.2,
             bytes_per_page: float = 22.0) -> dict[str, Any]:
    """A whole bench document with the given figures (the shape suite.run returns)."""
    inv = {"k": 1, "p50_us": 100.0, "p99_us": 200.0, "floor_p50_us": 100 / inv_ratio, "floor_p99_us": 200 / p99_ratio,
           "p50_ratio": inv_ratio, "p99_ratio": p99_ratio}
    doc: dict[str, Any] = {
        "machine": {"cpus": 2, "python": "3.11"},
        "seconds": 1.0,
        "invalidate": {"inline": [inv], "xpmem": [inv], "hmm": [inv]},
        "fault": [{"kind": "kvm", "mode": "single", "pages_per_fault": 1, "inflight": 1, "faults_per_s": 500.0,
                   "floor_rtt_per_s": 1000.0, "ratio": fault_ratio}],
        "munmap": [{"populated": 1, "nodes": 2, "messages": messages, "messages_expected": 4, "time_us": 50.0,
                    "floor_us": 25.0, "ratio": 2.0},
                   {"populated": 100_000, "nodes": 2, "messages": 4, "messages_expected": 4, "time_us": munmap_us,
                    "floor_us": 25.0, "ratio": munmap_us / 25}],
        "ksm": {"pages": 64, "passes": 2, "scanned_per_s": 8.0 * ksm_ratio, "hash_per_s": 8.0, "ratio": ksm_ratio},
        "memory": {"pages": 16, "bytes_per_page": bytes_per_page, "kernel_bytes_per_page": 72,
                   "ratio": bytes_per_page / 72},
        "scale": {"nodes": 64, "invalidate": inv | {"k": 64},
                  "heartbeat": {"host_cpu_pct": 1.2, "floor_cpu_pct": 1.2 / heartbeat_ratio, "ratio": heartbeat_ratio}},
    }
    doc["figures"] = list(suite.figures(doc))
    return doc


def marks(doc: dict[str, Any]) -> dict[str, str]:
    return {r["figure"]: r.get("mark", "") for r in doc["figures"]}


def test_every_goal_held() -> None:
    m = marks(doc_with())
    assert m["invalidate inline K=1 p50"] == "held" and m["ksm scan (64 pages x 2)"] == "held"
    assert m["munmap 1 GiB, 1 populated, 2 nodes (4 msgs)"] == "held"
    assert m["fault kvm single (1 p, 1 in flight)"] == "held"
    assert m["munmap 1 GiB, 100000 populated, 2 nodes (4 msgs)"] == "held"
    assert m["memory (16 pages)"] == m["scale: idle host CPU, 64 nodes heartbeating"] == "held"
    assert suite.short_of_goals(doc_with()) == []


@pytest.mark.parametrize(
    ("kwargs", "short"),
    [
        ({"inv_ratio": 1.51}, "invalidate inline K=1 p50"),  # at most 1.5 x the floor
        ({"p99_ratio": 2.01}, "invalidate inline K=1 p99"),  # at most 2 x
        ({"inv_ratio": 2.01}, "scale: invalidate K=64 p50"),  # at most 2 x at K=64
        ({"p99_ratio": 2.51}, "scale: invalidate K=64 p99"),  # at most 2.5 x
        ({"ksm_ratio": 0.79}, "ksm scan (64 pages x 2)"),  # at least 0.8 of plain hashing
        ({"messages": 6}, "munmap 1 GiB, 1 populated, 2 nodes (6 msgs)"),  # one start and one end per node
        ({"munmap_us": 30_001}, "munmap 1 GiB, 100000 populated, 2 nodes (4 msgs)"),  # at most 30 ms
        ({"fault_ratio": 0.49}, "fault kvm single (1 p, 1 in flight)"),  # half the raw round-trip rate
        ({"heartbeat_ratio": 1.51}, "scale: idle host CPU, 64 nodes heartbeating"),  # at most 1.5 x raw
        ({"bytes_per_page": 24.5}, "memory (16 pages)"),  # at most 24 B a page
    ],
)
def test_a_missed_goal_is_short(kwargs: dict[str, Any], short: str) -> None:
    doc = doc_with(**kwargs)
    assert marks(doc)[short] == "short"
    assert short in [r["figure"] for r in suite.short_of_goals(doc)]
    assert "short" in suite.table(doc) and "held" not in suite.table(doc).split(short)[1].splitlines()[0]


def test_the_limit_itself_holds() -> None:
    assert marks(doc_with(inv_ratio=1.5, ksm_ratio=0.8))["invalidate xpmem K=1 p50"] == "held"
    assert marks(doc_with(p99_ratio=2.0))["invalidate hmm K=1 p99"] == "held"
    assert marks(doc_with(munmap_us=30_000))["munmap 1 GiB, 100000 populated, 2 nodes (4 msgs)"] == "held"


def test_the_hmm_figure_has_the_invalidation_goal() -> None:
    # like invalidate xpmem K=1: p50 and p99 against the same raw floor, at most 1.5 x and 2 x
    rows = {r["figure"]: r for r in doc_with(inv_ratio=1.51)["figures"]}
    assert [f for f in rows if f.startswith("invalidate hmm")] == ["invalidate hmm K=1 p50", "invalidate hmm K=1 p99"]
    assert rows["invalidate hmm K=1 p50"]["goal"] == "<= 1.5" and rows["invalidate hmm K=1 p50"]["mark"] == "short"


def test_an_unmeasured_figure_is_short() -> None:
    assert suite.mark({"ratio": float("nan"), "check": {"of": "ratio", "op": "<=", "limit": 1.5}}) == "short"
    assert suite.mark({"ratio": 1.0}) == ""


@pytest.mark.parametrize(("kwargs", "code"), [({}, 0), ({"inv_ratio": 3.0}, 1), ({"ksm_ratio": 0.1}, 1),
                                              ({"munmap_us": 40_000.0}, 1)])
def test_check_exit_status_follows_the_marks(
    kwargs: dict[str, Any], code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = doc_with(**kwargs)
    monkeypatch.setattr(suite, "run", lambda plan, progress=True: doc)
    assert main(["bench", "--quick", "--no-progress", "--check", "--json"]) == code
    out, err = capsys.readouterr()
    assert [r.get("mark", "") for r in json.loads(out)["figures"]] == [r.get("mark", "") for r in doc["figures"]]
    assert ("short of the goal" in err) == bool(code)
    if code:  # the check that failed, with the figure's value
        assert any(f in err for f in ("(ratio 3.0, goal <= 1.5)", "(ratio 0.1, goal >= 0.8)",
                                      "(value 40000.0, goal messages == 4, value <= 30000)"))
    assert main(["bench", "--quick", "--no-progress"]) == 0  # without --check: a report, exit 0
