"""The whole system in one process: the host's real core, no sockets, no clock.

:class:`LocalCluster` is a queue pump around :class:`broker.core.HostCore` --
the very object ``mmn host`` runs -- and named secondary MMUs (``node.kvm`` /
``node.gru`` / ``node.xpmem``, the very classes the networked nodes run).  It
plays only the parts the core leaves to its shell: the node connections and
the clock.

* each node has two ordered FIFO queues, host→node and node→host, like its one
  DEALER connection; a (re)registration opens a new connection (identity);
* the core's actions go into the queues; a node→host message is handed to the
  core as the host's node loop hands it a frame;
* time is virtual: when nothing can move and the core has a deadline (an ack
  not coming from a held node), the clock jumps to it and the core ticks, so
  the core fences exactly as the service does at its ack deadline;
* the core runs deferred (``eager=False``): every continuation it makes ready
  (an operation resumed after its acks, after an end, a slow GUP granted the
  lock) is one more step the pump schedules among the queues.  With ``seed``
  a seeded random generator picks the next step, so a property test explores
  node traffic at every yield of every operation, reproducibly.

The stepping API (:meth:`begin` / :meth:`finish`) holds an operation open
after its first Deliver, so a test can let faults and accesses race an
invalidation::

    handle = c.begin(c.model.munmap(mm, addr, length))   # start queued, lock held
    token = c.submit_fault("kvm", mm, addr)              # node sends Gup
    c.pump()                                             # start acked; slow GUP waits
    c.finish(handle)                                     # end; the fault retries
    c.result("kvm", token)

Frame safety is checked where it matters: every frame the model frees is
checked against every live node's translations (none may point at it), and
:meth:`check` asserts, at quiescence, that no node has an invalidation in
progress when the host has none open.

Run ``python -m mmnotify.local`` for a demonstration scenario.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.core import CoreConfig, HostCore, Publish, ReplyAdmin, SendNode, TaskHandle, admin_result
from broker.effects import Op
from node.base import Completion, Output, SecondaryMMU
from node.commands import start_command
from node.kinds import node_class
from protocol.messages import AdminReply, Command, CommandResult, Message, Registered
from protocol.types import KernelError

logger = logging.getLogger(__name__)

#: Host incarnation id the in-process nodes see.
INCARNATION = "local"
#: The in-process nodes' own incarnation (they never restart as processes).
NODE_INCARNATION = "local-node"


class Stuck(RuntimeError):
    """A node command cannot complete now: no message can move.

    Typically a fault parked behind an invalidation held open by
    :meth:`LocalCluster.begin`, or a command on a held node.  ``token`` names
    the command; :meth:`LocalCluster.result` finds its Completion later.
    """

    def __init__(self, node: str, token: int) -> None:
        self.node = node
        self.token = token
        super().__init__(f"command {token} of node {node!r} cannot progress")


@dataclass(eq=False)
class Port:
    """One node and its connection to the host.

    ``to_node`` / ``to_host`` are the two directions of the node's DEALER
    connection, each FIFO.  ``held``: the node has hung (it stops reading
    ``to_node``; what it already sent still arrives).  ``identity``: the
    connection's routing id (new at each registration).
    """

    name: str
    node: SecondaryMMU
    identity: bytes = b""
    held: bool = False
    #: the host receives each of the node's next ``duplicate`` messages twice
    duplicate: int = 0
    to_node: deque[Message] = field(default_factory=deque)
    to_host: deque[Message] = field(default_factory=deque)
    completions: dict[int, Completion] = field(default_factory=dict)
    #: token of a command the host relayed -> the Command's id (its result goes to the host)
    relayed: dict[int, int] = field(default_factory=dict)
    cluster: Any = None

    @property
    def kind(self) -> str:
        return self.node.kind

    @property
    def session(self) -> Any:
        session = self.cluster.core.sessions.by_name.get(self.name)
        return session if session is not None and session.identity == self.identity else None

    @property
    def state(self) -> str:
        """``live`` or ``fenced``, as the core's session says."""
        session = self.session
        return session.state if session is not None else "fenced"

    @property
    def epoch(self) -> int:
        session = self.session
        return session.epoch if session is not None else 0


@dataclass(eq=False)
class Handle:
    """A host operation begun by :meth:`LocalCluster.begin`, holding the lock."""

    task: TaskHandle

    @property
    def done(self) -> bool:
        return self.task.done


