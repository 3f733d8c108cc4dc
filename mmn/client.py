"""The client of a running mmnotify host: what the CLI, ``mmn up``, the soak,
the containers' health check and a user's own scripts share.

Request/reply over the admin channel: :class:`AdminClient` (trio) and
:class:`SyncAdminClient` (blocking), each a DEALER whose replies are matched
to requests by ``ref`` (a lost reply times out instead of wedging a REQ
socket).  Built on :mod:`transport` (the socket adapter and CURVE); nothing
here prints.
"""

from __future__ import annotations

import logging
import math
import time
from types import TracebackType
from typing import Any

import trio
import zmq

from protocol import Limits, Message, ProtocolError, decode, encode
from protocol.messages import AdminRequest
from transport import (
    LinkFailed,
    LinkMonitor,
    Security,
    SocketOptions,
    ZSocket,
    connect,
    connect_monitored,
    connect_raw,
)

log = logging.getLogger(__name__)

__all__ = ["AdminClient", "SyncAdminClient"]


def _reply_ref(msg: Message) -> int | None:
    ref = getattr(msg, "ref", None)
    return ref if type(ref) is int else None


def _only_leaf(group: BaseExceptionGroup[Any]) -> BaseException | None:
    """The single exception inside nested one-member groups, or None."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


class AdminClient:
    """A request/reply client over a DEALER (a lost reply times out instead
    of wedging a REQ socket).

    ``async with AdminClient(endpoint) as c: reply = await c.request(msg, 2.0)``

    Args:
        endpoint: the host's admin endpoint.
        limits: what a reply may be (decoding is strict).
        options / security / context: as for :func:`transport.connect`.
        diagnose: watch the connection with libzmq's socket monitor, so that
            :meth:`request` raises :class:`LinkFailed` as soon as the handshake
            fails (a refused key, CURVE against plain TCP, not a ROUTER)
            instead of waiting out its timeout.
        refused_grace: with ``diagnose``, also raise ``LinkFailed("refused")``
            after this many seconds of refused connections (None: wait).

    Concurrency: requests on one client are serialised (one in flight, a
    lock); open one client per concurrent caller.  A reply that arrives after
    its request timed out is discarded by a later request (ref mismatch).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        limits: Limits | None = None,
        options: SocketOptions | None = None,
        security: Security | None = None,
        context: zmq.Context[Any] | None = None,
        diagnose: bool = False,
        refused_grace: float | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._limits = limits or Limits()
        self._options = options or SocketOptions.from_limits(self._limits)
        self._security = security
        self._context = context
        self._zsock: ZSocket | None = None
        self._lock = trio.Lock()
        self._next_id = 1
        self._diagnose = diagnose
        self._refused_grace = refused_grace
        #: the socket monitor (``diagnose=True``), None otherwise
        self.link: LinkMonitor | None = None

    async def __aenter__(self) -> AdminClient:
        if not self._diagnose:
            self._zsock = connect(
                zmq.DEALER,
                self.endpoint,
                context=self._context,
                options=self._options,
                security=self._security,
            )
        else:
            self._zsock, self.link = connect_monitored(
                zmq.DEALER,
                self.endpoint,
                context=self._context,
                options=self._options,
                security=self._security,
                refused_grace=self._refused_grace,
            )
        await trio.lowlevel.checkpoint()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.link is not None:
            self.link.close()
        if self._zsock is not None:
            await self._zsock.aclose()

    def next_id(self) -> int:
        """A fresh request id for this client."""
        ref = self._next_id
        self._next_id += 1
        return ref

    async def request(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` (which must carry an ``id``) and return the reply whose
        ``ref`` names it -- whatever its type (``Error`` included).

        Raises:
            trio.TooSlowError: no reply within ``timeout`` seconds.
            LinkFailed: (``diagnose=True``) the connection failed for good.
            ProtocolError: the reply to this request did not decode.
            trio.ClosedResourceError: the client was closed.

        Concurrency: awaits; cancel-safe (a cancelled request's late reply is
        discarded by the next one).  With ``diagnose``, a second task watches
        the socket monitor for the length of the request.
        """
        ref = getattr(msg, "id", None)
        if type(ref) is not int:
            raise ValueError(f"{type(msg).__name__} carries no request id")
        if self._zsock is None:
            raise trio.ClosedResourceError("AdminClient used outside 'async with'")
        zsock = self._zsock
        link = self.link
        with trio.fail_after(math.inf if timeout is None else timeout):
            async with self._lock:
                if link is None:
                    return await self._exchange(zsock, msg, ref)
                failed: list[LinkFailed] = []
                replies: list[Message] = []

                async def watch(cancel: trio.CancelScope) -> None:
                    failed.append(await link.failure())
                    cancel.cancel()

                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(watch, nursery.cancel_scope)
                        replies.append(await self._exchange(zsock, msg, ref))
                        nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    leaf = _only_leaf(group)
                    if leaf is None:
                        raise
                    raise leaf from None
                if replies:
                    return replies[0]
                raise failed[0]
        raise AssertionError("unreachable")  # pragma: no cover - fail_after raised

    async def _exchange(self, zsock: ZSocket, msg: Message, ref: int) -> Message:
        """Send ``msg``, return the reply naming ``ref`` (others discarded)."""
        await zsock.send_multipart([encode(msg)])
        while True:
            frames = await zsock.recv_multipart()
            try:
                reply = decode(frames[-1], self._limits)
            except ProtocolError as exc:
                if exc.ref == ref:
                    raise
                log.warning("undecodable reply discarded: %s", exc)
                continue
            if _reply_ref(reply) == ref:
                return reply
            log.debug("discarded a reply to %r (waiting for %d)", _reply_ref(reply), ref)

    async def admin(
        self, command: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Message:
        """``request(AdminRequest(next_id(), command, args), timeout)``.

        Returns the ``AdminReply`` (or an ``Error`` if the host refused the
        frame); raises as :meth:`request`.
        """
        return await self.request(AdminRequest(self.next_id(), command, args or {}), timeout)


class SyncAdminClient:
    """Blocking twin of :class:`AdminClient` for the CLI (no trio needed).

    ``with SyncAdminClient(endpoint) as c: reply = c.request(msg, 2.0)``

    Raises (from ``request``): ``TimeoutError`` when no reply came in time;
    otherwise as :meth:`AdminClient.request`.

    Concurrency: one thread; blocks it.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        limits: Limits | None = None,
        options: SocketOptions | None = None,
        security: Security | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._limits = limits or Limits()
        options = options or SocketOptions.from_limits(self._limits)
        self._sock = connect_raw(zmq.DEALER, endpoint, context=context, options=options, security=security)
        self._next_id = 1

    def __enter__(self) -> SyncAdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close(linger=0)

    def next_id(self) -> int:
        ref = self._next_id
        self._next_id += 1
        return ref

    def request(self, msg: Message, timeout: float | None = None) -> Message:
        ref = getattr(msg, "id", None)
        if type(ref) is not int:
            raise ValueError(f"{type(msg).__name__} carries no request id")
        deadline = math.inf if timeout is None else time.monotonic() + timeout

        def remaining_ms() -> int | None:
            if deadline == math.inf:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply from {self.endpoint} within {timeout} s")
            return max(1, int(left * 1000))

        frame = encode(msg)
        while True:  # IMMEDIATE: wait for a connection to take the request
            if self._sock.poll(remaining_ms(), zmq.POLLOUT):
                self._sock.send(frame, zmq.NOBLOCK)
                break
        while True:
            if not self._sock.poll(remaining_ms(), zmq.POLLIN):
                continue
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
            try:
                reply = decode(frames[-1], self._limits)
            except ProtocolError as exc:
                if exc.ref == ref:
                    raise
                log.warning("undecodable reply discarded: %s", exc)
                continue
            if _reply_ref(reply) == ref:
                return reply

    def admin(self, command: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Message:
        return self.request(AdminRequest(self.next_id(), command, args or {}), timeout)

