"""The three secondary MMUs, driven with protocol messages directly (no host).

Each test plays the host by hand: it feeds the node notifier callbacks and
replies, and checks the exact messages and completions that come back.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from node.base import Completion, SecondaryMMU, zap_range
from node.fault import TRANSITIONS, Fault, FaultEvent, FaultState, FaultStateError
from node.gru import GruMMU
from node.kinds import node_class
from node.kvm import KvmMMU, Spte
from node.xpmem import XpmemMMU
from protocol import messages  # messages.TestYoung: not a test class for pytest
from protocol.messages import (
    Ack,
    ChangePte,
    ClearFlushYoung,
    ClearYoung,
    DmaRead,
    DmaReply,
    DmaWrite,
    Error,
    Fenced,
    Gup,
    GupReply,
    InvalidateRangeEnd,
    InvalidateRangeStart,
    Message,
    Ok,
    Registered,
    Release,
    Subscribe,
    Unpin,
    XpmemGet,
    XpmemMake,
    XpmemRelease,
    XpmemRemoved,
    XpmemReply,
)
from protocol.types import NOTIFIER_OPS, Errno

PAGE = 4096
MM = 1
BASE = 0x10_0000
EPOCH = 7


# -- helpers ---------------------------------------------------------------------


def page(i: int) -> int:
    return BASE + i * PAGE


def registered(node: SecondaryMMU, epoch: int = EPOCH) -> SecondaryMMU:
    hello = Registered(
        ref=0, epoch=epoch, host_incarnation="h", heartbeat_ms=1000, ack_deadline_ms=1000, page_size=PAGE
    )
    assert node.receive(hello) == []
    return node


def only(outputs: list[Any], cls: type) -> Any:
    (item,) = [o for o in outputs if isinstance(o, cls)]
    return item


def subscribed(node: SecondaryMMU, outputs: list[Any]) -> list[Any]:
    """Answer the Subscribe among ``outputs`` with Ok; returns what follows."""
    sub = only(outputs, Subscribe)
    assert sub == Subscribe(id=sub.id, epoch=node.epoch, mm=sub.mm)
    return node.receive(Ok(ref=sub.id))


def start(node: SecondaryMMU, id: int, first: int, npages: int, *, mm: int = MM, blockable: bool = True,
          origin: str = "owner") -> list:
    return node.receive(
        InvalidateRangeStart(
            id=id, mm=mm, start=page(first), end=page(first + npages), event="CLEAR", blockable=blockable,
            origin=origin,
        )
    )


def end(node: SecondaryMMU, id: int, first: int, npages: int, *, mm: int = MM) -> list[Any]:
    return node.receive(
        InvalidateRangeEnd(id=id + 1000, mm=mm, start=page(first), end=page(first + npages), start_id=id)
    )


def faulted(node: SecondaryMMU, first: int, pfns: list[int], *, write: bool = False) -> None:
    """Fault pages ``first..`` of MM in, answering the host's side."""
    token, out = node.fault(MM, page(first), len(pfns), write=write)
    if any(isinstance(o, Subscribe) for o in out):
        out = subscribed(node, out)
    gup = only(out, Gup)
    pages = [[page(first + i), p, True] for i, p in enumerate(pfns)]
    out = node.receive(GupReply(ref=gup.id, mm=MM, pages=pages))
    assert only(out, Completion).ok


# -- the kinds' tables -----------------------------------------------------------


def test_kinds_declare_their_ops():
    assert KvmMMU.ops == frozenset(NOTIFIER_OPS)
    assert GruMMU.ops == XpmemMMU.ops == {"invalidate_range_start", "invalidate_range_end", "release"}
    assert (KvmMMU.sleepable, GruMMU.sleepable, XpmemMMU.sleepable) == (False, False, True)
    assert node_class("gru") is GruMMU
    reg = KvmMMU("k").make_register("inc-1")
    assert (reg.name, reg.kind, reg.ops, reg.sleepable) == ("k", "kvm", sorted(NOTIFIER_OPS), False)


def test_a_kinds_ops_are_the_callbacks_it_overrides():
    """``ops`` is derived when the class is created: one source of truth (the
    methods), and a start without an end is refused there and then."""

    class Ager(GruMMU):
        def test_young(self, msg):  # type: ignore[no-untyped-def]
            return [self._ack(msg.id, young=True)]

    assert Ager.ops == GruMMU.ops | {"test_young"}
    assert Ager("a").make_register("i").ops == sorted(Ager.ops)
    with pytest.raises(TypeError, match="go together"):

        class StartOnly(SecondaryMMU):
            def invalidate_range_start(self, state, msg):  # type: ignore[no-untyped-def]
                return []


# -- the fault's state machine ---------------------------------------------------


def test_a_fault_walks_the_table_subscribing_parked_gup_sent_retrying_done():
    """One fault through every waiting state, as node/fault.py's table says."""
    kvm = registered(KvmMMU("k"))
    token, out = kvm.fault(MM, page(0))
    (fault,) = kvm.mm_state(MM).subscribing
    assert fault.state is FaultState.SUBSCRIBING
    assert start(kvm, 1, 0, 1)  # acked while the Subscribe is in flight
    assert subscribed(kvm, out) == []
    assert fault.state is FaultState.PARKED and kvm.mm_state(MM).parked == [fault]
    gup = only(end(kvm, 1, 0, 1), Gup)
    assert fault.state is FaultState.GUP_SENT and fault.seq == kvm.mm_state(MM).mmu_invalidate_seq
    start(kvm, 2, 5, 1)
    end(kvm, 2, 5, 1)  # elsewhere, but the seq moved: read_retry says stale
    again = only(kvm.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 40, 0]])), Gup)
    assert fault.state is FaultState.GUP_SENT and fault.retries == 1  # RETRYING, then begun again
    done = only(kvm.receive(GupReply(ref=again.id, mm=MM, pages=[[page(0), 41, 0]])), Completion)
    assert done.token == token and done.ok and fault.state is FaultState.DONE


