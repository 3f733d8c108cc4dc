"""A secondary MMU's fault, as a state machine: its states, its events, one table.

Rule 1 (after h11's ``h11/_state.py``): every transition a fault can make is
in :data:`TRANSITIONS`, here and nowhere else.  ``node.base`` decides which
event happened (the kind's ``read_begin`` / ``read_retry`` answer, a reply
arrived, the session was dropped), fires it, and acts on the state it gets
back; an event the table has no rule for raises :class:`FaultStateError`.

A fault is one ``get_user_pages`` the node needs.  Beginning it (or beginning
it again) is one of three events, the read side of mm/mmu_notifier.c
(``mmu_interval_read_begin``) and of KVM (``mmu_invalidate_seq``,
``mmu_invalidate_retry_gfn``)::

    begin:  mm not subscribed           SUBSCRIBE  ─▶ SUBSCRIBING  (until the Subscribe's Ok)
            read_begin() is None        PARK       ─▶ PARKED       (until an end wakes it)
            read_begin() gave a seq     SEND_GUP   ─▶ GUP_SENT     (the Gup is on the wire)

    reply:  REPLY, then read_retry(seq)?
              yes                       STALE      ─▶ RETRYING     ─▶ begin again,
                                                                      or FAIL (EAGAIN: too many)
              no, pages to install      INSTALL    ─▶ DONE
              an error, no pages        FAIL       ─▶ FAILED

    drop_all (the session is over)      DROP       ─▶ FAILED       (from any live state)

A reply may still come for a fault a drop already failed (it was on the wire
when the session ended): ``FAILED --REPLY--> FAILED`` is the rule that
absorbs it -- the host retired that session's pins, so nothing is unpinned
and nothing completes twice.  ``DONE`` takes no event at all.

Concurrency: none; the owner of the node drives it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class FaultState(enum.Enum):
    """Where a fault is (see the module's table)."""

    NEW = "new"
    SUBSCRIBING = "subscribing"
    PARKED = "parked"
    GUP_SENT = "gup_sent"
    RETRYING = "retrying"
    DONE = "done"
    FAILED = "failed"

    # Members are singletons that compare by identity: hash them by identity
    # too (in C), not through Enum.__hash__, a Python call per table lookup.
    __hash__ = object.__hash__


class FaultEvent(enum.Enum):
    """What happens to a fault (see the module's table)."""

    SUBSCRIBE = "subscribe"
    PARK = "park"
    SEND_GUP = "send_gup"
    REPLY = "reply"
    STALE = "stale"
    INSTALL = "install"
    FAIL = "fail"
    DROP = "drop"

    __hash__ = object.__hash__  # as FaultState's


S, E = FaultState, FaultEvent

#: How a fault begins: from NEW, after its Subscribe's Ok, when an end wakes
#: it, and after a stale reply.
_BEGIN = {E.SUBSCRIBE: S.SUBSCRIBING, E.PARK: S.PARKED, E.SEND_GUP: S.GUP_SENT}

#: state -> event -> next state.  The only place a fault's state changes.
TRANSITIONS: dict[FaultState, dict[FaultEvent, FaultState]] = {
    S.NEW: {**_BEGIN, E.FAIL: S.FAILED},
    # The mm is subscribed once the Ok arrives: begin again parks or sends.
    S.SUBSCRIBING: {E.PARK: S.PARKED, E.SEND_GUP: S.GUP_SENT, E.FAIL: S.FAILED, E.DROP: S.FAILED},
    # Woken by an end; a release meanwhile may have ended the subscription.
    S.PARKED: {**_BEGIN, E.DROP: S.FAILED},
    # REPLY: the reply is in and about to be judged by read_retry.
    S.GUP_SENT: {E.REPLY: S.GUP_SENT, E.STALE: S.RETRYING, E.INSTALL: S.DONE, E.FAIL: S.FAILED,
                 E.DROP: S.FAILED},
    S.RETRYING: {**_BEGIN, E.FAIL: S.FAILED},
    S.DONE: {},
    # The reply of a fault failed by a drop: absorbed.
    S.FAILED: {E.REPLY: S.FAILED},
}

#: States a fault waits in (held by the node until an event moves it).
LIVE = frozenset({S.SUBSCRIBING, S.PARKED, S.GUP_SENT})

del S, E


class FaultStateError(RuntimeError):
    """An event the transition table has no rule for: a bug in the node, not
    a message from a peer (every message from the host maps to a rule)."""

    def __init__(self, state: FaultState, event: FaultEvent) -> None:
        self.state = state
        self.event = event
        super().__init__(f"a fault in state {state.name} cannot take {event.name}")


@dataclass(eq=False, slots=True)
class Fault:
    """One ``get_user_pages`` a node needs: ``npages`` pages of ``mm`` from ``addr``.

    ``mm``/``addr`` are in the address space GUP walks (for xpmem: the
    exporter's).  ``seq`` is what the kind's ``read_begin`` returned when the
    Gup was sent, for ``read_retry``; ``context`` is kind data (xpmem: the
    attachment).  The fault serves either the ``fault`` command of ``token``
    or the page access ``access``.
    """

    mm: int
    addr: int
    npages: int
    write: bool
    pin: bool = False
    context: Any = None
    token: int = 0
    access: Any = None  # node.base's access record, when the fault serves one
    retries: int = 0
    seq: int = 0
    request: int = 0
    state: FaultState = FaultState.NEW

    def fire(self, event: FaultEvent) -> FaultState:
        """Take ``event``: move to the state the table gives and return it.

        Raises:
            FaultStateError: the table has no rule for ``event`` in this state.
        """
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise FaultStateError(self.state, event) from None
        return self.state