class LocalCluster:
    """A host core and its nodes in one process (see the module docstring).

    Args:
        frames: physical page frames of the model (the zero frame included).
        page_size: bytes per page.
        swap_slots: slots of the (temporary) swap file.
        wrap_change_pte: the 3.7–6.9 mode (change_pte wrapped in start/end).
        nodes: ``{name: kind}`` or a list of kinds (named ``kvm``, ``gru``,
            ``xpmem``, then ``kvm2``...) to register at once.
        seed: None for a fixed service order; an int for a seeded random
            order of every step (reproducible interleavings).
        model: a ready :class:`broker.mm.Model` (the others are then ignored).
        ack_deadline_ms: the core's ack deadline, on the virtual clock.
        check_frees: assert at every frame free that no live node maps the
            frame (off only to watch the oracle catch a broken node later).
    Concurrency:
        Synchronous and single-threaded.  Not reentrant from node code.
    """

    def __init__(
        self,
        *,
        frames: int = 1024,
        page_size: int = 4096,
        swap_slots: int = 1024,
        wrap_change_pte: bool = False,
        nodes: dict[str, str] | list[str] | tuple[str, ...] = (),
        seed: int | None = None,
        model: Any | None = None,
        ack_deadline_ms: int = 2000,
        check_frees: bool = True,
    ) -> None:
        if model is None:
            from broker.mm import Model

            model = Model(
                frames=frames,
                page_size=page_size,
                swap_path=None,
                swap_slots=swap_slots,
                wrap_change_pte=wrap_change_pte,
            )
        self.model = model
        self.notifier = model.notifier
        self.page_size = model.page_size
        # heartbeat_ms 0: in-process nodes have no clock to heartbeat with.
        self.core = HostCore(model, CoreConfig(
            incarnation=INCARNATION,
            page_size=self.page_size,
            heartbeat_ms=0,
            ack_deadline_ms=ack_deadline_ms,
            wrap_change_pte=model.wrap_change_pte,
        ), eager=False)
        self.segments = self.core.segments
        self.now = 0.0
        self.ports: dict[str, Port] = {}
        self._by_identity: dict[bytes, Port] = {}
        self._connections = itertools.count(1)
        self._admin_ids = itertools.count(1)
        self._admin_replies: dict[int, AdminReply] = {}
        self._held_op: TaskHandle | None = None
        self._random = random.Random(seed) if seed is not None else None
        self.pump_counters: dict[str, int] = {"messages_to_nodes": 0, "messages_to_host": 0}
        #: hand-driven connections (:meth:`connect_raw`): identity -> what the host sent them
        self.raw: dict[bytes, deque[Message]] = {}
        if check_frees:
            model.memory.on_free = self._on_free
        if isinstance(nodes, dict):
            for name, kind in nodes.items():
                self.add_node(kind, name)
        else:
            for kind in nodes:
                self.add_node(kind)

    @property
    def counters(self) -> dict[str, int]:
        """The core's counters and the pump's message counts."""
        return {**self.core.counters, **self.pump_counters}

    # ------------------------------------------------------------------ nodes

    def add_node(self, kind: str | None = None, name: str | None = None, *, node: SecondaryMMU | None = None) -> str:
        """Create a node of ``kind`` (or take ``node``) and register it.

        Returns:
            The node's name (``kind``, ``kind2``, ... when not given).
        """
        if node is None:
            if kind is None:
                raise ValueError("give a kind or a node")
            if name is None:
                name = next(
                    n for n in (kind if i == 1 else f"{kind}{i}" for i in itertools.count(1)) if n not in self.ports
                )
            node = node_class(kind)(name, page_size=self.page_size)
        name = node.name
        if name in self.ports:
            raise ValueError(f"node {name!r} exists")
        self.ports[name] = Port(name, node, cluster=self)
        self.register(name)
        return name

    def register(self, name: str) -> int:
        """(Re)register node ``name`` on a new connection: its ``Register``
        goes to the core as the host's node loop would hand it over (a
        still-live previous session is fenced there first); the node reads
        its ``Registered`` (it drops everything it had).  Messages of the old
        connection still queued are gone with it.

        Returns:
            The new epoch.
        """
        port = self.ports[name]
        self._by_identity.pop(port.identity, None)
        port.to_node.clear()
        port.to_host.clear()
        port.held = False
        port.identity = f"{name}#{next(self._connections)}".encode()
        self._by_identity[port.identity] = port
        self._route(self.core.receive_node(port.identity, port.node.make_register(NODE_INCARNATION), None, self.now))
        while port.to_node:
            msg = port.to_node.popleft()
            self._node_receive(port, msg)
            if isinstance(msg, Registered):
                break
        return port.epoch

    def node(self, name: str) -> SecondaryMMU:
        """The secondary MMU object of node ``name``."""
        return self.ports[name].node

    def fence(self, name: str, reason: str = "fenced") -> None:
        """Fence ``name`` in the core (subscriptions, pins and permits
        dropped, acks awaited from it answered None, ``Fenced`` queued to it:
        it drops every translation when it reads it)."""
        self._route(self.core.fence(name, reason, self.now))

    def hold(self, name: str) -> None:
        """The node hangs: it stops reading the host's messages."""
        self.ports[name].held = True

    def heal(self, name: str) -> None:
        """Undo :meth:`hold` and :meth:`duplicate`: the node reads its backlog
        (at the next pump)."""
        self.ports[name].held = False
        self.ports[name].duplicate = 0

    def duplicate(self, name: str, count: int = 1 << 30) -> None:
        """The host receives each of the node's next ``count`` messages twice."""
        self.ports[name].duplicate = count

    # ------------------------------------------------------------ transport

    def _route(self, actions: list[Any]) -> None:
        for action in actions:
            if type(action) is SendNode:
                port = self._by_identity.get(action.identity)
                if port is not None:
                    self.pump_counters["messages_to_nodes"] += 1
                    port.to_node.append(action.msg)
                elif action.identity in self.raw:
                    self.raw[action.identity].append(action.msg)
                # else: that connection is gone
            elif type(action) is ReplyAdmin:
                self._admin_replies[action.reply.ref] = action.reply
            elif type(action) is Publish:
                pass

    def _emit(self, port: Port, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Completion):
                ref = port.relayed.pop(out.token, None)
                if ref is None:
                    port.completions[out.token] = out
                elif out.error is not None:
                    port.to_host.append(CommandResult(ref=ref, ok=False, errno=out.error.errno.value,
                                                      error=out.error.message))
                else:
                    port.to_host.append(CommandResult(ref=ref, ok=True, result=out.result or {}))
            else:
                self.pump_counters["messages_to_host"] += 1
                port.to_host.append(out)

    def _ready(self) -> list[tuple[str, Port | None]]:
        ready: list[tuple[str, Port | None]] = []
        for port in self.ports.values():
            if port.to_node and not port.held:
                ready.append(("node", port))
        for port in self.ports.values():
            if port.to_host:
                ready.append(("host", port))
        if self.core.has_ready:
            ready.append(("core", None))
        return ready

    def step(self) -> bool:
        """Move one message, or run one continuation of the core.

        Returns:
            False when nothing can move.
        """
        ready = self._ready()
        if not ready:
            return False
        side, port = ready[0] if self._random is None else self._random.choice(ready)
        if side == "node":
            self.step_node(port.name)  # type: ignore[union-attr]
        elif side == "host":
            self.step_host(port.name)  # type: ignore[union-attr]
        else:
            self.core.run_one()
            self._route(self.core.drain())
        return True

    def step_node(self, name: str) -> bool:
        """Node ``name`` reads one message from the host (even if held)."""
        port = self.ports[name]
        if not port.to_node:
            return False
        msg = port.to_node.popleft()
        self._node_receive(port, msg)
        return True

    def _node_receive(self, port: Port, msg: Message) -> None:
        """Node ``port`` reads ``msg``: a relayed admin command runs as
        ``mmn node`` runs it (``node.commands``), its result going back to the
        host; anything else goes to the kind."""
        if not isinstance(msg, Command):
            self._emit(port, port.node.receive(msg))
            return
        try:
            token, outputs = start_command(port.node, msg.command, dict(msg.args))
        except KernelError as exc:
            port.to_host.append(CommandResult(ref=msg.id, ok=False, errno=exc.errno.value, error=exc.message))
            return
        except (KeyError, TypeError, ValueError) as exc:
            port.to_host.append(CommandResult(ref=msg.id, ok=False, errno="EINVAL", error=f"bad arguments: {exc}"))
            return
        if token is None:
            port.to_host.append(CommandResult(ref=msg.id, ok=True, result=outputs))
            return
        port.relayed[token] = msg.id
        self._emit(port, outputs)

    def step_host(self, name: str) -> bool:
        """The host core handles one message from node ``name``."""
        port = self.ports[name]
        if not port.to_host:
            return False
        msg = port.to_host.popleft()
        self._route(self.core.receive_node(port.identity, msg, None, self.now))
        if port.duplicate > 0:  # the same frame again, right behind (``mmn inject duplicate``)
            port.duplicate -= 1
            self._route(self.core.receive_node(port.identity, msg, None, self.now))
        return True

    def _advance(self) -> bool:
        """Nothing can move: jump the clock to the core's next deadline and
        tick (a node that cannot answer is fenced there, as at the service's
        ack deadline).  Not while :meth:`begin` holds an operation open."""
        if self._held_op is not None:
            return False
        deadline = self.core.next_deadline()
        if deadline is None:
            return False
        self.now = max(self.now, deadline)
        self._route(self.core.tick(self.now))
        return True

    def pump(self) -> None:
        """Move messages and run the core until nothing can move, letting the
        clock reach the core's deadlines when that is all that is left."""
        while self.step() or self._advance():
            pass

    # ------------------------------------------------------ driving operations

    def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            if not (self.step() or self._advance()):
                raise RuntimeError("the in-process host cannot progress (an operation held open?)")

    def run(self, op: Op[Any]) -> Any:
        """Run a host operation to completion under the core's mm lock, then pump.

        Returns:
            What the operation returns.
        Raises:
            Whatever it raises (``KernelError``...), after pumping.
            RuntimeError if an operation begun with :meth:`begin` is open.
        """
        if self._held_op is not None:
            raise RuntimeError("a host operation already holds the lock")
        handle = self.core.submit(op)
        try:
            self._until(lambda: handle.done)
        finally:
            self.pump()
        if handle.error is not None:
            raise handle.error
        return handle.value

    def begin(self, op: Op[Any]) -> Handle:
        """Run ``op`` under the lock to its first Deliver and queue its sends;
        the core then holds it there (acks are collected, it is not resumed)
        until :meth:`finish`.

        Nothing else is pumped: the test may now let nodes fault and access
        (GUP-fast and DMA are served; slow GUPs wait for the lock), then
        :meth:`finish`.
        """
        if self._held_op is not None or self.core.lock_held:
            raise RuntimeError("a host operation already holds the lock")
        task = self.core.submit(op)
        while not task.done and task.delivers == 0:
            if not self.core.run_one():
                raise RuntimeError("the operation did not start")
            self._route(self.core.drain())
        if not task.done:
            self.core.hold(task)
            self._held_op = task
        return Handle(task)

    def finish(self, handle: Handle) -> Any:
        """Complete an operation begun with :meth:`begin`, release the lock, pump."""
        task = handle.task
        if self._held_op is task:
            self._held_op = None
            self.core.release(task)
            if self.core.run_one():  # the operation goes on first (if its acks are in)
                self._route(self.core.drain())
        try:
            self._until(lambda: task.done)
        finally:
            self.pump()
        if task.error is not None:
            raise task.error
        return task.value

    @property
    def locked(self) -> bool:
        """An operation holds the host lock."""
        return self.core.lock_held

    def connect_raw(self, identity: bytes) -> deque[Message]:
        """A hand-driven node connection (a test plays the node): returns the
        queue of what the host sends it; :meth:`send_raw` sends from it."""
        return self.raw.setdefault(identity, deque())

    def send_raw(self, identity: bytes, msg: Message) -> None:
        """A message from hand-driven connection ``identity`` to the core."""
        self._route(self.core.receive_node(identity, msg, None, self.now))

    # ------------------------------------------------------------ the admin API

    def admin_begin(self, command: str, **args: Any) -> int:
        """Send an admin request to the core without waiting; returns its ref
        (:meth:`admin_reply` collects it)."""
        ref = next(self._admin_ids)
        self._route(self.core.submit_admin("local", ref, command, args, self.now))
        return ref

    def admin_reply(self, ref: int) -> AdminReply:
        """Pump until the reply to admin request ``ref`` is in; returns it."""
        self._until(lambda: ref in self._admin_replies)
        return self._admin_replies.pop(ref)

    def admin(self, command: str, **args: Any) -> dict[str, Any]:
        """An admin command through the core, exactly as ``mmn`` sends it to
        ``mmn host`` (``protocol.admin`` checks, the same handlers).

        Returns:
            The reply's result.
        Raises:
            KernelError: the reply's errno.
        """
        reply = self.admin_reply(self.admin_begin(command, **args))
        self.pump()
        return admin_result(reply)

    def client(self, *, timeout: float = 10.0) -> Any:
        """A :class:`mmnotify.Client` of this cluster: the same interface as
        for a real one, every call pumped here to its reply (``events`` is
        not offered).  Calls run one at a time: the cluster is one process."""
        from .client import Client, typed_error

        async def carry(command: str, args: dict[str, Any], _timeout: float) -> dict[str, Any]:
            reply = self.admin_reply(self.admin_begin(command, **args))
            self.pump()
            if not reply.ok:
                raise typed_error(reply.errno, reply.error)
            return dict(reply.result)

        return Client(carry, timeout=timeout)

    # ------------------------------------------------------- node commands

    def _start(self, name: str, call: Callable[[SecondaryMMU], tuple[int, list[Output]]]) -> int:
        port = self.ports[name]
        token, outputs = call(port.node)
        self._emit(port, outputs)
        return token

    def result(self, name: str, token: int) -> Completion | None:
        """The Completion of command ``token`` of node ``name``, once (None if not yet)."""
        return self.ports[name].completions.pop(token, None)

    def wait(self, name: str, token: int) -> Completion:
        """Pump until command ``token`` of node ``name`` completes.

        Raises:
            Stuck: nothing can move and it has not completed.
        """
        port = self.ports[name]
        while token not in port.completions:
            if not (self.step() or self._advance()):
                raise Stuck(name, token)
        return port.completions.pop(token)

    def _value(self, c: Completion) -> dict[str, Any]:
        if c.error is not None:
            raise c.error
        return c.result or {}

    def submit_fault(self, name: str, mm: int, addr: int, npages: int = 1, write: bool = False) -> int:
        """Start a secondary fault on node ``name``; nothing is pumped.  As
        ``mmn fault`` does, this points the node at ``mm`` (a grant)."""
        self.core.grants.point(name, mm)
        return self._start(name, lambda n: n.fault(mm, addr, npages, write))

    def submit_access(self, name: str, mm: int, addr: int, length: int | None = None, data: bytes | None = None) -> int:
        """Start a node access (a read, or a write of ``data``); nothing is
        pumped.  Grants ``mm``, as ``mmn access`` does."""
        self.core.grants.point(name, mm)
        return self._start(name, lambda n: n.access(mm, addr, length, data))

    def fault(self, name: str, mm: int, addr: int, npages: int = 1, write: bool = False) -> dict[str, Any]:
        """A secondary page fault on node ``name``, pumped to its Completion.

        Returns:
            ``{"mm", "addr", "pages": [[addr, pfn, writable], ...]}``.
        Raises:
            KernelError: the fault failed (EFAULT, EPERM, EAGAIN, EINTR...).
            Stuck: it cannot complete while an operation is held open.
        """
        return self._value(self.wait(name, self.submit_fault(name, mm, addr, npages, write)))

    def access(self, name: str, mm: int, addr: int, length: int | None = None, data: bytes | None = None) -> Any:
        """Read ``length`` bytes (returns ``bytes``) or write ``data`` (returns
        the count written) through node ``name``'s translations.

        Raises:
            KernelError, Stuck: as :meth:`fault`.
        """
        result = self._value(self.wait(name, self.submit_access(name, mm, addr, length, data)))
        return result["data"] if data is None else result["written"]

    # xpmem (kernel/xpmem_make.c, xpmem_get.c, xpmem_attach.c)

    def _xpmem(self, name: str, op: str, *args: Any) -> dict[str, Any]:
        return self._value(self.wait(name, self._start(name, lambda n: getattr(n, op)(*args))))

    def xpmem_make(self, name: str, mm: int, addr: int, length: int, mode: int = 0o666) -> int:
        """Export ``[addr, addr+length)`` of ``mm``; returns the segid."""
        self.core.grants.point(name, mm)
        return self._xpmem(name, "make", mm, addr, length, mode)["segid"]

    def xpmem_get(self, name: str, segid: int, write: bool = True) -> int:
        """An access permit for ``segid``; returns the apid."""
        return self._xpmem(name, "get", segid, write)["apid"]

    def xpmem_attach(self, name: str, apid: int, offset: int = 0, length: int | None = None) -> int:
        """Attach (part of) a permit's segment; returns the node-local address."""
        return self._xpmem(name, "attach", apid, offset, length)["vaddr"]

    def xpmem_detach(self, name: str, vaddr: int) -> dict[str, Any]:
        return self._xpmem(name, "detach", vaddr)

    def xpmem_release(self, name: str, apid: int) -> dict[str, Any]:
        return self._xpmem(name, "xpmem_release", apid)

    def xpmem_remove(self, name: str, segid: int) -> dict[str, Any]:
        return self._xpmem(name, "remove", segid)

    def subscribe(self, name: str, mm: int) -> dict[str, Any]:
        """``mmu_notifier_register`` of node ``name`` on ``mm``, as the
        ``subscribe`` command does it (a fault does it implicitly)."""
        self.core.grants.point(name, mm)
        return self._value(self.wait(name, self._start(name, lambda n: n.subscribe(mm))))

    def unsubscribe(self, name: str, mm: int) -> dict[str, Any]:
        """``mmu_notifier_unregister`` of node ``name`` from ``mm``, as the
        ``unsubscribe`` command does it: the host sends ``->release`` (the node
        drops everything of ``mm``), then its Ok; nothing more is delivered."""
        return self._value(self.wait(name, self._start(name, lambda n: n.unsubscribe(mm))))

    # --------------------------------------------- host operations (shortcuts)

    def spawn(self) -> int:
        return self.model.spawn()

    def mmap(self, mm: int, pages: int, prot: str = "rw", *, shared: bool = False, mergeable: bool = False) -> int:
        return self.run(self.model.mmap(mm, pages, prot, shared=shared, mergeable=mergeable))

    def read(self, mm: int, addr: int, length: int) -> bytes:
        return bytes(self.run(self.model.read(mm, addr, length)))

    def write(self, mm: int, addr: int, data: bytes) -> Any:
        return self.run(self.model.write(mm, addr, data))

    def munmap(self, mm: int, addr: int, length: int) -> Any:
        return self.run(self.model.munmap(mm, addr, length))

    def mprotect(self, mm: int, addr: int, length: int, prot: str) -> Any:
        return self.run(self.model.mprotect(mm, addr, length, prot))

    def madvise(self, mm: int, addr: int, length: int, advice: str) -> Any:
        return self.run(self.model.madvise(mm, addr, length, advice))

    def fork(self, mm: int) -> int:
        return self.run(self.model.fork(mm))

    def exit(self, mm: int) -> None:
        """``exit_mmap`` (release first), then the mm's segments go: the
        admin API's ``exit``, through the core."""
        self.admin("exit", mm=mm)

    def reclaim(self, mm: int, addr: int, length: int) -> int:
        return self.run(self.model.reclaim(mm, addr, length))

    def migrate(self, mm: int, addr: int, length: int) -> int:
        return self.run(self.model.migrate(mm, addr, length))

    def merge(self, full_scans: int = 1) -> dict[str, Any]:
        """KSM: ``full_scans`` full scans; returns the counters."""
        for _ in range(full_scans):
            self.run(self.model.ksm.full_scan())
        return self.model.ksm.stats()

    # ------------------------------------------------------------- checks

    @property
    def stale_accesses(self) -> int:
        return self.model.stale_accesses

    def quiescent(self) -> bool:
        """No operation open or queued, no message queued, nothing ready."""
        return not self.core.busy and not any(p.to_node or p.to_host for p in self.ports.values())

    def _live(self) -> list[Port]:
        return [p for p in self.ports.values() if p.state == "live"]

    def _on_free(self, pfn: int) -> None:
        """Frame safety, at the moment it matters: a frame the model frees is
        mapped by no live node (every node that held it acked the
        invalidation that unmapped it, or was fenced)."""
        for port in self._live():
            for mm, pages in port.node.translations().items():
                for addr, held in pages.items():
                    assert held != pfn, (
                        f"pfn {pfn} freed while {port.name} still maps it at mm {mm} {addr:#x}")

    def check(self) -> int:
        """Assert the model's invariants and, when quiescent, that no live
        node holds a translation the primary does not back and none has an
        invalidation in progress (the host has none open).

        Returns:
            The stale access count (0 in a correct system).
        """
        self.model.check_invariants()
        if self.quiescent():
            assert not any(self.notifier.open.values()), f"invalidations left open: {self.notifier.open}"
            for port in self._live():
                if not port.held:
                    self._check_translations(port)
                    for mm, state in port.node._mms.items():
                        assert not state.open_starts, (
                            f"{port.name} has invalidations in progress on mm {mm} "
                            f"({state.open_starts}) while the host has none open")
        return self.model.stale_accesses

    def _check_translations(self, port: Port) -> None:
        node = port.node
        for mm, pages in node.translations().items():
            for addr, pfn in pages.items():
                if node.kind == "xpmem":
                    ok = self.model.is_pinned_by(port.name, mm, addr, pfn)
                else:
                    pte = self.model.pte(mm, addr)
                    ok = pte is not None and pte[0] == pfn
                assert ok, f"{port.name} maps mm {mm} {addr:#x} -> pfn {pfn}, the primary does not"


