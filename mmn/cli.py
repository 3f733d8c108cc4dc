"""``mmn``: the command line of mmnotify.

``main(argv=None) -> int`` parses one command and runs it.  Three kinds:

* services: ``mmn host``, ``mmn node`` (one process each, what containers run,
  see :mod:`mmn.services`) and ``mmn up`` (host plus default nodes on this
  machine, see :mod:`mmn.up`);
* control commands (``status``, ``mmap``, ``fault``, ``inject`` ...): one
  ``AdminRequest`` to the host's admin endpoint, one ``AdminReply`` back;
* ``watch``: the host's event stream.

Every control command prints a table for people or, with ``--json``, exactly
one JSON document on stdout (bytes as hex strings).  ``watch --json`` prints
one JSON document per event, one a line.  Errors are one line on stderr.

Exit status:

====  ===============================================================
0     ok
1     the operation failed: the host (or node) answered with an errno
      or refused the request
2     usage error: bad syntax or a bad value; nothing was sent
3     cannot reach the host: no answer within ``--timeout`` seconds, or
      at once when the link says why (nothing listens, the key was
      refused or is missing, CURVE against plain TCP, not an admin
      port); the line says which and the fix, ``--json`` a ``reason``
130   interrupted (Ctrl-C) before anything was sent
====  ===============================================================

The client side (endpoints, keys, the admin call and why a host cannot be
reached, the event stream) is :mod:`mmn.client`; this module parses,
dispatches and prints.

Every argument is checked twice before anything is sent: by argparse (types,
ranges) and by ``protocol.admin.check_admin``, the host's own check.
"""

from __future__ import annotations

import signal as _signal


def _interrupted_while_importing(signum: int, frame: object) -> None:
    raise SystemExit(130)  # quietly: Ctrl-C while the imports below run (slow on a busy machine)


try:  # only where Python's own handler is in place (not SIG_IGN, not an embedding program's)
    _QUIET_IMPORT = _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler
    if _QUIET_IMPORT:
        _signal.signal(_signal.SIGINT, _interrupted_while_importing)
except ValueError:  # imported off the main thread
    _QUIET_IMPORT = False

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import trio

from protocol.admin import ADVICE, COMMANDS, HMM_OPS, HMM_TARGETS, IDLE_OPS, INJECT_KINDS, PROTS, XPMEM_OPS, check_admin
from protocol.errors import ProtocolError
from protocol.messages import Event

from . import render, services
from .args import address, endpoint, hexbytes, node_name, number, octal_mode, probability, seconds
from .client import (
    DEFAULT_ADMIN,
    DEFAULT_TIMEOUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    REFUSED_GRACE,
    EventStream,
    Failed,
    Unreachable,
    UsageError,
    admin_call,
    client_security,
    env_endpoint,
    host_events_endpoint,
    subscribe_events,
)
from .render import PROG

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------
# errors


class _Exit(Exception):
    """argparse wants to stop (``--help``, or a usage error already printed)."""

    def __init__(self, code: int) -> None:
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line on stderr and never ``sys.exit``."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: usage: {self.prog}: {message} (see {self.prog} --help)\n")
        raise _Exit(EXIT_USAGE)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


# --------------------------------------------------------------------------
# control commands: each builds (command, args) and renders the result


Builder = Callable[[argparse.Namespace], tuple[str, dict[str, Any]]]
Renderer = Callable[[argparse.Namespace, dict[str, Any]], str]


def _b(command: str, **fields: str) -> Builder:
    """A builder sending ``command`` with ``arg=namespace attribute`` pairs;
    attributes that are None are left out (the host's default applies)."""

    def build(ns: argparse.Namespace) -> tuple[str, dict[str, Any]]:
        args = {arg: getattr(ns, attr) for arg, attr in fields.items()}
        return command, {k: v for k, v in args.items() if v is not None}

    return build


def _r_idle(ns: argparse.Namespace, result: dict[str, Any]) -> str:
    rows = [(f"{addr:#x}", str(pfn), "idle" if idle else "accessed") for addr, pfn, idle in result.get("pages") or []]
    table = render.table(("ADDR", "PFN", "STATE"), rows) if rows else "(no present pages)"
    return f"{table}\nidle {result.get('idle', 0)}  accessed {result.get('accessed', 0)}"


def _r_kv(ns: argparse.Namespace, result: dict[str, Any]) -> str:
    return render.keyvalues(result)