def test_the_gup_reply_of_a_fault_a_drop_failed_is_a_rule_of_the_table():
    """FAILED --REPLY--> FAILED: the reply on the wire when the session ended
    is absorbed (no install, no Unpin, no second completion)."""
    xp, vaddr = xpmem_attached()
    _, out = xp.fault(0, vaddr)
    gup = only(subscribed(xp, out), Gup)
    (fault,) = xp.faults()
    assert fault.request == gup.id and fault.pin
    failed = only(xp.receive(Fenced(epoch=EPOCH, reason="test")), Completion)
    assert failed.error.errno is Errno.EINTR and fault.state is FaultState.FAILED
    assert xp.faults() == []
    assert xp.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 40, 1]])) == []
    assert fault.state is FaultState.FAILED and xp.mapped_pages() == 0 and xp.counters["pins_taken"] == 0
    assert xp.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 40, 1]])) == []  # a duplicate: unknown


def test_an_event_the_table_has_no_rule_for_raises_a_typed_error():
    fault = Fault(mm=MM, addr=page(0), npages=1, write=False)
    assert fault.fire(FaultEvent.SEND_GUP) is FaultState.GUP_SENT
    assert fault.fire(FaultEvent.INSTALL) is FaultState.DONE
    with pytest.raises(FaultStateError) as exc:
        fault.fire(FaultEvent.REPLY)
    assert (exc.value.state, exc.value.event) == (FaultState.DONE, FaultEvent.REPLY)
    assert set(TRANSITIONS) == set(FaultState)


# -- kvm -------------------------------------------------------------------------


def test_kvm_fault_subscribes_gups_installs():
    kvm = registered(KvmMMU("k"))
    token, out = kvm.fault(MM, page(0) + 5, 2)
    assert out == [Subscribe(id=1, epoch=EPOCH, mm=MM)]
    assert kvm.fault(MM, page(4), 1)[1] == []  # a second fault waits for the same subscription
    out = kvm.receive(Ok(ref=1))
    assert out == [
        Gup(id=2, epoch=EPOCH, mm=MM, addr=page(0), npages=2, write=False),
        Gup(id=3, epoch=EPOCH, mm=MM, addr=page(4), npages=1, write=False),
    ]
    out = kvm.receive(GupReply(ref=2, mm=MM, pages=[[page(0), 10, 1], [page(1), 11, 0]]))
    assert out == [Completion(token, {"mm": MM, "addr": page(0), "pages": [[page(0), 10, 1], [page(1), 11, 0]]})]
    assert kvm.spte(MM, page(1)) == Spte(11, False, True)
    assert kvm.mapped_pages() == 2
    assert kvm.translations() == {MM: {page(0): 10, page(1): 11}}
    assert kvm.status()["mms"] == {"1": {hex(page(0)): 10, hex(page(1)): 11}}


def test_kvm_gup_error_fails_the_fault():
    kvm = registered(KvmMMU("k"))
    token, out = kvm.fault(MM, page(0), 1, write=True)
    gup = only(subscribed(kvm, out), Gup)
    (c,) = kvm.receive(GupReply(ref=gup.id, mm=MM, pages=[], errno="EPERM"))
    assert c.token == token and c.error.errno is Errno.EPERM


def test_kvm_start_zaps_acks_inline_end_bumps_seq():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 0, [10, 11, 12])
    assert start(kvm, 50, 1, 1) == [Ack(ref=50)]
    assert kvm.translations() == {MM: {page(0): 10, page(2): 12}}
    s = kvm.mm_state(MM)
    assert (s.mmu_invalidate_in_progress, s.mmu_invalidate_seq) == (1, 0)
    assert end(kvm, 50, 1, 1) == []
    assert (s.mmu_invalidate_in_progress, s.mmu_invalidate_seq) == (0, 1)


def test_kvm_fault_racing_a_start_is_retried_after_end():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 5, [99])  # subscribed
    token, out = kvm.fault(MM, page(0), 1)
    (gup,) = out
    assert start(kvm, 50, 0, 1) == [Ack(ref=50)]
    # the reply was computed before the host changed the pte: discard it
    assert kvm.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 10, 1]])) == []
    assert kvm.spte(MM, page(0)) is None
    assert kvm.counters["stale_replies"] == 1
    (gup2,) = end(kvm, 50, 0, 1)  # the parked fault goes again
    assert gup2 == Gup(id=gup2.id, epoch=EPOCH, mm=MM, addr=page(0), npages=1, write=False)
    assert gup2.id != gup.id
    (c,) = kvm.receive(GupReply(ref=gup2.id, mm=MM, pages=[[page(0), 20, 1]]))
    assert c.token == token and c.ok
    assert kvm.spte(MM, page(0)).pfn == 20


def test_kvm_reply_after_start_and_end_is_retried_by_seq():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 5, [99])
    _, (gup,) = kvm.fault(MM, page(0), 1)
    start(kvm, 50, 0, 1)
    end(kvm, 50, 0, 1)
    (gup2,) = kvm.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 10, 1]]))
    assert isinstance(gup2, Gup) and kvm.spte(MM, page(0)) is None


def test_kvm_start_elsewhere_does_not_block_a_fault():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 5, [99])
    start(kvm, 50, 3, 1)  # in progress, but not over page 0
    token, (gup,) = kvm.fault(MM, page(0), 1)
    (c,) = kvm.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 10, 1]]))
    assert c.ok and kvm.spte(MM, page(0)).pfn == 10


def test_kvm_nested_ranges_are_counted():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 5, [99])
    start(kvm, 50, 0, 2)
    start(kvm, 51, 1, 2)
    s = kvm.mm_state(MM)
    assert s.mmu_invalidate_in_progress == 2
    assert (s.mmu_invalidate_range_start, s.mmu_invalidate_range_end) == (page(0), page(3))
    assert kvm.fault(MM, page(0), 1)[1] == []  # waits
    assert end(kvm, 50, 0, 2) == []  # still one in progress over the union
    assert s.mmu_invalidate_in_progress == 1
    (gup,) = end(kvm, 51, 1, 2)
    assert isinstance(gup, Gup) and s.mmu_invalidate_in_progress == 0


