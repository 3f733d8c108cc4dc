"""The supported Python client of a running mmnotify cluster.

One method per admin command, with the names and types of the CLI's
arguments (``mmn fault kvm0 --mm 1 ADDR --pages 4`` is
``await client.fault("kvm0", mm=1, addr=ADDR, pages=4)``); results as typed
objects; a failure as :class:`protocol.types.KernelError` carrying the
errno the host or node answered (``exc.errno is Errno.EFAULT``).  The host
and its keys are found exactly as the CLI finds them: ``host`` else
``$MMN_HOST`` else ``tcp://127.0.0.1:7782``; ``keys`` else ``$MMN_KEYS_DIR``
else the note of a local ``mmn up`` serving that endpoint; ``$MMN_INSECURE=1``
for plain TCP.

::

    async with mmnotify.Client.connect() as c:
        mm = await c.spawn()
        addr = await c.mmap(mm, pages=4, fill=0x5A)
        fault = await c.fault("kvm0", mm=mm, addr=addr, pages=4)
        async for event in c.events():
            ...

:class:`SyncClient` is the same API for scripts and notebooks, without
``await``.  Every call has a deadline (``timeout``, seconds); no call waits
forever.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from mmn.client import (
    BadEndpoint,
    Failed,
    Unreachable,
    UsageError,
    admin_call,
    admin_endpoint,
    client_security,
    events_endpoint,
    subscribe_events,
)
from protocol.messages import Event
from protocol.types import Errno, KernelError

__all__ = [
    "AccessResult", "Client", "ClientError", "Event", "FaultResult", "MmStatus", "NodeStatus", "Page", "Status",
    "SyncClient", "Unreachable",
]

T = TypeVar("T")


class ClientError(Exception):
    """The host refused the request itself (``bad_message``, ``forbidden``):
    not a kernel error of an operation.  ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


# ----------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Page:
    """One page a fault installed: its address, the host frame, writable."""

    addr: int
    pfn: int
    writable: bool


@dataclass(frozen=True, slots=True)
class FaultResult:
    mm: int
    addr: int
    pages: list[Page]


@dataclass(frozen=True, slots=True)
class AccessResult:
    """What a node access did: ``data`` read, or ``written`` bytes."""

    data: bytes | None = None
    written: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NodeStatus:
    name: str
    kind: str
    state: str  # live | fenced
    epoch: int
    mapped_pages: int
    fenced_count: int
    fence_reason: str
    #: a page of the node's own translations: {mm: {page address: pfn}}
    translations: dict[int, dict[int, int]]
    #: cursor of the rest of its translations (``status(node=..., cursor=...)``), None if none
    translations_next: str | None
    invalidations_in_progress: int
    counters: dict[str, int]
    injected: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MmStatus:
    mm: int
    vmas: list[dict[str, Any]]
    vmas_total: int
    present: int
    swapped: int
    subscribers: list[str]


