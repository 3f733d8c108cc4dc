"""The pure-Python cost of the host core and of a node per operation, no I/O.

:class:`mmnotify.local.LocalCluster` runs the very ``HostCore`` ``mmn host``
runs and the very node kinds ``mmn node`` runs, in one process with the
sockets replaced by queues.  This script times, with ``perf_counter_ns``,
every call the pump makes into the host core (``receive_node``,
``submit_admin``, ``submit``, ``run_one``, ``drain``, ``tick``) and every
call into the node (``receive``, the relayed ``start_command``, a fault
started on the node), and divides by the operations run:

* **fault** -- the admin ``fault`` command relayed to a kvm node (admin
  request -> Command -> the node's Gup -> GupReply -> CommandResult ->
  AdminReply), on a page the node does not map;
* **invalidate** -- ``mprotect`` of one page the node maps (start -> ack ->
  end), the node refaulting it (untimed) between two.

The pump's own work (queues, the frame-safety oracle is off) is not counted.
Beside the times: the messages the pump moved and the notifier starts the
host issued, per operation (one ``mprotect`` of one page is one start, as
mm/mprotect.c's ``change_pmd_range`` issues one
``mmu_notifier_invalidate_range_start`` per populated range it walks).  Under
``--profile``, cProfile counts every *resumption* of a generator as a call:
``invalidate_range_start`` shows twice per start (sent, then resumed with
the acks) and ``mprotect`` three times (start, acks, end).
Several repeats; min and median per figure, in microseconds per operation.
The default clock is the thread's CPU time (``thread_time_ns``): on a shared
box the wall clock also counts the time other processes took the CPU.  The
two clock reads each timed call adds are measured and taken off::

    python benchmarks/core_cost.py [--n 2000] [--repeats 5] [--clock cpu|wall] [--profile fault|invalidate]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import mmnotify.local as local
from mmnotify.local import LocalCluster


class Meter:
    """Nanoseconds spent inside the wrapped calls, per side."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        self.ns = {"host": 0, "node": 0}
        self.calls = {"host": 0, "node": 0}
        self.on = False

    def wrap(self, side: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock = self.clock
        ns = self.ns
        calls = self.calls

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            calls[side] += 1
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                ns[side] += clock() - t0

        return timed

    def reset(self) -> None:
        self.ns["host"] = self.ns["node"] = 0
        self.calls["host"] = self.calls["node"] = 0

    def per_op(self, side: str, n: int, overhead_ns: float) -> float:
        """us per operation on ``side``, the clock's own cost per timed call taken off."""
        return (self.ns[side] - self.calls[side] * overhead_ns) / n / 1000


def clock_overhead(clock: Callable[[], int], rounds: int = 20000) -> float:
    """ns one timed call's two clock reads add inside its interval (min of 5)."""
    best = float("inf")
    for _ in range(5):
        total = 0
        for _ in range(rounds):
            t0 = clock()
            total += clock() - t0
        best = min(best, total / rounds)
    return best


#: the relayed command's entry, unwrapped (each repeat wraps it anew)
_START_COMMAND = local.start_command


def cluster(meter: Meter, pages: int) -> tuple[LocalCluster, int, int]:
    c = LocalCluster(frames=4 * pages + 64, nodes={"kvm0": "kvm"}, check_frees=False)
    core = c.core
    for name in ("receive_node", "submit_admin", "submit", "run_one", "drain", "tick"):
        setattr(core, name, meter.wrap("host", getattr(core, name)))
    node = c.node("kvm0")
    node.receive = meter.wrap("node", node.receive)  # type: ignore[method-assign]
    node.fault = meter.wrap("node", node.fault)  # type: ignore[method-assign]
    local.start_command = meter.wrap("node", _START_COMMAND)  # not the last repeat's wrapper
    mm = c.spawn()
    addr = c.mmap(mm, pages, "rw")
    c.write(mm, addr, b"x" * (pages * c.page_size))  # populated: the fault is a minor one
    c.admin("grant", node="kvm0", mm=mm)
    return c, mm, addr


def run_faults(c: LocalCluster, meter: Meter, mm: int, addr: int, n: int) -> None:
    """n relayed admin faults, each on a page kvm0 does not map yet."""
    ps = c.page_size
    meter.on = True
    for i in range(n):
        c.admin("fault", node="kvm0", mm=mm, addr=addr + i * ps, pages=1, write=False)
    meter.on = False


def run_invalidations(c: LocalCluster, meter: Meter, mm: int, addr: int, n: int) -> None:
    """n mprotects of one page kvm0 maps; the refault between is not timed."""
    ps = c.page_size
    prots = ("r", "rw")
    for i in range(n):
        c.fault("kvm0", mm, addr, 1, False)
        meter.on = True
        c.mprotect(mm, addr, ps, prots[i & 1])
        meter.on = False


def measure(kind: str, n: int, meter: Meter, overhead_ns: float = 0.0) -> tuple[float, float, float, float]:
    """us per op on the host and on the node, messages and notifier starts per op."""
    c, mm, addr = cluster(meter, n if kind == "fault" else 1)
    meter.reset()
    before = dict(c.pump_counters)
    starts = c.core.notifier.counters["invalidate_range_start"]
    (run_faults if kind == "fault" else run_invalidations)(c, meter, mm, addr, n)
    msgs = sum(c.pump_counters.values()) - sum(before.values())
    starts = c.core.notifier.counters["invalidate_range_start"] - starts
    return meter.per_op("host", n, overhead_ns), meter.per_op("node", n, overhead_ns), msgs / n, starts / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="operations per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", choices=("fault", "invalidate"), help="cProfile one repeat instead")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this thread's CPU time (default; steadier on a shared box), wall: perf_counter")
    args = ap.parse_args()
    clock = time.thread_time_ns if args.clock == "cpu" else time.perf_counter_ns
    if args.profile:
        meter = Meter(clock)
        prof = cProfile.Profile()
        prof.enable()
        measure(args.profile, args.n, meter)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    overhead = clock_overhead(clock)
    print(f"clock {args.clock}: {overhead:.0f} ns per timed call taken off")
    for kind in ("fault", "invalidate"):
        host: list[float] = []
        node: list[float] = []
        msgs = starts = 0.0
        for _ in range(args.repeats):
            meter = Meter(clock)
            h, nd, msgs, starts = measure(kind, args.n, meter, overhead)
            host.append(h)
            node.append(nd)
        print(f"{kind:10s} host {min(host):6.1f} us (median {statistics.median(host):6.1f})"
              f"   node {min(node):6.1f} us (median {statistics.median(node):6.1f})"
              f"   {msgs:.1f} messages/op, {starts:.1f} notifier starts/op   n={args.n} x {args.repeats}")


if __name__ == "__main__":
    main()
