"""Host-side sessions (epochs, fencing, liveness) and XPMEM segments/permits."""

from __future__ import annotations

import pytest

from broker.sessions import Refused, Sessions
from broker.xpmem import Segments
from protocol.messages import Register
from protocol.types import Errno, KernelError


def reg(name: str, kind: str = "kvm") -> Register:
    return Register(id=1, name=name, kind=kind, ops=["release"], sleepable=False, incarnation="i")


def test_register_lookup_and_fence_retires_epoch():
    s = Sessions()
    a, prev = s.register(b"A", reg("a"), now=0.0)
    assert prev is None and a.epoch == 1
    assert s.lookup(b"A", 1) is a
    assert s.fence("a", "test") is a
    with pytest.raises(Refused) as err:
        s.lookup(b"A", 1)
    assert err.value.code == "fenced"
    # fencing twice does nothing more
    assert s.fence("a", "again") is None
    assert s.fences == 1
    b, prev = s.register(b"A2", reg("a"), now=1.0)
    assert b.epoch == 2 and prev is None
    # the old epoch stays retired, even from the new identity
    with pytest.raises(Refused):
        s.lookup(b"A2", 1)
    assert s.lookup(b"A2", 2) is b


def test_restart_replaces_live_session():
    s = Sessions()
    a, _ = s.register(b"A", reg("a"), now=0.0)
    b, prev = s.register(b"B", reg("a"), now=0.0)
    assert prev is a
    assert a.epoch in s.retired
    with pytest.raises(Refused):
        s.lookup(b"A")
    assert s.lookup(b"B") is b


def test_unregistered_identity_is_refused():
    s = Sessions()
    with pytest.raises(Refused) as err:
        s.lookup(b"nobody", None)
    assert err.value.code == "unregistered"


def test_silent_sessions():
    s = Sessions()
    s.register(b"A", reg("a"), now=0.0)
    s.register(b"B", reg("b"), now=0.0)
    s.touch(b"B", 2.5)
    assert [x.name for x in s.silent(now=3.0, liveness=1.0)] == ["a"]


PAGE = 4096


def test_segment_permissions_follow_the_mode():
    segs = Segments(PAGE)
    seg = segs.make("owner", mm=1, addr=PAGE, length=2 * PAGE, mode=0o640)
    # owner: rw
    permit, _ = segs.get("owner", seg.segid, write=True)
    assert permit.write
    # others: 0 -> denied even read
    with pytest.raises(KernelError) as err:
        segs.get("other", seg.segid, write=False)
    assert err.value.errno is Errno.EACCES
    seg2 = segs.make("owner", mm=1, addr=PAGE, length=PAGE, mode=0o604)
    ro, _ = segs.get("other", seg2.segid, write=False)
    with pytest.raises(KernelError):
        segs.get("other", seg2.segid, write=True)
    assert segs.may_pin("other", 1, PAGE, 2 * PAGE, write=False)
    assert not segs.may_pin("other", 1, PAGE, 2 * PAGE, write=True)
    assert not segs.may_pin("other", 1, PAGE, 3 * PAGE, write=False)  # beyond the segment
    assert not segs.may_pin("other", 2, PAGE, 2 * PAGE, write=False)  # another mm
    segs.release("other", ro.apid)
    assert not segs.may_pin("other", 1, PAGE, 2 * PAGE, write=False)


def test_segment_errors():
    segs = Segments(PAGE)
    with pytest.raises(KernelError) as err:
        segs.make("n", 1, 1, PAGE, 0o600)
    assert err.value.errno is Errno.EINVAL
    with pytest.raises(KernelError) as err:
        segs.get("n", 99, False)
    assert err.value.errno is Errno.ENOENT
    seg = segs.make("n", 1, 0, PAGE, 0o666)
    segs.get("m", seg.segid, True)
    with pytest.raises(KernelError) as err:
        segs.remove("m", seg.segid)
    assert err.value.errno is Errno.EACCES
    gone = segs.remove("n", seg.segid)
    assert [p.node for p in gone] == ["m"]
    assert segs.permits == {}
    with pytest.raises(KernelError):
        segs.release("m", gone[0].apid)
