"""The sans-I/O seam between host operations and whoever carries messages.

A host operation that must talk to secondary MMUs is a generator: it yields a
:class:`Deliver` and is resumed with the outcome per node.  It never touches a
socket, a clock or trio.  Drivers:

* :func:`run_sync` -- a synchronous ``deliver`` callable (in-process nodes,
  unit tests, hypothesis state machines);
* the host's trio shell (``broker.host``) -- sends over ZeroMQ, awaits the acks
  in parallel under the ack deadline, fences the nodes that miss it and
  answers ``None`` for them.

Between two yields an operation runs to completion without interruption, so
the model is consistent whenever a driver regains control.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from protocol.messages import Ack, Message

T = TypeVar("T")

#: Outcome of a Deliver: node name -> its Ack, or None if the node is gone
#: (fenced for missing the deadline, crashed, unregistered meanwhile).
Outcomes = dict[str, Ack | None]

#: A host operation returning T.
Op = Generator["Deliver", Outcomes, T]


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send each message to its node; resume with :data:`Outcomes`.

    ``expect_ack`` is False only for ``invalidate_range_end``, which never
    fails and is never acknowledged: the driver resumes at once with every
    node mapped to None.

    A node appears at most once in ``sends``.
    """

    sends: tuple[tuple[str, Message], ...]
    expect_ack: bool = True

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(node for node, _ in self.sends)


def run_sync(op: Generator[Deliver, Outcomes, T], deliver: Callable[[Deliver], Outcomes]) -> T:
    """Drive ``op`` to completion with a synchronous ``deliver``.

    Returns:
        What the operation returns.
    Raises:
        Whatever the operation raises (e.g. ``KernelError``).
    Concurrency:
        Synchronous; ``deliver`` must answer every node it was given.
    """
    try:
        effect = next(op)
        while True:
            effect = op.send(deliver(effect))
    except StopIteration as stop:
        return stop.value


def throw_sync(op: Generator[Deliver, Outcomes, T], exc: BaseException,
               deliver: Callable[[Deliver], Outcomes]) -> T:
    """Cancel ``op`` (suspended at a yield) by throwing ``exc`` into it, and
    drive what follows to the end with ``deliver``: the ends of the starts
    already sent, the operation's own cleanup (see the pairing contract in
    :mod:`broker.notifier`).

    Returns:
        What the operation returns if it absorbs ``exc`` (a partial GUP).
    Raises:
        ``exc`` (usually) or whatever the operation raises instead.
    """
    try:
        effect = op.throw(exc)
        while True:
            effect = op.send(deliver(effect))
    except StopIteration as stop:
        return stop.value


def no_nodes(effect: Deliver) -> Outcomes:
    """A ``deliver`` for a host with no secondary MMUs: every node is gone.

    Only valid when nothing is subscribed; it exists so model code can be run
    without any node at all (``run_sync(op, no_nodes)``).
    """
    return {node: None for node in effect.nodes}


def returns(value: Any) -> Op[Any]:
    """An operation that talks to nobody and returns ``value``."""
    return value
    yield  # pragma: no cover - makes this a generator
