"""The admin API: every command the CLI and scripts may send, and its arguments.

An ``AdminRequest(command, args)`` is checked here before the host acts on
it: unknown command, unknown argument, missing argument, wrong type or value
out of range -> ``ProtocolError("bad_message")`` and nothing changes.  The
host answers ``AdminReply(ok, result, errno, error)``.

Bytes travel as MessagePack bin (the CLI shows them as hex).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError
from .types import ADDRESS_LIMIT


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    kind: str  # int | addr | bool | str | bytes | choice
    required: bool = True
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: int = 0
    maximum: int = (1 << 63) - 1


def _a(name: str, kind: str = "int", **kw: Any) -> Arg:
    return Arg(name, kind, **kw)


PROTS = ("none", "r", "rw")
ADVICE = ("dontneed", "mergeable", "unmergeable")
INJECT_KINDS = ("drop-acks", "delay-acks", "duplicate", "hang", "crash", "partition", "slow-drain")
XPMEM_OPS = ("make", "get", "attach", "detach", "release", "remove")
IDLE_OPS = ("mark", "read")
HMM_OPS = ("snapshot", "migrate", "exclusive")
HMM_TARGETS = ("dev", "sys")

_MM = _a("mm", minimum=1)
_ADDR = _a("addr", "addr")
_LEN = _a("length", minimum=1)
_NODE = _a("node", "str")

#: command -> its arguments.  Append only.
COMMANDS: dict[str, tuple[Arg, ...]] = {
    "status": (
        _a("mm", required=False, default=None, minimum=1),
        _a("node", "str", required=False, default=None),
        _a("cursor", "str", required=False, default=None),
        _a("limit", required=False, default=None, minimum=1, maximum=8192),
    ),
    "spawn": (),
    "fork": (_MM,),
    "exit": (_MM,),
    "mmap": (
        _MM,
        _a("pages", minimum=1),
        _a("prot", "choice", required=False, default="rw", choices=PROTS),
        _a("mergeable", "bool", required=False, default=False),
        _a("shared", "bool", required=False, default=False),
        _a("fill", required=False, default=None, maximum=255),
    ),
    "write": (_MM, _ADDR, _a("data", "bytes")),
    "read": (_MM, _ADDR, _LEN),
    "munmap": (_MM, _ADDR, _LEN),
    "mprotect": (_MM, _ADDR, _LEN, _a("prot", "choice", choices=PROTS)),
    "madvise": (_MM, _ADDR, _LEN, _a("advice", "choice", choices=ADVICE), _a("block", "bool", required=False, default=True)),
    "swap": (_MM, _ADDR, _LEN),
    "migrate": (_MM, _ADDR, _LEN),
    "merge": (_a("full_scans", required=False, default=1, minimum=0, maximum=1000),),
    "ksm": (
        _a("run", required=False, default=None, maximum=2),
        _a("pages_to_scan", required=False, default=None, minimum=1),
        _a("sleep_millisecs", required=False, default=None),
        _a("max_page_sharing", required=False, default=None, minimum=2),
        _a("use_zero_pages", "bool", required=False, default=None),
    ),
    "fault": (
        _NODE,
        _MM,
        _ADDR,
        _a("pages", required=False, default=1, minimum=1, maximum=512),
        _a("write", "bool", required=False, default=False),
    ),
    "access": (
        _NODE,
        _MM,
        _ADDR,
        _a("length", required=False, default=1, minimum=1, maximum=1 << 20),
        _a("data", "bytes", required=False, default=None),
    ),
    "xpmem": (
        _NODE,
        _a("op", "choice", choices=XPMEM_OPS),
        _a("mm", required=False, default=None, minimum=1),
        _a("addr", "addr", required=False, default=None),
        _a("length", required=False, default=None, minimum=1),
        _a("mode", required=False, default=0o600, maximum=0o777),
        _a("segid", required=False, default=None, minimum=1),
        _a("apid", required=False, default=None, minimum=1),
        _a("write", "bool", required=False, default=False),
        _a("offset", required=False, default=0),
    ),
    "inject": (
        _NODE,
        _a("kind", "choice", choices=INJECT_KINDS),
        _a("rate", "str", required=False, default="1.0"),
        _a("delay_ms", required=False, default=0, maximum=600_000),
        _a("for_s", "str", required=False, default=""),
    ),
    "heal": (_NODE,),
    "subscribe": (_NODE, _MM),
    "unsubscribe": (_NODE, _MM),
    "grant": (_NODE, _MM, _a("read_only", "bool", required=False, default=False)),
    "revoke": (_NODE, _MM),
    # /sys/kernel/mm/page_idle/bitmap over an mm's range: mark idle, or read back
    "idle": (_MM, _ADDR, _LEN, _a("op", "choice", choices=IDLE_OPS)),
    # lib/test_hmm.c's ioctls on behalf of an hmm node
    "hmm": (_NODE, _a("op", "choice", choices=HMM_OPS), _MM, _ADDR, _a("pages", required=False, default=1, minimum=1, maximum=512),
            _a("to", "choice", required=False, default="dev", choices=HMM_TARGETS)),
}


#: each command's argument names, built once (not per request)
_NAMES: dict[str, frozenset[str]] = {name: frozenset(a.name for a in spec) for name, spec in COMMANDS.items()}


def check_admin(command: str, args: dict[str, Any]) -> dict[str, Any]:
    """Validate one admin request; returns the arguments with defaults filled.

    Raises:
        ProtocolError("bad_message"): unknown command or argument, missing
            argument, wrong type, value out of range.
    """
    spec = COMMANDS.get(command)
    if spec is None:
        raise ProtocolError("bad_message", f"unknown admin command {command[:64]!r}")
    names = _NAMES[command]
    for key in args:
        if key not in names:
            raise ProtocolError("bad_message", f"{command}: unknown argument {key[:64]!r}")
    out: dict[str, Any] = {}
    for arg in spec:
        if arg.name not in args or args[arg.name] is None:
            if arg.required:
                raise ProtocolError("bad_message", f"{command}: missing argument {arg.name!r}")
            out[arg.name] = arg.default
            continue
        value = args[arg.name]
        kind = arg.kind
        # (the message's "command: name" is built only for a refusal)
        if kind == "int" or kind == "addr":
            if type(value) is not int:
                raise ProtocolError("bad_message", f"{command}: {arg.name} must be an integer")
            hi = ADDRESS_LIMIT if kind == "addr" else arg.maximum
            if not (arg.minimum <= value <= hi):
                raise ProtocolError("bad_message", f"{command}: {arg.name} must be in {arg.minimum}..{hi}")
        elif kind == "bool":
            if type(value) is not bool:
                raise ProtocolError("bad_message", f"{command}: {arg.name} must be a boolean")
        elif kind == "str":
            if type(value) is not str or len(value) > 256:
                raise ProtocolError("bad_message", f"{command}: {arg.name} must be a short string")
        elif kind == "bytes":
            if type(value) is not bytes:
                raise ProtocolError("bad_message", f"{command}: {arg.name} must be bytes")
        elif kind == "choice":
            if value not in arg.choices:
                raise ProtocolError("bad_message", f"{command}: {arg.name} must be one of {', '.join(arg.choices)}")
        out[arg.name] = value
    return out
