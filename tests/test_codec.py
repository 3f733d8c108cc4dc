"""The codec's two decoders agree: the msgspec fast path accepts a frame only
when the reference decoder accepts it, with the same message (same field
values *and* types: ``True == 1``), and the msgspec encoder writes the same
bytes as the reference encoder.

``decode`` falls back to the reference for whatever the fast path refuses, so
a fast path that refused too much would only be slow; one that accepted too
much is what these tests hunt: every frame here is decided by both
``decode`` and ``_decode_reference`` and the answers compared.
"""

from __future__ import annotations

import dataclasses
import random
import typing
from typing import Any

import hypothesis
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocol import any_message, body_of, message_strategy, msgpack_values, next_valid

from protocol import ADDRESS_LIMIT, REGISTRY, Limits, Message, ProtocolError, decode, encode
from protocol.codec import _FAST_PREFIX, _FAST_TYPES, _FREE_FORM_TYPES, _decode_reference, _encode_reference
from protocol.messages import Command, CommandResult, Event, GupReply, InvalidateRangeStart, Register, Unpin

CHECK = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Small limits, so that frames at and just past every bound are cheap to make.
TIGHT = Limits(max_items=4, max_string=6, max_pages=3)
LIMIT_SETS = [Limits(), TIGHT, Limits(max_items=16, max_containers=40)]

fast_message = st.sampled_from(sorted(c.TYPE for c in _FAST_TYPES)).flatmap(
    lambda tag: message_strategy(REGISTRY[tag])
)


def outcome(fn: Any, frame: bytes, limits: Limits) -> Any:
    try:
        msg = fn(frame, limits)
    except ProtocolError as exc:
        return ("error", exc.code, exc.message, exc.ref)
    return ("message", type(msg), [(f.name, type(getattr(msg, f.name)), getattr(msg, f.name))
                                   for f in dataclasses.fields(msg)])


def assert_agree(frame: bytes, limits: Limits | None = None) -> None:
    for lim in [limits] if limits else LIMIT_SETS:
        assert outcome(decode, frame, lim) == outcome(_decode_reference, frame, lim), frame[:120]


def raw_map(items: list[tuple[Any, Any]]) -> bytes:
    """A map in the given order, duplicate keys allowed (msgpack cannot pack those)."""
    head = bytes([0x80 | len(items)]) if len(items) < 16 else b"\xde" + len(items).to_bytes(2, "big")
    return head + b"".join(msgpack.packb(k, use_bin_type=True) + msgpack.packb(v, use_bin_type=True)
                           for k, v in items)


# --------------------------------------------------------------------------
# encode


@CHECK
@given(any_message)
def test_encode_writes_the_reference_bytes(msg: Message) -> None:
    assert encode(msg) == _encode_reference(msg)


def test_fast_types_are_every_type_and_free_form_ones_encode_with_msgpack() -> None:
    """The hot path and the relayed command's messages decode on the fast
    path; the free-form ones are still written by msgpack (msgspec would
    also write sets, enums, datetimes that msgpack refuses)."""
    tags = {c.TYPE for c in _FAST_TYPES}
    assert {"invalidate_range_start", "invalidate_range_end", "ack", "change_pte", "gup", "gup_reply",
            "dma_read", "dma_reply", "heartbeat"} <= tags
    free_form = {"command", "command_result", "admin_request", "admin_reply", "event"}
    assert free_form <= tags
    assert {c.TYPE for c in _FREE_FORM_TYPES} == free_form
    assert not free_form & {c.TYPE for c in _FAST_PREFIX}
    with pytest.raises(TypeError):
        encode(Command(id=1, command="status", args={"x": {1, 2}}))


# --------------------------------------------------------------------------
# decode: valid frames take the fast path and come back equal


@CHECK
@given(fast_message)
def test_valid_frames_decode_the_same(msg: Message) -> None:
    frame = encode(msg)
    assert decode(frame) == msg
    assert_agree(frame)