def test_kvm_duplicates_are_idempotent():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 0, [10])
    assert start(kvm, 50, 0, 1) == [Ack(ref=50)]
    assert start(kvm, 50, 0, 1) == [Ack(ref=50)]
    s = kvm.mm_state(MM)
    assert s.mmu_invalidate_in_progress == 1
    end(kvm, 50, 0, 1)
    end(kvm, 50, 0, 1)
    assert (s.mmu_invalidate_in_progress, s.mmu_invalidate_seq) == (0, 1)
    assert start(kvm, 50, 0, 1) == [Ack(ref=50)]  # a late duplicate after the end
    assert s.mmu_invalidate_in_progress == 0
    # an end that does not name its start finds it by range
    start(kvm, 60, 0, 1)
    kvm.receive(InvalidateRangeEnd(id=61, mm=MM, start=page(0), end=page(1)))
    assert s.mmu_invalidate_in_progress == 0


def test_kvm_change_pte_repoints_read_only_in_place():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 0, [10, 11])
    assert kvm.receive(ChangePte(id=70, mm=MM, addr=page(0), pfn=30, writable=False)) == [Ack(ref=70)]
    assert kvm.spte(MM, page(0)) == Spte(30, False, False)
    assert kvm.receive(ChangePte(id=71, mm=MM, addr=page(1), pfn=31, writable=True)) == [Ack(ref=71)]
    assert kvm.spte(MM, page(1)) is None  # a writable new pte: drop
    assert (kvm.counters["change_pte_hits"], kvm.counters["change_pte_misses"]) == (2, 0)
    # the node needs no refault to read the merged page
    token, (dma,) = kvm.access(MM, page(0), 8)
    assert dma == DmaRead(id=dma.id, epoch=EPOCH, mm=MM, addr=page(0), pfn=30, offset=0, length=8)
    # but a write faults (the spte is read-only now)
    token, (gup,) = kvm.access(MM, page(0), write_data=b"x")
    assert gup.write


def test_kvm_change_pte_wrapped_in_start_end_is_a_miss():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 0, [10])
    start(kvm, 50, 0, 1)  # the 3.7-6.9 host: start zapped it already
    assert kvm.receive(ChangePte(id=70, mm=MM, addr=page(0), pfn=30, writable=False)) == [Ack(ref=70)]
    end(kvm, 50, 0, 1)
    assert kvm.spte(MM, page(0)) is None
    assert (kvm.counters["change_pte_hits"], kvm.counters["change_pte_misses"]) == (0, 1)


def test_kvm_fault_racing_change_pte_is_retried():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 5, [99])
    _, (gup,) = kvm.fault(MM, page(0), 1)
    kvm.receive(ChangePte(id=70, mm=MM, addr=page(0), pfn=30, writable=False))
    (gup2,) = kvm.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 10, 1]]))  # the old pte
    assert isinstance(gup2, Gup) and kvm.spte(MM, page(0)) is None


def test_kvm_young_bits():
    kvm = registered(KvmMMU("k"), epoch=EPOCH)
    faulted(kvm, 0, [10, 11])
    rng = {"mm": MM, "start": page(0), "end": page(2)}
    assert kvm.receive(messages.TestYoung(id=80, **rng)) == [Ack(ref=80, young=True)]
    assert kvm.receive(ClearYoung(id=81, **rng)) == [Ack(ref=81, young=True)]
    assert kvm.receive(messages.TestYoung(id=82, **rng)) == [Ack(ref=82, young=False)]
    # an access walks the sptes (TLB miss) and sets the A bit
    _, (dma,) = kvm.access(MM, page(0), 4)
    kvm.receive(DmaReply(ref=dma.id, data=b"abcd"))
    assert kvm.receive(ClearYoung(id=83, **rng)) == [Ack(ref=83, young=True)]
    # without a flush the TLB still holds the entry: the next access is unseen
    _, (dma,) = kvm.access(MM, page(0), 4)
    kvm.receive(DmaReply(ref=dma.id, data=b"abcd"))
    assert kvm.receive(ClearFlushYoung(id=84, **rng)) == [Ack(ref=84, young=False)]
    assert kvm.receive(ClearFlushYoung(id=84, **rng)) == [Ack(ref=84, young=False)]  # duplicate
    kvm.receive(messages.TestYoung(id=85, **rng))
    _, (dma,) = kvm.access(MM, page(1), 4)  # TLB miss: walks, young again
    kvm.receive(DmaReply(ref=dma.id, data=b"abcd"))
    assert kvm.receive(ClearFlushYoung(id=86, **rng)) == [Ack(ref=86, young=True)]
    assert kvm.tlb == {}  # flushed


def test_kvm_access_spans_pages():
    kvm = registered(KvmMMU("k"))
    token, out = kvm.access(MM, page(1) - 2, 4)
    (gup,) = subscribed(kvm, out)
    assert (gup.addr, gup.npages, gup.write) == (page(0), 1, False)
    (dma,) = kvm.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 10, 1]]))
    assert dma == DmaRead(id=dma.id, epoch=EPOCH, mm=MM, addr=page(0), pfn=10, offset=PAGE - 2, length=2)
    (gup,) = kvm.receive(DmaReply(ref=dma.id, data=b"ab"))
    assert gup.addr == page(1)
    (dma,) = kvm.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(1), 11, 1]]))
    assert (dma.pfn, dma.offset, dma.length) == (11, 0, 2)
    assert kvm.receive(DmaReply(ref=dma.id, data=b"cd")) == [Completion(token, {"data": b"abcd"})]
    token, (w,) = kvm.access(MM, page(1) - 1, write_data=b"XY")
    assert w == DmaWrite(id=w.id, epoch=EPOCH, mm=MM, addr=page(0), pfn=10, offset=PAGE - 1, data=b"X")
    (w,) = kvm.receive(DmaReply(ref=w.id))
    assert (w.pfn, w.offset, w.data) == (11, 0, b"Y")
    assert kvm.receive(DmaReply(ref=w.id)) == [Completion(token, {"written": 2})]


def test_kvm_stale_dma_fails_the_access():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 0, [10])
    token, (dma,) = kvm.access(MM, page(0), 1)
    (c,) = kvm.receive(DmaReply(ref=dma.id, errno="ESTALE"))
    assert c.token == token and c.error.errno is Errno.ESTALE


