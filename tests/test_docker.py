"""The compose cluster in real containers (marked ``docker``).

One cluster per module: ``docker-compose.yml`` brought up under a project
name of its own (``-p``) with the host's ports published on free loopback
ports, so it never meets a local ``mmn up`` or another run.  The image is
(re)built first by ``scripts/build-images.sh``, the air-gapped build: the base
only when it is missing, the rest cached, so a second run costs seconds.
``MMN_TEST_IMAGE=name:tag`` tests an existing image instead, unbuilt.

The cluster runs with CURVE, as compose brings it up by default: the tests
fetch the admin key (and the host's public key) out of the host container
with ``docker cp``, as the README tells a person to, and drive it with that.

Everything is driven from outside, as a person would: the ``mmn`` CLI through
the published admin port, ``docker kill``/``start`` and ``docker network
disconnect``/``connect``.  The cluster is torn down (``down -v``) by the
fixture's finaliser, whatever happened; its logs are printed there, shown
when a test failed.

Without a Docker engine every test here skips with one reason.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 1200  # the first build: debootstrap, wheels, docker build (~2-3 min here)
ACK_DEADLINE_MS = 4000
#: Acks held back by kvm and gru in the kill test: inside the deadline, and
#: long enough for `docker kill` on a loaded machine.
ACK_DELAY_MS = 3000
PAGE = 4096
KINDS = ("kvm", "gru", "xpmem", "hmm")
XPMEM_REPLICAS = 2


def _run(cmd: list[str], *, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None,
         cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def compose_command() -> list[str] | None:
    """``docker compose`` (v2) if the plugin is there, else ``docker-compose`` (v1)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _why_no_docker() -> str | None:
    if not shutil.which("docker"):
        return "no Docker engine: the docker command is not installed"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0 or not info.stdout.strip():
        return "no Docker engine: `docker info` cannot reach a daemon"
    if compose_command() is None:
        return "no Docker Compose: neither `docker compose` nor `docker-compose` is installed"
    import importlib.util

    if importlib.util.find_spec("broker.mm") is None:
        return "the host is not built yet"
    return None


pytestmark = pytest.mark.docker
WHY_NO_DOCKER = _why_no_docker()
if WHY_NO_DOCKER:
    pytest.skip(WHY_NO_DOCKER, allow_module_level=True)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _mmn_command() -> list[str]:
    script = Path(sys.executable).with_name("mmn")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from mmn.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def image() -> str:
    name = os.environ.get("MMN_TEST_IMAGE")
    if name:
        return name
    name = "mmnotify:latest"
    started = time.monotonic()
    proc = _run(["bash", str(ROOT / "scripts" / "build-images.sh")], timeout=BUILD_TIMEOUT, check=False,
                env={**os.environ, "MMN_IMAGE": name})
    if proc.returncode != 0:
        pytest.fail(f"scripts/build-images.sh failed ({proc.returncode}); to test an image built otherwise, "
                    f"set MMN_TEST_IMAGE=name:tag:\n{proc.stderr[-4000:]}")
    sys.stderr.write(f"\nimage {name} ready in {time.monotonic() - started:.0f}s\n")
    return name


@dataclass
class Cluster:
    project: str
    compose: list[str]
    env: dict[str, str]
    admin: str
    network: str
    #: ``mmn keygen`` layout on this machine with the admin pair and the host's
    #: public key fetched from the host container (set once the cluster is up).
    keys: str = ""

    def compose_run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self.compose, "-f", str(ROOT / "docker-compose.yml"), "-p", self.project, *args]
        return _run(cmd, timeout=timeout, check=check, env=self.env)

    def mmn(self, *args: str, timeout: float = 30) -> Any:
        """``mmn --host ADMIN ARGS --json``: the parsed document (exit 0 required)."""
        proc = _run([*_mmn_command(), "--host", self.admin, *args, "--json"], timeout=timeout, check=False,
                    env=self.env)
        assert proc.returncode == 0, f"mmn {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
        return json.loads(proc.stdout)

    def mmn_background(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*_mmn_command(), "--host", self.admin, *args, "--json"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env)

    def status(self) -> dict[str, Any]:
        return self.mmn("status")

    def quick_status(self) -> dict[str, Any]:
        """``status`` in-process (no interpreter start-up), for tight polling."""
        from mmn.client import admin_call, client_security

        security = client_security(self.keys or None, env=self.env)
        return trio.run(partial(admin_call, self.admin, "status", {}, timeout=5, security=security))

    def containers(self, service: str) -> list[str]:
        """Container ids of one service."""
        out = self.compose_run("ps", "-q", service).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def hostname(self, container: str) -> str:
        return _run(["docker", "inspect", "--format", "{{.Config.Hostname}}", container]).stdout.strip()

    def health(self, container: str) -> str:
        return _run(["docker", "inspect", "--format", "{{.State.Health.Status}}", container]).stdout.strip()