def demo(out: Callable[[str], Any] = print) -> LocalCluster:
    """A real in-process scenario, printed step by step.  Returns the cluster."""
    ps = 4096
    c = LocalCluster(frames=256, page_size=ps, nodes=["kvm", "gru", "xpmem"])
    mm = c.spawn()
    base = c.mmap(mm, 8, "rw", mergeable=True)
    out(f"mm {mm}: mmap 8 pages rw MERGEABLE at {base:#x}")
    for i in range(8):
        c.write(mm, base + i * ps, (b"same" if i < 4 else bytes([65 + i]) * 4).ljust(ps, b"."))
    out("host wrote pages 0-3 identical, 4-7 distinct")

    pages = c.fault("kvm", mm, base, 4, write=False)["pages"]
    out(f"kvm  fault pages 0-3: {[(hex(a), pfn) for a, pfn, _ in pages]}")
    pages = c.fault("gru", mm, base, 2)["pages"]
    out(f"gru  fault pages 0-1: {[(hex(a), pfn) for a, pfn, _ in pages]}")
    segid = c.xpmem_make("xpmem", mm, base, 8 * ps, 0o666)
    apid = c.xpmem_get("xpmem", segid, write=True)
    vaddr = c.xpmem_attach("xpmem", apid)
    got = c.access("xpmem", 0, vaddr + 2 * ps, 4)
    out(f"xpmem make/get/attach segid {segid} apid {apid} at {vaddr:#x}; read page 2: {got!r}")
    c.access("gru", mm, base + 5 * ps, data=b"GRU!")
    c.access("kvm", mm, base + 6 * ps, data=b"KVM!")
    out(f"writes through nodes; host reads {c.read(mm, base + 5 * ps, 4)!r} {c.read(mm, base + 6 * ps, 4)!r}")

    before = {a: pfn for a, pfn in c.node("kvm").translations()[mm].items()}
    stats = c.merge(2)
    kvm = c.node("kvm")
    after = kvm.translations()[mm]
    out(
        f"KSM: pages_shared {stats['pages_shared']} pages_sharing {stats['pages_sharing']}; "
        f"kvm repointed by change_pte: {[(hex(a), before[a], after.get(a)) for a in sorted(before)]} "
        f"(change_pte hits {kvm.counters['change_pte_hits']}, no refault)"
    )
    out(
        f"gru TLB now {sorted(hex(a) for a in c.node('gru').translations().get(mm, {}))}, "
        f"xpmem maps {sorted(hex(a) for a in c.node('xpmem').translations().get(mm, {}))} (invalidated, they refault)"
    )
    got = c.access("gru", mm, base, 4)
    out(f"gru refault + read page 0: {got!r}")
    c.munmap(mm, base + 6 * ps, 2 * ps)
    out(f"munmap pages 6-7; kvm maps {sorted(hex(a) for a in kvm.translations().get(mm, {}))}")
    try:
        c.access("kvm", mm, base + 6 * ps, 4)
    except KernelError as exc:
        out(f"kvm read of unmapped page 6: {exc.errno.value}")
    c.exit(mm)
    out(f"exit mm {mm}: every node released; frames in use {c.model.memory.in_use}")
    out(f"stale_accesses {c.check()}")
    return c



if __name__ == "__main__":  # pragma: no cover
    demo()
