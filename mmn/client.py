"""The client of a running mmnotify host: what the CLI, ``mmn up``, the soak,
the containers' health check and a user's own scripts share.  Nothing here
prints; failures are typed exceptions, each with the ``mmn`` exit status it
stands for.

* **Endpoints**: :func:`parse_endpoint` (``tcp://H:P``, ``ipc://``,
  ``inproc://`` or ``H:P``), :func:`admin_endpoint` (an explicit one, else
  ``$MMN_HOST``, else :data:`DEFAULT_ADMIN`), :func:`events_endpoint`.
* **Keys**: :func:`client_security` finds the CURVE keys as every ``mmn``
  command does: ``--keys DIR``, else ``$MMN_KEYS_DIR`` (or the single files
  ``$MMN_ADMIN_KEY`` / ``$MMN_HOST_KEY``), else the note a local ``mmn up``
  leaves for the admin port it serves (:func:`read_up_record`);
  ``$MMN_INSECURE=1`` is plain TCP whatever else is set.
* **Admin calls**: :func:`admin_call` (one request, its result, the reason
  when the host cannot be reached); :class:`AdminClient` (trio) and
  :class:`SyncAdminClient` (blocking) for many requests on one connection.
* **Events**: :func:`subscribe_events`, the host's PUB stream.

Exit status of the ``mmn`` command for each outcome:

====  ===============================================================
0     :data:`EXIT_OK`
1     :data:`EXIT_FAILED`: :class:`Failed`, the host (or node) answered
      with an errno or refused the request
2     :data:`EXIT_USAGE`: :class:`UsageError`, bad input; nothing was sent
3     :data:`EXIT_UNREACHABLE`: :class:`Unreachable`, no answer from the
      host (its ``reason`` says why)
====  ===============================================================

Built on :mod:`transport` (the socket adapter and CURVE).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import trio
import zmq

from protocol import Limits, Message, ProtocolError, decode, encode
from protocol.messages import AdminReply, AdminRequest, Error, Event
from transport import (
    LinkFailed,
    LinkMonitor,
    Security,
    SocketOptions,
    ZSocket,
    connect,
    connect_monitored,
    connect_raw,
    handshake_probe,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ADMIN", "DEFAULT_ADMIN_PORT", "DEFAULT_EVENTS_PORT", "DEFAULT_NODE_ENDPOINT", "DEFAULT_NODE_PORT",
    "DEFAULT_TIMEOUT", "EXIT_FAILED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "REFUSED_GRACE",
    "AdminClient", "BadEndpoint", "EventStream", "Failed", "SyncAdminClient", "Unreachable", "UsageError",
    "admin_call", "admin_endpoint", "client_security", "env_endpoint", "events_endpoint", "host_events_endpoint",
    "link_failure", "live_up_records", "parse_endpoint", "port_hint", "read_up_record", "remove_up_record",
    "subscribe_events", "up_keys_for", "up_record_path", "write_up_record",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DEFAULT_NODE_PORT = 7781
DEFAULT_ADMIN_PORT = 7782
DEFAULT_EVENTS_PORT = 7783
DEFAULT_ADMIN = f"tcp://127.0.0.1:{DEFAULT_ADMIN_PORT}"
DEFAULT_NODE_ENDPOINT = f"tcp://127.0.0.1:{DEFAULT_NODE_PORT}"
DEFAULT_TIMEOUT = 10.0
#: Seconds of refused connections after which a command gives up (nothing
#: listens); a handshake failure gives up at once.
REFUSED_GRACE = 1.0


# --------------------------------------------------------------------------
# errors


class UsageError(Exception):
    """Bad input found before anything was sent: exit 2."""


class Unreachable(Exception):
    """No answer from the host: exit 3.

    ``reason`` says why, for scripts (``--json`` carries it): ``timeout``
    (nothing came in time), ``refused`` (nothing listens), ``key`` (the host
    refused this client's key, or this client has none or the wrong host
    key), ``insecure`` (the host runs plain TCP, this client CURVE),
    ``not_admin`` (the port does not take admin requests).
    """

    def __init__(self, message: str, reason: str = "timeout") -> None:
        self.reason = reason
        super().__init__(message)


class Failed(Exception):
    """The host or node answered with an error: exit 1."""

    def __init__(self, errno: str, message: str = "") -> None:
        self.errno = errno or "error"
        self.message = message
        super().__init__(f"{self.errno}: {message}" if message else self.errno)


class BadEndpoint(ValueError):
    """Not a ZeroMQ endpoint we can connect to; the message says why."""


# --------------------------------------------------------------------------
# endpoints


_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+):(\d{1,5})$")


def parse_endpoint(text: str) -> str:
    """A ZeroMQ endpoint from ``tcp://H:P``, ``ipc://PATH``, ``inproc://N`` or ``H:P``.

    Returns:
        The endpoint with its scheme (``H:P`` becomes ``tcp://H:P``).
    Raises:
        BadEndpoint: anything else.
    """
    t = text.strip()
    if "://" in t:
        scheme, _, rest = t.partition("://")
        if scheme not in ("tcp", "ipc", "inproc") or not rest:
            raise BadEndpoint(f"{text!r} is not a ZeroMQ endpoint")
        if scheme == "tcp" and not _HOSTPORT.match(rest):
            raise BadEndpoint(f"{text!r}: want tcp://HOST:PORT")
        return t
    m = _HOSTPORT.match(t)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise BadEndpoint(f"{text!r} is not HOST:PORT or a ZeroMQ endpoint")
    return f"tcp://{t}"


def env_endpoint(name: str, default: str, env: Mapping[str, str] | None = None) -> str:
    """The endpoint in ``$name``, or ``default`` when it is unset or empty.

    Raises:
        UsageError: ``$name`` is set to something that is not an endpoint.
    """
    value = (os.environ if env is None else env).get(name)
    if not value:
        return default
    try:
        return parse_endpoint(value)
    except BadEndpoint as exc:
        raise UsageError(f"${name}: {exc}") from None


def admin_endpoint(host: str | None = None) -> str:
    """The admin endpoint to use: ``host``, else ``$MMN_HOST``, else :data:`DEFAULT_ADMIN`.

    Raises:
        BadEndpoint: ``host`` is not an endpoint.
        UsageError: ``$MMN_HOST`` is not one.
    """
    return parse_endpoint(host) if host else env_endpoint("MMN_HOST", DEFAULT_ADMIN)


def events_endpoint(published: str, admin: str) -> str:
    """Where to SUBscribe: the host's event endpoint, with a wildcard bind
    address replaced by the host part of the admin endpoint we reached."""
    m = re.match(r"^tcp://(.*):(\d+)$", published)
    if not m:
        return published
    bind_host = m.group(1)
    if bind_host in ("*", "0.0.0.0", "::", "[::]", ""):
        am = re.match(r"^tcp://(.*):(\d+)$", admin)
        peer = am.group(1) if am else "127.0.0.1"
        return f"tcp://{peer}:{m.group(2)}"
    return published


# --------------------------------------------------------------------------
# keys: the note of a local `mmn up`, and the CURVE hook of a client


def up_record_path(port: int) -> Path:
    """Where ``mmn up`` serving the admin port ``port`` on this machine leaves
    its key directory for the CLI of a second terminal (paths only, no
    secret: the keys themselves stay in their 0700 directory)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"mmnotify-{os.getuid()}-up-{port}.json"


def read_up_record(port: int) -> dict[str, Any] | None:
    """The note of the live ``mmn up`` serving admin port ``port`` on this
    machine (``{"pid", "keys", "admin", "ports", ...}``), or None (no note,
    or its ``mmn up`` is gone)."""
    try:
        record = json.loads(up_record_path(port).read_text())
        os.kill(int(record["pid"]), 0)  # a dead mmn up's record means nothing
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) else None


