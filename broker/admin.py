"""The host's admin API: one handler per command of ``protocol.admin``.

Each handler is a host task (:mod:`broker.tasks`): a generator that the host
core (:class:`broker.core.HostCore`) runs, yielding ``Locked(op)`` for a
mutating operation under the mm lock and ``Relay`` / ``RelayAll`` for a
command a node carries out.  Arguments arrive already checked by
:func:`protocol.admin.check_admin`.  Every handler returns a dict (the
``result`` of the ``AdminReply``) or raises ``KernelError``.  Sans-I/O: the
same handlers answer ``mmn host``'s admin socket and the in-process cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from protocol.status import (
    MMS_PAGE,
    NODE_PREVIEW,
    PAGES_PAGE,
    check_limit,
    mm_cursor,
    parse_mm_cursor,
    parse_page_cursor,
)
from protocol.types import Errno, KernelError

from .sessions import SessionState
from .tasks import Locked, Relay, RelayAll, Task

#: ``core`` below is the :class:`broker.core.HostCore` (not imported: the core imports this table).
Handler = Callable[..., Task[dict[str, Any]]]
ADMIN_HANDLERS: dict[str, Handler] = {}


def handler(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        ADMIN_HANDLERS[name] = fn
        return fn

    return register


def _pages(core: Any, addr: int, length: int) -> None:
    ps = core.config.page_size
    if addr % ps:
        raise KernelError(Errno.EINVAL, f"address {addr:#x} is not page aligned")
    if length % ps:
        raise KernelError(Errno.EINVAL, f"length {length} is not a multiple of the page size")


@handler("status")
def status(core: Any, mm: int | None = None, node: str | None = None, cursor: str | None = None,
           limit: int | None = None) -> Task[dict[str, Any]]:
    """Bounded whatever the host holds (``protocol.status``): every node's
    summary and the first page of mms; ``mm`` narrows both to one mm,
    ``node`` to one node with its translations a page at a time, ``cursor``
    continues the page a previous reply's ``mms_next`` named.

    Raises:
        KernelError: ESRCH (no such mm or node), EINVAL (bad cursor).
    """
    model = core.model
    if mm is not None:
        model.check_mm(mm)
    sessions = list(core.sessions.by_name.values())
    if node is not None:
        sessions = [s for s in sessions if s.name == node]
        if not sessions:
            raise KernelError(Errno.ESRCH, f"no node {node!r}")
        ask: dict[str, Any] = {"cursor": cursor, "limit": check_limit(limit, PAGES_PAGE)}
        parse_page_cursor(cursor)  # checked here too: a bad one is EINVAL before anything is asked
        mm_page: list[dict[str, Any]] = [] if mm is None else [model.describe_mm(mm)]
        mms_next = None
    else:
        ask = {"limit": NODE_PREVIEW}
        mm_page, mms_next = _mms_page(model, mm, cursor, limit)
    if mm is not None:
        ask["mm"] = mm
    live = tuple(s.name for s in sessions if s.state == SessionState.LIVE)
    # the summary waits a second for each node; a page of one node's
    # translations, which the caller cannot do without, a relayed command's time
    wait_ms = 1000 if node is None else max(1000, core.config.command_timeout_ms)
    results = yield RelayAll(live, "status", {k: v for k, v in ask.items() if v is not None}, timeout_ms=wait_ms)
    nodes = []
    for s in sessions:
        result = results.get(s.name)
        report = (result.result if result is not None and result.ok else None) or {}
        if node is not None and not report and s.state == SessionState.LIVE:
            # A page of one node's translations that did not come is not the
            # end of them: an empty page with no cursor would end the caller's
            # walk early.  Say so; the same cursor asks again.
            if result is not None and result.errno:
                raise KernelError(result.errno, f"{s.name}: {result.error or result.errno}")  # as _relay does
            raise KernelError(Errno.ETIMEDOUT, f"{s.name} did not send its status page in time; "
                                               "ask again with the same cursor")
        if report:
            translations, rest = report.get("mms", {}), report.get("mms_next")
        else:  # no answer: the host's own count, and no detail
            translations, rest = {}, None
        served = sum(core.notifier.served(s.name, m).total() for m in core.notifier.subscriptions) // core.config.page_size
        nodes.append(
            {
                "name": s.name,
                "kind": s.kind,
                "state": s.state,
                "epoch": s.epoch,
                "mapped_pages": report.get("mapped_pages", served if s.state == SessionState.LIVE else 0),
                "injected": report.get("injected", s.injected),
                "fenced_count": s.fenced_count,
                "fence_reason": s.fence_reason,
                # the node's own view, a page of it: {mm: {page address (hex): pfn}}, and its counters
                "mms": translations,
                "mms_next": rest,
                # False: the node did not answer in time (mapped_pages is the host's own count, no detail)
                "answered": bool(report),
                "invalidations_in_progress": report.get("invalidations_in_progress", 0),
                "counters": report.get("counters", {}),
            }
        )
    return {
        "host": {
            "incarnation": core.config.incarnation,
            "page_size": core.config.page_size,
            "endpoints": dict(core.endpoints),
            "ack_deadline_ms": core.config.ack_deadline_ms,
            "heartbeat_ms": core.config.heartbeat_ms,
            # a node silent for liveness heartbeats is fenced; a relayed command gives up after command_timeout_ms
            "liveness": core.config.liveness,
            "command_timeout_ms": core.config.command_timeout_ms,
            "wrap_change_pte": core.config.wrap_change_pte,
        },
        "nodes": nodes,
        "mms": mm_page,
        "mms_total": len(model.mms),
        "mms_next": mms_next,
        "frames": {"total": model.memory.nframes, "free": model.memory.nr_free()},
        "stale_accesses": model.stale_accesses,
        # interval notifiers (the hmm kind): per mm its invalidate_seq and intervals
        "intervals": core.notifier.intervals.describe(mm),
        # device-private pages of hmm nodes (broker/devmem.py): poisoned ones are lost with their device
        "device_private": model.device.describe(),
        "ksm": model.ksm.stats(),
        "counters": {**core.counters, **{f"notifier_{k}": v for k, v in core.notifier.counters.items()},
                     "fences": core.sessions.fences, "registrations": core.sessions.registrations,
                     # /proc/xpmem's global pinned / unpinned page counters (broker.mm.Model)
                     "pages_pinned": model.pages_pinned, "pages_unpinned": model.pages_unpinned},
    }


def _mms_page(model: Any, mm: int | None, cursor: str | None, limit: int | None) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the mm list (or mm ``mm`` alone), and the cursor of the rest."""
    if mm is not None:
        return [model.describe_mm(mm)], None
    after = parse_mm_cursor(cursor)
    size = check_limit(limit, MMS_PAGE)
    ids = sorted(i for i in model.mms if i > after) if after else sorted(model.mms)
    page = [model.describe_mm(i) for i in ids[:size]]
    return page, (mm_cursor(ids[size - 1]) if len(ids) > size else None)


