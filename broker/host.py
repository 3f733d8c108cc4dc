"""The host: a thin trio shell around the host core.

Every decision lives in :class:`broker.core.HostCore` (sessions, duplicates,
key binding, routing, the executor of operations, deadlines, heartbeats,
ksmd).  This module owns only what the core must not: the three sockets, the
clock, and carrying out the core's actions.

Tasks (one nursery, all started by :meth:`Host.serve`)::

    node channel   ROUTER  one loop: receive a frame, hand it to the core, send what it says
    admin channel  ROUTER  the same for admin requests
    events         XPUB    published events (only while someone subscribes)
    timer                  sleeps until the core's next deadline, then ``tick``

Ordering argument (why a correct node never makes a stale access): each node
has one DEALER connection and the node loop hands its messages to the core one
at a time, in arrival order, before reading the next.  The core serves a DMA
the moment it is handed it, and an operation resumes only when the ack it
waits for is handed over, so a DMA a node sent before acknowledging an
invalidation is served before the host changes the primary ptes.  The core's
actions are sent in the order the core returned them, through one path per
socket (straight to libzmq when nothing is queued, else the send pump's
queue), so the host's messages to a node keep their order too.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from protocol import Limits, encode
from protocol.codec import encode_within
from protocol.errors import ProtocolError
from protocol.limits import ENV_VARS as LIMIT_ENV
from protocol.messages import AdminReply, Event
from transport import PeerGone, SocketOptions, ZSocket, bind, serve_socket, user_id_of
from transport.curve import DOMAIN_ADMIN, DOMAIN_EVENTS, DOMAIN_NODE, HostAuth, KeyLayout

from .core import Action, CoreConfig, HostCore, Publish, ReplyAdmin, SendNode, admin_result
from .effects import Op

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
        ksm = model.ksm
        ksm.run = config.ksm_run
        ksm.pages_to_scan = config.ksm_pages_to_scan
        ksm.sleep_millisecs = config.ksm_sleep_millisecs
        self.core = HostCore(model, CoreConfig(
            incarnation=self.incarnation,
            page_size=config.page_size,
            heartbeat_ms=config.heartbeat_ms,
            liveness=config.liveness,
            ack_deadline_ms=config.ack_deadline_ms,
            command_timeout_ms=config.command_timeout_ms,
            wrap_change_pte=config.wrap_change_pte,
            limits=config.limits,
        ))
        self.model = model
        self.notifier = model.notifier
        self.auth: HostAuth | None = None
        self._event_seq = 0
        #: Topics the event stream's subscribers want (XPUB); empty: nobody listens.
        self._event_topics: set[bytes] = set()
        self._executing = False
        self._gone: list[bytes] = []
        self._timer_target = math.inf
        self._timer_wake = trio.Event()
        self._in_process_ids = iter(range(1, 1 << 62))
        #: ref -> [event, reply] of admin requests made by :meth:`admin`
        self._in_process: dict[int, list[Any]] = {}

    # the core's state, for tests and the benchmark
    @property
    def sessions(self) -> Any:
        return self.core.sessions

    @property
    def segments(self) -> Any:
        return self.core.segments

    @property
    def counters(self) -> dict[str, int]:
        return self.core.counters

    @property
    def endpoints(self) -> dict[str, str]:
        return self.core.endpoints

    # -- lifecycle -------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the three endpoints and serve until cancelled.

        ``task_status.started`` gets ``{"node", "admin", "events"}`` endpoints
        (the real ports, when 0 asked the OS to choose).

        Concurrency: each socket is owned by a :func:`transport.serve_socket`
        service; everything else talks to it through its channels.  Cancel the
        enclosing scope to stop: operations still open are abandoned with the
        host (a host crash loses every mm).
        """
        cfg = self.config
        core = self.core
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
        else:
            core.config.authenticated = True
            core.config.admin_keys = auth.admin_keys.values()  # a live view
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
                if auth is not None:
                    for sock, channel in zip(sockets, ("node", "admin", "events"), strict=True):
                        monitors.append(monitor(sock))
                        nursery.start_soon(count_handshake_failures, monitors[-1], channel, core.counters)
                # Unbounded queues: the core has already decided by the time
                # its actions are sent, so a send never waits (the core's
                # bounds -- one lock, the ack deadline -- bound the queue).
                node = await nursery.start(
                    partial(serve_socket, sockets[0], on_undeliverable=self._undeliverable,
                            outgoing_buffer=math.inf, direct_incoming=True)
                )
                admin = await nursery.start(partial(serve_socket, sockets[1], on_undeliverable=_ignore,
                                                    outgoing_buffer=math.inf))
                events = await nursery.start(partial(serve_socket, sockets[2], outgoing_buffer=1024))
                self._node_out, self._admin_out, self._events_out = node.outgoing, admin.outgoing, events.outgoing
                self._node_send_now = node.send_now
                core.endpoints.update({"node": node.endpoint, "admin": admin.endpoint, "events": events.endpoint})
                nursery.start_soon(self._node_loop, node.incoming)
                nursery.start_soon(self._admin_loop, admin.incoming)
                nursery.start_soon(self._subscriptions_loop, events.incoming)
                nursery.start_soon(self._timer_loop)
                logger.info("host %s serving %s", self.incarnation, core.endpoints)
                self._execute(core.start(trio.current_time()))
                task_status.started(dict(core.endpoints))
        finally:
            core.close()
            for sock in [*sockets, *monitors]:
                sock.close()
            if auth is not None:
                auth.stop()
            self.model.close()

    # -- carrying out the core's actions ----------------------------------------

    def _admin_frame(self, reply: AdminReply) -> bytes:
        """The reply's frame, or an error reply in its place when the client
        could not take it (no reply exceeds the frame limit: ``status``
        pages, and this is the net under it)."""
        try:
            return encode_within(reply, self.core.config.limits)
        except ProtocolError as exc:
            self.core.counters["oversized_replies"] += 1
            return encode(AdminReply(ref=reply.ref, ok=False, errno="EIO",
                                     error=f"{exc.message}; ask for less (status --mm, --node, --cursor)"))

    def _execute(self, actions: list[Action]) -> None:
        """Send what the core said, in its order; then let the timer know if
        the core's next deadline moved earlier.

        Concurrency: synchronous, never blocks (the queues are unbounded).
        A peer found gone while sending is handed to the core afterwards, not
        in the middle, so the order of the rest is kept.
        """
        if self._executing:
            raise RuntimeError("the host's actions are not reentrant")
        self._executing = True
        try:
            while True:
                for action in actions:
                    if type(action) is SendNode:
                        frames = [action.identity, encode(action.msg)]
                        if not self._node_send_now(frames):  # straight to libzmq when nothing is queued
                            self._node_out.send_nowait(frames)
                    elif type(action) is ReplyAdmin:
                        if action.client is _IN_PROCESS:
                            waiter = self._in_process.pop(action.reply.ref)
                            waiter[1] = action.reply
                            waiter[0].set()
                        else:
                            self._admin_out.send_nowait([action.client, self._admin_frame(action.reply)])
                    elif type(action) is Publish:
                        self._publish(action)
                if not self._gone:
                    break
                now = trio.current_time()
                actions = []
                for identity in self._gone:
                    actions += self.core.peer_gone(identity, now)
                self._gone.clear()
        finally:
            self._executing = False
        deadline = self.core.next_deadline()
        if deadline is not None and deadline < self._timer_target:
            self._timer_wake.set()

    def _undeliverable(self, frames: list[bytes], exc: Exception) -> None:
        """The node channel could not route to a peer: that node is gone."""
        if isinstance(exc, PeerGone):
            if self._executing:
                self._gone.append(exc.identity)
            else:
                self._execute(self.core.peer_gone(exc.identity, trio.current_time()))
        else:
            logger.warning("node channel send failed: %s", exc)

    def _publish(self, event: Publish) -> None:
        self._event_seq += 1
        clean = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in event.fields.items()}
        frames = [event.kind.encode(), encode(Event(seq=self._event_seq, kind=event.kind, fields=clean))]
        try:
            self._events_out.send_nowait(frames)
        except trio.WouldBlock:
            self.core.counters["events_dropped"] = self.core.counters.get("events_dropped", 0) + 1

    def publish(self, kind: str, /, **fields: Any) -> None:
        """Put an event on the stream (dropped if the stream is backed up)."""
        self.core.publish(kind, **fields)
        self._execute(self.core.drain())

    # -- loops -------------------------------------------------------------------

    async def _node_loop(self, incoming: Any) -> None:
        core, authenticated = self.core, self.auth is not None
        async for frames in incoming:
            key = user_id_of(frames) if authenticated else None
            self._execute(core.receive_node_frame(frames, key, trio.current_time()))

    async def _admin_loop(self, incoming: trio.MemoryReceiveChannel[list[bytes]]) -> None:
        core, authenticated = self.core, self.auth is not None
        async for frames in incoming:
            key = user_id_of(frames) if authenticated else None
            self._execute(core.receive_admin_frame(frames, key, trio.current_time()))

    async def _timer_loop(self) -> None:
        """Sleep until the core's next deadline (or until an event brings an
        earlier one), then tick."""
        core = self.core
        while True:
            deadline = core.next_deadline()
            self._timer_target = math.inf if deadline is None else deadline
            self._timer_wake = trio.Event()
            with trio.move_on_at(self._timer_target):
                await self._timer_wake.wait()
            now = trio.current_time()
            if now >= self._timer_target:
                self._execute(core.tick(now))

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
            self.core.listening = bool(self._event_topics)

    # -- for the benchmark and tests ---------------------------------------------

    async def admin(self, command: str, **args: Any) -> dict[str, Any]:
        """An admin command from inside this process (the benchmark), through
        the core exactly as one from the admin socket.

        Raises:
            KernelError: the reply's errno.
        """
        ref = next(self._in_process_ids)
        waiter = self._in_process[ref] = [trio.Event(), None]
        self._execute(self.core.submit_admin(_IN_PROCESS, ref, command, args, trio.current_time()))
        await waiter[0].wait()
        return admin_result(waiter[1])

    async def locked(self, op: Op[Any]) -> Any:
        """Run a mutating operation under the core's mm lock, as an admin
        command does, and return what it returns (or raise what it raises)."""
        done = trio.Event()
        handle = self.core.submit(op, "op", lambda value, error: done.set())
        self._execute(self.core.drain())
        await done.wait()
        if handle.error is not None:
            raise handle.error
        return handle.value


