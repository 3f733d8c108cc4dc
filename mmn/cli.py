"""``mmn``: the command line of mmnotify.

``main(argv=None) -> int`` parses one command and runs it.  Three kinds:

* services: ``mmn host``, ``mmn node`` (one process each, what containers run)
  and ``mmn up`` (host plus default nodes on this machine, see :mod:`mmn.up`);
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
3     cannot reach the host: no answer within ``--timeout`` seconds
====  ===============================================================

Every argument is checked twice before anything is sent: by argparse (types,
ranges) and by ``protocol.admin.check_admin``, the host's own check.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio
import zmq

from protocol.admin import ADVICE, COMMANDS, INJECT_KINDS, PROTS, XPMEM_OPS, check_admin
from protocol.codec import decode
from protocol.errors import ProtocolError
from protocol.limits import Limits
from protocol.messages import AdminReply, AdminRequest, Error, Event
from protocol.types import ADDRESS_LIMIT

from transport import AdminClient, connect

from . import render

log = logging.getLogger(__name__)

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

PROG = "mmn"


# --------------------------------------------------------------------------
# errors


class UsageError(Exception):
    """Bad input found before anything was sent: exit 2."""


class Unreachable(Exception):
    """No answer from the host in time: exit 3."""


class Failed(Exception):
    """The host or node answered with an error: exit 1."""

    def __init__(self, errno: str, message: str = "") -> None:
        self.errno = errno or "error"
        self.message = message
        super().__init__(f"{self.errno}: {message}" if message else self.errno)


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
# argument types: each raises ArgumentTypeError with a message for people


def _int(text: str) -> int:
    """Decimal or ``0x`` hexadecimal; no sign, no leading-zero octal guessing."""
    t = text.strip().replace("_", "")
    if t.startswith("-"):
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    try:
        if t[:2].lower() == "0x":
            return int(t[2:], 16)
        if t.startswith("+") or not t.isdigit():
            raise ValueError
        return int(t, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (decimal or 0x hex)") from None


def number(minimum: int = 0, maximum: int = (1 << 63) - 1, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        value = _int(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{text!r} out of range {minimum}..{maximum}")
        return value

    parse.__name__ = what or "number"
    return parse


def address(text: str) -> int:
    """A user address: decimal or 0x hex, below ``ADDRESS_LIMIT``."""
    value = _int(text)
    if value >= ADDRESS_LIMIT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a user address (they end below {ADDRESS_LIMIT:#x})")
    return value


address.__name__ = "address"


def hexbytes(text: str) -> bytes:
    """Bytes written as hex (``0x`` prefix, spaces and colons allowed)."""
    t = re.sub(r"[\s:]", "", text)
    if t[:2].lower() == "0x":
        t = t[2:]
    if not t:
        raise argparse.ArgumentTypeError("no bytes given")
    if len(t) % 2:
        raise argparse.ArgumentTypeError(f"odd-length hex {text!r}")
    try:
        return bytes.fromhex(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not hex") from None


hexbytes.__name__ = "hex"


def octal_mode(text: str) -> int:
    """Permission bits in octal: ``0600``, ``600`` or ``0o600``."""
    t = text.strip().lower()
    if t.startswith("0o"):
        t = t[2:]
    if not t or not all(c in "01234567" for c in t):
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0600")
    value = int(t, 8)
    if value > 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} out of range 0..0777")
    return value


octal_mode.__name__ = "mode"


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def probability(text: str) -> float:
    value = _float(text, "rate")
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability in 0..1")
    return value


probability.__name__ = "rate"


def seconds(text: str) -> float:
    value = _float(text, "seconds")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


seconds.__name__ = "seconds"


def node_name(text: str) -> str:
    if not text or len(text) > 256 or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a node name")
    return text


node_name.__name__ = "node"


_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+):(\d{1,5})$")


def endpoint(text: str) -> str:
    """A ZeroMQ endpoint: ``tcp://H:P``, ``ipc://PATH``, ``inproc://N`` or ``H:P``."""
    t = text.strip()
    if "://" in t:
        scheme, _, rest = t.partition("://")
        if scheme not in ("tcp", "ipc", "inproc") or not rest:
            raise argparse.ArgumentTypeError(f"{text!r} is not a ZeroMQ endpoint")
        if scheme == "tcp" and not _HOSTPORT.match(rest):
            raise argparse.ArgumentTypeError(f"{text!r}: want tcp://HOST:PORT")
        return t
    m = _HOSTPORT.match(t)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT or a ZeroMQ endpoint")
    return f"tcp://{t}"


