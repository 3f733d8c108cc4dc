"""Strict encode / decode per message: the codecs side by side, interleaved.

    .venv/bin/python benchmarks/codec.py [--repeats 41] [--loops 500] [--json]

Candidates, each given the same frames and messages:

* ``msgpack``: the reference codec (msgpack from / to a dict, every rule
  checked in Python): ``protocol.codec._encode_reference`` and
  ``_decode_reference``, the codec before msgspec.
* ``msgspec``: ``protocol.encode`` / ``protocol.decode`` as adopted: a
  msgspec Struct validates the frame (tag, version, unknown fields, bounds, in
  C), msgspec then decodes it into the message dataclass; encode writes the
  dataclass with msgspec behind a fixed version-and-tag prefix.
* ``struct``: the bound -- the validating Struct alone, as if the messages
  *were* msgspec Structs (decode stops at the Struct; encode writes the
  Struct).  Not adoptable as is: the messages are frozen dataclasses
  (``dataclasses.fields``, ``replace``, ``cls(**kwargs)`` in the code and
  the tests), and its map puts the tag before the version.

Per repeat, every (message, operation) is timed for each candidate in turn
(the order rotating between repeats) over ``--loops`` calls, so load from
other processes on the machine falls on all candidates alike.  The table
gives the minimum over repeats in microseconds per call (the least
disturbed run of each), the ratio of the minima msgpack / msgspec, and its
spread: a 90% bootstrap interval (repeats resampled in pairs, the ratio of the
minima recomputed), wide when the machine was busy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402

from protocol import Limits, decode, encode  # noqa: E402
from protocol.codec import _decode_reference, _encode_reference, _fast_path  # noqa: E402
from protocol.messages import (  # noqa: E402
    Ack,
    ChangePte,
    Command,
    CommandResult,
    DmaRead,
    DmaReply,
    Gup,
    GupReply,
    Heartbeat,
    InvalidateRangeEnd,
    InvalidateRangeStart,
    Message,
)

A = 0x7F00_0000_0000
#: The hot path: one invalidation (start -> ack -> end), a change_pte, a
#: fault (gup -> gup_reply, one page and fault-around's 16), a DMA access, a
#: heartbeat, and a relayed fault's command and result (free-form maps: the
#: msgspec candidate decodes them on the fast path but encodes them with
#: msgpack, as ``protocol.encode`` does).
MESSAGES: list[tuple[str, Message]] = [
    ("invalidate_range_start", InvalidateRangeStart(id=1 << 20, mm=3, start=A, end=A + (16 << 12), event="UNMAP")),
    ("ack", Ack(ref=1 << 20)),
    ("invalidate_range_end", InvalidateRangeEnd(id=(1 << 20) + 1, mm=3, start=A, end=A + (16 << 12), start_id=1 << 20)),
    ("change_pte", ChangePte(id=1 << 21, mm=3, addr=A, pfn=123_456, writable=False)),
    ("gup", Gup(id=77_000, epoch=2, mm=3, addr=A, npages=16, write=True)),
    ("gup_reply (1 page)", GupReply(ref=77_000, mm=3, pages=[[A, 123_456, 1]])),
    ("gup_reply (16 pages)", GupReply(ref=77_000, mm=3, pages=[[A + (i << 12), 123_456 + i, 1] for i in range(16)])),
    ("dma_read", DmaRead(id=77_001, epoch=2, mm=3, addr=A, pfn=123_456, offset=64, length=64)),
    ("dma_reply (64 B)", DmaReply(ref=77_001, data=bytes(range(64)))),
    ("heartbeat", Heartbeat(id=9, epoch=2, incarnation="0f" * 16)),
    # a relayed fault: the host's Command, the node's CommandResult
    ("command (fault)", Command(id=77_002, command="fault", args={"mm": 3, "addr": A, "pages": 1, "write": True})),
    ("command_result (fault)", CommandResult(ref=77_002, ok=True, result={"mm": 3, "addr": A, "pages": [[A, 123_456, 1]]})),
]
CANDIDATES = ("msgpack", "msgspec", "struct")
LIMITS = Limits()


def operations(msg: Message) -> dict[tuple[str, str], Callable[[], Any]]:
    """(operation, candidate) -> a call doing it once."""
    frame = encode(msg)
    assert frame == _encode_reference(msg)
    validator = _fast_path(LIMITS).validator
    struct = validator.decode(frame)
    struct_encode = msgspec.msgpack.Encoder().encode
    assert decode(frame, LIMITS) == _decode_reference(frame, LIMITS) == msg
    return {
        ("encode", "msgpack"): lambda: _encode_reference(msg),
        ("encode", "msgspec"): lambda: encode(msg),
        ("encode", "struct"): lambda: struct_encode(struct),
        ("decode", "msgpack"): lambda: _decode_reference(frame, LIMITS),
        ("decode", "msgspec"): lambda: decode(frame, LIMITS),
        ("decode", "struct"): lambda: validator.decode(frame),
    }


def time_call(fn: Callable[[], Any], loops: int) -> float:
    """Microseconds per call over ``loops`` calls."""
    rng = range(loops)
    t0 = time.perf_counter()
    for _ in rng:
        fn()
    return (time.perf_counter() - t0) / loops * 1e6


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def bootstrap_ratio(old: list[float], new: list[float], rounds: int = 2000) -> tuple[float, float]:
    """5th and 95th percentile of min(old) / min(new) over paired resamples."""
    rnd = random.Random(1)
    pairs = list(zip(old, new, strict=False))
    ratios = []
    for _ in range(rounds):
        sample = rnd.choices(pairs, k=len(pairs))
        ratios.append(min(o for o, _ in sample) / min(n for _, n in sample))
    return percentile(ratios, 0.05), percentile(ratios, 0.95)


def measure(repeats: int, loops: int) -> list[dict[str, Any]]:
    ops = {name: operations(msg) for name, msg in MESSAGES}
    samples: dict[tuple[str, str, str], list[float]] = {}
    for r in range(repeats):
        for name, _ in MESSAGES:
            for op in ("encode", "decode"):
                order = CANDIDATES[r % 3:] + CANDIDATES[:r % 3]
                for cand in order:
                    samples.setdefault((name, op, cand), []).append(time_call(ops[name][op, cand], loops))
    rows = []
    for name, msg in MESSAGES:
        for op in ("encode", "decode"):
            old, new, bound = (samples[name, op, c] for c in CANDIDATES)
            low, high = bootstrap_ratio(old, new)
            rows.append({
                "message": name, "op": op, "bytes": len(encode(msg)),
                "msgpack_us": min(old), "msgspec_us": min(new), "struct_us": min(bound),
                "ratio": min(old) / min(new), "ratio_low": low, "ratio_high": high,
            })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'message':<22} {'op':<6} {'bytes':>5} {'msgpack':>8} {'msgspec':>8} {'struct':>7}  {'ratio':>6}  90% interval"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['message']:<22} {r['op']:<6} {r['bytes']:>5} {r['msgpack_us']:>8.2f} {r['msgspec_us']:>8.2f}"
            f" {r['struct_us']:>7.2f}  {r['ratio']:>5.1f}x  {r['ratio_low']:.1f}-{r['ratio_high']:.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=41, help="interleaved rounds (default 41)")
    parser.add_argument("--loops", type=int, default=500, help="calls per timing (default 500)")
    parser.add_argument("--json", action="store_true", help="rows as JSON instead of the table")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    rows = measure(args.repeats, args.loops)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(table(rows))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(us per call, min of {args.repeats} interleaved repeats x {args.loops} calls; ratio = msgpack / msgspec"
          f" of the minima, 90% bootstrap interval; {os.cpu_count()} CPUs, load {load:.1f},"
          f" {time.monotonic() - t0:.0f} s, Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