def test_kvm_retries_are_bounded():
    kvm = registered(KvmMMU("k", max_fault_retries=1))
    faulted(kvm, 5, [99])
    token, (gup,) = kvm.fault(MM, page(0), 1)
    for sid in (50, 51):
        start(kvm, sid, 3, 1)  # elsewhere: only the seq moves
        end(kvm, sid, 3, 1)
        out = kvm.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 10, 1]]))
        gup = out[0]
    (c,) = out
    assert c.token == token and c.error.errno is Errno.EAGAIN


def test_kvm_fenced_drops_everything():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 0, [10])
    token, (gup,) = kvm.fault(MM, page(1), 1)
    assert kvm.receive(Fenced(epoch=EPOCH - 1)) == []  # an old session's fence
    (c,) = kvm.receive(Fenced(epoch=EPOCH, reason="ack deadline"))
    assert c.token == token and c.error.errno is Errno.EINTR
    assert kvm.mapped_pages() == 0 and kvm.epoch == 0
    assert kvm.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(1), 11, 1]])) == []  # ignored
    assert kvm.mapped_pages() == 0
    registered(kvm, epoch=EPOCH + 1)
    _, out = kvm.fault(MM, page(1), 1)
    assert out == [Subscribe(id=out[0].id, epoch=EPOCH + 1, mm=MM)]  # subscribes anew


def test_kvm_release_drops_the_mm_and_unsubscribes():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 0, [10, 11])
    faulted_other = kvm.fault(2, page(0), 1)[1]
    gup = only(subscribed(kvm, faulted_other), Gup)
    kvm.receive(GupReply(ref=gup.id, mm=2, pages=[[page(0), 20, 1]]))
    assert kvm.receive(Release(id=90, mm=MM)) == [Ack(ref=90)]
    assert kvm.translations() == {2: {page(0): 20}}
    assert isinstance(kvm.fault(MM, page(0), 1)[1][0], Subscribe)


def test_subscribe_error_fails_waiting_faults():
    kvm = registered(KvmMMU("k"))
    token, (sub,) = kvm.fault(MM, page(0), 1)
    (c,) = kvm.receive(Error(ref=sub.id, code="EINTR", message="mm exiting"))
    assert c.token == token and c.error.errno is Errno.EINTR


# -- gru -------------------------------------------------------------------------


def test_gru_miss_gups_fills_tlb_with_lru_eviction():
    gru = registered(GruMMU("g", tlb_entries=2))
    token, out = gru.access(MM, page(0) + 8, 4)
    (gup,) = subscribed(gru, out)
    assert gup == Gup(id=gup.id, epoch=EPOCH, mm=MM, addr=page(0), npages=1, write=False)
    (dma,) = gru.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 10, 1]]))
    assert dma == DmaRead(id=dma.id, epoch=EPOCH, mm=MM, addr=page(0), pfn=10, offset=8, length=4)
    assert gru.receive(DmaReply(ref=dma.id, data=b"wxyz")) == [Completion(token, {"data": b"wxyz"})]
    faulted(gru, 1, [11, 12])  # two more: page 0 is the least recently used
    assert gru.translations() == {MM: {page(1): 11, page(2): 12}}
    assert gru.counters["tlb_evictions"] == 1
    _, (gup,) = gru.access(MM, page(0), 1)  # every miss goes to the host
    assert isinstance(gup, Gup)


def test_gru_drop_in_from_before_a_purge_is_discarded():
    gru = registered(GruMMU("g"))
    faulted(gru, 5, [99])
    token, (gup,) = gru.fault(MM, page(0), 1)
    epoch0 = gru.mm_state(MM).tlb_epoch
    assert start(gru, 50, 3, 1) == [Ack(ref=50)]  # any purge of the mm
    assert gru.mm_state(MM).tlb_epoch == epoch0 + 1
    assert gru.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 10, 1]])) == []
    assert (gru.mapped_pages(), gru.counters["stale_replies"]) == (1, 1)
    (gup2,) = end(gru, 50, 3, 1)  # the miss waited for range_active == 0
    (c,) = gru.receive(GupReply(ref=gup2.id, mm=MM, pages=[[page(0), 20, 1]]))
    assert c.token == token and gru.translations()[MM][page(0)] == 20


def test_gru_miss_waits_while_range_active():
    gru = registered(GruMMU("g"))
    faulted(gru, 0, [10, 11])
    assert start(gru, 50, 0, 1) == [Ack(ref=50)]
    assert start(gru, 51, 4, 1) == [Ack(ref=51)]
    assert gru.translations() == {MM: {page(1): 11}}  # purged
    assert gru.mm_state(MM).range_active == 2
    _, (dma,) = gru.access(MM, page(1), 1)  # a hit outside the purged range still works
    assert dma.pfn == 11
    token, out = gru.access(MM, page(0), 1)
    assert out == [] and gru.counters["waits"] == 1
    assert end(gru, 51, 4, 1) == []
    (gup,) = end(gru, 50, 0, 1)
    assert gup.addr == page(0)


def test_gru_duplicate_start_counts_once():
    gru = registered(GruMMU("g"))
    start(gru, 50, 0, 1)
    start(gru, 50, 0, 1)
    assert gru.mm_state(MM).range_active == 1
    end(gru, 50, 0, 1)
    end(gru, 50, 0, 1)
    assert gru.mm_state(MM).range_active == 0


def test_gru_change_pte_fallback_drops_the_page():
    gru = registered(GruMMU("g"))
    faulted(gru, 0, [10])
    assert gru.receive(ChangePte(id=70, mm=MM, addr=page(0), pfn=30, writable=False)) == [Ack(ref=70)]
    assert gru.mapped_pages() == 0


# -- xpmem -----------------------------------------------------------------------


def xpmem_attached(write: bool = True, npages: int = 4) -> tuple[XpmemMMU, int]:
    """An xpmem node holding an attachment of ``npages`` pages of MM at BASE."""
    xp = registered(XpmemMMU("x"))
    token, (make,) = xp.make(MM, BASE, npages * PAGE, 0o644)
    assert make == XpmemMake(id=make.id, epoch=EPOCH, mm=MM, addr=BASE, length=npages * PAGE, mode=0o644)
    assert xp.receive(XpmemReply(ref=make.id, value=5)) == [Completion(token, {"segid": 5})]
    token, (get,) = xp.get(5, write=write)
    assert get == XpmemGet(id=get.id, epoch=EPOCH, segid=5, write=write)
    (c,) = xp.receive(XpmemReply(ref=get.id, value=9, mm=MM, addr=BASE, length=npages * PAGE, write=write))
    assert c.result == {"apid": 9, "segid": 5, "mm": MM, "addr": BASE, "length": npages * PAGE, "write": write}
    token, (c,) = xp.attach(9)
    assert c.result["length"] == npages * PAGE and c.result["write"] == write
    return xp, c.result["vaddr"]


