"""transport.zsock over real sockets on loopback (OS-chosen ports, real clock).

Every test runs under a hard ``trio.fail_after``; synchronisation is by
messages, events and ``wait_all_tasks_blocked``, never by sleeping.
"""

from __future__ import annotations

import random
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
import zmq
from zmq.utils.monitor import parse_monitor_message

from mmn.client import AdminClient, SyncAdminClient
from protocol import encode
from protocol.messages import AdminReply, AdminRequest, Error, Event, Ok
from transport import (
    PeerBusy,
    PeerGone,
    SocketOptions,
    TransportError,
    ZSocket,
    bind,
    connect,
    serve_socket,
)

DEADLINE = 20.0


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    """A private context; the test must close every socket it opened."""
    context: zmq.Context[Any] = zmq.Context()
    yield context
    leaked = [s for s in list(context._sockets) if not s.closed]  # type: ignore[attr-defined]
    context.destroy(linger=0)
    assert not leaked, f"sockets left open: {leaked}"


def pair(ctx: zmq.Context[Any], identity: bytes | None = b"node-1", **opts: Any) -> tuple[ZSocket, ZSocket]:
    options = SocketOptions(**opts)
    router = bind(zmq.ROUTER, context=ctx, options=options)
    dealer = connect(zmq.DEALER, router.endpoint, identity=identity, context=ctx, options=options)
    return router, dealer