# --------------------------------------------------------------------------
# decode: near-valid frames


@CHECK
@given(fast_message, st.data())
def test_near_valid_maps_agree(msg: Message, data: st.DataObject) -> None:
    body = body_of(msg)
    for _ in range(data.draw(st.integers(1, 3))):
        keys = sorted(body, key=str)
        action = data.draw(st.sampled_from(["drop", "add", "replace", "replace"]))
        if action == "drop":
            body.pop(data.draw(st.sampled_from(keys)))
        elif action == "add":
            body[data.draw(st.one_of(st.text(max_size=8), st.sampled_from(keys)))] = data.draw(msgpack_values)
        else:
            body[data.draw(st.sampled_from(keys))] = data.draw(msgpack_values)
    assert_agree(msgpack.packb(body, use_bin_type=True))


@CHECK
@given(fast_message, st.data())
def test_byte_mutations_agree(msg: Message, data: st.DataObject) -> None:
    frame = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    assert_agree(bytes(frame))


@CHECK
@given(fast_message, st.data())
def test_reordered_and_duplicated_keys_agree(msg: Message, data: st.DataObject) -> None:
    """Maps in any order, with keys repeated (the last value wins in both),
    including a second ``t`` or ``v``."""
    items = list(body_of(msg).items())
    items = data.draw(st.permutations(items))
    for _ in range(data.draw(st.integers(0, 3))):
        key, value = data.draw(st.sampled_from(items))
        if data.draw(st.booleans()):
            value = data.draw(st.one_of(msgpack_values, st.sampled_from(sorted(REGISTRY)), st.integers(0, 2)))
        items.insert(data.draw(st.integers(0, len(items))), (key, value))
    assert_agree(raw_map(items[:15]))


def boundary_values(cls: type[Message], name: str, ann: Any) -> list[Any]:
    ints = [-1, 0, 1, 2, 3, 4, TIGHT.max_pages, ADDRESS_LIMIT - 1, ADDRESS_LIMIT, ADDRESS_LIMIT + 1,
            -(1 << 63), (1 << 64) - 1, True, False, 1.0]
    text = ["", "x" * TIGHT.max_string, "x" * (TIGHT.max_string + 1), "é" * TIGHT.max_string,
            "é" * (TIGHT.max_string + 1), b"x", 1, None]
    if ann is int:
        return ints
    if ann is str:
        return text + sorted(cls.CHOICES.get(name, ())) + ["ok ", "unmap"]
    if ann is bool:
        return [True, False, 0, 1, None]
    if ann is bytes:
        return [b"", b"x" * 100, "x", bytearray(b"x"), None]
    if ann == list[int]:
        return [[1] * n for n in (0, TIGHT.max_items, TIGHT.max_items + 1)] + [[True], [-1, (1 << 64) - 1], (1, 2)]
    if ann == list[str]:
        return [["a"] * TIGHT.max_items, ["a"] * (TIGHT.max_items + 1), ["x" * (TIGHT.max_string + 1)], [b"a"]]
    if ann == list[list[int]]:
        return [[[1] * 8], [[1] * 9], [[1, 2, 3]] * TIGHT.max_items, [[1]] * (TIGHT.max_items + 1), [[True]], [[]]]
    if typing.get_origin(ann) is dict:
        return free_form_values()
    raise AssertionError(ann)


def nested(depth: int, leaf: Any, kind: str = "dict") -> Any:
    """A value whose innermost ``leaf`` sits ``depth`` levels below the field's map."""
    for _ in range(depth):
        leaf = {"k": leaf} if kind == "dict" else [leaf]
    return leaf


