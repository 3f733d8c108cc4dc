"""The benchmark suite behind ``mmn bench``: what the cluster costs, each
figure a ratio against a floor measured in the same run, on the same
machine, at the same time.

    mmn bench [--quick] [--json] [--plot FILE.png]
    python -m benchmarks.suite [...]          (the same)
    python benchmarks/bench.py [...]          (the same)

Figures (issue 6):

1. ``invalidate``: invalidation round trip (start -> every ack -> end) to K
   in-line nodes (kvm/gru, alternating), to K xpmem nodes and to one hmm
   node (reached through its interval notifier), p50 and p99,
   each divided by the **floor**: raw blocking pyzmq, one ROUTER in this
   process sending one small message (an encoded ``InvalidateRangeStart``) to
   K echo processes (DEALERs) and collecting the K replies.  Samples of the
   floor and of the host are taken in alternating batches, so a load change
   on the machine hits both.
2. ``fault``: secondary faults per second on one node (single page, and
   fault-around of 16 pages as Linux's ``fault_around_bytes``), W faults in
   flight, against the raw round-trip rate (1 / floor p50 at K=1).  A fault is
   a relayed admin command (host -> node ``Command``, node -> host ``Gup``,
   ``GupReply``, ``CommandResult``): two round trips of messages per fault.
3. ``munmap``: munmap of a 1 GiB mapping with 1, 1,000 and 100,000 pages
   populated by a node's write faults and mapped by two nodes (kvm and gru);
   time against the floor (raw fan-out to 2), per populated page, and the
   notifier's message count (one start and one end per node); the median of
   ``munmap_repeats`` runs (``munmap_big_repeats`` for 100,000 pages).
4. ``ksm``: pages scanned per second by KSM (two full passes over mergeable
   pages, 1 in 64 contents distinct) against plain ``page_digest`` (BLAKE2b)
   of the same pages in the same process.
5. ``memory``: host metadata bytes per mapped page (tracemalloc over the
   model's construction and population; page contents live in an anonymous
   mmap, which is data, not metadata) against the kernel's ~72 bytes.
6. ``scale``: a host with 64 nodes registered: invalidation round trip to all
   64 against the raw fan-out to 64 echo processes, and host CPU while idle
   with 64 nodes heartbeating against raw pyzmq exchanging the same number of
   heartbeat-sized messages with the 64 echo processes.

Stability.  Every figure is taken in *blocks*, each one batch of ours next
to one batch of its floor, back to back, the side that goes first
alternating (invalidation: ``plan.batch`` samples of each; faults: a round
of faults and a block of raw round trips; KSM: a fresh model's two passes
with hashing before, between and after; heartbeats: two periods of the idle
host and one of raw pyzmq), after a block of each to warm up.  Each ratio is
printed with a 90% bootstrap interval (:func:`ratio_interval`: the blocks
resampled with replacement, so a block's load moves both its sides).  With
two or more CPUs the bench process (host, floor ROUTER, KSM) is pinned to one
and the nodes and echoes to the others (``--no-pin`` to leave placement to
the scheduler; the JSON's ``machine.ran_on`` says where each last ran),
except for the scale figures: 64 nodes and 64 echoes on one core would
measure its run queue, so every process may run anywhere for those.  On
a loaded machine the *floor* moves too: compare ratios of one run, never
absolute times across runs.  While it runs, every CPU has a SCHED_IDLE
spinner (:func:`keep_awake`, ``--no-keep-awake`` to go without): on a VM
whose idle CPUs halt, a message to an idle CPU otherwise waits for the
hypervisor to wake it (raw round trips 1.4-1.6 ms instead of ~0.1 ms), and
a floor measured on a quiet machine said how the VM wakes CPUs.

Measured through public interfaces: the host's admin API (``Host.admin``,
the same commands and ``status`` counters an operator sees), ``Host.locked``
for the timed operations (a primary-MMU operation under the mm lock, as an
admin command runs it, without the admin path's own cost in the figure), and
the primary MMU's operations (``Model.mmap``/``write``/``gup``,
``model.ksm``) for the in-process figures; only the KSM figure's floor finds
its frames through the page table (see :func:`measure_ksm`).

The host is a :class:`broker.host.Host` in this process (the same object
``mmn host`` runs); the nodes are real node processes (``node.runtime``, what
``mmn node`` runs) forked from a launcher process that has already imported
everything, so that 64 of them start in a second instead of a minute on two
cores.  Echo processes come from the same launcher.  Everything is loopback.

The table and JSON need only the base install; ``--plot`` needs matplotlib and
the progress bar uses rich when present (``pip install 'mmnotify[bench]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from mmn.supervisor import Child, fork_child, spawn, stop_all

# The goals of issue 17, one per figure (``figures`` marks each held or short).
GOAL_INVALIDATE = 1.5  # p50: at most this many times the floor
GOAL_INVALIDATE_P99 = 2.0
GOAL_SCALE = 2.0  # K=64, p50
GOAL_SCALE_P99 = 2.5
GOAL_FAULT = 0.5  # at least this fraction of the raw round-trip rate
GOAL_MUNMAP_US = 30_000  # munmap of 1 GiB with 100,000 populated pages
GOAL_KSM = 0.8  # at least this fraction of plain hashing
GOAL_HEARTBEAT = 1.5  # idle host CPU against raw pyzmq
GOAL_METADATA = 24  # host bytes per mapped page
KERNEL_BYTES_PER_PAGE = 72  # struct page (64) + pte (8)
FAULT_AROUND = 16  # fault_around_bytes (64 KiB) / 4 KiB
PAGE = 4096
#: Heartbeats stay at the default 500 ms (the heartbeat figure); deadlines are
#: generous so that a loaded machine does not fence nodes in the middle of a run.
LIVENESS = 40
ACK_DEADLINE_MS = 20_000


@dataclass(frozen=True)
class Plan:
    """How much of everything to measure."""

    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    xpmem_ks: tuple[int, ...] = (1, 4)
    hmm_ks: tuple[int, ...] = (1,)
    scale_nodes: int = 64
    samples: int = 600  # per K, host and floor each
    batch: int = 10  # samples per alternating block (ours, then the floor's, or the other way)
    scale_samples: int = 300
    fault_count: int = 2000  # faults per fault figure
    fault_inflight: int = 4
    fault_rounds: int = 10  # fault rounds, each next to a block of raw round trips
    fault_floor_batch: int = 100  # raw round trips per block
    munmap_pages: tuple[int, ...] = (1, 1000, 100_000)
    munmap_repeats: int = 5  # for the small ones
    #: for 100,000 pages: the first in a process pays what a steady host does
    #: not (numpy's arrays of that size come fresh from the kernel, page
    #: faults and zeroing, until malloc's threshold has grown): the median
    munmap_big_repeats: int = 3
    ksm_pages: int = 65536
    ksm_repeats: int = 3
    memory_pages: int = 1 << 20
    heartbeat_seconds: float = 10.0
    #: Pin the bench process and its children to different CPUs (2+ allowed).
    pin: bool = True
    #: Keep every allowed CPU from going idle with a SCHED_IDLE spinner
    #: (:func:`keep_awake`).
    keep_awake: bool = True

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            samples=150,
            batch=10,
            scale_samples=60,
            fault_count=400,
            munmap_repeats=2,
            munmap_big_repeats=1,
            ksm_pages=8192,
            ksm_repeats=5,
            memory_pages=1 << 17,
            heartbeat_seconds=3.0,
        )


# ==========================================================================
# child processes: a launcher that forks echoes and nodes


def _echo_child(endpoint: str, ident: bytes) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, ident)
    sock.connect(endpoint)
    while True:
        msg = sock.recv()
        if msg == b"quit":
            break
        sock.send(msg)
    sock.close()
    ctx.term()


def _node_child(kind: str, name: str, endpoint: str) -> None:
    from node.runtime import NodeConfig, run_node

    logging.basicConfig(level=logging.ERROR)
    # generous liveness: 64 nodes on a loaded 2-core box must not be fenced mid-run
    trio.run(run_node, NodeConfig(kind=kind, name=name, host=endpoint, liveness=LIVENESS))


def launcher_main(cpus: list[int] | None = None) -> int:
    """``python -m benchmarks.suite --launcher``: fork children on request.

    Reads JSON lines on stdin: ``{"echo": [ENDPOINT, [IDENT, ...]]}`` or
    ``{"nodes": [ENDPOINT, [[KIND, NAME], ...]]}``; answers each with a JSON
    line of the children's pids.  At end of input (the bench closed the pipe,
    or died) kills every child it forked and exits.  The children
    (:func:`mmn.supervisor.fork_child`) die with it.
    """
    if cpus:  # before anything starts a thread: every fork inherits it
        os.sched_setaffinity(0, cpus)
    import zmq  # noqa: F401  -- imported once here (and trio), shared by every fork

    import node.runtime  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    children: list[int] = []
    for line in sys.stdin:
        spec = json.loads(line)
        jobs: list[Callable[[], None]] = []
        if "echo" in spec:
            endpoint, idents = spec["echo"]
            jobs = [lambda i=i, e=endpoint: _echo_child(e, i.encode()) for i in idents]
        elif "nodes" in spec:
            endpoint, nodes = spec["nodes"]
            jobs = [lambda k=k, n=n, e=endpoint: _node_child(k, n, e) for k, n in nodes]
        pids = [fork_child(job) for job in jobs]
        children.extend(pids)
        print(json.dumps(pids), flush=True)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return 0


class Launcher:
    """The launcher process (:func:`launcher_main`), a child of the
    supervisor: its own process group (its forks are in it too), stopped by
    closing its input, then by :func:`mmn.supervisor.stop_all`."""

    def __init__(self, cpus: list[int] | None = None) -> None:
        argv = [sys.executable, "-m", "benchmarks.suite", "--launcher"]
        if cpus:
            argv += ["--cpus", ",".join(map(str, cpus))]
        self.child = Child("bench-launcher", argv, None)
        self._buffer = b""

    async def start(self) -> None:
        await spawn(self.child, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    async def _ask(self, spec: dict[str, Any]) -> list[int]:
        proc = self.child.process
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        await proc.stdin.send_all((json.dumps(spec) + "\n").encode())
        while b"\n" not in self._buffer:
            chunk = await proc.stdout.receive_some()
            if not chunk:
                raise RuntimeError("the bench launcher died")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    async def echoes(self, endpoint: str, idents: list[str]) -> list[int]:
        return await self._ask({"echo": [endpoint, idents]})

    async def nodes(self, endpoint: str, nodes: list[tuple[str, str]]) -> list[int]:
        return await self._ask({"nodes": [endpoint, [list(n) for n in nodes]]})

    async def close(self) -> None:
        """End its input (it kills its children and exits) and give it 10 s
        to go; then stop what is left of its group and reap it.

        Concurrency: shielded; awaits at most 14 s.
        """
        with trio.CancelScope(shield=True):
            proc = self.child.process
            if proc is not None and proc.stdin is not None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await proc.stdin.aclose()
                with trio.move_on_after(10):
                    await proc.wait()
            await stop_all([self.child], grace=2)


# ==========================================================================
# the floor: raw blocking pyzmq, no trio


class RawFloor:
    """One ROUTER in this process; echo DEALER processes ``e0``.. connect to it."""

    def __init__(self, payload: bytes) -> None:
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.payload = payload
        self.idents: list[bytes] = []

    def wait_connected(self, idents: list[bytes], timeout: float = 30.0) -> None:
        """Ping every echo until it answers (a ROUTER drops what it cannot route)."""
        zmq = self.zmq
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        missing = set(idents)
        deadline = time.monotonic() + timeout
        while missing:
            if time.monotonic() > deadline:
                raise RuntimeError(f"echo processes never connected: {sorted(missing)[:4]}")
            for ident in list(missing):
                try:
                    self.sock.send_multipart([ident, b"ping"], zmq.NOBLOCK)
                except zmq.ZMQError:
                    continue
            while self.sock.poll(50):
                ident, _ = self.sock.recv_multipart()
                missing.discard(ident)
        while self.sock.poll(100):  # late duplicates of the pings
            self.sock.recv_multipart()
        self.idents = list(idents)

    def fanout(self, k: int, n: int) -> list[float]:
        """n round trips: send to the first k echoes, collect k replies."""
        sock, payload, idents = self.sock, self.payload, self.idents[:k]
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            for ident in idents:
                sock.send_multipart([ident, payload])
            for _ in idents:
                sock.recv_multipart()
            out.append(time.perf_counter() - t0)
        return out

    def heartbeat_cpu(self, k: int, period: float, seconds: float, payload: bytes) -> float:
        """CPU fraction of exchanging one message each way with k peers per period."""
        sock, idents = self.sock, self.idents[:k]
        wall0, cpu0 = time.perf_counter(), time.process_time()
        next_tick = wall0
        while time.perf_counter() - wall0 < seconds:
            next_tick += period
            for ident in idents:
                sock.send_multipart([ident, payload])
            for _ in idents:
                sock.recv_multipart()
            time.sleep(max(0.0, next_tick - time.perf_counter()))
        return (time.process_time() - cpu0) / (time.perf_counter() - wall0)

    def close(self) -> None:
        for ident in self.idents:
            with contextlib.suppress(Exception):
                self.sock.send_multipart([ident, b"quit"], self.zmq.NOBLOCK)
        time.sleep(0.05)
        self.sock.close()
        self.ctx.term()


# ==========================================================================
# progress


class Progress:
    """rich's progress bar when rich is installed, a plain stderr bar otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        #: label -> seconds since the step before (where a run's time goes)
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()
        self._rich: Any = None
        self._task: Any = None
        self._label = ""
        if not enabled:
            return
        try:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]mmn bench[/]"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(), TextColumn("{task.description}"), transient=True,
                console=_stderr_console(),
            )
            self._rich.start()
            self._task = self._rich.add_task("", total=total)
        except ImportError:
            self._rich = None

    def step(self, label: str, amount: int = 1) -> None:
        now = time.perf_counter()
        self.phases[label] = round(self.phases.get(label, 0.0) + now - self._last, 2)
        self._last = now
        self.done = min(self.total, self.done + amount)
        self._label = label
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, description=label)
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\rmmn bench [{'#' * filled}{'.' * (width - filled)}] {self.done * 100 // max(self.total, 1):3d}% {label[:40]:<40}")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.stop()
        else:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


# ==========================================================================
# statistics


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, int(len(s) * q))]