@dataclass(frozen=True, slots=True)
class Status:
    """``mmn status``: bounded; ``mms_next`` / a node's ``translations_next``
    continue what a page left out.  ``raw`` is the reply as the host sent it."""

    incarnation: str
    page_size: int
    endpoints: dict[str, str]
    nodes: list[NodeStatus]
    mms: list[MmStatus]
    mms_total: int
    mms_next: str | None
    frames_total: int
    frames_free: int
    stale_accesses: int
    ksm: dict[str, int]
    counters: dict[str, int]
    raw: dict[str, Any]

    def node(self, name: str) -> NodeStatus:
        """The node called ``name``.  Raises KeyError if it is not listed."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @classmethod
    def from_reply(cls, r: Mapping[str, Any]) -> Status:
        host = r.get("host") or {}
        frames = r.get("frames") or {}
        return cls(
            incarnation=str(host.get("incarnation", "")),
            page_size=int(host.get("page_size", 0)),
            endpoints=dict(host.get("endpoints") or {}),
            nodes=[_node(n) for n in r.get("nodes") or []],
            mms=[MmStatus(mm=int(m["mm"]), vmas=list(m.get("vmas") or []), vmas_total=int(m.get("vmas_total", 0)),
                          present=int(m.get("present", 0)), swapped=int(m.get("swapped", 0)),
                          subscribers=list(m.get("subscribers") or [])) for m in r.get("mms") or []],
            mms_total=int(r.get("mms_total", len(r.get("mms") or []))),
            mms_next=r.get("mms_next"),
            frames_total=int(frames.get("total", 0)),
            frames_free=int(frames.get("free", 0)),
            stale_accesses=int(r.get("stale_accesses", 0)),
            ksm=dict(r.get("ksm") or {}),
            counters=dict(r.get("counters") or {}),
            raw=dict(r),
        )


def _node(n: Mapping[str, Any]) -> NodeStatus:
    return NodeStatus(
        name=str(n["name"]), kind=str(n.get("kind", "")), state=str(n.get("state", "")), epoch=int(n.get("epoch", 0)),
        mapped_pages=int(n.get("mapped_pages", 0)), fenced_count=int(n.get("fenced_count", 0)),
        fence_reason=str(n.get("fence_reason", "")),
        translations={int(mm): {int(a, 16): int(p) for a, p in pages.items()} for mm, pages in (n.get("mms") or {}).items()},
        translations_next=n.get("mms_next"),
        invalidations_in_progress=int(n.get("invalidations_in_progress", 0)),
        counters=dict(n.get("counters") or {}), injected=dict(n.get("injected") or {}),
    )


def _fault(r: Mapping[str, Any]) -> FaultResult:
    return FaultResult(mm=int(r["mm"]), addr=int(r["addr"]),
                       pages=[Page(int(a), int(p), bool(w)) for a, p, w in r.get("pages") or []])


# ----------------------------------------------------------------- the client

#: How an admin request is carried: ``(command, args, timeout) -> result``.
Transport = Callable[[str, dict[str, Any], float], Awaitable[dict[str, Any]]]


class Client:
    """An admin client of one host (trio).  Cheap: each call opens its own
    connection, so one Client may be used by many tasks at once.

    Build it with :meth:`connect` (a real host) or
    :meth:`mmnotify.local.LocalCluster.client` (the in-process cluster, the
    same host core, same interface).
    """

    def __init__(self, transport: Transport, *, timeout: float = 10.0, admin: str = "",
                 security: Any = None) -> None:
        self._transport = transport
        self.timeout = timeout
        self.admin = admin
        self._security = security

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, host: str | None = None, *, keys: str | None = None,
                      timeout: float = 10.0) -> AsyncIterator[Client]:
        """A client of the host at ``host`` (found as the CLI finds it).

        Raises:
            Unreachable: the host does not answer ``status`` within ``timeout``
                (wrong port, refused key, nothing listens), with the CLI's advice.
            ValueError: ``host`` is not a ``tcp://HOST:PORT`` endpoint.
        """
        client = cls.at(host, keys=keys, timeout=timeout)
        await client.status()  # fail now, with the reason, rather than at the first command
        yield client

    @classmethod
    def at(cls, host: str | None = None, *, keys: str | None = None, timeout: float = 10.0) -> Client:
        """A client of the host at ``host`` without asking it anything yet
        (:meth:`connect` checks it answers first).

        Raises:
            ValueError: a bad endpoint, or key files missing or malformed.
        """
        addr, security = _where(host, keys)

        async def carry(command: str, args: dict[str, Any], call_timeout: float) -> dict[str, Any]:
            return await admin_call(addr, command, args, timeout=call_timeout, security=security)

        return cls(carry, timeout=timeout, admin=addr, security=security)

    async def call(self, command: str, **args: Any) -> dict[str, Any]:
        """Any admin command by name (``protocol.admin.COMMANDS``); None
        arguments are left out (the host's default applies).

        Raises:
            KernelError: the host or the node answered this errno.
            ClientError: the host refused the request (a bad argument...).
            Unreachable: no answer within the timeout.
        """
        clean = {k: v for k, v in args.items() if v is not None}
        try:
            return await self._transport(command, clean, self.timeout)
        except Failed as exc:
            raise typed_error(exc.errno, exc.message) from None

    # -- address spaces, on the host
    async def spawn(self) -> int:
        return int((await self.call("spawn"))["mm"])

    async def fork(self, mm: int) -> int:
        return int((await self.call("fork", mm=mm))["mm"])

    async def exit(self, mm: int) -> None:
        await self.call("exit", mm=mm)

    async def mmap(self, mm: int, pages: int, *, prot: str = "rw", mergeable: bool = False, shared: bool = False,
                   fill: int | None = None) -> int:
        """Map ``pages`` anonymous pages; returns the address."""
        return int((await self.call("mmap", mm=mm, pages=pages, prot=prot, mergeable=mergeable, shared=shared,
                                    fill=fill))["addr"])

    async def write(self, mm: int, addr: int, data: bytes) -> int:
        return int((await self.call("write", mm=mm, addr=addr, data=bytes(data)))["written"])

    async def read(self, mm: int, addr: int, length: int) -> bytes:
        return bytes((await self.call("read", mm=mm, addr=addr, length=length))["data"])

    async def munmap(self, mm: int, addr: int, length: int) -> None:
        await self.call("munmap", mm=mm, addr=addr, length=length)

    async def mprotect(self, mm: int, addr: int, length: int, prot: str) -> None:
        await self.call("mprotect", mm=mm, addr=addr, length=length, prot=prot)

    async def madvise(self, mm: int, addr: int, length: int, advice: str, *, block: bool = True) -> None:
        await self.call("madvise", mm=mm, addr=addr, length=length, advice=advice, block=block)

    async def swap(self, mm: int, addr: int, length: int) -> int:
        """Reclaim the range to swap; returns the pages swapped out."""
        return int((await self.call("swap", mm=mm, addr=addr, length=length))["swapped"])

    async def migrate(self, mm: int, addr: int, length: int) -> int:
        return int((await self.call("migrate", mm=mm, addr=addr, length=length))["migrated"])

    # -- KSM
    async def merge(self, full_scans: int = 1) -> dict[str, int]:
        """``full_scans`` full KSM scans; the sysfs counters after them."""
        return dict(await self.call("merge", full_scans=full_scans))

    async def ksm(self, *, run: int | None = None, pages_to_scan: int | None = None,
                  sleep_millisecs: int | None = None, max_page_sharing: int | None = None,
                  use_zero_pages: bool | None = None) -> dict[str, int]:
        return dict(await self.call("ksm", run=run, pages_to_scan=pages_to_scan, sleep_millisecs=sleep_millisecs,
                                    max_page_sharing=max_page_sharing, use_zero_pages=use_zero_pages))

    # -- secondary MMUs
    async def fault(self, node: str, *, mm: int, addr: int, pages: int = 1, write: bool = False) -> FaultResult:
        """A secondary page fault on ``node`` (it is granted ``mm``)."""
        return _fault(await self.call("fault", node=node, mm=mm, addr=addr, pages=pages, write=write))

    async def access(self, node: str, *, mm: int, addr: int, length: int = 1, data: bytes | None = None
                     ) -> AccessResult:
        """Read ``length`` bytes, or write ``data``, through ``node``'s translations."""
        r = await self.call("access", node=node, mm=mm, addr=addr, length=length,
                            data=None if data is None else bytes(data))
        return AccessResult(data=bytes(r["data"]) if "data" in r else None,
                            written=int(r["written"]) if "written" in r else None, raw=r)

    async def subscribe(self, node: str, *, mm: int) -> None:
        await self.call("subscribe", node=node, mm=mm)

    async def unsubscribe(self, node: str, *, mm: int) -> None:
        await self.call("unsubscribe", node=node, mm=mm)

    async def grant(self, node: str, *, mm: int, read_only: bool = False) -> None:
        await self.call("grant", node=node, mm=mm, read_only=read_only)

    async def revoke(self, node: str, *, mm: int) -> int:
        """End ``node``'s grant of ``mm``; returns the pins dropped."""
        return int((await self.call("revoke", node=node, mm=mm))["unpinned"])

    async def inject(self, node: str, kind: str, *, rate: float = 1.0, delay_ms: int = 0,
                     for_s: float | None = None) -> dict[str, Any]:
        """A failure on ``node`` (``protocol.admin.INJECT_KINDS``); returns what is injected there now."""
        return dict(await self.call("inject", node=node, kind=kind, rate=str(rate), delay_ms=delay_ms,
                                    for_s="" if for_s is None else str(for_s)))

    async def heal(self, node: str) -> None:
        await self.call("heal", node=node)

    # -- XPMEM, on behalf of an xpmem node
    async def xpmem_make(self, node: str, *, mm: int, addr: int, length: int, mode: int = 0o600) -> int:
        return int((await self.call("xpmem", node=node, op="make", mm=mm, addr=addr, length=length,
                                    mode=mode))["segid"])

    async def xpmem_get(self, node: str, *, segid: int, write: bool = True) -> int:
        """``xpmem_get``: a permit (apid) for ``segid``; read-write unless
        ``write=False`` (XPMEM_RDONLY), which ``xpmem_attach`` refuses with
        EACCES as hpc/xpmem does (attach always asks for RDWR)."""
        return int((await self.call("xpmem", node=node, op="get", segid=segid, write=write))["apid"])

    async def xpmem_attach(self, node: str, *, apid: int, length: int, offset: int = 0) -> int:
        return int((await self.call("xpmem", node=node, op="attach", apid=apid, length=length,
                                    offset=offset))["vaddr"])

    async def xpmem_detach(self, node: str, *, addr: int) -> None:
        await self.call("xpmem", node=node, op="detach", addr=addr)

    async def xpmem_release(self, node: str, *, apid: int) -> None:
        await self.call("xpmem", node=node, op="release", apid=apid)

    async def xpmem_remove(self, node: str, *, segid: int) -> None:
        await self.call("xpmem", node=node, op="remove", segid=segid)

    # -- the cluster
    async def status(self, *, mm: int | None = None, node: str | None = None, cursor: str | None = None,
                     limit: int | None = None) -> Status:
        return Status.from_reply(await self.call("status", mm=mm, node=node, cursor=cursor, limit=limit))

    async def events(self, *, timeout: float | None = None) -> AsyncIterator[Event]:
        """The host's event stream, from now on (``mmn watch``).

        Raises:
            Unreachable: the event endpoint does not complete its handshake
                within ``timeout`` (default: the client's).
        """
        if not self.admin:
            raise ClientError("unsupported", "this client has no event stream (an in-process cluster)")
        published = (await self.status()).endpoints.get("events")
        if not published:
            raise KernelError(Errno.ENOENT, "the host's status names no event endpoint")
        where = events_endpoint(published, self.admin)
        async with subscribe_events(where, security=self._security,
                                    timeout=self.timeout if timeout is None else timeout) as stream:
            await trio.sleep(0.1)  # PUB/SUB: the subscription reaches the host after the handshake
            async for event in stream:
                yield event


def _where(host: str | None, keys: str | None) -> tuple[str, Any]:
    """The admin endpoint and CURVE hook, found as the CLI finds them.

    Raises:
        ValueError: a bad endpoint, or key files missing or malformed.
    """
    try:
        addr = admin_endpoint(host)
        return addr, client_security(keys, endpoint=addr)
    except (BadEndpoint, UsageError) as exc:
        raise ValueError(str(exc)) from None


def typed_error(code: str, message: str) -> Exception:
    """The typed exception of an error reply: KernelError for an errno, else ClientError."""
    try:
        return KernelError(Errno(code), message)
    except ValueError:
        return ClientError(code, message)


# ----------------------------------------------------------------- sync twin


class SyncClient:
    """:class:`Client` without ``await``, for scripts and notebooks: every
    method of the async client, each call run to completion in its own
    ``trio.run`` (not from inside a trio program: use :class:`Client` there).
    ``events`` is not offered (an endless stream wants a trio program)."""

    def __init__(self, host: str | None = None, *, keys: str | None = None, timeout: float = 10.0) -> None:
        self._client = Client.at(host, keys=keys, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if name.startswith("_") or name == "events" or not callable(method):
            raise AttributeError(name)

        @functools.wraps(method)
        def run(*args: Any, **kwargs: Any) -> Any:
            return trio.run(functools.partial(method, *args, **kwargs))

        return run