def live_up_records() -> list[dict[str, Any]]:
    """Every live ``mmn up`` note of this user on this machine."""
    base = up_record_path(0).parent
    out = []
    for path in sorted(base.glob(f"mmnotify-{os.getuid()}-up-*.json")):
        port = path.stem.rsplit("-", 1)[-1]
        record = read_up_record(int(port)) if port.isdigit() else None
        if record is not None:
            out.append(record)
    return out


def write_up_record(port: int, record: Mapping[str, Any]) -> Path | None:
    """Leave ``record`` (with this process's ``pid``) as the note of the
    ``mmn up`` serving admin port ``port``; never replaces the note of another
    live ``mmn up``.

    Returns:
        The note's path, or None when it was not written (another's, or the
        directory is not writable; logged).
    """
    path = up_record_path(port)
    other = read_up_record(port)
    if other is not None and other.get("pid") != os.getpid():
        log.warning("%s belongs to mmn up pid %s; not replacing it", path, other.get("pid"))
        return None
    try:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), **record}))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record the keys for the CLI at %s: %s", path, exc)
        return None
    return path


def remove_up_record(path: Path) -> None:
    """Remove the note at ``path`` only if it is this process's."""
    try:
        if json.loads(path.read_text()).get("pid") != os.getpid():
            return
        path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def _loopback_port(endpoint: str) -> int | None:
    hostpart, _, port = endpoint.rpartition(":")
    if not hostpart.endswith(("127.0.0.1", "localhost", "[::1]")) or not port.isdigit():
        return None
    return int(port)


