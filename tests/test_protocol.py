"""The wire contract: every message round-trips; hostile frames raise
``ProtocolError`` and nothing else.

Strategies are derived from the message schemas (dataclass fields, their
annotations, ``CHOICES`` and ``ADDRESSES``), so a message added to
``protocol.messages`` is covered without touching this file.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocol import ADDRESS_LIMIT, PROTOCOL_VERSION, REGISTRY, Limits, Message, ProtocolError, decode, encode
from protocol.admin import COMMANDS, check_admin

INT64_MIN = -(1 << 63)
UINT64_MAX = (1 << 64) - 1
CODES = {"bad_message", "too_large", "bad_version", "unknown_type"}
LIMITS = Limits()
#: Fields the decoder requires to be >= 0 (besides addresses).
NON_NEGATIVE = ("npages", "length", "offset", "epoch", "mm", "pfn")

HOSTILE = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------
# the oracle: exactly ProtocolError, well formed


def expect_protocol_error(frame: bytes, limits: Limits | None = None) -> ProtocolError:
    """decode must raise ProtocolError itself (not a subclass, not anything else)."""
    try:
        msg = decode(frame, limits)
    except ProtocolError as exc:
        assert type(exc) is ProtocolError
        assert exc.code in CODES
        assert isinstance(exc.message, str) and len(exc.message) < 1000
        assert exc.ref is None or type(exc.ref) is int
        assert exc.__cause__ is None or isinstance(exc.__cause__, Exception)
        return exc
    except Exception as exc:  # pragma: no cover - this is the failure we hunt
        pytest.fail(f"decode raised {type(exc).__name__}: {exc!r} for {frame[:80]!r}")
    pytest.fail(f"decoded a hostile frame to {repr(msg)[:300]}")


def decode_or_protocol_error(frame: bytes, limits: Limits | None = None) -> Message | None:
    """For mutations that may stay valid: either a valid message or ProtocolError."""
    try:
        msg = decode(frame, limits)
    except ProtocolError as exc:
        assert type(exc) is ProtocolError and exc.code in CODES
        return None
    except Exception as exc:  # pragma: no cover
        pytest.fail(f"decode raised {type(exc).__name__}: {exc!r} for {frame[:80]!r}")
    assert type(msg) in REGISTRY.values()
    assert_well_typed(msg)
    assert decode(encode(msg), limits) == msg
    return msg


def assert_well_typed(msg: Message) -> None:
    """An independent check that a decoded message has the annotated types."""
    hints = typing.get_type_hints(type(msg))
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        ann = hints[f.name]
        origin = typing.get_origin(ann)
        if ann in (int, bool, str, bytes):
            assert type(value) is ann, (f.name, value)
        elif origin is list:
            assert type(value) is list
        elif origin is dict:
            assert type(value) is dict and all(type(k) is str for k in value)
        if f.name in type(msg).ADDRESSES:
            assert 0 <= value <= ADDRESS_LIMIT
        if f.name in type(msg).CHOICES:
            assert value in type(msg).CHOICES[f.name]


# --------------------------------------------------------------------------
# strategies from the schemas

ints = st.integers(INT64_MIN, UINT64_MAX)
small_text = st.text(max_size=40)


def json_like(depth: int = 1) -> st.SearchStrategy[Any]:
    """Admin args / results: what ``_check_json_like`` accepts at ``depth``."""
    scalars = st.one_of(
        st.none(), st.booleans(), ints, st.floats(allow_nan=False), small_text, st.binary(max_size=40)
    )
    if depth >= LIMITS.max_depth:
        return scalars
    return st.one_of(
        scalars,
        st.lists(st.deferred(lambda: json_like(depth + 1)), max_size=4),
        st.dictionaries(small_text, st.deferred(lambda: json_like(depth + 1)), max_size=4),
    )


def field_strategy(cls: type[Message], name: str, ann: Any) -> st.SearchStrategy[Any]:
    if name in cls.CHOICES:
        return st.sampled_from(sorted(cls.CHOICES[name]))
    if name in cls.ADDRESSES:
        return st.integers(0, ADDRESS_LIMIT - 1)
    if name == "npages":
        return st.integers(1, LIMITS.max_pages)
    if name in NON_NEGATIVE:
        return st.integers(0, UINT64_MAX)
    if ann is int:
        return ints
    if ann is bool:
        return st.booleans()
    if ann is str:
        return st.text(max_size=80)
    if ann is bytes:
        return st.binary(max_size=300)
    if ann == list[int]:
        return st.lists(ints, max_size=20)
    if ann == list[str]:
        return st.lists(small_text, max_size=10)
    if ann == list[list[int]]:
        return st.lists(st.lists(ints, max_size=8), max_size=20)
    if typing.get_origin(ann) is dict:
        return st.dictionaries(small_text, json_like(2), max_size=6)
    raise AssertionError(f"no strategy for {cls.__name__}.{name}: {ann!r}")


def fix_range(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A valid range has start < end <= ADDRESS_LIMIT."""
    if "start" in kwargs and "end" in kwargs:
        lo, hi = sorted((kwargs["start"], kwargs["end"]))
        kwargs["start"], kwargs["end"] = lo, max(hi, lo + 1)
    return kwargs