async def test_bind_reports_os_chosen_port(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(DEADLINE):
        router = bind(zmq.ROUTER, context=ctx)
        try:
            assert router.endpoint.startswith("tcp://127.0.0.1:")
            assert router.port > 0
            assert router.socket.getsockopt(zmq.MAXMSGSIZE) == SocketOptions().max_frame
            assert router.socket.getsockopt(zmq.LINGER) == 0
        finally:
            await router.aclose()
        with pytest.raises(trio.ClosedResourceError):
            router.endpoint


async def test_bind_failure_is_typed(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(DEADLINE):
        first = bind(zmq.ROUTER, context=ctx)
        try:
            with pytest.raises(TransportError):
                bind(zmq.ROUTER, first.endpoint, context=ctx)
        finally:
            first.close()


async def test_router_dealer_round_trip(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        async with router, dealer:
            await dealer.send_multipart([b"ping", b"two frames"])
            assert await router.recv_multipart() == [b"node-1", b"ping", b"two frames"]
            await router.send_multipart([b"node-1", b"pong"])
            assert await dealer.recv_multipart() == [b"pong"]


async def test_many_messages_both_directions_concurrently(ctx: zmq.Context[Any]) -> None:
    """Four tasks on two sockets: each socket has a sender and a receiver
    running at once (they share the FD waiter).  Nothing lost, nothing reordered."""
    n = 3000
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx, sndhwm=50, rcvhwm=50)
        got_by_router: list[int] = []
        got_by_dealer: list[int] = []

        async def router_send() -> None:
            for i in range(n):
                await router.send_multipart([b"node-1", i.to_bytes(4, "big")])

        async def dealer_send() -> None:
            for i in range(n):
                await dealer.send_multipart([i.to_bytes(4, "big"), b"x" * (i % 300)])

        async def router_recv() -> None:
            while len(got_by_router) < n:
                ident, body, pad = await router.recv_multipart()
                assert ident == b"node-1"
                assert len(pad) == int.from_bytes(body, "big") % 300
                got_by_router.append(int.from_bytes(body, "big"))

        async def dealer_recv() -> None:
            while len(got_by_dealer) < n:
                (body,) = await dealer.recv_multipart()
                got_by_dealer.append(int.from_bytes(body, "big"))

        async with router, dealer:
            # The dealer must be known to the router before it routes to it.
            await dealer.send_multipart([b"hello"])
            assert await router.recv_multipart() == [b"node-1", b"hello"]
            async with trio.open_nursery() as nursery:
                for task in (router_recv, dealer_recv, router_send, dealer_send):
                    nursery.start_soon(task)
        assert got_by_router == list(range(n))
        assert got_by_dealer == list(range(n))


async def test_send_that_eats_the_edge_wakes_the_receiver(ctx: zmq.Context[Any]) -> None:
    """The edge-triggered FD trap, made deterministic: a receiver is parked on
    the router's FD; a message arrives (FD readable); before trio polls, a send
    on the same socket lets libzmq process the pending "activate_read" command,
    which drains the FD.  The receiver must still be woken (rule 3)."""
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        async with router, dealer:
            await dealer.send_multipart([b"hello"])
            await router.recv_multipart()
            got: list[list[bytes]] = []

            async def receiver() -> None:
                got.append(await router.recv_multipart())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                await trio.testing.wait_all_tasks_blocked()
                # No checkpoint from here to the ZSocket send: trio cannot poll.
                dealer.socket.send(b"X")
                readable, _, _ = select.select([router.socket.FD], [], [], 5)
                assert readable, "the router's FD should have fired"
                spin_until = time.monotonic() + 0.01  # past libzmq's command throttle
                while time.monotonic() < spin_until:
                    pass
                await router.send_multipart([b"node-1", b"Y"])
            assert got == [[b"node-1", b"X"]]
            assert await dealer.recv_multipart() == [b"Y"]


async def test_cancelled_receive_loses_nothing(ctx: zmq.Context[Any]) -> None:
    """Receives cancelled at random points (before they start, while parked on
    the FD, while parked behind another receiver, just after receiving) never
    lose a message."""
    n = 2000
    rng = random.Random(7)
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        got: list[int] = []
        cancelled = 0

        async def sender() -> None:
            for i in range(n):
                await dealer.send_multipart([i.to_bytes(4, "big")])
                for _ in range(rng.randrange(4)):
                    await trio.lowlevel.checkpoint()

        async def receive() -> None:
            nonlocal cancelled
            try:
                _, body = await router.recv_multipart()
            except trio.Cancelled:
                cancelled += 1
                raise
            got.append(int.from_bytes(body, "big"))

        async def cancel_after(scope: trio.CancelScope, ticks: int) -> None:
            for _ in range(ticks):
                await trio.lowlevel.checkpoint()
            scope.cancel()

        async with router, dealer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                while len(got) < n:
                    async with trio.open_nursery() as attempt:
                        if rng.randrange(4) == 0:
                            attempt.cancel_scope.cancel()  # cancelled before it starts
                        else:
                            attempt.start_soon(cancel_after, attempt.cancel_scope, rng.randrange(6))
                        # One or two receivers at once: the second parks behind the first.
                        for _ in range(rng.choice([1, 1, 2])):
                            attempt.start_soon(receive)
        # Two concurrent receivers may append in either order; nothing is lost
        # or duplicated.
        assert sorted(got) == list(range(n))
        assert cancelled > n // 10


async def test_cancelled_receive_keeps_order(ctx: zmq.Context[Any]) -> None:
    """One receiver, cancelled at random points: the arrival order is kept exactly."""
    n = 2000
    rng = random.Random(11)
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        got: list[int] = []

        async def sender() -> None:
            for i in range(n):
                await dealer.send_multipart([i.to_bytes(4, "big")])
                for _ in range(rng.randrange(3)):
                    await trio.lowlevel.checkpoint()

        async with router, dealer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                cancels = 0
                while len(got) < n:
                    with trio.CancelScope() as scope:
                        scope.deadline = trio.current_time() + rng.choice([0, 0, 1e-5, 1e-4, 1e-3])
                        _, body = await router.recv_multipart()
                        got.append(int.from_bytes(body, "big"))
                    cancels += scope.cancelled_caught
        assert got == list(range(n))
        assert cancels > 0


async def test_router_mandatory_unknown_identity(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        async with router, dealer:
            with pytest.raises(PeerGone) as info:
                await router.send_multipart([b"nobody", b"lost?"])
            assert info.value.identity == b"nobody"
            assert isinstance(info.value, TransportError)
            # The socket is fine afterwards.
            await dealer.send_multipart([b"hi"])
            assert await router.recv_multipart() == [b"node-1", b"hi"]
            await router.send_multipart([b"node-1", b"hi back"])
            assert await dealer.recv_multipart() == [b"hi back"]


async def test_peer_gone_after_disconnect(ctx: zmq.Context[Any]) -> None:
    """A peer that went away becomes PeerGone -- eventually: libzmq retires
    the pipe a few internal commands after the disconnect, and sends in
    between go into the dying pipe and are dropped.  Nothing observable marks
    the moment, so this one test polls (bounded) instead of waiting on an event."""
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        monitor = ZSocket(router.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED))
        async with router, monitor:
            await dealer.send_multipart([b"hi"])
            await router.recv_multipart()
            await dealer.aclose()
            parse_monitor_message(await monitor.recv_multipart())
            with pytest.raises(PeerGone):
                for _ in range(1000):
                    await router.send_multipart([b"node-1", b"too late"])
                    await trio.sleep(0.005)


async def test_close_while_receive_waits(ctx: zmq.Context[Any]) -> None:
    """Both the task parked on the FD and the one parked behind it are told
    "we closed it", not left waiting on a dead descriptor."""
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        outcomes: list[type[BaseException]] = []

        async def receive() -> None:
            try:
                await router.recv_multipart()
            except trio.ClosedResourceError:
                outcomes.append(trio.ClosedResourceError)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            router.close()
        assert outcomes == [trio.ClosedResourceError] * 2
        with pytest.raises(trio.ClosedResourceError):
            await router.recv_multipart()
        with pytest.raises(trio.ClosedResourceError):
            await router.send_multipart([b"node-1", b"x"])
        router.close()  # idempotent
        await dealer.aclose()


async def test_send_waits_at_hwm_then_completes(ctx: zmq.Context[Any]) -> None:
    """A DEALER whose peer does not read blocks in send (POLLOUT wait), then
    resumes when the peer reads: nothing dropped, order kept."""
    n, size = 300, 64 * 1024
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx, sndhwm=4, rcvhwm=4)
        sent = 0

        async def sender() -> None:
            nonlocal sent
            for i in range(n):
                await dealer.send_multipart([i.to_bytes(4, "big") + b"x" * size])
                sent += 1

        async with router, dealer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert 0 < sent < n, "the sender should be blocked by the high-water marks"
                for i in range(n):
                    _, body = await router.recv_multipart()
                    assert int.from_bytes(body[:4], "big") == i


async def test_router_send_waits_for_one_slow_peer(ctx: zmq.Context[Any]) -> None:
    """ROUTER_MANDATORY: a peer at its HWM makes the send wait (not drop)."""
    n, size = 200, 64 * 1024
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx, sndhwm=4, rcvhwm=4)
        sent = 0

        async def sender() -> None:
            nonlocal sent
            for i in range(n):
                await router.send_multipart([b"node-1", i.to_bytes(4, "big") + b"x" * size])
                sent += 1

        async with router, dealer:
            await dealer.send_multipart([b"hello"])
            await router.recv_multipart()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert 0 < sent < n
                for i in range(n):
                    (body,) = await dealer.recv_multipart()
                    assert int.from_bytes(body[:4], "big") == i