def free_form_values() -> list[Any]:
    """Maps at and just past every bound ``_check_json_like`` sets (depth,
    items, keys, value types), and what msgpack refuses to pack is left out."""
    deepest = TIGHT.max_depth - 1  # the field's map is depth 1
    out: list[Any] = [{}, {"a": 1}, {"a": None, "b": True, "c": -(1 << 63), "d": (1 << 64) - 1, "e": 1.5, "f": "x"}]
    for kind in ("dict", "list"):
        for leaf in (1, [], {}, [1], {"k": 1}, None):
            out += [{"n": nested(deepest - 1, leaf, kind)}, {"n": nested(deepest, leaf, kind)},
                    {"n": nested(deepest + 1, leaf, kind)}]
    out += [{"a": [1] * TIGHT.max_items}, {"a": [1] * (TIGHT.max_items + 1)},
            {str(i): i for i in range(TIGHT.max_items)}, {str(i): i for i in range(TIGHT.max_items + 1)},
            {"a": {str(i): i for i in range(TIGHT.max_items + 1)}},
            {"a": b"bytes"}, {"a": [b"x"]}, {"a": {1: 2}}, {"a": {b"k": 2}}, {"a": {None: 1}},
            {"a": msgpack.ExtType(1, b"x")}, {1: 1}, {"a": "x" * (TIGHT.max_string + 1)},
            {"a": float("inf")}, [], [1], "x", 1, None]
    return out


BOUNDARY_CASES = [
    (cls.TYPE, f.name, value)
    for cls in _FAST_TYPES
    for f in dataclasses.fields(cls)
    for value in boundary_values(cls, f.name, typing.get_type_hints(cls)[f.name])
]


@pytest.mark.parametrize(("tag", "name", "value"), BOUNDARY_CASES, ids=lambda v: str(v)[:16])
def test_values_at_every_bound_agree(tag: str, name: str, value: Any) -> None:
    body = body_of(next_valid(REGISTRY[tag]))
    body[name] = value
    if "start" in body and "end" in body and name not in ("start", "end"):
        body["start"], body["end"] = 0x1000, 0x2000
    assert_agree(msgpack.packb(body, use_bin_type=True))


@pytest.mark.parametrize(("start", "end"), [(0x2000, 0x1000), (0x1000, 0x1000), (0, ADDRESS_LIMIT),
                                            (ADDRESS_LIMIT - 1, ADDRESS_LIMIT), (ADDRESS_LIMIT, ADDRESS_LIMIT)])
def test_ranges_agree(start: int, end: int) -> None:
    body = body_of(InvalidateRangeStart(1, 1, 0x1000, 0x2000, "UNMAP"))
    body["start"], body["end"] = start, end
    assert_agree(msgpack.packb(body, use_bin_type=True))


def test_container_limits_agree() -> None:
    """Frames past max_containers and maps past max_items go to the reference."""
    many = GupReply(ref=1, mm=1, pages=[[]] * 50)
    assert_agree(encode(many), Limits(max_items=64, max_containers=40))
    with pytest.raises(ProtocolError):
        decode(encode(many), Limits(max_items=64, max_containers=40))
    ok = Unpin(1, 1, 1, [1, 2])
    dup = raw_map([("v", 1), ("t", "unpin"), ("id", 1), ("epoch", 1), ("mm", 1), ("pfns", [1, 2]), ("id", 1)])
    assert decode(dup) == ok
    assert_agree(dup, Limits(max_items=6))
    with pytest.raises(ProtocolError):
        decode(dup, Limits(max_items=6))


def test_strings_and_bytes_like_frames() -> None:
    short = Limits(max_string=6)
    reg = Register(1, "n" * 6, "kvm", ["ops"], False, "i")
    assert decode(encode(reg), short) == reg
    frame = encode(Register(1, "n" * 7, "kvm", ["ops"], False, "i"))
    with pytest.raises(ProtocolError) as info:
        decode(frame, short)
    assert info.value.ref == 1
    assert decode(bytearray(encode(reg))) == reg
    assert decode(memoryview(encode(reg))) == reg