endpoint.__name__ = "endpoint"


def _env_endpoint(name: str, default: str) -> str:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return endpoint(value)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"${name}: {exc}") from None


# --------------------------------------------------------------------------
# the admin client


def up_record_path(port: int) -> Path:
    """Where ``mmn up`` serving the admin port ``port`` on this machine leaves
    its key directory for the CLI of a second terminal (paths only, no
    secret: the keys themselves stay in their 0700 directory)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"mmnotify-{os.getuid()}-up-{port}.json"


def up_keys_for(endpoint: str) -> str | None:
    """The key directory of the live ``mmn up`` whose admin endpoint is
    ``endpoint`` (loopback only), or None."""
    try:
        hostpart, port = endpoint.rsplit(":", 1)
        if not hostpart.endswith(("127.0.0.1", "localhost", "[::1]")):
            return None
        record = json.loads(up_record_path(int(port)).read_text())
        os.kill(int(record["pid"]), 0)  # a dead mmn up's record means nothing
        return str(record["keys"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def client_security(keys: str | None = None, env: Mapping[str, str] | None = None, *,
                    endpoint: str | None = None) -> Any:
    """The CURVE hook of an operator's client (CLI, ``mmn up``, healthchecks),
    or None for plain TCP.

    ``keys`` (``--keys DIR``), else ``$MMN_KEYS_DIR``: the admin pair
    ``DIR/admin/admin.key_secret`` (or ``$MMN_ADMIN_KEY``) and the host's
    public key ``DIR/host/host.key`` (or ``$MMN_HOST_KEY``).
    ``$MMN_INSECURE=1`` means plain TCP whatever else is set.

    Raises:
        UsageError: a key file is missing or malformed.
    """
    from pathlib import Path

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


_FROM_ENV: Any = object()


async def admin_call(
    addr: str, command: str, args: Mapping[str, Any], *, timeout: float, security: Any = _FROM_ENV
) -> dict[str, Any]:
    """Send one admin request and wait for its reply.

    Returns:
        The reply's ``result``.
    Raises:
        Unreachable: no reply within ``timeout`` seconds (the DEALER is
            ``IMMEDIATE``, so an absent host times out on the send too).
        Failed: the host answered ``ok=False`` (its errno), a typed ``Error``
            (it refused the request), or a reply that does not decode.
    Concurrency: awaits; the client socket is private to this call and closed
    before it returns, also when cancelled.

    ``security``: a CURVE hook, None for plain TCP; by default
    :func:`client_security` from the environment.  A host that refuses the
    key (ZAP) never answers: that is :class:`Unreachable`.
    """
    if security is _FROM_ENV:
        security = client_security()
    async with AdminClient(addr, security=security) as client:
        request = AdminRequest(id=client.next_id(), command=command, args=dict(args))
        try:
            reply = await client.request(request, timeout)
        except trio.TooSlowError:
            raise Unreachable(f"no answer from the host at {addr} within {timeout:g}s") from None
        except ProtocolError as exc:
            raise Failed("bad_message", f"malformed reply from the host: {exc.message}") from exc
    if isinstance(reply, AdminReply):
        if not reply.ok:
            raise Failed(reply.errno, reply.error)
        return dict(reply.result)
    if isinstance(reply, Error):
        raise Failed(reply.code, reply.message)
    raise Failed("bad_message", f"the host answered {type(reply).TYPE!r} to an admin request")


def _events_endpoint(published: str, admin: str) -> str:
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
# output


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(render.jsonable(doc), separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _emit(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: {' '.join(message.split())}\n")
    sys.stderr.flush()


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


def _common(sub: argparse.ArgumentParser, *, host: bool = True) -> None:
    """``--json``, ``--host``, ``--timeout`` on a subcommand too, so both
    ``mmn --json status`` and ``mmn status --json`` work."""
    sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    if host:
        sub.add_argument(
            "--host", type=endpoint, default=argparse.SUPPRESS, metavar="ADDR", help="admin endpoint (or $MMN_HOST)"
        )
        sub.add_argument(
            "--timeout", type=seconds, default=argparse.SUPPRESS, metavar="S", help="give up after S seconds (10)"
        )
        sub.add_argument(
            "--keys", default=argparse.SUPPRESS, metavar="DIR", help="CURVE keys from `mmn keygen` ($MMN_KEYS_DIR)"
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
    parser = _Parser(prog=PROG, description="A distributed model of Linux MMU notifiers.")
    parser.add_argument("--json", action="store_true", default=False, help="print one JSON document")
    parser.add_argument("--host", type=endpoint, default=None, metavar="ADDR", help="admin endpoint (or $MMN_HOST)")
    parser.add_argument("--timeout", type=seconds, default=None, metavar="S", help="give up after S seconds (10)")
    parser.add_argument("--keys", default=None, metavar="DIR", help="CURVE keys from `mmn keygen` ($MMN_KEYS_DIR)")
    subs = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    # ---- services
    from . import up as up_module

    p = subs.add_parser("host", help="run the host (primary MMU, notifier fan-out, admin API)")
    _host_options(p)
    p.set_defaults(handler=_run_host)

    p = subs.add_parser("node", help="run one secondary-MMU node")
    p.add_argument("--kind", choices=("kvm", "gru", "xpmem"), default=os.environ.get("MMN_KIND"), help="($MMN_KIND)")
    p.add_argument("--name", type=node_name, default=None, help="unique node name ($MMN_NAME)")
    p.add_argument("--host", type=endpoint, default=None, metavar="ADDR", help="the host's node endpoint ($MMN_HOST_ENDPOINT)")
    for flag, dest, env, kind, help in NODE_OPTIONS:
        p.add_argument(flag, dest=dest, type=kind, default=None, help=f"{help} (${env})")
    p.add_argument("--seed", type=number(0), default=None, help="seed of the injected failures' randomness")
    p.add_argument("--keys", dest="keys_dir", default=None, metavar="DIR",
                   help="CURVE: nodes/NAME.key_secret (or nodes/KIND.key_secret) and host/host.key ($MMN_KEYS_DIR)")
    p.add_argument("--key", default=None, metavar="FILE", help="CURVE: this node's secret key ($MMN_NODE_KEY)")
    p.add_argument("--host-key", default=None, metavar="FILE", help="CURVE: the host's public key ($MMN_HOST_KEY)")
    p.add_argument("--insecure", action="store_true", default=None, help="plain TCP even with keys ($MMN_INSECURE=1)")
    p.add_argument("--log-level", default=os.environ.get("MMN_LOG_LEVEL", "INFO"))
    p.set_defaults(handler=_run_node)

    p = subs.add_parser("up", help="host plus default nodes on this machine, with a live status view")
    up_module.add_arguments(p)
    _host_options(p, service=False)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="with --once: one JSON document")
    p.set_defaults(handler=up_module.run)

    from . import soak as soak_module

    p = subs.add_parser("soak", help="a seeded workload with injected failures, checked against a shadow model")
    soak_module.add_arguments(p)
    p.set_defaults(handler=soak_module.run)

    from . import bench as bench_module

    p = subs.add_parser("bench", help="measure the cluster, each figure against a raw pyzmq floor of the same run")
    bench_module.add_arguments(p)
    p.set_defaults(handler=bench_module.run_command)

    # ---- control
    _control(subs, "status", _b("status"), _r_status, "nodes, mms, frames, stale accesses, KSM")
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
    p.add_argument("--prot", choices=PROTS, default=None)
    p.add_argument("--mergeable", action="store_true", default=None, help="MADV_MERGEABLE (KSM)")
    p.add_argument("--shared", action="store_true", default=None, help="MAP_SHARED")
    p.add_argument("--fill", type=number(0, 255, "byte"), default=None, metavar="BYTE", help="write every byte")

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
    p.add_argument("--pages", type=number(1, 512, "pages"), default=None, metavar="N")
    p.add_argument("--write", action="store_true", default=None)

    p = _control(subs, "access", _build_access, _r_data, "read or write through a node's translation")
    p.add_argument("node", type=node_name, metavar="NODE")
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    p.add_argument("addr", type=address, metavar="ADDR")
    p.add_argument("--len", type=number(1, 1 << 20, "length"), default=None, metavar="L")
    p.add_argument("--write", type=hexbytes, default=None, metavar="HEX", help="write these bytes instead of reading")

    p = _control(subs, "merge", _b("merge", full_scans="full_scans"), _r_ksm, "run KSM scans now")
    p.add_argument("--full-scans", type=number(0, 1000), default=None, metavar="N")

    p = _control(subs, "ksm", _build_ksm, _r_ksm, "show or set the KSM knobs")
    p.add_argument("--run", type=number(0, 2), default=None, metavar="0|1|2", help="0 stop, 1 run, 2 unmerge all")
    p.add_argument("--pages-to-scan", type=number(1), default=None, metavar="N")
    p.add_argument("--sleep-millisecs", type=number(0), default=None, metavar="MS")
    p.add_argument("--max-page-sharing", type=number(2), default=None, metavar="N")
    p.add_argument("--use-zero-pages", type=number(0, 1), default=None, metavar="0|1")

    p = _control(subs, "inject", _build_inject, _r_inject, "inject a failure into a node")
    p.add_argument("node", type=node_name, metavar="NODE")
    p.add_argument("kind", choices=INJECT_KINDS, metavar="KIND", help="|".join(INJECT_KINDS))
    p.add_argument("--rate", type=probability, default=None, metavar="P", help="probability 0..1 (1)")
    p.add_argument("--delay-ms", type=number(0, 600_000), default=None, metavar="D")
    p.add_argument("--for", dest="for_s", type=seconds, default=None, metavar="SECONDS", help="heal after this long")
    p = _control(subs, "heal", _b("heal", node="node"), _r_inject, "undo every injected failure of a node")
    p.add_argument("node", type=node_name, metavar="NODE")

    p = _control(subs, "subscribe", _b("subscribe", node="node", mm="mm"), _r_kv, "subscribe a node to an mm")
    p.add_argument("node", type=node_name, metavar="NODE")
    p.add_argument("--mm", type=number(1, what="mm"), required=True, metavar="ID")
    p = _control(subs, "unsubscribe", _b("unsubscribe", node="node", mm="mm"), _r_kv, "unsubscribe a node")
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
    q.add_argument("--mode", type=octal_mode, default=None, help="octal permission bits (0600)")
    q = xp("get", "ask for access to a segment -> apid")
    q.add_argument("--segid", type=number(1, what="segid"), required=True, metavar="ID")
    q.add_argument("--write", action="store_true", default=False, help="read-write (default read-only)")
    q = xp("attach", "map part of a segment into the node -> vaddr")
    q.add_argument("--apid", type=number(1, what="apid"), required=True, metavar="ID")
    q.add_argument("--offset", type=number(0, what="offset"), default=None, metavar="OFF")
    q.add_argument("--len", dest="length", type=number(1, what="length"), required=True, metavar="LEN")
    q = xp("detach", "unmap an attachment")
    q.add_argument("addr", type=address, metavar="VADDR")
    q = xp("release", "give an apid back")
    q.add_argument("--apid", type=number(1, what="apid"), required=True, metavar="ID")
    q = xp("remove", "withdraw an exported segment")
    q.add_argument("--segid", type=number(1, what="segid"), required=True, metavar="ID")
    assert set(ops.choices) == set(XPMEM_OPS)

    # ---- keys
    p = subs.add_parser("keygen", help="write CURVE key pairs: the host's, operators', nodes'")
    p.add_argument("dir", metavar="DIR", help="DIR/host, DIR/admin, DIR/nodes (secrets mode 0600)")
    p.add_argument("--node", action="append", default=None, metavar="NAME",
                   help="a node key (repeatable; default kvm, gru, xpmem: one per kind, covering KIND-*)")
    p.add_argument("--admin", action="append", default=None, metavar="NAME", help="an operator key (admin)")
    p.add_argument("--force", action="store_true", help="replace existing pairs")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    p.set_defaults(handler=_run_keygen)

    # ---- Docker Swarm: the keys as secrets (all of it in mmn/swarm.py)
    from . import swarm as swarm_module

    swarm_module.add_parser(subs)

    # ---- event stream
    p = subs.add_parser("watch", help="print the host's events until Ctrl-C")
    _common(p)
    p.add_argument("--count", type=number(1), default=None, metavar="N", help="stop after N events")
    p.add_argument("--seconds", type=seconds, default=None, metavar="S", help="stop after S seconds")
    p.add_argument("--events", type=endpoint, default=None, metavar="ADDR", help="event endpoint (default: from status)")
    p.set_defaults(handler=_run_watch)
    return parser


# --------------------------------------------------------------------------
# handlers


def _security(ns: argparse.Namespace) -> Any:
    return client_security(getattr(ns, "keys", None), endpoint=_admin_endpoint(ns))


def _admin_endpoint(ns: argparse.Namespace) -> str:
    return ns.host or _env_endpoint("MMN_HOST", DEFAULT_ADMIN)


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
    result = trio.run(lambda: admin_call(addr, command, args, timeout=_timeout(ns), security=security))
    if ns.json:
        _emit_json(result)
    else:
        _emit(ns.show(ns, result))
    return EXIT_OK


def _show_event(event: Event) -> str:
    parts = []
    for key, value in event.fields.items():
        if isinstance(value, int) and not isinstance(value, bool) and key in ("addr", "start", "end", "vaddr"):
            parts.append(f"{key}={value:#x}")
        else:
            parts.append(f"{key}={render.cell(value)}")
    return f"{event.seq:>8}  {event.kind:<24} {' '.join(parts)}".rstrip()


async def _watch(ns: argparse.Namespace) -> None:
    addr = _admin_endpoint(ns)
    events = ns.events
    if events is None:
        status = await admin_call(addr, "status", {}, timeout=_timeout(ns), security=_security(ns))
        published = ((status.get("host") or {}).get("endpoints") or {}).get("events")
        if not isinstance(published, str) or not published:
            raise Failed("ENOENT", "the host's status names no event endpoint")
        events = _events_endpoint(published, addr)
    limits = Limits()
    async with connect(zmq.SUB, events, security=_security(ns)) as sub:
        sub.socket.setsockopt(zmq.SUBSCRIBE, b"")
        if not ns.json:
            sys.stderr.write(f"{PROG}: watching {events} (Ctrl-C to stop)\n")
            sys.stderr.flush()
        seen = 0
        with trio.move_on_after(ns.seconds if ns.seconds is not None else math.inf):
            while ns.count is None or seen < ns.count:
                frames = await sub.recv_multipart()
                try:
                    event = decode(frames[-1], limits)
                except ProtocolError as exc:
                    log.debug("undecodable event: %s", exc)
                    continue
                if not isinstance(event, Event):
                    continue
                seen += 1
                if ns.json:
                    _emit_json({"seq": event.seq, "kind": event.kind, "fields": event.fields})
                else:
                    _emit(_show_event(event))


def _run_keygen(ns: argparse.Namespace) -> int:
    from transport.curve import ADMIN_KEY_NAME, DEFAULT_NODE_KEYS, KeyError_, keygen

    try:
        result = keygen(ns.dir, ns.node or DEFAULT_NODE_KEYS, ns.admin or (ADMIN_KEY_NAME,), overwrite=ns.force)
    except (KeyError_, OSError) as exc:
        raise UsageError(f"keygen: {exc}") from None
    if getattr(ns, "json", False):
        _emit_json(result)
    else:
        for path in result["created"]:
            _emit(f"created {path}")
        for path in result["kept"]:
            _emit(f"kept    {path}")
    return EXIT_OK


def _run_watch(ns: argparse.Namespace) -> int:
    try:
        trio.run(_watch, ns)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


# ---- services: mmn host / mmn node


def _env(name: str, parse: Callable[[str], Any]) -> Any:
    """``$name`` parsed with an argparse type, or None when unset."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return parse(value)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"${name}: {exc}") from None


