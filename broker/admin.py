"""The host's admin API: one async handler per command of ``protocol.admin``.

Arguments arrive already checked by :func:`protocol.admin.check_admin`.
Mutating operations run under the host's lock (:meth:`Host.locked`);
commands for a node are relayed to it (:meth:`Host.relay`).  Every handler
returns a dict (the ``result`` of the ``AdminReply``) or raises
``KernelError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from protocol.types import Errno, KernelError

if TYPE_CHECKING:
    from .host import Host

Handler = Callable[..., Awaitable[dict[str, Any]]]
ADMIN_HANDLERS: dict[str, Handler] = {}


def handler(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        ADMIN_HANDLERS[name] = fn
        return fn

    return register


def _pages(host: Host, addr: int, length: int) -> None:
    ps = host.config.page_size
    if addr % ps:
        raise KernelError(Errno.EINVAL, f"address {addr:#x} is not page aligned")
    if length % ps:
        raise KernelError(Errno.EINVAL, f"length {length} is not a multiple of the page size")


async def _node_status(host: Host, name: str) -> dict[str, Any] | None:
    try:
        result = await host.relay(name, "status", {}, timeout_ms=1000)
    except KernelError:
        return None
    return result.result if result.ok else None


@handler("status")
async def status(host: Host) -> dict[str, Any]:
    sessions = list(host.sessions.by_name.values())
    reports: dict[str, dict[str, Any] | None] = {}

    async def ask(name: str) -> None:
        reports[name] = await _node_status(host, name)

    async with trio.open_nursery() as nursery:
        for s in sessions:
            if s.state == "live":
                nursery.start_soon(ask, s.name)
    nodes = []
    for s in sessions:
        report = reports.get(s.name) or {}
        served = sum(host.notifier.served(s.name, mm).total() for mm in host.notifier.subscriptions) // host.config.page_size
        nodes.append(
            {
                "name": s.name,
                "kind": s.kind,
                "state": s.state,
                "epoch": s.epoch,
                "mapped_pages": report.get("mapped_pages", served if s.state == "live" else 0),
                "injected": report.get("injected", s.injected),
                "fenced_count": s.fenced_count,
                "fence_reason": s.fence_reason,
                # the node's own view: {mm: {page address (hex): pfn}} and its counters
                "mms": report.get("mms", {}),
                "counters": report.get("counters", {}),
            }
        )
    model = host.model
    return {
        "host": {
            "incarnation": host.incarnation,
            "page_size": host.config.page_size,
            "endpoints": dict(host.endpoints),
            "ack_deadline_ms": host.config.ack_deadline_ms,
            "heartbeat_ms": host.config.heartbeat_ms,
            "wrap_change_pte": host.config.wrap_change_pte,
        },
        "nodes": nodes,
        "mms": model.describe_mms(),
        "frames": {"total": model.memory.nframes, "free": model.memory.nr_free()},
        "stale_accesses": model.stale_accesses,
        "ksm": model.ksm.stats(),
        "counters": {**host.counters, **{f"notifier_{k}": v for k, v in host.notifier.counters.items()},
                     "fences": host.sessions.fences, "registrations": host.sessions.registrations},
    }


@handler("spawn")
async def spawn(host: Host) -> dict[str, Any]:
    return {"mm": host.model.spawn()}


@handler("fork")
async def fork(host: Host, mm: int) -> dict[str, Any]:
    child = await host.locked(host.model.fork(mm))
    host.publish("fork", mm=mm, child=child)
    return {"mm": child}


@handler("exit")
async def exit_mm(host: Host, mm: int) -> dict[str, Any]:
    await host.locked(host.model.exit_mm(mm))
    host.segments.forget_mm(mm)
    host.publish("exit", mm=mm)
    return {}


@handler("mmap")
async def mmap(host: Host, mm: int, pages: int, prot: str, mergeable: bool, shared: bool, fill: int | None) -> dict[str, Any]:
    addr = await host.locked(host.model.mmap(mm, pages, prot, shared=shared, mergeable=mergeable))
    if fill is not None:
        await host.locked(host.model.write(mm, addr, bytes([fill]) * (pages * host.config.page_size)))
    host.publish("mmap", mm=mm, addr=addr, pages=pages, prot=prot)
    return {"addr": addr}


@handler("write")
async def write(host: Host, mm: int, addr: int, data: bytes) -> dict[str, Any]:
    await host.locked(host.model.write(mm, addr, data))
    return {"written": len(data)}


@handler("read")
async def read(host: Host, mm: int, addr: int, length: int) -> dict[str, Any]:
    data = await host.locked(host.model.read(mm, addr, length))
    return {"data": bytes(data)}


@handler("munmap")
async def munmap(host: Host, mm: int, addr: int, length: int) -> dict[str, Any]:
    _pages(host, addr, length)
    await host.locked(host.model.munmap(mm, addr, length))
    host.publish("munmap", mm=mm, addr=addr, length=length)
    return {}


@handler("mprotect")
async def mprotect(host: Host, mm: int, addr: int, length: int, prot: str) -> dict[str, Any]:
    _pages(host, addr, length)
    await host.locked(host.model.mprotect(mm, addr, length, prot))
    host.publish("mprotect", mm=mm, addr=addr, length=length, prot=prot)
    return {}


@handler("madvise")
async def madvise(host: Host, mm: int, addr: int, length: int, advice: str, block: bool = True) -> dict[str, Any]:
    _pages(host, addr, length)
    # block=False: the OOM reaper's non-blockable zap; EAGAIN if a sleepable
    # node cannot take it now (nothing changed: the caller retries later).
    await host.locked(host.model.madvise(mm, addr, length, advice, blockable=block))
    host.publish("madvise", mm=mm, addr=addr, length=length, advice=advice)
    if advice == "mergeable":
        host.wake_ksm()
    return {}


@handler("swap")
async def swap(host: Host, mm: int, addr: int, length: int) -> dict[str, Any]:
    _pages(host, addr, length)
    swapped = await host.locked(host.model.reclaim(mm, addr, length))
    host.publish("swap", mm=mm, addr=addr, length=length, swapped=swapped)
    return {"swapped": swapped}


@handler("migrate")
async def migrate(host: Host, mm: int, addr: int, length: int) -> dict[str, Any]:
    _pages(host, addr, length)
    migrated = await host.locked(host.model.migrate(mm, addr, length))
    host.publish("migrate", mm=mm, addr=addr, length=length, migrated=migrated)
    return {"migrated": migrated}


@handler("merge")
async def merge(host: Host, full_scans: int) -> dict[str, Any]:
    ksm = host.model.ksm
    for _ in range(full_scans):
        await host.locked(ksm.full_scan())
    stats = ksm.stats()
    host.publish("merge", **{k: v for k, v in stats.items() if isinstance(v, int)})
    return stats


@handler("ksm")
async def ksm_knobs(host: Host, **knobs: Any) -> dict[str, Any]:
    ksm = host.model.ksm
    changes = {k: int(v) for k, v in knobs.items() if v is not None}
    for key, value in changes.items():
        ksm.check_knob(key, value)  # all of them before anything changes
    for key, value in changes.items():
        ksm.set_knob(key, value)
    if changes.get("run") == 2:
        await host.locked(ksm.unmerge_all())
    host.wake_ksm()
    return ksm.stats()


async def _relay(host: Host, node: str, command: str, args: dict[str, Any], *,
                 fenced_too: bool = False) -> dict[str, Any]:
    result = await host.relay(node, command, args, fenced_too=fenced_too)
    if not result.ok:
        raise KernelError(result.errno or Errno.EINVAL.value, result.error)
    return result.result


@handler("fault")
async def fault(host: Host, node: str, mm: int, addr: int, pages: int, write: bool) -> dict[str, Any]:
    return await _relay(host, node, "fault", {"mm": mm, "addr": addr, "pages": pages, "write": write})


@handler("access")
async def access(host: Host, node: str, mm: int, addr: int, length: int, data: bytes | None) -> dict[str, Any]:
    args: dict[str, Any] = {"mm": mm, "addr": addr, "length": length}
    if data is not None:
        args["data"] = data
    return await _relay(host, node, "access", args)


@handler("xpmem")
async def xpmem(host: Host, node: str, op: str, **args: Any) -> dict[str, Any]:
    session = host.sessions.by_name.get(node)
    if session is not None and session.kind != "xpmem":
        raise KernelError(Errno.EINVAL, f"{node} is a {session.kind} node, not xpmem")
    return await _relay(host, node, "xpmem", {"op": op, **{k: v for k, v in args.items() if v is not None}})


async def _injection(host: Host, node: str, command: str, args: dict[str, Any]) -> dict[str, Any]:
    """inject/heal: relayed to a hung or fenced node too; the host remembers
    what the node reports injected (for ``status``)."""
    result = await _relay(host, node, command, args, fenced_too=True)
    session = host.sessions.by_name.get(node)
    if session is not None:
        session.injected = dict(result.get("injected", {}))
    return {"node": node, **result}


@handler("inject")
async def inject(host: Host, node: str, kind: str, rate: str, delay_ms: int, for_s: str) -> dict[str, Any]:
    return await _injection(host, node, "inject", {"kind": kind, "rate": rate, "delay_ms": delay_ms, "for_s": for_s})


@handler("heal")
async def heal(host: Host, node: str) -> dict[str, Any]:
    return await _injection(host, node, "heal", {})


@handler("subscribe")
async def subscribe(host: Host, node: str, mm: int) -> dict[str, Any]:
    return await _relay(host, node, "subscribe", {"mm": mm})


@handler("unsubscribe")
async def unsubscribe(host: Host, node: str, mm: int) -> dict[str, Any]:
    return await _relay(host, node, "unsubscribe", {"mm": mm})
