"""The admin commands a host relays to a node (``protocol.messages.Command``),
mapped onto the node kind's local calls.  Sans-I/O: the runtime
(``node/runtime.py``) and the in-process cluster (``mmnotify/local.py``) run
this same table, so a relayed ``mmn fault`` means one thing in both.

``start_command(mmu, command, args)`` returns ``(token, outputs)`` as the
kind's calls do (the command finishes with the Completion of ``token``), or
``(None, result)`` for one answered at once.  The shell-only commands
(``inject``, ``heal``, and the shell's part of ``status``) stay in the shell.
"""

from __future__ import annotations

from typing import Any

from protocol.types import Errno, KernelError

from .base import SecondaryMMU


def start_command(mmu: SecondaryMMU, command: str, a: dict[str, Any]) -> tuple[int | None, Any]:
    """Raises:
        KernelError: EINVAL for an unknown command or op; what the kind raises.
        KeyError, TypeError, ValueError: a missing or malformed argument.
    """
    if command == "status":
        return None, mmu.status(a.get("mm"), a.get("cursor"), a.get("limit"))
    if command == "fault":
        return mmu.fault(int(a["mm"]), int(a["addr"]), int(a.get("pages", 1)), bool(a.get("write", False)))
    if command == "access":
        return mmu.access(int(a["mm"]), int(a["addr"]), int(a.get("length", 1)), a.get("data"))
    if command == "xpmem":
        return _xpmem(mmu, a)
    if command == "hmm":
        return _hmm(mmu, a)
    if command == "subscribe":
        return mmu.subscribe(int(a["mm"]))
    if command == "unsubscribe":
        return mmu.unsubscribe(int(a["mm"]))
    raise KernelError(Errno.EINVAL, f"unknown node command {command!r}")


def _hmm(mmu: Any, a: dict[str, Any]) -> tuple[int | None, Any]:
    op = a.get("op")
    if mmu.kind != "hmm":
        raise KernelError(Errno.EINVAL, "not an hmm node")
    if op == "snapshot":
        return mmu.snapshot(int(a["mm"]), int(a["addr"]), int(a.get("pages", 1)))
    if op == "exclusive":
        return mmu.exclusive(int(a["mm"]), int(a["addr"]), int(a.get("pages", 1)))
    if op == "migrate":
        return mmu.migrate(int(a["mm"]), int(a["addr"]), int(a.get("pages", 1)), a.get("to", "dev") == "sys")
    raise KernelError(Errno.EINVAL, f"unknown hmm op {op!r}")


def _xpmem(mmu: Any, a: dict[str, Any]) -> tuple[int | None, Any]:
    op = a.get("op")
    if mmu.kind != "xpmem":
        raise KernelError(Errno.EINVAL, "not an xpmem node")
    if op == "make":
        return mmu.make(int(a["mm"]), int(a["addr"]), int(a["length"]), int(a.get("mode", 0o600)))
    if op == "get":
        return mmu.get(int(a["segid"]), bool(a.get("write", False)))
    if op == "attach":
        return mmu.attach(int(a["apid"]), int(a.get("offset", 0)), int(a["length"]))
    if op == "detach":
        return mmu.detach(int(a["addr"]))
    if op == "release":
        return mmu.xpmem_release(int(a["apid"]))
    if op == "remove":
        return mmu.remove(int(a["segid"]))
    raise KernelError(Errno.EINVAL, f"unknown xpmem op {op!r}")