def xpmem_fault(xp: XpmemMMU, vaddr: int, pfns: list[int]) -> None:
    first = (vaddr - xp.attachments[xp._att_starts[0]].vaddr) // PAGE
    token, out = xp.fault(0, vaddr, len(pfns))
    if any(isinstance(o, Subscribe) for o in out):
        out = subscribed(xp, out)
    gup = only(out, Gup)
    assert (gup.mm, gup.addr, gup.npages, gup.pin) == (MM, page(first), len(pfns), True)
    (c,) = xp.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(first + i), p, 1] for i, p in enumerate(pfns)]))
    assert c.ok


def test_xpmem_fault_pins_in_the_exporters_mm():
    xp, vaddr = xpmem_attached()
    token, out = xp.access(0, vaddr + PAGE + 3, 2)
    (gup,) = subscribed(xp, out)
    # a read asks for read; the host adds FOLL_WRITE where the vma is writable
    assert gup == Gup(id=gup.id, epoch=EPOCH, mm=MM, addr=page(1), npages=1, write=False, pin=True)
    (dma,) = xp.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(1), 11, 1]]))
    assert dma == DmaRead(id=dma.id, epoch=EPOCH, mm=MM, addr=page(1), pfn=11, offset=3, length=2)
    assert xp.receive(DmaReply(ref=dma.id, data=b"hi")) == [Completion(token, {"data": b"hi"})]
    assert xp.translations() == {MM: {page(1): 11}}
    assert xp.pinned_pages() == 1
    _, (c,) = xp.access(0, vaddr - PAGE, 1)
    assert c.error.errno is Errno.EFAULT


def test_xpmem_read_fault_asks_for_read_and_host_decides_foll_write():
    """xpmem_pin_page sets FOLL_WRITE from the source vma: the node's Gup says
    what the access needs; a read-only pin is then upgraded by a write fault."""
    xp, vaddr = xpmem_attached()
    _, out = xp.fault(0, vaddr, 1)
    gup = only(subscribed(xp, out), Gup)
    assert (gup.write, gup.pin) == (False, True)
    xp.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 10, 0]]))  # vma read-only: pinned r/o
    token, out = xp.access(0, vaddr, write_data=b"x")
    gup = only(out, Gup)
    assert (gup.write, gup.pin) == (True, True)
    (c,) = xp.receive(GupReply(ref=gup.id, mm=MM, pages=[], errno="EPERM"))
    assert c.error.errno is Errno.EPERM
    # the vma is writable again: the write fault's writable pin replaces the
    # read-only one, whose pin is dropped
    token, out = xp.access(0, vaddr, write_data=b"y")
    gup = only(out, Gup)
    out = xp.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 12, 1]]))
    assert only(out, Unpin).pfns == [10]
    assert xp.translations() == {MM: {page(0): 12}} and xp.pinned_pages() == 1


def test_xpmem_start_drains_in_flight_dma_before_ack():
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr, [10, 11])
    token, (dma,) = xp.access(0, vaddr, 4)
    assert start(xp, 50, 0, 1) == []  # DMA in flight in range: no ack yet
    assert xp.translations() == {MM: {page(1): 11}}  # already unmapped
    assert start(xp, 50, 0, 1) == []  # a duplicate while draining: still nothing
    out = xp.receive(DmaReply(ref=dma.id, data=b"data"))
    unpin = only(out, Unpin)
    assert out == [unpin, Ack(ref=50), Completion(token, {"data": b"data"})]
    assert unpin == Unpin(id=unpin.id, epoch=EPOCH, mm=MM, pfns=[10])
    assert start(xp, 50, 0, 1) == [Ack(ref=50)]  # duplicate after the drain
    assert xp.mm_state(MM).mmu_invalidate_in_progress == 1
    end(xp, 50, 0, 1)
    assert xp.mm_state(MM).mmu_invalidate_in_progress == 0


def test_xpmem_start_without_dma_in_range_acks_at_once():
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr, [10, 11])
    _, (dma,) = xp.access(0, vaddr + PAGE, 1)  # in flight, but on page 1
    out = start(xp, 50, 0, 1)
    assert out == [Unpin(id=out[0].id, epoch=EPOCH, mm=MM, pfns=[10]), Ack(ref=50)]


def test_xpmem_not_blockable_with_nothing_mapped_in_range_acks():
    """Nothing to drain or unpin in the range: no reason to sleep, so no EAGAIN."""
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr, [10])  # page 0 only
    assert start(xp, 50, 1, 3, blockable=False) == [Ack(ref=50)]
    assert xp.translations() == {MM: {page(0): 10}}
    end(xp, 50, 1, 3)
    assert xp.mm_state(MM).mmu_invalidate_in_progress == 0


def test_xpmem_not_blockable_answers_eagain_and_changes_nothing():
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr, [10])
    assert start(xp, 50, 0, 4, blockable=False) == [Ack(ref=50, status="EAGAIN")]
    assert xp.translations() == {MM: {page(0): 10}}
    assert xp.mm_state(MM).mmu_invalidate_in_progress == 0
    assert end(xp, 50, 0, 4) == []  # the core never ends a refused start; harmless anyway
    assert xp.mm_state(MM).mmu_invalidate_in_progress == 0


