"""Interval notifiers on the host (broker/interval.py) and in the notifier core.

The rules checked are mm/mmu_notifier.c's: the mm's ``invalidate_seq`` is odd
exactly while an active invalidation overlapped an interval, ``read_begin``
waits (None) while the interval's seq equals it, ``read_retry`` sees every
acknowledged invalidation, and a remove while the seq is odd completes after
the last end (deferred), with the interval still invalidated meanwhile.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker.effects import Deliver, run_sync
from broker.interval import INITIAL_SEQ, IntervalNotifiers
from broker.notifier import NotifierCore
from protocol.messages import Ack, InvalidateRangeEnd, InvalidateRangeStart
from protocol.types import Errno, KernelError, NotifyEvent, Range

PAGE = 4096
HMM_OPS = {"invalidate_range_start", "invalidate_range_end", "release"}
KVM_OPS = HMM_OPS | {"change_pte", "clear_flush_young", "clear_young", "test_young"}

spans = st.tuples(st.integers(0, 30), st.integers(1, 8)).map(lambda t: (t[0], t[0] + t[1]))


class IntervalMachine(RuleBasedStateMachine):
    """Random inserts, removes, starts, acks and ends on one mm, against a
    reference that says which intervals each open invalidation overlapped."""

    def __init__(self) -> None:
        super().__init__()
        self.t = IntervalNotifiers()
        self.live: dict[int, tuple[int, int]] = {}  # interval id -> span (removal not asked)
        self.open: dict[int, tuple[int, int, int]] = {}  # inv id -> (start, end, cur_seq)
        self.hit: dict[int, bool] = {}  # inv id -> overlapped an interval at its start
        self.next_inv = 1
        self.released: list[int] = []
        self.waiting: set[int] = set()  # removed, deferred, not yet released
        self.read: dict[int, int] = {}  # interval -> seq a reader got from read_begin

    @rule(span=spans)
    def insert(self, span):
        sub = self.t.insert("n", 1, *span)
        self.live[sub.id] = span
        if self.open:
            # inserted under an active range: its first read_begin waits
            assert self.t.read_begin(sub) is None
        else:
            assert self.t.read_begin(sub) == self.t.mms[1].invalidate_seq - 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def remove(self, data):
        interval = data.draw(st.sampled_from(sorted(self.live)))
        sub = self.t.by_id[interval]
        odd = self.t.mms[1].invalidating()
        was_in_tree = sub.in_tree
        done = self.t.remove(sub, lambda i=interval: self.released.append(i))
        del self.live[interval]
        self.read.pop(interval, None)
        assert done == (not odd or not was_in_tree)
        if not done:
            self.waiting.add(interval)
            # still in the tree: the invalidations under way still reach it
            assert sub.in_tree

    @rule(span=spans)
    def start(self, span):
        inv = self.next_inv
        self.next_inv += 1
        overl = any(s < span[1] and span[0] < e for i, (s, e) in self.live.items() if self.t.by_id[i].in_tree)
        deferred_in_tree = any(
            sub.in_tree and sub.overlaps(*span) for sub in self.t.mms.get(1, _Empty).deferred
        )
        cur = self.t.inv_start(1, inv, *span)
        self.open[inv] = (*span, cur)
        self.hit[inv] = overl or deferred_in_tree
        if self.hit[inv]:
            assert cur & 1

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def ack(self, data):
        inv = data.draw(st.sampled_from(sorted(self.open)))
        start, end, cur = self.open[inv]
        self.t.set_seq("n", 1, start, end, cur)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), twice=st.booleans())
    def end(self, data, twice):
        inv = data.draw(st.sampled_from(sorted(self.open)))
        del self.open[inv]
        before = self.t.mms[1].invalidate_seq
        self.t.inv_end(1, inv)
        if twice:
            self.t.inv_end(1, inv)  # idempotent
        if not self.open and before & 1:
            assert self.t.mms[1].invalidate_seq == before + 1
            # the deferred removes happened and their removers were woken, once each
            assert sorted(self.released) == sorted(set(self.released))
            assert self.waiting <= set(self.released)
            self.waiting.clear()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def read_begin(self, data):
        interval = data.draw(st.sampled_from(sorted(self.live)))
        sub = self.t.by_id[interval]
        seq = self.t.read_begin(sub)
        state = self.t.mms[1]
        assert (seq is None) == (sub.invalidate_seq == state.invalidate_seq)
        if seq is not None:
            self.read[interval] = seq

    @precondition(lambda self: self.read and self.open)
    @rule(data=st.data())
    def collide(self, data):
        # an acknowledged invalidation over a read interval: read_retry says so
        interval = data.draw(st.sampled_from(sorted(self.read)))
        inv = data.draw(st.sampled_from(sorted(self.open)))
        start, end, cur = self.open[inv]
        sub = self.t.by_id[interval]
        if not sub.overlaps(start, end) or not sub.in_tree or not cur & 1:
            return
        self.t.set_seq("n", 1, start, end, cur)
        if cur != self.read[interval]:
            assert self.t.read_retry(sub, self.read[interval])

    @invariant()
    def seq_parity(self):
        state = self.t.mms.get(1)
        if state is None:
            return
        assert state.active_invalidate_ranges == len(self.open)
        if not self.open:
            assert state.invalidate_seq % 2 == 0
            assert not state.deferred
        if any(self.hit.get(i) for i in self.open):
            assert state.invalidating()
        assert state.invalidate_seq >= INITIAL_SEQ

    @invariant()
    def tree_holds_live(self):
        state = self.t.mms.get(1)
        if state is None or state.invalidating():
            return
        in_tree = {sub.id for sub in state.tree}
        assert in_tree == set(self.live)


class _Empty:
    deferred: list = []


TestIntervalMachine = IntervalMachine.TestCase


# -- the notifier core with interval subscribers ------------------------------------


def recorder(answers=None):
    log: list[tuple[str, object]] = []

    def deliver(effect: Deliver):
        out = {}
        for node, msg in effect.sends:
            log.append((node, msg))
            out[node] = None if not effect.expect_ack else Ack(ref=msg.id, status=(answers or {}).get(node, "ok"))
        return out

    return log, deliver


def core_with_intervals():
    core = NotifierCore(PAGE)
    core.add_node("hmm0", HMM_OPS, False)
    core.add_node("kvm0", KVM_OPS, False)
    core.register("hmm0", 1)
    core.register("kvm0", 1)
    return core


def test_only_overlapping_intervals_are_invalidated_and_carry_their_seq():
    core = core_with_intervals()
    a = core.intervals.insert("hmm0", 1, 0x10000, 0x20000)
    b = core.intervals.insert("hmm0", 1, 0x40000, 0x50000)
    log, deliver = recorder()
    run_sync(core.invalidate_range(Range(1, 0x30000, 0x31000, NotifyEvent.UNMAP)), deliver)
    assert log == []  # no interval there, kvm0 was served nothing
    assert core.intervals.mms[1].invalidate_seq == INITIAL_SEQ  # not odd: no interval hit
    run_sync(core.invalidate_range(Range(1, 0x1f000, 0x41000, NotifyEvent.CLEAR)), deliver)
    starts = [m for _, m in log if isinstance(m, InvalidateRangeStart)]
    assert [n for n, m in log if isinstance(m, InvalidateRangeStart)] == ["hmm0"]
    cur = starts[0].seqs[0][1]
    assert cur & 1 and sorted(i for i, _ in starts[0].seqs) == [a.id, b.id]
    # acked: both intervals carry cur_seq; the end made the mm's seq even again
    assert a.invalidate_seq == b.invalidate_seq == cur
    assert core.intervals.mms[1].invalidate_seq == cur + 1
    assert core.intervals.read_begin(a) == cur
    assert [n for n, m in log if isinstance(m, InvalidateRangeEnd)] == ["hmm0"]


def test_whole_mm_subscribers_get_no_seqs():
    core = core_with_intervals()
    core.intervals.insert("hmm0", 1, 0, 1 << 40)
    core.note_served("kvm0", 1, 0x10000, 0x11000)
    log, deliver = recorder()
    run_sync(core.invalidate_range(Range(1, 0x10000, 0x11000, NotifyEvent.UNMAP)), deliver)
    starts = {n: m for n, m in log if isinstance(m, InvalidateRangeStart)}
    assert set(starts) == {"hmm0", "kvm0"}
    assert starts["kvm0"].seqs == [] and len(starts["hmm0"].seqs) == 1


def test_eagain_leaves_seq_unset_and_ends_the_itree_range():
    core = core_with_intervals()
    a = core.intervals.insert("hmm0", 1, 0, 1 << 40)
    first = a.invalidate_seq
    log, deliver = recorder({"hmm0": "EAGAIN"})
    try:
        run_sync(core.invalidate_range(Range(1, 0x1000, 0x2000, NotifyEvent.CLEAR, blockable=False)), deliver)
    except KernelError as exc:
        assert exc.errno is Errno.EAGAIN
    else:
        raise AssertionError("no EAGAIN")
    assert a.invalidate_seq == first  # the callback returned false before set_seq
    state = core.intervals.mms[1]
    assert state.active_invalidate_ranges == 0 and not state.invalidating()


def test_remove_during_invalidation_is_deferred_until_the_end():
    core = core_with_intervals()
    a = core.intervals.insert("hmm0", 1, 0, 1 << 40)
    released: list[str] = []
    log: list[tuple[str, object]] = []

    def deliver(effect: Deliver):
        out = {}
        for node, msg in effect.sends:
            log.append((node, msg))
            if isinstance(msg, InvalidateRangeStart):
                # the node removes its interval while the start is being delivered
                assert not core.intervals.remove(a, lambda: released.append("done"))
                assert core.intervals.overlaps("hmm0", 1, 0x1000, 0x2000)  # still in the tree
            out[node] = Ack(ref=msg.id) if effect.expect_ack else None
        return out

    run_sync(core.invalidate_range(Range(1, 0x1000, 0x2000, NotifyEvent.UNMAP)), deliver)
    assert released == ["done"]
    assert not core.intervals.overlaps("hmm0", 1, 0, 1 << 40)
    log.clear()
    run_sync(core.invalidate_range(Range(1, 0x1000, 0x2000, NotifyEvent.UNMAP)), deliver)
    assert log == []  # removed: nothing more is delivered


def test_change_pte_fallback_reaches_interval_subscribers_with_seq():
    core = core_with_intervals()
    a = core.intervals.insert("hmm0", 1, 0x10000, 0x20000)
    log, deliver = recorder()
    run_sync(core.change_pte(1, 0x10000, 7, False), deliver)
    starts = [m for n, m in log if isinstance(m, InvalidateRangeStart) and n == "hmm0"]
    assert len(starts) == 1 and starts[0].seqs == [[a.id, a.invalidate_seq]]
    assert not core.intervals.mms[1].invalidating()


def test_fence_and_unregister_drop_intervals():
    core = core_with_intervals()
    core.intervals.insert("hmm0", 1, 0, 0x1000)
    run_sync(core.unregister("hmm0", 1), recorder()[1])
    assert not core.intervals.has("hmm0", 1)
    core.register("hmm0", 1)
    core.intervals.insert("hmm0", 1, 0, 0x1000)
    core.fence("hmm0")
    assert not core.intervals.by_id


# -- through the host core (the in-process cluster runs it) ----------------------------


def test_interval_remove_during_an_open_invalidation_answers_after_its_end():
    # mmu_interval_notifier_remove while an invalidation of the interval is
    # active: deferred; the remover's Ok comes with the last end, and the
    # interval got the invalidation meanwhile
    from mmnotify.local import LocalCluster

    c = LocalCluster(frames=64, nodes=["hmm"])
    mm = c.spawn()
    addr = c.mmap(mm, 2)
    c.write(mm, addr, b"x")
    c.access("hmm", mm, addr, 8)
    sub = next(iter(c.notifier.intervals.by_id.values()))
    handle = c.begin(c.model.munmap(mm, addr, PAGE))
    c.pump()  # the start reached hmm and was acked; the operation is held
    state = c.notifier.intervals.mms[mm]
    assert state.invalidating()  # odd: the start is out (the host sets the seq as it takes the acks)
    token = c._start("hmm", lambda n: n.unsubscribe(mm))
    c.pump()
    assert c.result("hmm", token) is None  # deferred: the removal waits for the end
    assert sub.in_tree
    c.finish(handle)
    done = c.wait("hmm", token)
    assert done.ok and done.result == {"mm": mm, "subscribed": False}
    assert not sub.in_tree and not state.invalidating()
    # nothing more of the mm reaches the node's removed interval
    before = c.node("hmm").counters["invalidations"]
    c.munmap(mm, addr + PAGE, PAGE)
    assert c.node("hmm").counters["invalidations"] == before
    assert c.check() == 0


def test_a_reply_overtaken_by_a_start_is_retried_in_the_cluster():
    # hmm_range_fault served, then a start of the interval queued before the
    # reply reaches the node: the node takes the start first, its read_retry
    # sees the newer seq, and it faults again after the end (the race of
    # hmm.rst, with the real host core)
    from mmnotify.local import LocalCluster

    c = LocalCluster(frames=64, nodes=["hmm"])
    mm = c.spawn()
    addr = c.mmap(mm, 1)
    c.write(mm, addr, b"before")
    c.access("hmm", mm, addr, 1)  # interval inserted, page mirrored
    port = c.ports["hmm"]
    c.madvise(mm, addr, PAGE, "dontneed")  # the mirror goes; the page is none now
    token = c.submit_access("hmm", mm, addr, 6)
    # step the node (it sends hmm_range_fault) and the host (it serves the
    # reply) but keep the reply queued; then a write's invalidation follows it
    for _ in range(50):
        if any(m.TYPE == "hmm_range_fault_reply" for m in port.to_node):
            break
        c.step()
    assert any(m.TYPE == "hmm_range_fault_reply" for m in port.to_node)
    reply = next(m for m in port.to_node if m.TYPE == "hmm_range_fault_reply")
    port.to_node.remove(reply)
    handle = c.begin(c.model.madvise(mm, addr, PAGE, "dontneed"))
    port.to_node.append(reply)  # the start (queued by begin) now precedes the reply
    c.pump()
    stale = c.node("hmm").counters["stale_replies"]
    assert stale == 1
    c.finish(handle)
    done = c.wait("hmm", token)
    assert done.ok and done.result["data"] == bytes(6)  # after the DONTNEED: zeros, never "before"
    assert c.check() == 0