def up_keys_for(endpoint: str) -> str | None:
    """The key directory of the live ``mmn up`` whose admin endpoint is
    ``endpoint`` (loopback only), or None (also for an ``--insecure`` one)."""
    port = _loopback_port(endpoint)
    if port is None:
        return None
    record = read_up_record(port)
    if record is None:  # another of its ports (`mmn watch --events ADDR`)
        record = next((r for r in live_up_records() if port in (r.get("ports") or {}).values()), None)
    keys = record.get("keys") if record else None
    return str(keys) if keys else None


def client_security(keys: str | None = None, env: Mapping[str, str] | None = None, *,
                    endpoint: str | None = None) -> Any:
    """The CURVE hook of an operator's client (CLI, ``mmn up``, healthchecks),
    or None for plain TCP.

    ``keys`` (``--keys DIR``), else ``$MMN_KEYS_DIR``: the admin pair
    ``DIR/admin/admin.key_secret`` (or ``$MMN_ADMIN_KEY``) and the host's
    public key ``DIR/host/host.key`` (or ``$MMN_HOST_KEY``); else, for an
    ``endpoint`` on loopback, the keys of the local ``mmn up`` serving it.
    ``$MMN_INSECURE=1`` means plain TCP whatever else is set.

    Raises:
        UsageError: a key file is missing or malformed.
    """
    from transport.curve import CurveClient, KeyError_, KeyLayout

    env = os.environ if env is None else env
    if env.get("MMN_INSECURE", "") not in ("", "0"):
        return None
    root = keys or env.get("MMN_KEYS_DIR") or None
    secret = env.get("MMN_ADMIN_KEY") or None
    host_key = env.get("MMN_HOST_KEY") or None
    if root is None and secret is None and host_key is None and endpoint is not None:
        root = up_keys_for(endpoint)  # the local `mmn up` serving that endpoint, if any
    if root is None and secret is None and host_key is None:
        return None
    layout = KeyLayout(Path(root)) if root else None
    secret = secret or (str(layout.admin_secret()) if layout else None)
    host_key = host_key or (str(layout.host_public) if layout else None)
    if secret is None or host_key is None:
        raise UsageError("CURVE needs the admin secret key and the host's public key (--keys DIR or $MMN_KEYS_DIR)")
    try:
        return CurveClient.from_files(secret, host_key)
    except KeyError_ as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------
