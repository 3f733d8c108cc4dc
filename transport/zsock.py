"""The one trio + ZeroMQ adapter the host, the nodes and the CLI share.

Only the socket: it knows frames, not messages (the admin clients built on it
are :mod:`mmn.client`).

A libzmq socket is not a file descriptor.  It exposes one (``ZMQ_FD``): the
read end of the socket's *command mailbox*, which becomes readable when the
I/O thread posts a command (a message arrived, a pipe became writable...).
Reading ``ZMQ_EVENTS`` -- and every send or receive -- processes those commands
and drains the mailbox, so the FD is effectively **edge-triggered**::

    task A: EVENTS -> 0, parks in wait_readable(FD)
    task B: send()            # processes "message arrived", drains the FD
    task A: ...parked forever, although POLLIN is now true

Rules that follow, applied everywhere in this module:

1. Every send and receive is ``NOBLOCK``; ``EVENTS`` is read before every
   wait (a receive reads it before even trying) and we wait only if the
   wanted bit is still clear.  The one exception: a receiver just woken by
   the FD tries the receive at once (a message is likely); if it gets
   ``EAGAIN`` it reads ``EVENTS`` as usual before waiting again.
2. Only one task at a time may wait on the FD (trio also refuses two
   ``wait_readable`` on one fd).  Other waiters park on a ``ParkingLot`` and
   re-check ``EVENTS`` whenever the FD waiter wakes.
3. Every read of ``EVENTS`` (including the one after every send and receive)
   wakes the parked waiters when it shows a bit one of them waits for:
   whoever read it may have eaten their edge.  The FD waiter waits not on the
   FD itself but on an epoll set holding the FD and an eventfd of ours
   (:class:`_WaitSet`); waking it is one write to the eventfd.  (Where there
   is no epoll, it waits on the FD inside a private cancel scope, and waking
   it cancels the scope.)
4. ``trio.lowlevel.notify_closing(fd)`` before the socket is closed, so a task
   parked on the FD gets ``trio.ClosedResourceError`` instead of waiting on a
   closed (and possibly reused) descriptor.

5. Every send and receive is a cancellation point; it is a schedule point
   when it waited, and otherwise every 16th call (a trio schedule point costs
   about as much as the zmq call itself, ~8 us here).

Costs measured on the 2-core dev box (``benchmarks/transport_rtt.py``, 64 B
DEALER -> ROUTER echo between two processes): raw blocking pyzmq ~120 us,
ZSocket at both ends ~1.7-2.0x that, serve_socket channels at both ends
~3.2x (each memory-channel hop is another trio wake-up).  Rule 3 is what
keeps the channels benchmark from hanging on a lost wake-up within minutes;
it used to cost a private cancel scope per wait (~5 us here) and a
``Cancelled`` raised through trio per wake-up (~18 us above a plain
reschedule, against ~6 us for the eventfd; 2026-12-02, one trio task waking
another on this box).

Envelopes: a ROUTER receives and sends ``[identity, payload, ...]``; a DEALER
``[payload, ...]``.  No empty delimiter frame on any mmnotify channel.

Errors:

* ``trio.ClosedResourceError`` -- *we* closed the socket (or terminated its
  context), possibly from another task while this one waited.
* :class:`PeerGone` -- a ROUTER send named an identity with no connected peer
  (``ROUTER_MANDATORY`` turned libzmq's silent drop into ``EHOSTUNREACH``).
  Its subclass :class:`PeerBusy`: the peer is at its high-water mark (only
  when the caller chose not to wait for it, as :func:`serve_socket` does).
* :class:`TransportError` -- any other libzmq failure, chained to the
  ``zmq.ZMQError``.

Not here: heartbeats (ours, in the protocol, never zmq's ``HEARTBEAT_*``
options) and CURVE (a :class:`Security` object plugs in at socket creation;
:mod:`transport.curve` has the keys and the host's ZAP authenticator).  A
socket bound with a ``security`` hook receives :class:`Received` frame lists
carrying the sender's ZAP ``User-Id`` (:func:`user_id_of`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, Protocol

import trio
import zmq

from protocol import Limits

log = logging.getLogger(__name__)

Frames = list[bytes]

__all__ = [
    "Frames",
    "PeerBusy",
    "PeerGone",
    "Received",
    "Security",
    "SocketChannels",
    "SocketOptions",
    "TransportError",
    "LinkFailed",
    "LinkMonitor",
    "connect_monitored",
    "handshake_probe",
    "ZSocket",
    "bind",
    "connect",
    "connect_raw",
    "serve_socket",
    "user_id_of",
]


class Received(list[bytes]):
    """The frames of one received message, plus ``user_id``: the ZAP User-Id
    of the sender's connection (on a ``user_ids=True`` socket; the identity
    of the sender's CURVE key), else None.  A plain list otherwise."""

    __slots__ = ("user_id",)

    def __init__(self, frames: Any = ()) -> None:
        super().__init__(frames)
        self.user_id: str | None = None


