"""Encode and strictly decode messages.

``decode`` never raises anything but :class:`ProtocolError` whatever the bytes:
oversized frame, not MessagePack, not a map, wrong version, unknown type,
missing / unknown / wrongly typed field, out-of-range integer, impossible
address or range, too deep a nesting.  Nothing is half-decoded.

Two decoders, one contract.  The *reference* decoder (``_decode_reference``:
msgpack, then every rule checked in Python) decides every frame it sees and
names what is wrong with a frame.  The *fast path* (msgspec, in C) sees
every frame first: a ``msgspec.Struct`` per type, generated from the
dataclass schema and the limits (``forbid_unknown_fields``, the tag and
version as literals, ``Meta`` bounds for addresses, counts, strings and
lists; the free-form maps of the relayed commands, the admin channel and
events as JSON-like values nested at most ``max_depth``, string keys,
``max_items`` per container), validates the frame; the frame is then decoded
into the message dataclass itself.  Whatever the fast
path refuses -- and every frame it is not sure to decide exactly as the
reference would (large frames, maps that are not fixmaps, a free-form map
holding bytes or longer than ``max_values`` bytes) -- goes
to the reference decoder, so every error, its code and its ``ref`` come from
one place, and the fast path only ever accepts what the reference accepts,
with the same result (``tests/test_codec.py`` checks the two against each
other).  ``benchmarks/codec.py`` measures both.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal

import msgpack
import msgspec

from .errors import ProtocolError
from .limits import Limits
from .messages import PROTOCOL_VERSION, REGISTRY, Message
from .types import ADDRESS_LIMIT

_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1
#: Integer fields that must not be negative, in any message that has them.
_NON_NEGATIVE = ("npages", "length", "offset", "epoch", "mm", "pfn")


def _kind_of(annotation: Any) -> str:
    """Reduce an annotation to one of the schema kinds the validator knows."""
    origin = typing.get_origin(annotation)
    if annotation is int:
        return "int"
    if annotation is bool:
        return "bool"
    if annotation is str:
        return "str"
    if annotation is bytes:
        return "bytes"
    if annotation is float:
        return "float"
    if origin is list:
        (arg,) = typing.get_args(annotation)
        if arg is int:
            return "list_int"
        if arg is str:
            return "list_str"
        if typing.get_origin(arg) is list and typing.get_args(arg) == (int,):
            return "list_list_int"
    if origin is dict:
        return "dict"
    raise TypeError(f"unsupported field annotation {annotation!r}")


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    kind: str
    required: bool


def _schema(cls: type[Message]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append(_Field(f.name, _kind_of(hints[f.name]), required))
    return tuple(out)


_SCHEMAS: dict[str, tuple[_Field, ...]] = {tag: _schema(cls) for tag, cls in REGISTRY.items()}


class _TooManyContainers(Exception):
    """Raised from inside msgpack's hooks to stop an amplification bomb early."""


def encode(msg: Message) -> bytes:
    """Serialise one message: ``{"v": PROTOCOL_VERSION, "t": TYPE, **fields}``,
    fields in declaration order (the same bytes on either path).

    Raises:
        ProtocolError: the message is not a registered type (a programming
            error on our side, reported the same way as a bad peer frame).
    """
    prefix = _FAST_PREFIX.get(type(msg))
    if prefix is not None:
        # msgspec writes the dataclass as a fixmap of its fields; the version
        # and the tag go in front, and the map header counts them.
        return prefix + _ENCODER.encode(msg)[1:]
    return _encode_reference(msg)