def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: field_strategy(cls, f.name, hints[f.name]) for f in dataclasses.fields(cls)}
    return st.fixed_dictionaries(fields).map(fix_range).map(lambda kw: cls(**kw))


any_message = st.sampled_from(sorted(REGISTRY)).flatmap(lambda tag: message_strategy(REGISTRY[tag]))


def body_of(msg: Message) -> dict[str, Any]:
    return msgpack.unpackb(encode(msg), raw=False)


def pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def request_id(body: dict[str, Any]) -> int | None:
    ref = body.get("id", body.get("ref"))
    return ref if type(ref) is int else None


# --------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("tag", sorted(REGISTRY))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_message_round_trips(tag: str, data: st.DataObject) -> None:
    cls = REGISTRY[tag]
    msg = data.draw(message_strategy(cls))
    frame = encode(msg)
    assert len(frame) <= LIMITS.max_frame
    back = decode(frame, LIMITS)
    assert type(back) is cls
    assert back == msg
    assert_well_typed(back)
    body = body_of(msg)
    assert body["v"] == PROTOCOL_VERSION and body["t"] == tag


@pytest.mark.parametrize("tag", sorted(REGISTRY))
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_fields_with_defaults_may_be_omitted(tag: str, data: st.DataObject) -> None:
    """Append-only evolution: an older peer omits newer (defaulted) fields."""
    cls = REGISTRY[tag]
    msg = data.draw(message_strategy(cls))
    body = body_of(msg)
    expected = {}
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if has_default and data.draw(st.booleans()):
            del body[f.name]
            expected[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        else:
            expected[f.name] = getattr(msg, f.name)
    assert decode(pack(body)) == cls(**expected)


def test_registry_tags_are_readable_and_unique() -> None:
    assert len(REGISTRY) == len({c.__name__ for c in REGISTRY.values()})
    for tag, cls in REGISTRY.items():
        assert tag == cls.TYPE and tag.islower() and " " not in tag
        for name in cls.ADDRESSES:
            assert name in {f.name for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------
# hostile frames: structure


@HOSTILE
@given(st.binary(max_size=2000))
def test_random_bytes(frame: bytes) -> None:
    decode_or_protocol_error(frame)


@HOSTILE
@given(any_message, st.data())
def test_truncated_frames(msg: Message, data: st.DataObject) -> None:
    frame = encode(msg)
    cut = data.draw(st.integers(0, len(frame) - 1))
    expect_protocol_error(frame[:cut])


def test_every_truncation_of_one_frame() -> None:
    from protocol.messages import InvalidateRangeStart

    frame = encode(InvalidateRangeStart(7, 1, 0x1000, 0x3000, "UNMAP"))
    for cut in range(len(frame)):
        expect_protocol_error(frame[:cut])


@HOSTILE
@given(any_message, st.binary(min_size=1, max_size=20))
def test_trailing_garbage(msg: Message, tail: bytes) -> None:
    expect_protocol_error(encode(msg) + tail)


@HOSTILE
@given(any_message, st.data())
def test_byte_mutations(msg: Message, data: st.DataObject) -> None:
    frame = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(frame) - 1))
        frame[at] = data.draw(st.integers(0, 255))
    decode_or_protocol_error(bytes(frame))