@handler("spawn")
def spawn(core: Any) -> Task[dict[str, Any]]:
    return {"mm": core.model.spawn()}
    yield  # pragma: no cover - a task, for a uniform calling convention


@handler("fork")
def fork(core: Any, mm: int) -> Task[dict[str, Any]]:
    child = yield Locked(core.model.fork(mm))
    core.publish("fork", mm=mm, child=child)
    return {"mm": child}


@handler("exit")
def exit_mm(core: Any, mm: int) -> Task[dict[str, Any]]:
    yield Locked(core.model.exit_mm(mm))  # its pins go with it
    core.segments.forget_mm(mm)
    core.grants.forget_mm(mm)
    core.publish("exit", mm=mm)
    return {}


@handler("mmap")
def mmap(core: Any, mm: int, pages: int, prot: str, mergeable: bool, shared: bool, fill: int | None) -> Task[dict[str, Any]]:
    # one operation: a fill that fails undoes the mapping and every frame it took
    addr = yield Locked(core.model.mmap(mm, pages, prot, shared=shared, mergeable=mergeable, fill=fill))
    core.publish("mmap", mm=mm, addr=addr, pages=pages, prot=prot)
    return {"addr": addr}


@handler("write")
def write(core: Any, mm: int, addr: int, data: bytes) -> Task[dict[str, Any]]:
    yield Locked(core.model.write(mm, addr, data))
    return {"written": len(data)}


@handler("read")
def read(core: Any, mm: int, addr: int, length: int) -> Task[dict[str, Any]]:
    data = yield Locked(core.model.read(mm, addr, length))
    return {"data": bytes(data)}