# why the host cannot be reached


#: What each port of a host is, by the default numbers (compose publishes these).
_DEFAULT_PORT_ROLES = {DEFAULT_NODE_PORT: "node", DEFAULT_ADMIN_PORT: "admin", DEFAULT_EVENTS_PORT: "events"}


def port_hint(addr: str, want: str = "admin") -> str:
    """Why ``addr`` may be the wrong port: it is the node or events port of a
    local ``mmn up`` (from its note), or of the default numbering; "" if
    nothing is known against it."""
    hostpart, _, port_text = addr.rpartition(":")
    if not port_text.isdigit():
        return ""
    port = int(port_text)
    if _loopback_port(addr) is not None:
        for record in live_up_records():
            ports = record.get("ports") or {}
            for role, number in ports.items():
                if number == port and role != want and isinstance(ports.get(want), int):
                    return (f"; port {port} is the {role} port of `mmn up` (pid {record.get('pid')}), "
                            f"its {want} port is {hostpart}:{ports[want]}")
    role = _DEFAULT_PORT_ROLES.get(port)
    if role is not None and role != want:
        wanted = next(p for p, r in _DEFAULT_PORT_ROLES.items() if r == want)
        return f"; {port} is the default {role} port, the {want} port is {wanted} by default"
    return ""


def _no_keys_advice() -> str:
    if os.environ.get("MMN_INSECURE", "") not in ("", "0"):
        return "$MMN_INSECURE is set, so this client sent no key; unset it and give the cluster's keys " \
               "(--keys DIR or $MMN_KEYS_DIR)"
    return ("this client has no keys (no --keys, no $MMN_KEYS_DIR, and no note of a local `mmn up` for this port): "
            "pass --keys DIR (the keys directory `mmn up` prints) or set $MMN_KEYS_DIR")


_FROM_ENV: Any = object()


async def link_failure(exc: LinkFailed, addr: str, security: Any, what: str = "admin") -> Unreachable:
    """The :class:`Unreachable` (its message with the fix) for a failed link.

    A handshake the host closes without detail is ambiguous (a refused key,
    CURVE against plain TCP, the events port): a probe with a SUB socket
    (the events port lets it in) and, for a CURVE client, one in plain TCP
    tell which.  Concurrency: awaits the probes (at most 2 s, in a thread).
    """
    head = f"no answer from the host at {addr}"
    hint = port_hint(addr, what)
    reason = exc.reason
    if reason in ("handshake", "closed", "protocol") and what == "admin":
        if await trio.to_thread.run_sync(handshake_probe, addr, zmq.SUB, security):
            return Unreachable(f"{head}: this is an event port, not the admin port (a subscriber gets in; "
                               f"`mmn watch --events ADDR` reads it){hint}", "not_admin")
        if security is not None and await trio.to_thread.run_sync(handshake_probe, addr, zmq.DEALER, None):
            reason = "mechanism"
    if reason == "refused":
        running = [str(r.get(what)) for r in live_up_records() if r.get(what)]
        if running:
            hint += f"; `mmn up` of yours runs here with {what} {', '.join(running)}"
        return Unreachable(f"{head}: nothing listens there (connection refused); start a cluster (`mmn up`) "
                           f"or name its {what} endpoint (--host ADDR or $MMN_HOST){hint}", "refused")
    if reason == "mechanism" and security is not None:  # (a plain client: the host runs CURVE, below)
        return Unreachable(f"{head}: it runs plain TCP and this client CURVE; set MMN_INSECURE=1 "
                           f"for a cluster started with --insecure{hint}", "insecure")
    if reason == "closed" and security is None:
        return Unreachable(f"{head}: this is not an {what} port (the peer closed the connection in the "
                           f"ZeroMQ handshake: its socket type takes no requests){hint}", "not_admin")
    if reason == "protocol":
        return Unreachable(f"{head}: the ZeroMQ handshake failed (protocol error {exc.value:#x}): "
                           f"is this a mmnotify {what} port?{hint}", "not_admin")
    # auth, handshake (closed under CURVE): the host closed the handshake on us
    if security is None:
        return Unreachable(f"{head}: the host refused this client: it runs CURVE and {_no_keys_advice()}{hint}",
                           "key")
    detail = f"ZAP status {exc.value}" if reason == "auth" else "the CURVE handshake failed"
    return Unreachable(f"{head}: the host refused this client's key ({detail}); use that cluster's admin key "
                       f"and host key (--keys DIR: DIR/admin/admin.key_secret and DIR/host/host.key, or "
                       f"$MMN_KEYS_DIR){hint}", "key")