def test_oversized_frame() -> None:
    from protocol.messages import DmaWrite

    big = encode(DmaWrite(1, 1, 1, 0x1000, 5, 0, b"x" * 2000))
    exc = expect_protocol_error(big, Limits(max_frame=1000))
    assert exc.code == "too_large"
    exc = expect_protocol_error(b"\x00" * (LIMITS.max_frame + 1))
    assert exc.code == "too_large"


@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k", b"\xdc\x00\x01", b"\xdf\x00\x00\x00\x01\xc0"])
def test_nested_10_000_deep(opener: bytes) -> None:
    """Arrays / maps nested 10^4 deep, alone and inside an admin argument."""
    deep = opener * 10_000 + b"\xc0"
    expect_protocol_error(deep)
    head = {"v": PROTOCOL_VERSION, "t": "admin_request", "id": 9, "command": "status"}
    frame = bytes([0x80 | 5]) + b"".join(pack(k) + pack(v) for k, v in head.items()) + pack("args")
    exc = expect_protocol_error(frame + b"\x81" + pack("a") + deep)
    assert exc.code == "bad_message"


@pytest.mark.parametrize("lists", [LIMITS.max_depth - 2, LIMITS.max_depth - 1, 100, 1000])
def test_admin_args_nesting_limit(lists: int) -> None:
    """``args`` is level 1, so a scalar under n lists sits at level n + 2."""
    from protocol.messages import AdminRequest

    value: Any = 1
    for _ in range(lists):
        value = [value]
    frame = bytes([0x80 | 5]) + b"".join(
        pack(k) + pack(v) for k, v in {"v": 1, "t": "admin_request", "id": 3, "command": "x"}.items()
    )
    raw = pack("args") + b"\x81" + pack("a") + b"\x91" * lists + b"\x01"
    if lists + 2 <= LIMITS.max_depth:
        assert decode(frame + raw) == AdminRequest(3, "x", {"a": value})
    else:
        assert expect_protocol_error(frame + raw).ref == 3


def _bomb(item: bytes, outer: int = 60, inner: int = 60_000) -> bytes:
    """An admin request whose args hold outer x inner copies of ``item``:
    3.6 MB, under max_frame, every container under max_items."""
    head = {"v": 1, "t": "admin_request", "id": 5, "command": "status"}
    frame = bytes([0x80 | 5]) + b"".join(pack(k) + pack(v) for k, v in head.items())
    inner_array = b"\xdc" + inner.to_bytes(2, "big") + item * inner
    return frame + pack("args") + b"\x81" + pack("a") + b"\xdc" + outer.to_bytes(2, "big") + inner_array * outer


@pytest.mark.parametrize("item", [b"\x90", b"\x80", b"\xc0", b"\x00", b"\xa0"], ids=["[]", "{}", "nil", "0", "''"])
def test_amplification_bombs_are_refused(item: bytes) -> None:
    """3.6 MB of one-byte empty containers (or scalars) would become millions
    of Python objects (~265 MB, seconds of CPU in the host's only thread):
    refused while unpacking / walking, with the request's ref."""
    frame = _bomb(item)
    assert len(frame) < LIMITS.max_frame
    exc = expect_protocol_error(frame)
    assert exc.ref == 5


# --------------------------------------------------------------------------
# hostile frames: message level


@pytest.mark.parametrize(
    "body",
    [
        None,
        1,
        "invalidate_range_start",
        b"\x01",
        [1, "ack", 3],
        {},
        {"v": 1},
        {"t": "ack", "ref": 1},
        {"v": 1, "t": "no_such_message", "id": 1},
        {"v": 1, "t": "", "id": 1},
        {"v": 1, "t": None, "id": 1},
        {"v": 1, "t": ["ack"], "ref": 1},
        {"v": 1, "t": b"ack", "ref": 1},
        {"v": 1, "t": "Message", "id": 1},
        {"v": 1, "t": "ack"},
        {"v": 1, "t": "ack", "ref": 1, "extra": 2},
        {"v": 1, "t": "ack", "ref": 1, 7: 2},
        {"v": 1, "t": "ack", "ref": 1, b"ref": 2},
        {"v": 1, "t": "ack", "ref": 1, None: 2},
    ],
)
def test_not_a_message(body: Any) -> None:
    expect_protocol_error(pack(body))