@handler("munmap")
def munmap(core: Any, mm: int, addr: int, length: int) -> Task[dict[str, Any]]:
    _pages(core, addr, length)
    yield Locked(core.model.munmap(mm, addr, length))
    core.publish("munmap", mm=mm, addr=addr, length=length)
    return {}


@handler("mprotect")
def mprotect(core: Any, mm: int, addr: int, length: int, prot: str) -> Task[dict[str, Any]]:
    _pages(core, addr, length)
    yield Locked(core.model.mprotect(mm, addr, length, prot))
    core.publish("mprotect", mm=mm, addr=addr, length=length, prot=prot)
    return {}


@handler("madvise")
def madvise(core: Any, mm: int, addr: int, length: int, advice: str, block: bool = True) -> Task[dict[str, Any]]:
    _pages(core, addr, length)
    # block=False: the OOM reaper's non-blockable zap; EAGAIN if a sleepable
    # node cannot take it now (nothing changed: the caller retries later).
    yield Locked(core.model.madvise(mm, addr, length, advice, blockable=block))
    core.publish("madvise", mm=mm, addr=addr, length=length, advice=advice)
    if advice == "mergeable":
        core.wake_ksm()
    return {}


@handler("swap")
def swap(core: Any, mm: int, addr: int, length: int) -> Task[dict[str, Any]]:
    _pages(core, addr, length)
    swapped = yield Locked(core.model.reclaim(mm, addr, length))
    core.publish("swap", mm=mm, addr=addr, length=length, swapped=swapped)
    return {"swapped": swapped}


@handler("migrate")
def migrate(core: Any, mm: int, addr: int, length: int) -> Task[dict[str, Any]]:
    _pages(core, addr, length)
    migrated = yield Locked(core.model.migrate(mm, addr, length))
    core.publish("migrate", mm=mm, addr=addr, length=length, migrated=migrated)
    return {"migrated": migrated}


@handler("idle")
def idle(core: Any, mm: int, addr: int, length: int, op: str) -> Task[dict[str, Any]]:
    """Idle page tracking (``/sys/kernel/mm/page_idle/bitmap``) over an mm's
    range: ``mark`` sets the present pages idle, ``read`` reports which still
    are (``Model.page_idle``).  Result: ``pages`` = [[addr, pfn, idle]] of
    the tracked pages, ``idle`` and ``accessed`` their counts."""
    _pages(core, addr, length)
    pages = yield Locked(core.model.page_idle(mm, addr, length, op == "mark"))
    idle_pages = sum(1 for _, _, is_idle in pages if is_idle)
    core.publish("idle", mm=mm, addr=addr, length=length, op=op, idle=idle_pages)
    return {"pages": [list(p) for p in pages], "idle": idle_pages, "accessed": len(pages) - idle_pages}


@handler("merge")
def merge(core: Any, full_scans: int) -> Task[dict[str, Any]]:
    ksm = core.model.ksm
    for _ in range(full_scans):
        yield Locked(ksm.full_scan())
    stats = ksm.stats()
    core.publish("merge", **{k: v for k, v in stats.items() if isinstance(v, int)})
    return stats


@handler("ksm")
def ksm_knobs(core: Any, **knobs: Any) -> Task[dict[str, Any]]:
    ksm = core.model.ksm
    changes = {k: int(v) for k, v in knobs.items() if v is not None}
    for key, value in changes.items():
        ksm.check_set_knob(key, value)  # all of them before anything changes
    for key, value in changes.items():
        ksm.set_knob(key, value)
    if changes.get("run") == 2:
        yield Locked(ksm.unmerge_all())
    core.wake_ksm()
    return ksm.stats()


def _relay(core: Any, node: str, command: str, args: dict[str, Any], *,
           fenced_too: bool = False) -> Task[dict[str, Any]]:
    result = yield Relay(node, command, args, fenced_too=fenced_too)
    if not result.ok:
        raise KernelError(result.errno or Errno.EINVAL.value, result.error)
    return result.result


def _point(core: Any, node: str, mm: int | None) -> None:
    """An operator directs ``node`` at ``mm``: that grants it (broker/grants.py)."""
    if mm is not None and node in core.sessions.by_name:
        core.grants.point(node, mm)


@handler("fault")
def fault(core: Any, node: str, mm: int, addr: int, pages: int, write: bool) -> Task[dict[str, Any]]:
    _point(core, node, mm)
    return (yield from _relay(core, node, "fault", {"mm": mm, "addr": addr, "pages": pages, "write": write}))