@pytest.mark.parametrize("origin", ["ksmd", "kswapd", "migration"])
def test_xpmem_acks_a_background_start_keeping_its_pins_and_an_owners_start_unpinning(origin: str) -> None:
    """kernel/xpmem_mmu_notifier.c: only the segment owner's invalidations
    (``current->tgid == seg_tg->tgid``) clear the attachments' ptes.  One of
    ksmd, kswapd or migration is acked at once, kept, even non-blockable and
    with a DMA in flight: nothing unmapped, no Unpin, no drain; the owner's
    unmaps, unpins and acks."""
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr, [10, 11])
    _, (dma,) = xp.access(0, vaddr, 4)  # in flight on page 0
    assert start(xp, 50, 0, 2, origin=origin) == [Ack(ref=50, kept=True)]
    assert start(xp, 51, 0, 2, origin=origin, blockable=False) == [Ack(ref=51, kept=True)]
    assert start(xp, 52, 2, 2, origin=origin) == [Ack(ref=52)]  # maps nothing there: nothing kept
    assert start(xp, 50, 0, 2, origin=origin) == [Ack(ref=50, kept=True)]  # a duplicate
    assert xp.translations() == {MM: {page(0): 10, page(1): 11}} and xp.pinned_pages() == 2
    assert xp.mm_state(MM).mmu_invalidate_in_progress == 0 and xp.counters["background_kept"] == 2
    for sid, first in ((50, 0), (51, 0), (52, 2)):
        assert end(xp, sid, first, 2) == []
    (c,) = xp.receive(DmaReply(ref=dma.id, data=b"data"))
    assert c.result == {"data": b"data"}
    # the owner's: unmapped and unpinned, acked (nothing in flight now)
    out = start(xp, 60, 0, 2)
    assert out == [Unpin(id=out[0].id, epoch=EPOCH, mm=MM, pfns=[10, 11]), Ack(ref=60)]
    assert xp.translations() == {} and xp.pinned_pages() == 0


def test_xpmem_fault_waits_and_racing_reply_is_unpinned():
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr + 3 * PAGE, [13])  # subscribed
    _, (gup,) = xp.fault(0, vaddr, 1)
    start(xp, 50, 0, 2)
    out = xp.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 10, 1]]))
    assert out == [Unpin(id=out[0].id, epoch=EPOCH, mm=MM, pfns=[10])]  # discarded, pin dropped
    assert xp.fault(0, vaddr + PAGE, 1)[1] == []  # in the range: waits too
    out = end(xp, 50, 0, 2)
    assert [(g.addr, g.pin) for g in out] == [(page(0), True), (page(1), True)]


def test_xpmem_pins_balance():
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr, [10, 11])
    # two racing faults on page 2: the second mapping's pin is extra
    _, (g1,) = xp.fault(0, vaddr + 2 * PAGE, 1)
    _, (g2,) = xp.fault(0, vaddr + 2 * PAGE, 1)
    xp.receive(GupReply(ref=g1.id, mm=MM, pages=[[page(2), 12, 1]]))
    out = xp.receive(GupReply(ref=g2.id, mm=MM, pages=[[page(2), 12, 1]]))
    assert only(out, Unpin).pfns == [12]
    assert only(out, Completion).result["pages"] == []
    token, out = xp.detach(vaddr)
    assert only(out, Unpin).pfns == [10, 11, 12]
    assert only(out, Completion).result == {"vaddr": vaddr, "unpinned": 3}
    c = xp.counters
    assert (c["pins_taken"], c["pins_released"], xp.pinned_pages()) == (4, 4, 0)


def test_xpmem_reply_for_a_detached_attachment_is_unpinned():
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr, [10])
    _, (gup,) = xp.fault(0, vaddr + PAGE, 1)
    xp.detach(vaddr)
    out = xp.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(1), 11, 1]]))
    assert only(out, Unpin).pfns == [11]
    assert xp.pinned_pages() == 0


def test_xpmem_read_only_permit_cannot_be_attached():
    """xpmem_attach validates the permit for XPMEM_RDWR: an RDONLY apid gets EACCES."""
    xp = registered(XpmemMMU("x"))
    token, (get,) = xp.get(5, write=False)
    xp.receive(XpmemReply(ref=get.id, value=9, mm=MM, addr=BASE, length=4 * PAGE, write=False))
    _, (c,) = xp.attach(9)
    assert c.error.errno is Errno.EACCES
    assert xp.attachments == {}


def test_xpmem_detach_where_nothing_is_attached_is_a_no_op():
    """xpmem_detach returns 0 when no xpmem vma holds the address."""
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr, [10])
    _, out = xp.detach(vaddr - PAGE)
    assert out == [Completion(out[0].token, {"vaddr": vaddr - PAGE, "unpinned": 0})]
    assert xp.pinned_pages() == 1
    xp.detach(vaddr)
    _, (c,) = xp.detach(vaddr)  # twice: still 0
    assert c.result == {"vaddr": vaddr, "unpinned": 0}


def test_xpmem_release_and_remove():
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr, [10])
    token, out = xp.xpmem_release(9)
    unpin, rel = out
    assert unpin.pfns == [10] and rel == XpmemRelease(id=rel.id, epoch=EPOCH, apid=9)
    assert xp.receive(XpmemReply(ref=rel.id)) == [Completion(token, {"apid": 9})]
    assert xp.attachments == {} and xp.permits == {}
    _, (c,) = xp.attach(9)
    assert c.error.errno is Errno.EINVAL
    token, (rm,) = xp.remove(5)
    (c,) = xp.receive(XpmemReply(ref=rm.id, errno="EPERM"))
    assert c.error.errno is Errno.EPERM


def test_xpmem_removed_by_the_host_zaps_drains_unpins_then_acks():
    """xpmem_remove_seg -> xpmem_clear_PTEs on an importer: its attachments
    are zapped at once, the pins dropped after the DMA in flight on them,
    then the Ack; every later use of them is ENOENT."""
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr, [10, 11])
    token, (dma,) = xp.access(0, vaddr, 4)
    assert xp.receive(XpmemRemoved(id=70, segid=5)) == []  # draining
    assert xp.translations() == {}
    assert xp.receive(XpmemRemoved(id=70, segid=5)) == []  # duplicate while draining
    out = xp.receive(DmaReply(ref=dma.id, data=b"data"))
    unpin = only(out, Unpin)
    assert out == [unpin, Ack(ref=70), Completion(token, {"data": b"data"})] and unpin.pfns == [10, 11]
    assert xp.receive(XpmemRemoved(id=70, segid=5)) == [Ack(ref=70)]  # duplicate after
    assert xp.pinned_pages() == 0
    for call in (lambda: xp.access(0, vaddr, 1), lambda: xp.fault(0, vaddr, 1), lambda: xp.attach(9)):
        _, (c,) = call()
        assert c.error.errno is Errno.ENOENT
    assert xp.receive(XpmemRemoved(id=71, segid=6)) == [Ack(ref=71)]  # nothing of it here
    _, (c,) = xp.detach(vaddr)
    assert c.result == {"vaddr": vaddr, "unpinned": 0}