#: ``mmn host`` options: (flag, HostConfig field, environment variable,
#: argparse type, help).  ``HostConfig.from_env`` reads the variables; the
#: flags override them.
HOST_OPTIONS: tuple[tuple[str, str, str, Callable[[str], Any], str], ...] = (
    ("--bind", "bind", "MMN_BIND", str, "interface to bind (127.0.0.1; 0.0.0.0 in containers)"),
    ("--node-port", "node_port", "MMN_NODE_PORT", number(0, 65535), f"node ROUTER port ({DEFAULT_NODE_PORT})"),
    ("--admin-port", "admin_port", "MMN_ADMIN_PORT", number(0, 65535), f"admin ROUTER port ({DEFAULT_ADMIN_PORT})"),
    ("--events-port", "events_port", "MMN_EVENTS_PORT", number(0, 65535), f"event PUB port ({DEFAULT_EVENTS_PORT})"),
    ("--frames", "frames", "MMN_FRAMES", number(1), "physical page frames"),
    ("--page-size", "page_size", "MMN_PAGE_SIZE", number(1), "page size in bytes"),
    ("--heartbeat-ms", "heartbeat_ms", "MMN_HEARTBEAT_MS", number(1), "heartbeat interval"),
    ("--liveness", "liveness", "MMN_LIVENESS", number(1), "heartbeats a node may miss before it is fenced"),
    ("--ack-deadline-ms", "ack_deadline_ms", "MMN_ACK_DEADLINE_MS", number(1), "fence a node that acks later"),
    ("--command-timeout-ms", "command_timeout_ms", "MMN_COMMAND_TIMEOUT_MS", number(1), "relayed node commands"),
    ("--swap-path", "swap_path", "MMN_SWAP_PATH", str, "swap file (default: in memory)"),
    ("--swap-slots", "swap_slots", "MMN_SWAP_SLOTS", number(1), "swap slots"),
    ("--ksm-run", "ksm_run", "MMN_KSM_RUN", number(0, 2), "KSM run at start: 0 stop, 1 run, 2 unmerge"),
    ("--keys", "keys_dir", "MMN_KEYS_DIR", str, "CURVE on every socket, keys from `mmn keygen DIR`"),
    ("--server-key", "server_key", "MMN_SERVER_KEY", str, "CURVE: the host's secret key file (DIR/host)"),
    ("--node-keys", "node_keys", "MMN_NODE_KEYS", str, "CURVE: directory of allowed node public keys (DIR/nodes)"),
    ("--admin-keys", "admin_keys", "MMN_ADMIN_KEYS", str, "CURVE: directory of allowed admin public keys (DIR/admin)"),
    ("--max-frame", "max_frame", "MMN_MAX_FRAME", number(1024), "bytes in one frame"),
    ("--max-pages", "max_pages", "MMN_MAX_PAGES", number(1), "pages in one GUP request"),
    ("--max-range", "max_range", "MMN_MAX_RANGE", number(1), "bytes in one requested range"),
    ("--rate-limit", "max_rate", "MMN_RATE_LIMIT", number(0), "frames a second per peer, 0 = unlimited"),
    ("--rate-burst", "rate_burst", "MMN_RATE_BURST", number(0), "burst before the rate limit bites"),
)