@pytest.mark.parametrize("version", [0, 2, -1, True, 1.0, "1", b"\x01", None, [1], UINT64_MAX])
def test_wrong_version(version: Any) -> None:
    exc = expect_protocol_error(pack({"v": version, "t": "ack", "ref": 4}))
    assert exc.code == "bad_version" and exc.ref == 4


def test_unknown_type_keeps_the_ref() -> None:
    exc = expect_protocol_error(pack({"v": 1, "t": "mmap_everything", "id": 11}))
    assert exc.code == "unknown_type" and exc.ref == 11


def confusions(kind: Any, name: str, limits: Limits) -> list[Any]:
    """Values of the wrong type (or impossible value) for a field."""
    common = [None, [], {}]
    if kind is int:
        return [*common, True, False, "1", b"\x01", 1.0, 1.5, float("nan"), [1], {"n": 1}]
    if kind is bool:
        return [*common, 0, 1, "true", b"\x01", 1.0]
    if kind is str:
        return [*common, b"bytes", 1, True, 1.0, ["a"], "x" * (limits.max_string + 1)]
    if kind is bytes:
        return [*common, "str", 1, True, 1.0, [1], {"b": b""}]
    if kind == list[int]:
        return [None, {}, "abc", b"abc", 1, [True], [1.5], ["1"], [None], [[1]], [UINT64_MAX, -1, 1.0]]
    if kind == list[str]:
        return [None, {}, "abc", 1, [1], [b"a"], [None], [["a"]], ["x" * (limits.max_string + 1)]]
    if kind == list[list[int]]:
        return [None, {}, [1], [[1] * 9], [["a"]], [[True]], [[1.0]], [None], [{}], "x"]
    if typing.get_origin(kind) is dict:
        return [None, [], "x", 1, True, b"x", {"k": {1: 2}}, {"k": [[[[[[[[[1]]]]]]]]]}]
    raise AssertionError(kind)


CONFUSED_CASES = [
    (tag, f.name, bad)
    for tag, cls in sorted(REGISTRY.items())
    for f in dataclasses.fields(cls)
    for bad in confusions(typing.get_type_hints(cls)[f.name], f.name, LIMITS)
]


@pytest.mark.parametrize(("tag", "name", "bad"), CONFUSED_CASES, ids=lambda v: str(v)[:20])
def test_type_confused_field(tag: str, name: str, bad: Any) -> None:
    cls = REGISTRY[tag]
    body = body_of(next_valid(cls))
    body[name] = bad
    exc = expect_protocol_error(pack(body))
    if name not in ("id", "ref"):
        assert exc.ref == request_id(body)


@HOSTILE
@given(st.data())
def test_type_confused_fields_hypothesis(data: st.DataObject) -> None:
    """The same, with hypothesis choosing message, field and a value whose
    msgpack type differs from the annotated one."""
    msg = data.draw(any_message)
    cls = type(msg)
    body = body_of(msg)
    hints = typing.get_type_hints(cls)
    name = data.draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]))
    body[name] = data.draw(wrongly_typed(hints[name]))
    exc = expect_protocol_error(pack(body))
    if name not in ("id", "ref"):
        assert exc.ref == request_id(body)


def wrongly_typed(ann: Any) -> st.SearchStrategy[Any]:
    """A value whose msgpack type differs from the annotation."""
    bad_items = st.one_of(st.none(), st.floats(), st.binary(max_size=4), st.dictionaries(small_text, st.none()))
    options: dict[Any, st.SearchStrategy[Any]] = {
        None: st.none(),
        bool: st.booleans(),
        int: ints,
        float: st.floats(),
        str: small_text,
        bytes: st.binary(max_size=20),
        # A list is wrong for a scalar; for a list field, its items are wrong.
        list: st.lists(bad_items, min_size=1, max_size=3),
        # A map is wrong for a scalar or a list; for a map field, its keys are.
        dict: st.dictionaries(st.integers(INT64_MIN, UINT64_MAX), st.none(), min_size=1, max_size=3),
    }
    return st.one_of(*(s for kind, s in options.items() if kind is not ann))


_EXAMPLES: dict[type[Message], Message] = {}


