"""What a host task may wait for: the effects the host core's executor carries out.

A host *operation* (``broker.mm``, ``broker.notifier``) is a generator of
:class:`broker.effects.Deliver` and always runs under the mm lock.  A host
*task* is one level up: an admin command, a node's slow GUP, ksmd.  It is a
generator too, and yields one of the effects below; the core
(:class:`broker.core.HostCore`) resumes it with the outcome, or throws a
``KernelError`` into it.  Nothing here does I/O: the effects are plain data.

==============  =============================================  ==============================
effect          the core does                                  the task is resumed with
==============  =============================================  ==============================
Locked(op)      queue for the mm lock (FIFO), drive ``op``      what ``op`` returns, or its
                to completion (its Delivers, acks, deadlines)   ``KernelError`` thrown in
Relay           send a ``Command`` to one node, await its       the ``CommandResult``; or
                result under a timeout                          ``KernelError`` (ESRCH: no such
                                                                live node, ETIMEDOUT, EINTR:
                                                                fenced meanwhile)
RelayAll        the same to several nodes at once               ``{node: CommandResult | None}``
Sleep(s)        a timer                                         None
WaitKsm()       wait until ksm's knobs change                   None
==============  =============================================  ==============================
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .effects import Op

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Locked:
    """Run a host operation under the mm lock (``mmap_lock``)."""

    op: Op[Any]


@dataclass(frozen=True, slots=True)
class Relay:
    """An admin command for a node (``fault``, ``access``, ``xpmem``, ...).

    ``fenced_too``: also to a fenced node still connected (inject, heal,
    which must reach a hung node).  ``timeout_ms`` None: the host's command
    timeout.
    """

    node: str
    command: str
    args: dict[str, Any] = field(default_factory=dict)
    timeout_ms: int | None = None
    fenced_too: bool = False


@dataclass(frozen=True, slots=True)
class RelayAll:
    """One command to several live nodes at once; a node that does not
    answer in time (or is not live) maps to None."""

    nodes: tuple[str, ...]
    command: str
    args: dict[str, Any] = field(default_factory=dict)
    timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class WaitKsm:
    """Until :meth:`broker.core.HostCore.wake_ksm` (a knob changed)."""


TaskEffect = Locked | Relay | RelayAll | Sleep | WaitKsm

#: A host task returning T.
Task = Generator[TaskEffect, Any, T]


__all__ = ["Locked", "Relay", "RelayAll", "Sleep", "Task", "TaskEffect", "WaitKsm"]
