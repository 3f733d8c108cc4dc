"""Issue 7: only keyed nodes and operators get in (CURVE + ZAP), a node key is
no admin key, names are bound to keys, fenced epochs stay fenced, XPMEM modes
are enforced against the authenticated identity, and the limits bite.

Everything runs in-process on loopback: a host (``broker.host.Host``) with a
``mmn keygen`` directory and real ``NodeRuntime`` nodes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq
import zmq.auth

from broker.guard import RateLimiter
from broker.host import Host, HostConfig
from mmn.cli import main
from mmn.client import AdminClient
from node.runtime import NodeConfig, NodeRuntime
from protocol import Limits, decode, encode
from protocol.messages import AdminReply, AdminRequest, Error, Gup, Register, Registered, XpmemMake
from transport import connect
from transport.curve import CurveClient, KeyLayout, keygen, name_matches_key

pytestmark = pytest.mark.integration

PAGE = 4096


def admin_security(layout: KeyLayout, name: str = "admin") -> CurveClient:
    return CurveClient.from_files(layout.admin_secret(name), layout.host_public)


def node_security(layout: KeyLayout, name: str) -> CurveClient:
    return CurveClient.from_files(layout.node_secret(name), layout.host_public)


@dataclass
class Cluster:
    host: Host
    endpoints: dict[str, str]
    layout: KeyLayout
    nodes: dict[str, NodeRuntime]
    nursery: trio.Nursery

    async def admin(self, command: str, args: dict[str, Any] | None = None, *, security: Any = "admin",
                    timeout: float = 5.0) -> Any:
        sec = admin_security(self.layout) if security == "admin" else security
        async with AdminClient(self.endpoints["admin"], security=sec) as client:
            return await client.admin(command, args or {}, timeout)

    async def ok(self, command: str, **args: Any) -> dict[str, Any]:
        reply = await self.admin(command, args)
        assert isinstance(reply, AdminReply) and reply.ok, reply
        return dict(reply.result)

    async def start_node(self, name: str, kind: str, **cfg: Any) -> NodeRuntime:
        config = NodeConfig(kind=kind, name=name, host=self.endpoints["node"], heartbeat_ms=200,
                            register_timeout_ms=500, backoff_max_ms=500, **cfg)
        runtime = NodeRuntime(config)
        self.nodes[name] = runtime
        await self.nursery.start(runtime.run)
        return runtime


@asynccontextmanager
async def cluster(tmp_path: Path, nodes: tuple[tuple[str, str], ...] = (("kvm0", "kvm"),), **host_cfg: Any
                  ) -> AsyncIterator[Cluster]:
    keys = tmp_path / "keys"
    keygen(keys, nodes=[n for n, _ in nodes] + ["xpmem1", "kvm9", "kvm8"])
    layout = KeyLayout(keys)
    config = HostConfig(node_port=0, admin_port=0, events_port=0, frames=256, heartbeat_ms=200,
                        ack_deadline_ms=1000, keys_dir=str(keys), **host_cfg)
    host = Host(config)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(host.serve)
        c = Cluster(host, endpoints, layout, {}, nursery)
        for name, kind in nodes:
            with trio.fail_after(10):
                await c.start_node(name, kind, keys_dir=str(keys))
        yield c
        nursery.cancel_scope.cancel()


async def raw_request(endpoint: str, security: Any, msg: Any, *, identity: bytes | None = None,
                      timeout: float = 3.0) -> Any:
    """One frame from a hand-driven DEALER; the decoded reply or None."""
    async with connect(zmq.DEALER, endpoint, security=security, identity=identity) as sock:
        with trio.move_on_after(timeout):
            await sock.send_multipart([encode(msg)])
            return decode((await sock.recv_multipart())[-1])
    return None


# --------------------------------------------------------------------------
# keys on disk


def test_keygen_writes_zmq_auth_pairs_with_private_secrets(tmp_path: Path) -> None:
    result = keygen(tmp_path / "k", nodes=["kvm0", "xpmem"])
    layout = KeyLayout(tmp_path / "k")
    assert len(result["created"]) == 4  # host, admin, kvm0, xpmem
    for secret in (layout.host_secret, layout.admin_secret(), layout.node_secret("kvm0")):
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
        public, key = zmq.auth.load_certificate(str(secret))
        assert key and zmq.auth.load_certificate(str(secret).removesuffix("_secret"))[0] == public
    assert stat.S_IMODE(os.stat(layout.host_public).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(layout.root).st_mode) == 0o700
    assert not list(layout.nodes_dir.glob(".keygen-*"))  # no scratch left
    # a second run keeps what is there (mmn up adds keys for new nodes)
    again = keygen(tmp_path / "k", nodes=["kvm0", "gru0"])
    assert len(again["created"]) == 1 and len(again["kept"]) == 3
    # kind-wide fallback key for scaled containers
    assert layout.node_secret("xpmem-3f2a", "xpmem") == layout.nodes_dir / "xpmem.key_secret"


def test_mmn_up_with_no_nodes_starts_a_host_under_curve(tmp_path: Path) -> None:
    """The key directory of a cluster without nodes still has its nodes/ (empty):
    the host starts, accepts no node, and answers its admin keys."""
    proc = subprocess.run(
        [sys.executable, "-m", "mmn", "up", "--kvm", "0", "--gru", "0", "--xpmem", "0", "--once", "--json",
         "--port-base", "0", "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["nodes"] == []
    assert (tmp_path / "logs" / "keys" / "nodes").is_dir()
    assert list((tmp_path / "logs" / "keys" / "nodes").iterdir()) == []


def test_mmn_keygen_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", str(tmp_path / "k"), "--node", "kvm0", "--json"]) == 0
    assert (tmp_path / "k" / "nodes" / "kvm0.key_secret").exists()
    assert stat.S_IMODE(os.stat(tmp_path / "k" / "admin" / "admin.key_secret").st_mode) == 0o600
    assert "kvm0.key_secret" in capsys.readouterr().out


def test_name_binding_rule() -> None:
    assert name_matches_key("kvm0", "kvm0")
    assert name_matches_key("xpmem-3f2a9c", "xpmem")
    assert not name_matches_key("xpmem", "xpmem0")
    assert not name_matches_key("gru0", "kvm0")
    assert not name_matches_key("kvm-", "kvm")
    assert not name_matches_key("kvm0x", "kvm0")


def test_rate_limiter_token_bucket() -> None:
    rl = RateLimiter(10, burst=5)
    assert [rl.allow("a", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert rl.allow("b", 0.0)  # per peer
    assert rl.allow("a", 0.1) and not rl.allow("a", 0.1)  # 10/s refills one token in 0.1 s
    assert all(RateLimiter(0).allow("x", 0.0) for _ in range(1000))  # 0 = unlimited
    many = RateLimiter(10, max_peers=8)
    for i in range(100):
        many.allow(i, float(i))
    assert len(many._buckets) <= 8


def test_limits_from_env() -> None:
    limits = Limits.from_env({"MMN_RATE_LIMIT": "50", "MMN_MAX_RANGE": "8192"}, max_pages=16)
    assert (limits.max_rate, limits.max_range, limits.max_pages) == (50, 8192, 16)
    with pytest.raises(ValueError):
        Limits.from_env({"MMN_MAX_FRAME": "lots"})
    cfg = HostConfig.from_env({"MMN_KEYS_DIR": "/k", "MMN_MAX_PAGES": "8"})
    assert cfg.limits.max_pages == 8 and cfg.key_paths() == ("/k/host/host.key_secret", "/k/nodes", "/k/admin")
    assert HostConfig.from_env({"MMN_KEYS_DIR": "/k", "MMN_INSECURE": "1"}).key_paths() is None
    assert HostConfig.from_env({}).key_paths() is None
    with pytest.raises(ValueError):
        HostConfig(node_keys="/k/nodes").key_paths()


# --------------------------------------------------------------------------
# who gets in


async def test_keyed_nodes_register_and_admin_key_works(tmp_path: Path) -> None:
    async with cluster(tmp_path, (("kvm0", "kvm"), ("xpmem0", "xpmem"))) as c:
        status = await c.ok("status")
        assert {(n["name"], n["state"]) for n in status["nodes"]} == {("kvm0", "live"), ("xpmem0", "live")}
        mm = (await c.ok("spawn"))["mm"]
        addr = (await c.ok("mmap", mm=mm, pages=2, fill=7))["addr"]
        pages = (await c.ok("fault", node="kvm0", mm=mm, addr=addr, pages=2))["pages"]
        assert len(pages) == 2


async def test_unkeyed_and_unknown_key_nodes_cannot_register(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        other = tmp_path / "other"
        keygen(other, nodes=["kvm5"])
        # no key at all (plain TCP), and a key the host has never seen
        for name, cfg in (("kvm4", {}), ("kvm5", {"key": str(KeyLayout(other).node_secret("kvm5")),
                                                   "host_key": str(c.layout.host_public)})):
            runtime = NodeRuntime(NodeConfig(kind="kvm", name=name, host=c.endpoints["node"],
                                             register_timeout_ms=200, backoff_max_ms=200, **cfg))
            with trio.move_on_after(1.5) as scope:
                await c.nursery.start(runtime.run)
            assert scope.cancelled_caught, f"{name} registered"
        status = await c.ok("status")
        assert [n["name"] for n in status["nodes"]] == ["kvm0"]
        assert status["counters"]["handshake_failed_node"] >= 1  # no CURVE
        assert status["counters"]["zap_refused_node"] >= 1  # unknown key


async def test_a_node_key_cannot_run_admin_commands(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        before = (await c.ok("status"))["counters"]["zap_refused_admin"]
        with pytest.raises(trio.TooSlowError):
            await c.admin("spawn", security=node_security(c.layout, "kvm0"), timeout=1.0)
        with pytest.raises(trio.TooSlowError):  # and no key at all
            await c.admin("status", security=None, timeout=1.0)
        status = await c.ok("status")
        assert status["counters"]["zap_refused_admin"] > before
        assert status["counters"]["handshake_failed_admin"] >= 1
        assert status["mms"] == []  # the spawn never happened


async def test_the_event_stream_is_for_admin_keys_only(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        got: dict[str, int] = {}
        mm = (await c.ok("spawn"))["mm"]
        for who, sec in (("admin", admin_security(c.layout)), ("node", node_security(c.layout, "kvm0"))):
            async with connect(zmq.SUB, c.endpoints["events"], security=sec) as sub:
                sub.socket.setsockopt(zmq.SUBSCRIBE, b"")
                await trio.sleep(0.3)
                await c.ok("mmap", mm=mm, pages=1)
                got[who] = 0
                with trio.move_on_after(0.7):
                    await sub.recv_multipart()
                    got[who] += 1
        assert got == {"admin": 1, "node": 0}
        assert (await c.ok("status"))["counters"]["zap_refused_events"] >= 1


async def test_a_node_registers_only_under_its_keys_name(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        sec = node_security(c.layout, "kvm9")
        reply = await raw_request(c.endpoints["node"], sec, Register(id=1, name="kvm0", kind="kvm",
                                  ops=["invalidate_range_start", "invalidate_range_end"], sleepable=False,
                                  incarnation="x"))
        assert isinstance(reply, Error) and reply.code == "forbidden"
        status = await c.ok("status")
        assert [(n["name"], n["state"]) for n in status["nodes"]] == [("kvm0", "live")]  # not displaced
        assert status["counters"]["forbidden"] == 1


async def test_a_replayed_frame_from_a_fenced_epoch_is_refused(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        mm = (await c.ok("spawn"))["mm"]
        addr = (await c.ok("mmap", mm=mm, pages=1, fill=1))["addr"]
        sec = node_security(c.layout, "kvm9")
        register = Register(id=1, name="kvm9", kind="kvm", ops=["invalidate_range_start", "invalidate_range_end"],
                            sleepable=False, incarnation="a")
        async with connect(zmq.DEALER, c.endpoints["node"], security=sec) as sock:
            async def ask(msg: Any) -> Any:
                with trio.fail_after(3):
                    await sock.send_multipart([encode(msg)])
                    while True:
                        reply = decode((await sock.recv_multipart())[-1])
                        if getattr(reply, "ref", None) == msg.id:
                            return reply

            first = await ask(register)
            assert isinstance(first, Registered)
            await c.ok("grant", node="kvm9", mm=mm)
            gup = Gup(id=2, epoch=first.epoch, mm=mm, addr=addr, npages=1, write=False)
            assert (await ask(gup)).TYPE == "gup_reply"
            # the node restarts: a new epoch; the old one is retired (fenced)
            second = await ask(Register(id=3, name="kvm9", kind="kvm", ops=list(register.ops), sleepable=False,
                                        incarnation="b"))
            assert isinstance(second, Registered) and second.epoch != first.epoch
            replay = await ask(Gup(id=4, epoch=first.epoch, mm=mm, addr=addr, npages=1, write=True))
            assert isinstance(replay, Error) and replay.code == "fenced"
        # another key on a connection that claims kvm9's routing id is refused, not mistaken for it
        hijack = await raw_request(c.endpoints["node"], node_security(c.layout, "kvm8"),
                                   Gup(id=5, epoch=second.epoch, mm=mm, addr=addr, npages=1, write=True))
        assert isinstance(hijack, Error) and hijack.code in ("unregistered", "forbidden")


async def test_xpmem_modes_follow_the_authenticated_identity(tmp_path: Path) -> None:
    async with cluster(tmp_path, (("xpmem0", "xpmem"), ("xpmem1", "xpmem"))) as c:
        mm = (await c.ok("spawn"))["mm"]
        addr = (await c.ok("mmap", mm=mm, pages=2, fill=5))["addr"]
        # xpmem0 exports read-only to others (0644)
        segid = (await c.ok("xpmem", node="xpmem0", op="make", mm=mm, addr=addr, length=2 * PAGE, mode=0o644))["segid"]
        denied = await c.admin("xpmem", {"node": "xpmem1", "op": "get", "segid": segid, "write": True})
        assert not denied.ok and denied.errno == "EACCES"
        apid = (await c.ok("xpmem", node="xpmem1", op="get", segid=segid))["apid"]
        # xpmem_attach validates for XPMEM_RDWR: a read-only permit is not attached
        refused = await c.admin("xpmem", {"node": "xpmem1", "op": "attach", "apid": apid, "length": 2 * PAGE})
        assert not refused.ok and refused.errno == "EACCES"
        # host side: a read-only permit never pins writable, whatever the node asks
        session = c.host.sessions.by_name["xpmem1"]
        assert not c.host.segments.may_pin("xpmem1", mm, addr, addr + PAGE, True)
        assert c.host.segments.may_pin("xpmem1", mm, addr, addr + PAGE, False)
        assert session.state == "live"
        # 0640: others get nothing at all; the owner still may
        seg2 = (await c.ok("xpmem", node="xpmem0", op="make", mm=mm, addr=addr, length=PAGE, mode=0o640))["segid"]
        refused = await c.admin("xpmem", {"node": "xpmem1", "op": "get", "segid": seg2})
        assert not refused.ok and refused.errno == "EACCES"
        assert (await c.ok("xpmem", node="xpmem0", op="get", segid=seg2, write=True))["apid"]
        # a peer holding xpmem1's key cannot pose as the owner xpmem0 to get owner bits
        sec = node_security(c.layout, "xpmem1")
        pose = await raw_request(c.endpoints["node"], sec, Register(id=1, name="xpmem0", kind="xpmem",
                                 ops=["invalidate_range_start", "invalidate_range_end"], sleepable=True,
                                 incarnation="p"))
        assert isinstance(pose, Error) and pose.code == "forbidden"
        assert c.host.sessions.by_name["xpmem0"].state == "live"


async def test_limits_range_and_rate(tmp_path: Path) -> None:
    limits = Limits(max_range=8 * PAGE, max_rate=50, rate_burst=50)
    async with cluster(tmp_path, limits=limits) as c:
        mm = (await c.ok("spawn"))["mm"]
        too_big = await c.admin("mmap", {"mm": mm, "pages": 9})
        assert not too_big.ok and "too_large" in too_big.error
        assert (await c.ok("mmap", mm=mm, pages=8))["addr"]
        reg = await raw_request(c.endpoints["node"], node_security(c.layout, "kvm9"),
                                Register(id=1, name="kvm9", kind="kvm", ops=["invalidate_range_start",
                                         "invalidate_range_end"], sleepable=False, incarnation="z"))
        assert isinstance(reg, Registered)
        # a flood from one admin connection: the first 50 answered, the rest dropped and counted
        before = (await c.ok("status"))["counters"]
        answered = 0
        async with connect(zmq.DEALER, c.endpoints["admin"], security=admin_security(c.layout)) as sock:
            for i in range(200):
                await sock.send_multipart([encode(AdminRequest(id=i + 1, command="status_x", args={}))])
            with trio.move_on_after(1.0):
                while True:
                    await sock.recv_multipart()
                    answered += 1
        after = (await c.ok("status"))["counters"]
        assert answered <= 60 and answered >= 40
        assert after["rate_limited"] - before["rate_limited"] == 200 - answered
        assert after["dropped_admin_frames"] - before["dropped_admin_frames"] == 200 - answered


async def test_a_too_large_xpmem_segment_is_refused(tmp_path: Path) -> None:
    async with cluster(tmp_path, limits=Limits(max_range=4 * PAGE)) as c:
        sec = node_security(c.layout, "xpmem1")
        async with connect(zmq.DEALER, c.endpoints["node"], security=sec) as sock:
            await sock.send_multipart([encode(Register(id=1, name="xpmem1", kind="xpmem", ops=[
                "invalidate_range_start", "invalidate_range_end"], sleepable=True, incarnation="q"))])
            with trio.fail_after(3):
                reg = decode((await sock.recv_multipart())[-1])
                await sock.send_multipart([encode(XpmemMake(id=2, epoch=reg.epoch, mm=1, addr=0, length=8 * PAGE,
                                                            mode=0o644))])
                reply = decode((await sock.recv_multipart())[-1])
        assert isinstance(reply, Error) and reply.code == "too_large" and reply.ref == 2
        assert not c.host.segments.segments