async def test_oversized_frame_drops_the_peer_not_us(ctx: zmq.Context[Any]) -> None:
    """MAXMSGSIZE: libzmq cuts the offending connection; our process and the
    socket carry on, and the peer (which reconnects) is served again."""
    with trio.fail_after(DEADLINE):
        options = SocketOptions(max_frame=1024)
        router = bind(zmq.ROUTER, context=ctx, options=options)
        # Monitor before the peer connects, or its first handshake is missed.
        monitor = ZSocket(
            router.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        )
        dealer = connect(zmq.DEALER, router.endpoint, identity=b"node-1", context=ctx, options=options)

        async def next_event() -> int:
            return int(parse_monitor_message(await monitor.recv_multipart())["event"])

        async with router, dealer, monitor:
            await dealer.send_multipart([b"a" * 1024])  # at the limit: fine
            assert await router.recv_multipart() == [b"node-1", b"a" * 1024]
            assert await next_event() == zmq.EVENT_HANDSHAKE_SUCCEEDED
            await dealer.send_multipart([b"b" * 1025])
            assert await next_event() == zmq.EVENT_DISCONNECTED
            assert await next_event() == zmq.EVENT_HANDSHAKE_SUCCEEDED  # it reconnected
            await dealer.send_multipart([b"small"])
            assert await router.recv_multipart() == [b"node-1", b"small"]


# --------------------------------------------------------------------------
# serve_socket


async def test_serve_socket_channels_round_trip(ctx: zmq.Context[Any]) -> None:
    n = 1000
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        async with trio.open_nursery() as nursery:
            host = await nursery.start(serve_socket, router)
            node = await nursery.start(serve_socket, dealer)
            assert host.endpoint == router.endpoint

            async def echo() -> None:
                async for ident, body in host.incoming:
                    await host.outgoing.send([ident, body])

            nursery.start_soon(echo)
            async with trio.open_nursery() as inner:

                async def produce() -> None:
                    for i in range(n):
                        await node.outgoing.send([i.to_bytes(4, "big")])

                inner.start_soon(produce)
                for i in range(n):
                    assert await node.incoming.receive() == [i.to_bytes(4, "big")]
            nursery.cancel_scope.cancel()
        assert router.closed and dealer.closed