def encode_within(msg: Message, limits: Limits) -> bytes:
    """:func:`encode`, for a frame a peer decoding with ``limits`` accepts.

    A large reply (a status, a relayed command's result) is checked the way
    the peer will check it, so the sender can answer with an error instead
    of a frame the peer's socket or decoder refuses (libzmq drops the
    connection of a peer that sends more than ``MAXMSGSIZE``).  A frame of
    at most ``min(max_values, max_containers)`` bytes cannot break a count
    limit (every value takes a byte), so only larger ones are decoded again.

    Raises:
        ProtocolError("too_large"): the peer would refuse the frame.
    """
    frame = encode(msg)
    if len(frame) > limits.max_frame:
        raise ProtocolError("too_large", f"{msg.TYPE} of {len(frame)} bytes exceeds the frame limit of {limits.max_frame}")
    if len(frame) > min(limits.max_values, limits.max_containers):
        try:
            decode(frame, limits)
        except ProtocolError as exc:
            raise ProtocolError("too_large", f"{msg.TYPE} too large for a peer to decode: {exc.message}") from None
    return frame


def _encode_reference(msg: Message) -> bytes:
    """msgpack from a dict: the message types with free-form map fields,
    whose values stay with msgpack's rules both ways."""
    tag = type(msg).TYPE
    if tag not in _SCHEMAS:
        raise ProtocolError("bad_message", f"unregistered message type {type(msg).__name__}")
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": tag}
    for f in _SCHEMAS[tag]:
        body[f.name] = getattr(msg, f.name)
    return msgpack.packb(body, use_bin_type=True)