#: Host options ``mmn up`` does not take (it chooses ports from --port-base).
_UP_SKIPS = ("node_port", "admin_port", "events_port")


def _host_options(p: argparse.ArgumentParser, *, service: bool = True) -> None:
    for flag, dest, env, kind, help in HOST_OPTIONS:
        if not service and dest in _UP_SKIPS:
            continue
        p.add_argument(flag, dest=dest, type=kind, default=None, help=f"{help} (${env})")
    p.add_argument(
        "--wrap-change-pte",
        action="store_true",
        default=None,
        help="wrap change_pte in start/end as kernels 3.7-6.9 did ($MMN_WRAP_CHANGE_PTE=1)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plain TCP, no CURVE, even if keys are configured ($MMN_INSECURE=1)",
    )
    if service:
        p.add_argument("--log-level", default=os.environ.get("MMN_LOG_LEVEL", "INFO"))


def _check_env(options: Sequence[tuple[str, str, str, Callable[[str], Any], str]]) -> None:
    """Reject a malformed ``MMN_*`` variable as a usage error, before
    ``from_env`` reads it."""
    for _flag, _dest, env, kind, _help in options:
        _env(env, kind)


def host_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """HostConfig fields given as flags (already checked); None = not given."""
    out = {dest: getattr(ns, dest, None) for _f, dest, _e, _k, _h in HOST_OPTIONS}
    out["wrap_change_pte"] = getattr(ns, "wrap_change_pte", None)
    out["insecure"] = getattr(ns, "insecure", None)
    return {k: v for k, v in out.items() if v is not None}