def _r_addr(ns: argparse.Namespace, result: dict[str, Any]) -> str:
    pairs = {k: (f"{v:#x}" if k in ("addr", "vaddr") and isinstance(v, int) else v) for k, v in result.items()}
    return render.keyvalues(pairs)


def _r_status(ns: argparse.Namespace, result: dict[str, Any]) -> str:
    return render.status(result)


def _r_data(ns: argparse.Namespace, result: dict[str, Any]) -> str:
    if "data" in result and isinstance(result["data"], (bytes, bytearray)):
        return render.hexdump(bytes(result["data"]), getattr(ns, "addr", 0) or 0)
    return _r_addr(ns, result)


def _r_pages(ns: argparse.Namespace, result: dict[str, Any]) -> str:
    pages = result.get("pages")
    if not isinstance(pages, list):
        return render.keyvalues(result)
    rows = []
    for page in pages:
        if isinstance(page, (list, tuple)) and len(page) >= 3:
            a, pfn, writable = page[:3]
            rows.append((f"{a:#x}" if isinstance(a, int) else a, pfn, bool(writable)))
    rest = {k: v for k, v in result.items() if k != "pages"}
    text = render.table(("addr", "pfn", "writable"), rows)
    return text + ("\n" + _r_addr(ns, rest) if rest else "")


def _r_hmm(ns: argparse.Namespace, result: dict[str, Any]) -> str:
    pages = result.get("pages")
    if not isinstance(pages, list):
        return render.keyvalues(result)
    rows = [(f"{p.get('addr', 0):#x}", p.get("pfn"), p.get("state")) for p in pages if isinstance(p, dict)]
    return render.table(("addr", "pfn", "state"), rows)


def _r_ksm(ns: argparse.Namespace, result: dict[str, Any]) -> str:
    return render.keyvalues(render.ksm_pairs(result))


def _r_inject(ns: argparse.Namespace, result: dict[str, Any]) -> str:
    return render.keyvalues([("node", result.get("node")), ("injected", render.injected(result.get("injected")))])