async def admin_call(
    addr: str,
    command: str,
    args: Mapping[str, Any],
    *,
    timeout: float,
    security: Any = _FROM_ENV,
    refused_grace: float | None = None,
) -> dict[str, Any]:
    """Send one admin request and wait for its reply.

    Returns:
        The reply's ``result``.
    Raises:
        Unreachable: no reply within ``timeout`` seconds (the DEALER is
            ``IMMEDIATE``, so an absent host times out on the send too); at
            once when the handshake fails (a refused key, no keys against
            CURVE, CURVE against plain TCP, a port that takes no requests),
            and after ``refused_grace`` seconds of refused connections (None:
            wait for a host that may be starting).  Its message says which,
            and the fix.
        Failed: the host answered ``ok=False`` (its errno), a typed ``Error``
            (it refused the request), or a reply that does not decode.
    Concurrency: awaits; the client socket is private to this call and closed
    before it returns, also when cancelled.

    ``security``: a CURVE hook, None for plain TCP; by default
    :func:`client_security` from the environment.
    """
    if security is _FROM_ENV:
        security = client_security()
    grace = None if refused_grace is None else min(refused_grace, timeout)
    async with AdminClient(addr, security=security, diagnose=True, refused_grace=grace) as client:
        request = AdminRequest(id=client.next_id(), command=command, args=dict(args))
        try:
            reply = await client.request(request, timeout)
        except LinkFailed as exc:
            raise await link_failure(exc, addr, security) from None
        except trio.TooSlowError:
            state = client.link.state if client.link is not None else ""
            why = ""
            if state == "ready":
                why = f" (connected, but nothing came back: is this its admin port?{port_hint(addr)})"
            raise Unreachable(f"no answer from the host at {addr} within {timeout:g}s{why}") from None
        except ProtocolError as exc:
            raise Failed("bad_message", f"malformed reply from the host: {exc.message}") from exc
    if isinstance(reply, AdminReply):
        if not reply.ok:
            raise Failed(reply.errno, reply.error)
        return dict(reply.result)
    if isinstance(reply, Error):
        if reply.code == "unregistered":  # the node channel: it wants a Register first
            raise Unreachable(f"no answer from the host at {addr}: this is a node port, not the admin port (it "
                              f"answered {reply.code}: {reply.message}){port_hint(addr)}", "not_admin")
        raise Failed(reply.code, reply.message)
    raise Failed("bad_message", f"the host answered {type(reply).TYPE!r} to an admin request")


async def host_events_endpoint(admin: str, *, timeout: float, security: Any = _FROM_ENV,
                               refused_grace: float | None = None) -> str:
    """Where the host at ``admin`` publishes its events, as its ``status``
    names them (a wildcard bind replaced by ``admin``'s host part).

    Raises:
        Unreachable, Failed: as :func:`admin_call`; ``Failed("ENOENT")`` when
            the status names no event endpoint.
    """
    status = await admin_call(admin, "status", {}, timeout=timeout, security=security, refused_grace=refused_grace)
    published = ((status.get("host") or {}).get("endpoints") or {}).get("events")
    if not isinstance(published, str) or not published:
        raise Failed("ENOENT", "the host's status names no event endpoint")
    return events_endpoint(published, admin)