#: The client of admin requests made in this process (:meth:`Host.admin`).
_IN_PROCESS = object()


def _ignore(frames: list[bytes], exc: Exception) -> None:
    """An admin client that left before its reply: nothing to do."""


# -- refused handshakes (CURVE), from libzmq's socket monitor -------------------

_FAILED: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "zap_refused",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
}
_MONITORED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def monitor(zsock: ZSocket) -> ZSocket:
    """A monitor of ``zsock``'s refused handshakes (call before serving it)."""
    return ZSocket(zsock.socket.get_monitor_socket(_MONITORED))


async def count_handshake_failures(mon: ZSocket, channel: str, counters: MutableMapping[str, int]) -> None:
    """Count refused handshakes of one channel until cancelled:

    * ``zap_refused_<channel>``: CURVE clients whose key the ZAP handler
      refused (unknown key, or a node key on the admin channel);
    * ``handshake_failed_<channel>``: clients without CURVE, or garbage.

    A refused client's libzmq retries its connection, so one persistent
    intruder counts once per attempt.
    """
    for name in ("zap_refused", "handshake_failed"):
        counters.setdefault(f"{name}_{channel}", 0)
    try:
        while True:
            frames = await mon.recv_multipart()
            try:
                event = parse_monitor_message(frames)["event"]
            except Exception:  # noqa: BLE001 - a malformed monitor message is nobody's fault
                continue
            failed = _FAILED.get(int(event))
            if failed is not None:
                counters[f"{failed}_{channel}"] += 1
                logger.info("%s channel: refused a handshake (%s)", channel, failed)
    except trio.ClosedResourceError:
        return


async def run_host(config: HostConfig, *, task_status: trio.TaskStatus[dict[str, str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Entry point for ``mmn host``: serve until cancelled."""
    host = Host(config)
    await host.serve(task_status=task_status)


__all__ = ["Host", "HostConfig", "run_host"]
