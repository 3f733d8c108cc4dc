"""Round-trip time of one small message, DEALER -> ROUTER echo -> DEALER,
between two processes on loopback: raw blocking pyzmq vs the same through
``transport.ZSocket`` under trio, and through ``serve_socket``'s memory
channels (what the host and the nodes actually use).

    .venv/bin/python benchmarks/transport_rtt.py [--count 20000] [--size 64]

Each mode runs its own echo server process written the same way as the
client (raw server for the raw client, trio server for the trio clients).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import trio
import zmq

from transport import bind, connect, serve_socket

MODES = ("raw", "zsocket", "channels")
#: A lost wake-up would hang a mode forever: fail it instead.
DEADLINE = 120.0


# --------------------------------------------------------------------------
# echo servers (run in the child process)


def serve_raw() -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(f"tcp://127.0.0.1:{port}", flush=True)
    while True:
        frames = sock.recv_multipart()
        if frames[1] == b"quit":
            break
        sock.send_multipart(frames)
    sock.close()
    ctx.term()


async def serve_zsocket() -> None:
    router = bind(zmq.ROUTER)
    print(router.endpoint, flush=True)
    async with router:
        while True:
            frames = await router.recv_multipart()
            if frames[1] == b"quit":
                break
            await router.send_multipart(frames)


async def serve_channels() -> None:
    router = bind(zmq.ROUTER)
    async with trio.open_nursery() as nursery:
        ch = await nursery.start(serve_socket, router)
        print(ch.endpoint, flush=True)
        async for frames in ch.incoming:
            if frames[1] == b"quit":
                break
            await ch.outgoing.send(frames)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# clients (this process)


def client_raw(endpoint: str, count: int, payload: bytes) -> list[float]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        sock.send(payload)
        sock.recv()
        samples.append(time.perf_counter() - t0)
    sock.send(b"quit")
    time.sleep(0.05)
    sock.close()
    ctx.term()
    return samples


async def client_zsocket(endpoint: str, count: int, payload: bytes) -> list[float]:
    dealer = connect(zmq.DEALER, endpoint)
    samples = []
    with trio.fail_after(DEADLINE):
        async with dealer:
            for _ in range(count):
                t0 = time.perf_counter()
                await dealer.send_multipart([payload])
                await dealer.recv_multipart()
                samples.append(time.perf_counter() - t0)
            await dealer.send_multipart([b"quit"])
            await trio.sleep(0.05)
    return samples


async def client_channels(endpoint: str, count: int, payload: bytes) -> list[float]:
    dealer = connect(zmq.DEALER, endpoint)
    samples = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            ch = await nursery.start(serve_socket, dealer)
            for _ in range(count):
                t0 = time.perf_counter()
                await ch.outgoing.send([payload])
                await ch.incoming.receive()
                samples.append(time.perf_counter() - t0)
            await ch.outgoing.send([b"quit"])
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    return samples


# --------------------------------------------------------------------------


def run_mode(mode: str, count: int, size: int, warmup: int) -> list[float]:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        endpoint = server.stdout.readline().strip()
        payload = b"x" * size
        total = warmup + count
        if mode == "raw":
            samples = client_raw(endpoint, total, payload)
        else:
            fn: Callable[..., object] = client_zsocket if mode == "zsocket" else client_channels
            samples = trio.run(fn, endpoint, total, payload)  # type: ignore[arg-type]
        server.wait(timeout=DEADLINE)
        return samples[warmup:]  # type: ignore[index]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--size", type=int, default=64, help="payload bytes")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the modes this many times")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "raw":
        serve_raw()
        return 0
    if args.serve:
        trio.run(serve_zsocket if args.serve == "zsocket" else serve_channels)
        return 0

    results: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):  # interleaved, so drifting machine load hits every mode
        for mode in MODES:
            results[mode].extend(run_mode(mode, args.count, args.size, args.warmup))
    base = statistics.median(results["raw"])
    print(f"{args.rounds} x {args.count} round trips of {args.size} B, two processes, loopback TCP")
    print(f"{'mode':<10} {'median us':>10} {'mean us':>9} {'p99 us':>8} {'x raw':>7}")
    for mode in MODES:
        s = sorted(results[mode])
        med = statistics.median(s)
        p99 = s[int(len(s) * 0.99)]
        print(f"{mode:<10} {med * 1e6:>10.1f} {statistics.fmean(s) * 1e6:>9.1f} {p99 * 1e6:>8.1f} {med / base:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