def next_valid(cls: type[Message]) -> Message:
    """One deterministic valid instance of ``cls``."""
    if cls not in _EXAMPLES:
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            ann = hints[f.name]
            if f.name in cls.CHOICES:
                kwargs[f.name] = sorted(cls.CHOICES[f.name])[0]
            elif f.name in ("start", "end"):
                kwargs[f.name] = 0x1000 if f.name == "start" else 0x2000
            elif ann in (int, bool, str, bytes):
                kwargs[f.name] = {int: 1, bool: True, str: "s", bytes: b"b"}[ann]
            else:
                kwargs[f.name] = typing.get_origin(ann)()
        _EXAMPLES[cls] = cls(**kwargs)
    return _EXAMPLES[cls]


ADDRESS_CASES = [
    (tag, name, bad)
    for tag, cls in sorted(REGISTRY.items())
    for name in cls.ADDRESSES
    for bad in (-1, INT64_MIN, ADDRESS_LIMIT + 1, UINT64_MAX, ADDRESS_LIMIT if name != "end" else ADDRESS_LIMIT + 4096)
]


@pytest.mark.parametrize(("tag", "name", "bad"), ADDRESS_CASES)
def test_impossible_addresses(tag: str, name: str, bad: int) -> None:
    cls = REGISTRY[tag]
    body = body_of(next_valid(cls))
    body[name] = bad
    exc = expect_protocol_error(pack(body))
    assert exc.code == "bad_message" and exc.ref == request_id(body)


RANGE_TAGS = sorted(t for t, c in REGISTRY.items() if {"start", "end"} <= set(c.ADDRESSES))


@pytest.mark.parametrize("tag", RANGE_TAGS)
@pytest.mark.parametrize(("start", "end"), [(0x2000, 0x1000), (0x1000, 0x1000), (ADDRESS_LIMIT, ADDRESS_LIMIT)])
def test_impossible_ranges(tag: str, start: int, end: int) -> None:
    body = body_of(next_valid(REGISTRY[tag]))
    body["start"], body["end"] = start, end
    expect_protocol_error(pack(body))


def test_full_address_space_range_is_possible() -> None:
    from protocol.messages import InvalidateRangeStart

    msg = InvalidateRangeStart(1, 1, 0, ADDRESS_LIMIT, "RELEASE")
    assert decode(encode(msg)) == msg


NEGATIVE_CASES = [
    (tag, name)
    for tag, cls in sorted(REGISTRY.items())
    for name in NON_NEGATIVE
    if name in {f.name for f in dataclasses.fields(cls)}
]


@pytest.mark.parametrize(("tag", "name"), NEGATIVE_CASES)
def test_negative_counts_and_ids(tag: str, name: str) -> None:
    body = body_of(next_valid(REGISTRY[tag]))
    body[name] = -1
    expect_protocol_error(pack(body))


@pytest.mark.parametrize("npages", [0, LIMITS.max_pages + 1, UINT64_MAX])
def test_gup_page_count_limits(npages: int) -> None:
    from protocol.messages import Gup

    body = body_of(Gup(1, 1, 1, 0x1000, 1, False))
    body["npages"] = npages
    expect_protocol_error(pack(body))


@pytest.mark.parametrize(
    ("tag", "name"), [(t, n) for t, c in sorted(REGISTRY.items()) for n in c.CHOICES]
)
def test_values_outside_choices(tag: str, name: str) -> None:
    body = body_of(next_valid(REGISTRY[tag]))
    for bad in ("", "unmap", "ok ", "X" * 100):
        body[name] = bad
        expect_protocol_error(pack(body))


def test_missing_required_fields() -> None:
    for cls in REGISTRY.values():
        body = body_of(next_valid(cls))
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                partial = {k: v for k, v in body.items() if k != f.name}
                expect_protocol_error(pack(partial))


def test_container_limits() -> None:
    from protocol.messages import Unpin

    limits = Limits(max_items=10)
    ok = Unpin(1, 1, 1, list(range(10)))
    assert decode(encode(ok), limits) == ok
    expect_protocol_error(encode(Unpin(1, 1, 1, list(range(11)))), limits)
    body = body_of(ok)
    for i in range(20):
        body[f"x{i}"] = i
    expect_protocol_error(pack(body), limits)