def _us(x: float) -> float:
    return round(x * 1e6, 1)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


#: Bootstrap resamples behind each interval, and the interval's coverage.
RESAMPLES = 1000
COVERAGE = 0.90


def ratio_interval(blocks: list[tuple[Any, Any]], stat: Callable[[list[Any], list[Any]], float],
                   seed: int = 0) -> list[float]:
    """A 90% bootstrap interval of ``stat(ours, floor)``, resampling the
    measurement's *blocks* -- ``(ours, floor)`` pairs taken back to back (one
    batch of each) -- with replacement, so that what the machine did during a
    block moves both sides of that block together, as it did when measured.

    Returns ``[low, high]`` (rounded like the ratio), NaN for no blocks.
    The generator is seeded: the same samples give the same interval.
    """
    import random

    if not blocks:
        return [float("nan"), float("nan")]
    rng = random.Random(seed)
    n = len(blocks)
    values = []
    for _ in range(RESAMPLES):
        ours: list[Any] = []
        floor: list[Any] = []
        for _ in range(n):
            a, b = blocks[rng.randrange(n)]
            ours += a
            floor += b
        v = stat(ours, floor)
        if v == v:
            values.append(v)
    if not values:
        return [float("nan"), float("nan")]
    values.sort()
    tail = (1 - COVERAGE) / 2
    lo = values[int(tail * (len(values) - 1))]
    hi = values[int((1 - tail) * (len(values) - 1))]
    return [round(lo, 3), round(hi, 3)]