def _check_json_like(value: Any, limits: Limits, depth: int, where: str, budget: list[int]) -> None:
    """Admin args and results: str keys, scalar / list / map values, bounded
    depth, at most ``budget[0]`` values in all (decremented as they are seen)."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ProtocolError("too_large", f"{where}: more than {limits.max_values} values")
    if depth > limits.max_depth:
        raise ProtocolError("bad_message", f"{where}: nested deeper than {limits.max_depth}")
    if value is None or isinstance(value, (bool, str, bytes, float)):
        return
    if isinstance(value, int):
        if not (_INT64_MIN <= value <= _UINT64_MAX):
            raise ProtocolError("bad_message", f"{where}: integer out of range")
        return
    if isinstance(value, list):
        if len(value) > limits.max_items:
            raise ProtocolError("bad_message", f"{where}: more than {limits.max_items} items")
        for item in value:
            _check_json_like(item, limits, depth + 1, where, budget)
        return
    if isinstance(value, dict):
        if len(value) > limits.max_items:
            raise ProtocolError("bad_message", f"{where}: more than {limits.max_items} items")
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError("bad_message", f"{where}: map key is not a string")
            _check_json_like(item, limits, depth + 1, where, budget)
        return
    raise ProtocolError("bad_message", f"{where}: unsupported value type {type(value).__name__}")


def _check_field(f: _Field, value: Any, limits: Limits) -> None:
    kind = f.kind
    bad = ProtocolError("bad_message", f"field {f.name!r} must be {kind}")
    if kind == "int":
        # bool is an int in Python; msgpack keeps them apart and so do we.
        if type(value) is not int:
            raise bad
        if not (_INT64_MIN <= value <= _UINT64_MAX):
            raise ProtocolError("bad_message", f"field {f.name!r} out of range")
    elif kind == "bool":
        if type(value) is not bool:
            raise bad
    elif kind == "str":
        if type(value) is not str:
            raise bad
        if len(value) > limits.max_string:
            raise ProtocolError("bad_message", f"field {f.name!r} longer than {limits.max_string}")
    elif kind == "bytes":
        if type(value) is not bytes:
            raise bad
    elif kind == "float":
        if type(value) not in (float, int):
            raise bad
    elif kind in ("list_int", "list_str", "list_list_int"):
        if type(value) is not list:
            raise bad
        if len(value) > limits.max_items:
            raise ProtocolError("bad_message", f"field {f.name!r} has more than {limits.max_items} items")
        for item in value:
            if kind == "list_int":
                ok = type(item) is int and _INT64_MIN <= item <= _UINT64_MAX
            elif kind == "list_str":
                ok = type(item) is str and len(item) <= limits.max_string
            else:
                ok = (
                    type(item) is list
                    and len(item) <= 8
                    and all(type(x) is int and _INT64_MIN <= x <= _UINT64_MAX for x in item)
                )
            if not ok:
                raise bad
    elif kind == "dict":
        if type(value) is not dict:
            raise bad
        _check_json_like(value, limits, 1, f"field {f.name!r}", [limits.max_values])
    else:  # pragma: no cover - _kind_of rejects anything else at import
        raise bad


def _peek_ref(frame: bytes, limits: Limits) -> int | None:
    """The ``id`` / ``ref`` of a top-level map too costly to decode, found by
    skipping (in C, without building them) the other values."""
    unpacker = msgpack.Unpacker(
        raw=False,
        max_buffer_size=len(frame),
        max_array_len=limits.max_items,
        max_map_len=limits.max_items,
        max_ext_len=0,
    )
    unpacker.feed(frame)

    def next_is_scalar() -> bool:
        first = frame[unpacker.tell()]
        return not (0x80 <= first <= 0x9F or first in (0xDC, 0xDD, 0xDE, 0xDF))

    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack() if next_is_scalar() else unpacker.skip()
            if key in ("id", "ref") and next_is_scalar():
                value = unpacker.unpack()
                if type(value) is int:
                    return value
            else:
                unpacker.skip()
    except Exception:  # garbage further on: no ref then
        pass
    return None


def _decode_reference(frame: bytes, limits: Limits) -> Message:
    """Parse and validate one frame with msgpack and Python checks (see the
    module docstring): the decoder of record."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("bad_message", "frame is not bytes")
    size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
    if size > limits.max_frame:
        raise ProtocolError("too_large", f"frame of {size} bytes exceeds {limits.max_frame}")
    containers = 0

    def count_container(obj: Any) -> Any:
        # Called by msgpack for every array and map it builds.
        nonlocal containers
        containers += 1
        if containers > limits.max_containers:
            raise _TooManyContainers
        return obj

    # Each container takes at least one byte: only a frame longer than the
    # limit can exceed it, so small frames skip the (slower) hooks.
    hooks: dict[str, Any] = {}
    if size > limits.max_containers:
        hooks = {"list_hook": count_container, "object_hook": count_container}
    data = bytes(frame)
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            max_array_len=limits.max_items,
            max_map_len=limits.max_items,
            max_str_len=limits.max_frame,
            max_bin_len=limits.max_frame,
            max_ext_len=0,
            **hooks,
        )
    except _TooManyContainers:
        raise ProtocolError(
            "too_large", f"more than {limits.max_containers} arrays and maps", _peek_ref(data, limits)
        ) from None
    except RecursionError as exc:
        raise ProtocolError("bad_message", "nested too deep") from exc
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise ProtocolError("bad_message", f"not MessagePack: {type(exc).__name__}") from exc
    if type(body) is not dict:
        raise ProtocolError("bad_message", "frame is not a map")
    ref = body.get("id", body.get("ref"))
    ref = ref if type(ref) is int else None
    if body.get("v") != PROTOCOL_VERSION or type(body.get("v")) is not int:
        raise ProtocolError("bad_version", f"protocol version {body.get('v')!r}, want {PROTOCOL_VERSION}", ref)
    tag = body.get("t")
    if type(tag) is not str or tag not in REGISTRY:
        raise ProtocolError("unknown_type", f"unknown message type {tag!r}"[:200], ref)
    cls = REGISTRY[tag]
    schema = _SCHEMAS[tag]
    names = {f.name for f in schema}
    extra = [k for k in body if k not in names and k not in ("v", "t")]
    if extra:
        raise ProtocolError("bad_message", f"{tag}: unknown field {str(extra[0])[:64]!r}", ref)
    kwargs: dict[str, Any] = {}
    for f in schema:
        if f.name not in body:
            if f.required:
                raise ProtocolError("bad_message", f"{tag}: missing field {f.name!r}", ref)
            continue
        try:
            _check_field(f, body[f.name], limits)
        except ProtocolError as exc:
            raise ProtocolError(exc.code, f"{tag}: {exc.message}", ref) from None
        kwargs[f.name] = body[f.name]
    for name, allowed in cls.CHOICES.items():
        if name in kwargs and kwargs[name] not in allowed:
            raise ProtocolError("bad_message", f"{tag}: {name} must be one of {sorted(allowed)}", ref)
    for name in cls.ADDRESSES:
        # ``end`` is exclusive and may be ADDRESS_LIMIT; any other address is a byte.
        top = ADDRESS_LIMIT if name == "end" else ADDRESS_LIMIT - 1
        if name in kwargs and not (0 <= kwargs[name] <= top):
            raise ProtocolError("bad_message", f"{tag}: {name} is not a user address", ref)
    if "start" in cls.ADDRESSES and "end" in cls.ADDRESSES:
        if "start" in kwargs and "end" in kwargs and not kwargs["start"] < kwargs["end"]:
            raise ProtocolError("bad_message", f"{tag}: impossible range", ref)
    for name in _NON_NEGATIVE:
        if name in kwargs and kwargs[name] < 0:
            raise ProtocolError("bad_message", f"{tag}: {name} is negative", ref)
    if "npages" in kwargs and not (1 <= kwargs["npages"] <= limits.max_pages):
        raise ProtocolError("bad_message", f"{tag}: npages must be 1..{limits.max_pages}", ref)
    return cls(**kwargs)