def _nodes(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in status["nodes"]}


def wait_for(what: str, predicate: Any, timeout: float = 60, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def fetch_admin_key(c: Cluster, into: Path) -> None:
    """``docker cp`` the admin pair and the host's public key out of the host
    container into ``into/admin`` and ``into/host`` (what ``mmn --keys`` reads)."""
    (host,) = c.containers("host")
    (into / "host").mkdir(parents=True, exist_ok=True)
    into.chmod(0o700)
    _run(["docker", "cp", f"{host}:/keys/admin", str(into)])
    _run(["docker", "cp", f"{host}:/keys/host/host.key", str(into / "host")])


@pytest.fixture(scope="module")
def cluster(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    compose = compose_command()
    assert compose is not None
    node_port, admin_port, events_port = _free_ports(3)
    project = f"mmntest{os.getpid()}{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMN_")}
    env.update(
        MMN_IMAGE=image,
        MMN_NODE_PUBLISH=f"127.0.0.1:{node_port}",
        MMN_ADMIN_PUBLISH=f"127.0.0.1:{admin_port}",
        MMN_EVENTS_PUBLISH=f"127.0.0.1:{events_port}",
        MMN_ACK_DEADLINE_MS=str(ACK_DEADLINE_MS),
        MMN_HEARTBEAT_MS="500",
        MMN_LIVENESS="6",
        MMN_FRAMES="4096",
        MMN_HEALTH_INTERVAL="2s",
    )
    c = Cluster(project, compose, env, f"tcp://127.0.0.1:{admin_port}", f"{project}_default")
    try:
        c.compose_run("up", "-d", "--no-build",
                      "--scale", f"xpmem={XPMEM_REPLICAS}", timeout=300)
        keys = tmp_path_factory.mktemp("keys")
        fetch_admin_key(c, keys)
        c.keys = str(keys)
        c.env["MMN_KEYS_DIR"] = c.keys  # every `mmn` the tests run (compose does not read it)
        wait_for(
            f"{len(KINDS) - 1 + XPMEM_REPLICAS} live nodes",
            lambda: sum(n["state"] == "live" for n in c.status()["nodes"]) == len(KINDS) - 1 + XPMEM_REPLICAS,
        )
        yield c
    finally:
        logs = c.compose_run("logs", "--no-color", "--tail", "40", check=False, timeout=60)
        print(f"---- {project} logs (last lines per container)\n{logs.stdout}{logs.stderr}")
        down = c.compose_run("down", "-v", "--remove-orphans", "-t", "2", check=False, timeout=180)
        if down.returncode != 0:
            print(f"down failed: {down.stderr}")


def _service_nodes(c: Cluster, service: str) -> list[tuple[str, str]]:
    """(container id, node name) of every container of a service."""
    return [(cid, f"{service}-{c.hostname(cid)}") for cid in c.containers(service)]


def test_cluster_is_up_and_healthy(cluster: Cluster) -> None:
    c = cluster
    status = c.status()
    nodes = _nodes(status)
    expected = {name: kind for kind in KINDS for _cid, name in _service_nodes(c, kind)}
    assert len(expected) == len(KINDS) - 1 + XPMEM_REPLICAS  # --scale gave every replica its own name
    assert {name: n["kind"] for name, n in nodes.items()} == expected
    assert all(n["state"] == "live" for n in nodes.values())
    assert status["stale_accesses"] == 0
    containers = [cid for service in ("host", *KINDS) for cid in c.containers(service)]
    wait_for("every container healthy", lambda: all(c.health(cid) == "healthy" for cid in containers), timeout=90)
    # the admin port is published on loopback only
    (host,) = c.containers("host")
    port = _run(["docker", "port", host, "7782/tcp"]).stdout.split()
    assert port and all(p.startswith("127.0.0.1:") for p in port), port