def user_id_of(frames: Frames) -> str | None:
    """The authenticated sender of frames from a ``user_ids=True`` socket."""
    return getattr(frames, "user_id", None)


# --------------------------------------------------------------------------
# errors


class TransportError(Exception):
    """A libzmq failure that is neither "we closed it" nor "would block"."""


class PeerGone(TransportError):
    """A ROUTER could not route to ``identity``: no such peer is connected
    (never was, disconnected, or replaced).  The socket itself is fine."""

    def __init__(self, identity: bytes, message: str = "no connected peer") -> None:
        self.identity = identity
        super().__init__(f"{message} {identity!r}")


class PeerBusy(PeerGone):
    """A ROUTER peer is at its high-water mark: it has not been reading.

    Raised instead of waiting when the caller asked not to wait for one slow
    peer (:func:`serve_socket` does, so one stuck node cannot stall the sends
    to every other).  A subclass of :class:`PeerGone`: for the host a peer
    that stopped reading is as good as gone (fence it).
    """

    def __init__(self, identity: bytes) -> None:
        super().__init__(identity, "peer at its high-water mark:")


# --------------------------------------------------------------------------
# options and security hook


class Security(Protocol):
    """Hook for CURVE: configures a socket before bind / connect
    (:class:`transport.curve.CurveServer` / :class:`~transport.curve.CurveClient`).

    :func:`bind` calls ``configure_server`` and :func:`connect` calls
    ``configure_client`` when one is given.
    """

    def configure_server(self, sock: zmq.Socket[Any]) -> None: ...

    def configure_client(self, sock: zmq.Socket[Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """Socket options every mmnotify socket gets.

    max_frame: ``MAXMSGSIZE`` -- a peer sending a larger frame loses its
        connection inside libzmq (it reconnects); our process never sees it.
        Defaults to ``protocol.Limits().max_frame``.
    linger_ms: ``LINGER`` applied when the socket is closed (0: drop unsent).
    sndhwm / rcvhwm: high-water marks, in messages.
    immediate: ``IMMEDIATE`` on DEALERs: queue only to completed connections,
        so a send to a host that is not there waits (and times out) instead
        of filling a queue nobody reads.
    router_mandatory: ``ROUTER_MANDATORY`` on ROUTERs: unroutable sends raise
        :class:`PeerGone` and sends to a peer at its HWM wait, instead of being
        silently dropped.
    router_handover: ``ROUTER_HANDOVER``: a new connection with an identity
        already in use takes it over.  On by default because without it a
        peer with a fixed ``ROUTING_ID`` that reconnects while the ROUTER
        still holds its old pipe (a restarted node whose old TCP connection
        was not yet noticed dead; a peer cut off by ``MAXMSGSIZE``) is
        *silently* ignored, every message dropped, with no error on either
        side (seen with libzmq 4.3.5).  Routing ids are not authentication:
        who a peer is comes from its Register message (or its CURVE key).
    """

    max_frame: int = Limits().max_frame
    linger_ms: int = 0
    sndhwm: int = 1000
    rcvhwm: int = 1000
    immediate: bool = True
    router_mandatory: bool = True
    router_handover: bool = True

    @classmethod
    def from_limits(cls, limits: Limits, **overrides: Any) -> SocketOptions:
        return cls(max_frame=limits.max_frame, **overrides)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Set the options on a fresh socket (before bind / connect)."""
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        sock.setsockopt(zmq.LINGER, self.linger_ms)
        sock.setsockopt(zmq.SNDHWM, self.sndhwm)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        kind = sock.type
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, int(self.router_mandatory))
            sock.setsockopt(zmq.ROUTER_HANDOVER, int(self.router_handover))
        if kind in (zmq.DEALER, zmq.REQ, zmq.PUSH):
            sock.setsockopt(zmq.IMMEDIATE, int(self.immediate))


def _new_socket(
    socket_type: int,
    context: zmq.Context[Any] | None,
    options: SocketOptions | None,
) -> tuple[zmq.Socket[Any], SocketOptions]:
    options = options or SocketOptions()
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(socket_type)
    try:
        options.apply(sock)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock, options


def bind(
    socket_type: int,
    endpoint: str = "tcp://127.0.0.1:0",
    *,
    context: zmq.Context[Any] | None = None,
    options: SocketOptions | None = None,
    security: Security | None = None,
) -> ZSocket:
    """Create a socket, configure it and bind it.

    Args:
        socket_type: ``zmq.ROUTER``, ``zmq.PUB``...
        endpoint: port 0 (the default) lets the OS choose; read the result
            from :attr:`ZSocket.endpoint` / :attr:`ZSocket.port`.
        context: defaults to ``zmq.Context.instance()``.
        options: defaults to :class:`SocketOptions()`.
        security: CURVE hook (issue 7), applied before binding.

    Raises:
        TransportError: bind failed (address in use, bad endpoint...).

    Concurrency: synchronous; the returned socket belongs to the caller's task.
    """
    sock, options = _new_socket(socket_type, context, options)
    try:
        if security is not None:
            security.configure_server(sock)
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise TransportError(f"bind {endpoint}: {exc}") from exc
    # A secured server tags what it receives with the sender's key identity.
    return ZSocket(sock, linger_ms=options.linger_ms, user_ids=security is not None and socket_type != zmq.PUB)


def connect_raw(
    socket_type: int,
    endpoint: str,
    *,
    identity: bytes | None = None,
    context: zmq.Context[Any] | None = None,
    options: SocketOptions | None = None,
    security: Security | None = None,
) -> zmq.Socket[Any]:
    """A plain pyzmq socket, configured as :func:`connect` configures one and
    connected: for a blocking caller that owns no trio loop (the CLI's
    :class:`mmn.client.SyncAdminClient`).

    Raises:
        TransportError: bad endpoint.

    Concurrency: synchronous; the socket belongs to the caller's thread.
    """
    sock, _ = _new_socket(socket_type, context, options)
    try:
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        if security is not None:
            security.configure_client(sock)
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise TransportError(f"connect {endpoint}: {exc}") from exc
    return sock


def connect(
    socket_type: int,
    endpoint: str,
    *,
    identity: bytes | None = None,
    context: zmq.Context[Any] | None = None,
    options: SocketOptions | None = None,
    security: Security | None = None,
) -> ZSocket:
    """Create a socket, configure it and connect it (libzmq reconnects by itself).

    Args:
        identity: ``ROUTING_ID`` seen by the ROUTER; random when None.

    Raises:
        TransportError: bad endpoint.

    Concurrency: synchronous; the returned socket belongs to the caller's task.
    """
    options = options or SocketOptions()
    sock = connect_raw(socket_type, endpoint, identity=identity, context=context, options=options,
                       security=security)
    return ZSocket(sock, linger_ms=options.linger_ms)


# --------------------------------------------------------------------------
# the adapter


_CLOSED_ERRNOS = frozenset({zmq.ETERM, errno.ENOTSOCK, errno.EBADF})
#: Non-waiting I/O calls between two forced schedule points.
_FAIRNESS = 16
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_EVENTS = int(zmq.EVENTS)
_RCVMORE = int(zmq.RCVMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
#: Socket types that cannot receive (serve_socket runs no receive pump).
_SEND_ONLY = frozenset({zmq.PUB, zmq.PUSH})


class _WaitSet:
    """What the one FD waiter parks on: an epoll set holding the socket's
    ``ZMQ_FD`` and an eventfd of ours, both level-triggered, so that trio's
    ``wait_readable`` on the set's fd returns when the socket's mailbox has
    something *or* another task called :meth:`poke` (rule 3).  A poke is one
    ``eventfd_write``; the cancel scope it replaces cost a scope per wait
    (~5 us here) and, per wake-up, a ``Cancelled`` raised through the trap
    (~18 us against ~6).

    Concurrency: the ZSocket's trio thread only; ``poked`` says whether the
    eventfd holds a count nobody read (read once by the waiter that wakes).
    """

    __slots__ = ("__weakref__", "_epoll", "_event", "_finalizer", "fileno", "poked")

    def __init__(self, fd: int) -> None:
        self._epoll = select.epoll()
        try:
            self._event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            self._epoll.close()
            raise
        self._finalizer = weakref.finalize(self, os.close, self._event)
        self._epoll.register(fd, select.EPOLLIN)
        self._epoll.register(self._event, select.EPOLLIN)
        self.fileno = self._epoll.fileno()
        self.poked = False

    @classmethod
    def create(cls, fd: int) -> _WaitSet | None:
        """A wait set, or None where there is no epoll / eventfd (then the
        FD waiter waits in a private cancel scope, cancelled to wake it)."""
        if not (hasattr(select, "epoll") and hasattr(os, "eventfd")):
            return None
        return cls(fd)

    def poke(self) -> None:
        if not self.poked:
            self.poked = True
            os.eventfd_write(self._event, 1)

    def unpoke(self) -> None:
        self.poked = False
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._event)

    def close(self) -> None:
        self._epoll.close()
        self._finalizer()


class ZSocket:
    """One pyzmq socket (sync ``zmq.Context``) driven from trio.

    Args:
        sock: a configured socket; the ZSocket owns it from now on and closes
            it in :meth:`close`.
        linger_ms: ``LINGER`` used at close.

    Concurrency: the socket belongs to one owner -- a task, or the
    :func:`serve_socket` service whose receive pump and send pump are the only
    callers.  That split is safe: every libzmq call here is ``NOBLOCK`` and
    synchronous, so trio cannot switch tasks in the middle of one, and the
    only shared thing that needs arbitration -- waiting on the FD -- is
    granted to one task at a time (see the module docstring).  Any number of
    tasks may therefore await :meth:`send_multipart` / :meth:`recv_multipart`
    concurrently without ``BusyResourceError`` or lost wake-ups, but other
    parts of the program should go through :func:`serve_socket`'s channels.
    The ZSocket must be used from the trio thread that created it.
    """

    def __init__(self, sock: zmq.Socket[Any], *, linger_ms: int = 0, user_ids: bool = False) -> None:
        self._sock = sock
        # CURVE servers: tag what we receive with the sender's ZAP User-Id.
        self._user_ids = user_ids
        self._fd: int = sock.FD
        self._linger_ms = linger_ms
        self._is_router = sock.type == zmq.ROUTER
        self._getsockopt = sock.getsockopt
        self._unyielded = 0
        self._closed = False
        # What the FD waiter parks on (see _WaitSet): the FD and our wake-up
        # eventfd in one epoll set; without epoll, the FD in a cancel scope.
        self._waits = _WaitSet.create(self._fd)
        self._wait_fd = self._waits.fileno if self._waits is not None else self._fd
        # A task is parked in wait_readable(_wait_fd).
        self._fd_waiting = False
        # Without a wait set: that task's private cancel scope.
        self._fd_scope: trio.CancelScope | None = None
        # Other tasks waiting for a change of EVENTS.
        self._lot = trio.lowlevel.ParkingLot()
        # How many tasks wait for POLLIN / POLLOUT / any change.
        self._want_in = 0
        self._want_out = 0
        self._want_any = 0

    # -- properties --------------------------------------------------------

    @property
    def socket(self) -> zmq.Socket[Any]:
        """The raw pyzmq socket, for options (e.g. SUBSCRIBE).  Never call
        send/recv on it directly."""
        return self._sock

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def can_receive(self) -> bool:
        """False for PUB and PUSH sockets."""
        return self._sock.type not in _SEND_ONLY

    @property
    def endpoint(self) -> str:
        """``LAST_ENDPOINT``: after binding to port 0, the address chosen."""
        self._check_open()
        return self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    # -- readiness ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("socket was closed")

    def _wanted(self) -> int:
        mask = 0
        if self._want_in:
            mask |= _POLLIN
        if self._want_out:
            mask |= _POLLOUT
        return mask

    def _wake(self) -> None:
        """Make every waiter re-check EVENTS."""
        if self._fd_waiting:
            if self._waits is not None:
                self._waits.poke()  # the FD waiter's epoll set becomes readable
            elif self._fd_scope is not None:
                self._fd_scope.cancel()
        self._lot.unpark_all()

    def _events(self) -> int:
        """Read EVENTS (which drains the FD) and wake waiters it concerns."""
        try:
            ev = int(self._getsockopt(_EVENTS))
        except zmq.ZMQError as exc:
            raise self._map_error(exc) from exc
        if ev & self._wanted() or (self._want_any and ev):
            self._wake()
        return ev

    async def _park(self, timeout: float | None = None) -> None:
        """Wait until the FD fires, another task wakes us, or ``timeout``.

        The first task to arrive waits on the FD; later ones park on the lot
        and are woken whenever the FD waiter wakes.
        """
        if timeout is None:
            await self._park_once()
        else:
            with trio.move_on_after(timeout):
                await self._park_once()
        self._check_open()

    async def _park_once(self) -> None:
        if self._fd_waiting:
            await self._lot.park()
            return
        self._fd_waiting = True
        waits = self._waits
        try:
            if waits is not None:
                await trio.lowlevel.wait_readable(self._wait_fd)
            else:
                with trio.CancelScope() as self._fd_scope:
                    await trio.lowlevel.wait_readable(self._fd)
        finally:
            self._fd_waiting = False
            self._fd_scope = None
            if waits is not None and waits.poked and not self._closed:
                waits.unpoke()
            # Whatever woke us may concern the others: let them re-check.
            if self._lot:
                self._lot.unpark_all()

    async def _park_wanting(self, mask: int) -> None:
        """Park once, counted as a waiter for ``mask`` (``_POLLIN`` or
        ``_POLLOUT``) so that other tasks' I/O wakes us when it shows up.
        The caller re-checks EVENTS and loops."""
        if mask == _POLLIN:
            self._want_in += 1
        else:
            self._want_out += 1
        try:
            await self._park()
        finally:
            if mask == _POLLIN:
                self._want_in -= 1
            else:
                self._want_out -= 1

    async def _yield_if_due(self, waited: bool) -> None:
        """A schedule point after an I/O call that did not have to wait, but
        only every ``_FAIRNESS``-th one: a schedule point costs about as much
        as the send itself, and a task looping on a socket that never blocks
        (a PUB) still cannot starve the others."""
        if waited:
            self._unyielded = 0
            return
        self._unyielded += 1
        if self._unyielded >= _FAIRNESS:
            self._unyielded = 0
            # Cannot raise Cancelled: what we did is done.
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _wait_any_change(self, timeout: float) -> None:
        """Wait for any FD activity (used when POLLOUT says nothing useful)."""
        self._want_any += 1
        try:
            await self._park(timeout)
        finally:
            self._want_any -= 1

    def _after_io(self) -> None:
        """Rule 3: an I/O call may have eaten someone else's edge."""
        if self._want_in or self._want_out or self._want_any:
            self._events()

    def _map_error(self, exc: zmq.ZMQError) -> Exception:
        if self._closed or exc.errno in _CLOSED_ERRNOS:
            return trio.ClosedResourceError("socket was closed")
        return TransportError(str(exc))

    # -- I/O ---------------------------------------------------------------

    async def recv_multipart(self) -> Frames:
        """Receive one message (all its frames).

        Returns:
            The frames; a ROUTER's start with the sender's identity.

        Raises:
            trio.ClosedResourceError: the socket was closed, before or while
                waiting.
            TransportError: any other libzmq failure.

        Concurrency: awaits; always a cancellation point, a schedule point
        when it waits (and every few calls otherwise, see
        :meth:`_yield_if_due`).  **Cancel-safe**: a cancelled receive has
        taken nothing from the socket (libzmq hands over a whole message or
        none, and nothing can be cancelled between that and the return).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        sock = self._sock
        waited = woken = False
        while True:
            self._check_open()
            try:
                # Before a wait, EVENTS: cheaper than provoking zmq.Again, and
                # it is the check-before-wait the edge-triggered FD needs.
                # Just woken, the receive itself: the FD fired, so a message
                # is likely there (an EVENTS read less per waited message).
                if woken or self._events() & _POLLIN:
                    if self._user_ids:
                        return await self._recv_with_user_id()
                    frames: Frames = [sock.recv(_NOBLOCK)]
                    break
            except zmq.Again:  # nothing yet, or another receiver took it
                if woken:
                    # Woken for something else.  That receive processed the
                    # mailbox (libzmq's EAGAIN path does, as EVENTS does): read
                    # EVENTS before waiting again -- rule 1 for us, rule 3
                    # for whoever it concerned -- and go by what it says.
                    woken = False
                    continue
            except zmq.ZMQError as exc:
                raise self._map_error(exc) from exc
            await self._park_wanting(_POLLIN)
            waited = woken = True
        # The other parts of a multipart message are already here.
        while self._getsockopt(_RCVMORE):
            frames.append(sock.recv(_NOBLOCK))
        self._after_io()
        await self._yield_if_due(waited)
        return frames

    async def _recv_with_user_id(self) -> Frames:
        """The rest of :meth:`recv_multipart` for ``user_ids=True``: receive
        as ``zmq.Frame`` to read the ZAP ``User-Id`` the authenticator gave
        the sender's connection (the identity of its CURVE key)."""
        sock = self._sock
        parts = [sock.recv(_NOBLOCK, copy=False)]
        while self._getsockopt(_RCVMORE):
            parts.append(sock.recv(_NOBLOCK, copy=False))
        frames = Received(p.bytes for p in parts)
        try:
            user_id = parts[-1].get("User-Id")
            frames.user_id = user_id if isinstance(user_id, str) else None
        except (zmq.ZMQError, UnicodeDecodeError):
            frames.user_id = None
        self._after_io()
        await self._yield_if_due(False)
        return frames

    async def send_multipart(self, frames: Frames, *, wait_for_slow_peer: bool = True) -> None:
        """Queue one message in libzmq, waiting while it is at its HWM.

        Args:
            frames: a ROUTER's start with the destination identity.
            wait_for_slow_peer: ROUTER only.  A ROUTER whose destination peer
                is at its HWM still reports POLLOUT (another peer could take
                a message), so the wait re-tries on every FD event with a
                doubling backoff (1 ms -> 100 ms) -- and meanwhile nothing
                else is sent.  False raises :class:`PeerBusy` instead.

        Raises:
            PeerGone: ROUTER only: no peer has that identity.
            PeerBusy: ROUTER only, with ``wait_for_slow_peer=False``.
            trio.ClosedResourceError: the socket was closed.
            TransportError: any other libzmq failure.

        Concurrency: awaits; always a cancellation point, a schedule point
        when it waits (and every few calls otherwise).  Cancel-safe in the
        usual sense: if cancelled, the message was not queued.  Give the
        call a deadline (callers own timeouts).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        backoff = 0.001
        waited = False
        while True:
            if self._send_nowait(frames):
                break
            waited = True
            if self._events() & _POLLOUT:
                if self._is_router:  # POLLOUT is about any peer, not this one
                    if not wait_for_slow_peer:
                        raise PeerBusy(bytes(frames[0]))
                    await self._wait_any_change(backoff)
                    backoff = min(backoff * 2, 0.1)
                # else: writable again already (a command was just processed)
            else:
                await self._park_wanting(_POLLOUT)
        self._after_io()
        await self._yield_if_due(waited)

    def try_send_multipart(self, frames: Frames) -> bool:
        """Queue one message in libzmq now if it takes it without waiting.

        Returns:
            True if queued; False if libzmq would block (nothing was queued:
            libzmq takes all parts once it took the first).
        Raises:
            As :meth:`send_multipart`.
        Concurrency: synchronous, no schedule point: the caller must make
            sure nothing it sent earlier is still waiting to be sent by
            another task, or ordering breaks (:func:`serve_socket`'s
            ``send_now`` does).
        """
        if not self._send_nowait(frames):
            return False
        self._after_io()
        return True

    def _send_nowait(self, frames: Frames) -> bool:
        """One NOBLOCK attempt; False if libzmq would block (nothing queued:
        once the first part is accepted libzmq takes the rest)."""
        self._check_open()
        sock = self._sock
        last = len(frames) - 1
        try:
            for i, frame in enumerate(frames):
                sock.send(frame, _NOBLOCK | _SNDMORE if i < last else _NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH and self._is_router:
                raise PeerGone(bytes(frames[0])) from exc
            raise self._map_error(exc) from exc
        return True

    # -- closing -----------------------------------------------------------

    def close(self, linger_ms: int | None = None) -> None:
        """Close the socket: tasks waiting on it get ``trio.ClosedResourceError``.

        Args:
            linger_ms: overrides the ``LINGER`` given at creation.

        Concurrency: synchronous, idempotent; may be called by any task of
        the trio thread (that is how a blocked receive is interrupted).
        """
        if self._closed:
            return
        self._closed = True
        try:
            trio.lowlevel.notify_closing(self._wait_fd)
        except RuntimeError:  # not inside trio.run: nobody can be waiting
            pass
        self._lot.unpark_all()
        self._sock.close(linger=self._linger_ms if linger_ms is None else linger_ms)
        if self._waits is not None:
            self._waits.close()

    async def aclose(self) -> None:
        """:meth:`close`, plus a checkpoint (trio's ``AsyncResource`` shape)."""
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> ZSocket:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else zmq.SocketType(int(self._sock.type)).name
        return f"<ZSocket {state} fd={self._fd}>"


# --------------------------------------------------------------------------
# the service: memory channels for the rest of the program


class SocketChannels(NamedTuple):
    """What :func:`serve_socket` hands to the rest of the program.

    outgoing: put frames here to send them (clone it per producer; closing
        every clone shuts the service down after flushing).
    incoming: received frames, in arrival order; ends when the service stops.
    endpoint: ``LAST_ENDPOINT`` of the socket.
    """

    outgoing: trio.MemorySendChannel[Frames]
    incoming: trio.MemoryReceiveChannel[Frames]
    endpoint: str
    #: ``send_now(frames) -> bool``: queue in libzmq at once, skipping the
    #: channel hop and the send pump's task switch, if nothing queued before
    #: is still waiting (ordering is kept) and libzmq takes it without
    #: waiting; False otherwise (then put it on ``outgoing``).  Synchronous.
    send_now: Callable[[Frames], bool] = lambda frames: False


class DirectIncoming:
    """:func:`serve_socket`'s ``incoming`` with ``direct_incoming=True``: the
    consumer receives from the socket itself, with no receive pump and no
    channel hop in between (a task switch less per message).

    Iterate it (``async for frames in incoming``) or call :meth:`receive`.
    It ends when the socket is closed.  Concurrency: one consumer task;
    cancel-safe (a cancelled receive took nothing, see
    :meth:`ZSocket.recv_multipart`).
    """

    def __init__(self, zsock: ZSocket) -> None:
        self._zsock = zsock
        self._closed = False

    def __aiter__(self) -> DirectIncoming:
        return self

    async def __anext__(self) -> Frames:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive(self) -> Frames:
        if self._closed:
            raise trio.ClosedResourceError("incoming was closed")
        try:
            return await self._zsock.recv_multipart()
        except trio.ClosedResourceError:
            raise trio.EndOfChannel from None

    def close(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


def _log_undeliverable(frames: Frames, exc: TransportError) -> None:
    log.warning("dropped an outgoing message: %s", exc)


async def serve_socket(
    zsock: ZSocket,
    *,
    incoming_buffer: int = 256,
    outgoing_buffer: float = 256,
    on_undeliverable: Callable[[Frames, TransportError], None] = _log_undeliverable,
    wait_for_slow_peer: bool = False,
    direct_incoming: bool = False,
    task_status: trio.TaskStatus[SocketChannels] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Own ``zsock`` and expose it as a pair of memory channels.

    ``channels = await nursery.start(serve_socket, zsock)`` then
    ``await channels.outgoing.send(frames)`` and
    ``async for frames in channels.incoming``.

    Args:
        zsock: from now on nobody else touches it; the service closes it.
        incoming_buffer / outgoing_buffer: channel capacities.  A full
            ``incoming`` stops the receive pump (messages then queue in libzmq
            up to RCVHWM): backpressure, not loss.
        on_undeliverable: called (synchronously, in the send pump) with the
            frames and the error when a send fails with :class:`PeerGone`
            (including :class:`PeerBusy`) or another :class:`TransportError`;
            the pump goes on.  Defaults to a warning in the log.
        wait_for_slow_peer: ROUTER only.  False (the default): a message to a
            peer at its SNDHWM is not sent and reported as :class:`PeerBusy`
            at once, so one peer that stopped reading cannot stall the sends
            to the others.  True: the send pump waits for it.
        direct_incoming: no receive pump: ``incoming`` is a
            :class:`DirectIncoming` that receives from the socket when the one
            consumer asks (no read-ahead; messages wait in libzmq).

    Returns:
        When cancelled, when every clone of ``outgoing`` is closed (after
        sending what was queued), or when the socket was closed.  The socket
        is closed and ``incoming`` ends either way.  If the consumer closes
        ``incoming``, the service stops receiving and keeps sending.  For a
        PUB or PUSH socket ``incoming`` ends at once (no receive pump).

    Concurrency: the service is the socket's owner; it runs two tasks, a
    receive pump and a send pump, which share the socket safely (see
    :class:`ZSocket`).  A message taken from ``outgoing`` when the service is
    cancelled may be lost; nothing is lost from ``incoming`` by a consumer's
    cancellation (memory channels are cancel-safe).
    """
    out_send, out_recv = trio.open_memory_channel[Frames](outgoing_buffer)
    in_send, in_recv = trio.open_memory_channel[Frames](incoming_buffer)

    async def receive_pump(service: trio.CancelScope) -> None:
        async with in_send:
            while True:
                try:
                    frames = await zsock.recv_multipart()
                except trio.ClosedResourceError:
                    service.cancel()  # closed under us: nothing left to serve
                    return
                try:
                    # No extra schedule point when there is room: recv_multipart
                    # already provides them.
                    try:
                        in_send.send_nowait(frames)
                    except trio.WouldBlock:
                        await in_send.send(frames)
                except trio.BrokenResourceError:
                    log.debug("incoming closed by its consumer; no longer receiving")
                    return

    pump_busy = False  # the send pump holds a message it has not queued yet

    def send_now(frames: Frames) -> bool:
        # Only while the pump is parked on an empty channel: a message handed
        # to a pump that has not run yet shows neither in the buffer nor in
        # pump_busy, but the pump is then no longer waiting to receive.
        stats = out_send.statistics()
        if pump_busy or stats.current_buffer_used or not stats.tasks_waiting_receive or zsock.closed:
            return False
        try:
            return zsock.try_send_multipart(frames)
        except trio.ClosedResourceError:
            return False
        except TransportError as exc:
            on_undeliverable(frames, exc)
            return True

    async def send_pump() -> None:
        nonlocal pump_busy
        async with out_recv:
            while True:
                try:
                    frames = out_recv.receive_nowait()
                except trio.WouldBlock:
                    try:
                        frames = await out_recv.receive()
                    except trio.EndOfChannel:
                        return
                except trio.EndOfChannel:
                    return
                pump_busy = True
                try:
                    await zsock.send_multipart(frames, wait_for_slow_peer=wait_for_slow_peer)
                except trio.ClosedResourceError:
                    return
                except TransportError as exc:
                    on_undeliverable(frames, exc)
                finally:
                    pump_busy = False

    try:
        async with trio.open_nursery() as nursery:
            incoming: Any = in_recv
            if direct_incoming and zsock.can_receive:
                in_send.close()
                incoming = DirectIncoming(zsock)
            elif zsock.can_receive:
                nursery.start_soon(receive_pump, nursery.cancel_scope)
            else:
                in_send.close()
            task_status.started(SocketChannels(out_send, incoming, zsock.endpoint, send_now))
            await send_pump()
            nursery.cancel_scope.cancel()
    finally:
        zsock.close()
        in_send.close()
        out_recv.close()


# --------------------------------------------------------------------------
# link diagnostics: what libzmq's socket monitor says about a connecting socket


class LinkFailed(TransportError):
    """A client's connection failed below the messages, as libzmq's socket
    monitor saw it (so no answer will ever come; waiting longer is useless).

    ``reason``:

    ==================  ======================================================
    ``refused``         no TCP connection for ``refused_grace`` seconds
                        (nothing listens there)
    ``auth``            ``EVENT_HANDSHAKE_FAILED_AUTH``: the server's ZAP
                        handler refused our key (``value`` is its status code)
    ``mechanism``       ``EVENT_HANDSHAKE_FAILED_PROTOCOL`` with
                        ``PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH``: one side
                        runs CURVE, the other plain TCP (either way round;
                        which side notices first is a race, so the same
                        mistake may also come as ``handshake``)
    ``protocol``        any other ``EVENT_HANDSHAKE_FAILED_PROTOCOL``
    ``handshake``       ``EVENT_HANDSHAKE_FAILED_NO_DETAIL``: the server closed
                        the connection in the handshake (an unknown key, a
                        wrong server key, or no CURVE against a CURVE server)
    ``closed``          connected, then closed before any handshake result:
                        the peer's socket type does not talk to ours
    ==================  ======================================================
    """

    def __init__(self, reason: str, endpoint: str, value: int = 0) -> None:
        self.reason = reason
        self.endpoint = endpoint
        self.value = value
        super().__init__(f"{endpoint}: {reason} ({value:#x})")


_HANDSHAKE_FAILURES: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake",
}


class LinkMonitor:
    """What libzmq's socket monitor says about one connecting socket.

    States (``state``)::

        connecting --CONNECTED--> connected --HANDSHAKE_SUCCEEDED--> ready
            |  CLOSED / CONNECT_RETRIED: refused       |  HANDSHAKE_FAILED_*  -> LinkFailed
            |  for refused_grace s -> LinkFailed       |  DISCONNECTED        -> LinkFailed("closed")
        ready --DISCONNECTED--> connecting (the server went away; libzmq reconnects)

    Args:
        sock: the socket, *before* it connects (events from the first attempt on).
        refused_grace: seconds of refused connections after which
            :meth:`failure` reports ``refused``; None waits for ever (a server
            that is starting may come).

    Concurrency: one task at a time awaits :meth:`failure`; the monitor
    socket belongs to this object and is closed by :meth:`close`.
    """

    def __init__(self, sock: zmq.Socket[Any], endpoint: str, refused_grace: float | None = None) -> None:
        self._sock = sock
        self.endpoint = endpoint
        self.refused_grace = refused_grace
        self._monitor = ZSocket(sock.get_monitor_socket(), linger_ms=0)
        self.state = "connecting"
        self._refused_since: float | None = None

    async def failure(self) -> LinkFailed:
        """Wait until the link fails for good; return why.

        Concurrency: awaits (for ever if the link stays up); cancel-safe.
        """
        while True:
            failed = await self._step()
            if failed is not None:
                return failed

    async def ready(self) -> None:
        """Wait until the handshake has succeeded (at once if it has).

        Raises:
            LinkFailed: the link failed first.
        Concurrency: awaits (callers own the timeout); cancel-safe.
        """
        while self.state != "ready":
            failed = await self._step()
            if failed is not None:
                raise failed

    async def _step(self) -> LinkFailed | None:
        """Handle the next monitor event; a failure, or None."""
        deadline = math.inf
        if self.refused_grace is not None and self.state == "connecting" and self._refused_since is not None:
            deadline = self._refused_since + self.refused_grace
        with trio.move_on_at(deadline):
            return self._on_event(await self._monitor.recv_multipart())
        return LinkFailed("refused", self.endpoint)

    def _on_event(self, frames: list[bytes]) -> LinkFailed | None:
        from zmq.utils.monitor import parse_monitor_message

        event = parse_monitor_message(frames)
        kind, value = event["event"], int(event["value"])
        if kind == zmq.EVENT_CONNECTED:
            self.state = "connected"
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.state = "ready"
        elif kind in _HANDSHAKE_FAILURES:
            reason = _HANDSHAKE_FAILURES[kind]
            if reason == "protocol" and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                reason = "mechanism"
            return LinkFailed(reason, self.endpoint, value)
        elif kind == zmq.EVENT_DISCONNECTED:
            if self.state == "connected":
                return LinkFailed("closed", self.endpoint)
            self.state, self._refused_since = "connecting", None
        elif kind in (zmq.EVENT_CLOSED, zmq.EVENT_CONNECT_RETRIED) and self.state == "connecting":
            if self._refused_since is None:
                self._refused_since = trio.current_time()
        return None

    def close(self) -> None:
        """Stop monitoring and close the monitor socket (idempotent)."""
        if self._monitor.closed:
            return
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close()


def connect_monitored(
    socket_type: int,
    endpoint: str,
    *,
    context: zmq.Context[Any] | None = None,
    options: SocketOptions | None = None,
    security: Security | None = None,
    refused_grace: float | None = None,
) -> tuple[ZSocket, LinkMonitor]:
    """:func:`connect`, with a :class:`LinkMonitor` that saw the first attempt.

    Raises:
        TransportError: bad endpoint.
    Concurrency: synchronous; close the monitor (``LinkMonitor.close``)
    before the socket.
    """
    sock, options = _new_socket(socket_type, context, options)
    link: LinkMonitor | None = None
    try:
        if security is not None:
            security.configure_client(sock)
        link = LinkMonitor(sock, endpoint, refused_grace)
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        if link is not None:
            link.close()
        sock.close(linger=0)
        raise TransportError(f"connect {endpoint}: {exc}") from exc
    return ZSocket(sock, linger_ms=options.linger_ms), link


def handshake_probe(
    endpoint: str, socket_type: int, security: Security | None = None, timeout: float = 1.0,
    context: zmq.Context[Any] | None = None,
) -> bool:
    """Whether a ``socket_type`` socket with ``security`` completes the ZeroMQ
    handshake with ``endpoint`` within ``timeout`` seconds (nothing is sent).

    For telling apart what :class:`LinkFailed` cannot: a handshake the server
    closes without detail may be a refused key, CURVE against plain TCP, or a
    socket type that does not talk to ours -- a probe of another kind tells.

    Concurrency: blocks the calling thread (run it with ``trio.to_thread``).
    """
    from zmq.utils.monitor import parse_monitor_message

    sock = (context or zmq.Context.instance()).socket(socket_type)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = None
    try:
        if security is not None:
            security.configure_client(sock)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                          | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(int(left * 1000) + 1):
                break
            event = parse_monitor_message(monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
            if event != zmq.EVENT_DISCONNECTED:
                return False
        return False
    finally:
        if monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)
