"""The notifier core: dispatch, pairing, compensation, change_pte, aging, release."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.effects import Deliver, run_sync
from broker.notifier import IntervalSet, NotifierCore
from protocol.messages import (
    Ack,
    ChangePte,
    ClearFlushYoung,
    InvalidateRangeEnd,
    InvalidateRangeStart,
    Release,
)
from protocol.types import Errno, KernelError, NotifyEvent, Range

PAGE = 4096
KVM_OPS = {
    "invalidate_range_start",
    "invalidate_range_end",
    "change_pte",
    "clear_flush_young",
    "clear_young",
    "test_young",
    "release",
}
GRU_OPS = {"invalidate_range_start", "invalidate_range_end", "release"}


# -- IntervalSet against a set of pages ------------------------------------------

ops_strategy = st.lists(
    st.tuples(st.booleans(), st.integers(0, 60), st.integers(1, 12)), max_size=40
)


@given(ops_strategy, st.integers(0, 70), st.integers(1, 10))
def test_interval_set_matches_reference(ops, qstart, qlen):
    iset = IntervalSet()
    ref: set[int] = set()
    for add, start, length in ops:
        if add:
            iset.add(start, start + length)
            ref |= set(range(start, start + length))
        else:
            iset.remove(start, start + length)
            ref -= set(range(start, start + length))
        pages = {p for s, e in iset for p in range(s, e)}
        assert pages == ref
        spans = list(iset)
        # disjoint, sorted, non-adjacent (merged)
        for (s1, e1), (s2, e2) in zip(spans, spans[1:], strict=False):
            assert e1 < s2
        assert iset.total() == len(ref)
    assert iset.overlaps(qstart, qstart + qlen) == bool(ref & set(range(qstart, qstart + qlen)))


# -- a recording deliver ---------------------------------------------------------


class Recorder:
    """Answers every Deliver like in-line nodes would, and records it."""

    def __init__(self, answers=None):
        self.log: list[tuple[str, object]] = []
        self.answers = answers or {}

    def __call__(self, effect: Deliver):
        out = {}
        for node, msg in effect.sends:
            self.log.append((node, msg))
            if not effect.expect_ack:
                out[node] = None
                continue
            answer = self.answers.get(node, "ok")
            out[node] = None if answer is None else Ack(ref=msg.id, status=answer, young=answer == "ok")
        return out


def core_with(*nodes, wrap=False):
    core = NotifierCore(PAGE, wrap_change_pte=wrap)
    for name, ops, sleepable in nodes:
        core.add_node(name, ops, sleepable)
        core.register(name, 1)
    return core


def test_add_node_rejects_contradictions():
    core = NotifierCore()
    with pytest.raises(ValueError):
        core.add_node("a", {"invalidate_range_start"}, False)
    with pytest.raises(ValueError):
        core.add_node("b", {"release"}, True)
    with pytest.raises(ValueError):
        core.add_node("c", {"bogus"}, False)


def test_start_goes_only_to_nodes_holding_the_range():
    core = core_with(("kvm", KVM_OPS, False), ("gru", GRU_OPS, False))
    core.note_served("kvm", 1, 0, 4 * PAGE)
    core.note_served("gru", 1, 8 * PAGE, 9 * PAGE)
    rec = Recorder()
    rng = Range(1, 0, 2 * PAGE, NotifyEvent.UNMAP)
    inv = run_sync(core.invalidate_range_start(rng), rec)
    assert [n for n, _ in rec.log] == ["kvm"]
    assert isinstance(rec.log[0][1], InvalidateRangeStart)
    assert inv.nodes[0][0] == "kvm"
    # kvm no longer holds [0, 2 pages)
    assert list(core.served("kvm", 1)) == [(2 * PAGE, 4 * PAGE)]
    run_sync(core.invalidate_range_end(inv), rec)
    assert isinstance(rec.log[-1][1], InvalidateRangeEnd)
    assert rec.log[-1][1].start_id == inv.id


def test_no_subscribers_sends_nothing():
    core = NotifierCore()
    gen = core.invalidate_range_start(Range(1, 0, PAGE, NotifyEvent.CLEAR))
    with pytest.raises(StopIteration):
        next(gen)


def test_eagain_compensates_with_end_to_those_that_started():
    core = core_with(("kvm", KVM_OPS, False), ("xpmem", GRU_OPS, True))
    for n in ("kvm", "xpmem"):
        core.note_served(n, 1, 0, PAGE)
    rec = Recorder({"xpmem": "EAGAIN"})
    with pytest.raises(KernelError) as err:
        run_sync(core.invalidate_range_start(Range(1, 0, PAGE, NotifyEvent.CLEAR, blockable=False)), rec)
    assert err.value.errno is Errno.EAGAIN
    ends = [(n, m) for n, m in rec.log if isinstance(m, InvalidateRangeEnd)]
    assert [n for n, _ in ends] == ["kvm"]
    # xpmem still holds its page: it changed nothing
    assert core.served("xpmem", 1).overlaps(0, PAGE)
    assert not core.served("kvm", 1).overlaps(0, PAGE)
    assert core.open.get(1, []) == []


def test_fenced_node_gets_no_end():
    core = core_with(("kvm", KVM_OPS, False), ("gru", GRU_OPS, False))
    for n in ("kvm", "gru"):
        core.note_served(n, 1, 0, PAGE)
    rec = Recorder()
    inv = run_sync(core.invalidate_range_start(Range(1, 0, PAGE, NotifyEvent.UNMAP)), rec)
    core.fence("gru")
    rec.log.clear()
    run_sync(core.invalidate_range_end(inv), rec)
    assert [n for n, _ in rec.log] == ["kvm"]


def test_node_gone_at_start_does_not_block():
    core = core_with(("kvm", KVM_OPS, False), ("gru", GRU_OPS, False))
    for n in ("kvm", "gru"):
        core.note_served(n, 1, 0, PAGE)
    rec = Recorder({"gru": None})
    inv = run_sync(core.invalidate_range_start(Range(1, 0, PAGE, NotifyEvent.UNMAP)), rec)
    assert [n for n, _ in inv.nodes] == ["kvm"]


def test_reregistered_node_does_not_get_old_end():
    core = core_with(("kvm", KVM_OPS, False))
    core.note_served("kvm", 1, 0, PAGE)
    rec = Recorder()
    inv = run_sync(core.invalidate_range_start(Range(1, 0, PAGE, NotifyEvent.UNMAP)), rec)
    core.fence("kvm")
    core.add_node("kvm", KVM_OPS, False)
    core.register("kvm", 1)
    rec.log.clear()
    run_sync(core.invalidate_range_end(inv), rec)
    assert rec.log == []


def test_change_pte_repoints_kvm_and_invalidates_gru():
    core = core_with(("kvm", KVM_OPS, False), ("gru", GRU_OPS, False))
    for n in ("kvm", "gru"):
        core.note_served(n, 1, 0, PAGE)
    rec = Recorder()
    run_sync(core.change_pte(1, 0, 77, writable=False), rec)
    kinds = [(n, type(m).__name__) for n, m in rec.log]
    assert kinds == [("kvm", "ChangePte"), ("gru", "InvalidateRangeStart"), ("gru", "InvalidateRangeEnd")]
    assert core.served("kvm", 1).overlaps(0, PAGE)
    assert not core.served("gru", 1).overlaps(0, PAGE)


def test_change_pte_writable_is_an_invalidation_for_everyone():
    core = core_with(("kvm", KVM_OPS, False))
    core.note_served("kvm", 1, 0, PAGE)
    rec = Recorder()
    run_sync(core.change_pte(1, 0, 77, writable=True), rec)
    assert [type(m) for _, m in rec.log] == [InvalidateRangeStart, InvalidateRangeEnd]


def test_wrapped_mode_sends_change_pte_to_what_start_already_zapped():
    core = core_with(("kvm", KVM_OPS, False), ("gru", GRU_OPS, False), wrap=True)
    for n in ("kvm", "gru"):
        core.note_served(n, 1, 0, PAGE)
    rec = Recorder()

    def wrapped():
        inv = yield from core.invalidate_range_start(Range(1, 0, PAGE, NotifyEvent.CLEAR))
        yield from core.change_pte(1, 0, 77, writable=False)
        yield from core.invalidate_range_end(inv)

    run_sync(wrapped(), rec)
    kinds = [(n, type(m).__name__) for n, m in rec.log]
    assert kinds.count(("kvm", "ChangePte")) == 1
    assert ("gru", "ChangePte") not in kinds
    assert kinds.count(("gru", "InvalidateRangeStart")) == 1


def test_young_is_ored():
    core = core_with(("kvm", KVM_OPS, False), ("kvm2", KVM_OPS, False))
    for n in ("kvm", "kvm2"):
        core.note_served(n, 1, 0, PAGE)

    def answer(effect):
        return {n: Ack(ref=m.id, young=(n == "kvm2")) for n, m in effect.sends}

    assert run_sync(core.clear_flush_young(1, 0, PAGE), answer) is True
    assert run_sync(core.clear_flush_young(1, PAGE, 2 * PAGE), answer) is False


def test_release_then_register_fails_eintr():
    core = core_with(("kvm", KVM_OPS, False), ("gru", GRU_OPS, False))
    rec = Recorder()
    run_sync(core.release(1), rec)
    assert sorted(n for n, m in rec.log if isinstance(m, Release)) == ["gru", "kvm"]
    with pytest.raises(KernelError) as err:
        core.register("kvm", 1)
    assert err.value.errno is Errno.EINTR
    # later callbacks are harmless: nobody is addressed
    gen = core.invalidate_range_start(Range(1, 0, PAGE, NotifyEvent.UNMAP))
    with pytest.raises(StopIteration):
        next(gen)
    core.forget_mm(1)
    core.register("kvm", 1)


def test_unregister_releases_and_then_nothing_is_delivered():
    core = core_with(("kvm", KVM_OPS, False))
    core.note_served("kvm", 1, 0, PAGE)
    rec = Recorder()
    run_sync(core.unregister("kvm", 1), rec)
    assert [type(m) for _, m in rec.log] == [Release]
    rec.log.clear()
    run_sync(core.change_pte(1, 0, 5, False), rec)
    run_sync(core.clear_flush_young(1, 0, PAGE), rec)
    assert rec.log == []


def test_nested_invalidations_are_counted():
    core = core_with(("kvm", KVM_OPS, False))
    core.note_served("kvm", 1, 0, 4 * PAGE)
    rec = Recorder()
    a = run_sync(core.invalidate_range_start(Range(1, 0, 2 * PAGE, NotifyEvent.CLEAR)), rec)
    core.note_served("kvm", 1, 0, 4 * PAGE)
    b = run_sync(core.invalidate_range_start(Range(1, PAGE, 3 * PAGE, NotifyEvent.CLEAR)), rec)
    assert len(core.open[1]) == 2
    run_sync(core.invalidate_range_end(a), rec)
    assert core.open[1] == [b]
    run_sync(core.invalidate_range_end(b), rec)
    assert core.open[1] == []


def test_change_pte_message_fields():
    core = core_with(("kvm", KVM_OPS, False))
    core.note_served("kvm", 1, 0, PAGE)
    rec = Recorder()
    run_sync(core.change_pte(1, 0, 9, writable=False), rec)
    (node, msg), = rec.log
    assert msg == ChangePte(id=msg.id, mm=1, addr=0, pfn=9, writable=False)
    assert not isinstance(msg, ClearFlushYoung)


# -- pairing on every exit path (NotifierCore.invalidate_range with a body) -----------


def test_served_ranges_shrink_with_the_acks_not_after_the_compensating_end():
    core = core_with(("kvm", KVM_OPS, False), ("xpmem", GRU_OPS, True))
    core.note_served("kvm", 1, 0, PAGE)
    core.note_served("xpmem", 1, 0, PAGE)
    gen = core.invalidate_range_start(Range(1, 0, PAGE, NotifyEvent.CLEAR, False))
    start = next(gen)
    sid = start.sends[0][1].id
    end = gen.send({"kvm": Ack(ref=sid), "xpmem": Ack(ref=sid, status="EAGAIN")})
    assert end.nodes == ("kvm",) and not end.expect_ack
    assert not core.served("kvm", 1)  # kvm zapped: forgotten with its ack
    core.note_served("kvm", 1, 0, PAGE)  # a GUP-fast while the end is in flight
    with pytest.raises(KernelError) as err:
        gen.send({"kvm": None})
    assert err.value.errno is Errno.EAGAIN
    assert core.served("kvm", 1).overlaps(0, PAGE)  # still known: the next start reaches kvm
    assert core.served("xpmem", 1).overlaps(0, PAGE)  # refused: it zapped nothing
    assert core.quiescent()


def test_page_served_while_a_change_pte_fallback_end_is_in_flight_is_kept():
    core = core_with(("gru", GRU_OPS, False))
    core.note_served("gru", 1, 0, PAGE)
    gen = core.change_pte(1, 0, 5, False)
    start = next(gen)
    end = gen.send({"gru": Ack(ref=start.sends[0][1].id)})
    assert isinstance(end.sends[0][1], InvalidateRangeEnd)
    core.note_served("gru", 1, 0, PAGE)  # served while the end is in flight
    with pytest.raises(StopIteration):
        gen.send({"gru": None})
    assert core.served("gru", 1).overlaps(0, PAGE)


def drive(gen, rec, throw_at=None, exc=None):
    """run_sync, throwing ``exc`` instead of answering delivery number ``throw_at``."""
    n = 0
    try:
        effect = next(gen)
        while True:
            n += 1
            if n == throw_at:
                rec(effect)
                effect = gen.throw(exc)
            else:
                effect = gen.send(rec(effect))
    except StopIteration as stop:
        return stop.value


def test_the_body_runs_between_start_and_end_and_its_value_is_returned():
    core = core_with(("kvm", KVM_OPS, False))
    core.note_served("kvm", 1, 0, PAGE)
    rec = Recorder()
    seen = []

    def body(inv):
        seen.append(([type(m).__name__ for _, m in rec.log], core.quiescent(1)))
        yield Deliver((("kvm", ClearFlushYoung(id=99, mm=1, start=0, end=PAGE)),))
        return "done"

    assert run_sync(core.invalidate_range(Range(1, 0, PAGE, NotifyEvent.UNMAP), body), rec) == "done"
    assert seen == [(["InvalidateRangeStart"], False)]
    assert [type(m).__name__ for _, m in rec.log] == ["InvalidateRangeStart", "ClearFlushYoung", "InvalidateRangeEnd"]
    assert run_sync(core.invalidate_range(Range(1, 0, PAGE, NotifyEvent.UNMAP), lambda inv: 7), rec) == 7
    assert core.quiescent()


@pytest.mark.parametrize("where", ["body raises", "thrown into the body", "thrown into the start"])
def test_the_end_follows_on_every_exit_path(where):
    core = core_with(("kvm", KVM_OPS, False), ("gru", GRU_OPS, False))
    core.note_served("kvm", 1, 0, PAGE)
    core.note_served("gru", 1, 0, PAGE)
    rec = Recorder()
    done = []

    def body(inv):
        done.append("before")
        if where == "body raises":
            raise KernelError(Errno.ENOMEM, "out of page frames")
        yield Deliver((("kvm", ClearFlushYoung(id=99, mm=1, start=0, end=PAGE)),))
        done.append("after")

    gen = core.invalidate_range(Range(1, 0, PAGE, NotifyEvent.MIGRATE), body)
    throw_at = {"body raises": None, "thrown into the body": 2, "thrown into the start": 1}[where]
    with pytest.raises(KernelError) as err:
        drive(gen, rec, throw_at, KernelError(Errno.EINTR, "cancelled"))
    assert err.value.errno is (Errno.ENOMEM if where == "body raises" else Errno.EINTR)
    starts = [m for _, m in rec.log if isinstance(m, InvalidateRangeStart)]
    ends = [(n, m) for n, m in rec.log if isinstance(m, InvalidateRangeEnd)]
    assert sorted(n for n, _ in ends) == ["gru", "kvm"] and all(m.start_id == starts[0].id for _, m in ends)
    assert done == ([] if where == "thrown into the start" else ["before"])
    assert core.quiescent()


def test_close_owes_the_end_and_never_leaves_it_open():
    core = core_with(("kvm", KVM_OPS, False))
    core.note_served("kvm", 1, 0, PAGE)
    rec = Recorder()

    def body(inv):
        yield Deliver((("kvm", ClearFlushYoung(id=99, mm=1, start=0, end=PAGE)),))

    gen = core.invalidate_range(Range(1, 0, PAGE, NotifyEvent.MIGRATE), body)
    gen.send(rec(next(gen)))  # started; the body's delivery is out
    gen.close()
    assert not core.open[1] and not core.quiescent() and core.counters["orphaned_ends"] == 1
    assert run_sync(core.end_orphans(), rec) == 1
    assert isinstance(rec.log[-1][1], InvalidateRangeEnd) and rec.log[-1][0] == "kvm"
    assert core.quiescent()
    # closed while the end itself was being delivered: owed again (nodes ignore a duplicate)
    gen = core.invalidate_range(Range(1, 0, PAGE, NotifyEvent.MIGRATE))
    core.note_served("kvm", 1, 0, PAGE)
    end = gen.send(rec(next(gen)))
    assert isinstance(end.sends[0][1], InvalidateRangeEnd)
    gen.close()
    assert [inv.nodes[0][0] for inv in core.orphaned_ends] == ["kvm"]
    run_sync(core.end_orphans(), rec)
    assert core.quiescent()


def test_ends_owed_for_an_mm_that_is_gone_are_dropped_with_it():
    core = core_with(("kvm", KVM_OPS, False))
    core.note_served("kvm", 1, 0, PAGE)
    gen = core.invalidate_range_start(Range(1, 0, PAGE, NotifyEvent.UNMAP))
    next(gen)
    gen.close()
    assert not core.quiescent()
    run_sync(core.release(1), Recorder())
    core.forget_mm(1)
    assert core.quiescent() and core.orphaned_ends == []