def test_curve_only_the_admin_key_gets_an_answer(cluster: Cluster, tmp_path: Path) -> None:
    """The admin port answers the fetched admin key, and nobody else: a
    plain-TCP client and a client with a key of its own (unknown to the host)
    get no answer.  Node containers hold no admin or host secret."""
    c = cluster
    assert c.status()["host"]  # the keyed client
    inside = c.compose_run("exec", "-T", "host", "mmn", "status", "--json")  # the host container's own key
    assert json.loads(inside.stdout)["host"]
    plain = {k: v for k, v in c.env.items() if k != "MMN_KEYS_DIR"}
    stranger = tmp_path / "stranger"
    _run([*_mmn_command(), "keygen", str(stranger)], env=plain)
    stranger_env = {**plain, "MMN_ADMIN_KEY": str(stranger / "admin" / "admin.key_secret"),
                    "MMN_HOST_KEY": str(Path(c.keys) / "host" / "host.key")}
    for who, env in (("plain TCP", plain), ("an unknown key", stranger_env)):
        proc = _run([*_mmn_command(), "--host", c.admin, "--timeout", "2", "status", "--json"], env=env,
                    check=False, timeout=30)
        assert proc.returncode != 0, f"{who}: answered {proc.stdout}"
        assert json.loads(proc.stdout)["errno"] == "unreachable" and "no answer" in proc.stderr, (who, proc)
    for service in KINDS:
        cid = c.containers(service)[0]
        files = _run(["docker", "exec", cid, "find", "/keys", "-type", "f"]).stdout.split()
        assert "/keys/host/host.key" in files and f"/keys/nodes/{service}.key_secret" in files, files
        assert not any(f.startswith("/keys/admin") or f.endswith("host.key_secret") for f in files), files


def test_memory_operations_through_the_nodes(cluster: Cluster) -> None:
    c = cluster
    (kvm,) = [name for _cid, name in _service_nodes(c, "kvm")]
    (gru,) = [name for _cid, name in _service_nodes(c, "gru")]
    mm = c.mmn("spawn")["mm"]
    addr = c.mmn("mmap", "--mm", str(mm), "--pages", "8", "--fill", "7")["addr"]
    pages = c.mmn("fault", kvm, "--mm", str(mm), hex(addr), "--pages", "8")["pages"]
    assert [p[0] for p in pages] == [addr + i * PAGE for i in range(8)]
    c.mmn("fault", gru, "--mm", str(mm), hex(addr), "--pages", "4")
    assert _nodes(c.status())[kvm]["mapped_pages"] == 8
    # a host write reaches the node through a fresh translation
    c.mmn("write", "--mm", str(mm), hex(addr + PAGE), "c0ffee")
    assert c.mmn("access", kvm, "--mm", str(mm), hex(addr + PAGE), "--len", "4")["data"] == "c0ffee07"
    c.mmn("munmap", "--mm", str(mm), hex(addr), str(4 * PAGE))
    assert _nodes(c.status())[kvm]["mapped_pages"] == 4
    # KSM: identical pages of a mergeable area share a frame
    merged = c.mmn("mmap", "--mm", str(mm), "--pages", "4", "--mergeable", "--fill", "5")["addr"]
    c.mmn("fault", kvm, "--mm", str(mm), hex(merged), "--pages", "4")
    ksm = c.mmn("merge", "--full-scans", "2")
    assert ksm["pages_shared"] + ksm["pages_sharing"] >= 4, ksm
    assert c.mmn("access", kvm, "--mm", str(mm), hex(merged), "--len", "2")["data"] == "0505"
    status = c.status()
    assert status["stale_accesses"] == 0
    assert all(n["state"] == "live" for n in status["nodes"])
    c.mmn("exit", "--mm", str(mm))