# --------------------------------------------------------------------------
# the fast path (msgspec)

#: Types the fast path decodes: every one but those with a ``float`` field
#: (none today).  The free-form maps (``args``, ``result``, ``fields`` of
#: ``command``, ``command_result``, the admin request and reply, ``event``)
#: are typed as JSON-like values nested at most ``max_depth`` (see
#: :func:`_json_like_type`); a frame whose map holds anything else (bytes,
#: an ext, a non-string key...) is left to the reference.
_FAST_TYPES: tuple[type[Message], ...] = tuple(
    cls for tag, cls in REGISTRY.items() if all(f.kind != "float" for f in _SCHEMAS[tag])
)
_RANGE_TYPES = frozenset(cls for cls in _FAST_TYPES if {"start", "end"} <= set(cls.ADDRESSES))
_FREE_FORM_TYPES = frozenset(cls for cls in _FAST_TYPES if any(f.kind == "dict" for f in _SCHEMAS[cls.TYPE]))
#: How the fast path finishes a validated frame of each kind of type.
_PLAIN, _RANGED, _FREE_FORM = 0, 1, 2
_ENCODER = msgspec.msgpack.Encoder()
#: The message dataclass decoders: msgspec decodes a frame straight into the
#: dataclass (ignoring ``v`` and ``t``) once the Struct has validated it.
_DATACLASS_DECODERS = {cls: msgspec.msgpack.Decoder(cls) for cls in _FAST_TYPES}


def _fast_prefix(cls: type[Message]) -> bytes:
    count = len(_SCHEMAS[cls.TYPE]) + 2
    if count > 15:  # pragma: no cover - a fixmap holds 15 entries
        raise TypeError(f"{cls.__name__} has too many fields for the fast path")
    head = msgpack.packb("v") + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb("t") + msgpack.packb(cls.TYPE)
    return bytes([0x80 | count]) + head


#: Encoded with msgspec: the fixed-shape types.  The free-form ones keep
#: msgpack (msgspec would also write what msgpack refuses -- sets, enums,
#: datetimes -- and the frames must stay the reference's bytes).
_FAST_PREFIX: dict[type[Message], bytes] = {
    cls: _fast_prefix(cls) for cls in _FAST_TYPES if cls not in _FREE_FORM_TYPES
}


