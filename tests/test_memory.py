"""Physical memory (frames, zero frame, refcounts) and the swap file."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.memory import ZERO_PFN, PhysicalMemory, SwapFile
from protocol.types import Errno, KernelError

PAGE = 4096


def test_alloc_free_and_enomem():
    mem = PhysicalMemory(4, PAGE)
    assert mem.nr_free() == 3  # the zero frame is never handed out
    pfns = [mem.alloc() for _ in range(3)]
    assert ZERO_PFN not in pfns and len(set(pfns)) == 3
    with pytest.raises(KernelError) as err:
        mem.alloc()
    assert err.value.errno is Errno.ENOMEM
    mem.write(pfns[0], 10, b"abc")
    assert mem.put_page(pfns[0]) is True
    assert mem.nr_free() == 1
    # a reused frame reads as zeros again
    again = mem.alloc()
    assert again == pfns[0]
    assert mem.read(again) == bytes(PAGE)


def test_refcount_keeps_frame_until_last_put():
    mem = PhysicalMemory(3, PAGE)
    pfn = mem.alloc()
    mem.get_page(pfn)
    assert mem.put_page(pfn) is False
    assert not mem.is_free(pfn)
    assert mem.put_page(pfn) is True
    assert mem.is_free(pfn)
    with pytest.raises(AssertionError):
        mem.put_page(pfn)


def test_zero_frame_is_special():
    mem = PhysicalMemory(2, PAGE)
    mem.get_page(ZERO_PFN)
    assert mem.put_page(ZERO_PFN) is False
    assert mem.is_zero_filled(ZERO_PFN)
    with pytest.raises(AssertionError):
        mem.write(ZERO_PFN, 0, b"x")


def test_copy_compare_and_span_checks():
    mem = PhysicalMemory(4, PAGE)
    a, b = mem.alloc(), mem.alloc()
    mem.write(a, PAGE - 2, b"zz")
    assert not mem.pages_identical(a, b)
    mem.copy(b, a)
    assert mem.pages_identical(a, b)
    assert bytes(mem.page(b)[-2:]) == b"zz"
    with pytest.raises(KernelError) as err:
        mem.write(a, PAGE - 1, b"xy")
    assert err.value.errno is Errno.EINVAL


def test_on_free_fires_exactly_when_a_frame_returns_to_the_free_list():
    mem = PhysicalMemory(4, PAGE)
    freed: list[int] = []
    mem.on_free = freed.append
    a, b = mem.alloc(), mem.alloc()
    mem.get_page(a)
    assert mem.put_page(a) is False and freed == []  # still referenced
    mem.put_page(ZERO_PFN)
    mem.get_page(ZERO_PFN)
    assert freed == []  # never for the zero frame
    assert mem.put_page(a) is True
    assert freed == [a] and a in mem.free_pfns() and mem.is_free(a)  # called once it is free
    assert mem.put_page(b) is True and freed == [a, b]
    c = mem.alloc()  # reusing a frame is no free
    assert freed == [a, b]

    def check(pfn: int) -> None:
        assert pfn in mem.free_pfns() and mem.flags[pfn] == 0 and mem.in_use == 0
        raise RuntimeError(f"frame {pfn} still mapped by a node")

    mem.on_free = check
    with pytest.raises(RuntimeError):  # the hook's verdict reaches the caller
        mem.put_page(c)


def test_fail_alloc_raises_enomem_like_running_out_of_frames():
    mem = PhysicalMemory(8, PAGE)
    mem.fail_alloc = lambda: True
    with pytest.raises(KernelError) as injected:
        mem.alloc()
    mem.fail_alloc = None
    pfns = [mem.alloc() for _ in range(7)]
    with pytest.raises(KernelError) as real:
        mem.alloc()
    assert (injected.value.errno, injected.value.message) == (real.value.errno, real.value.message)
    assert mem.in_use == 7  # the injected failure allocated nothing
    for pfn in pfns:
        mem.put_page(pfn)
    mem.fail_allocs_after(2, count=1)
    first = [mem.alloc(), mem.alloc()]
    with pytest.raises(KernelError) as err:
        mem.alloc()
    assert err.value.errno is Errno.ENOMEM and mem.in_use == 2
    mem.alloc()  # count=1: the next one succeeds again
    mem.fail_allocs_after(0)
    for _ in range(3):
        with pytest.raises(KernelError):
            mem.alloc()
    mem.fail_allocs_after(None)
    assert mem.fail_alloc is None and mem.alloc() not in first


def test_metadata_is_compact():
    mem = PhysicalMemory(1 << 16, PAGE)
    # refcount, mapcount, pincount (4 bytes each) and flags (1 byte) per frame
    assert mem.metadata_bytes() == 13 * (1 << 16)
    mem.close()


def test_swap_file_round_trip_and_refcounts(tmp_path):
    swap = SwapFile(2, PAGE, path=tmp_path / "swap")
    slot = swap.alloc()
    swap.write(slot, b"\x07" * PAGE)
    swap.duplicate(slot)  # fork shares the swap entry
    assert swap.free(slot) is False
    assert swap.read(slot) == b"\x07" * PAGE
    assert swap.free(slot) is True
    swap.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["alloc", "get", "put"]), max_size=60), st.randoms())
def test_free_count_matches_reference(actions, rnd):
    mem = PhysicalMemory(8, PAGE)
    refs: dict[int, int] = {}
    for action in actions:
        if action == "alloc":
            if len(refs) == 7:
                with pytest.raises(KernelError):
                    mem.alloc()
                continue
            pfn = mem.alloc()
            assert pfn not in refs
            refs[pfn] = 1
        elif refs:
            pfn = rnd.choice(sorted(refs))
            if action == "get":
                mem.get_page(pfn)
                refs[pfn] += 1
            else:
                freed = mem.put_page(pfn)
                refs[pfn] -= 1
                assert freed == (refs[pfn] == 0)
                if not refs[pfn]:
                    del refs[pfn]
        assert mem.nr_free() == 7 - len(refs)
        assert mem.free_pfns() == set(range(1, 8)) - set(refs)
    mem.close()