def test_kill_and_partition_in_the_middle_of_an_invalidation(cluster: Cluster) -> None:
    """kvm is killed and gru cut off while a munmap waits for their acks
    (both hold acks 3 s, inside the 4 s deadline): the host fences both,
    finishes the munmap, and takes them back after ``docker start`` and
    ``docker network connect`` under their old names with new epochs."""
    c = cluster
    ((kvm_id, kvm),) = _service_nodes(c, "kvm")
    ((gru_id, gru),) = _service_nodes(c, "gru")
    xpmems = [name for _cid, name in _service_nodes(c, "xpmem")]
    mm = c.mmn("spawn")["mm"]
    addr = c.mmn("mmap", "--mm", str(mm), "--pages", "16", "--fill", "9")["addr"]
    for node in (kvm, gru):
        c.mmn("fault", node, "--mm", str(mm), hex(addr), "--pages", "16")
    before = _nodes(c.status())
    for node in (kvm, gru):
        c.mmn("inject", node, "delay-acks", "--delay-ms", str(ACK_DELAY_MS))

    counters = c.quick_status()["counters"]
    starts, ends = counters["notifier_invalidate_range_start"], counters["notifier_invalidate_range_end"]
    started = time.monotonic()
    munmap = c.mmn_background("munmap", "--mm", str(mm), hex(addr), str(8 * PAGE))
    cut: list[list[str]] = []  # how to undo what was done to the containers

    def restore() -> None:
        while cut:
            _run(cut.pop(0), check=False)

    try:
        def in_flight() -> bool:
            now = c.quick_status()["counters"]
            assert now["notifier_invalidate_range_end"] == ends, "the invalidation finished before the kill"
            return now["notifier_invalidate_range_start"] > starts

        wait_for("the munmap's invalidate_range_start", in_flight, timeout=10, interval=0.02)
        time.sleep(0.1)  # the starts are at the nodes, their acks held back
        _run(["docker", "kill", kvm_id])
        cut.append(["docker", "start", kvm_id])
        _run(["docker", "network", "disconnect", c.network, gru_id])
        cut.append(["docker", "network", "connect", c.network, gru_id])
        out, err = munmap.communicate(timeout=30)
        elapsed = time.monotonic() - started
        # It waited for them (until a fence: the dead connection, the silence
        # past liveness or the ack deadline), and finished without them.
        assert munmap.returncode == 0, err
        assert elapsed > 1, f"munmap finished in {elapsed:.2f}s: was the invalidation held at all?"

        status = c.status()
        nodes = _nodes(status)
        assert nodes[kvm]["state"] != "live" and nodes[gru]["state"] != "live", nodes
        assert all(nodes[x]["state"] == "live" for x in xpmems)
        assert status["counters"]["fences"] >= 2
        assert status["stale_accesses"] == 0
        # the host goes on without them
        c.mmn("write", "--mm", str(mm), hex(addr + 8 * PAGE), "abcd")
    finally:
        if munmap.poll() is None:
            munmap.kill()
        restore()  # also when an assertion failed: the next tests need the cluster whole

    def back() -> bool:
        now = _nodes(c.status())
        return all(now[n]["state"] == "live" and now[n]["epoch"] > before[n]["epoch"] for n in (kvm, gru))

    wait_for("kvm and gru registered again", back, timeout=60)
    c.mmn("heal", gru)
    # they work again, and see the host's write
    for node in (kvm, gru):
        c.mmn("fault", node, "--mm", str(mm), hex(addr + 8 * PAGE), "--pages", "8")
    assert c.mmn("access", kvm, "--mm", str(mm), hex(addr + 8 * PAGE), "--len", "3")["data"] == "abcd09"
    c.mmn("munmap", "--mm", str(mm), hex(addr + 8 * PAGE), str(8 * PAGE))
    status = c.status()
    assert status["stale_accesses"] == 0
    assert all(n["state"] == "live" for n in status["nodes"] if n["name"] in (kvm, gru, *xpmems))
    wait_for("kvm and gru healthy again", lambda: c.health(kvm_id) == c.health(gru_id) == "healthy", timeout=60)
    c.mmn("exit", "--mm", str(mm))


@pytest.mark.docker
def test_restart_policy_and_a_host_restart(cluster: Cluster) -> None:
    """A node process that dies is brought back by ``restart: unless-stopped``
    and registers under its old name; after a host restart (a new
    incarnation) every node registers with the new host by itself."""
    c = cluster
    ((kvm_id, kvm),) = _service_nodes(c, "kvm")
    restarts = int(_run(["docker", "inspect", "--format", "{{.RestartCount}}", kvm_id]).stdout)
    epoch = _nodes(c.status())[kvm]["epoch"]
    proc = _run([*_mmn_command(), "--host", c.admin, "inject", kvm, "crash", "--json"], check=False, env=c.env)
    assert proc.returncode in (0, 1, 3), proc.stderr  # the node may die before it answers

    def restarted() -> bool:
        count = int(_run(["docker", "inspect", "--format", "{{.RestartCount}}", kvm_id]).stdout)
        node = _nodes(c.status()).get(kvm)
        return count > restarts and node is not None and node["state"] == "live" and node["epoch"] > epoch

    wait_for("kvm restarted by Docker and live again", restarted, timeout=60)

    incarnation = c.status()["host"]["incarnation"]
    (host_id,) = c.containers("host")
    _run(["docker", "restart", "-t", "5", host_id], timeout=60)

    def all_back() -> bool:
        status = c.status()
        live = [n for n in status["nodes"] if n["state"] == "live"]
        return status["host"]["incarnation"] != incarnation and len(live) == len(KINDS) - 1 + XPMEM_REPLICAS

    wait_for("every node registered with the restarted host", all_back, timeout=60)
    assert c.status()["stale_accesses"] == 0