def test_real_frame_mutants_agree() -> None:
    """The fuzz test's kind of damage, on one frame of every fast type."""
    rnd = random.Random(11)
    for cls in _FAST_TYPES:
        frame = encode(next_valid(cls))
        for _ in range(200):
            b = bytearray(frame)
            for _ in range(rnd.randint(1, 3)):
                op = rnd.randrange(4)
                if op == 0:
                    b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
                elif op == 1 and len(b) > 1:
                    del b[rnd.randrange(1, len(b)):]
                elif op == 2:
                    b.insert(rnd.randrange(len(b) + 1), rnd.randrange(256))
                else:
                    b[rnd.randrange(len(b))] = rnd.choice([0xC0, 0xC2, 0xC3, 0xC4, 0xD9, 0xDC, 0xDE, 0x90, 0x80])
            assert_agree(bytes(b))


def holds_bytes(value: Any) -> bool:
    if isinstance(value, bytes):
        return True
    if isinstance(value, dict):
        return any(holds_bytes(v) for v in value.values())
    return isinstance(value, list) and any(holds_bytes(v) for v in value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(fast_message)
def test_valid_frames_of_fast_types_never_reach_the_reference(msg: Message) -> None:
    """Otherwise the fast path would be silently dead (e.g. a msgspec that
    changed what it accepts): only slower, every other test still green.
    (A free-form map holding bytes is the reference's: see ``_json_like_type``.)"""
    hypothesis.assume(not (type(msg) in _FREE_FORM_TYPES
                           and any(holds_bytes(getattr(msg, f.name)) for f in dataclasses.fields(msg))))
    frame = encode(msg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("protocol.codec._decode_reference", lambda *a: pytest.fail(f"reference decoded {msg!r}"))
        assert decode(frame) == msg


def test_the_benchmark_runs() -> None:
    """``benchmarks/codec.py`` measures every hot message both ways (no timing checked)."""
    import json
    import math
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "codec.py"
    out = subprocess.run([sys.executable, str(script), "--repeats", "3", "--loops", "5", "--json"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = json.loads(out)
    assert {(r["message"].split()[0], r["op"]) for r in rows} == {
        (tag, op)
        for tag in ("invalidate_range_start", "ack", "invalidate_range_end", "change_pte", "gup", "gup_reply",
                    "dma_read", "dma_reply", "heartbeat", "command", "command_result")
        for op in ("encode", "decode")
    }
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("msgpack_us", "msgspec_us", "struct_us", "ratio"))
        assert 0 < r["ratio_low"] <= r["ratio_high"]


def test_free_form_maps_take_the_fast_path_within_the_value_budget() -> None:
    """A relayed fault's command and result never reach the reference; a
    frame longer than ``max_values`` does (it could hold more values than
    the budget), and the budget's refusal is the reference's."""
    fault = Command(id=7, command="fault", args={"mm": 3, "addr": 0x7F0000000000, "pages": 1, "write": True})
    done = CommandResult(ref=7, ok=True, result={"mm": 3, "addr": 0x7F0000000000, "pages": [[0x7F0000000000, 12, 1]]})
    event = Event(seq=1, kind="fenced", fields={"node": "kvm-1", "why": ["silent", 6]})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("protocol.codec._decode_reference", lambda *a: pytest.fail("reached the reference"))
        for msg in (fault, done, event):
            assert decode(encode(msg)) == msg
    budget = Limits(max_values=20)
    many = Command(id=8, command="status", args={"a": list(range(25))})
    assert_agree(encode(many), budget)
    with pytest.raises(ProtocolError) as info:
        decode(encode(many), budget)
    assert info.value.code == "too_large" and info.value.ref == 8
    few = Command(id=9, command="status", args={"a": list(range(5))})
    assert_agree(encode(few), budget)
    assert decode(encode(few), budget) == few


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_free_form_maps_under_a_shallow_depth_limit_agree(depth: int) -> None:
    limits = Limits(max_depth=depth)
    for args in ({}, {"a": 1}, {"a": []}, {"a": [1]}, {"a": {}}, {"a": {"b": 1}}):
        assert_agree(encode(Command(id=1, command="x", args=args)), limits)
