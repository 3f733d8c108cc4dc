"""The whole system in one process: no sockets, no clock, deterministic.

:class:`LocalCluster` holds the primary-MMU :class:`broker.mm.Model`, the
host-side XPMEM :class:`broker.xpmem.Segments` and named secondary MMUs
(``node.kvm`` / ``node.gru`` / ``node.xpmem``, the very classes the networked
nodes run).  It plays the part of ``broker.host.Host`` and of the ZeroMQ node
channel:

* each node has two ordered FIFO queues, host→node and node→host, like its one
  DEALER connection;
* the host handles node→host messages in order, routing each one exactly as
  ``Host._on_node_message`` does (Subscribe → ``notifier.register``; Gup →
  ``model.gup_fast``, else the slow ``model.gup`` generator, deferred until no
  other host operation holds the lock; Unsubscribe under the lock; Unpin;
  DmaRead/DmaWrite → the model's oracle; Xpmem*; Ack → the pending Deliver);
* :meth:`LocalCluster.deliver` is the synchronous twin of ``Host.deliver``:
  it queues the sends and pumps until every addressed node has answered; a
  node that cannot answer (held with :meth:`hold`, or with no progress
  possible) is fenced and answered ``None``, as the ack deadline would.

One host lock (the real host's ``mmap_lock`` for every mm at once) serialises
mutating operations.  GUP-fast and DMA never take it.  The stepping API
(:meth:`begin` / :meth:`finish`) holds an operation open across its first
Deliver, so a test can let faults and accesses race an invalidation::

    handle = c.begin(c.model.munmap(mm, addr, length))   # start queued, lock held
    token = c.submit_fault("kvm", mm, addr)              # node sends Gup
    c.pump()                                             # start acked; slow GUP waits
    c.finish(handle)                                     # end; the fault retries
    c.result("kvm", token)

Scheduling is deterministic: by default queues are served in a fixed order
(host→node before node→host, nodes in registration order); with ``seed`` a
seeded random generator picks the next ready queue, so a property test can
explore interleavings reproducibly.

Run ``python -m mmn.local`` for a demonstration scenario.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from broker.effects import Deliver, Outcomes
from broker.requests import NodeRequests
from broker.xpmem import Segments
from node.base import Completion, Output, SecondaryMMU, node_class
from protocol.messages import (
    Ack,
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
    Registered,
    Unsubscribe,
)
from protocol.types import Errno, KernelError

logger = logging.getLogger(__name__)

#: Host incarnation id the in-process nodes see.
INCARNATION = "local"


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
    """One node as the host sees it: its session and its connection.

    ``to_node`` / ``to_host`` are the two directions of the node's DEALER
    connection, each FIFO.  ``held``: the node has hung (it stops reading
    ``to_node``; what it already sent still arrives).
    """

    name: str
    node: SecondaryMMU
    epoch: int = 0
    state: str = "live"  # live | fenced
    fence_reason: str = ""
    held: bool = False
    to_node: deque[Message] = field(default_factory=deque)
    to_host: deque[Message] = field(default_factory=deque)
    completions: dict[int, Completion] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.node.kind


@dataclass(eq=False)
class _AckSlot:
    node: str
    ack: Ack | None = None
    done: bool = False  # acked, or the node was fenced


@dataclass(eq=False)
class Handle:
    """A host operation begun by :meth:`LocalCluster.begin`, holding the lock."""

    op: Generator[Deliver, Outcomes, Any] | None
    effect: Deliver | None = None
    slots: dict[str, _AckSlot] = field(default_factory=dict)
    done: bool = False
    value: Any = None
    #: The KernelError the operation raised before its first delivery (re-raised by finish).
    error: KernelError | None = None


class LocalCluster:
    """A host and its nodes in one process (see the module docstring).

    Args:
        frames: physical page frames of the model (the zero frame included).
        page_size: bytes per page.
        swap_slots: slots of the (temporary) swap file.
        wrap_change_pte: the 3.7–6.9 mode (change_pte wrapped in start/end).
        nodes: ``{name: kind}`` or a list of kinds (named ``kvm``, ``gru``,
            ``xpmem``, then ``kvm2``...) to register at once.
        seed: None for a fixed service order of the queues; an int for a
            seeded random order (reproducible interleavings).
        model: a ready :class:`broker.mm.Model` (the others are then ignored).
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
        self.page_size = model.page_size if hasattr(model, "page_size") else page_size
        self.segments = Segments(self.page_size)
        self.requests = NodeRequests(self.model, self.segments)
        self.ports: dict[str, Port] = {}
        self.retired: set[int] = set()
        self._epochs = itertools.count(1)
        self._ack_waiters: dict[tuple[str, int], _AckSlot] = {}
        #: Node requests that need the host lock (slow GUP, unsubscribe), in arrival order.
        self._deferred: deque[Callable[[], None]] = deque()
        self._locked = False
        self._random = random.Random(seed) if seed is not None else None
        self.counters: dict[str, int] = {
            "messages_to_nodes": 0,
            "messages_to_host": 0,
            "refused": 0,
            "acks_late": 0,
            "fenced_ack_deadline": 0,
            "gup_fast": 0,
            "gup_slow": 0,
            "dma": 0,
        }
        if isinstance(nodes, dict):
            for name, kind in nodes.items():
                self.add_node(kind, name)
        else:
            for kind in nodes:
                self.add_node(kind)

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
        self.ports[name] = Port(name, node, state="fenced")
        self.register(name)
        return name

    def register(self, name: str) -> int:
        """(Re)register node ``name``: a new session with a fresh epoch.

        Like ``Host._on_register``: a still-live previous session is fenced
        first.  The node gets ``Registered`` (it drops everything it had);
        messages of the old connection still queued are gone with it.

        Returns:
            The new epoch.
        """
        port = self.ports[name]
        if port.state == "live":
            self.fence(name, "registered again (restarted)")
        port.to_node.clear()
        port.to_host.clear()
        port.held = False
        port.epoch = next(self._epochs)
        port.state = "live"
        port.fence_reason = ""
        self.notifier.add_node(name, port.node.ops, port.node.sleepable)
        outputs = port.node.receive(
            Registered(
                ref=0,
                epoch=port.epoch,
                host_incarnation=INCARNATION,
                heartbeat_ms=0,
                ack_deadline_ms=0,
                page_size=self.page_size,
            )
        )
        self._emit(port, outputs)
        return port.epoch

    def node(self, name: str) -> SecondaryMMU:
        """The secondary MMU object of node ``name``."""
        return self.ports[name].node

    def fence(self, name: str, reason: str = "fenced") -> None:
        """Retire ``name``'s epoch (``Host.fence``): subscriptions, pins and
        permits dropped, acks awaited from it answered None, ``Fenced`` queued
        to it (it drops every translation when it reads it)."""
        port = self.ports[name]
        if port.state != "live":
            return
        logger.info("fenced %s (epoch %d): %s", name, port.epoch, reason)
        port.state = "fenced"
        port.fence_reason = reason
        self.retired.add(port.epoch)
        self.notifier.fence(name)
        self.model.fence_node(name)
        self.segments.forget_node(name)
        for (node, _), slot in self._ack_waiters.items():
            if node == name:
                slot.done = True
        self._to_node(port, Fenced(epoch=port.epoch, reason=reason))

    def hold(self, name: str) -> None:
        """The node hangs: it stops reading the host's messages."""
        self.ports[name].held = True

    def heal(self, name: str) -> None:
        """Undo :meth:`hold`: the node reads its backlog (at the next pump)."""
        self.ports[name].held = False

    # ------------------------------------------------------------ transport

    def _to_node(self, port: Port, msg: Message) -> None:
        self.counters["messages_to_nodes"] += 1
        port.to_node.append(msg)

    def _emit(self, port: Port, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Completion):
                port.completions[out.token] = out
            else:
                self.counters["messages_to_host"] += 1
                port.to_host.append(out)

    def _ready(self) -> list[tuple[str, Port]]:
        ready: list[tuple[str, Port]] = []
        for port in self.ports.values():
            if port.to_node and not port.held:
                ready.append(("node", port))
        for port in self.ports.values():
            if port.to_host:
                ready.append(("host", port))
        return ready

    def step(self) -> bool:
        """Move one message (or run one deferred request if the lock is free).

        Returns:
            False when nothing can move.
        """
        ready = self._ready()
        if ready:
            side, port = ready[0] if self._random is None else self._random.choice(ready)
            if side == "node":
                self.step_node(port.name)
            else:
                self.step_host(port.name)
            return True
        if not self._locked and self._deferred:
            self._deferred.popleft()()
            return True
        return False

    def step_node(self, name: str) -> bool:
        """Node ``name`` reads one message from the host (even if held)."""
        port = self.ports[name]
        if not port.to_node:
            return False
        msg = port.to_node.popleft()
        self._emit(port, port.node.receive(msg))
        return True

    def step_host(self, name: str) -> bool:
        """The host handles one message from node ``name``."""
        port = self.ports[name]
        if not port.to_host:
            return False
        self._on_node_message(port, port.to_host.popleft())
        return True

    def pump(self) -> None:
        """Move messages until nothing can move (deferred requests run when
        no operation holds the lock)."""
        while self.step():
            pass

    # --------------------------------------------------- host: node messages

    def _reply(self, port: Port, msg: Message) -> None:
        self._to_node(port, msg)

    def _on_node_message(self, port: Port, msg: Message) -> None:
        """``Host._on_node_message``, synchronously."""
        epoch = getattr(msg, "epoch", None)
        if port.state != "live" or (epoch is not None and (epoch in self.retired or epoch != port.epoch)):
            # Sessions.lookup refuses it as "fenced"; the host answers even acks.
            self.counters["refused"] += 1
            ref = getattr(msg, "id", getattr(msg, "ref", 0))
            self._reply(port, Error(ref=ref, code="fenced", message=f"{port.name} epoch {epoch} refused"))
            return
        name = port.name
        if isinstance(msg, Ack):
            slot = self._ack_waiters.get((name, msg.ref))
            if slot is None or slot.done:
                self.counters["acks_late"] += 1
            else:
                slot.ack = msg
                slot.done = True
            return
        if isinstance(msg, CommandResult | Heartbeat):
            return
        if isinstance(msg, DmaRead | DmaWrite):
            self._reply(port, self._dma(name, msg))
            return
        if isinstance(msg, Gup):
            self._on_gup(port, msg)
            return
        if isinstance(msg, Unsubscribe):
            self._deferred.append(lambda: self._unsubscribe(port, msg))
            return
        self._reply(port, self.requests.answer(name, msg))

    def _dma(self, name: str, msg: DmaRead | DmaWrite) -> DmaReply:
        """``Host._dma``: the oracle.  Never takes the lock."""
        self.counters["dma"] += 1
        reply = self.requests.dma(name, msg)
        if reply.errno == Errno.ESTALE.value:
            logger.error("stale access by %s: mm %d addr %#x pfn %d", name, msg.mm, msg.addr, msg.pfn)
        return reply

    def _on_gup(self, port: Port, msg: Gup) -> None:
        """``Host._on_gup``: permits, then GUP-fast, else the slow path under the lock."""
        reply = self.requests.gup_fast(port.name, port.kind, msg)
        if reply is None:
            self._deferred.append(lambda: self._gup_slow(port, msg))
            return
        if isinstance(reply, GupReply) and not reply.errno:
            self.counters["gup_fast"] += 1
        self._reply(port, reply)

    def _gup_slow(self, port: Port, msg: Gup) -> None:
        """``Host._gup_slow``: ``model.gup`` under the lock."""
        self.counters["gup_slow"] += 1
        epoch = port.epoch
        reply = self._locked_run(self.requests.gup_slow(port.name, msg))
        if port.state != "live" or port.epoch != epoch or msg.epoch != epoch:
            self.requests.undeliverable(port.name, msg, reply)  # fenced meanwhile
            return
        self._reply(port, reply)

    def _unsubscribe(self, port: Port, msg: Unsubscribe) -> None:
        self._locked_run(self.notifier.unregister(port.name, msg.mm))
        self._reply(port, Ok(ref=msg.id))

    # ------------------------------------------------------ driving operations

    def _send(self, effect: Deliver) -> dict[str, _AckSlot]:
        """Queue a Deliver's messages; returns the ack slots to wait for."""
        slots: dict[str, _AckSlot] = {}
        for name, msg in effect.sends:
            port = self.ports.get(name)
            if port is None or port.state != "live":
                continue
            if effect.expect_ack:
                slot = _AckSlot(name)
                self._ack_waiters[(name, msg.id)] = slot
                slots[name] = slot
            self._to_node(port, msg)
        return slots

    def _collect(self, effect: Deliver, slots: dict[str, _AckSlot]) -> Outcomes:
        """Pump until every slot is answered; fence the nodes that cannot answer."""
        while not all(slot.done for slot in slots.values()):
            if not self.step():
                for name, slot in slots.items():
                    if not slot.done:
                        self.counters["fenced_ack_deadline"] += 1
                        self.fence(name, "no ack: node cannot answer")
                break
        for key in [k for k, s in self._ack_waiters.items() if s in slots.values()]:
            del self._ack_waiters[key]
        outcomes: Outcomes = {name: None for name in effect.nodes}
        for name, slot in slots.items():
            outcomes[name] = slot.ack
        return outcomes

    def deliver(self, effect: Deliver) -> Outcomes:
        """``Host.deliver``, synchronously: queue the sends, pump until every
        addressed node acked (none for ``expect_ack=False``: returns at once)."""
        return self._collect(effect, self._send(effect))

    def _drive(self, op: Generator[Deliver, Outcomes, Any], first: Outcomes | None = None) -> Any:
        try:
            effect = next(op) if first is None else op.send(first)
            while True:
                effect = op.send(self.deliver(effect))
        except StopIteration as stop:
            return stop.value

    def _locked_run(self, op: Generator[Deliver, Outcomes, Any]) -> Any:
        if self._locked:
            raise RuntimeError("a host operation already holds the lock")
        self._locked = True
        try:
            return self._drive(op)
        finally:
            self._locked = False

    def run(self, op: Generator[Deliver, Outcomes, Any]) -> Any:
        """Run a host operation to completion under the lock, then pump.

        Returns:
            What the operation returns.
        Raises:
            Whatever it raises (``KernelError``...), after pumping.
            RuntimeError if an operation begun with :meth:`begin` is open.
        """
        try:
            return self._locked_run(op)
        finally:
            self.pump()

    def begin(self, op: Generator[Deliver, Outcomes, Any]) -> Handle:
        """Take the lock, run ``op`` to its first Deliver and queue its sends.

        Nothing is pumped: the test may now let nodes fault and access
        (GUP-fast and DMA are served; slow GUPs wait for the lock), then
        :meth:`finish`.
        """
        if self._locked:
            raise RuntimeError("a host operation already holds the lock")
        self._locked = True
        try:
            effect = next(op)
        except StopIteration as stop:
            self._locked = False
            return Handle(None, done=True, value=stop.value)
        except KernelError as exc:  # failed before talking to anyone: finish() raises it
            self._locked = False
            return Handle(None, done=True, error=exc)
        except BaseException:
            self._locked = False
            raise
        return Handle(op, effect, self._send(effect))

    def finish(self, handle: Handle) -> Any:
        """Complete an operation begun with :meth:`begin`, release the lock, pump."""
        if handle.done:
            if handle.error is not None:
                raise handle.error
            return handle.value
        assert handle.op is not None and handle.effect is not None
        try:
            outcomes = self._collect(handle.effect, handle.slots)
            handle.value = self._drive(handle.op, outcomes)
            return handle.value
        finally:
            handle.done = True
            self._locked = False
            self.pump()

    @property
    def locked(self) -> bool:
        """An operation holds the host lock."""
        return self._locked

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
            if not self.step():
                raise Stuck(name, token)
        return port.completions.pop(token)

    def _value(self, c: Completion) -> dict[str, Any]:
        if c.error is not None:
            raise c.error
        return c.result or {}

    def submit_fault(self, name: str, mm: int, addr: int, npages: int = 1, write: bool = False) -> int:
        """Start a secondary fault on node ``name``; nothing is pumped."""
        return self._start(name, lambda n: n.fault(mm, addr, npages, write))

    def submit_access(self, name: str, mm: int, addr: int, length: int | None = None, data: bytes | None = None) -> int:
        """Start a node access (a read, or a write of ``data``); nothing is pumped."""
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
        return self._xpmem(name, "release", apid)

    def xpmem_remove(self, name: str, segid: int) -> dict[str, Any]:
        return self._xpmem(name, "remove", segid)

    def subscribe(self, name: str, mm: int) -> dict[str, Any]:
        """``mmu_notifier_register`` of node ``name`` on ``mm``, as the
        ``subscribe`` command does it (a fault does it implicitly)."""
        return self._value(self.wait(name, self._start(name, lambda n: n.subscribe(mm))))

    def unsubscribe(self, name: str, mm: int) -> dict[str, Any]:
        """``mmu_notifier_unregister`` of node ``name`` from ``mm``, as the
        ``unsubscribe`` command does it: the host sends ``->release`` (the node
        drops everything of ``mm``), then its Ok; nothing more is delivered."""
        return self._value(self.wait(name, self._start(name, lambda n: n.unsubscribe(mm))))

    def _to_host_direct(self, port: Port, msg: Message) -> None:
        self.counters["messages_to_host"] += 1
        port.to_host.append(msg)

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
        """``exit_mmap`` (release first), then the mm's segments go, as the admin API does."""
        self.run(self.model.exit_mm(mm))
        self.segments.forget_mm(mm)

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
        """No operation open, no message queued, no request deferred."""
        return not self._locked and not self._deferred and not any(
            p.to_node or p.to_host for p in self.ports.values()
        )

    def check(self) -> int:
        """Assert the model's invariants and, when quiescent, that no live
        node holds a translation the primary does not back.

        Returns:
            The stale access count (0 in a correct system).
        """
        self.model.check_invariants()
        if self.quiescent():
            for port in self.ports.values():
                if port.state == "live" and not port.held:
                    self._check_translations(port)
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