def test_decode_accepts_bytes_like_and_refuses_the_rest() -> None:
    from protocol.messages import Ok

    frame = encode(Ok(3))
    assert decode(bytearray(frame)) == Ok(3)
    assert decode(memoryview(frame)) == Ok(3)
    for bad in (None, "text", 12, [frame]):
        with pytest.raises(ProtocolError) as info:
            decode(bad)  # type: ignore[arg-type]
        assert type(info.value) is ProtocolError


# --------------------------------------------------------------------------
# arbitrary msgpack values in near-valid maps


msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        ints,
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=20),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), ints, st.binary(max_size=4)), children, max_size=4),
    ),
    max_leaves=20,
)


@HOSTILE
@given(msgpack_values)
def test_arbitrary_msgpack_values(value: Any) -> None:
    decode_or_protocol_error(pack(value))


@HOSTILE
@given(any_message, st.data())
def test_near_valid_maps(msg: Message, data: st.DataObject) -> None:
    """Start from a valid map; drop, add or replace keys with arbitrary values."""
    body = body_of(msg)
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["drop", "add", "replace"]))
        keys = sorted(body, key=str)
        if action == "drop":
            body.pop(data.draw(st.sampled_from(keys)))
        elif action == "add":
            body[data.draw(st.one_of(st.text(max_size=8), ints))] = data.draw(msgpack_values)
        else:
            body[data.draw(st.sampled_from(keys))] = data.draw(msgpack_values)
    assume(body != body_of(msg))
    decode_or_protocol_error(pack(body))


# --------------------------------------------------------------------------
# admin arguments (protocol.admin): the second gate on the admin channel


@HOSTILE
@given(st.one_of(st.sampled_from(sorted(COMMANDS)), small_text), st.dictionaries(small_text, json_like(2), max_size=6))
def test_admin_arguments_only_raise_protocol_error(command: str, args: dict[str, Any]) -> None:
    try:
        out = check_admin(command, args)
    except ProtocolError as exc:
        assert type(exc) is ProtocolError and exc.code == "bad_message"
    else:
        assert command in COMMANDS and set(out) == {a.name for a in COMMANDS[command]}


def _valid_admin_value(arg: Any) -> Any:
    return {
        "int": max(arg.minimum, 1) if arg.maximum >= 1 else arg.minimum,
        "addr": 0x1000,
        "bool": False,
        "str": "n",
        "bytes": b"",
        "choice": arg.choices[0] if arg.choices else None,
    }[arg.kind]


@HOSTILE
@given(st.sampled_from(sorted(c for c, spec in COMMANDS.items() if spec)), st.data())
def test_admin_arguments_type_confused(command: str, data: st.DataObject) -> None:
    spec = COMMANDS[command]
    args = {a.name: _valid_admin_value(a) for a in spec}
    assert set(check_admin(command, args)) == set(args)
    arg = data.draw(st.sampled_from(spec))
    wrong = {
        "int": st.one_of(
            st.booleans(),
            st.floats(),
            small_text,
            st.binary(),
            st.integers(max_value=arg.minimum - 1),
            st.integers(min_value=arg.maximum + 1),
        ),
        "addr": st.one_of(st.booleans(), st.floats(), small_text, st.integers(max_value=-1), st.integers(ADDRESS_LIMIT + 1)),
        "bool": st.one_of(st.integers(), small_text, st.floats()),
        "str": st.one_of(st.integers(), st.binary(), st.text(min_size=257, max_size=300)),
        "bytes": st.one_of(st.integers(), small_text, st.lists(st.integers(0, 255), min_size=1)),
        "choice": st.one_of(st.integers(), st.binary(), small_text.filter(lambda s: s not in arg.choices)),
    }[arg.kind]
    args[arg.name] = data.draw(wrong)
    with pytest.raises(ProtocolError) as info:
        check_admin(command, args)
    assert type(info.value) is ProtocolError


def test_the_wire_origins_are_the_hosts() -> None:
    """``origin`` of a start / change_pte: protocol.types.Origin, and nothing else, is on the wire."""
    from protocol import messages
    from protocol.types import Origin

    assert messages._ORIGINS == {o.value for o in Origin}
    assert messages.InvalidateRangeStart.CHOICES["origin"] == messages.ChangePte.CHOICES["origin"] == messages._ORIGINS
    assert [o.background for o in Origin] == [False, True, True, True]