def _pct_ratio(q: float) -> Callable[[list[float], list[float]], float]:
    def stat(ours: list[float], floor: list[float]) -> float:
        f = _pct(floor, q)
        return _pct(ours, q) / f if f else float("nan")

    return stat


# ==========================================================================
# the cluster part (trio, host in this process)


@dataclass
class NodeInfo:
    name: str
    kind: str


def _last_cpu(pid: int) -> int:
    """The CPU ``pid`` last ran on (``/proc/PID/stat`` field 39), -1 if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[36])
    except (OSError, ValueError, IndexError):
        return -1


def _cpus_of(pids: list[int]) -> list[int]:
    return sorted({c for c in map(_last_cpu, pids) if c >= 0})


def cpu_times(path: str = "/proc/stat") -> list[int] | None:
    """The machine's CPU time so far, in ticks, as ``/proc/stat``'s first line
    gives it (user nice system idle iowait irq softirq steal ...); None where
    there is none."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    try:
        return [int(x) for x in fields[1:]]
    except ValueError:
        return None


def steal_pct(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of the CPU time between two :func:`cpu_times` readings that
    the hypervisor gave to someone else (``steal``, the 8th field), in %."""
    if not before or not after or len(before) < 8 or len(after) < 8:
        return None
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta)
    return round(100 * delta[7] / total, 1) if total > 0 else None


def cpuidle(root: str = "/sys") -> dict[str, Any]:
    """How an idle CPU waits: the cpuidle driver and governor, and with
    ``haltpoll`` how long a guest polls before it halts (why it matters:
    :func:`keep_awake`)."""
    out: dict[str, Any] = {}
    for key, path in (("driver", "devices/system/cpu/cpuidle/current_driver"),
                      ("governor", "devices/system/cpu/cpuidle/current_governor_ro"),
                      ("guest_halt_poll_ns", "module/haltpoll/parameters/guest_halt_poll_ns")):
        try:
            with open(f"{root}/{path}") as f:
                value = f.read().strip()
        except OSError:
            continue
        out[key] = int(value) if value.isdigit() else value
    return out


#: A spinner of :func:`keep_awake`: on one CPU, at SCHED_IDLE, until its
#: parent is gone (it looks every ~2 ms, so a killed bench leaves none behind).
_SPINNER = """
import os, sys
parent, cpu = int(sys.argv[1]), int(sys.argv[2])
os.sched_setaffinity(0, {cpu})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
while os.getppid() == parent:
    for _ in range(50_000):
        pass
"""


@contextlib.contextmanager
def keep_awake(enabled: bool) -> Iterator[list[int]]:
    """One spinner per allowed CPU at ``SCHED_IDLE``, for the run: the CPUs
    never go idle, so a message to a process on another CPU finds it awake.

    Why: on a VM whose idle vCPUs halt at once (haltpoll with
    ``guest_halt_poll_ns`` 0, as on this project's 2-core box) a wake-up
    across CPUs waits for the hypervisor: raw pyzmq round trips between the
    two CPUs measured 1.4-1.6 ms p50 on the quiet box, 99-119 us with the
    spinners (p99 3.8-5.3 ms -> 0.2-0.4 ms), the same as while another
    program kept the CPUs busy.  A run's floors then say what the transport
    costs, not how the hypervisor wakes a CPU, on a quiet machine and a busy
    one alike.  A SCHED_IDLE task runs only when nothing else can (the
    scheduler preempts it at the wake-up of any other task, and its weight
    is 3 against 1,024), so it takes no CPU time a measured process wants;
    what it costs is the host machine's power, for the minutes of the run.

    Yields the CPUs kept awake: those whose spinner runs ([] when not
    enabled or not available; a spinner that cannot take SCHED_IDLE stops).
    """
    if not enabled or not hasattr(os, "SCHED_IDLE") or not hasattr(os, "sched_getaffinity"):
        yield []
        return
    cpus = sorted(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", _SPINNER, str(os.getpid()), str(cpu)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for cpu in cpus]
    time.sleep(0.2)  # each has set its policy, or failed to and is gone
    try:
        yield [cpu for cpu, proc in zip(cpus, procs, strict=True) if proc.poll() is None]
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def unpin(pids: list[int], cpus: list[int]) -> None:
    """Let every thread of ``pids`` run on ``cpus`` (a process that is gone is skipped)."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def placement(pin: bool) -> tuple[list[int], list[int]] | None:
    """``(bench CPUs, children CPUs)`` to pin to, or None: not asked, or
    fewer than two CPUs allowed.  The bench process (the host, the floor's
    ROUTER, their libzmq I/O threads, KSM and memory) gets the first CPU it
    may run on; nodes and echoes share the others.  So each floor and each
    figure has its two ends on different cores, always the same ones, and a
    scheduler migration cannot put the host and a node on one core in one
    block and on two in the next."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None
    return allowed[:1], allowed[1:]


@dataclass
class Bench:
    plan: Plan
    progress: Progress
    results: dict[str, Any] = field(default_factory=dict)
    children_cpus: list[int] | None = None
    allowed_cpus: set[int] = field(default_factory=set)
    ran_on: dict[str, list[int]] = field(default_factory=dict)

    # ---------------------------------------------------------------- setup

    async def run_processes(self) -> None:
        """The echo processes and the floor, then the cluster figures."""
        launcher = Launcher(self.children_cpus)
        await launcher.start()
        floor = RawFloor(_payload())
        try:
            idents = [f"e{i:02d}" for i in range(self.plan.scale_nodes)]
            self.echo_pids = await launcher.echoes(floor.endpoint, idents)
            floor.wait_connected([i.encode() for i in idents])
            self.progress.step("echo processes up")
            logging.getLogger("broker.host").setLevel(logging.ERROR)
            await self.run_cluster(launcher, floor)
        finally:
            floor.close()
            await launcher.close()

    async def run_cluster(self, launcher: Launcher, floor: RawFloor) -> None:
        from broker.host import Host, HostConfig

        plan = self.plan
        frames = max(plan.munmap_pages) + 4096 * 4
        config = HostConfig(node_port=0, admin_port=0, events_port=0, frames=frames + 1, swap_slots=16,
                            liveness=LIVENESS, ack_deadline_ms=ACK_DEADLINE_MS)
        self.host = host = Host(config)
        async with trio.open_nursery() as nursery:
            endpoints = await nursery.start(host.serve)
            inline = [NodeInfo(f"{'kvm' if i % 2 == 0 else 'gru'}-b{i:02d}", "kvm" if i % 2 == 0 else "gru")
                      for i in range(max(plan.ks))]
            xp = [NodeInfo(f"xpmem-b{i:02d}", "xpmem") for i in range(max(plan.xpmem_ks))]
            hm = [NodeInfo(f"hmm-b{i:02d}", "hmm") for i in range(max(plan.hmm_ks))]
            self.pids = await launcher.nodes(endpoints["node"], [(n.kind, n.name) for n in inline + xp + hm])
            await self._wait_live([n.name for n in inline + xp + hm])
            self.progress.step("nodes registered")

            await self.invalidate(floor, inline, plan.ks, "inline")
            await self.invalidate(floor, xp, plan.xpmem_ks, "xpmem")
            await self.invalidate(floor, hm, plan.hmm_ks, "hmm")
            await self.faults(floor, inline[0], "single", 1)
            await self.faults(floor, inline[0], "around", FAULT_AROUND)
            await self.faults(floor, inline[1], "single", 1)
            await self.munmap(floor, inline[:2])

            more = [NodeInfo(f"{'kvm' if i % 2 == 0 else 'gru'}-b{i:02d}", "kvm" if i % 2 == 0 else "gru")
                    for i in range(len(inline), plan.scale_nodes - len(xp) - len(hm))]
            self.pids += await launcher.nodes(endpoints["node"], [(n.kind, n.name) for n in more])
            everyone = inline + more + xp + hm
            await self._wait_live([n.name for n in everyone])
            self.progress.step("scale nodes registered")
            if self.children_cpus is not None:
                self.ran_on = {"bench": [_last_cpu(os.getpid())], "nodes": _cpus_of(self.pids),
                               "echoes": _cpus_of(self.echo_pids)}
                # 64 nodes and 64 echoes on one core measure its run queue
                # (and the re-faults between samples took 3x as long): the
                # scale figures leave placement to the scheduler.
                unpin([os.getpid(), *self.pids, *self.echo_pids], sorted(self.allowed_cpus))
            await self.scale(floor, everyone)
            if self.children_cpus is None:
                self.ran_on = {"bench": [_last_cpu(os.getpid())], "nodes": _cpus_of(self.pids),
                               "echoes": _cpus_of(self.echo_pids)}
            nursery.cancel_scope.cancel()

    async def _wait_live(self, names: list[str], timeout: float = 60.0) -> None:
        with trio.fail_after(timeout):
            while not set(names) <= await self._live():  # noqa: ASYNC110 - another program's status, polled
                await trio.sleep(0.1)

    async def _live(self) -> set[str]:
        """The nodes ``status`` shows live."""
        return {n["name"] for n in (await self.admin("status"))["nodes"] if n["state"] == "live"}

    async def _messages(self) -> int:
        """Notifier messages sent so far (``status`` counter ``notifier_messages``)."""
        return int((await self.admin("status", limit=1))["counters"]["notifier_messages"])

    async def admin(self, command: str, **args: Any) -> dict[str, Any]:
        return await self.host.admin(command, **args)

    async def _mm_with_page(self, npages: int = 1) -> tuple[int, int]:
        mm = (await self.admin("spawn"))["mm"]
        addr = (await self.admin("mmap", mm=mm, pages=npages))["addr"]
        return mm, addr

    async def _attach(self, nodes: list[NodeInfo], mm: int, addr: int, npages: int = 1) -> dict[str, int]:
        """Where each node faults ``addr``: the address itself, or for an
        xpmem node its attachment of a segment exporting it."""
        where = {}
        for n in nodes:
            if n.kind != "xpmem":
                where[n.name] = addr
                continue
            segid = (await self.admin("xpmem", node=n.name, op="make", mm=mm, addr=addr, length=npages * PAGE))["segid"]
            apid = (await self.admin("xpmem", node=n.name, op="get", segid=segid, write=True))["apid"]
            where[n.name] = (await self.admin("xpmem", node=n.name, op="attach", apid=apid, length=npages * PAGE))["vaddr"]
        return where

    async def _fault_all(self, nodes: list[NodeInfo], mm: int, where: dict[str, int], pages: int = 1) -> None:
        async def one(n: NodeInfo) -> None:
            await self.admin("fault", node=n.name, mm=mm, addr=where[n.name], pages=pages, write=True)

        async with trio.open_nursery() as nursery:
            for n in nodes:
                nursery.start_soon(one, n)

    # ------------------------------------------------------- 1. invalidation

    async def _invalidation_samples(self, nodes: list[NodeInfo], mm: int, addr: int, where: dict[str, int],
                                    n: int) -> list[float]:
        """n invalidations of one page mapped by every node (madvise DONTNEED:
        start(CLEAR) -> acks -> zap -> end); the nodes fault it back between
        samples, untimed."""
        host, model = self.host, self.host.model
        out = []
        for _ in range(n):
            await self._fault_all(nodes, mm, where)
            t0 = time.perf_counter()
            await host.locked(model.madvise(mm, addr, PAGE, "dontneed"))
            out.append(time.perf_counter() - t0)
        return out

    async def _measure_k(self, floor: RawFloor, nodes: list[NodeInfo], samples: int) -> dict[str, Any]:
        """``samples`` invalidations to ``nodes`` and as many raw fan-outs,
        in alternating blocks of ``plan.batch`` of each (the side that goes
        first alternating too), after a block of each to warm up: a change of
        load on the machine lands on both sides of a block."""
        k = len(nodes)
        mm, addr = await self._mm_with_page()
        where = await self._attach(nodes, mm, addr)
        b = self.plan.batch
        await self._invalidation_samples(nodes, mm, addr, where, b)  # warm up
        floor.fanout(k, b)
        blocks: list[tuple[list[float], list[float]]] = []
        done = 0
        # (a status asks every node: once per figure, not per block)
        before = await self._messages()
        while done < samples:
            n = min(b, samples - done)
            if len(blocks) % 2:
                raw = floor.fanout(k, n)
                ours = await self._invalidation_samples(nodes, mm, addr, where, n)
            else:
                ours = await self._invalidation_samples(nodes, mm, addr, where, n)
                raw = floor.fanout(k, n)
            blocks.append((ours, raw))
            done += n
        sent = await self._messages() - before
        if sent != 2 * k * samples:
            raise RuntimeError(f"{samples} invalidations sent {sent} messages to {k} nodes, not {2 * k * samples}")
        await self.admin("exit", mm=mm)
        ours = [x for o, _ in blocks for x in o]
        raw = [x for _, r in blocks for x in r]
        p50, p99, f50, f99 = _pct(ours, 0.5), _pct(ours, 0.99), _pct(raw, 0.5), _pct(raw, 0.99)
        return {
            "k": k,
            "samples": len(ours),
            "blocks": len(blocks),
            "p50_us": _us(p50), "p99_us": _us(p99),
            "floor_p50_us": _us(f50), "floor_p99_us": _us(f99),
            "p50_ratio": _ratio(p50, f50), "p99_ratio": _ratio(p99, f99),
            "p50_ratio_interval": ratio_interval(blocks, _pct_ratio(0.5)),
            "p99_ratio_interval": ratio_interval(blocks, _pct_ratio(0.99)),
        }

    async def invalidate(self, floor: RawFloor, pool: list[NodeInfo], ks: tuple[int, ...], what: str) -> None:
        rows = []
        for k in ks:
            rows.append(await self._measure_k(floor, pool[:k], self.plan.samples))
            self.progress.step(f"invalidate {what} K={k}")
        self.results.setdefault("invalidate", {})[what] = rows

    # ------------------------------------------------------------ 2. faults

    async def faults(self, floor: RawFloor, node: NodeInfo, what: str, pages: int) -> None:
        """``plan.fault_count`` faults, W in flight, in ``plan.fault_rounds``
        rounds, each next to a block of raw round trips (the side that goes
        first alternating); the rate is all faults over their time, the floor
        the median raw round trip over every block."""
        plan = self.plan
        count = plan.fault_count
        rounds = max(1, min(plan.fault_rounds, count))
        mm, addr = await self._mm_with_page(count * pages)
        # warm the path up on a mapping of its own
        wmm, waddr = await self._mm_with_page(32 * pages)
        for i in range(32):
            await self.admin("fault", node=node.name, mm=wmm, addr=waddr + i * pages * PAGE, pages=pages, write=True)
        floor.fanout(1, 100)
        nxt = iter(range(count))

        async def worker(todo: Iterator[int]) -> None:
            for i in todo:
                await self.admin("fault", node=node.name, mm=mm, addr=addr + i * pages * PAGE, pages=pages, write=True)

        async def one_round(n: int) -> list[float]:
            todo = iter([next(nxt) for _ in range(n)])
            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(plan.fault_inflight):
                    nursery.start_soon(worker, todo)
            return [n, time.perf_counter() - t0]

        blocks: list[tuple[list[float], list[float]]] = []
        per_round = [count // rounds + (1 if r < count % rounds else 0) for r in range(rounds)]
        for r, n in enumerate(per_round):
            if r % 2:
                raw = floor.fanout(1, plan.fault_floor_batch)
                ours = await one_round(n)
            else:
                ours = await one_round(n)
                raw = floor.fanout(1, plan.fault_floor_batch)
            blocks.append((ours, raw))
        for m in (mm, wmm):
            await self.admin("exit", mm=m)

        def stat(ours: list[float], raw: list[float]) -> float:
            # ours: [n, seconds, n, seconds, ...]; the rate over the raw rate
            faults, seconds = sum(ours[0::2]), sum(ours[1::2])
            return (faults / seconds) * _pct(raw, 0.5)

        elapsed = sum(o[1] for o, _ in blocks)
        raw_rtt = _pct([x for _, r in blocks for x in r], 0.5)
        rate = count / elapsed
        self.results.setdefault("fault", []).append({
            "node": node.name, "kind": node.kind, "mode": what, "pages_per_fault": pages,
            "inflight": plan.fault_inflight, "faults": count, "rounds": rounds,
            "faults_per_s": round(rate), "pages_per_s": round(rate * pages),
            "floor_rtt_per_s": round(1 / raw_rtt), "ratio": _ratio(rate, 1 / raw_rtt),
            "ratio_interval": ratio_interval(blocks, stat),
        })
        self.progress.step(f"faults {node.kind} {what}")

    # ------------------------------------------------------------ 3. munmap

    async def munmap(self, floor: RawFloor, nodes: list[NodeInfo]) -> None:
        host, model = self.host, self.host.model
        gib_pages = (1 << 30) // PAGE
        k = len(nodes)
        rows = []
        for populated in self.plan.munmap_pages:
            repeats = self.plan.munmap_repeats if populated <= 1000 else self.plan.munmap_big_repeats
            times = []
            for _ in range(repeats):
                mm, addr = await self._mm_with_page(gib_pages)
                # spread the populated pages over the whole GiB, 512-page runs
                runs = max(1, -(-populated // 512))
                stride = gib_pages // runs
                left = populated
                for r in range(runs):
                    n = min(512, left)
                    left -= n
                    for node in nodes:
                        await self.admin("fault", node=node.name, mm=mm, addr=addr + r * stride * PAGE, pages=n, write=True)
                present = (await self.admin("status", mm=mm))["mms"][0]["present"]
                if present != populated:
                    raise RuntimeError(f"populated {present} pages, wanted {populated}")
                before = await self._messages()
                gc.collect()
                t0 = time.perf_counter()
                await host.locked(model.munmap(mm, addr, 1 << 30))
                times.append(time.perf_counter() - t0)
                sent = await self._messages() - before
                await self.admin("exit", mm=mm)
            f50 = _pct(floor.fanout(k, 200), 0.5)
            t = statistics.median(times)
            rows.append({
                "populated": populated, "range_pages": gib_pages, "nodes": k,
                "time_us": _us(t), "us_per_populated_page": round(t * 1e6 / populated, 3),
                "floor_us": _us(f50), "ratio": _ratio(t, f50),
                "messages": sent, "messages_expected": 2 * k,
            })
            self.progress.step(f"munmap {populated} pages")
        self.results["munmap"] = rows

    # ------------------------------------------------------------- 6. scale

    async def scale(self, floor: RawFloor, nodes: list[NodeInfo]) -> None:
        plan = self.plan
        row = await self._measure_k(floor, nodes, plan.scale_samples)
        self.progress.step(f"invalidate K={len(nodes)}")
        # Idle: only heartbeats flow.  Rounds of: one period unmeasured (the
        # host catches up after the floor held its loop; a node that heard
        # nothing for 1.5 periods probes, and is answered, here), two periods
        # of the host measured, one period of the floor (shorter than the
        # nodes' 1.5-period probe threshold plus the host's period).
        from protocol import encode
        from protocol.messages import Heartbeat

        hb = encode(Heartbeat(id=1 << 40, epoch=1, incarnation="0" * 32))
        period = self.host.config.heartbeat_ms / 1000
        await trio.sleep(0.5)
        live = len(await self._live())
        rounds = max(1, round(plan.heartbeat_seconds / (2 * period)))
        blocks: list[tuple[list[float], list[float]]] = []
        for _ in range(rounds):
            await trio.sleep(period)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            await trio.sleep(2 * period)
            ours = [time.process_time() - cpu0, time.perf_counter() - wall0]
            raw_frac = floor.heartbeat_cpu(len(nodes), period, period, hb)
            blocks.append((ours, [raw_frac]))

        def stat(ours: list[float], raw: list[float]) -> float:
            return (sum(ours[0::2]) / sum(ours[1::2])) / statistics.mean(raw)

        host_cpu = sum(o[0] for o, _ in blocks) / sum(o[1] for o, _ in blocks)
        raw_cpu = statistics.mean(r[0] for _, r in blocks)
        self.results["scale"] = {
            "nodes": live,
            "invalidate": row,
            "heartbeat": {
                "period_ms": self.host.config.heartbeat_ms,
                "host_cpu_pct": round(host_cpu * 100, 2),
                "floor_cpu_pct": round(raw_cpu * 100, 2),
                "ratio": _ratio(host_cpu, raw_cpu),
                "ratio_interval": ratio_interval(blocks, stat),
                "rounds": rounds,
            },
        }
        self.progress.step("heartbeat load")


# ==========================================================================
# in-process figures: KSM and memory


def measure_ksm(pages: int, repeats: int = 1) -> dict[str, Any]:
    """KSM's two full passes against plain hashing of the same frames,
    ``repeats`` times on a fresh model each, hashing before, between and after
    the passes (the floor next to what it is the floor of).  The ratio is
    KSM's pages per second over the hash's, all repeats together; its
    interval resamples the repeats."""
    blocks = [_ksm_once(pages) for _ in range(max(1, repeats))]
    scanned = sum(b[0][0] for b in blocks)
    ksm_t = sum(b[0][1] for b in blocks)
    hash_t = statistics.median(t for b in blocks for t in b[1])
    stats = blocks[-1][2]
    ksm_rate, hash_rate = scanned / ksm_t, pages / hash_t

    def stat(ours: list[Any], hashes: list[float]) -> float:
        return (sum(ours[0::3]) / sum(ours[1::3])) / (pages / statistics.median(hashes))

    return {
        "pages": pages, "passes": 2, "repeats": len(blocks), "pages_scanned": scanned // len(blocks),
        "pages_shared": stats["pages_shared"], "pages_sharing": stats["pages_sharing"],
        "scanned_per_s": round(ksm_rate), "hash_per_s": round(hash_rate),
        "ratio": _ratio(ksm_rate, hash_rate), "goal": GOAL_KSM,
        "ratio_interval": ratio_interval([([b[0][0], b[0][1], 0], b[1]) for b in blocks], stat),
    }


def _ksm_once(pages: int) -> tuple[tuple[int, float], list[float], dict[str, Any]]:
    """One model, two KSM passes: ``((pages scanned, seconds), [hash
    seconds, ...], ksm stats)``.  Seconds of this thread's CPU clock
    (``time.thread_time``), for both: KSM and its floor are the same
    single-threaded work in this process, and a wall clock would add
    whatever else the machine ran meanwhile to one side of the ratio."""
    from broker.effects import no_nodes, run_sync
    from broker.ksm import page_digest
    from broker.mm import PTE_SHIFT, Model

    model = Model(frames=pages + 16, page_size=PAGE, swap_slots=16)
    try:
        mm = model.spawn()
        addr = run_sync(model.mmap(mm, pages, mergeable=True), no_nodes)
        for i in range(pages):
            run_sync(model.write(mm, addr + i * PAGE, bytes([1 + i % 64]) * 64), no_nodes)
        # The floor hashes the very frames KSM scans, in place: found through
        # the page table (not public), because copying them out through
        # Model.read would cost pages * 4 KiB (256 MiB for the full plan) and
        # hash cache-warm copies instead of the frames.
        m = model.mms[mm]
        pfns = [m.get(addr + i * PAGE) >> PTE_SHIFT for i in range(pages)]
        page = model.memory.page

        def hash_all() -> float:
            t0 = time.thread_time()
            for pfn in pfns:
                page_digest(page(pfn))
            return time.thread_time() - t0

        hashes = [hash_all()]
        scanned, ksm_t = 0, 0.0
        gc.collect()
        for _ in range(2):
            t0 = time.thread_time()
            scanned += run_sync(model.ksm.full_scan(), no_nodes)
            ksm_t += time.thread_time() - t0
            hashes.append(hash_all())
        stats = model.ksm.stats()
    finally:
        model.close()
    return (scanned, ksm_t), hashes, stats


def measure_memory(pages: int) -> dict[str, Any]:
    from broker.effects import no_nodes, run_sync
    from broker.mm import Model

    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        model = Model(frames=pages + 16, page_size=PAGE, swap_slots=16)
        try:
            mm = model.spawn()
            addr = run_sync(model.mmap(mm, pages), no_nodes)
            for off in range(0, pages, 4096):
                run_sync(model.gup(mm, addr + off * PAGE, min(4096, pages - off), True), no_nodes)
            gc.collect()
            used = tracemalloc.get_traced_memory()[0] - base
            present = model.describe_mm(mm)["present"]
        finally:
            model.close()
    finally:
        tracemalloc.stop()
    per_page = used / present
    return {
        "pages": present, "metadata_bytes": used, "bytes_per_page": round(per_page, 2),
        "kernel_bytes_per_page": KERNEL_BYTES_PER_PAGE, "ratio": _ratio(per_page, KERNEL_BYTES_PER_PAGE),
    }


# ==========================================================================
# the run


def _payload() -> bytes:
    from protocol import encode
    from protocol.messages import InvalidateRangeStart

    return encode(InvalidateRangeStart(id=1 << 40, mm=1, start=0x10000000, end=0x10001000, event="CLEAR"))


def run(plan: Plan, *, progress: bool = True) -> dict[str, Any]:
    """Measure everything; returns the JSON document."""
    steps = (1 + len(plan.ks) + len(plan.xpmem_ks) + len(plan.hmm_ks) + 3 + len(plan.munmap_pages) + 1 + 2 + 1 + 2)
    bar = Progress(steps, progress)
    started = time.perf_counter()
    ticks = cpu_times()
    with keep_awake(plan.keep_awake) as awake:  # before pinning: on every CPU
        pinned = placement(plan.pin)
        allowed = os.sched_getaffinity(0) if pinned else None
        if pinned:  # before the first zmq context: its I/O thread inherits it
            os.sched_setaffinity(0, pinned[0])
        try:
            bench = Bench(plan, bar, children_cpus=pinned[1] if pinned else None, allowed_cpus=allowed or set())
            trio.run(bench.run_processes)
            bench.results["ksm"] = measure_ksm(plan.ksm_pages, plan.ksm_repeats)
            bar.step("ksm")
            bench.results["memory"] = measure_memory(plan.memory_pages)
            bar.step("memory")
        finally:
            if allowed is not None:
                os.sched_setaffinity(0, allowed)
            bar.close()
    machine: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                               "load_average": [round(x, 2) for x in os.getloadavg()], "ran_on": bench.ran_on,
                               "steal_pct": steal_pct(ticks, cpu_times()), "cpuidle": cpuidle(), "kept_awake": awake}
    if pinned:
        machine["pinned"] = {"bench": pinned[0], "children": pinned[1], "scale": False}
    doc = {
        "machine": machine,
        "plan": plan.__dict__ | {"ks": list(plan.ks), "xpmem_ks": list(plan.xpmem_ks), "hmm_ks": list(plan.hmm_ks),
                                 "munmap_pages": list(plan.munmap_pages)},
        "goals": {"invalidate_ratio_max": GOAL_INVALIDATE, "invalidate_p99_ratio_max": GOAL_INVALIDATE_P99,
                  "scale_ratio_max": GOAL_SCALE, "scale_p99_ratio_max": GOAL_SCALE_P99,
                  "fault_ratio_min": GOAL_FAULT, "munmap_100000_us_max": GOAL_MUNMAP_US,
                  "ksm_ratio_min": GOAL_KSM, "heartbeat_ratio_max": GOAL_HEARTBEAT,
                  "metadata_bytes_per_page_max": GOAL_METADATA},
        **bench.results,
        "seconds": round(time.perf_counter() - started, 1),
        "phases": bar.phases,
    }
    doc["figures"] = list(figures(doc))
    return doc


_CHECKS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda x, limit: x <= limit,
    ">=": lambda x, limit: x >= limit,
    "==": lambda x, limit: x == limit,
}


def mark(row: dict[str, Any]) -> str:
    """``held`` or ``short`` for a figure with a goal, ``""`` without one.

    The goal is the row's ``"checks"`` (or its one ``"check"``), each
    ``{"of": FIELD, "op": "<=" | ">=" | "==", "limit": NUMBER}`` -- the row's
    FIELD (``ratio``, ``value``, ``messages``) against the limit; held if
    every one holds.  A figure that was not measured (missing, NaN) is short
    of its goal.
    """
    return "short" if _failed(row) else ("held" if _checks(row) else "")


def _checks(row: dict[str, Any]) -> list[dict[str, Any]]:
    return row.get("checks") or ([row["check"]] if row.get("check") else [])


def _failed(row: dict[str, Any]) -> dict[str, Any] | None:
    """The first of the row's checks that does not hold, None if all do."""
    for check in _checks(row):
        value = row.get(check["of"])
        if not isinstance(value, int | float) or value != value or not _CHECKS[check["op"]](value, check["limit"]):
            return check
    return None


def _shortfall(row: dict[str, Any]) -> str:
    """A short figure as ``--check`` names it: the failed check's field and value, and the goal."""
    check = _failed(row) or {"of": "ratio"}
    return f"{row['figure']} ({check['of']} {row.get(check['of'])}, goal {row['goal']})"


def short_of_goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures of ``doc`` that miss their goal (judged again by :func:`mark`)."""
    return [r for r in doc.get("figures") or [] if mark(r) == "short"]


def figures(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every figure as one flat row: name, value, unit, floor, ratio, goal,
    and with a goal its ``check`` and ``mark`` (held or short)."""

    def row(name: str, value: float, unit: str, floor: float, ratio: float, goal: str = "",
            interval: list[float] | None = None, **extra: Any) -> dict[str, Any]:
        r = {"figure": name, "value": value, "unit": unit, "floor": floor, "ratio": ratio, "goal": goal, **extra}
        if interval is not None:
            r["interval"] = interval
        if goal:
            checks, shown = [], []
            for part in goal.split(" and "):
                what, op, limit = part.split()
                checks.append({"of": what, "op": op, "limit": float(limit)})
                shown.append(f"{op} {limit}" if what == "ratio" else part)
            r["check"], r["checks"] = checks[0], checks
            r["goal"] = ", ".join(shown)
            r["mark"] = mark(r)
        return r

    for what, rows in doc["invalidate"].items():
        for r in rows:
            for q in ("p50", "p99"):
                goal = GOAL_INVALIDATE if q == "p50" else GOAL_INVALIDATE_P99
                yield row(f"invalidate {what} K={r['k']} {q}", r[f"{q}_us"], "us", r[f"floor_{q}_us"],
                          r[f"{q}_ratio"], f"ratio <= {goal}", r.get(f"{q}_ratio_interval"))
    for r in doc["fault"]:
        yield row(f"fault {r['kind']} {r['mode']} ({r['pages_per_fault']} p, {r['inflight']} in flight)",
                  r["faults_per_s"], "faults/s", r["floor_rtt_per_s"], r["ratio"], f"ratio >= {GOAL_FAULT}",
                  r.get("ratio_interval"))
    for r in doc["munmap"]:
        goal = f"messages == {r['messages_expected']}"
        if r["populated"] == 100_000:
            goal += f" and value <= {GOAL_MUNMAP_US}"
        yield row(f"munmap 1 GiB, {r['populated']} populated, {r['nodes']} nodes ({r['messages']} msgs)",
                  r["time_us"], "us", r["floor_us"], r["ratio"], goal, messages=r["messages"])
    k = doc["ksm"]
    yield row(f"ksm scan ({k['pages']} pages x {k['passes']})", k["scanned_per_s"], "pages/s", k["hash_per_s"],
              k["ratio"], f"ratio >= {GOAL_KSM}", k.get("ratio_interval"))
    m = doc["memory"]
    yield row(f"memory ({m['pages']} pages)", m["bytes_per_page"], "B/page", m["kernel_bytes_per_page"], m["ratio"],
              f"value <= {GOAL_METADATA}")
    s = doc["scale"]
    inv = s["invalidate"]
    for q in ("p50", "p99"):
        goal = GOAL_SCALE if q == "p50" else GOAL_SCALE_P99
        yield row(f"scale: invalidate K={inv['k']} {q}", inv[f"{q}_us"], "us", inv[f"floor_{q}_us"],
                  inv[f"{q}_ratio"], f"ratio <= {goal}", inv.get(f"{q}_ratio_interval"))
    hb = s["heartbeat"]
    yield row(f"scale: idle host CPU, {s['nodes']} nodes heartbeating", hb["host_cpu_pct"], "%", hb["floor_cpu_pct"],
              hb["ratio"], f"ratio <= {GOAL_HEARTBEAT}", hb.get("ratio_interval"))


def table(doc: dict[str, Any]) -> str:
    rows = doc["figures"]
    head = ("figure", "value", "unit", "floor", "ratio", "90% interval", "goal", "")
    cells = [head] + [(r["figure"], f"{r['value']:,}", r["unit"], f"{r['floor']:,}", f"{r['ratio']:.2f}",
                       _interval(r.get("interval")), r["goal"], mark(r)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(c[i].ljust(widths[i]) if i in (0, 2, 6, 7) else c[i].rjust(widths[i])
                               for i in range(len(head))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    machine = doc["machine"]
    lines.append(f"({machine['cpus']} CPUs, {doc['seconds']} s; floors: raw blocking pyzmq in the same run; "
                 f"{_placement(machine)}{_idle(machine)})")
    return "\n".join(lines)


def _interval(interval: list[float] | None) -> str:
    if not interval or any(x != x for x in interval):
        return ""
    return f"{interval[0]:.2f}-{interval[1]:.2f}"


def _placement(machine: dict[str, Any]) -> str:
    pinned = machine.get("pinned")
    if pinned:
        return (f"pinned: bench on CPU {_cpus(pinned['bench'])}, nodes and echoes on CPU {_cpus(pinned['children'])}"
                + ("; scale: not pinned" if pinned.get("scale") is False else ""))
    ran = machine.get("ran_on")
    if ran:
        return "not pinned; last seen on CPUs " + ", ".join(f"{who} {_cpus(c)}" for who, c in ran.items())
    return "not pinned"


def _idle(machine: dict[str, Any]) -> str:
    """The machine's share of stolen CPU time and how its idle CPUs wait."""
    out = ""
    if machine.get("steal_pct") is not None:
        out += f"; CPU time stolen by the hypervisor {machine['steal_pct']}%"
    if machine.get("kept_awake"):
        out += f"; CPUs {_cpus(machine['kept_awake'])} kept awake (SCHED_IDLE spinners)"
    idle = machine.get("cpuidle") or {}
    if idle.get("driver"):
        out += f"; cpuidle {idle['driver']}"
        if "guest_halt_poll_ns" in idle:
            out += f" (guest halt poll {idle['guest_halt_poll_ns']} ns)"
    return out


def _cpus(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


def plot(doc: dict[str, Any], path: str) -> None:
    """Latency (p50, p99) against node count, ours and the floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("mmn bench --plot needs matplotlib: pip install 'mmnotify[bench]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {"in-line (kvm/gru)": list(doc["invalidate"]["inline"]) + [doc["scale"]["invalidate"]],
              "xpmem": doc["invalidate"]["xpmem"], "hmm": doc["invalidate"].get("hmm", [])}
    for label, rows in series.items():
        ks = [r["k"] for r in rows]
        ax.plot(ks, [r["p50_us"] for r in rows], "o-", label=f"{label} p50")
        ax.plot(ks, [r["p99_us"] for r in rows], "o--", label=f"{label} p99")
    rows = series["in-line (kvm/gru)"]
    ax.plot([r["k"] for r in rows], [r["floor_p50_us"] for r in rows], "k-", label="raw pyzmq fan-out p50")
    ax.plot([r["k"] for r in rows], [r["floor_p99_us"] for r in rows], "k:", label="raw pyzmq fan-out p99")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel("invalidation round trip (us)")
    ax.set_title("mmnotify: invalidation round trip vs node count")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmn bench", description="what the cluster costs, each figure against a floor")
    add_arguments(parser)
    parser.add_argument("--launcher", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cpus", default="", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.launcher:
        return launcher_main([int(c) for c in ns.cpus.split(",") if c])
    return run_command(ns)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer samples and pages (CI: well under 2 minutes)")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="also plot latency against node count to FILE.png (matplotlib; default: no plot)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the bench and its children to different CPUs (they are by default, "
                             "when two or more are allowed; the table says where each ran)")
    parser.add_argument("--no-keep-awake", action="store_true",
                        help="do not keep the CPUs from going idle during the run (by default a SCHED_IDLE spinner "
                             "runs on each: it takes no CPU time from the measured processes, and a message to "
                             "another CPU does not wait for the hypervisor to wake it; the table says which)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a figure is short of its goal (each is marked held or short)")


def run_command(ns: argparse.Namespace) -> int:
    if ns.plot:  # fail before measuring for minutes
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("mmn bench: --plot needs matplotlib: pip install 'mmnotify[bench]'", file=sys.stderr)
            return 2
    plan = Plan.quick() if ns.quick else Plan()
    if getattr(ns, "no_pin", False):
        plan = dataclasses.replace(plan, pin=False)
    if getattr(ns, "no_keep_awake", False):
        plan = dataclasses.replace(plan, keep_awake=False)
    doc = run(plan, progress=not ns.no_progress and sys.stderr.isatty())
    if ns.plot:
        plot(doc, ns.plot)
    if getattr(ns, "json", False):
        print(json.dumps(doc, indent=1))
    else:
        print(table(doc))
    short = short_of_goals(doc)
    if ns.check and short:
        print(f"mmn bench: {len(short)} figure{'s' if len(short) > 1 else ''} short of the goal: "
              + "; ".join(_shortfall(r) for r in short), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