def _fast_annotation(cls: type[Message], f: _Field, limits: Limits) -> Any:
    """The msgspec type of one field: exactly what ``_check_field`` and the
    per-message rules of ``_decode_reference`` accept."""
    name, kind = f.name, f.kind
    string = Annotated[str, msgspec.Meta(max_length=limits.max_string)]
    if kind == "int":
        if name in cls.ADDRESSES:
            top = ADDRESS_LIMIT if name == "end" else ADDRESS_LIMIT - 1
            return Annotated[int, msgspec.Meta(ge=0, le=top)]
        if name == "npages":
            return Annotated[int, msgspec.Meta(ge=1, le=limits.max_pages)]
        if name in _NON_NEGATIVE:
            return Annotated[int, msgspec.Meta(ge=0)]
        return int  # MessagePack integers are all within int64..uint64
    if kind == "bool":
        return bool
    if kind == "str":
        if name in cls.CHOICES:
            return Literal[tuple(sorted(cls.CHOICES[name]))]
        return string
    if kind == "bytes":
        return bytes
    if kind == "list_int":
        return Annotated[list[int], msgspec.Meta(max_length=limits.max_items)]
    if kind == "list_str":
        return Annotated[list[string], msgspec.Meta(max_length=limits.max_items)]
    if kind == "list_list_int":
        return Annotated[list[Annotated[list[int], msgspec.Meta(max_length=8)]], msgspec.Meta(max_length=limits.max_items)]
    if kind == "dict":
        return _json_like_type(limits)
    raise TypeError(f"no fast-path type for {cls.__name__}.{name}")  # pragma: no cover


def _json_like_type(limits: Limits) -> Any:
    """The msgspec type of a free-form map field: what ``_check_json_like``
    accepts, less bytes (a union holds one str-like type; a map with bytes
    goes to the reference).

    The field's map is at depth 1, a value in it at depth 2; nothing may sit
    deeper than ``max_depth``, so a container at ``max_depth`` is empty.
    Every container holds at most ``max_items``; string keys only, at every
    level; integers are MessagePack's (within int64..uint64).  The one rule
    not expressible here, at most ``max_values`` values, holds for any frame
    of at most ``max_values`` bytes (a value takes a byte): :func:`decode`
    lets only those through."""

    def container(depth: int) -> tuple[Any, Any]:
        if depth >= limits.max_depth:
            empty = msgspec.Meta(max_length=0)
            return Annotated[list[Any], empty], Annotated[dict[str, Any], empty]
        inner = value(depth + 1)
        bound = msgspec.Meta(max_length=limits.max_items)
        return Annotated[list[inner], bound], Annotated[dict[str, inner], bound]  # type: ignore[valid-type]

    def value(depth: int) -> Any:
        array, table = container(depth)
        return typing.Union[None, bool, int, float, str, array, table]  # noqa: UP007

    return container(1)[1]


def _fast_struct(cls: type[Message], limits: Limits) -> type[msgspec.Struct]:
    fields: list[Any] = [("v", Literal[PROTOCOL_VERSION])]
    for dc_field, f in zip(dataclasses.fields(cls), _SCHEMAS[cls.TYPE], strict=False):
        annotation = _fast_annotation(cls, f, limits)
        if f.required:
            fields.append((f.name, annotation))
        elif dc_field.default_factory is not dataclasses.MISSING:
            fields.append((f.name, annotation, msgspec.field(default_factory=dc_field.default_factory)))
        else:
            fields.append((f.name, annotation, dc_field.default))
    return msgspec.defstruct(
        f"_{cls.__name__}Frame", fields, tag_field="t", tag=cls.TYPE, forbid_unknown_fields=True, kw_only=True
    )