@handler("access")
def access(core: Any, node: str, mm: int, addr: int, length: int, data: bytes | None) -> Task[dict[str, Any]]:
    _point(core, node, mm)
    args: dict[str, Any] = {"mm": mm, "addr": addr, "length": length}
    if data is not None:
        args["data"] = data
    return (yield from _relay(core, node, "access", args))


@handler("hmm")
def hmm(core: Any, node: str, op: str, mm: int, addr: int, pages: int, to: str = "dev") -> Task[dict[str, Any]]:
    """lib/test_hmm.c's ioctls (``HMM_DMIRROR_SNAPSHOT``...) on an hmm node."""
    session = core.sessions.by_name.get(node)
    if session is not None and session.kind != "hmm":
        raise KernelError(Errno.EINVAL, f"{node} is a {session.kind} node, not hmm")
    _point(core, node, mm)
    return (yield from _relay(core, node, "hmm", {"op": op, "mm": mm, "addr": addr, "pages": pages, "to": to}))


@handler("xpmem")
def xpmem(core: Any, node: str, op: str, **args: Any) -> Task[dict[str, Any]]:
    session = core.sessions.by_name.get(node)
    if session is not None and session.kind != "xpmem":
        raise KernelError(Errno.EINVAL, f"{node} is a {session.kind} node, not xpmem")
    if op == "make":
        _point(core, node, args.get("mm"))
    return (yield from _relay(core, node, "xpmem", {"op": op, **{k: v for k, v in args.items() if v is not None}}))


def _injection(core: Any, node: str, command: str, args: dict[str, Any]) -> Task[dict[str, Any]]:
    """inject/heal: relayed to a hung or fenced node too; the host remembers
    what the node reports injected (for ``status``)."""
    result = yield from _relay(core, node, command, args, fenced_too=True)
    session = core.sessions.by_name.get(node)
    if session is not None:
        session.injected = dict(result.get("injected", {}))
    return {"node": node, **result}


@handler("inject")
def inject(core: Any, node: str, kind: str, rate: str, delay_ms: int, for_s: str) -> Task[dict[str, Any]]:
    return (yield from _injection(core, node, "inject", {"kind": kind, "rate": rate, "delay_ms": delay_ms, "for_s": for_s}))


@handler("heal")
def heal(core: Any, node: str) -> Task[dict[str, Any]]:
    return (yield from _injection(core, node, "heal", {}))


@handler("subscribe")
def subscribe(core: Any, node: str, mm: int) -> Task[dict[str, Any]]:
    _point(core, node, mm)
    return (yield from _relay(core, node, "subscribe", {"mm": mm}))


@handler("unsubscribe")
def unsubscribe(core: Any, node: str, mm: int) -> Task[dict[str, Any]]:
    return (yield from _relay(core, node, "unsubscribe", {"mm": mm}))


@handler("grant")
def grant(core: Any, node: str, mm: int, read_only: bool) -> Task[dict[str, Any]]:
    """Let ``node`` reach ``mm`` (read-only: no write faults, no DMA writes).

    Raises:
        KernelError: ESRCH (no such mm, or a node that never registered).
    """
    core.model.check_mm(mm)
    if node not in core.sessions.by_name:
        raise KernelError(Errno.ESRCH, f"no node {node!r}")
    core.grants.grant(node, mm, write=not read_only)
    return {"node": node, "mm": mm, "write": not read_only}
    yield  # pragma: no cover - a task, for a uniform calling convention


@handler("revoke")
def revoke(core: Any, node: str, mm: int) -> Task[dict[str, Any]]:
    """End ``node``'s grant of ``mm``: as ``->release`` does, the node drops
    everything of the mm (the host waits for its ack), its pins and permits
    there go; later subscribes, GUPs and accesses get EACCES.

    Raises:
        KernelError(ENOENT): the node holds no grant of ``mm``.
    """
    if not core.grants.revoke(node, mm):
        raise KernelError(Errno.ENOENT, f"{node} holds no grant of mm {mm}")
    core.segments.forget_node_mm(node, mm)
    try:
        if mm in core.model.mms:
            yield Locked(core.notifier.unregister(node, mm))
    finally:
        core.segments.retired(node, mm=mm)  # the node acked its ->release: accesses in flight are in
    dropped = core.model.drop_pins(node, mm)
    core.publish("revoked", node=node, mm=mm)
    return {"node": node, "mm": mm, "unpinned": dropped}
