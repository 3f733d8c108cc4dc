"""The mmu-notifier core: who must hear about what, and in which order.

Sans-I/O.  The primary-MMU model calls the generator methods below with
``yield from``; each yields :class:`broker.effects.Deliver` effects and reads
the per-node outcomes.  Whether a subscriber is an object in this process or
a node behind a socket is the driver's business.

Modelled on ``mm/mmu_notifier.c`` and ``include/linux/mmu_notifier.h``.

Subscribers ("nodes") implement an optional-hook table (``struct
mmu_notifier_ops``): only implemented callbacks are dispatched.  Per node and
mm the core remembers the address ranges the host has served to the node
(GUP); an invalidation is sent only to the nodes whose served ranges overlap
it ("broadcast to the nodes that hold mapped pages").

State of one invalidation, per addressed node::

    start sent --ack ok--------> started --(primary changes)--> end sent
        |                                                      ^
        +--ack EAGAIN (non-blockable, sleepable node)          |
        |     => start failed: every node that acked ok -------+  (compensation)
        |        gets its end now; the caller sees EAGAIN and retries later
        +--no ack by the deadline => node fenced by the driver; nothing more
           is sent to it, the invalidation proceeds without it

Served ranges shrink when a node acks a start (it zapped the range) and grow
when a GUP serves it pages.  They shrink only in the same synchronous step
that processes the acks, never across a later yield: a GUP served while the
compensating end (EAGAIN) or the end of a change_pte fallback is in flight is
kept.  A GUP served while a start is in flight is forgotten with the range
when the ack arrives: that is safe because GUP-fast serves nothing under an
open start (:attr:`NotifierCore.open`) and a reply served before the start was
sent is discarded by the node's own rule (kvm's ``mmu_invalidate_retry``,
gru's ``range_active``, xpmem's drain); the node faults again after the end,
which records the range again.  The DMA oracle would count any node that did not.

Pairing (the contract for drivers and operations)
-------------------------------------------------

Every start a node acknowledged gets exactly one end, on every exit path.  The
mechanism is :meth:`NotifierCore.invalidate_range` with a ``body``: start, the
body (which changes the primary ptes), end -- and the end is also sent when
the body raises (``KernelError`` such as ENOMEM, anything else) or when the
driver throws an exception into the generator.  Operations never pair start
and end by hand.  What the body did before it failed stays done (the kernel
leaves migrated pages migrated); the end follows it; then the error propagates.

A driver must either drive an operation to completion (``send`` the outcomes
of every Deliver until StopIteration or an exception) or ``throw`` an exception
(e.g. ``KernelError(EINTR)``) into it *and keep driving*: ``throw`` may
return further Deliver effects -- the ends of the starts already sent
(``expect_ack=False``), and whatever cleanup the operation does on a
``KernelError`` (fork releases its half-built child) -- which the driver
delivers like any others until the generator stops.  Usually it re-raises
the exception; an operation that tolerates a partial failure may return
normally instead (GUP returns the pages it already had).
:func:`broker.effects.throw_sync` is the synchronous form.  A node the driver
fences meanwhile is answered ``None`` as always: it gets no end (a fenced
node drops every translation and registers anew).  A start whose
acks are unknown when the throw arrives gets its end at every node it was
sent to (still alive); nodes ignore an end whose start they refused or never
opened, and the node channel is ordered, so the end never overtakes the start.

``close()`` (GeneratorExit, also what garbage collection of an abandoned
generator does) cannot yield, so it cannot send an end.  It never leaves
:attr:`NotifierCore.open` inconsistent: the invalidation leaves ``open`` and
its end is queued in :attr:`NotifierCore.orphaned_ends`; the driver must then
run :meth:`NotifierCore.end_orphans` (an operation whose deliveries are all
ends, ``expect_ack=False``, so it needs no ack wait) to deliver them, or the
nodes stay in their invalidation (kvm's ``mmu_invalidate_in_progress``).
:meth:`NotifierCore.quiescent` is False while any end is owed.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from protocol.messages import (
    Ack,
    ChangePte,
    ClearFlushYoung,
    ClearYoung,
    InvalidateRangeEnd,
    InvalidateRangeStart,
    Release,
    TestYoung,
)
from protocol.types import NOTIFIER_OPS, Errno, KernelError, NotifyEvent, Origin, Range

from .effects import Deliver, Op, Outcomes
from .interval import IntervalNotifiers

logger = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)


def _wire(value: E | str, kind: type[E]) -> str:
    """An enum field as the wire carries it (its value); a plain string must
    name a member (ValueError otherwise).  The member itself costs no lookup
    (``_value_``, the member's own attribute: ``.value`` is a Python-level
    enum property, a call per read)."""
    return value._value_ if type(value) is kind else kind(value)._value_


class IntervalSet:
    """A set of disjoint, sorted half-open intervals ``[start, end)``.

    Adjacent intervals merge.  ``add``/``remove`` cost O(log n + k) for k
    intervals touched (plus the list shift).
    """

    __slots__ = ("_starts", "_ends")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self):
        return iter(zip(self._starts, self._ends, strict=False))

    def __len__(self) -> int:
        return len(self._starts)

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=False))

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start) - 1
        if i >= 0 and self._ends[i] > start:
            return True
        j = i + 1
        return j < len(self._starts) and self._starts[j] < end

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        # first interval whose end >= start (touching merges), last whose start <= end
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def remove(self, start: int, end: int) -> None:
        if start >= end:
            return
        lo = bisect.bisect_right(self._ends, start)
        hi = bisect.bisect_left(self._starts, end)
        if lo >= hi:
            return
        keep_s: list[int] = []
        keep_e: list[int] = []
        if self._starts[lo] < start:
            keep_s.append(self._starts[lo])
            keep_e.append(start)
        if self._ends[hi - 1] > end:
            keep_s.append(end)
            keep_e.append(self._ends[hi - 1])
        self._starts[lo:hi] = keep_s
        self._ends[lo:hi] = keep_e


def check_ops(ops: frozenset[str] | set[str] | list[str], sleepable: bool) -> frozenset[str]:
    """Validate an optional-hook table; returns it as a frozenset.

    Raises:
        ValueError: unknown callback names, start without end (or the
            reverse), or a sleepable node without invalidate_range_start.
    """
    ops = frozenset(ops)
    unknown = ops - set(NOTIFIER_OPS)
    if unknown:
        raise ValueError(f"unknown notifier ops {sorted(unknown)}")
    if ("invalidate_range_start" in ops) != ("invalidate_range_end" in ops):
        raise ValueError("invalidate_range_start and invalidate_range_end go together")
    if sleepable and "invalidate_range_start" not in ops:
        raise ValueError("a sleepable node must implement invalidate_range_start")
    return ops


@dataclass(slots=True)
class NodeOps:
    """One registered subscriber: its callbacks and whether it may sleep."""

    name: str
    ops: frozenset[str]
    sleepable: bool
    generation: int


@dataclass(slots=True)
class Subscription:
    """``struct mmu_notifier`` of one node on one mm."""

    node: str
    mm: int
    served: IntervalSet = field(default_factory=IntervalSet)


@dataclass(frozen=True, slots=True)
class Invalidation:
    """An ``invalidate_range_start`` that succeeded: what its end must pair with.

    ``nodes`` are (name, generation) of the nodes that acknowledged the start;
    exactly they get the end (unless gone meanwhile).
    """

    range: Range
    id: int
    nodes: tuple[tuple[str, int], ...]


class NotifierCore:
    """Subscriptions and the ordering of notifier callbacks.

    Args:
        page_size: the host's page size (one-page invalidations).
        wrap_change_pte: the 3.7–6.9 mode: the model wraps ``set_pte_at_notify``
            in start/end(CLEAR); change_pte is then sent to the change_pte
            subscribers that the enclosing start addressed, which already zapped
            (that is why Linux 6.10 removed change_pte).
    Concurrency:
        Not thread-safe; the host calls it from one trio thread.  Generators of
        different mms may be interleaved; the host serialises mutating
        operations per mm.
    """

    def __init__(self, page_size: int = 4096, *, wrap_change_pte: bool = False) -> None:
        self.page_size = page_size
        self.wrap_change_pte = wrap_change_pte
        self.nodes: dict[str, NodeOps] = {}
        self.subscriptions: dict[int, dict[str, Subscription]] = {}
        self.tearing_down: set[int] = set()
        #: Invalidations between start and end, per mm (nesting is allowed).
        self.open: dict[int, list[Invalidation]] = {}
        #: Ends owed to nodes by operations closed mid-invalidation (see the
        #: module docstring); :meth:`end_orphans` delivers them.
        self.orphaned_ends: list[Invalidation] = []
        #: interval notifiers (broker/interval.py): the hmm kind's subscriptions
        self.intervals = IntervalNotifiers()
        self._ids = itertools.count(1)
        self._generations = itertools.count(1)
        self.counters: dict[str, int] = {
            "invalidate_range_start": 0,
            "invalidate_range_end": 0,
            "change_pte": 0,
            "change_pte_fallback": 0,
            "young": 0,
            "release": 0,
            "eagain": 0,
            "orphaned_ends": 0,
            "messages": 0,
        }

    # -- registration ----------------------------------------------------

    def new_id(self) -> int:
        """The id of a new host -> node callback.  One sequence for every
        callback a node acks (the notifier's and the host's own, such as
        ``XpmemRemoved``): a node keys its drains and answered acks by it."""
        return next(self._ids)

    def add_node(self, name: str, ops: frozenset[str] | set[str] | list[str], sleepable: bool) -> None:
        """Know a node and its callbacks (a new session replaces an old one).

        Raises:
            ValueError: unknown callback names, start without end (or the
                reverse), or a sleepable node without invalidate_range_start.
        """
        ops = check_ops(ops, sleepable)
        if name in self.nodes:
            self.remove_node(name)
        self.nodes[name] = NodeOps(name, ops, sleepable, next(self._generations))

    def remove_node(self, name: str) -> None:
        """Forget a node and all its subscriptions; nothing more is sent to it."""
        self.nodes.pop(name, None)
        for subs in self.subscriptions.values():
            subs.pop(name, None)
        self.intervals.forget_node(name)

    fence = remove_node

    def register(self, name: str, mm: int) -> None:
        """``mmu_notifier_register``: subscribe ``name`` to ``mm``.  Idempotent.

        Raises:
            KernelError(EINTR): the mm is being torn down.
            KernelError(ESRCH): the node is not known.
        """
        if name not in self.nodes:
            raise KernelError(Errno.ESRCH, f"node {name!r} is not registered")
        if mm in self.tearing_down:
            raise KernelError(Errno.EINTR, f"mm {mm} is being torn down")
        subs = self.subscriptions.setdefault(mm, {})
        subs.setdefault(name, Subscription(name, mm))

    def unregister(self, name: str, mm: int) -> Op[None]:
        """``mmu_notifier_unregister``: ``->release`` on the node (it drops
        everything of the mm, as mm/mmu_notifier.c does when the mm is still
        live), then nothing more is delivered.  Always succeeds."""
        subs = self.subscriptions.get(mm, {})
        node = self.nodes.get(name)
        if name in subs and node is not None and "release" in node.ops:
            del subs[name]
            yield self._deliver([(name, Release(id=next(self._ids), mm=mm))])
        subs.pop(name, None)
        self.intervals.forget_node_mm(name, mm)

    def forget_mm(self, mm: int) -> None:
        """The mm is gone (after exit): drop every trace of it, ends owed for
        it included (its subscribers got ``->release``, which drops
        everything of the mm, and nobody is subscribed to deliver them to)."""
        self.subscriptions.pop(mm, None)
        self.open.pop(mm, None)
        self.orphaned_ends = [inv for inv in self.orphaned_ends if inv.range.mm != mm]
        self.tearing_down.discard(mm)
        self.intervals.forget_mm(mm)

    def subscribed(self, mm: int) -> list[str]:
        return list(self.subscriptions.get(mm, {}))

    def has_subscribers(self, mm: int) -> bool:
        """Cheap hot-path check (``mm_has_notifiers``)."""
        return bool(self.subscriptions.get(mm))

    def note_served(self, name: str, mm: int, start: int, end: int) -> None:
        """A GUP served ``[start, end)`` of ``mm`` to ``name``."""
        sub = self.subscriptions.get(mm, {}).get(name)
        if sub is not None:
            sub.served.add(start, end)

    def served(self, name: str, mm: int) -> IntervalSet:
        sub = self.subscriptions.get(mm, {}).get(name)
        return sub.served if sub is not None else IntervalSet()

    # -- helpers -----------------------------------------------------------

    def _deliver(self, sends: list[tuple[str, object]], expect_ack: bool = True) -> Deliver:
        self.counters["messages"] += len(sends)
        return Deliver(tuple(sends), expect_ack)  # type: ignore[arg-type]

    def _holders(self, mm: int, start: int, end: int, op: str) -> list[tuple[Subscription, NodeOps]]:
        """Subscribers of ``mm`` implementing ``op`` whose served ranges (or
        interval notifiers) overlap, each with its node."""
        subs = self.subscriptions.get(mm)
        if not subs:
            return []
        nodes = self.nodes
        intervals = self.intervals if self.intervals.in_tree(mm) else None
        out = []
        for sub in subs.values():
            node = nodes.get(sub.node)
            if node is not None and op in node.ops and (
                sub.served.overlaps(start, end)
                or (intervals is not None and intervals.overlaps(sub.node, mm, start, end))
            ):
                out.append((sub, node))
        return out

    def _alive(self, name: str, generation: int) -> bool:
        node = self.nodes.get(name)
        return node is not None and node.generation == generation

    def _starts(self, msg: InvalidateRangeStart, names: list[str], cur_seq: int) -> list[tuple[str, object]]:
        """The start as each of ``names`` gets it: the one message, or a copy
        with the node's intervals' ``cur_seq`` for a node with interval
        notifiers over the range (an mm with none shares one message)."""
        if not self.intervals.in_tree(msg.mm):
            return [(name, msg) for name in names]
        out: list[tuple[str, object]] = []
        for name in names:
            seqs = self.intervals.seqs(name, msg.mm, msg.start, msg.end, cur_seq)
            out.append((name, replace(msg, seqs=seqs) if seqs else msg))
        return out

    # -- invalidation ------------------------------------------------------

    def quiescent(self, mm: int | None = None) -> bool:
        """No invalidation is open (for ``mm``, or for any mm) and no end is
        owed to a node.  Cheap: for drivers and tests between operations."""
        if self.orphaned_ends:
            return False
        if mm is None:
            return not any(self.open.values())
        return not self.open.get(mm)

    def _end_message(self, inv: Invalidation) -> InvalidateRangeEnd:
        rng = inv.range
        return InvalidateRangeEnd(id=next(self._ids), mm=rng.mm, start=rng.start, end=rng.end, start_id=inv.id)

    def _orphan(self, inv: Invalidation) -> None:
        """The operation was closed while ``inv``'s nodes await their end:
        take it out of ``open`` (GUP-fast would refuse its range forever) and
        owe the end (:meth:`end_orphans`)."""
        opened = self.open.get(inv.range.mm, [])
        if inv in opened:
            opened.remove(inv)
        if not inv.nodes:
            self.intervals.inv_end(inv.range.mm, inv.id)  # no end will come
        if inv.nodes:
            self.orphaned_ends.append(inv)
            self.counters["orphaned_ends"] += 1
            logger.error("operation closed between start and end of %s: end owed to %s",
                         inv.range, [name for name, _ in inv.nodes])

    def end_orphans(self) -> Op[int]:
        """Deliver the ends owed by operations that were closed mid-invalidation.

        Returns:
            The number of invalidations ended.
        """
        done = 0
        while self.orphaned_ends:
            inv = self.orphaned_ends.pop(0)
            yield from self.invalidate_range_end(inv)
            done += 1
        return done

    def invalidate_range_start(self, rng: Range) -> Op[Invalidation]:
        """``mmu_notifier_invalidate_range_start``.

        Sends the start, in parallel, to every node holding part of the range
        and returns once all have answered.  The caller may then change the
        primary ptes of the range and free their frames.  Prefer
        :meth:`invalidate_range` with a body: it pairs the end on every path.

        An exception thrown in while the start awaits its acks: every node the
        start was sent to (still alive) gets an end, then the exception
        propagates.  ``close()`` meanwhile: the same ends are owed
        (:attr:`orphaned_ends`).

        Raises:
            KernelError(EAGAIN): a sleepable node refused a non-blockable start;
                the nodes that had acked it already got their end (the
                compensation of ``mn_hlist_invalidate_range_start``), and the
                caller must leave the ptes alone and retry later.
        """
        holders = self._holders(rng.mm, rng.start, rng.end, "invalidate_range_start")
        start_id = next(self._ids)
        self.counters["invalidate_range_start"] += 1
        cur_seq = self.intervals.inv_start(rng.mm, start_id, rng.start, rng.end)
        if not holders:
            inv = Invalidation(rng, start_id, ())
            self.open.setdefault(rng.mm, []).append(inv)
            return inv
        # One message for every holder (built once per range; a holder with
        # interval notifiers gets a copy with its seqs).  The event and the
        # origin go on the wire as their values: a Range carries the enums.
        msg = InvalidateRangeStart(
            id=start_id,
            mm=rng.mm,
            start=rng.start,
            end=rng.end,
            event=_wire(rng.event, NotifyEvent),
            blockable=rng.blockable,
            owner=rng.owner,
            origin=_wire(rng.origin, Origin),
        )
        generations = {sub.node: node.generation for sub, node in holders}
        # Open from the moment the start is sent, not only once it is acked:
        # GUP-fast must not serve these pages meanwhile to a node the start
        # did not address (it held nothing here), which would never hear of
        # the zap that follows.
        sent = Invalidation(rng, start_id, tuple(generations.items()))
        self.open.setdefault(rng.mm, []).append(sent)
        try:
            outcomes: Outcomes = yield self._deliver(self._starts(msg, list(generations), cur_seq))
        except GeneratorExit:
            self._orphan(sent)
            raise
        except BaseException:
            # Thrown in by the driver: who acked is unknown.  Every node the
            # start reached expects its end; those that refused or never saw
            # the start ignore it.  Their served ranges stay (they may not
            # have zapped).
            opened = self.open.get(rng.mm, [])
            if sent in opened:
                opened.remove(sent)
            yield from self.invalidate_range_end(sent)
            raise
        opened = self.open.get(rng.mm, [])
        if sent in opened:
            opened.remove(sent)
        # The acks are processed now, in this step: the nodes that acked
        # zapped the range.  Nothing is served to them across a later yield
        # and then erased here (a GUP served while the compensating end below
        # is in flight must stay recorded, or the next munmap misses the node).
        # A node that kept its pinned translations (``Ack.kept``: xpmem and a
        # background origin) still holds the range.
        started: list[tuple[str, int]] = []
        refused: list[str] = []
        subs = self.subscriptions.get(rng.mm, {})
        intervals = self.intervals.in_tree(rng.mm)
        for name, ack in outcomes.items():
            if ack is None:
                continue
            if ack.status != "ok":
                refused.append(name)
                continue
            generation = generations.get(name)
            if generation is None or not self._alive(name, generation):
                continue
            started.append((name, generation))
            sub = subs.get(name)
            if sub is not None and not ack.kept:
                sub.served.remove(rng.start, rng.end)
            if intervals:
                self.intervals.set_seq(name, rng.mm, rng.start, rng.end, cur_seq)
        if refused:
            # mm/mmu_notifier.c mn_hlist_invalidate_range_start: "any that
            # succeeded start are expecting their end to be called.  Do so now."
            # The kernel calls every end and requires a failing subscriber to
            # have none; we know per node who succeeded and pair exactly those.
            self.counters["eagain"] += 1
            logger.info("invalidate_range_start %s refused (EAGAIN) by %s", rng, refused)
            if started:
                yield from self.invalidate_range_end(Invalidation(rng, start_id, tuple(started)))
            self.intervals.inv_end(rng.mm, start_id)  # mn_itree_invalidate's out_would_block
            raise KernelError(Errno.EAGAIN, f"{', '.join(refused)} cannot sleep for a non-blockable invalidation")
        # Every addressed node acked (the common case): the start sent is the
        # invalidation to end, the same nodes in the same order.
        nodes = tuple(started)
        inv = sent if nodes == sent.nodes else Invalidation(rng, start_id, nodes)
        self.open.setdefault(rng.mm, []).append(inv)
        return inv

    def invalidate_range_end(self, inv: Invalidation) -> Op[None]:
        """``mmu_notifier_invalidate_range_end``: exactly the nodes that acked
        the start, still alive and subscribed, get the end.  Never fails.

        The invalidation leaves ``open`` before the end is yielded (the ptes
        have changed: GUP-fast may serve the new ones).  Closed while the end
        is yielded: the end is owed again (a duplicate end is ignored by nodes,
        a missing one leaves them in their invalidation)."""
        opened = self.open.get(inv.range.mm, [])
        if inv in opened:
            opened.remove(inv)
        self.intervals.inv_end(inv.range.mm, inv.id)  # mn_itree_inv_end comes first, as in the kernel
        subs = self.subscriptions.get(inv.range.mm, {})
        nodes = self.nodes
        # alive (the generation that acked) and still subscribed
        targets = [name for name, gen in inv.nodes
                   if name in subs and (node := nodes.get(name)) is not None and node.generation == gen]
        self.counters["invalidate_range_end"] += 1
        if targets:
            end = self._end_message(inv)
            try:
                yield self._deliver([(name, end) for name in targets], expect_ack=False)
            except GeneratorExit:
                self._orphan(inv)
                raise

    def invalidate_range(self, rng: Range, body: Callable[[Invalidation], Any] | None = None) -> Op[Any]:
        """start, ``body``, end -- the end on every exit path.

        ``body(inv)`` runs after every addressed node acked the start; it
        changes the primary ptes and may return a value or be an operation
        (a generator, driven with ``yield from``).  Whatever happens in it --
        it returns, raises (ENOMEM, any ``KernelError``, any exception), or
        the driver throws into one of its deliveries -- the end is delivered
        after it, then its value is returned or its exception re-raised.
        ``close()`` mid-body: the end is owed (:meth:`end_orphans`).

        Without a body: start and end with nothing in between (the one-page
        invalidation of the change_pte fallback).

        Raises:
            KernelError(EAGAIN): from the start (nothing ran, the compensating
                end was sent); whatever ``body`` raises.
        """
        inv = yield from self.invalidate_range_start(rng)
        try:
            result = body(inv) if body is not None else None
            if result is not None and isinstance(result, Generator):  # (an ABC check: not for None)
                result = yield from result
        except GeneratorExit:
            self._orphan(inv)
            raise
        except BaseException:
            yield from self.invalidate_range_end(inv)
            raise
        yield from self.invalidate_range_end(inv)
        return result

    # -- change_pte (set_pte_at_notify) --------------------------------------

    def change_pte(self, mm: int, addr: int, pfn: int, writable: bool,
                   origin: Origin = Origin.OWNER) -> Op[None]:
        """The notifier half of ``set_pte_at_notify``; call it BEFORE setting
        the primary pte, as the macro does.  ``origin``: whose context calls
        it (KSM's: ksmd), carried by the ChangePte and the fallback start.

        Nodes implementing change_pte repoint or downgrade their entry in place
        (read-only only: a writable new pte is an invalidation for them, they
        must fault to get write access).  The others "will just receive the
        invalidate_page() callback" (mm/mmu_notifier.c, 2009): here a one-page
        start/end.  Returns after every addressed node has acknowledged.

        In the wrapped mode the enclosing start already zapped every holder;
        change_pte still goes to the change_pte subscribers it addressed (they
        find nothing to repoint), and nobody gets a fallback invalidation.
        """
        end = addr + self.page_size
        if self.wrap_change_pte:
            names: dict[str, int] = {}
            for inv in self.open.get(mm, []):
                if inv.range.overlaps(addr, end):
                    for name, gen in inv.nodes:
                        node = self.nodes.get(name)
                        if node is not None and node.generation == gen and "change_pte" in node.ops:
                            names[name] = gen
            if names:
                self.counters["change_pte"] += 1
                msg = ChangePte(id=next(self._ids), mm=mm, addr=addr, pfn=pfn, writable=writable,
                                origin=origin.value)
                yield self._deliver([(name, msg) for name in names])
            return
        holders = [
            s for s in self.subscriptions.get(mm, {}).values()
            if s.node in self.nodes and (s.served.overlaps(addr, end) or self.intervals.overlaps(s.node, mm, addr, end))
        ]
        if not holders:
            return
        repoint = [s for s in holders if "change_pte" in self.nodes[s.node].ops and not writable]
        fallback = [s for s in holders if s not in repoint and "invalidate_range_start" in self.nodes[s.node].ops]
        sends: list[tuple[str, object]] = []
        if repoint:
            self.counters["change_pte"] += 1
            msg = ChangePte(id=next(self._ids), mm=mm, addr=addr, pfn=pfn, writable=writable, origin=origin.value)
            sends += [(s.node, msg) for s in repoint]
        start_id = next(self._ids)
        cur_seq = 0
        if fallback:
            self.counters["change_pte_fallback"] += 1
            self.counters["invalidate_range_start"] += 1
            cur_seq = self.intervals.inv_start(mm, start_id, addr, end)
            start = InvalidateRangeStart(
                id=start_id, mm=mm, start=addr, end=end, event=NotifyEvent.CLEAR.value, blockable=True,
                origin=origin.value,
            )
            sends += self._starts(start, [s.node for s in fallback], cur_seq)
        if not sends:
            return
        generations = {name: self.nodes[name].generation for name, _ in sends}
        rng = Range(mm, addr, end, NotifyEvent.CLEAR, origin=origin)
        # the fallback's one-page start, for pairing its end on every path
        sent = Invalidation(rng, start_id, tuple((s.node, generations[s.node]) for s in fallback))
        try:
            outcomes: Outcomes = yield self._deliver(sends)
        except GeneratorExit:
            self._orphan(sent)
            raise
        except BaseException:
            yield from self.invalidate_range_end(sent)  # acks unknown: end to all it reached
            raise
        started = []
        for s in fallback:
            ack = outcomes.get(s.node)
            if ack is not None and ack.status == "ok" and self._alive(s.node, generations[s.node]):
                # removed now, with the acks: a GUP served while the end below
                # is in flight stays recorded (unless the node kept its pins)
                if not ack.kept:
                    s.served.remove(addr, end)
                self.intervals.set_seq(s.node, mm, addr, end, cur_seq)
                started.append((s.node, generations[s.node]))
        if started:
            yield from self.invalidate_range_end(Invalidation(rng, start_id, tuple(started)))
        else:
            self.intervals.inv_end(mm, start_id)

    # -- aging -----------------------------------------------------------------

    def _young(self, mm: int, start: int, end: int, op: str, cls: type) -> Op[bool]:
        holders = self._holders(mm, start, end, op)
        if not holders:
            return False
        self.counters["young"] += 1
        msg = cls(id=next(self._ids), mm=mm, start=start, end=end)
        outcomes: Outcomes = yield self._deliver([(sub.node, msg) for sub, _ in holders])
        # mm/mmu_notifier.c __mmu_notifier_clear_flush_young: young |= each.
        return any(ack is not None and ack.young for ack in outcomes.values())

    def clear_flush_young(self, mm: int, start: int, end: int) -> Op[bool]:
        return (yield from self._young(mm, start, end, "clear_flush_young", ClearFlushYoung))

    def clear_young(self, mm: int, start: int, end: int) -> Op[bool]:
        return (yield from self._young(mm, start, end, "clear_young", ClearYoung))

    def test_young(self, mm: int, start: int, end: int) -> Op[bool]:
        return (yield from self._young(mm, start, end, "test_young", TestYoung))

    # -- release -----------------------------------------------------------------

    def release(self, mm: int) -> Op[None]:
        """``__mmu_notifier_release`` from ``exit_mmap``: every subscriber's
        ``->release`` (whatever it holds), then the subscriptions are gone and
        register fails with EINTR until :meth:`forget_mm`.  Later callbacks for
        the mm address nobody, so they are harmless."""
        self.tearing_down.add(mm)
        subs = self.subscriptions.pop(mm, {})
        targets = [name for name in subs if name in self.nodes and "release" in self.nodes[name].ops]
        self.counters["release"] += 1
        if targets:
            yield self._deliver([(name, Release(id=next(self._ids), mm=mm)) for name in targets])


__all__ = ["Ack", "IntervalSet", "check_ops", "Invalidation", "NodeOps", "NotifierCore", "Subscription"]