def host_config(ns: argparse.Namespace) -> Any:
    """``broker.host.HostConfig.from_env(**flags)``: defaults, then ``MMN_*``
    variables, then the command line.

    Raises:
        UsageError: a malformed variable.
    """
    from broker.host import HostConfig

    _check_env(HOST_OPTIONS)
    try:
        config = HostConfig.from_env(**host_overrides(ns))
        config.key_paths()  # all three CURVE paths or none
        return config
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


#: ``mmn node`` options besides --kind/--name/--host.
NODE_OPTIONS: tuple[tuple[str, str, str, Callable[[str], Any], str], ...] = (
    ("--heartbeat-ms", "heartbeat_ms", "MMN_HEARTBEAT_MS", number(1), "heartbeat interval until registered"),
    ("--liveness", "liveness", "MMN_LIVENESS", number(1), "host heartbeats missed before reconnecting"),
)


def node_config(ns: argparse.Namespace) -> Any:
    """``node.runtime.NodeConfig.from_env(**flags)``.

    Raises:
        UsageError: no kind, or a malformed variable.
    """
    from node.runtime import NodeConfig

    kind = ns.kind or _env("MMN_KIND", str)
    if kind not in ("kvm", "gru", "xpmem"):
        raise UsageError("node: --kind kvm|gru|xpmem is required (or $MMN_KIND)")
    _env("MMN_NAME", node_name)
    _check_env(NODE_OPTIONS)
    overrides: dict[str, Any] = {
        "kind": kind,
        "name": ns.name,
        "host": ns.host or _env_endpoint("MMN_HOST_ENDPOINT", DEFAULT_NODE_ENDPOINT),
        "seed": ns.seed,
        "keys_dir": getattr(ns, "keys_dir", None),
        "key": getattr(ns, "key", None),
        "host_key": getattr(ns, "host_key", None),
        "insecure": getattr(ns, "insecure", None),
    }
    for _flag, dest, _env_name, _kind, _help in NODE_OPTIONS:
        overrides[dest] = getattr(ns, dest, None)
    try:
        return NodeConfig.from_env(**overrides)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _die_with_parent() -> None:
    """Under ``mmn up`` (``$MMN_PARENT_PID``): stop when the parent is gone, so
    a SIGKILLed ``mmn up`` leaves no orphan behind.

    Not ``PR_SET_PDEATHSIG``: that fires when the *thread* that forked us
    exits, and trio's ``open_process`` forks from a worker thread that trio
    retires after 10 s idle -- every child of ``mmn up`` got SIGTERM 10 s
    after it started.  A daemon thread watches ``getppid()`` instead (we are
    reparented when the parent dies) and sends us SIGTERM: the service stops
    as on Ctrl-C.
    """
    parent = os.environ.get("MMN_PARENT_PID")
    if not parent or not parent.isdigit():
        return
    parent_pid = int(parent)
    if os.getppid() != parent_pid:  # the parent died before we looked
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


