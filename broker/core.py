"""The host core: every decision of the host, as one synchronous state machine.

Events in, actions out, in the shape of h11's ``Connection``: no trio, no zmq,
no clock of its own (every event carries ``now``, a monotonic reading in
seconds).  ``mmn host`` (:mod:`broker.host`) is a thin trio shell that feeds
it socket frames and timer ticks and carries out what it returns; the
in-process cluster (:mod:`mmnotify.local`) is a queue pump around the very
same object.  A rule of the host exists here once.

Events (each returns the list of :data:`Action` to carry out, in order)::

    receive_node_frame(frames, key, now)   a node channel message (routing id, payload)
    receive_node(identity, msg, key, now)  the same, already decoded (in-process nodes)
    receive_admin_frame(frames, key, now)  an admin request
    submit_admin(client, command, args, now)  the same, already decoded
    peer_gone(identity, now)               the transport cannot route to that peer
    tick(now)                              time passed: deadlines, heartbeats, timers
    fence(name, reason, now)               an operator or a test fences a node
    run_one()                              deferred mode only: one ready continuation

Actions::

    SendNode(identity, msg)    to one node connection, in order with every other one
    ReplyAdmin(client, reply)  the answer to one admin request
    Publish(kind, fields)      an event for the stream (only while ``listening``)

What it owns:

* **Sessions** (:class:`broker.sessions.Sessions`): register, epochs, liveness,
  fencing.  A node's key binds its name and its connection (CURVE).
* **Duplicates**: a request (same connection, same id) is answered once; a
  duplicate gets the first answer again, or nothing while it is being made
  (or once the answer's body went, past a budget of page entries).
* **Routing** of every node message: acks to the operation waiting for them,
  DMA to the oracle, GUP-fast at once, the slow GUP and unsubscribe as tasks
  under the lock, Subscribe / Unpin / XPMEM answered from the model.
* **The executor** of host operations and tasks (:mod:`broker.tasks`): one mm
  lock (FIFO), each operation's Delivers sent, their acks collected under the
  ack deadline, the late fenced, the operation resumed *from the event that
  completed it* (no task switch: the ack that completes a start resumes the
  operation, which sends the end, in the same call).
* **Deadlines**: ack deadline, command timeouts, heartbeats and silence, ksmd's
  sleeps: :meth:`next_deadline` says when to call :meth:`tick` next.

The executor's contract with operations (``broker.effects``): an operation is
always driven to completion -- never closed mid-way -- so every start it
opened gets its end.  An admin client that goes away does not cancel its
operation; a fence answers the fenced node's pending acks with None and the
operation goes on.  Only :meth:`close` (host shutdown) abandons operations.

Ordering (why a correct node never makes a stale access): each node has one
ordered connection, and the core handles its messages in that order.  A DMA
the node sent before its ack is handled (served by the oracle) before the ack
is, so before the operation that waits for the ack can resume and change the
primary ptes.  The shells keep that order: the node channel is read by one
loop that hands each message to the core before reading the next.

Eager vs deferred: by default (``eager=True``) every continuation that an
event makes ready runs before the event returns.  With ``eager=False`` they
wait in a ready queue until the driver calls :meth:`run_one`, so a driver
(the in-process cluster under hypothesis) can let node traffic run at every
yield of every operation -- between a start's last ack and the operation's
resumption, while an end is in flight -- the interleavings an async host
allows.  The same code decides either way.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from protocol import Limits, ProtocolError, decode
from protocol.admin import check_admin
from protocol.messages import (
    Ack,
    AdminReply,
    AdminRequest,
    ChangePte,
    Command,
    CommandResult,
    DmaRead,
    DmaReply,
    DmaWrite,
    Error,
    Fenced,
    Gup,
    GupReply,
    Heartbeat,
    Message,
    Ok,
    Register,
    Registered,
    Subscribe,
    Unpin,
    Unsubscribe,
    XpmemGet,
    XpmemMake,
    XpmemRelease,
    XpmemRemove,
    XpmemRemoved,
    XpmemReply,
)
from protocol.types import Errno, KernelError, name_matches_key

from . import guard, hmm
from .admin import ADMIN_HANDLERS
from .effects import Deliver, Op, Outcomes
from .grants import Grants
from .notifier import check_ops
from .pagetable import Prot
from .sessions import Refused, Session, Sessions, SessionState
from .tasks import Locked, Relay, RelayAll, Sleep, Task, WaitKsm
from .xpmem import Segments

logger = logging.getLogger(__name__)


# -- actions -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendNode:
    """Send ``msg`` on the node connection ``identity``."""

    identity: bytes
    msg: Message


@dataclass(frozen=True, slots=True)
class ReplyAdmin:
    """Answer the admin request of ``client`` (an opaque token of the shell's)."""

    client: Any
    reply: AdminReply


@dataclass(frozen=True, slots=True)
class Publish:
    """An event for the stream."""

    kind: str
    fields: dict[str, Any]


Action = SendNode | ReplyAdmin | Publish


@dataclass
class CoreConfig:
    """What the core decides with.  Times are milliseconds.

    ``heartbeat_ms`` 0: no heartbeats and no silence fencing (the in-process
    cluster, whose nodes have no clock).  ``authenticated``: CURVE is on; every
    node message must come with the key that registered the connection, and
    admin requests with one of ``admin_keys``.
    """

    incarnation: str = "local"
    page_size: int = 4096
    heartbeat_ms: int = 500
    liveness: int = 6
    ack_deadline_ms: int = 2000
    command_timeout_ms: int = 10_000
    wrap_change_pte: bool = False
    limits: Limits = field(default_factory=Limits)
    authenticated: bool = False
    admin_keys: Collection[str] = ()


#: Node requests answered exactly once: a duplicate (same connection, same id)
#: gets the first answer again, or nothing while that is still being made.
_REQUESTS = (Register, Gup, Unpin, Subscribe, Unsubscribe, XpmemMake, XpmemGet, XpmemRelease, XpmemRemove,
             DmaRead, DmaWrite, *hmm.HMM_REQUESTS)
_REQUEST_TYPES = frozenset(_REQUESTS)
_REPLY_CACHE = 4096
_REPLY_CONNECTIONS = 1024
#: Of those answers, the bodies kept to be sent again: at most this many
#: entries of their page lists (GUP pages, hmm pfns; DMA data in pages) per
#: connection.  An older body gives way to ``_ANSWERED``: a duplicate of it is
#: still not carried out again, only not answered again -- the node had the
#: answer on the connection that still stands (a new connection is a new
#: identity, whose answers start empty).  Bounded by count alone, the 4,096
#: answers of a node faulting 512 pages at a time kept ~2 million Python
#: lists alive, which every full collection of the host's GC walked: a munmap
#: of 100,000 pages went from ~30 ms to 40-120 ms as they piled up.
_REPLY_PAGES = 4096


class _Answered:
    """The reply to a request was sent and its body since dropped."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<answered>"


_ANSWERED = _Answered()


def _reply_weight(msg: Message) -> int:
    """The page entries of a reply's body (what :data:`_REPLY_PAGES` counts)."""
    pages = getattr(msg, "pages", None)
    if pages is None:
        pages = getattr(msg, "pfns", None)
    weight = len(pages) if isinstance(pages, list) else 0
    data = getattr(msg, "data", None)
    if isinstance(data, bytes):
        weight += len(data) >> 12
    return weight


@dataclass(slots=True)
class _Answers:
    """One node connection's requests: id -> reply (None while it is made,
    ``_ANSWERED`` once its body went), and the kept bodies' weights, oldest
    first."""

    seen: OrderedDict[int, Message | _Answered | None] = field(default_factory=OrderedDict)
    bodies: deque[tuple[int, int]] = field(default_factory=deque)
    weight: int = 0

    def keep(self, ref: int, msg: Message) -> None:
        """``msg`` answers request ``ref``: what a duplicate of it gets."""
        self.seen[ref] = msg
        weight = _reply_weight(msg)
        if not weight:
            return
        self.bodies.append((ref, weight))
        self.weight += weight
        while self.weight > _REPLY_PAGES and len(self.bodies) > 1:
            old, w = self.bodies.popleft()
            self.weight -= w
            if isinstance(self.seen.get(old), Message):
                self.seen[old] = _ANSWERED


def admin_result(reply: AdminReply) -> dict[str, Any]:
    """An admin reply's result, or its error as the ``KernelError`` it names
    (EIO for an errno the kernel has not: an internal error, a refused request)."""
    if reply.ok:
        return dict(reply.result)
    errno = Errno(reply.errno) if reply.errno in Errno._value2member_map_ else Errno.EIO
    raise KernelError(errno, reply.error)


def page_triples(pages: list[tuple[int, int, bool]]) -> list[list[int]]:
    """GUP results as the wire carries them: ``[addr, pfn, writable 0/1]``
    (the codec takes ints only, not bools)."""
    return [[int(addr), int(pfn), int(writable)] for addr, pfn, writable in pages]


# -- the executor's state -----------------------------------------------------------


class TaskState(Enum):
    """A task's life: ``READY -> (WAITING <-> READY)* -> DONE``."""

    READY = "ready"
    WAITING = "waiting"
    DONE = "done"


@dataclass(eq=False)
class TaskHandle:
    """What a driver sees of a task it submitted (:meth:`HostCore.submit`).

    ``delivers`` counts the Delivers its operations issued, so a driver can
    hold an operation open after its first one.
    """

    name: str
    state: TaskState = TaskState.READY
    value: Any = None
    error: BaseException | None = None
    delivers: int = 0

    @property
    def done(self) -> bool:
        return self.state is _DONE


@dataclass(eq=False)
class _Task:
    gen: Task[Any]
    handle: TaskHandle
    on_done: Callable[[Any, BaseException | None], None] | None = None


@dataclass(eq=False)
class _Run:
    """One operation holding the mm lock, driven by the core."""

    task: _Task
    op: Op[Any]
    started: bool = False
    #: node -> id of the message whose ack it still owes
    waiting: dict[str, int] = field(default_factory=dict)
    outcomes: Outcomes = field(default_factory=dict)
    timer: int = 0


@dataclass(eq=False)
class _Gather:
    task: _Task
    pending: int
    results: dict[str, CommandResult | None]
    single: str | None  # Relay (one node): resume with its result, or throw


@dataclass(eq=False)
class _CommandWait:
    ref: int
    gather: _Gather
    node: str
    identity: bytes
    control: bool
    timer: int = 0
    result: CommandResult | None = None
    error: KernelError | None = None


_ACK, _COMMAND, _SLEEP, _HEARTBEAT = "ack", "command", "sleep", "heartbeat"

# Python 3.11's EnumType defines __getattr__, which sends every
# ``TaskState.DONE`` in an expression down the slow attribute hook (~0.1 us
# each, several per operation); the hot paths below compare with these.
_READY, _WAITING, _DONE = TaskState.READY, TaskState.WAITING, TaskState.DONE
_LIVE = SessionState.LIVE
#: the timer heap is swept of cancelled entries only past this size
_TIMER_SWEEP_MIN = 64


class HostCore:
    """The host's decisions (see the module docstring).

    Args:
        model: the primary MMU (:class:`broker.mm.Model`); the core owns it.
        config: a :class:`CoreConfig`.
        eager: run every continuation before an event returns (the service);
            False: wait for :meth:`run_one` (a stepping driver).
    Concurrency:
        Synchronous, not thread-safe, not reentrant: one caller at a time,
        each event runs to completion.  Nothing it does blocks.
    """

    def __init__(self, model: Any, config: CoreConfig | None = None, *, eager: bool = True) -> None:
        self.config = config or CoreConfig(page_size=model.page_size)
        self.model = model
        self.notifier = model.notifier
        self.sessions = Sessions()
        self.segments = Segments(self.config.page_size)
        self.grants = Grants()
        #: node -> bitmap of the frames ever handed to it (a GUP reply, a
        #: change_pte): an access to any other frame was forged, not stale.
        self._handed: dict[str, bytearray] = {}
        self.eager = eager
        self.now = 0.0
        #: Someone listens to the event stream (the shell tells; else Publish is skipped).
        self.listening = False
        self.endpoints: dict[str, str] = {}
        self.counters: dict[str, int] = {
            "bad_node_frames": 0,
            "bad_admin_frames": 0,
            "refused": 0,
            "acks_late": 0,
            "fenced_ack_deadline": 0,
            "fenced_heartbeat": 0,
            "admin_requests": 0,
            "rate_limited": 0,
            "forbidden": 0,
            "dropped_node_frames": 0,
            "dropped_admin_frames": 0,
            "duplicates": 0,
            "ksmd_errors": 0,
            "task_errors": 0,
            "gup_fast": 0,
            "gup_slow": 0,
            # replies too large for the peer, answered with an error instead (broker/host.py)
            "oversized_replies": 0,
            # a node acting on an mm no operator granted it (EACCES, broker/grants.py)
            "refused_accesses": 0,
            # a DMA naming a frame never handed to that node: a guess, not a stale translation
            "forged_accesses": 0,
            # status requests answered by one already under way (HostCore._admin)
            "status_coalesced": 0,
        }
        limits = self.config.limits
        self._node_rate = guard.RateLimiter(limits.max_rate, limits.rate_burst)
        self._admin_rate = guard.RateLimiter(limits.max_rate, limits.rate_burst)
        self._ids = itertools.count(1)
        self._outbox: list[Action] = []
        #: node connection -> its requests and their replies (:class:`_Answers`)
        self._replies: OrderedDict[bytes, _Answers] = OrderedDict()
        #: node connection -> the key that registered on it (CURVE)
        self._peer_keys: dict[bytes, str] = {}
        #: status arguments -> the (client, ref) pairs waiting for that answer
        self._status_askers: dict[tuple[Any, ...], list[tuple[Any, int]]] = {}
        self._admin_completed = 0
        # the executor
        self._ready: deque[tuple[Any, ...]] = deque()
        self._holder: _Run | None = None
        self._lock_queue: deque[tuple[_Task, Op[Any]]] = deque()
        self._commands: dict[int, _CommandWait] = {}
        self._timers: list[tuple[float, int, str, Any]] = []
        self._timer_ids = itertools.count(1)
        self._live_timers: set[int] = set()
        self._ksm_waiters: list[_Task] = []
        self._tasks: set[_Task] = set()
        self._running = False
        self._started = False
        self._held: set[TaskHandle] = set()
        self._parked: dict[TaskHandle, tuple[Any, ...]] = {}

    # ================================================================ events

    def start(self, now: float) -> list[Action]:
        """The service starts: heartbeats and ksmd begin."""
        self.now = now
        self._started = True
        if self.config.heartbeat_ms > 0:
            self._timer(now + self.config.heartbeat_ms / 1000, _HEARTBEAT, None)
        self._spawn(self._ksmd(), "ksmd")
        self.publish("host_started", incarnation=self.config.incarnation, **self.endpoints)
        return self._settle()

    def receive_node_frame(self, frames: list[bytes], key: str | None, now: float) -> list[Action]:
        """A node channel message as the ROUTER delivers it: ``[identity, payload]``.

        Rate-limited per connection before decoding; a malformed frame gets a
        typed ``Error`` and changes nothing.
        """
        self._clock(now)
        if not self._node_rate.allow(frames[0], now):
            self.counters["rate_limited"] += 1
            self.counters["dropped_node_frames"] += 1
            return []
        if len(frames) != 2:
            self.counters["bad_node_frames"] += 1
            self.counters["dropped_node_frames"] += 1
            return []
        identity, frame = frames
        limits = self.config.limits
        try:
            msg = decode(frame, limits)
            if isinstance(msg, XpmemMake):
                guard.check_node_range(msg.length, limits, msg.id)
        except ProtocolError as exc:
            self.counters["bad_node_frames"] += 1
            logger.info("bad frame from node %r: %s", bytes(identity[:16]), exc)
            self._send(identity, Error(ref=exc.ref or 0, code=exc.code, message=exc.message))
            return self._drain()
        return self.receive_node(identity, msg, key, now)

    def receive_node(self, identity: bytes, msg: Message, key: str | None, now: float) -> list[Action]:
        """A decoded message from node connection ``identity`` (``key``: the
        CURVE key it came with, None without CURVE)."""
        self._clock(now)
        if self.config.authenticated:
            problem = self._key_problem(identity, msg, key)
            if problem:
                self.counters["forbidden"] += 1
                ref = getattr(msg, "id", getattr(msg, "ref", 0))
                self._send(identity, Error(ref=ref, code="forbidden", message=problem))
                return self._drain()
        self._on_node_message(identity, msg)
        return self._settle()

    def receive_admin_frame(self, frames: list[bytes], key: str | None, now: float) -> list[Action]:
        """An admin channel request ``[identity, payload]``; the reply goes to
        ``identity`` (as a :class:`ReplyAdmin` whose client is the identity)."""
        self._clock(now)
        # Per client: its CURVE key, which it cannot change at will (the CLI
        # opens a fresh socket, so a fresh routing id, for every call).
        client = key if self.config.authenticated and key else frames[0]
        if not self._admin_rate.allow(client, now):
            self.counters["rate_limited"] += 1
            self.counters["dropped_admin_frames"] += 1
            return []
        if len(frames) != 2:
            self.counters["bad_admin_frames"] += 1
            self.counters["dropped_admin_frames"] += 1
            return []
        identity, frame = frames
        limits = self.config.limits
        try:
            msg = decode(frame, limits)
            if not isinstance(msg, AdminRequest):
                raise ProtocolError("bad_message", f"{msg.TYPE} is not an admin request", getattr(msg, "id", None))
            args = check_admin(msg.command, msg.args)
            guard.check_admin_limits(msg.command, args, limits, self.config.page_size, msg.id)
            if self.config.authenticated and key not in self.config.admin_keys:
                # ZAP lets only admin keys in; this is the second lock.
                raise ProtocolError("forbidden", "not an admin key", msg.id)
        except ProtocolError as exc:
            self.counters["bad_admin_frames"] += 1
            reply = AdminReply(ref=exc.ref or 0, ok=False, errno="EINVAL", error=f"{exc.code}: {exc.message}")
            self._outbox.append(ReplyAdmin(identity, reply))
            return self._drain()
        self._admin(identity, msg.id, msg.command, args)
        return self._settle()

    def submit_admin(self, client: Any, ref: int, command: str, args: dict[str, Any], now: float) -> list[Action]:
        """An admin request already decoded (in-process drivers): checked as
        the wire's are; the reply is a :class:`ReplyAdmin` to ``client``."""
        self._clock(now)
        try:
            checked = check_admin(command, args)
            guard.check_admin_limits(command, checked, self.config.limits, self.config.page_size, ref)
        except ProtocolError as exc:
            self.counters["bad_admin_frames"] += 1
            reply = AdminReply(ref=ref, ok=False, errno="EINVAL", error=f"{exc.code}: {exc.message}")
            self._outbox.append(ReplyAdmin(client, reply))
            return self._drain()
        self._admin(client, ref, command, checked)
        return self._settle()

    def peer_gone(self, identity: bytes, now: float) -> list[Action]:
        """The node channel could not route to ``identity``: that node is gone."""
        self._clock(now)
        name = self.sessions.by_identity.get(identity)
        session = self.sessions.by_name.get(name) if name else None
        if session is not None and session.state == SessionState.LIVE and session.identity == identity:
            self._fence(name, "connection gone")  # type: ignore[arg-type]
        return self._settle()

    def fence(self, name: str, reason: str, now: float | None = None) -> list[Action]:
        """Fence ``name`` (see :meth:`_fence`)."""
        if now is not None:
            self._clock(now)
        self._fence(name, reason)
        return self._settle()

    def tick(self, now: float) -> list[Action]:
        """Time is ``now``: fire every deadline that has passed."""
        self._clock(now)
        while self._timers and self._timers[0][0] <= now:
            _, tid, kind, target = heapq.heappop(self._timers)
            if tid not in self._live_timers:
                continue
            self._live_timers.discard(tid)
            self._fire(kind, target)
        return self._settle()

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must run next (None: no deadline pending)."""
        timers = self._timers
        while timers and timers[0][1] not in self._live_timers:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def run_one(self) -> bool:
        """Deferred mode: run one ready continuation.  False if none was ready."""
        if not self._ready:
            return False
        self._run_ready_item(self._ready.popleft())
        return True

    @property
    def has_ready(self) -> bool:
        return bool(self._ready)

    def drain(self) -> list[Action]:
        """The actions that continuations run by :meth:`run_one` produced."""
        return self._drain()

    # ----------------------------------------------------- driver-submitted work

    def submit(self, op: Op[Any], name: str = "op",
               on_done: Callable[[Any, BaseException | None], None] | None = None) -> TaskHandle:
        """Run a host operation under the lock, as an admin command would.

        Returns:
            Its :class:`TaskHandle`; ``value`` or ``error`` once ``done``.
        Concurrency: the operation starts when the lock is free (at once, in
            eager mode, if it is); collect the actions with :meth:`drain`.
        """

        def task() -> Task[Any]:
            return (yield Locked(op))

        return self.spawn(task(), name, on_done)

    def spawn(self, gen: Task[Any], name: str = "task",
              on_done: Callable[[Any, BaseException | None], None] | None = None) -> TaskHandle:
        """Start a host task (a generator of :mod:`broker.tasks` effects);
        in eager mode it runs at once as far as it can."""
        handle = self._spawn(gen, name, on_done)
        if self.eager and not self._running:
            self._run_all()
        return handle

    def _spawn(self, gen: Task[Any], name: str,
               on_done: Callable[[Any, BaseException | None], None] | None = None) -> TaskHandle:
        handle = TaskHandle(name)
        task = _Task(gen, handle, on_done)
        self._tasks.add(task)
        self._ready.append(("task", task, None, None))
        return handle

    def hold(self, handle: TaskHandle) -> None:
        """A stepping driver holds ``handle``'s operation between two yields:
        its acks are still collected (and its deadline still fences), but it
        is not resumed until :meth:`release`."""
        self._held.add(handle)

    def release(self, handle: TaskHandle) -> None:
        """Undo :meth:`hold`: a continuation parked meanwhile is the next to run."""
        self._held.discard(handle)
        item = self._parked.pop(handle, None)
        if item is not None:
            self._ready.appendleft(item)

    @property
    def lock_held(self) -> bool:
        """An operation holds the mm lock."""
        return self._holder is not None

    @property
    def busy(self) -> bool:
        """Anything but the idle ksmd waits: an operation, a queued one, a relay."""
        return bool(self._holder or self._lock_queue or self._commands or self._ready or self._parked)

    def wake_ksm(self) -> None:
        """ksm's knobs changed: ksmd looks again."""
        waiters, self._ksm_waiters = self._ksm_waiters, []
        for task in waiters:
            self._ready.append(("task", task, None, None))

    def publish(self, kind: str, /, **fields: Any) -> None:
        """An event for the stream (nothing while nobody listens)."""
        if self.listening:
            self._outbox.append(Publish(kind, fields))

    def close(self) -> None:
        """Host shutdown: abandon every task (their generators are closed)."""
        for task in list(self._tasks):
            try:
                task.gen.close()
            except Exception:  # noqa: BLE001 - shutting down
                logger.exception("closing task %s", task.handle.name)
        self._tasks.clear()
        if self._holder is not None:
            try:
                self._holder.op.close()
            except Exception:  # noqa: BLE001
                logger.exception("closing the operation holding the lock")
            self._holder = None

    # ================================================================= time

    def _clock(self, now: float) -> None:
        """Time is ``now``.  A gap since the core last ran that is far longer
        than the heartbeat period means the host itself was not running
        (SIGSTOP, a long GC, a loaded machine): the shell wakes the core at
        least once a period.  Nobody could be heard meanwhile, so the silence
        of nodes and the acks owed are judged only over time the host ran:
        last-seen times and ack / command deadlines move by the stall.  Every
        deadline still passes (each stall moves it once, by a finite gap).

        A gap counts as a stall past two periods, or a second more than one
        when that is still within half the liveness window: a gap the host
        does not count may not itself fence anybody.  (With a one-second
        floor alone, a 100 ms x 8 host stopped for 0.9 s counted no stall,
        and fenced every node on resume: found by ``mmn soak``'s host pauses.)"""
        period = self.config.heartbeat_ms / 1000
        gap = now - self.now
        # (the first test alone decides every event of a host that runs)
        if gap > 2 * period and self._started and period > 0 and gap > max(
                2 * period, min(period + 1.0, period * self.config.liveness / 2)):
            stalled = gap - period
            self.counters["host_stalls"] = self.counters.get("host_stalls", 0) + 1
            logger.warning("the host did not run for %.1f s: node silence and deadlines judged without it", stalled)
            for session in self.sessions.live():
                session.last_seen += stalled
            self._timers = [(when + stalled if kind in (_ACK, _COMMAND) else when, tid, kind, target)
                            for when, tid, kind, target in self._timers]
            heapq.heapify(self._timers)
        if now > self.now:
            self.now = now

    # ================================================================ sessions

    def _key_problem(self, identity: bytes, msg: Message, key: str | None) -> str:
        """With CURVE: why this connection's key may not send ``msg`` ("" if
        it may).  A node registers only under its key's name (or
        ``KEY-anything``), and every later message on the connection must
        come from that same key -- a peer that took over another's routing
        id with another key is refused, never mistaken for it."""
        if not key:
            return "no authenticated key"
        if isinstance(msg, Register):
            if not name_matches_key(msg.name, key):
                return f"key {key!r} may not register as {msg.name!r}"
            self._peer_keys[identity] = key
            return ""
        owner = self._peer_keys.get(identity)
        if owner is not None and owner != key:
            return f"this connection belongs to key {owner!r}"
        return ""

    def _on_node_message(self, identity: bytes, msg: Message) -> None:
        """Route one node message (see the module docstring).  Dispatch is on
        the message's exact type: the codec builds exactly the registered
        classes, and in-process nodes send the same ones."""
        kind = type(msg)
        now = self.now
        if kind is CommandResult:
            # Not epoch-checked: inject/heal/status reach a fenced node too
            # (`mmn heal` of a hung node); only the connection asked counts.
            wait = self._commands.get(msg.ref)  # type: ignore[attr-defined]
            if wait is None or wait.identity != identity:
                self.counters["dropped_node_frames"] += 1  # a result nobody asked this peer for
                return
            self.sessions.touch(identity, now)
            self._command_done(wait, msg, None)  # type: ignore[arg-type]
            return
        if kind is Register:
            dup = self._duplicate(identity, msg.id)  # type: ignore[attr-defined]
            if isinstance(dup, Message):
                self._send(identity, dup)
            elif not dup:
                self._register(identity, msg)  # type: ignore[arg-type]
            return
        epoch = getattr(msg, "epoch", None)
        try:
            session = self.sessions.lookup(identity, epoch)
        except Refused as exc:
            self.counters["refused"] += 1
            ref = getattr(msg, "id", getattr(msg, "ref", 0))
            # An Ack is not answered (its ref is the host's, the node could
            # not place the refusal); a heartbeat is, so a node whose
            # connection the host lost learns it at once (node/base.py
            # SESSION_REFUSALS), not only by its silence watchdog.
            if kind is not Ack or exc.code == "fenced":
                self._send(identity, Error(ref=ref, code=exc.code, message=exc.message))
            else:
                self.counters["dropped_node_frames"] += 1
            return
        session.last_seen = now
        if kind in _REQUEST_TYPES:
            dup = self._duplicate(identity, msg.id)  # type: ignore[attr-defined]
            if dup:
                if isinstance(dup, Message):
                    self._send(identity, dup)
                return
        route = _NODE_ROUTES.get(kind)
        if route is None:
            self._send(identity, self._answer(session.name, msg))
        else:
            route(self, session, msg)

    # -- the routes of a live session's messages (_NODE_ROUTES) --------------------

    def _route_ack(self, session: Session, msg: Ack) -> None:
        self._on_ack(session.name, msg)

    def _route_heartbeat(self, session: Session, msg: Heartbeat) -> None:
        pass  # any traffic counts: last_seen moved already

    def _route_dma(self, session: Session, msg: DmaRead | DmaWrite) -> None:
        self._send(session.identity, self._dma(session.name, msg, session.kind))

    def _route_gup(self, session: Session, msg: Gup) -> None:
        name, identity = session.name, session.identity
        if not self.may_reach(name, msg.mm, msg.write):
            self._send(identity, Error(ref=msg.id, code=Errno.EACCES.value,
                                       message=self._refused(name, msg.mm, "gup")))
            return
        if name not in self.notifier.subscriptions.get(msg.mm, ()):
            # A secondary MMU maps an mm only after mmu_notifier_register:
            # pages served to a node that is not subscribed would be
            # recorded nowhere, and the next munmap would free them under it.
            self._send(identity, GupReply(ref=msg.id, mm=msg.mm, pages=[], errno=Errno.EINVAL.value))
            return
        if session.kind == "xpmem":
            msg = self._xpmem_pin_write(name, msg)
        reply = self._gup_fast(name, session.kind, msg)
        if reply is None:
            self._spawn(self._gup_slow_task(session, msg), "gup")
        else:
            self._send(identity, reply)

    def _route_unsubscribe(self, session: Session, msg: Unsubscribe) -> None:
        self._spawn(self._unsubscribe_task(session, msg), "unsubscribe")

    def _route_xpmem_remove(self, session: Session, msg: XpmemRemove) -> None:
        self._spawn(self._xpmem_remove_task(session, msg), "xpmem_remove")

    def _route_hmm(self, session: Session, msg: Message) -> None:
        hmm.on_request(self, session, msg)

    def _register(self, identity: bytes, msg: Register) -> None:
        try:
            check_ops(msg.ops, msg.sleepable)  # before anything changes
        except ValueError as exc:
            self._send(identity, Error(ref=msg.id, code="bad_message", message=str(exc)))
            return
        key = self._peer_keys.get(identity) if self.config.authenticated else None
        problem, forget = self.sessions.admit(msg, key)
        if problem:
            self.counters["forbidden"] += 1
            self._send(identity, Error(ref=msg.id, code="forbidden", message=problem))
            return
        for name in forget:  # room for it: the oldest fenced sessions go
            self.sessions.forget(name)
            self.grants.by_node.pop(name, None)
            self._handed.pop(name, None)
        old = self.sessions.by_name.get(msg.name)
        if old is not None and old.state == SessionState.LIVE:
            self._fence(msg.name, "registered again (restarted)")
        if old is not None and old.key != key:  # another principal takes a free name: nothing of the old one's
            self.grants.by_node.pop(msg.name, None)
            self._handed.pop(msg.name, None)
        session, _ = self.sessions.register(identity, msg, self.now, key)
        self.notifier.add_node(session.name, session.ops, session.sleepable)
        self.publish("registered", node=session.name, kind=session.kind, epoch=session.epoch)
        cfg = self.config
        self._send(identity, Registered(
            ref=msg.id,
            epoch=session.epoch,
            host_incarnation=cfg.incarnation,
            heartbeat_ms=cfg.heartbeat_ms,
            ack_deadline_ms=cfg.ack_deadline_ms,
            page_size=cfg.page_size,
        ))

    def _fence(self, name: str, reason: str) -> None:
        """Retire ``name``'s epoch, drop its subscriptions, pins and permits,
        answer whatever waits on it, and tell it (best effort)."""
        session = self.sessions.fence(name, reason)
        if session is None:
            return
        logger.warning("fenced %s (epoch %d): %s", name, session.epoch, reason)
        self._replies.pop(session.identity, None)
        self.model.fence_node(name)  # the notifier forgets it, its pins go
        self.segments.forget_node(name)
        run = self._holder
        if run is not None and name in run.waiting:
            del run.waiting[name]
            run.outcomes[name] = None
            if not run.waiting:
                self._cancel_timer(run.timer)
                self._ready.append(("run", run))
        for wait in list(self._commands.values()):
            # its relayed commands end now (a fenced node's answers would be
            # refused anyway), except inject/heal/status, which reach it still
            if wait.identity == session.identity and not wait.control:
                self._command_done(wait, CommandResult(
                    ref=0, ok=False, errno=Errno.EINTR.value, error=f"{name} fenced: {reason}"), None)
        self.publish("fenced", node=name, epoch=session.epoch, reason=reason)
        self._send(session.identity, Fenced(epoch=session.epoch, reason=reason))

    def _duplicate(self, identity: bytes, msg_id: int) -> Message | bool:
        """Remember request ``msg_id`` of this connection.  False if it is
        new; else its reply (True while there is none yet, or none kept)."""
        answers = self._replies.get(identity)
        if answers is None:
            answers = self._replies[identity] = _Answers()
            while len(self._replies) > _REPLY_CONNECTIONS:
                self._replies.popitem(last=False)
        seen = answers.seen
        if msg_id in seen:
            self.counters["duplicates"] += 1
            reply = seen[msg_id]
            return reply if isinstance(reply, Message) else True
        seen[msg_id] = None
        while len(seen) > _REPLY_CACHE:
            seen.popitem(last=False)
        return False

    def _send(self, identity: bytes, msg: Message) -> None:
        answers = self._replies.get(identity)
        if answers is not None:
            ref = getattr(msg, "ref", None)
            if isinstance(ref, int) and ref in answers.seen and answers.seen[ref] is None:
                answers.keep(ref, msg)  # what a duplicate of that request gets
        self._outbox.append(SendNode(identity, msg))

    # ============================================================ node requests

    def _answer(self, name: str, msg: Message) -> Message:
        """The reply to Subscribe, Unpin or an XPMEM request from node ``name``;
        an Error reply for anything else.  Never raises KernelError.

        =================  ============================  ===============================
        request            answer                        errors (``Error.code``)
        =================  ============================  ===============================
        Subscribe          Ok                            ESRCH (no mm), EINTR (exiting)
        Unpin              Ok                            EINVAL (not pinned by it)
        XpmemMake/Get/Rel  XpmemReply                    ENOENT, EACCES, ESRCH, EINVAL
        =================  ============================  ===============================
        """
        model = self.model
        try:
            if isinstance(msg, Subscribe):
                model.check_mm(msg.mm)
                if not self.may_reach(name, msg.mm):
                    raise KernelError(Errno.EACCES, self._refused(name, msg.mm, "subscribe"))
                self.notifier.register(name, msg.mm)
                return Ok(ref=msg.id)
            if isinstance(msg, Unpin):
                model.unpin(name, msg.mm, msg.pfns)
                return Ok(ref=msg.id)
            if isinstance(msg, XpmemMake):
                model.check_mm(msg.mm)
                if not self.grants.may(name, msg.mm):  # a node exports only memory it was given
                    raise KernelError(Errno.EACCES, self._refused(name, msg.mm, "xpmem make"))
                seg = self.segments.make(name, msg.mm, msg.addr, msg.length, msg.mode)
                return XpmemReply(ref=msg.id, value=seg.segid, mm=seg.mm, addr=seg.addr, length=seg.length)
            if isinstance(msg, XpmemGet):
                permit, seg = self.segments.get(name, msg.segid, msg.write)
                return XpmemReply(
                    ref=msg.id, value=permit.apid, mm=seg.mm, addr=seg.addr, length=seg.length, write=permit.write
                )
            if isinstance(msg, XpmemRelease):
                self.segments.release(name, msg.apid)
                return XpmemReply(ref=msg.id)
        except KernelError as exc:
            return Error(ref=getattr(msg, "id", 0), code=exc.errno.value, message=exc.message)
        return Error(ref=getattr(msg, "id", 0), code="bad_message", message=f"{msg.TYPE} is not for the host")

    def _xpmem_remove_task(self, session: Session, msg: XpmemRemove) -> Task[None]:
        """``xpmem_remove_seg``: the segment and its permits go at once (no
        new pin), then every importer gets ``XpmemRemoved`` under the lock
        and the reply waits for their acks (``xpmem_clear_PTEs`` zaps and
        unpins every attachment before remove returns).  An importer that
        misses the ack deadline is fenced, which drops its pins too."""
        try:
            gone = self.segments.remove(session.name, msg.segid)
        except KernelError as exc:
            self._send(session.identity, Error(ref=msg.id, code=exc.errno.value, message=exc.message))
            return
        importers = sorted({p.node for p in gone})
        if importers:
            yield Locked(self._xpmem_clear(importers, msg.segid))
        if self._still(session):
            self._send(session.identity, XpmemReply(ref=msg.id))

    def _xpmem_clear(self, importers: list[str], segid: int) -> Op[None]:
        msg = XpmemRemoved(id=self.notifier.new_id(), segid=segid)
        self.segments.zap_sent(segid, msg.id)  # each importer's permits retire with its ack
        try:
            yield Deliver(tuple((node, msg) for node in importers))
        finally:
            self.segments.retired(segid=segid)

    def _dma(self, name: str, msg: DmaRead | DmaWrite, kind: str = "") -> DmaReply:
        """A node's access through its translation, checked by the oracle
        (``DmaReply.errno`` is ESTALE when refused; the model counts it).
        Never takes the lock.  Before the oracle: an access to an mm the node
        may not reach is refused (EACCES, ``refused_accesses``), and one
        naming a frame never handed to it is a forgery (EACCES,
        ``forged_accesses``); neither is a stale access.

        An xpmem node reaches memory only through its attachments: an access
        of a frame it was handed must go through a permit of its own on a
        segment covering the address, read-write for a write
        (:meth:`broker.xpmem.Segments.covers`); through a removed, revoked
        or released one, outside the segment, or a write through a read-only
        permit, it is a stale access."""
        write = not isinstance(msg, DmaRead)
        through_permit = kind == "xpmem" and self._was_handed(name, msg.pfn)
        if through_permit and not self.segments.covers(name, msg.mm, msg.addr, write):
            exc = self.model.stale_access(name, msg.mm, msg.addr, msg.pfn, write, "no permit of it covers the page")
            self.publish("stale_access", node=name, mm=msg.mm, addr=msg.addr, pfn=msg.pfn)
            return DmaReply(ref=msg.id, errno=exc.errno.value)
        if not through_permit and not self.may_reach(name, msg.mm, write):
            self._refused(name, msg.mm, "dma")
            return DmaReply(ref=msg.id, errno=Errno.EACCES.value)
        if not through_permit and not self._was_handed(name, msg.pfn):
            self.counters["forged_accesses"] += 1
            self.publish("forged_access", node=name, mm=msg.mm, addr=msg.addr, pfn=msg.pfn)
            return DmaReply(ref=msg.id, errno=Errno.EACCES.value)
        try:
            if isinstance(msg, DmaRead):
                data = self.model.dma_read(name, msg.mm, msg.addr, msg.pfn, msg.offset, msg.length)
                return DmaReply(ref=msg.id, data=bytes(data))
            self.model.dma_write(name, msg.mm, msg.addr, msg.pfn, msg.offset, msg.data)
            return DmaReply(ref=msg.id)
        except KernelError as exc:
            if exc.errno is Errno.ESTALE:
                self.publish("stale_access", node=name, mm=msg.mm, addr=msg.addr, pfn=msg.pfn)
            return DmaReply(ref=msg.id, errno=exc.errno.value)

    def _gup_fast(self, name: str, kind: str, msg: Gup) -> Message | None:
        """The permit checks, then GUP-fast (never takes the lock).

        Returns:
            The reply (a GupReply, or an Error for a missing permit), or None:
            take the slow path under the lock.
        """
        end = msg.addr + msg.npages * self.config.page_size
        if msg.pin and not self.segments.may_pin(name, msg.mm, msg.addr, end, msg.write):
            return Error(ref=msg.id, code=Errno.EACCES.value, message="no xpmem permit covers this")
        if kind == "xpmem" and not msg.pin:
            return Error(ref=msg.id, code=Errno.EACCES.value, message="xpmem maps through permits")
        try:
            pages = self.model.gup_fast(msg.mm, msg.addr, msg.npages, msg.write, pin=msg.pin, node=name)
        except KernelError as exc:
            return GupReply(ref=msg.id, mm=msg.mm, pages=[], errno=exc.errno.value)
        if pages is None:
            return None
        self.counters["gup_fast"] += 1
        self._hand(name, pages)
        return GupReply(ref=msg.id, mm=msg.mm, pages=page_triples(pages))

    def _xpmem_pin_write(self, name: str, msg: Gup) -> Gup:
        """``xpmem_pin_page``: FOLL_WRITE follows the source vma, not the
        access: a read fault through a read-write permit pins writable (the
        COW break happens now) where the exporter's vma is writable, and
        read-only where it is not (after the owner's mprotect), so reads go on
        working and only writes fail (EPERM from GUP)."""
        if not msg.pin or msg.write:
            return msg
        try:
            vma = self.model.check_mm(msg.mm).find_vma(msg.addr)
        except KernelError:
            return msg  # the GUP itself reports it
        end = msg.addr + msg.npages * self.config.page_size
        if vma is None or vma.prot is not Prot.RW or not self.segments.may_pin(name, msg.mm, msg.addr, end, True):
            return msg
        return replace(msg, write=True)

    def _gup_slow(self, name: str, msg: Gup) -> Op[GupReply]:
        """``get_user_pages`` with faults: an operation for the lock.  The
        grant and the subscription are checked again now that it holds the
        lock: a revoke or an unsubscribe that ran first wins."""
        if not self.may_reach(name, msg.mm, msg.write) or name not in self.notifier.subscriptions.get(msg.mm, ()):
            return GupReply(ref=msg.id, mm=msg.mm, pages=[], errno=Errno.EACCES.value)
        try:
            pages = yield from self.model.gup(msg.mm, msg.addr, msg.npages, msg.write, pin=msg.pin, node=name)
        except KernelError as exc:
            return GupReply(ref=msg.id, mm=msg.mm, pages=[], errno=exc.errno.value)
        self._hand(name, pages)
        return GupReply(ref=msg.id, mm=msg.mm, pages=page_triples(pages))

    # -- grants (broker/grants.py) ---------------------------------------------------

    def may_reach(self, name: str, mm: int, write: bool = False) -> bool:
        """May node ``name`` reach ``mm``: an operator granted it, or it holds
        an XPMEM permit on a segment of it."""
        return self.grants.may(name, mm, write) or self.segments.reaches(name, mm, write)

    def _refused(self, name: str, mm: int, what: str) -> str:
        self.counters["refused_accesses"] += 1
        self.publish("refused_access", node=name, mm=mm, what=what)
        return f"{name} was not granted mm {mm} ({what})"

    def _hand(self, name: str, pages: Collection[tuple[int, int, bool]]) -> None:
        """Record the frames a reply hands to ``name``."""
        handed = self._handed.get(name)
        if handed is None:
            handed = self._handed[name] = bytearray((self.model.memory.nframes + 7) // 8)
        for _addr, pfn, _w in pages:
            handed[pfn >> 3] |= 1 << (pfn & 7)

    def _was_handed(self, name: str, pfn: int) -> bool:
        handed = self._handed.get(name)
        return handed is not None and 0 <= pfn < len(handed) * 8 and bool(handed[pfn >> 3] & (1 << (pfn & 7)))

    def _still(self, session: Session) -> bool:
        """``session`` is still the node's live session (not fenced, not replaced)."""
        return session.state is _LIVE and self.sessions.by_name.get(session.name) is session

    def _gup_slow_task(self, session: Session, msg: Gup) -> Task[None]:
        self.counters["gup_slow"] += 1
        reply = yield Locked(self._gup_slow(session.name, msg))
        if not self._still(session):
            # fenced meanwhile: the fence dropped its pins, drop the ones this reply took too
            if msg.pin and reply.pages:
                self.model.unpin(session.name, msg.mm, [p[1] for p in reply.pages])
            return
        self._send(session.identity, reply)

    def _unsubscribe_task(self, session: Session, msg: Unsubscribe) -> Task[None]:
        # mmu_notifier_unregister: ->release, then nothing more; it waits for
        # the callbacks in flight, here for the operation holding the lock.
        yield Locked(self.notifier.unregister(session.name, msg.mm))
        self._send(session.identity, Ok(ref=msg.id))

    def _ksmd(self) -> Task[None]:
        """ksmd: scan while ``run`` == 1, sleep ``sleep_millisecs`` between
        batches.  A failing scan is counted and ksmd goes on, as the kernel's
        ignores its merge failures."""
        ksm = self.model.ksm
        while True:
            if ksm.run != 1:
                yield WaitKsm()
                continue
            try:
                yield Locked(ksm.scan())
            except KernelError as exc:
                self.counters["ksmd_errors"] += 1
                logger.info("ksmd: %s", exc)
            except Exception:  # a bug must not take the host down
                self.counters["ksmd_errors"] += 1
                logger.exception("ksmd scan failed")
            yield Sleep(max(ksm.sleep_millisecs, 1) / 1000)

    # ================================================================= admin

    def _admin(self, client: Any, ref: int, command: str, args: dict[str, Any]) -> None:
        self.counters["admin_requests"] += 1
        handler = ADMIN_HANDLERS[command]
        askers = [(client, ref)]
        if command == "status":
            # The most expensive call, and read-only: requests that arrive
            # while one with the same arguments is being answered share its
            # answer, so a flood of them costs one round of node status
            # commands, not one per request, and cannot starve other clients.
            # Only while no other admin request completed since it began: a
            # client that saw its own spawn answered sees it in its status.
            same = (self._admin_completed, *sorted(args.items()))
            waiting = self._status_askers.get(same)
            if waiting is not None:
                self.counters["status_coalesced"] += 1
                waiting.append((client, ref))
                return
            self._status_askers[same] = askers

        def done(value: Any, error: BaseException | None) -> None:
            if command == "status":
                self._status_askers.pop(same, None)
            else:
                self._admin_completed += 1
            for asker, asked in askers:
                if error is None:
                    reply = AdminReply(ref=asked, ok=True, result=value or {})
                elif isinstance(error, KernelError):
                    reply = AdminReply(ref=asked, ok=False, errno=error.errno.value, error=error.message)
                else:
                    reply = AdminReply(ref=asked, ok=False, errno="EIO", error=f"internal error: {error!r}")
                self._outbox.append(ReplyAdmin(asker, reply))

        self._spawn(handler(self, **args), f"admin {command}", done)

    # ============================================================== executor

    def _settle(self) -> list[Action]:
        if self.eager and not self._running:
            self._run_all()
        return self._drain()

    def _drain(self) -> list[Action]:
        out, self._outbox = self._outbox, []
        return out

    def _run_all(self) -> None:
        self._running = True
        try:
            while self._ready:
                self._run_ready_item(self._ready.popleft())
        finally:
            self._running = False

    def _run_ready_item(self, item: tuple[Any, ...]) -> None:
        if item[0] == "run":
            handle = item[1].task.handle
            if handle in self._held:
                self._parked[handle] = item
                return
            self._step_run(item[1])
        else:
            _, task, value, error = item
            self._step_task(task, value, error)

    def _step_task(self, task: _Task, value: Any, error: BaseException | None) -> None:
        try:
            effect = task.gen.throw(error) if error is not None else task.gen.send(value)
        except StopIteration as stop:
            self._task_done(task, stop.value, None)
            return
        except KernelError as exc:
            self._task_done(task, None, exc)
            return
        except Exception as exc:  # a bug in a task must not take the host down
            logger.exception("host task %s failed", task.handle.name)
            self.counters["task_errors"] += 1
            self._task_done(task, None, exc)
            return
        task.handle.state = _WAITING
        if isinstance(effect, Locked):
            self._lock_queue.append((task, effect.op))
            self._grant()
        elif isinstance(effect, Relay):
            self._relay(task, (effect.node,), effect.command, effect.args, effect.timeout_ms,
                        effect.fenced_too, single=True)
        elif isinstance(effect, RelayAll):
            self._relay(task, effect.nodes, effect.command, effect.args, effect.timeout_ms, False, single=False)
        elif isinstance(effect, Sleep):
            self._timer(self.now + effect.seconds, _SLEEP, task)
        elif isinstance(effect, WaitKsm):
            self._ksm_waiters.append(task)
        else:
            self._ready.append(("task", task, None, TypeError(f"a host task yielded {effect!r}")))

    def _task_done(self, task: _Task, value: Any, error: BaseException | None) -> None:
        self._tasks.discard(task)
        handle = task.handle
        handle.state, handle.value, handle.error = _DONE, value, error
        if task.on_done is not None:
            task.on_done(value, error)

    def _resume(self, task: _Task, value: Any = None, error: BaseException | None = None) -> None:
        task.handle.state = _READY
        self._ready.append(("task", task, value, error))

    # -- the lock and the operation holding it ------------------------------------------

    def _grant(self) -> None:
        if self._holder is None and self._lock_queue:
            task, op = self._lock_queue.popleft()
            self._holder = _Run(task, op)
            self._ready.append(("run", self._holder))

    def _step_run(self, run: _Run) -> None:
        """Resume the operation holding the lock with its outcomes, and issue
        what it yields next (or hand its result to its task)."""
        try:
            if run.started:
                outcomes, run.outcomes = run.outcomes, {}
                effect = run.op.send(outcomes)
            else:
                run.started = True
                effect = next(run.op)
        except StopIteration as stop:
            self._release(run, stop.value, None)
            return
        except KernelError as exc:
            self._release(run, None, exc)
            return
        except Exception as exc:
            logger.exception("host operation failed")
            self.counters["task_errors"] += 1
            self._release(run, None, exc)
            return
        self._issue(run, effect)

    def _release(self, run: _Run, value: Any, error: BaseException | None) -> None:
        self._holder = None
        self._resume(run.task, value, error)
        self._grant()

    def _issue(self, run: _Run, effect: Deliver) -> None:
        """Send a Deliver's messages; wait for the acks it expects (under the
        ack deadline), or resume at once when it expects none."""
        run.task.handle.delivers += 1
        outcomes: Outcomes = {}
        run.outcomes = outcomes
        waiting = run.waiting
        expect_ack = effect.expect_ack
        by_name = self.sessions.by_name
        for node, msg in effect.sends:
            outcomes[node] = None  # until its ack, if it is to come
            session = by_name.get(node)
            if session is None or session.state is not _LIVE:
                continue
            if expect_ack:
                waiting[node] = msg.id  # type: ignore[attr-defined]  # every callback carries an id
            if self.listening:
                self.publish(msg.TYPE, node=node, **_fields(msg))
            if type(msg) is ChangePte:  # the node may map the new frame now
                self._hand(node, ((msg.addr, msg.pfn, msg.writable),))
            self._send(session.identity, msg)
        if waiting:
            run.timer = self._timer(self.now + self.config.ack_deadline_ms / 1000, _ACK, run)
        else:
            self._ready.append(("run", run))

    def _on_ack(self, name: str, msg: Ack) -> None:
        if self.segments.retiring:
            self.segments.acked(name, msg.ref)  # an XpmemRemoved's: its permits are gone now
        run = self._holder
        waiting = run.waiting if run is not None else None
        late = waiting is None or waiting.get(name) != msg.ref
        if self.listening:
            self.publish("ack", node=name, ref=msg.ref, status=msg.status, late=late)
        if late:
            self.counters["acks_late"] += 1  # late, or a duplicate: harmless
            return
        assert run is not None and waiting is not None
        del waiting[name]
        run.outcomes[name] = msg
        if not waiting:
            self._cancel_timer(run.timer)
            # The operation resumes from here: in eager mode before this event
            # returns, so the end it sends next leaves in the same pass.
            self._ready.append(("run", run))

    def _ack_deadline(self, run: _Run) -> None:
        if run is not self._holder or not run.waiting:
            return
        late, run.waiting = run.waiting, {}
        self._ready.append(("run", run))  # their outcomes stay None
        for name, msg_id in late.items():
            session = self.sessions.by_name.get(name)
            if session is not None and session.state == SessionState.LIVE:
                self.counters["fenced_ack_deadline"] += 1
                self._fence(name, f"no ack for {msg_id} within {self.config.ack_deadline_ms} ms")

    # -- relayed commands ------------------------------------------------------------------

    def _relay(self, task: _Task, nodes: tuple[str, ...], command: str, args: dict[str, Any],
               timeout_ms: int | None, fenced_too: bool, *, single: bool) -> None:
        gather = _Gather(task, 0, dict.fromkeys(nodes), nodes[0] if single else None)
        timeout = (timeout_ms or self.config.command_timeout_ms) / 1000
        for node in nodes:
            session = self.sessions.by_name.get(node)
            if session is None or (session.state is not _LIVE and not fenced_too):
                if single:
                    self._resume(task, None, KernelError(Errno.ESRCH, f"no live node {node!r}"))
                    return
                continue
            cmd = Command(id=next(self._ids), command=command, args=args)
            wait = _CommandWait(cmd.id, gather, node, session.identity, fenced_too)
            wait.timer = self._timer(self.now + timeout, _COMMAND, wait)
            self._commands[cmd.id] = wait
            gather.pending += 1
            self._send(session.identity, cmd)
        if not gather.pending:
            self._resume(task, gather.results)

    def _command_done(self, wait: _CommandWait, result: CommandResult | None, error: KernelError | None) -> None:
        if self._commands.get(wait.ref) is not wait:
            return  # answered already
        del self._commands[wait.ref]
        self._cancel_timer(wait.timer)
        gather = wait.gather
        gather.results[wait.node] = result
        gather.pending -= 1
        if gather.single is not None:
            if error is not None:
                self._resume(gather.task, None, error)
            else:
                self._resume(gather.task, result)
        elif gather.pending == 0:
            self._resume(gather.task, gather.results)

    # -- timers ----------------------------------------------------------------------------

    # A cancelled timer leaves the live set at once and the heap lazily: at
    # the top (tick, next_deadline), or in one sweep once the cancelled make
    # up more than half of a heap past _TIMER_SWEEP_MIN entries (asyncio's
    # base_events does the same).  Every relayed command and every start
    # pushes a deadline that is nearly always cancelled, long before it is
    # due (a command's 10 s): without the sweep they pile up by the
    # thousand, each push costing more.

    def _timer(self, when: float, kind: str, target: Any) -> int:
        tid = next(self._timer_ids)
        self._live_timers.add(tid)
        heapq.heappush(self._timers, (when, tid, kind, target))
        return tid

    def _cancel_timer(self, tid: int) -> None:
        live = self._live_timers
        if tid not in live:
            return
        live.remove(tid)
        timers = self._timers
        if len(timers) > _TIMER_SWEEP_MIN and 2 * len(live) < len(timers):
            self._timers = [entry for entry in timers if entry[1] in live]
            heapq.heapify(self._timers)

    @property
    def timer_entries(self) -> int:
        """Timers held: the live ones and the cancelled ones not yet swept
        (fewer than twice the live ones, or _TIMER_SWEEP_MIN)."""
        return len(self._timers)

    def _fire(self, kind: str, target: Any) -> None:
        if kind == _ACK:
            self._ack_deadline(target)
        elif kind == _COMMAND:
            self._command_done(target, None, KernelError(
                Errno.ETIMEDOUT, f"node {target.node!r} did not answer in time"))
        elif kind == _SLEEP:
            self._resume(target)
        elif kind == _HEARTBEAT:
            self._heartbeat()

    def _heartbeat(self) -> None:
        cfg = self.config
        period = cfg.heartbeat_ms / 1000
        now = self.now
        for session in self.sessions.silent(now, period * cfg.liveness):
            self.counters["fenced_heartbeat"] += 1
            self._fence(session.name, f"silent for {now - session.last_seen:.1f}s")
        for session in self.sessions.live():
            self._send(session.identity,
                       Heartbeat(id=next(self._ids), epoch=session.epoch, incarnation=cfg.incarnation))
        self._timer(now + period, _HEARTBEAT, None)


#: A live session's message -> how the core handles it (after the epoch check
#: and the duplicate cache); any other type is answered by ``_answer``:
#: Subscribe, Unpin and the XPMEM requests, or a typed refusal.
_NODE_ROUTES: dict[type[Message], Callable[[HostCore, Session, Any], None]] = {
    Ack: HostCore._route_ack,
    Heartbeat: HostCore._route_heartbeat,
    DmaRead: HostCore._route_dma,
    DmaWrite: HostCore._route_dma,
    Gup: HostCore._route_gup,
    Unsubscribe: HostCore._route_unsubscribe,
    XpmemRemove: HostCore._route_xpmem_remove,
    **{kind: HostCore._route_hmm for kind in hmm.HMM_REQUESTS},
}


def _fields(msg: Message) -> dict[str, Any]:
    out = {}
    for name in ("id", "mm", "start", "end", "addr", "pfn", "event", "start_id"):
        value = getattr(msg, name, None)
        if value is not None:
            out[name] = value
    return out


__all__ = ["Action", "admin_result", "CoreConfig", "HostCore", "Publish", "ReplyAdmin", "SendNode", "TaskHandle", "TaskState",
           "page_triples"]