async def test_serve_socket_flushes_then_stops_when_outgoing_closed(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx, linger_ms=2000)
        async with router:
            async with trio.open_nursery() as nursery:
                node = await nursery.start(serve_socket, dealer)
                for i in range(50):
                    await node.outgoing.send([bytes([i])])
                await node.outgoing.aclose()
                # The service ends by itself: the nursery exits.
            assert dealer.closed
            with pytest.raises(trio.EndOfChannel):
                await node.incoming.receive()
            for i in range(50):
                assert await router.recv_multipart() == [b"node-1", bytes([i])]


async def test_serve_socket_reports_undeliverable_and_goes_on(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        failed: list[tuple[list[bytes], Exception]] = []
        async with dealer:
            async with trio.open_nursery() as nursery:
                host = await nursery.start(
                    partial_serve(lambda frames, exc: failed.append((frames, exc))), router
                )
                await dealer.send_multipart([b"hello"])
                assert await host.incoming.receive() == [b"node-1", b"hello"]
                await host.outgoing.send([b"ghost", b"boo"])
                await host.outgoing.send([b"node-1", b"still here"])
                assert await dealer.recv_multipart() == [b"still here"]
                assert len(failed) == 1
                assert failed[0][0] == [b"ghost", b"boo"]
                assert isinstance(failed[0][1], PeerGone)
                nursery.cancel_scope.cancel()


def partial_serve(on_undeliverable: Any) -> Any:
    async def run(zsock: ZSocket, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await serve_socket(zsock, on_undeliverable=on_undeliverable, task_status=task_status)

    return run


async def test_serve_socket_ends_when_socket_closed_under_it(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        async with dealer:
            async with trio.open_nursery() as nursery:
                host = await nursery.start(serve_socket, router)
                await trio.testing.wait_all_tasks_blocked()
                router.close()
            with pytest.raises(trio.EndOfChannel):
                await host.incoming.receive()


async def test_serve_socket_consumer_closing_incoming_keeps_sending(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        async with router:
            async with trio.open_nursery() as nursery:
                node = await nursery.start(serve_socket, dealer)
                await node.incoming.aclose()
                await node.outgoing.send([b"one"])
                ident, body = await router.recv_multipart()
                await router.send_multipart([ident, b"ignored"])
                await node.outgoing.send([b"two"])
                assert await router.recv_multipart() == [ident, b"two"]
                nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# between two processes


CHILD_ECHO = textwrap.dedent(
    """
    import sys, trio, zmq
    from transport import connect, serve_socket

    async def main(endpoint, n):
        dealer = connect(zmq.DEALER, endpoint, identity=b"child")
        async with trio.open_nursery() as nursery:
            ch = await nursery.start(serve_socket, dealer)
            await ch.outgoing.send([b"ready"])
            for _ in range(n):
                frames = await ch.incoming.receive()
                await ch.outgoing.send(frames[::-1])
            await ch.outgoing.aclose()

    trio.run(main, sys.argv[1], int(sys.argv[2]))
    """
)


@pytest.mark.integration
async def test_echo_between_two_processes(ctx: zmq.Context[Any]) -> None:
    n = 500
    with trio.fail_after(DEADLINE):
        router = bind(zmq.ROUTER, context=ctx)
        async with router:
            async with trio.open_nursery() as nursery:
                proc = await nursery.start(
                    lambda task_status: trio.run_process(
                        [sys.executable, "-c", CHILD_ECHO, router.endpoint, str(n)],
                        check=True,
                        stderr=subprocess.PIPE,
                        task_status=task_status,
                    )
                )
                assert await router.recv_multipart() == [b"child", b"ready"]
                for i in range(n):
                    await router.send_multipart([b"child", b"a%d" % i, b"b%d" % i])
                for i in range(n):
                    assert await router.recv_multipart() == [b"child", b"b%d" % i, b"a%d" % i]
            assert proc.returncode == 0


# --------------------------------------------------------------------------
# admin clients


async def fake_admin_host(router: ZSocket, *, silent_for: set[str]) -> None:
    """Answers AdminRequest(command) with AdminReply(result={"echo": command}),
    first sending a stray reply to another ref and an event; ignores the
    commands in ``silent_for`` (their reply is sent late, with the next one)."""
    from protocol import decode

    late: list[bytes] = []
    while True:
        ident, frame = await router.recv_multipart()
        req = decode(frame)
        assert isinstance(req, AdminRequest)
        if req.command in silent_for:
            late.append(encode(AdminReply(req.id, True, {"echo": req.command})))
            continue
        for stale in late:
            await router.send_multipart([ident, stale])
        late.clear()
        await router.send_multipart([ident, encode(Ok(req.id + 1000))])
        await router.send_multipart([ident, encode(Event(1, "noise"))])
        await router.send_multipart([ident, b"\xc1 garbage"])
        if req.command == "refuse":
            await router.send_multipart([ident, encode(Error(req.id, "bad_message", "no"))])
        else:
            await router.send_multipart([ident, encode(AdminReply(req.id, True, {"echo": req.command}))])


async def test_admin_client_matches_replies_by_ref(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(DEADLINE):
        router = bind(zmq.ROUTER, context=ctx)
        async with router:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: fake_admin_host(router, silent_for={"hang"}))
                async with AdminClient(router.endpoint, context=ctx) as client:
                    reply = await client.admin("status", timeout=5)
                    assert isinstance(reply, AdminReply) and reply.result == {"echo": "status"}
                    with pytest.raises(trio.TooSlowError):
                        await client.admin("hang", timeout=0.2)
                    # The late reply to "hang" arrives now and is discarded.
                    reply = await client.request(AdminRequest(client.next_id(), "mmap"), timeout=5)
                    assert isinstance(reply, AdminReply) and reply.result == {"echo": "mmap"}
                    refused = await client.admin("refuse", timeout=5)
                    assert isinstance(refused, Error) and refused.code == "bad_message"
                    with pytest.raises(ValueError):
                        await client.request(Ok(1))  # has a ref, not an id
                nursery.cancel_scope.cancel()


async def test_admin_client_times_out_without_host(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(DEADLINE):
        router = bind(zmq.ROUTER, context=ctx)
        endpoint = router.endpoint
        router.close()
        async with AdminClient(endpoint, context=ctx) as client:
            with pytest.raises(trio.TooSlowError):
                await client.admin("status", timeout=0.2)


async def test_sync_admin_client(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(DEADLINE):
        router = bind(zmq.ROUTER, context=ctx)
        async with router:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: fake_admin_host(router, silent_for={"hang"}))

                def cli() -> list[Any]:
                    out: list[Any] = []
                    with SyncAdminClient(router.endpoint, context=ctx) as client:
                        out.append(client.admin("status", timeout=5))
                        try:
                            client.admin("hang", timeout=0.2)
                        except TimeoutError as exc:
                            out.append(exc)
                        out.append(client.admin("mmap", timeout=5))
                    return out

                status, timed_out, mmap = await trio.to_thread.run_sync(cli)
                assert isinstance(status, AdminReply) and status.result == {"echo": "status"}
                assert isinstance(timed_out, TimeoutError)
                assert isinstance(mmap, AdminReply) and mmap.result == {"echo": "mmap"}
                nursery.cancel_scope.cancel()


async def test_serve_socket_on_pub_and_sub(ctx: zmq.Context[Any]) -> None:
    """The event stream: a PUB has no receive pump (incoming ends at once)."""
    with trio.fail_after(DEADLINE):
        pub = bind(zmq.PUB, context=ctx)
        sub = connect(zmq.SUB, pub.endpoint, context=ctx)
        sub.socket.setsockopt(zmq.SUBSCRIBE, b"")
        async with trio.open_nursery() as nursery:
            events = await nursery.start(serve_socket, pub)
            watch = await nursery.start(serve_socket, sub)
            with pytest.raises(trio.EndOfChannel):
                await events.incoming.receive()
            # PUB drops until the subscription has propagated: publish until seen.
            got: list[list[bytes]] = []

            async def watcher() -> None:
                got.append(await watch.incoming.receive())
                nursery.cancel_scope.cancel()

            nursery.start_soon(watcher)
            for i in range(100_000):
                await events.outgoing.send([b"event %d" % i])
                await trio.testing.wait_all_tasks_blocked()
        assert got and got[0][0].startswith(b"event ")


async def test_io_that_never_waits_still_lets_others_run(ctx: zmq.Context[Any]) -> None:
    """A PUB never blocks; a task looping on it must still reach schedule
    points (every few sends), or it would starve the rest of the program."""
    with trio.fail_after(DEADLINE):
        pub = bind(zmq.PUB, context=ctx)
        async with pub:
            ticks = 0
            done = False

            async def other() -> None:
                nonlocal ticks
                while not done:
                    ticks += 1
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(other)
                for _ in range(1000):
                    await pub.send_multipart([b"event"])
                done = True
            assert ticks >= 1000 // 32  # about one schedule point per 16 sends


async def test_serve_socket_does_not_stall_on_one_slow_peer(ctx: zmq.Context[Any]) -> None:
    """A peer that stopped reading fills its SNDHWM; the send pump reports
    PeerBusy (a PeerGone) for it and keeps serving the others."""
    size = 64 * 1024
    with trio.fail_after(DEADLINE):
        options = SocketOptions(sndhwm=4, rcvhwm=4)
        router = bind(zmq.ROUTER, context=ctx, options=options)
        stuck = connect(zmq.DEALER, router.endpoint, identity=b"stuck", context=ctx, options=options)
        healthy = connect(zmq.DEALER, router.endpoint, identity=b"healthy", context=ctx, options=options)
        failed: list[TransportError] = []
        async with stuck, healthy:
            async with trio.open_nursery() as nursery:
                host = await nursery.start(
                    partial_serve(lambda frames, exc: failed.append(exc)), router
                )
                for peer in (stuck, healthy):
                    await peer.send_multipart([b"hello"])
                    await host.incoming.receive()
                # Flood the stuck peer until the pump gives up on a message.
                while not failed:
                    await host.outgoing.send([b"stuck", b"x" * size])
                    await trio.testing.wait_all_tasks_blocked()
                assert isinstance(failed[0], PeerBusy) and isinstance(failed[0], PeerGone)
                assert failed[0].identity == b"stuck"
                await host.outgoing.send([b"healthy", b"still served"])
                assert await healthy.recv_multipart() == [b"still served"]
                nursery.cancel_scope.cancel()


async def test_send_now_keeps_order_behind_queued_messages_and_reports_unroutable(ctx: zmq.Context[Any]) -> None:
    """send_now goes straight to libzmq only when nothing sent earlier is still
    queued (False otherwise: the caller uses ``outgoing``), and reports an
    unroutable ROUTER peer through on_undeliverable, as the send pump does."""
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        failed: list[tuple[list[bytes], Exception]] = []
        async with dealer:
            async with trio.open_nursery() as nursery:
                host = await nursery.start(
                    partial_serve(lambda frames, exc: failed.append((frames, exc))), router
                )
                await dealer.send_multipart([b"hello"])
                assert await host.incoming.receive() == [b"node-1", b"hello"]
                host.outgoing.send_nowait([b"node-1", b"queued"])  # the pump has not run yet
                assert host.send_now([b"node-1", b"behind it"]) is False
                await host.outgoing.send([b"node-1", b"behind it"])
                assert await dealer.recv_multipart() == [b"queued"]
                assert await dealer.recv_multipart() == [b"behind it"]
                await trio.testing.wait_all_tasks_blocked()
                assert host.send_now([b"node-1", b"direct"]) is True
                assert await dealer.recv_multipart() == [b"direct"]
                assert host.send_now([b"ghost", b"boo"]) is True  # handled: reported, not queued
                assert [(f, type(e)) for f, e in failed] == [([b"ghost", b"boo"], PeerGone)]
                nursery.cancel_scope.cancel()


async def test_direct_incoming_receives_in_order_and_ends_when_closed(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(DEADLINE):
        router, dealer = pair(ctx)
        async with dealer:
            async with trio.open_nursery() as nursery:

                async def serve(zsock: ZSocket, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                    await serve_socket(zsock, direct_incoming=True, task_status=task_status)

                host = await nursery.start(serve, router)
                for i in range(20):
                    await dealer.send_multipart([bytes([i])])
                got = []
                async for frames in host.incoming:
                    got.append(frames)
                    if len(got) == 20:
                        break
                assert got == [[b"node-1", bytes([i])] for i in range(20)]
                router.close()
                with pytest.raises(trio.EndOfChannel):
                    await host.incoming.receive()
                nursery.cancel_scope.cancel()
