"""The host: a trio service around the primary-MMU model and the notifier core.

It only moves messages and keeps time.  Everything that decides anything is
sans-I/O: :class:`broker.mm.Model` (primary MMU, GUP, the DMA oracle, KSM),
:class:`broker.notifier.NotifierCore` (who hears what), :class:`Sessions`
(epochs, liveness), :class:`Segments` (XPMEM).  Host operations are
generators of :class:`Deliver`; :meth:`Host.drive` runs one, sending the
messages over the node channel and awaiting acks under the ack deadline.

Ordering argument (why a correct node never makes a stale access): each node
has one DEALER connection, so the host sees a node's messages in the order the
node sent them.  The node channel task handles DMA and GUP-fast synchronously
as they arrive and only *signals* an ack; the operation waiting for that ack
runs afterwards.  So any DMA a node issued before acknowledging an
invalidation is served before the host changes the primary ptes.

Tasks (one nursery, all started by :meth:`Host.serve`)::

    node channel   ROUTER  owner task: decode, dispatch, reply
    admin channel  ROUTER  owner task: decode, check, spawn a handler per request
    events         PUB     owner task: publish what happens
    heartbeats             send to live nodes, fence the silent
    ksmd                   scan MERGEABLE areas while ksm run == 1

Mutating operations are serialised by one lock (``mmap_lock`` for every mm at
once, a simplification); GUP-fast, DMA, status and acks never take it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
import zmq

from protocol import Limits, ProtocolError, decode, encode
from protocol.limits import ENV_VARS as LIMIT_ENV
from protocol.admin import check_admin
from protocol.messages import (
    Ack,
    AdminReply,
    AdminRequest,
    Command,
    CommandResult,
    DmaRead,
    DmaReply,
    DmaWrite,
    Error,
    Event,
    Fenced,
    Gup,
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
)
from protocol.types import Errno, KernelError
from transport import PeerGone, SocketOptions, bind, serve_socket, user_id_of
from transport.curve import DOMAIN_ADMIN, DOMAIN_EVENTS, DOMAIN_NODE, HostAuth, KeyLayout, name_matches_key

from . import guard
from .effects import Deliver, Outcomes
from .notifier import check_ops
from .requests import NodeRequests
from .sessions import Refused, Sessions
from .xpmem import Segments

logger = logging.getLogger(__name__)


@dataclass
class HostConfig:
    """Everything configurable about a host.  Times are milliseconds."""

    bind: str = "127.0.0.1"
    node_port: int = 7781
    admin_port: int = 7782
    events_port: int = 7783
    frames: int = 65536
    page_size: int = 4096
    heartbeat_ms: int = 500
    #: Heartbeats a node may miss before it is fenced.
    liveness: int = 6
    ack_deadline_ms: int = 2000
    command_timeout_ms: int = 10_000
    swap_path: str | None = None
    swap_slots: int = 65536
    wrap_change_pte: bool = False
    ksm_run: int = 0
    ksm_pages_to_scan: int = 100
    ksm_sleep_millisecs: int = 20
    limits: Limits = field(default_factory=Limits)
    #: CURVE (DESIGN §7): a ``mmn keygen`` directory, or the three paths
    #: separately (they override the directory's).  None of them: plain TCP.
    keys_dir: str | None = None
    server_key: str | None = None
    node_keys: str | None = None
    admin_keys: str | None = None
    #: Plain TCP even if keys are configured.
    insecure: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> HostConfig:
        """Defaults, then ``MMN_*`` environment variables, then ``overrides``
        (``max_frame``, ``max_pages``, ``max_range``, ``max_rate``,
        ``rate_burst`` go into ``limits``)."""
        env = dict(os.environ if env is None else env)
        cfg = cls()
        limit_overrides = {k: overrides.pop(k) for k in list(overrides) if k in LIMIT_ENV}
        cfg.limits = Limits.from_env(env, **limit_overrides)
        if env.get("MMN_INSECURE", "") not in ("", "0"):
            cfg.insecure = True
        for name, var in (
            ("bind", "MMN_BIND"),
            ("node_port", "MMN_NODE_PORT"),
            ("admin_port", "MMN_ADMIN_PORT"),
            ("events_port", "MMN_EVENTS_PORT"),
            ("frames", "MMN_FRAMES"),
            ("page_size", "MMN_PAGE_SIZE"),
            ("heartbeat_ms", "MMN_HEARTBEAT_MS"),
            ("liveness", "MMN_LIVENESS"),
            ("ack_deadline_ms", "MMN_ACK_DEADLINE_MS"),
            ("command_timeout_ms", "MMN_COMMAND_TIMEOUT_MS"),
            ("swap_path", "MMN_SWAP_PATH"),
            ("swap_slots", "MMN_SWAP_SLOTS"),
            ("ksm_run", "MMN_KSM_RUN"),
            ("keys_dir", "MMN_KEYS_DIR"),
            ("server_key", "MMN_SERVER_KEY"),
            ("node_keys", "MMN_NODE_KEYS"),
            ("admin_keys", "MMN_ADMIN_KEYS"),
        ):
            if var in env and env[var] != "":
                current = getattr(cfg, name)
                value: Any = env[var]
                if isinstance(current, int) or name == "swap_slots":
                    try:
                        value = int(value)
                    except ValueError:
                        raise ValueError(f"{var} must be an integer, not {env[var]!r}") from None
                setattr(cfg, name, value)
        if env.get("MMN_WRAP_CHANGE_PTE", "") not in ("", "0"):
            cfg.wrap_change_pte = True
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
        return cfg

    def key_paths(self) -> tuple[str, str, str] | None:
        """``(server secret, node keys dir, admin keys dir)``, or None for
        plain TCP (``insecure``, or no keys configured).

        Raises:
            ValueError: some paths configured but not all three.
        """
        if self.insecure:
            return None
        layout = KeyLayout(Path(self.keys_dir)) if self.keys_dir else None
        server = self.server_key or (str(layout.host_secret) if layout else None)
        nodes = self.node_keys or (str(layout.nodes_dir) if layout else None)
        admins = self.admin_keys or (str(layout.admin_dir) if layout else None)
        given = [p for p in (server, nodes, admins) if p]
        if not given:
            return None
        if len(given) != 3:
            raise ValueError("CURVE needs the host's secret key, the node keys and the admin keys (or --keys DIR)")
        return server, nodes, admins  # type: ignore[return-value]


@dataclass
class _AckSlot:
    event: trio.Event = field(default_factory=trio.Event)
    ack: Ack | None = None


@dataclass
class _ResultSlot:
    event: trio.Event = field(default_factory=trio.Event)
    result: CommandResult | None = None
    identity: bytes = b""
    control: bool = False


#: Node requests answered exactly once: a duplicate (same connection, same id)
#: gets the first answer again, or nothing while that is still being made.
_REQUESTS = (Register, Gup, Unpin, Subscribe, Unsubscribe, XpmemMake, XpmemGet, XpmemRelease, XpmemRemove,
             DmaRead, DmaWrite)
_REPLY_CACHE = 4096
_REPLY_CONNECTIONS = 1024


class Host:
    """The host service.  Construct, then ``await nursery.start(host.serve)``.

    Args:
        config: a :class:`HostConfig`.
        model: a ready :class:`broker.mm.Model`, for tests; built from the
            config otherwise.
    """

    def __init__(self, config: HostConfig, model: Any | None = None) -> None:
        from .mm import Model  # local: the model module is heavy to import

        self.config = config
        self.incarnation = uuid.uuid4().hex
        if model is None:
            model = Model(
                frames=config.frames,
                page_size=config.page_size,
                swap_path=config.swap_path,
                swap_slots=config.swap_slots,
                wrap_change_pte=config.wrap_change_pte,
            )
        self.model = model
        self.notifier = model.notifier
        ksm = model.ksm
        ksm.run = config.ksm_run
        ksm.pages_to_scan = config.ksm_pages_to_scan
        ksm.sleep_millisecs = config.ksm_sleep_millisecs
        self.sessions = Sessions()
        self.segments = Segments(config.page_size)
        self.requests = NodeRequests(model, self.segments)
        self.lock = trio.Lock()
        self.ack_waiters: dict[tuple[str, int], _AckSlot] = {}
        self.command_waiters: dict[int, _ResultSlot] = {}
        #: node connection -> request id -> its reply (None while in progress)
        self._replies: OrderedDict[bytes, OrderedDict[int, Message | None]] = OrderedDict()
        self._ids = iter(range(1, 1 << 62))
        self._event_seq = 0
        #: Topics the event stream's subscribers want (XPUB); empty: nobody listens.
        self._event_topics: set[bytes] = set()
        self._node_send_now: Callable[[list[bytes]], bool] = lambda frames: False
        self.endpoints: dict[str, str] = {}
        self.auth: HostAuth | None = None
        #: node connection (routing id) -> the key that registered on it (CURVE)
        self._peer_keys: dict[bytes, str] = {}
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
        }
        self._ksm_wakeup = trio.Event()
        self._events_send, self._events_recv = trio.open_memory_channel[Event](1024)

    # -- lifecycle -------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the three endpoints and serve until cancelled.

        ``task_status.started`` gets ``{"node", "admin", "events"}`` endpoints
        (the real ports, when 0 asked the OS to choose).

        Concurrency: each socket is owned by a :func:`transport.serve_socket`
        service; everything else talks to it through its memory channels.
        Cancel the enclosing scope to stop.
        """
        cfg = self.config
        # A little over max_frame: a frame just too large still reaches the
        # decoder and gets a typed too_large error; a far larger one makes
        # libzmq cut the sender's connection.
        options = SocketOptions(max_frame=cfg.limits.max_frame + 65536)
        sockets = []
        monitors: list[Any] = []
        paths = cfg.key_paths()
        auth = HostAuth(*paths).start() if paths else None
        self.auth = auth
        if auth is None:
            logger.warning("no CURVE keys configured: plain TCP, anyone who reaches the ports gets in")
        try:
            channels = (
                (zmq.ROUTER, cfg.node_port, DOMAIN_NODE),
                (zmq.ROUTER, cfg.admin_port, DOMAIN_ADMIN),
                (zmq.XPUB, cfg.events_port, DOMAIN_EVENTS),
            )
            for kind, port, domain in channels:
                security = auth.server(domain) if auth else None
                context = auth.context if auth else None
                sockets.append(bind(kind, f"tcp://{cfg.bind}:{port}", options=options, context=context, security=security))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if auth is not None:
                    for sock, channel in zip(sockets, ("node", "admin", "events"), strict=True):
                        monitors.append(guard.monitor(sock))
                        nursery.start_soon(guard.count_handshake_failures, monitors[-1], channel, self.counters)
                node = await nursery.start(
                    partial(serve_socket, sockets[0], on_undeliverable=self._undeliverable, outgoing_buffer=4096,
                            direct_incoming=True)
                )
                admin = await nursery.start(partial(serve_socket, sockets[1], on_undeliverable=_ignore))
                events = await nursery.start(serve_socket, sockets[2])
                self._node_out, self._admin_out = node.outgoing, admin.outgoing
                self._node_send_now = node.send_now
                self.endpoints = {"node": node.endpoint, "admin": admin.endpoint, "events": events.endpoint}
                nursery.start_soon(self._node_loop, node.incoming)
                nursery.start_soon(self._admin_loop, admin.incoming)
                nursery.start_soon(self._events_loop, events.outgoing)
                nursery.start_soon(self._subscriptions_loop, events.incoming)
                nursery.start_soon(self._heartbeat_loop)
                nursery.start_soon(self._ksm_loop)
                logger.info("host %s serving %s", self.incarnation, self.endpoints)
                self.publish("host_started", incarnation=self.incarnation, **self.endpoints)
                task_status.started(dict(self.endpoints))
        finally:
            for sock in [*sockets, *monitors]:
                sock.close()
            if auth is not None:
                auth.stop()
            self.model.close()

    # -- sending -----------------------------------------------------------------

    async def send_node(self, identity: bytes, msg: Message) -> None:
        """Queue one message to a node (in order with every other one to it).

        A peer that turns out to be gone is handled by :meth:`_undeliverable`.
        """
        seen = self._replies.get(identity)
        if seen is not None:
            ref = getattr(msg, "ref", None)
            if ref in seen and seen[ref] is None:
                seen[ref] = msg  # what a duplicate of that request gets
        frames = [identity, encode(msg)]
        if not self._node_send_now(frames):  # straight to libzmq when nothing is queued
            await self._node_out.send(frames)

    def _duplicate(self, identity: bytes, msg_id: int) -> Message | bool:
        """Remember request ``msg_id`` of this connection.  False if it is
        new; else its reply (True while there is none yet)."""
        seen = self._replies.get(identity)
        if seen is None:
            seen = self._replies[identity] = OrderedDict()
            while len(self._replies) > _REPLY_CONNECTIONS:
                self._replies.popitem(last=False)
        if msg_id in seen:
            self.counters["duplicates"] += 1
            return seen[msg_id] or True
        seen[msg_id] = None
        while len(seen) > _REPLY_CACHE:
            seen.popitem(last=False)
        return False

    def _undeliverable(self, frames: list[bytes], exc: Exception) -> None:
        """The node channel could not route to a peer: that node is gone."""
        if isinstance(exc, PeerGone):
            name = self.sessions.by_identity.get(exc.identity)
            session = self.sessions.by_name.get(name) if name else None
            if session is not None and session.state == "live" and session.identity == exc.identity:
                self._nursery.start_soon(self.fence, name, "connection gone")
        else:
            logger.warning("node channel send failed: %s", exc)

    def publish(self, kind: str, /, **fields: Any) -> None:
        """Put an event on the stream (dropped if the stream is backed up).

        Free when nobody listens: the stream is an XPUB socket, which tells
        the host of its subscriptions, and events go only while there is one.
        """
        if not self._event_topics:
            return
        self._event_seq += 1
        clean = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in fields.items()}
        try:
            self._events_send.send_nowait(Event(seq=self._event_seq, kind=kind, fields=clean))
        except trio.WouldBlock:
            self.counters["events_dropped"] = self.counters.get("events_dropped", 0) + 1

    async def _subscriptions_loop(self, incoming: trio.MemoryReceiveChannel[list[bytes]]) -> None:
        """XPUB subscription messages: b"\\x01" + topic subscribes, b"\\x00" +
        topic unsubscribes (libzmq passes on the first subscriber of a topic
        and the last one leaving it)."""
        async for frames in incoming:
            frame = bytes(frames[0]) if frames else b""
            if frame[:1] == b"\x01":
                self._event_topics.add(frame[1:])
            elif frame[:1] == b"\x00":
                self._event_topics.discard(frame[1:])

    async def _events_loop(self, out: trio.MemorySendChannel[list[bytes]]) -> None:
        async for event in self._events_recv:
            await out.send([event.kind.encode(), encode(event)])

    # -- driving sans-I/O operations ---------------------------------------------

    async def deliver(self, effect: Deliver) -> Outcomes:
        """Send a Deliver's messages and collect the acks, in parallel.

        A node that has not acked by the ack deadline is fenced and answered
        as None; the operation goes on without it.
        """
        outcomes: Outcomes = {}
        slots: dict[str, tuple[int, _AckSlot]] = {}
        for node, msg in effect.sends:
            session = self.sessions.by_name.get(node)
            if session is None or session.state != "live":
                outcomes[node] = None
                continue
            if effect.expect_ack:
                slot = _AckSlot()
                self.ack_waiters[(node, msg.id)] = slot
                slots[node] = (msg.id, slot)
            self.publish(msg.TYPE, node=node, **_fields(msg))
            await self.send_node(session.identity, msg)
        for node, _ in effect.sends:
            outcomes.setdefault(node, None)
        if not slots:
            return outcomes
        with trio.move_on_after(self.config.ack_deadline_ms / 1000):
            for _, slot in slots.values():
                await slot.event.wait()
        for node, (msg_id, slot) in slots.items():
            self.ack_waiters.pop((node, msg_id), None)
            if slot.ack is None:
                session = self.sessions.by_name.get(node)
                if session is not None and session.state == "live":
                    self.counters["fenced_ack_deadline"] += 1
                    await self.fence(node, f"no ack for {msg_id} within {self.config.ack_deadline_ms} ms")
            outcomes[node] = slot.ack
        return outcomes

    async def drive(self, op: Generator[Deliver, Outcomes, Any]) -> Any:
        """Run a host operation to completion (``run_sync``'s async twin)."""
        try:
            effect = next(op)
            while True:
                outcomes = await self.deliver(effect)
                effect = op.send(outcomes)
        except StopIteration as stop:
            return stop.value

    async def locked(self, op: Generator[Deliver, Outcomes, Any]) -> Any:
        """Run a mutating operation under the host's mmap_lock."""
        async with self.lock:
            return await self.drive(op)

    # -- fencing -------------------------------------------------------------------

    async def fence(self, name: str, reason: str) -> None:
        """Retire ``name``'s epoch, drop its subscriptions, pins and permits,
        release whatever waits on it, and tell it (best effort)."""
        session = self.sessions.fence(name, reason)
        if session is None:
            return
        logger.warning("fenced %s (epoch %d): %s", name, session.epoch, reason)
        self._replies.pop(session.identity, None)
        self.notifier.fence(name)
        self.model.fence_node(name)
        self.segments.forget_node(name)
        for (node, _), slot in list(self.ack_waiters.items()):
            if node == name:
                slot.event.set()
        for ref, rslot in list(self.command_waiters.items()):
            # its relayed commands end now (a fenced node's answers would be
            # refused anyway), except inject/heal/status, which reach it still
            if rslot.identity == session.identity and not rslot.control and rslot.result is None:
                rslot.result = CommandResult(ref=ref, ok=False, errno=Errno.EINTR.value, error=f"{name} fenced: {reason}")
                rslot.event.set()
        self.publish("fenced", node=name, epoch=session.epoch, reason=reason)
        await self.send_node(session.identity, Fenced(epoch=session.epoch, reason=reason))

    # -- node channel ------------------------------------------------------------

    async def _node_loop(self, incoming: trio.MemoryReceiveChannel[list[bytes]]) -> None:
        limits = self.config.limits
        rate = guard.RateLimiter(limits.max_rate, limits.rate_burst)
        async for frames in incoming:
            if not rate.allow(frames[0], trio.current_time()):
                self.counters["rate_limited"] += 1
                self.counters["dropped_node_frames"] += 1
                continue
            if len(frames) != 2:
                self.counters["bad_node_frames"] += 1
                self.counters["dropped_node_frames"] += 1
                continue
            identity, frame = frames
            try:
                msg = decode(frame, limits)
                if isinstance(msg, XpmemMake):
                    guard.check_node_range(msg.length, limits, msg.id)
            except ProtocolError as exc:
                self.counters["bad_node_frames"] += 1
                logger.info("bad frame from node %r: %s", identity[:16], exc)
                await self.send_node(identity, Error(ref=exc.ref or 0, code=exc.code, message=exc.message))
                continue
            if self.auth is not None:
                problem = self._key_problem(identity, msg, user_id_of(frames))
                if problem:
                    self.counters["forbidden"] += 1
                    ref = getattr(msg, "id", getattr(msg, "ref", 0))
                    await self.send_node(identity, Error(ref=ref, code="forbidden", message=problem))
                    continue
            if isinstance(msg, CommandResult):
                rslot = self.command_waiters.get(msg.ref)
                if rslot is None or getattr(rslot, "identity", identity) != identity:
                    self.counters["dropped_node_frames"] += 1  # a result nobody asked this peer for
                    continue
            await self._on_node_message(identity, msg)

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

    async def _on_node_message(self, identity: bytes, msg: Message) -> None:
        now = trio.current_time()
        if isinstance(msg, CommandResult):
            # Not epoch-checked: inject/heal/status reach a fenced node too
            # (`mmn heal` of a hung node); only the connection asked counts.
            rslot = self.command_waiters.get(msg.ref)
            if rslot is not None and rslot.result is None and rslot.identity == identity:
                self.sessions.touch(identity, now)
                rslot.result = msg
                rslot.event.set()
            return
        if isinstance(msg, Register):
            dup = self._duplicate(identity, msg.id)
            if isinstance(dup, Message):
                await self.send_node(identity, dup)
            elif not dup:
                await self._on_register(identity, msg, now)
            return
        epoch = getattr(msg, "epoch", None)
        try:
            session = self.sessions.lookup(identity, epoch)
        except Refused as exc:
            self.counters["refused"] += 1
            ref = getattr(msg, "id", getattr(msg, "ref", 0))
            if not isinstance(msg, (Ack, Heartbeat)) or exc.code == "fenced":
                await self.send_node(identity, Error(ref=ref, code=exc.code, message=exc.message))
            else:
                self.counters["dropped_node_frames"] += 1
            return
        session.last_seen = now
        name = session.name
        if isinstance(msg, _REQUESTS):
            dup = self._duplicate(identity, msg.id)
            if dup:
                if isinstance(dup, Message):
                    await self.send_node(identity, dup)
                return
        if isinstance(msg, Ack):
            slot = self.ack_waiters.get((name, msg.ref))
            self.publish("ack", node=name, ref=msg.ref, status=msg.status, late=slot is None)
            if slot is None:
                self.counters["acks_late"] += 1  # late, or a duplicate: harmless
            elif slot.ack is None:
                slot.ack = msg
                slot.event.set()
            return
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, DmaRead | DmaWrite):
            await self.send_node(identity, self._dma(name, msg))
            return
        if isinstance(msg, Gup):
            await self._on_gup(identity, name, msg)
            return
        if isinstance(msg, Unsubscribe):
            self._nursery.start_soon(self._unsubscribe, identity, name, msg)
            return
        await self.send_node(identity, self.requests.answer(name, msg))

    async def _on_register(self, identity: bytes, msg: Register, now: float) -> None:
        try:
            check_ops(msg.ops, msg.sleepable)  # before anything changes
        except ValueError as exc:
            await self.send_node(identity, Error(ref=msg.id, code="bad_message", message=str(exc)))
            return
        old = self.sessions.by_name.get(msg.name)
        if old is not None and old.state == "live":
            await self.fence(msg.name, "registered again (restarted)")
        session, _ = self.sessions.register(identity, msg, now)
        self.notifier.add_node(session.name, session.ops, session.sleepable)
        self.publish("registered", node=session.name, kind=session.kind, epoch=session.epoch)
        await self.send_node(
            identity,
            Registered(
                ref=msg.id,
                epoch=session.epoch,
                host_incarnation=self.incarnation,
                heartbeat_ms=self.config.heartbeat_ms,
                ack_deadline_ms=self.config.ack_deadline_ms,
                page_size=self.config.page_size,
            ),
        )

    async def _unsubscribe(self, identity: bytes, name: str, msg: Unsubscribe) -> None:
        # mmu_notifier_unregister: ->release, then nothing more; it waits for
        # the callbacks in flight, here for the operation holding the lock.
        async with self.lock:
            await self.drive(self.notifier.unregister(name, msg.mm))
        await self.send_node(identity, Ok(ref=msg.id))

    def _dma(self, name: str, msg: DmaRead | DmaWrite) -> DmaReply:
        reply = self.requests.dma(name, msg)
        if reply.errno == Errno.ESTALE.value:
            self.publish("stale_access", node=name, mm=msg.mm, addr=msg.addr, pfn=msg.pfn)
        return reply

    async def _on_gup(self, identity: bytes, name: str, msg: Gup) -> None:
        reply = self.requests.gup_fast(name, self.sessions.by_name[name].kind, msg)
        if reply is None:
            self._nursery.start_soon(self._gup_slow, identity, name, msg)
            return
        await self.send_node(identity, reply)

    async def _gup_slow(self, identity: bytes, name: str, msg: Gup) -> None:
        reply = await self.locked(self.requests.gup_slow(name, msg))
        session = self.sessions.by_name.get(name)
        if session is None or session.state != "live" or session.identity != identity:
            self.requests.undeliverable(name, msg, reply)  # fenced meanwhile
            return
        await self.send_node(identity, reply)

    # -- heartbeats --------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        period = self.config.heartbeat_ms / 1000
        liveness = period * self.config.liveness
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for session in self.sessions.silent(now, liveness):
                self.counters["fenced_heartbeat"] += 1
                await self.fence(session.name, f"silent for {now - session.last_seen:.1f}s")
            for session in self.sessions.live():
                await self.send_node(
                    session.identity,
                    Heartbeat(id=next(self._ids), epoch=session.epoch, incarnation=self.incarnation),
                )

    # -- ksmd ----------------------------------------------------------------------

    async def _ksm_loop(self) -> None:
        ksm = self.model.ksm
        while True:
            if ksm.run == 1:
                await self.locked(ksm.scan())
                await trio.sleep(max(ksm.sleep_millisecs, 1) / 1000)
            else:
                self._ksm_wakeup = trio.Event()
                await self._ksm_wakeup.wait()

    # -- admin channel -------------------------------------------------------------

    async def _admin_loop(self, incoming: trio.MemoryReceiveChannel[list[bytes]]) -> None:
        limits = self.config.limits
        rate = guard.RateLimiter(limits.max_rate, limits.rate_burst)
        async for frames in incoming:
            if not rate.allow(frames[0], trio.current_time()):
                self.counters["rate_limited"] += 1
                self.counters["dropped_admin_frames"] += 1
                continue
            if len(frames) != 2:
                self.counters["bad_admin_frames"] += 1
                self.counters["dropped_admin_frames"] += 1
                continue
            identity, frame = frames
            try:
                msg = decode(frame, limits)
                if not isinstance(msg, AdminRequest):
                    raise ProtocolError("bad_message", f"{msg.TYPE} is not an admin request", getattr(msg, "id", None))
                args = check_admin(msg.command, msg.args)
                guard.check_admin_limits(msg.command, args, limits, self.config.page_size, msg.id)
                if self.auth is not None and user_id_of(frames) not in self.auth.admin_keys.values():
                    # ZAP lets only admin keys in; this is the second lock.
                    raise ProtocolError("forbidden", "not an admin key", msg.id)
            except ProtocolError as exc:
                self.counters["bad_admin_frames"] += 1
                reply = AdminReply(ref=exc.ref or 0, ok=False, errno="EINVAL", error=f"{exc.code}: {exc.message}")
                await self._admin_reply(identity, reply)
                continue
            self.counters["admin_requests"] += 1
            self._nursery.start_soon(self._admin_request, identity, msg, args)

    async def _admin_reply(self, identity: bytes, reply: AdminReply) -> None:
        await self._admin_out.send([identity, encode(reply)])

    async def _admin_request(self, identity: bytes, msg: AdminRequest, args: dict[str, Any]) -> None:
        from .admin import ADMIN_HANDLERS

        handler = ADMIN_HANDLERS[msg.command]
        try:
            result = await handler(self, **args)
            reply = AdminReply(ref=msg.id, ok=True, result=result or {})
        except KernelError as exc:
            reply = AdminReply(ref=msg.id, ok=False, errno=exc.errno.value, error=exc.message)
        except Exception as exc:  # a bug must not take the host down
            logger.exception("admin %s failed", msg.command)
            reply = AdminReply(ref=msg.id, ok=False, errno="EIO", error=f"internal error: {exc!r}")
        await self._admin_reply(identity, reply)

    async def relay(self, node: str, command: str, args: dict[str, Any], timeout_ms: int | None = None,
                    *, fenced_too: bool = False) -> CommandResult:
        """Relay an admin command to a node and await its result.

        ``fenced_too``: also to a fenced node still connected (inject, heal).

        Raises:
            KernelError(ESRCH): no live node of that name.
            KernelError(ETIMEDOUT): no result within the command timeout.
        """
        session = self.sessions.by_name.get(node)
        if session is None or (session.state != "live" and not fenced_too):
            raise KernelError(Errno.ESRCH, f"no live node {node!r}")
        cmd = Command(id=next(self._ids), command=command, args=args)
        slot = _ResultSlot(identity=session.identity, control=fenced_too)
        self.command_waiters[cmd.id] = slot
        try:
            await self.send_node(session.identity, cmd)
            timeout = (timeout_ms or self.config.command_timeout_ms) / 1000
            with trio.move_on_after(timeout):
                await slot.event.wait()
        finally:
            self.command_waiters.pop(cmd.id, None)
        if slot.result is None:
            raise KernelError(Errno.ETIMEDOUT, f"node {node!r} did not answer {command} in time")
        return slot.result

    def wake_ksm(self) -> None:
        self._ksm_wakeup.set()


def _ignore(frames: list[bytes], exc: Exception) -> None:
    """An admin client that left before its reply: nothing to do."""


def _fields(msg: Message) -> dict[str, Any]:
    out = {}
    for name in ("id", "mm", "start", "end", "addr", "pfn", "event", "start_id"):
        value = getattr(msg, name, None)
        if value is not None:
            out[name] = value
    return out


async def run_host(config: HostConfig, *, task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Entry point for ``mmn host``: serve until cancelled."""
    host = Host(config)
    await host.serve(task_status=task_status)


__all__ = ["Host", "HostConfig", "run_host"]