def test_xpmem_get_refused_by_mode():
    xp = registered(XpmemMMU("x"))
    token, (get,) = xp.get(5, write=True)
    (c,) = xp.receive(Error(ref=get.id, code="EACCES", message="mode 0644"))
    assert c.error.errno is Errno.EACCES and xp.permits == {}


def test_xpmem_release_of_mm_unpins_and_acks():
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr, [10, 11])
    out = xp.receive(Release(id=90, mm=MM))
    assert out == [Unpin(id=out[0].id, epoch=EPOCH, mm=MM, pfns=[10, 11]), Ack(ref=90)]
    assert xp.receive(Release(id=90, mm=MM)) == [Ack(ref=90)]  # duplicate


def test_xpmem_fenced_forgets_pins_without_unpinning():
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr, [10])
    token, (dma,) = xp.access(0, vaddr, 1)
    start(xp, 50, 0, 1)  # draining
    out = xp.receive(Fenced(epoch=EPOCH))
    assert out == [Completion(token, None, out[0].error)] and out[0].error.errno is Errno.EINTR
    assert xp.pinned_pages() == 0 and xp.attachments == {}
    assert xp.receive(DmaReply(ref=dma.id, data=b"x")) == []  # no late ack, no unpin


# -- property: no translation survives an overlapping start it raced --------------

NPAGES = 4


class Interleavings(RuleBasedStateMachine):
    """A hand-rolled host delivering starts, ends, duplicates, GUP and DMA
    replies in any order the channel allows.

    Invariant: every live translation came from a Gup sent after the last
    start (received by the node) that overlaps it.  Plus: the node's
    in-progress counter equals the starts begun and not ended, and (xpmem)
    pins taken = pins released + pins held.
    """

    KIND = "kvm"

    def __init__(self) -> None:
        super().__init__()
        self.node = node_class(self.KIND)("n", tlb_entries=3) if self.KIND != "xpmem" else XpmemMMU("n")
        self.step = 0
        self.epoch = 1
        self.gups: dict[int, tuple[int, Gup]] = {}  # id -> (step sent, gup)
        self.dmas: dict[int, Message] = {}
        self.starts: list[tuple[int, int, int]] = []  # (step received, start, end) of begun starts
        self.open: dict[int, InvalidateRangeStart] = {}  # acked or draining, not ended
        self.acked: set[int] = set()
        self.delivered: list[InvalidateRangeStart] = []
        self.origin: dict[int, int] = {}  # pfn -> step its Gup was sent
        self.next_pfn = 1000
        self.next_sid = 1
        self.pins_held = 0
        self.vaddr = 0
        self.boot()

    def boot(self) -> None:
        hello = Registered(
            ref=0, epoch=self.epoch, host_incarnation="h", heartbeat_ms=1, ack_deadline_ms=1, page_size=PAGE
        )
        self.feed(self.node.receive(hello))
        if isinstance(self.node, XpmemMMU):
            _, (make,) = self.node.make(MM, BASE, NPAGES * PAGE)
            self.feed(self.node.receive(XpmemReply(ref=make.id, value=5)))
            _, (get,) = self.node.get(5, True)
            got = XpmemReply(ref=get.id, value=9, mm=MM, addr=BASE, length=NPAGES * PAGE, write=True)
            self.feed(self.node.receive(got))
            _, (c,) = self.node.attach(9)
            self.vaddr = c.result["vaddr"]

    def addr(self, i: int) -> int:
        return (self.vaddr or BASE) + i * PAGE

    def feed(self, outputs: list[Any]) -> None:
        self.step += 1
        for o in outputs:
            if isinstance(o, Subscribe):
                self.feed(self.node.receive(Ok(ref=o.id)))
            elif isinstance(o, Gup):
                self.gups[o.id] = (self.step, o)
            elif isinstance(o, (DmaRead, DmaWrite)):
                self.dmas[o.id] = o
            elif isinstance(o, Unpin):
                self.pins_held -= len(o.pfns)
            elif isinstance(o, Ack) and o.ref in self.open:
                s = self.open[o.ref]
                for d in self.dmas.values() if self.node.sleepable else ():  # drained first
                    assert not (d.mm == s.mm and d.addr < s.end and s.start < d.addr + PAGE), "acked before drain"
                self.acked.add(o.ref)

    @rule(i=st.integers(0, NPAGES - 1), n=st.integers(1, 2), write=st.booleans())
    def fault(self, i: int, n: int, write: bool) -> None:
        n = min(n, NPAGES - i)
        self.feed(self.node.fault(0 if self.vaddr else MM, self.addr(i), n, write=write)[1])

    @rule(i=st.integers(0, NPAGES - 1), write=st.booleans())
    def access(self, i: int, write: bool) -> None:
        data = b"w" if write else None
        self.feed(self.node.access(0 if self.vaddr else MM, self.addr(i), 1, data)[1])

    @precondition(lambda self: self.gups)
    @rule(data=st.data(), fail=st.booleans())
    def reply_gup(self, data: st.DataObject, fail: bool) -> None:
        gid = data.draw(st.sampled_from(sorted(self.gups)))
        sent, gup = self.gups.pop(gid)
        if fail and data.draw(st.booleans()):
            self.feed(self.node.receive(GupReply(ref=gid, mm=gup.mm, pages=[], errno="EFAULT")))
            return
        pages = []
        around = data.draw(st.integers(0, 1))  # the host's fault-around: a page more
        for k in range(min(gup.npages + around, NPAGES - (gup.addr - BASE) // PAGE)):
            self.next_pfn += 1
            self.origin[self.next_pfn] = sent
            pages.append([gup.addr + k * PAGE, self.next_pfn, 1])
        if gup.pin:
            self.pins_held += len(pages)
        self.feed(self.node.receive(GupReply(ref=gid, mm=gup.mm, pages=pages)))

    @precondition(lambda self: self.dmas)
    @rule(data=st.data())
    def reply_dma(self, data: st.DataObject) -> None:
        did = data.draw(st.sampled_from(sorted(self.dmas)))
        self.dmas.pop(did)
        self.feed(self.node.receive(DmaReply(ref=did, data=b"r")))

    @rule(i=st.integers(0, NPAGES - 1), n=st.integers(1, NPAGES), blockable=st.booleans())
    def start(self, i: int, n: int, blockable: bool) -> None:
        sid = self.next_sid
        self.next_sid += 1
        msg = InvalidateRangeStart(
            id=sid, mm=MM, start=page(i), end=page(min(i + n, NPAGES)), event="CLEAR", blockable=blockable
        )
        self.delivered.append(msg)
        out = self.node.receive(msg)
        if Ack(ref=sid, status="EAGAIN") in out:
            assert isinstance(self.node, XpmemMMU) and not blockable
            self.feed(out)
            return
        self.starts.append((self.step + 1, msg.start, msg.end))
        self.open[sid] = msg
        self.feed(out)

    @precondition(lambda self: self.delivered)
    @rule(data=st.data())
    def duplicate_start(self, data: st.DataObject) -> None:
        self.feed(self.node.receive(data.draw(st.sampled_from(self.delivered))))

    @precondition(lambda self: any(sid in self.acked for sid in self.open))
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(s for s in self.open if s in self.acked)))
        msg = self.open.pop(sid)
        done = InvalidateRangeEnd(id=10_000 + sid, mm=MM, start=msg.start, end=msg.end, start_id=sid)
        self.feed(self.node.receive(done))

    @rule(sometimes=st.integers(0, 7))
    def fence(self, sometimes: int) -> None:
        if sometimes:  # fence rarely, or nothing else gets a chance
            return
        self.feed(self.node.receive(Fenced(epoch=self.epoch)))
        # the host retired the session: its pins, subscriptions and pending work are gone
        self.gups.clear()
        self.dmas.clear()
        self.open.clear()
        self.acked.clear()
        self.delivered.clear()
        self.pins_held = 0
        self.epoch += 1
        self.boot()

    @invariant()
    def no_translation_raced_a_start(self) -> None:
        for mm, pages in self.node.translations().items():
            for addr, pfn in pages.items():
                sent = self.origin[pfn]
                for received, s, e in self.starts:
                    assert not (received > sent and s < addr + PAGE and addr < e), (
                        f"page {addr:#x} pfn {pfn} from a gup sent at {sent} outlived a start at {received}"
                    )

    @invariant()
    def in_progress_counts_open_starts(self) -> None:
        state = self.node._mms.get(MM)
        counter = 0
        if state is not None:
            counter = {
                "kvm": "mmu_invalidate_in_progress",
                "gru": "range_active",
                "xpmem": "mmu_invalidate_in_progress",
            }[self.KIND]
            counter = getattr(state, counter)
        assert counter == len(self.open)

    @invariant()
    def pins_balance(self) -> None:
        if isinstance(self.node, XpmemMMU):
            assert self.pins_held == self.node.pinned_pages()
            c = self.node.counters
            assert c["pins_taken"] - c["pins_released"] >= self.node.pinned_pages()


_settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class KvmInterleavings(Interleavings):
    KIND = "kvm"


class GruInterleavings(Interleavings):
    KIND = "gru"


class XpmemInterleavings(Interleavings):
    KIND = "xpmem"


TestKvmInterleavings = KvmInterleavings.TestCase
TestKvmInterleavings.settings = _settings
TestGruInterleavings = GruInterleavings.TestCase
TestGruInterleavings.settings = _settings
TestXpmemInterleavings = XpmemInterleavings.TestCase
TestXpmemInterleavings.settings = _settings


@pytest.mark.parametrize("kind", ["kvm", "gru", "xpmem", "hmm"])
def test_unknown_replies_and_heartbeats_are_ignored(kind: str):
    node = registered(node_class(kind)("n"))
    assert node.receive(GupReply(ref=12345, mm=MM, pages=[[page(0), 1, 1]])) == []
    assert node.receive(Ok(ref=999)) == []
    assert node.mapped_pages() == 0
    assert node.status()["kind"] == kind


def test_kvm_fault_around_pages_are_judged_too():
    kvm = registered(KvmMMU("k"))
    faulted(kvm, 5, [99])
    token, (gup,) = kvm.fault(MM, page(0), 1)
    start(kvm, 50, 1, 1)  # in progress over page 1 only
    # the host answered with pages 1 and 2 as well (fault-around): page 1 is not installable
    (c,) = kvm.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 10, 1], [page(1), 11, 1], [page(2), 12, 1]]))
    assert c == Completion(token, {"mm": MM, "addr": page(0), "pages": [[page(0), 10, 1], [page(2), 12, 1]]})
    assert kvm.spte(MM, page(1)) is None


def test_xpmem_fault_around_pages_in_an_invalidated_range_are_unpinned():
    xp, vaddr = xpmem_attached()
    xpmem_fault(xp, vaddr + 3 * PAGE, [13])
    _, (gup,) = xp.fault(0, vaddr, 1)
    start(xp, 50, 1, 1)
    out = xp.receive(GupReply(ref=gup.id, mm=MM, pages=[[page(0), 10, 1], [page(1), 11, 1]]))
    assert only(out, Unpin).pfns == [11]
    assert only(out, Completion).result["pages"] == [[page(0), 10, 1]]
    assert xp.pinned_pages() == 2


@given(
    keys=st.sets(st.integers(0, 64), max_size=40),
    start=st.integers(0, 70 * 16),
    length=st.integers(0, 70 * 16),
)
def test_zap_range_removes_exactly_the_pages_a_range_meets(keys: set[int], start: int, length: int) -> None:
    """zap_range against its definition, both of its ways (the whole table
    cleared at once when the range holds it, the per-key walk otherwise):
    a page goes iff ``[page, page + ps)`` meets ``[start, end)``."""
    ps = 16
    table = {k * ps: k for k in keys}
    end = start + length
    kept = {a: v for a, v in table.items() if not (a + ps > start and a < end)}
    assert zap_range(table, start, end, ps) == len(keys) - len(kept)
    assert table == kept