async def _cancel_on_signals(scope: trio.CancelScope, what: str) -> None:
    """Cancel ``scope`` at the first SIGTERM or SIGINT (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return  # tests run services in worker threads: no signal handling there
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        async for signum in received:
            log.info("%s: %s, stopping", what, signal.Signals(signum).name)
            scope.cancel()
            return


async def _serve(service: Callable[..., Any], config: Any, what: str) -> None:
    """Run one service (``service(config, task_status=...)``) until it returns
    or SIGTERM/SIGINT arrives, then cancel it: structured shutdown, each socket
    closed by its owning task.

    Concurrency: the service runs in an inner nursery; the signal watcher in
    the outer one, cancelled once the service is over.
    """
    async with trio.open_nursery() as outer:
        outer.start_soon(_cancel_on_signals, outer.cancel_scope, what)
        async with trio.open_nursery() as inner:
            started = await inner.start(service, config)
            suffix = "" if started is None else f" {started}"
            sys.stderr.write(f"{PROG} {what}: ready{suffix}\n")
            sys.stderr.flush()
        outer.cancel_scope.cancel()


def _first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside ``exc`` (trio nurseries wrap)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _run_service(service: Callable[..., Any], config: Any, what: str) -> int:
    try:
        trio.run(_serve, service, config, what)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # the service crashed: one line, a log record, exit 1
        log.exception("%s crashed", what)
        leaf = _first_leaf(exc)
        _error(f"{what}: {type(leaf).__name__}: {leaf}")
        return EXIT_FAILED
    return EXIT_OK


def _run_host(ns: argparse.Namespace) -> int:
    config = host_config(ns)
    _configure_logging(ns.log_level)
    _die_with_parent()
    from broker.host import run_host

    return _run_service(run_host, config, "host")


def _run_node(ns: argparse.Namespace) -> int:
    config = node_config(ns)
    _configure_logging(ns.log_level)
    _die_with_parent()
    from node.runtime import run_node

    return _run_service(run_node, config, f"node {config.name}")


# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``mmn`` command; returns the exit status (see the module doc)."""
    parser = build_parser()
    try:
        ns = parser.parse_args(list(argv) if argv is not None else None)
    except _Exit as exc:
        return exc.code
    try:
        return ns.handler(ns)
    except UsageError as exc:
        _error(f"usage: {exc}")
        return EXIT_USAGE
    except Failed as exc:
        if getattr(ns, "json", False):
            _emit_json({"ok": False, "errno": exc.errno, "error": exc.message})
        _error(str(exc))
        return EXIT_FAILED
    except Unreachable as exc:
        if getattr(ns, "json", False):
            _emit_json({"ok": False, "errno": "unreachable", "error": str(exc)})
        _error(f"unreachable: {exc}")
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `mmn watch | head`: the reader left; do not print a traceback.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return EXIT_OK
