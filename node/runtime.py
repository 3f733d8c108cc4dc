"""A node process: the trio shell around one sans-I/O secondary MMU.

It moves messages and keeps time; every decision is the kind's
(:mod:`node.kvm`, :mod:`node.gru`, :mod:`node.xpmem`).

Life of a node::

    connect DEALER --Register--> (no Registered within the deadline:
         ^                         new socket, backoff doubles to a cap)
         |                      Registered(epoch, host incarnation)
         |                             |
         |        session: receive loop + heartbeats + liveness watchdog
         |                             |
         +---- host silent past liveness, told it is fenced (Fenced, or an
               Error(fenced|unregistered) refusing a message of this
               session), or a heartbeat from a new host incarnation: drop
               every translation, back off, register anew

Only what the host sends a live session counts as traffic for the liveness
watchdog: a refusal says the opposite.  (A node whose connection was reset
kept getting ``Error(fenced)`` for its heartbeats on the connection libzmq
re-made by itself; counted as traffic and otherwise ignored, it stayed
fenced until the process was restarted.)

Backoff: every new registration after a lost session waits the backoff,
which doubles (to a cap) while sessions keep ending young -- younger than
their liveness window -- so a node the host keeps refusing does not spin --
and is back to its initial value after a session that lasted.  The cap is
at most a quarter of the liveness window (:func:`backoff_cap`): a node reset
or fenced several times in a row is still live again within its window.

Heartbeats: the node answers each of the host's heartbeats at once, from
the receive call that read it, and beats on its own only to probe a host
that has said nothing for 1.5 periods (see ``_heartbeats``).

In-line kinds (kvm, gru) acknowledge a start, change_pte or end inside the
receive call that read it: no memory-channel hop, no task, no schedule point
in between (the Ack goes straight to libzmq when nothing is queued).  A sleepable kind (xpmem) may hold a start's ack until its
in-flight accesses drain: the ack is among the outputs of the ``receive`` of
the last ``DmaReply``.

Failure injection (``mmn inject``) lives here, between the kind and the
socket, so the kinds stay honest: ``drop-acks``, ``delay-acks``,
``duplicate``, ``hang``, ``crash``, ``partition``, ``slow-drain``.

* ``drop-acks`` / ``delay-acks``: each Ack, with probability ``rate``, is
  dropped / sent ``delay_ms`` late.
* ``duplicate``: each message, with probability ``rate``, is sent twice, and
  each notifier message or reply from the host is handled twice: both sides
  must answer duplicates idempotently.
* ``hang``: the node stops processing (no heartbeats, nothing handled); what
  arrives is held, in order, and handled when healed.
* ``partition``: nothing passes either way; messages are held in order (as
  TCP would, the connection surviving), heartbeats lost.  Healed before the
  deadlines, nothing is lost and nobody is fenced; healed after, the node
  finds its Fenced among what was held and registers anew.
* ``crash``: the process exits (status 17) just after answering the inject.
* ``slow-drain`` (xpmem): a start's ack leaves ``delay_ms`` late.

Control commands (``inject``, ``heal``, ``status``) and their results pass
through a hang or a partition: that is how ``mmn heal`` reaches the node.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
import zmq

from protocol import Limits, ProtocolError, decode, encode
from protocol.admin import INJECT_KINDS
from protocol.codec import encode_within
from protocol.messages import (
    Ack,
    Command,
    CommandResult,
    Error,
    Fenced,
    Heartbeat,
    InvalidateRangeStart,
    Message,
    Registered,
)
from protocol.types import Errno, KernelError
from transport import SocketOptions, connect, serve_socket
from transport.curve import CurveClient, KeyError_, KeyLayout

from .base import SESSION_REFUSALS, Completion, Output, SecondaryMMU
from .commands import start_command
from .kinds import node_class

logger = logging.getLogger(__name__)


@dataclass
class NodeConfig:
    """Everything configurable about a node.  Times are milliseconds."""

    kind: str = "kvm"
    name: str = ""
    host: str = "tcp://127.0.0.1:7781"
    #: Until the host's Registered says otherwise.
    heartbeat_ms: int = 500
    #: Host heartbeats the node may miss before it drops everything and reconnects.
    liveness: int = 6
    register_timeout_ms: int = 2000
    backoff_initial_ms: int = 100
    backoff_max_ms: int = 4000
    limits: Limits = field(default_factory=Limits)
    seed: int | None = None
    #: CURVE (DESIGN §7): a ``mmn keygen`` directory (``nodes/NAME.key_secret``,
    #: else ``nodes/KIND.key_secret``, and ``host/host.key``), or the two files.
    keys_dir: str | None = None
    key: str | None = None
    host_key: str | None = None
    #: Plain TCP even if keys are configured.
    insecure: bool = False
    #: A clean shutdown waits this long for the host to take back what the
    #: node holds (an hmm node's device-private pages), then exits anyway.
    evict_timeout_ms: int = 2000

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> NodeConfig:
        env = dict(os.environ if env is None else env)
        cfg = cls()
        if env.get("MMN_MAX_FRAME"):
            cfg.limits = Limits.from_env({"MMN_MAX_FRAME": env["MMN_MAX_FRAME"]})
        if env.get("MMN_INSECURE", "") not in ("", "0"):
            cfg.insecure = True
        for name, var in (
            ("kind", "MMN_KIND"),
            ("name", "MMN_NAME"),
            ("host", "MMN_HOST_ENDPOINT"),
            ("heartbeat_ms", "MMN_HEARTBEAT_MS"),
            ("liveness", "MMN_LIVENESS"),
            ("keys_dir", "MMN_KEYS_DIR"),
            ("key", "MMN_NODE_KEY"),
            ("host_key", "MMN_HOST_KEY"),
            ("evict_timeout_ms", "MMN_EVICT_TIMEOUT_MS"),
        ):
            if env.get(var):
                value: Any = env[var]
                if isinstance(getattr(cfg, name), int):
                    try:
                        value = int(value)
                    except ValueError:
                        raise ValueError(f"{var} must be an integer, not {env[var]!r}") from None
                setattr(cfg, name, value)
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
        if not cfg.name:
            cfg.name = default_name(cfg.kind, env)
        return cfg

    def security(self) -> CurveClient | None:
        """The CURVE client hook, or None for plain TCP (``insecure``, or no
        keys configured).

        Raises:
            KeyError_: a key file is missing or malformed.
        """
        if self.insecure or not (self.keys_dir or self.key or self.host_key):
            return None
        layout = KeyLayout(Path(self.keys_dir)) if self.keys_dir else None
        key = self.key or (layout.node_secret(self.name, self.kind) if layout else None)
        host_key = self.host_key or (layout.host_public if layout else None)
        if key is None or host_key is None:
            raise KeyError_("a node needs its secret key and the host's public key (or --keys DIR)")
        return CurveClient.from_files(key, host_key)


def backoff_cap(cfg: NodeConfig, window: float) -> float:
    """The longest wait before registering anew: ``backoff_max_ms``, but never
    more than a quarter of the liveness window (``window`` seconds), so that a
    node whose sessions keep ending young -- resets, fences in a row -- is
    still live again within its window once the host takes it."""
    return min(cfg.backoff_max_ms / 1000, max(cfg.backoff_initial_ms / 1000, window / 4))


def reconnect_backoff(cfg: NodeConfig, backoff: float, lasted: float | None, window: float) -> float:
    """The wait before the next registration: back to the initial value after
    a session that lasted its liveness window (``lasted`` seconds; None when
    the registration itself failed), else ``backoff`` within the cap."""
    if lasted is not None and lasted > window:
        return cfg.backoff_initial_ms / 1000  # that session lasted: start over
    return min(backoff, backoff_cap(cfg, window))


def default_name(kind: str, env: dict[str, str]) -> str:
    """The name of a node started without ``MMN_NAME``/``--name``.

    With ``MMN_NAME_FROM_HOSTNAME=1`` (the container image sets it):
    ``KIND-HOSTNAME``.  A container's hostname is its id, so every container
    of ``docker compose up --scale xpmem=N`` gets its own name, and a
    restarted container registers again under the name it had.  Otherwise
    ``KIND-`` and 6 random hex digits, so several unnamed nodes of one kind
    can run on one machine.
    """
    if env.get("MMN_NAME_FROM_HOSTNAME", "") not in ("", "0"):
        host = socket.gethostname().split(".")[0]
        if host and not any(c.isspace() for c in host):
            return f"{kind}-{host}"
    return f"{kind}-{uuid.uuid4().hex[:6]}"


@dataclass
class Injection:
    """One injected failure (DESIGN §5)."""

    kind: str
    rate: float = 1.0
    delay_ms: int = 0
    until: float | None = None  # trio clock; None = until healed

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rate": self.rate, "delay_ms": self.delay_ms}
        if self.until is not None:
            out["remaining_s"] = round(max(0.0, self.until - trio.current_time()), 1)
        return out


#: Relayed commands that pass a hang or a partition (the control plane).
CONTROL_COMMANDS = frozenset({"inject", "heal", "status"})


class _Reconnect(Exception):
    """Leave the session: drop everything and register anew."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class NodeRuntime:
    """Runs one kind against a host.  ``await nursery.start(runtime.run)``."""

    def __init__(self, config: NodeConfig, mmu: SecondaryMMU | None = None) -> None:
        self.config = config
        self.mmu = mmu or _make_mmu(config)
        self.incarnation = uuid.uuid4().hex
        self.host_incarnation: str | None = None
        self.injected: dict[str, Injection] = {}
        self.random = random.Random(config.seed)
        #: command token -> Command id waiting for its Completion
        self._commands: dict[int, int] = {}
        self._send: trio.MemorySendChannel[list[bytes]] | None = None
        self._send_now: Callable[[list[bytes]], bool] = lambda frames: False
        self.sessions = 0
        self.last_host_traffic = 0.0
        self.counters = {"reconnects": 0, "dropped_acks": 0, "delayed_acks": 0, "duplicated": 0,
                         "partition_dropped": 0, "bad_frames": 0, "stale_fences": 0, "refused": 0,
                         "oversized_replies": 0}
        #: Set (and replaced) whenever the injections change: injected, healed,
        #: or one ran out.  What waits for a hang or partition to end waits here.
        self._injections_changed = trio.Event()
        #: (delay in seconds, what to do then): the connection's _run_later task
        #: runs each in its own nursery (late acks, an injected crash)
        self._later: trio.MemorySendChannel[tuple[float, Callable[[], Awaitable[None]]]] | None = None
        #: Held while hung or partitioned, handled / sent in order once healed.
        self._held_in: deque[Message] = deque()
        self._held_out: deque[Message] = deque()
        self._rx = trio.Lock()
        #: Set to stop cleanly (SIGTERM): hand back what the kind holds, then
        #: :meth:`run` returns (see :meth:`_leave_when_stopping`).
        self.stopping = trio.Event()
        self._in_session = False
        self._leaving: tuple[int, trio.Event] | None = None
        #: the kind's shutdown Completion (None: nothing to hand back, or no answer in time)
        self.left: Completion | None = None

    # -- failure injection -------------------------------------------------------

    def _active(self, kind: str) -> Injection | None:
        inj = self.injected.get(kind)
        if inj is None:
            return None
        if inj.until is not None and trio.current_time() >= inj.until:
            del self.injected[kind]
            self._changed()
            return None
        return inj

    def _hit(self, inj: Injection | None) -> bool:
        return inj is not None and self.random.random() < inj.rate

    def inject(self, kind: str, rate: float, delay_ms: int, for_s: float | None) -> None:
        if kind not in INJECT_KINDS:
            raise KernelError(Errno.EINVAL, f"unknown injection {kind!r}")
        if kind == "slow-drain" and self.mmu.kind != "xpmem":
            raise KernelError(Errno.EINVAL, "slow-drain is for xpmem nodes")
        until = trio.current_time() + for_s if for_s else None
        self.injected[kind] = Injection(kind, rate, delay_ms, until)
        self._changed()
        if kind == "crash":
            # Answer the inject first, then die: the caller learns it landed.
            self._run_after(0.05, self._crash)

    async def _crash(self) -> None:
        logger.warning("%s: injected crash", self.config.name)
        os._exit(17)

    def _changed(self) -> None:
        self._injections_changed.set()
        self._injections_changed = trio.Event()

    def _hold_ends(self) -> float:
        """When the current hang / partition runs out (inf: when healed)."""
        holds = [inj for inj in (self._active("hang"), self._active("partition")) if inj is not None]
        return min((inj.until if inj.until is not None else math.inf for inj in holds), default=math.inf)

    def _holding(self) -> bool:
        """Hung or partitioned: host messages are held, not handled."""
        return self._active("hang") is not None or self._active("partition") is not None

    def heal(self) -> None:
        self.injected.clear()
        self._changed()

    def injected_status(self) -> dict[str, Any]:
        for kind in list(self.injected):
            self._active(kind)
        return {kind: inj.describe() for kind, inj in self.injected.items()}

    # -- sending ---------------------------------------------------------------

    async def send(self, msg: Message, *, control: bool = False, late: bool = False) -> None:
        """Send one message to the host, through the injected failures
        (``control``: a control command's result, which passes a partition)."""
        assert self._send is not None
        if not self.injected and not late:
            # The hot path, nothing injected: the same send as below without
            # the injection checks, so the ordering argument below holds as is.
            frame = self._frame(msg) if type(msg) is CommandResult else encode(msg)
            if not self._send_now([frame]):
                await self._send.send([frame])
            return
        if not control and self._active("partition") is not None:
            if isinstance(msg, Heartbeat):
                self.counters["partition_dropped"] += 1
            else:
                self._held_out.append(msg)
            return
        if late:
            await self._send.send([encode(msg)])
            return
        if isinstance(msg, Ack):
            if self._hit(self._active("drop-acks")):
                self.counters["dropped_acks"] += 1
                return
            delay = self._active("delay-acks")
            if delay is not None and self._hit(delay):
                self.counters["delayed_acks"] += 1
                self._send_later(msg, delay.delay_ms / 1000)
                return
        frame = self._frame(msg) if type(msg) is CommandResult else encode(msg)
        # Ordering.  A DMA this node sent before an Ack is served by the host
        # before the host mutates what the Ack lets it mutate, because:
        # (1) every message of the session leaves in the order it is sent
        #     here: send_now queues in libzmq only when nothing sent earlier
        #     is still in the channel or the send pump (zsock.serve_socket),
        #     else the frame goes behind them on the channel, and a late
        #     (delayed) Ack always takes the channel;
        # (2) one DEALER socket, one ROUTER peer, one TCP connection: libzmq
        #     delivers a pipe's messages in order;
        #     (The receive path does not change this: the host's node loop
        #     and this session each take one message at a time from their
        #     socket, in libzmq's order, and handle it to the end before
        #     the next; a receive woken by the FD tries libzmq at once,
        #     which hands over the oldest message or none, see
        #     transport/zsock.py rule 1.)
        # (3) the host core handles one connection's frames in arrival order,
        #     each to the end (broker/core.py _on_node_message answers a
        #     DmaRead/DmaWrite against the primary as it is, synchronously),
        #     and the operation waiting on this Ack resumes -- and mutates --
        #     only when the Ack itself is handled, after the DMA.
        # test_integration's many-concurrent-faults-and-accesses test would
        # catch a reordering: a DMA overtaken by its Ack reaches a freed or
        # re-used frame and the host counts a stale access.
        if not self._send_now([frame]):  # straight to libzmq when nothing is queued
            await self._send.send([frame])
        if self._hit(self._active("duplicate")):
            self.counters["duplicated"] += 1
            await self._send.send([frame])

    def _frame(self, result: CommandResult) -> bytes:
        """A command's result, or an error in its place when the host could
        not take it: a frame over the limit would cost this node its
        connection (libzmq drops a peer that sends more than ``MAXMSGSIZE``)."""
        try:
            return encode_within(result, self.config.limits)
        except ProtocolError as exc:
            self.counters["oversized_replies"] += 1
            return encode(CommandResult(ref=result.ref, ok=False, errno="EIO",
                                        error=f"{exc.message}; ask for less (a page: mm, cursor, limit)"))

    def _send_later(self, msg: Message, delay: float) -> None:
        self._run_after(delay, partial(self.send, msg, late=True))

    def _run_after(self, delay: float, action: Callable[[], Awaitable[None]]) -> None:
        """Have the connection's :meth:`_run_later` task do ``action`` in
        ``delay`` seconds (dropped if the connection ends first)."""
        assert self._later is not None
        self._later.send_nowait((delay, action))

    async def _run_later(self, nursery: trio.Nursery,
                         later: trio.MemoryReceiveChannel[tuple[float, Callable[[], Awaitable[None]]]]) -> None:
        """Run each delayed action in ``nursery`` (the connection's), as it comes."""
        async for delay, action in later:
            nursery.start_soon(self._after, delay, action)

    @staticmethod
    async def _after(delay: float, action: Callable[[], Awaitable[None]]) -> None:
        await trio.sleep(delay)
        await action()

    async def emit(self, outputs: list[Output]) -> None:
        """Send the messages among ``outputs`` and answer finished commands."""
        for out in outputs:
            if isinstance(out, Completion):
                ref = self._commands.pop(out.token, None)
                if ref is None:
                    if self._leaving is not None and out.token == self._leaving[0]:
                        self.left = out
                        self._leaving[1].set()
                    continue
                if out.error is not None:
                    result = CommandResult(ref=ref, ok=False, errno=out.error.errno.value, error=out.error.message)
                else:
                    result = CommandResult(ref=ref, ok=True, result=out.result or {})
                await self.send(result)
            else:
                await self.send(out)

    # -- the service -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Register, serve, and re-register after every loss, until cancelled.

        ``task_status.started(name)`` after the first registration.

        Concurrency: owns its DEALER (through :func:`transport.serve_socket`);
        the kind is driven only from this runtime's tasks, one call at a time.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_outside_sessions, nursery.cancel_scope)
            await self._run(task_status)
            nursery.cancel_scope.cancel()

    async def _stop_outside_sessions(self, scope: trio.CancelScope) -> None:
        """Stopping between sessions: nothing is held, stop at once (in a
        session, :meth:`_leave_when_stopping` hands things back first)."""
        await self.stopping.wait()
        if not self._in_session:
            scope.cancel()

    async def _run(self, task_status: trio.TaskStatus[str]) -> None:
        cfg = self.config
        backoff = cfg.backoff_initial_ms / 1000
        window = cfg.heartbeat_ms / 1000 * cfg.liveness  # until a Registered says the host's period
        started = False
        security = cfg.security()
        if security is None:
            logger.warning("%s: no CURVE keys configured: plain TCP to %s", cfg.name, cfg.host)
        while True:
            registered: Registered | None = None
            lasted = 0.0
            options = SocketOptions.from_limits(cfg.limits)
            sock = connect(zmq.DEALER, cfg.host, options=options, security=security)
            try:
                async with trio.open_nursery() as nursery:
                    self._later, later = trio.open_memory_channel(math.inf)
                    nursery.start_soon(self._run_later, nursery, later)
                    channels = await nursery.start(partial(serve_socket, sock, direct_incoming=True))
                    self._send = channels.outgoing
                    self._send_now = channels.send_now
                    registered = await self._register(channels.incoming)
                    if registered is None:
                        nursery.cancel_scope.cancel()
                    else:
                        if not started:
                            started = True
                            task_status.started(cfg.name)
                        t0 = trio.current_time()
                        reason = await self._session(nursery, channels.incoming, registered)
                        lasted = trio.current_time() - t0
                        logger.warning("%s: leaving session: %s", cfg.name, reason)
                        nursery.cancel_scope.cancel()
            finally:
                sock.close()
                self._fail_commands("session lost")
            if self.stopping.is_set():
                return
            if registered is not None:
                window = registered.heartbeat_ms / 1000 * cfg.liveness
            backoff = reconnect_backoff(cfg, backoff, lasted if registered is not None else None, window)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, backoff_cap(cfg, window))
            self.counters["reconnects"] += 1

    async def _register(self, incoming: trio.MemoryReceiveChannel[list[bytes]]) -> Registered | None:
        msg = self.mmu.make_register(self.incarnation)
        await self._send.send([encode(msg)])  # type: ignore[union-attr]
        with trio.move_on_after(self.config.register_timeout_ms / 1000):
            async for frames in incoming:
                reply = self._decode(frames)
                if isinstance(reply, Registered) and reply.ref == msg.id:
                    return reply
                if reply is not None and getattr(reply, "ref", None) == msg.id:
                    logger.error("%s: registration refused: %s", self.config.name, reply)
                    return None
        logger.info("%s: no answer from %s, retrying", self.config.name, self.config.host)
        return None

    def _decode(self, frames: list[bytes]) -> Message | None:
        if len(frames) != 1:
            self.counters["bad_frames"] += 1
            return None
        try:
            return decode(frames[0], self.config.limits)
        except ProtocolError as exc:
            self.counters["bad_frames"] += 1
            logger.warning("%s: bad frame from host: %s", self.config.name, exc)
            return None

    async def _session(self, nursery: trio.Nursery, incoming: trio.MemoryReceiveChannel[list[bytes]],
                       registered: Registered) -> str:
        if self.host_incarnation is not None and registered.host_incarnation != self.host_incarnation:
            logger.warning("%s: new host incarnation: every translation dropped", self.config.name)
        self.host_incarnation = registered.host_incarnation
        await self.emit(self.mmu.receive(registered))  # drops everything: a new session
        self.sessions += 1
        period = registered.heartbeat_ms / 1000
        liveness = period * self.config.liveness
        self.last_host_traffic = trio.current_time()
        nursery.start_soon(self._heartbeats, period)
        reason = "host channel closed"
        rx = self._rx
        self._in_session = True
        try:
            async with trio.open_nursery() as inner:
                inner.start_soon(self._leave_when_stopping)
                inner.start_soon(self._watchdog, liveness)
                inner.start_soon(self._release_when_healed)
                async for frames in incoming:
                    msg = self._decode(frames)
                    if msg is None:
                        continue
                    if isinstance(msg, Command) and msg.command in CONTROL_COMMANDS:
                        await self._on_command(msg)
                        if msg.command == "heal":
                            async with self._rx:
                                await self._release_held()
                        continue
                    if self.injected and self._holding():
                        self._held_in.append(msg)
                        continue
                    # The hot path: handled and answered in this receive call.
                    # The lock is taken without a schedule point when free
                    # (``async with`` would yield on every message): only
                    # _release_when_healed contends for it.
                    try:
                        rx.acquire_nowait()
                    except trio.WouldBlock:
                        await rx.acquire()
                    try:
                        if self._held_in or self._held_out:
                            await self._release_held()
                        self._heard(msg)
                        await self._on_message(msg)
                        if (self.injected and self._hit(self._active("duplicate"))
                                and not isinstance(msg, (Command, Heartbeat))):
                            self.counters["duplicated"] += 1
                            await self._on_message(msg)
                    finally:
                        rx.release()
        except* _Reconnect as group:
            first = group.exceptions[0]
            reason = first.reason if isinstance(first, _Reconnect) else str(first)
        finally:
            self._in_session = False
        self._held_in.clear()  # of a session that is over
        self._held_out.clear()
        await self.emit(self.mmu.drop_all(reason))
        return reason

    async def _leave_when_stopping(self) -> None:
        """A clean shutdown: the kind hands back what it holds (an hmm
        node's device-private pages, lib/test_hmm.c ``dmirror_fops_release``)
        while this session goes on serving the host's requests, for at most
        ``evict_timeout_ms``; then the session ends and :meth:`run` returns.
        A host that does not answer in time finds the node gone and poisons
        what was left, as for a crash."""
        await self.stopping.wait()
        async with self._rx:
            token, outputs = self.mmu.shutdown()
            if token is not None:
                done = trio.Event()
                self._leaving = (token, done)
            await self.emit(outputs)
        if token is not None:
            with trio.move_on_after(self.config.evict_timeout_ms / 1000) as waited:
                await done.wait()
            if waited.cancelled_caught:
                logger.warning("%s: the host did not take back what the node holds within %d ms; leaving anyway",
                               self.config.name, self.config.evict_timeout_ms)
            else:
                logger.info("%s: handed back before leaving: %s", self.config.name,
                            self.left.result if self.left and self.left.error is None else self.left)
        raise _Reconnect("stopped")

    async def _release_held(self) -> None:
        """Healed: send what a partition held, then handle what arrived
        meanwhile, in order.  Call with ``self._rx`` held."""
        if self._holding():
            return
        while self._held_out:
            await self.send(self._held_out.popleft(), late=True)
        while self._held_in and not self._holding():
            msg = self._held_in.popleft()
            self._heard(msg)
            await self._on_message(msg)

    async def _release_when_healed(self) -> None:
        """Release what was held once a hang or partition ends (healed, or
        its ``--for`` ran out) even if nothing more arrives.

        Waits for the injections to change, or for the hold's end time.
        """
        while True:
            changed = self._injections_changed
            if self._holding():
                with trio.move_on_at(self._hold_ends()):
                    await changed.wait()
                continue
            if self._held_in or self._held_out:
                async with self._rx:
                    await self._release_held()
                continue
            await changed.wait()

    async def _heartbeats(self, period: float) -> None:
        """Probe a host gone quiet.

        A live session's host heartbeats every node each period, all at
        once, and the node answers each at once (:meth:`_on_message`): the
        host's silence check sees the node every period, and the answers
        reach the host in one burst that it drains in one wake-up.  (A node
        beating on its own timer, out of phase with the others, cost the host
        one wake-up per node per period: 64 idle nodes, 4.8x the CPU of raw
        pyzmq exchanging the same messages.)  So in a live session this sends
        nothing.  It speaks only when the host has said nothing for
        1.5 periods, at most once a period: a host that no longer holds this
        session (restarted, or it fenced a connection libzmq re-made under
        us) sends no heartbeats, and answers the probe with the refusal that
        makes the node register anew (``SESSION_REFUSALS``) long before the
        watchdog's liveness window runs out.
        """
        quiet = 1.5 * period
        probed = -math.inf
        while True:
            await trio.sleep(period / 2)
            now = trio.current_time()
            if now - self.last_host_traffic < quiet or now - probed < period:
                continue
            if self._active("hang") is None and not self._held_in:
                probed = now
                await self._beat()

    async def _beat(self) -> None:
        await self.send(Heartbeat(id=self.mmu.next_id(), epoch=self.mmu.epoch))

    async def _watchdog(self, liveness: float) -> None:
        while True:
            await trio.sleep(liveness / 4)
            if self._holding() or self._held_in:
                # Hung or partitioned: the session stays, so that `mmn heal`
                # reaches the node; what the host sent meanwhile (a Fenced,
                # if it gave up on the node) is handled once healed.
                continue
            silent = trio.current_time() - self.last_host_traffic
            if silent > liveness:
                raise _Reconnect(f"host silent for {silent:.1f}s")

    def _heard(self, msg: Message) -> None:
        """Note traffic from the host for the watchdog -- unless ``msg`` says
        the host holds no session of ours (a Fenced, a refusal)."""
        if isinstance(msg, Fenced) or (isinstance(msg, Error) and msg.code in SESSION_REFUSALS):
            return
        self.last_host_traffic = trio.current_time()

    async def _on_message(self, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            if msg.incarnation and msg.incarnation != self.host_incarnation:
                raise _Reconnect("new host incarnation")
            if not self._held_in:  # answered at once (see _heartbeats); of those a
                await self._beat()  # hang or partition held, only the last
            return
        if isinstance(msg, (Fenced, Error)) and self.mmu.ends_session(msg):
            await self.emit(self.mmu.receive(msg))  # drops every translation
            if isinstance(msg, Fenced):
                raise _Reconnect(f"fenced: {msg.reason}")
            self.counters["refused"] += 1
            raise _Reconnect(f"refused by the host ({msg.code}: {msg.message})")
        if isinstance(msg, Fenced):
            # The fence of a previous session (a restarted process reusing
            # the routing id gets the host's Fenced for its predecessor):
            # this session is not fenced.
            self.counters["stale_fences"] += 1
            return
        if isinstance(msg, Command):
            await self._on_command(msg)
            return
        outputs = self.mmu.receive(msg)
        slow = self._active("slow-drain")
        if isinstance(msg, InvalidateRangeStart) and slow is not None and self._hit(slow):
            # An xpmem node that takes long to drain: its ack leaves late.
            acks = [o for o in outputs if isinstance(o, Ack)]
            await self.emit([o for o in outputs if not isinstance(o, Ack)])
            for ack in acks:
                self._send_later(ack, slow.delay_ms / 1000)
            return
        await self.emit(outputs)

    # -- relayed admin commands --------------------------------------------------

    async def _on_command(self, cmd: Command) -> None:
        control = cmd.command in CONTROL_COMMANDS
        try:
            token, outputs = self._start_command(cmd)
        except KernelError as exc:
            await self.send(CommandResult(ref=cmd.id, ok=False, errno=exc.errno.value, error=exc.message), control=control)
            return
        except (KeyError, TypeError, ValueError) as exc:
            await self.send(CommandResult(ref=cmd.id, ok=False, errno="EINVAL", error=f"bad arguments: {exc}"),
                            control=control)
            return
        if token is None:  # answered at once
            await self.send(CommandResult(ref=cmd.id, ok=True, result=outputs), control=control)
            return
        self._commands[token] = cmd.id
        await self.emit(outputs)

    def _start_command(self, cmd: Command) -> tuple[int | None, Any]:
        """The shell's commands here (inject, heal, its part of status); the
        rest through ``node.commands``, the table the in-process cluster runs."""
        a = cmd.args
        if cmd.command == "inject":
            for_s = float(a["for_s"]) if a.get("for_s") else None
            self.inject(str(a["kind"]), float(a.get("rate", 1.0)), int(a.get("delay_ms", 0)), for_s)
            return None, {"injected": self.injected_status()}
        if cmd.command == "heal":
            self.heal()
            return None, {"injected": {}}
        token, outputs = start_command(self.mmu, cmd.command, dict(a))
        if cmd.command == "status":
            outputs["injected"] = self.injected_status()
            outputs["counters"] = {**outputs.get("counters", {}), **self.counters}
        return token, outputs

    def _fail_commands(self, reason: str) -> None:
        """Commands in flight when a session ends: their completions will
        never come (drop_all failed them); forget them so nothing leaks."""
        self._commands.clear()


def _make_mmu(config: NodeConfig) -> SecondaryMMU:
    return node_class(config.kind)(config.name)


async def run_node(config: NodeConfig, *, stop: trio.Event | None = None,
                   task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Entry point for ``mmn node``: run until cancelled, or until ``stop``
    is set and the node has handed back what it holds (bounded by
    ``evict_timeout_ms``)."""
    runtime = NodeRuntime(config)
    if stop is not None:
        runtime.stopping = stop
    await runtime.run(task_status=task_status)
