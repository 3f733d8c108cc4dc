"""``mmn bench`` marks each figure held or short against its goal, and
``--check`` exits non-zero when one is short.  Nothing is timed here: the
marking is tested on given figures, and ``--check`` on a given document."""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks import suite
from mmn.cli import main


def doc_with(inv_ratio: float = 1.2, ksm_ratio: float = 0.8, messages: int = 4) -> dict[str, Any]:
    """A whole bench document with the given figures (the shape suite.run returns)."""
    inv = {"k": 1, "p50_us": 100.0, "p99_us": 200.0, "floor_p50_us": 100 / inv_ratio, "floor_p99_us": 200 / inv_ratio,
           "p50_ratio": inv_ratio, "p99_ratio": inv_ratio}
    doc: dict[str, Any] = {
        "machine": {"cpus": 2, "python": "3.11"},
        "seconds": 1.0,
        "invalidate": {"inline": [inv], "xpmem": [inv], "hmm": [inv]},
        "fault": [{"kind": "kvm", "mode": "single", "pages_per_fault": 1, "inflight": 1, "faults_per_s": 500.0,
                   "floor_rtt_per_s": 1000.0, "ratio": 0.5}],
        "munmap": [{"populated": 1, "nodes": 2, "messages": messages, "messages_expected": 4, "time_us": 50.0,
                    "floor_us": 25.0, "ratio": 2.0}],
        "ksm": {"pages": 64, "passes": 2, "scanned_per_s": 8.0 * ksm_ratio, "hash_per_s": 8.0, "ratio": ksm_ratio},
        "memory": {"pages": 16, "bytes_per_page": 22.0, "kernel_bytes_per_page": 72, "ratio": 22 / 72},
        "scale": {"nodes": 64, "invalidate": inv | {"k": 64}, "heartbeat": {"host_cpu_pct": 2.0, "floor_cpu_pct": 1.0,
                                                                             "ratio": 2.0}},
    }
    doc["figures"] = list(suite.figures(doc))
    return doc


def marks(doc: dict[str, Any]) -> dict[str, str]:
    return {r["figure"]: r.get("mark", "") for r in doc["figures"]}


def test_every_goal_held() -> None:
    m = marks(doc_with())
    assert m["invalidate inline K=1 p50"] == "held" and m["ksm scan (64 pages x 2)"] == "held"
    assert m["munmap 1 GiB, 1 populated, 2 nodes (4 msgs)"] == "held"
    assert m["fault kvm single (1 p, 1 in flight)"] == ""  # no goal: no mark
    assert suite.short_of_goals(doc_with()) == []


@pytest.mark.parametrize(
    ("kwargs", "short"),
    [
        ({"inv_ratio": 1.51}, "invalidate inline K=1 p99"),  # at most 1.5 x the floor
        ({"ksm_ratio": 0.49}, "ksm scan (64 pages x 2)"),  # at least half of plain hashing
        ({"messages": 6}, "munmap 1 GiB, 1 populated, 2 nodes (6 msgs)"),  # one start and one end per node
    ],
)
def test_a_missed_goal_is_short(kwargs: dict[str, Any], short: str) -> None:
    doc = doc_with(**kwargs)
    assert marks(doc)[short] == "short"
    assert short in [r["figure"] for r in suite.short_of_goals(doc)]
    assert "short" in suite.table(doc) and "held" not in suite.table(doc).split(short)[1].splitlines()[0]


def test_the_limit_itself_holds() -> None:
    assert marks(doc_with(inv_ratio=1.5, ksm_ratio=0.5))["invalidate xpmem K=1 p50"] == "held"
    assert marks(doc_with(inv_ratio=1.5))["invalidate hmm K=1 p99"] == "held"


def test_the_hmm_figure_has_the_invalidation_goal() -> None:
    # like invalidate xpmem K=1: p50 and p99 against the same raw floor, at most 1.5 x
    rows = {r["figure"]: r for r in doc_with(inv_ratio=1.51)["figures"]}
    assert [f for f in rows if f.startswith("invalidate hmm")] == ["invalidate hmm K=1 p50", "invalidate hmm K=1 p99"]
    assert rows["invalidate hmm K=1 p50"]["goal"] == "<= 1.5" and rows["invalidate hmm K=1 p50"]["mark"] == "short"


def test_an_unmeasured_figure_is_short() -> None:
    assert suite.mark({"ratio": float("nan"), "check": {"of": "ratio", "op": "<=", "limit": 1.5}}) == "short"
    assert suite.mark({"ratio": 1.0}) == ""


@pytest.mark.parametrize(("kwargs", "code"), [({}, 0), ({"inv_ratio": 3.0}, 1), ({"ksm_ratio": 0.1}, 1)])
def test_check_exit_status_follows_the_marks(
    kwargs: dict[str, Any], code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = doc_with(**kwargs)
    monkeypatch.setattr(suite, "run", lambda plan, progress=True: doc)
    assert main(["bench", "--quick", "--no-progress", "--check", "--json"]) == code
    out, err = capsys.readouterr()
    assert [r.get("mark", "") for r in json.loads(out)["figures"]] == [r.get("mark", "") for r in doc["figures"]]
    assert ("short of the goal" in err) == bool(code)
    assert main(["bench", "--quick", "--no-progress"]) == 0  # without --check: a report, exit 0