class EventStream:
    """An open subscription to a host's event stream (:func:`subscribe_events`):
    ``async for event in stream`` or ``await stream.receive()``.

    Concurrency: one task receives; another may await :meth:`gone`.
    """

    def __init__(self, sub: ZSocket, link: LinkMonitor, endpoint: str, limits: Limits | None = None) -> None:
        self._sub = sub
        self._link = link
        self._limits = limits or Limits()
        self.endpoint = endpoint

    async def receive(self) -> Event:
        """The next event; frames that do not decode, or are no ``Event``, are skipped.

        Concurrency: awaits (for ever if nothing is published); cancel-safe.
        """
        while True:
            frames = await self._sub.recv_multipart()
            try:
                event = decode(frames[-1], self._limits)
            except ProtocolError as exc:
                log.debug("undecodable event: %s", exc)
                continue
            if isinstance(event, Event):
                return event

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        return await self.receive()

    async def gone(self) -> Unreachable:
        """Wait until the stream goes away for good (the host stopped: nothing
        listens there any more); returns the :class:`Unreachable` saying so.

        Concurrency: awaits (for ever while the host is there); cancel-safe.
        """
        await self._link.failure()
        return Unreachable(f"the host's event stream at {self.endpoint} went away (nothing listens there any more)",
                           "refused")


@contextlib.asynccontextmanager
async def subscribe_events(endpoint: str, *, security: Any, timeout: float,
                           refused_grace: float | None = REFUSED_GRACE) -> AsyncIterator[EventStream]:
    """Subscribe to every event published at ``endpoint``; the stream is open
    once the ZeroMQ handshake is done (events published before are not seen).

    Raises:
        Unreachable: no handshake within ``timeout`` seconds, or at once when
            the link says why (nothing listens after ``refused_grace``
            seconds, a refused key...), with the fix.
    Concurrency: the SUB socket belongs to the task in the ``async with``;
    closed when it is left.
    """
    sub, link = connect_monitored(zmq.SUB, endpoint, security=security, refused_grace=refused_grace)
    try:
        sub.socket.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            with trio.fail_after(timeout):
                await link.ready()
        except trio.TooSlowError:
            raise Unreachable(f"no answer from the host's event endpoint {endpoint} within {timeout:g}s") from None
        except LinkFailed as exc:
            raise await link_failure(exc, endpoint, security, "events") from None
        yield EventStream(sub, link, endpoint)
    finally:
        link.close()
        sub.close()


# --------------------------------------------------------------------------
# request / reply clients for the admin channel


def _reply_ref(msg: Message) -> int | None:
    ref = getattr(msg, "ref", None)
    return ref if type(ref) is int else None


def _reply_to(frames: list[bytes], ref: int, limits: Limits) -> Message | None:
    """The reply in ``frames`` if it answers request ``ref``; None for one
    that does not (a late reply to an earlier request, logged and dropped).

    Raises:
        ProtocolError: the reply to ``ref`` did not decode.
    """
    try:
        reply = decode(frames[-1], limits)
    except ProtocolError as exc:
        if exc.ref == ref:
            raise
        log.warning("undecodable reply discarded: %s", exc)
        return None
    if _reply_ref(reply) == ref:
        return reply
    log.debug("discarded a reply to %r (waiting for %d)", _reply_ref(reply), ref)
    return None


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
            reply = _reply_to(await zsock.recv_multipart(), ref, self._limits)
            if reply is not None:
                return reply

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
            reply = _reply_to(self._sock.recv_multipart(zmq.NOBLOCK), ref, self._limits)
            if reply is not None:
                return reply

    def admin(self, command: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Message:
        return self.request(AdminRequest(self.next_id(), command, args or {}), timeout)