class _FastPath(typing.NamedTuple):
    limits: Limits
    #: The Struct union validating frames under ``limits``.
    validator: msgspec.msgpack.Decoder
    #: Struct type -> (the message dataclass's decoder, _PLAIN / _RANGED / _FREE_FORM).
    targets: dict[type, tuple[msgspec.msgpack.Decoder, int]]
    #: Frames up to this many bytes may take the fast path...
    max_size: int
    #: ... if their first byte (a fixmap header) is at most this...
    max_head: int
    #: ... and, for a free-form type, if they are at most this long.
    max_free_form: int


def _fast_path(limits: Limits) -> _FastPath:
    """The fast path for ``limits``, kept per Limits object: looked up by
    identity (hashing the dataclass would cost as much as the decode); the
    Structs are shared by every Limits with the same bounds."""
    fast = _FAST_PATHS.get(id(limits))
    if fast is None or fast.limits is not limits:
        bounds = (limits.max_string, limits.max_items, limits.max_pages, limits.max_depth)
        union = _UNIONS.get(bounds)
        if union is None:
            # A map field needs max_depth >= 1 (the map itself is at depth 1).
            types = [c for c in _FAST_TYPES if limits.max_depth >= 1 or c not in _FREE_FORM_TYPES]
            structs = {_fast_struct(cls, limits): cls for cls in types}
            union = (
                msgspec.msgpack.Decoder(typing.Union[tuple(structs)]),  # noqa: UP007
                {s: (_DATACLASS_DECODERS[cls],
                     _RANGED if cls in _RANGE_TYPES else _FREE_FORM if cls in _FREE_FORM_TYPES else _PLAIN)
                 for s, cls in structs.items()},
            )
            if len(_UNIONS) >= 16:
                _UNIONS.clear()
            _UNIONS[bounds] = union
        max_size = min(limits.max_containers, limits.max_frame)
        fast = _FastPath(limits, *union, max_size, 0x80 + min(15, limits.max_items), min(max_size, limits.max_values))
        if len(_FAST_PATHS) >= 64:  # Limits made per call: keep the memory bounded
            _FAST_PATHS.clear()
        _FAST_PATHS[id(limits)] = fast  # holds ``limits``: its id is not reused
    return fast


_FAST_PATHS: dict[int, _FastPath] = {}
_UNIONS: dict[tuple[int, ...], tuple[msgspec.msgpack.Decoder, dict[type, tuple[msgspec.msgpack.Decoder, int]]]] = {}
_DEFAULT_LIMITS = Limits()
_FRAME_TYPES = (bytes, bytearray)
#: msgspec skips an unknown value recursively: deep nesting raises RecursionError.
_FAST_ERRORS = (msgspec.ValidationError, msgspec.DecodeError, RecursionError)


def decode(frame: bytes, limits: Limits | None = None) -> Message:
    """Parse and validate one frame.

    Raises:
        ProtocolError: with ``code`` ``bad_message`` (or ``too_large``,
            ``bad_version``, ``unknown_type``) and, when the frame carried one,
            the request ``ref`` to answer.
    """
    limits = limits or _DEFAULT_LIMITS
    fast = _FAST_PATHS.get(id(limits))
    if fast is None or fast.limits is not limits:
        fast = _fast_path(limits)
    # The fast path only for frames on which the reference's container rules
    # cannot bite: at most max_containers bytes (each container takes a byte)
    # and a fixmap at the top with at most max_items keys.  The Struct fields
    # bound every list, and refuse unknown keys, so no other map occurs.
    if type(frame) in _FRAME_TYPES and 0 < len(frame) <= fast.max_size and 0x80 <= frame[0] <= fast.max_head:
        try:
            checked = fast.validator.decode(frame)
            target, kind = fast.targets[type(checked)]
            if kind == _PLAIN or (checked.start < checked.end if kind == _RANGED
                                  else len(frame) <= fast.max_free_form):
                return target.decode(frame)
        except _FAST_ERRORS:
            pass
    return _decode_reference(frame, limits)
