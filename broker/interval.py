"""Interval notifiers on the host: ``struct mmu_interval_notifier`` and the
interval-tree half of ``struct mmu_notifier_subscriptions``.

Modelled on mm/mmu_notifier.c (5.5+: ``mn_itree_inv_start_range``,
``mn_itree_inv_end``, ``__mmu_interval_notifier_insert``,
``mmu_interval_notifier_remove``, ``mmu_interval_read_begin``) and
include/linux/mmu_notifier.h (``mmu_interval_set_seq``,
``mmu_interval_read_retry``).  Sans-I/O, no trio: :class:`broker.notifier.
NotifierCore` owns one :class:`IntervalNotifiers` and calls it from the
start and the end of every invalidation.

The collision-retry "lock" of one mm, as the kernel's comment above
``mmu_interval_read_begin`` tells it (``invalidate_seq`` starts at 2)::

    state                    active_invalidate_ranges   invalidate_seq   the tree
    idle                     0                          even             may change
    partially excluded       > 0                        even             may change
    fully excluded           > 0                        odd              frozen: inserts and
                                                                         removes are deferred

    start of a range   active++; if it overlaps an interval: seq |= 1 (odd)
    end of a range     active--; the last end of an odd seq: seq++ (even), then the
                       deferred inserts/removes happen and the removers waiting are woken

Per interval, ``invalidate_seq`` is what the subscriber set with
``mmu_interval_set_seq(cur_seq)`` in its invalidate callback: here the host
sets it when the node acknowledges a start that carried ``cur_seq`` (the node
sets its own copy at the same moment, so both sides agree on it).  A reader::

    seq = read_begin(interval)          None while seq == mm's odd seq (the kernel sleeps)
    ... read the ptes, send them ...
    node: read_retry(seq)               interval.invalidate_seq != seq -> discard, again

An interval inserted while nothing is active starts at ``seq - 1`` (odd, never
equal to the mm's): its first read_begin does not wait.  One inserted while a
range is active makes the mm's seq odd (partially excluded) or waits on the
deferred list (fully excluded): its first read_begin waits for the end.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

#: ``mmu_notifier_subscriptions.invalidate_seq`` of a new mm (mm/mmu_notifier.c: 2).
INITIAL_SEQ = 2


@dataclass(eq=False, slots=True)
class IntervalNotifier:
    """``struct mmu_interval_notifier`` of node ``node`` on ``[start, end)`` of ``mm``.

    ``in_tree`` is False while an insert waits on the deferred list
    (``RB_EMPTY_NODE``); ``removed`` once a remove was asked for.
    """

    id: int
    node: str
    mm: int
    start: int
    end: int
    invalidate_seq: int
    in_tree: bool = False
    removed: bool = False

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and start < self.end


@dataclass(eq=False, slots=True)
class MmIntervals:
    """The interval half of ``struct mmu_notifier_subscriptions`` of one mm.

    The tree is a list sorted by start (a stand-in for the kernel's
    ``rb_root_cached`` interval tree: the lookups are the same, the cost is
    O(n) in the worst case, fine for a model).
    """

    invalidate_seq: int = INITIAL_SEQ
    active_invalidate_ranges: int = 0
    tree: list[IntervalNotifier] = field(default_factory=list)
    starts: list[tuple[int, int]] = field(default_factory=list)  # (start, id), parallel to tree
    deferred: list[IntervalNotifier] = field(default_factory=list)
    #: remove callbacks waiting for the seq to move past the one they saw
    waiters: list[tuple[int, Callable[[], None]]] = field(default_factory=list)
    #: ids of the invalidations counted in active_invalidate_ranges
    active: set[int] = field(default_factory=set)

    def invalidating(self) -> bool:
        """``mn_itree_is_invalidating``: the seq is odd."""
        return bool(self.invalidate_seq & 1)

    def tree_insert(self, sub: IntervalNotifier) -> None:
        key = (sub.start, sub.id)
        i = bisect.bisect_left(self.starts, key)
        self.starts.insert(i, key)
        self.tree.insert(i, sub)
        sub.in_tree = True

    def tree_remove(self, sub: IntervalNotifier) -> None:
        i = bisect.bisect_left(self.starts, (sub.start, sub.id))
        if i < len(self.tree) and self.tree[i] is sub:
            del self.starts[i]
            del self.tree[i]
        sub.in_tree = False

    def overlapping(self, start: int, end: int) -> list[IntervalNotifier]:
        """``interval_tree_iter_first/next`` over ``[start, end)``."""
        hi = bisect.bisect_left(self.starts, (end, -1))
        return [sub for sub in self.tree[:hi] if sub.end > start]


class IntervalNotifiers:
    """Every interval notifier of the host, per mm.

    Concurrency: synchronous, called from the notifier core only.
    """

    def __init__(self) -> None:
        self.by_id: dict[int, IntervalNotifier] = {}
        self.mms: dict[int, MmIntervals] = {}
        self._ids = itertools.count(1)
        self.counters: dict[str, int] = {"inserted": 0, "removed": 0, "deferred": 0, "invalidated": 0}

    def _mm(self, mm: int) -> MmIntervals:
        state = self.mms.get(mm)
        if state is None:
            state = self.mms[mm] = MmIntervals()
        return state

    # -- insert / remove ------------------------------------------------------

    def insert(self, node: str, mm: int, start: int, end: int) -> IntervalNotifier:
        """``__mmu_interval_notifier_insert``.

        Raises:
            ValueError: an empty or inverted interval.
        """
        if not 0 <= start < end:
            raise ValueError(f"empty interval [{start:#x}, {end:#x})")
        state = self._mm(mm)
        sub = IntervalNotifier(next(self._ids), node, mm, start, end, 0)
        if state.active_invalidate_ranges:
            if state.invalidating():
                state.deferred.append(sub)  # enters the tree at the last end
                self.counters["deferred"] += 1
            else:
                state.invalidate_seq |= 1
                state.tree_insert(sub)
            sub.invalidate_seq = state.invalidate_seq
        else:
            # "The starting seq for a subscription not under invalidation
            # should be odd, not equal to the current invalidate_seq"
            sub.invalidate_seq = state.invalidate_seq - 1
            state.tree_insert(sub)
        self.by_id[sub.id] = sub
        self.counters["inserted"] += 1
        return sub

    def get(self, interval: int, node: str, mm: int) -> IntervalNotifier | None:
        """Interval ``interval`` if ``node`` owns it on ``mm`` and it is not removed."""
        sub = self.by_id.get(interval)
        if sub is None or sub.node != node or sub.mm != mm or sub.removed:
            return None
        return sub

    def remove(self, sub: IntervalNotifier, released: Callable[[], None] | None = None) -> bool:
        """``mmu_interval_notifier_remove``.

        Returns:
            True when done now; False when deferred: the interval stays in the
            tree (it still gets the invalidations under way) until the last
            end of the odd seq, which then calls ``released``.
        """
        state = self._mm(sub.mm)
        sub.removed = True
        self.by_id.pop(sub.id, None)
        self.counters["removed"] += 1
        if state.invalidating():
            if not sub.in_tree:  # its insert is still deferred: drop it there
                state.deferred = [d for d in state.deferred if d is not sub]
                return True
            state.deferred.append(sub)
            self.counters["deferred"] += 1
            if released is not None:
                state.waiters.append((state.invalidate_seq, released))
            return False
        state.tree_remove(sub)
        return True

    def _drop(self, subs: list[IntervalNotifier]) -> None:
        """Remove at once, nobody waits (the node was fenced, the mm is gone)."""
        for sub in subs:
            state = self._mm(sub.mm)
            sub.removed = True
            self.by_id.pop(sub.id, None)
            state.tree_remove(sub)
            state.deferred = [d for d in state.deferred if d is not sub]

    def forget_node(self, node: str) -> None:
        self._drop([s for s in self.by_id.values() if s.node == node])

    def forget_node_mm(self, node: str, mm: int) -> None:
        self._drop([s for s in self.by_id.values() if s.node == node and s.mm == mm])

    def forget_mm(self, mm: int) -> None:
        state = self.mms.pop(mm, None)
        for sub in [s for s in self.by_id.values() if s.mm == mm]:
            del self.by_id[sub.id]
        if state is not None:
            for _seq, released in state.waiters:
                released()

    # -- queries ---------------------------------------------------------------

    def in_tree(self, mm: int) -> bool:
        """``mm`` has an interval notifier in its tree (cheap: an mm of
        whole-mm subscribers only has none, and its starts carry no seqs)."""
        state = self.mms.get(mm)
        return state is not None and bool(state.tree)

    def has(self, node: str, mm: int) -> bool:
        state = self.mms.get(mm)
        return state is not None and any(sub.node == node for sub in state.tree)

    def overlaps(self, node: str, mm: int, start: int, end: int) -> bool:
        """Does an interval of ``node`` in the tree of ``mm`` overlap ``[start, end)``?"""
        state = self.mms.get(mm)
        if state is None or not state.tree:  # the hot path of every whole-mm subscriber
            return False
        return any(sub.node == node for sub in state.overlapping(start, end))

    def of(self, node: str, mm: int, start: int, end: int) -> list[IntervalNotifier]:
        state = self.mms.get(mm)
        if state is None or not state.tree:
            return []
        return [s for s in state.overlapping(start, end) if s.node == node]

    def seqs(self, node: str, mm: int, start: int, end: int, cur_seq: int) -> list[list[int]]:
        """What a start to ``node`` carries: ``[interval, cur_seq]`` per overlap."""
        return [[sub.id, cur_seq] for sub in self.of(node, mm, start, end)]

    # -- the invalidation side ----------------------------------------------------

    def inv_start(self, mm: int, inv_id: int, start: int, end: int) -> int:
        """``mn_itree_inv_start_range``: count the range active; odd seq if it
        overlaps an interval.  Returns ``cur_seq``."""
        state = self._mm(mm)
        state.active_invalidate_ranges += 1
        state.active.add(inv_id)
        if state.tree and state.overlapping(start, end):
            state.invalidate_seq |= 1
            self.counters["invalidated"] += 1
        return state.invalidate_seq

    def set_seq(self, node: str, mm: int, start: int, end: int, cur_seq: int) -> None:
        """``mmu_interval_set_seq`` of ``node``'s intervals the range overlaps
        (its invalidate callback returned true: it acknowledged)."""
        for sub in self.of(node, mm, start, end):
            sub.invalidate_seq = cur_seq

    def inv_end(self, mm: int, inv_id: int) -> None:
        """``mn_itree_inv_end``.  Idempotent per invalidation id (the model
        may end an invalidation on several paths; only the first counts)."""
        state = self.mms.get(mm)
        if state is None or inv_id not in state.active:
            return
        state.active.discard(inv_id)
        state.active_invalidate_ranges -= 1
        if state.active_invalidate_ranges or not state.invalidating():
            return
        state.invalidate_seq += 1  # even: readers may go on
        # "The inv_end incorporates a deferred mechanism like rtnl_unlock()."
        deferred, state.deferred = state.deferred, []
        for sub in deferred:
            if sub.in_tree:
                state.tree_remove(sub)
            elif not sub.removed:
                state.tree_insert(sub)
        waiters, state.waiters = state.waiters, []
        for _seq, released in waiters:
            released()

    # -- the read side -------------------------------------------------------------

    def read_begin(self, sub: IntervalNotifier) -> int | None:
        """``mmu_interval_read_begin``: the interval's seq, or None while an
        invalidation of it is active (the kernel sleeps until the end)."""
        state = self._mm(sub.mm)
        seq = sub.invalidate_seq
        if seq == state.invalidate_seq:
            return None
        return seq

    @staticmethod
    def read_retry(sub: IntervalNotifier, seq: int) -> bool:
        """``mmu_interval_read_retry``."""
        return sub.invalidate_seq != seq

    def describe(self, mm: int | None = None) -> dict[str, object]:
        """For ``mmn status``: per mm (``mm`` alone, or the first 16), its
        seq, active ranges and first 16 intervals."""
        out: dict[str, object] = {}
        shown = [(mm, self.mms[mm])] if mm in self.mms else [] if mm is not None else sorted(self.mms.items())[:16]
        for m, state in shown:
            out[str(m)] = {
                "invalidate_seq": state.invalidate_seq,
                "active_invalidate_ranges": state.active_invalidate_ranges,
                "intervals": [[s.id, s.node, hex(s.start), hex(s.end), s.invalidate_seq] for s in state.tree[:16]],
                "intervals_total": len(state.tree),
                "deferred": len(state.deferred),
            }
        return out