def _build_write(ns: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    return "write", {"mm": ns.mm, "addr": ns.addr, "data": ns.data}


def _build_access(ns: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    args: dict[str, Any] = {"node": ns.node, "mm": ns.mm, "addr": ns.addr}
    if ns.write is not None:
        if ns.len is not None and ns.len != len(ns.write):
            raise UsageError(f"access: --len {ns.len} does not match the {len(ns.write)} bytes of --write")
        args["data"] = ns.write
        args["length"] = len(ns.write)
    elif ns.len is not None:
        args["length"] = ns.len
    return "access", args


def _build_inject(ns: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    args: dict[str, Any] = {"node": ns.node, "kind": ns.kind}
    if ns.rate is not None:
        args["rate"] = repr(ns.rate)
    if ns.delay_ms is not None:
        args["delay_ms"] = ns.delay_ms
    if ns.for_s is not None:
        args["for_s"] = repr(ns.for_s)
    return "inject", args


def _build_ksm(ns: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    args = {
        "run": ns.run,
        "pages_to_scan": ns.pages_to_scan,
        "sleep_millisecs": ns.sleep_millisecs,
        "max_page_sharing": ns.max_page_sharing,
        "use_zero_pages": None if ns.use_zero_pages is None else bool(ns.use_zero_pages),
    }
    return "ksm", {k: v for k, v in args.items() if v is not None}


def _build_xpmem(ns: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    args: dict[str, Any] = {"node": ns.node, "op": ns.op}
    for name in ("mm", "addr", "length", "mode", "segid", "apid", "offset"):
        value = getattr(ns, name, None)
        if value is not None:
            args[name] = value
    if getattr(ns, "write", False):
        args["write"] = True
    return "xpmem", args


# --------------------------------------------------------------------------
# the parser


_HOST_HELP = f"admin endpoint, tcp://HOST:PORT or HOST:PORT (default $MMN_HOST, else {DEFAULT_ADMIN})"
_TIMEOUT_HELP = f"give up after S seconds (default $MMN_TIMEOUT, else {DEFAULT_TIMEOUT:g})"
_KEYS_HELP = ("CURVE keys from `mmn keygen` (default $MMN_KEYS_DIR, else the note of a local `mmn up` "
              "serving --host; none: plain TCP)")


def _hmm_range(q: argparse.ArgumentParser) -> None:
    """The arguments every ``mmn hmm OP`` takes: NODE, --mm, ADDR, --pages."""
    _common(q)
    q.add_argument("node", type=node_name, metavar="NODE")
    q.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    q.add_argument("addr", type=address, metavar="ADDR")
    q.add_argument("--pages", type=number(1, 512, "pages"), default=None, metavar="N",
                   help="pages from ADDR, 1..512 (default 1)")


def _common(sub: argparse.ArgumentParser, *, host: bool = True) -> None:
    """``--json``, ``--host``, ``--timeout`` on a subcommand too, so both
    ``mmn --json status`` and ``mmn status --json`` work."""
    sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    if host:
        sub.add_argument(
            "--host", type=endpoint, default=argparse.SUPPRESS, metavar="ADDR", help=_HOST_HELP
        )
        sub.add_argument(
            "--timeout", type=seconds, default=argparse.SUPPRESS, metavar="S", help=_TIMEOUT_HELP
        )
        sub.add_argument(
            "--keys", default=argparse.SUPPRESS, metavar="DIR", help=_KEYS_HELP
        )


def _control(
    subs: argparse._SubParsersAction, name: str, build: Builder, show: Renderer, help: str
) -> argparse.ArgumentParser:
    p = subs.add_parser(name, help=help, description=help)
    _common(p)
    p.set_defaults(handler=_run_control, build=build, show=show)
    return p


def _range_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    p.add_argument("addr", type=address, metavar="ADDR")
    p.add_argument("length", type=number(1, what="length"), metavar="LEN")


def build_parser() -> argparse.ArgumentParser:
    """The whole ``mmn`` command line (also used by the docs and the tests)."""
    parser = _Parser(prog=PROG, description="A distributed model of Linux MMU notifiers.",
                     epilog="example:\n  mmn up   # then, in another terminal: mmn status; mmn COMMAND --help",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    parser.add_argument("--json", action="store_true", default=False, help="print one JSON document")
    parser.add_argument("--host", type=endpoint, default=None, metavar="ADDR", help=_HOST_HELP)
    parser.add_argument("--timeout", type=seconds, default=None, metavar="S", help=_TIMEOUT_HELP)
    parser.add_argument("--keys", default=None, metavar="DIR", help=_KEYS_HELP)
    subs = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    # ---- services
    from . import up as up_module

    p = subs.add_parser("host", help="run the host (primary MMU, notifier fan-out, admin API)")
    services.add_host_arguments(p)
    p.set_defaults(handler=services.run_host)

    p = subs.add_parser("node", help="run one secondary-MMU node")
    services.add_node_arguments(p)
    p.set_defaults(handler=services.run_node)

    p = subs.add_parser("up", help="host plus default nodes on this machine, with a live status view")
    up_module.add_arguments(p)
    services.add_host_arguments(p, service=False)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="for scripts: one JSON ready line (endpoints, keys dir, pids, nodes) once every node is "
                        "live, no live view; with --once the status as one JSON document")
    p.set_defaults(handler=up_module.run)

    p = subs.add_parser("down", help="stop a `mmn up` of yours on this machine (e.g. one started with --detach)")
    _common(p)
    p.add_argument("--wait", type=seconds, default=10.0, metavar="S",
                   help="seconds to wait for it to stop everything (default 10)")
    p.set_defaults(handler=up_module.run_down)

    from . import soak as soak_module

    p = subs.add_parser("soak", help="a seeded workload with injected failures, checked against a shadow model")
    soak_module.add_arguments(p)
    p.set_defaults(handler=soak_module.run)

    from . import bench as bench_module

    p = subs.add_parser("bench", help="measure the cluster, each figure against a raw pyzmq floor of the same run")
    bench_module.add_arguments(p)
    p.set_defaults(handler=bench_module.run_command)

    # ---- control
    p = _control(subs, "status", _b("status", mm="mm", node="node", cursor="cursor", limit="limit"), _r_status,
                 "nodes, mms, frames, stale accesses, KSM")
    p.add_argument("--mm", type=number(1, what="mm"), default=None, metavar="ID",
                   help="only this mm: its vmas and every node's translations of it (default: all, paged)")
    p.add_argument("--node", default=None, metavar="NAME",
                   help="only this node, its translations a page at a time (default: every node's summary)")
    p.add_argument("--cursor", default=None, metavar="C",
                   help="continue where a previous reply's mms_next left off (default: the first page)")
    p.add_argument("--limit", type=number(1, 8192, "limit"), default=None, metavar="N",
                   help="entries in one page, 1..8192 (default 256 mms; 4096 translations with --node)")
    _control(subs, "spawn", _b("spawn"), _r_kv, "create an address space")
    p = _control(subs, "fork", _b("fork", mm="mm"), _r_kv, "fork an mm (COW)")
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    p = _control(subs, "exit", _b("exit", mm="mm"), _r_kv, "tear an mm down (release)")
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")

    p = _control(
        subs,
        "mmap",
        _b("mmap", mm="mm", pages="pages", prot="prot", mergeable="mergeable", shared="shared", fill="fill"),
        _r_addr,
        "map anonymous memory",
    )
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    p.add_argument("--pages", type=number(1, what="pages"), required=True, metavar="N")
    p.add_argument("--prot", choices=PROTS, default=None, help="protection (default rw)")
    p.add_argument("--mergeable", action="store_true", default=None, help="MADV_MERGEABLE (KSM)")
    p.add_argument("--shared", action="store_true", default=None, help="MAP_SHARED")
    p.add_argument("--fill", type=number(0, 255, "byte"), default=None, metavar="BYTE", help="write every byte with BYTE, 0..255 (default: zero pages)")

    p = _control(subs, "write", _build_write, _r_kv, "host CPU write")
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    p.add_argument("addr", type=address, metavar="ADDR")
    p.add_argument("data", type=hexbytes, metavar="HEX")

    p = _control(subs, "read", _b("read", mm="mm", addr="addr", length="length"), _r_data, "host CPU read")
    _range_args(p)
    p = _control(subs, "munmap", _b("munmap", mm="mm", addr="addr", length="length"), _r_kv, "unmap a range")
    _range_args(p)
    p = _control(
        subs, "mprotect", _b("mprotect", mm="mm", addr="addr", length="length", prot="prot"), _r_kv, "change protection"
    )
    _range_args(p)
    p.add_argument("prot", choices=PROTS, metavar="PROT", help="|".join(PROTS))
    p = _control(
        subs, "madvise", _b("madvise", mm="mm", addr="addr", length="length", advice="advice", block="block"), _r_kv,
        "madvise a range"
    )
    _range_args(p)
    p.add_argument("advice", choices=ADVICE, metavar="ADVICE", help="|".join(ADVICE))
    p.add_argument("--no-block", dest="block", action="store_false", default=None,
                   help="non-blockable, as the OOM reaper: EAGAIN if a sleepable node holds the range")
    p = _control(subs, "swap", _b("swap", mm="mm", addr="addr", length="length"), _r_kv, "reclaim a range to swap")
    _range_args(p)
    p = _control(subs, "migrate", _b("migrate", mm="mm", addr="addr", length="length"), _r_kv, "migrate a range")
    _range_args(p)
    p = _control(subs, "idle", _b("idle", op="op", mm="mm", addr="addr", length="length"), _r_idle,
                 "idle page tracking (/sys/kernel/mm/page_idle): mark a range idle, or read which pages still are")
    p.add_argument("op", choices=IDLE_OPS, help="mark: set the present pages idle; read: report them")
    _range_args(p)

    p = _control(
        subs,
        "fault",
        _b("fault", node="node", mm="mm", addr="addr", pages="pages", write="write"),
        _r_pages,
        "secondary page faults on a node",
    )
    p.add_argument("node", type=node_name, metavar="NODE")
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    p.add_argument("addr", type=address, metavar="ADDR")
    p.add_argument("--pages", type=number(1, 512, "pages"), default=None, metavar="N",
                   help="pages to fault from ADDR, 1..512 (default 1)")
    p.add_argument("--write", action="store_true", default=None)

    p = _control(subs, "access", _build_access, _r_data, "read or write through a node's translation")
    p.add_argument("node", type=node_name, metavar="NODE")
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    p.add_argument("addr", type=address, metavar="ADDR")
    p.add_argument("--len", type=number(1, 1 << 20, "length"), default=None, metavar="L",
                   help="bytes to read, 1..1048576 (default 1)")
    p.add_argument("--write", type=hexbytes, default=None, metavar="HEX", help="write these bytes instead of reading (default: read --len bytes)")

    p = _control(subs, "merge", _b("merge", full_scans="full_scans"), _r_ksm, "run KSM scans now")
    p.add_argument("--full-scans", type=number(0, 1000), default=None, metavar="N",
                   help="full passes over mergeable pages, 0..1000 (default 1)")

    p = _control(subs, "ksm", _build_ksm, _r_ksm, "show or set the KSM knobs")
    p.add_argument("--run", type=number(0, 2), default=None, metavar="0|1|2", help="0 stop, 1 run, 2 unmerge all (default: unchanged)")
    p.add_argument("--pages-to-scan", type=number(1), default=None, metavar="N",
                   help="pages a KSM scan batch looks at (default: unchanged; the host starts at 100)")
    p.add_argument("--sleep-millisecs", type=number(0), default=None, metavar="MS",
                   help="ms between KSM batches (default: unchanged; the host starts at 20)")
    p.add_argument("--max-page-sharing", type=number(2), default=None, metavar="N",
                   help="most pages sharing one KSM page, at least 2 (default: unchanged)")
    p.add_argument("--use-zero-pages", type=number(0, 1), default=None, metavar="0|1",
                   help="merge empty pages with the zero page (default: unchanged)")

    p = _control(subs, "inject", _build_inject, _r_inject, "inject a failure into a node")
    p.add_argument("node", type=node_name, metavar="NODE")
    p.add_argument("kind", choices=INJECT_KINDS, metavar="KIND", help="|".join(INJECT_KINDS))
    p.add_argument("--rate", type=probability, default=None, metavar="P", help="probability 0..1 of each message (default 1)")
    p.add_argument("--delay-ms", type=number(0, 600_000), default=None, metavar="D",
                   help="delay-acks, slow-drain: ms, 0..600000 (default 0)")
    p.add_argument("--for", dest="for_s", type=seconds, default=None, metavar="SECONDS", help="heal after this many seconds (default: until `mmn heal`)")
    p = _control(subs, "heal", _b("heal", node="node"), _r_inject, "undo every injected failure of a node")
    p.add_argument("node", type=node_name, metavar="NODE")

    p = _control(subs, "subscribe", _b("subscribe", node="node", mm="mm"), _r_kv, "subscribe a node to an mm")
    p.add_argument("node", type=node_name, metavar="NODE")
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    p = _control(subs, "unsubscribe", _b("unsubscribe", node="node", mm="mm"), _r_kv, "unsubscribe a node")
    p.add_argument("node", type=node_name, metavar="NODE")
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    p = _control(subs, "grant", _b("grant", node="node", mm="mm", read_only="read_only"), _r_kv,
                 "let a node reach an mm (fault, access, subscribe); any command that directs it there grants too")
    p.add_argument("node", type=node_name, metavar="NODE")
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    p.add_argument("--read-only", action="store_true", default=None,
                   help="no write faults and no writes through it (default: read-write)")
    p = _control(subs, "revoke", _b("revoke", node="node", mm="mm"), _r_kv,
                 "end a node's grant of an mm: it drops everything of the mm, its pins there go")
    p.add_argument("node", type=node_name, metavar="NODE")
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")

    # ---- xpmem, on behalf of an xpmem node
    p = subs.add_parser("xpmem", help="XPMEM operations issued on behalf of an xpmem node")
    ops = p.add_subparsers(dest="op", metavar="OP", required=True)

    def xp(op: str, help: str) -> argparse.ArgumentParser:
        q = ops.add_parser(op, help=help, description=help)
        _common(q)
        q.add_argument("node", type=node_name, metavar="NODE")
        q.set_defaults(handler=_run_control, build=_build_xpmem, show=_r_addr)
        return q

    q = xp("make", "export [ADDR, ADDR+LEN) of an mm -> segid")
    q.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    q.add_argument("addr", type=address, metavar="ADDR")
    q.add_argument("length", type=number(1, what="length"), metavar="LEN")
    q.add_argument("--mode", type=octal_mode, default=None, help="octal permission bits (default 0600)")
    q = xp("get", "ask for access to a segment -> apid")
    q.add_argument("--segid", type=number(1, what="segid"), required=True, metavar="ID")
    q.add_argument("--write", action="store_true", default=False, help="read-write (default read-only)")
    q = xp("attach", "map part of a segment into the node -> vaddr")
    q.add_argument("--apid", type=number(1, what="apid"), required=True, metavar="ID")
    q.add_argument("--offset", type=number(0, what="offset"), default=None, metavar="OFF",
                   help="bytes into the segment (default 0)")
    q.add_argument("--len", dest="length", type=number(1, what="length"), required=True, metavar="LEN")
    q = xp("detach", "unmap an attachment")
    q.add_argument("addr", type=address, metavar="VADDR")
    q = xp("release", "give an apid back")
    q.add_argument("--apid", type=number(1, what="apid"), required=True, metavar="ID")
    q = xp("remove", "withdraw an exported segment")
    q.add_argument("--segid", type=number(1, what="segid"), required=True, metavar="ID")
    assert set(ops.choices) == set(XPMEM_OPS)

    # ---- hmm: lib/test_hmm.c's ioctls, on behalf of an hmm node
    p = subs.add_parser("hmm", help="HMM device-mirror operations of an hmm node (lib/test_hmm.c)")
    ops = p.add_subparsers(dest="op", metavar="OP", required=True)
    q = ops.add_parser("snapshot", help="the primary's state of each page, without faulting",
                       description="the primary's state of each page, without faulting "
                                   "(none, error, read, write, zero, device-private, device-private-remote)")
    _hmm_range(q)
    q.set_defaults(handler=_run_control, build=_b("hmm", node="node", op="op", mm="mm", addr="addr", pages="pages"),
                   show=_r_hmm)
    q = ops.add_parser("migrate", help="move pages into the node's device memory, or back (--to sys)",
                       description="migrate anonymous pages to the node's device-private memory "
                                   "(MMU_NOTIFY_MIGRATE; the host keeps device-private entries), or back")
    _hmm_range(q)
    q.add_argument("--to", choices=HMM_TARGETS, default=None, help="dev (default): into the device; sys: back")
    q.set_defaults(handler=_run_control, show=_r_kv,
                   build=_b("hmm", node="node", op="op", mm="mm", addr="addr", pages="pages", to="to"))
    q = ops.add_parser("exclusive", help="make pages device-exclusive for the node (make_device_exclusive)",
                       description="make pages device-exclusive for the node (MMU_NOTIFY_EXCLUSIVE); a later "
                                   "CPU access restores them through an invalidation")
    _hmm_range(q)
    q.set_defaults(handler=_run_control, show=_r_pages,
                   build=_b("hmm", node="node", op="op", mm="mm", addr="addr", pages="pages"))
    assert set(ops.choices) == set(HMM_OPS)

    # ---- keys
    p = subs.add_parser("keygen", help="write CURVE key pairs: the host's, operators', nodes'")
    p.add_argument("dir", metavar="DIR", help="DIR/host, DIR/admin, DIR/nodes (secrets mode 0600)")
    p.add_argument("--node", action="append", default=None, metavar="NAME",
                   help="a node key (repeatable; default kvm, gru, xpmem: one per kind, covering KIND-*)")
    p.add_argument("--admin", action="append", default=None, metavar="NAME", help="an operator key, repeatable (default admin)")
    p.add_argument("--force", action="store_true", help="replace existing pairs")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    p.set_defaults(handler=_run_keygen)

    # ---- Docker Swarm: the keys as secrets (all of it in mmn/swarm.py)
    from . import swarm as swarm_module

    swarm_module.add_parser(subs)

    # ---- event stream
    p = subs.add_parser("watch", help="print the host's events until Ctrl-C")
    _common(p)
    p.add_argument("--count", type=number(1), default=None, metavar="N", help="stop after N events (default: no limit)")
    p.add_argument("--seconds", type=seconds, default=None, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--events", type=endpoint, default=None, metavar="ADDR",
                   help="event endpoint, e.g. a published port (default $MMN_EVENTS, else the one the host's status "
                        "names, a wildcard bind replaced by --host's address)")
    p.set_defaults(handler=_run_watch)
    _finish_help(parser)
    return parser


#: One example per command, shown at the end of ``mmn COMMAND --help``.
EXAMPLES: dict[str, str] = {
    "host": "mmn host --keys keys --frames 4096 --ack-deadline-ms 500",
    "node": "mmn node --kind kvm --name kvm0 --host tcp://127.0.0.1:7781 --keys keys",
    "up": "mmn up --kvm 2 --port-base 0            # or, for scripts: mmn up --detach --json --port-base 0",
    "down": "mmn down --host tcp://127.0.0.1:7782",
    "soak": "mmn soak --seed 1 --ops 5000 --nodes 6 --faults 0.05",
    "bench": "mmn bench --quick --check",
    "status": "mmn status --json",
    "spawn": "mmn spawn",
    "fork": "mmn fork --mm 1",
    "exit": "mmn exit --mm 2",
    "mmap": "mmn mmap --mm 1 --pages 6 --fill 0x41 --mergeable",
    "write": "mmn write --mm 1 0x10000000 6b766d21",
    "read": "mmn read --mm 1 0x10000000 16",
    "munmap": "mmn munmap --mm 1 0x10005000 4096",
    "mprotect": "mmn mprotect --mm 1 0x10000000 8192 r",
    "madvise": "mmn madvise --mm 1 0x10000000 4096 dontneed --no-block",
    "swap": "mmn swap --mm 1 0x10000000 8192",
    "migrate": "mmn migrate --mm 1 0x10000000 4096",
    "idle": "mmn idle mark --mm 1 0x10000000 65536",
    "fault": "mmn fault kvm0 --mm 1 0x10000000 --pages 6 --write",
    "access": "mmn access gru0 --mm 1 0x10001000 --write 67727521",
    "merge": "mmn merge --full-scans 2",
    "ksm": "mmn ksm --run 1 --pages-to-scan 200",
    "inject": "mmn inject xpmem0 slow-drain --delay-ms 3000 --for 10",
    "heal": "mmn heal xpmem0",
    "subscribe": "mmn subscribe kvm0 --mm 1",
    "unsubscribe": "mmn unsubscribe kvm0 --mm 1",
    "grant": "mmn grant kvm0 --mm 1 --read-only",
    "revoke": "mmn revoke kvm0 --mm 1",
    "xpmem": "mmn xpmem make xpmem0 --mm 1 0x10000000 24576 --mode 0666",
    "xpmem make": "mmn xpmem make xpmem0 --mm 1 0x10000000 24576 --mode 0666",
    "xpmem get": "mmn xpmem get xpmem0 --segid 1 --write",
    "xpmem attach": "mmn xpmem attach xpmem0 --apid 1 --len 24576",
    "xpmem detach": "mmn xpmem detach xpmem0 0x600000000000",
    "xpmem release": "mmn xpmem release xpmem0 --apid 1",
    "xpmem remove": "mmn xpmem remove xpmem0 --segid 1",
    "hmm": "mmn hmm snapshot hmm0 --mm 1 0x10000000 --pages 4",
    "hmm snapshot": "mmn hmm snapshot hmm0 --mm 1 0x10000000 --pages 4 --json",
    "hmm migrate": "mmn hmm migrate hmm0 --mm 1 0x10000000 --pages 4   # --to sys: back",
    "hmm exclusive": "mmn hmm exclusive hmm0 --mm 1 0x10000000 --pages 2",
    "keygen": "mmn keygen keys --node kvm0 --admin alice",
    "swarm-secrets": "mmn swarm-secrets --prefix mmn   # then: docker stack deploy -c docker-stack.yml mmn",
    "watch": "mmn watch --count 20 --json           # a published port: MMN_EVENTS=127.0.0.1:7783 mmn watch",
}


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command parser under ``parser``, named as typed (``xpmem get``)."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix}{name}"
                out.append((full, sub))
                out += _subparsers(sub, full + " ")
    return out


def _finish_help(parser: argparse.ArgumentParser) -> None:
    """Every option's help ends with its default (added from argparse's
    default where the text gives none); every command gets its example."""
    for name, sub in [("", parser), *_subparsers(parser)]:
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0 or action.help in (None, argparse.SUPPRESS):
                continue
            if "default" not in action.help and not action.required and action.default not in (None, argparse.SUPPRESS):
                action.help += f" (default {action.default})"
        if name:
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
            sub.epilog = f"example:\n  {EXAMPLES[name]}"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmnotify")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


# --------------------------------------------------------------------------
# handlers


def _security(ns: argparse.Namespace) -> Any:
    return client_security(getattr(ns, "keys", None), endpoint=_admin_endpoint(ns))


def _admin_endpoint(ns: argparse.Namespace) -> str:
    return ns.host or env_endpoint("MMN_HOST", DEFAULT_ADMIN)


def _timeout(ns: argparse.Namespace) -> float:
    if ns.timeout is not None:
        return ns.timeout
    value = os.environ.get("MMN_TIMEOUT")
    if not value:
        return DEFAULT_TIMEOUT
    try:
        return seconds(value)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"$MMN_TIMEOUT: {exc}") from None


def build_request(ns: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The admin request for a parsed control command, checked as the host
    checks it.

    Raises:
        UsageError: the request would be refused (nothing is sent).
    """
    command, args = ns.build(ns)
    assert command in COMMANDS, command
    try:
        check_admin(command, args)
    except ProtocolError as exc:
        raise UsageError(exc.message) from None
    return command, args


def _run_control(ns: argparse.Namespace) -> int:
    command, args = build_request(ns)
    addr = _admin_endpoint(ns)
    security = _security(ns)
    result = trio.run(lambda: admin_call(addr, command, args, timeout=_timeout(ns), security=security,
                                         refused_grace=REFUSED_GRACE))
    if ns.json:
        render.emit_json(result)
    else:
        render.emit(ns.show(ns, result))
    return EXIT_OK


def _show_event(event: Event) -> str:
    parts = []
    for key, value in event.fields.items():
        if isinstance(value, int) and not isinstance(value, bool) and key in ("addr", "start", "end", "vaddr"):
            parts.append(f"{key}={value:#x}")
        else:
            parts.append(f"{key}={render.cell(value)}")
    return f"{event.seq:>8}  {event.kind:<24} {' '.join(parts)}".rstrip()


def _events_from(ns: argparse.Namespace) -> str | None:
    """``--events``, else ``$MMN_EVENTS``, else None (ask the host)."""
    return ns.events or (env_endpoint("MMN_EVENTS", "") or None)


async def _watch(ns: argparse.Namespace) -> None:
    """Print events until ``--count``/``--seconds`` or Ctrl-C.

    Raises:
        Unreachable: the event endpoint never completed the handshake within
            ``--timeout`` (nothing listens, a refused key...), or it went away
            while watching (the host stopped).
    """
    addr = _admin_endpoint(ns)
    events = _events_from(ns)
    if events is None:
        events = await host_events_endpoint(addr, timeout=_timeout(ns), security=_security(ns),
                                            refused_grace=REFUSED_GRACE)
        security = _security(ns)
    else:
        security = client_security(getattr(ns, "keys", None), endpoint=events)
    async with subscribe_events(events, security=security, timeout=_timeout(ns),
                                refused_grace=REFUSED_GRACE) as stream:
        if not ns.json:
            sys.stderr.write(f"{PROG}: watching {events} (Ctrl-C to stop)\n")
            sys.stderr.flush()
        gone: list[Unreachable] = []
        async with trio.open_nursery() as nursery:

            async def watch_link() -> None:
                gone.append(await stream.gone())  # the host went away for good
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_link)
            await _print_events(ns, stream)
            nursery.cancel_scope.cancel()
        if gone:
            raise gone[0]


async def _print_events(ns: argparse.Namespace, stream: EventStream) -> None:
    seen = 0
    with trio.move_on_after(ns.seconds if ns.seconds is not None else math.inf):
        while ns.count is None or seen < ns.count:
            event = await stream.receive()
            seen += 1
            if ns.json:
                render.emit_json({"seq": event.seq, "kind": event.kind, "fields": event.fields})
            else:
                render.emit(_show_event(event))


def _run_keygen(ns: argparse.Namespace) -> int:
    from transport.curve import ADMIN_KEY_NAME, DEFAULT_NODE_KEYS, KeyError_, keygen

    try:
        result = keygen(ns.dir, ns.node or DEFAULT_NODE_KEYS, ns.admin or (ADMIN_KEY_NAME,), overwrite=ns.force)
    except (KeyError_, OSError) as exc:
        raise UsageError(f"keygen: {exc}") from None
    if getattr(ns, "json", False):
        render.emit_json(result)
    else:
        for path in result["created"]:
            render.emit(f"created {path}")
        for path in result["kept"]:
            render.emit(f"kept    {path}")
    return EXIT_OK


def _run_watch(ns: argparse.Namespace) -> int:
    try:
        trio.run(_watch, ns)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:  # Ctrl-C inside the nursery
        if group.split(KeyboardInterrupt)[0] is None:
            raise
    return EXIT_OK


# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``mmn`` command; returns the exit status (see the module doc).
    Ctrl-C at any point is exit 130 (``mmn up``, ``mmn watch``: 0), never a
    traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(list(argv) if argv is not None else None)
    except _Exit as exc:
        return exc.code
    ns.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return ns.handler(ns)
    except UsageError as exc:
        render.error(f"usage: {exc}")
        return EXIT_USAGE
    except Failed as exc:
        if getattr(ns, "json", False):
            render.emit_json({"ok": False, "errno": exc.errno, "error": exc.message})
        render.error(str(exc))
        return EXIT_FAILED
    except Unreachable as exc:
        if getattr(ns, "json", False):
            render.emit_json({"ok": False, "errno": "unreachable", "reason": exc.reason, "error": str(exc)})
        render.error(f"unreachable: {exc}")
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:  # trio wraps a Ctrl-C that lands inside a nursery
        if group.split(KeyboardInterrupt)[0] is None:
            raise
        return 130
    except BrokenPipeError:
        # `mmn watch | head`: the reader left; do not print a traceback.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return EXIT_OK


if _QUIET_IMPORT and _signal.getsignal(_signal.SIGINT) is _interrupted_while_importing:
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)  # imported: Ctrl-C is KeyboardInterrupt again
