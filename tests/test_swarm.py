"""docker-stack.yml on Docker Swarm, and ``mmn swarm-secrets``.

The tests marked ``docker`` deploy the stack on a one-node swarm of this
machine's engine: ``docker swarm init --advertise-addr 127.0.0.1`` (listening
on loopback only) unless the engine is a swarm manager already, the keys made
by ``mmn swarm-secrets`` under a prefix of their own, the image the one
``scripts/build-images.sh`` builds (as test_docker.py does; cached) deployed
by its id with ``--resolve-image never``, so no registry is ever asked.  The
cluster is driven as the README tells a person to: ``mmn`` through
``docker exec`` into the host task (the only place with the admin key; the
stack publishes nothing), ``docker service scale``, ``docker kill``.

The module's finaliser removes the stack, its secrets and, if it made the
swarm, leaves it (``docker swarm leave --force``) and removes the
``docker_gwbridge`` network that ``swarm init`` created, whatever happened.

The tests above the fixture need no engine: what ``mmn swarm-secrets``
creates, against a stand-in for Docker's CLI.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq.auth

from mmn import swarm

ROOT = Path(__file__).resolve().parent.parent
STACK_FILE = ROOT / "docker-stack.yml"
BUILD_TIMEOUT = 1200
KINDS = ("kvm", "gru", "xpmem", "hmm")
PAGE = 4096


# --------------------------------------------------------------------------
# mmn swarm-secrets without an engine


class FakeDocker(swarm.Docker):
    """Docker's secret store in a dict: name -> (label, content)."""

    def __init__(self, existing: dict[str, tuple[str, bytes]] | None = None, fail_on: str | None = None) -> None:
        super().__init__(["docker-that-is-not-run"])
        self.store: dict[str, tuple[str, bytes]] = dict(existing or {})
        self.fail_on = fail_on

    def secrets(self) -> set[str]:
        return set(self.store)

    def create(self, name: str, path: Path, label: str) -> None:
        if name == self.fail_on:
            raise RuntimeError(f"docker secret create: {name} refused")
        self.store[name] = (label, path.read_bytes())

    def remove(self, names: Sequence[str]) -> None:
        for name in names:
            del self.store[name]


def _public(text: bytes, tmp: Path) -> bytes:
    f = tmp / f"k{uuid.uuid4().hex}"
    f.write_bytes(text)
    return zmq.auth.load_certificate(str(f))[0]


def test_secret_names_cover_every_key_the_stack_mounts() -> None:
    names = swarm.secret_names("p")
    assert names["p-host.key_secret"] == "host/host.key_secret"
    assert names["p-admin.key"] == "admin/admin.key"
    assert {n for n in names if n.endswith(".key_secret")} == {
        "p-host.key_secret", "p-admin.key_secret", *(f"p-{k}.key_secret" for k in KINDS)}
    stack = STACK_FILE.read_text()
    for name in swarm.secret_names():
        assert f"name: ${{MMN_SECRETS:-mmn}}-{name[len('mmn-'):]}" in stack, name
    for bad in ("", "-x", "a b", "x" * 60):
        with pytest.raises(ValueError):
            swarm.secret_names(bad)


def test_swarm_secrets_makes_matching_pairs_and_keeps_no_files(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    docker = FakeDocker()
    result = swarm.create_secrets("t", None, docker)
    assert sorted(result["created"]) == sorted(swarm.secret_names("t")) and result["kept"] == []
    assert list(tmp_path.iterdir()) == []  # the scratch keys are gone
    check = tmp_path / "check"
    check.mkdir()
    for base in ("host", "admin", *KINDS):
        label, secret = docker.store[f"t-{base}.key_secret"]
        _, public = docker.store[f"t-{base}.key"]
        assert label.endswith(f"{base}.key_secret")
        assert b"secret-key" in secret and b"secret-key" not in public
        assert _public(secret, check) == _public(public, check)  # one pair
    # a second run keeps the whole set
    again = swarm.create_secrets("t", None, docker)
    assert again["created"] == [] and sorted(again["kept"]) == sorted(swarm.secret_names("t"))


def test_swarm_secrets_refuses_a_partial_set_without_its_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    docker = FakeDocker()
    swarm.create_secrets("t", str(keys), docker)
    host_secret = docker.store["t-host.key_secret"]
    assert host_secret[1] == (keys / "host" / "host.key_secret").read_bytes()
    docker.remove(["t-gru.key", "t-gru.key_secret"])
    with pytest.raises(ValueError, match="only some"):
        swarm.create_secrets("t", None, FakeDocker(docker.store))
    # from the directory they came from: the missing ones, the same keys
    result = swarm.create_secrets("t", str(keys), docker)
    assert sorted(result["created"]) == ["t-gru.key", "t-gru.key_secret"]
    assert docker.store["t-gru.key_secret"][1] == (keys / "nodes" / "gru.key_secret").read_bytes()
    assert docker.store["t-host.key_secret"] == host_secret
    assert swarm.remove_secrets("t", docker)["removed"] and docker.store == {}


def test_swarm_secrets_leaves_no_partial_set_when_docker_fails() -> None:
    docker = FakeDocker(fail_on="t-gru.key")
    with pytest.raises(RuntimeError, match="refused"):
        swarm.create_secrets("t", None, docker)
    assert docker.store == {}


# --------------------------------------------------------------------------
# the stack on a one-node swarm


def _run(cmd: list[str], *, timeout: float = 120, check: bool = True,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _why_no_swarm() -> str | None:
    if not shutil.which("docker"):
        return "no Docker engine: the docker command is not installed"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}} {{.Swarm.LocalNodeState}} "
                           "{{.Swarm.ControlAvailable}}"], capture_output=True, text=True)
    if info.returncode != 0 or not info.stdout.strip():
        return "no Docker engine: `docker info` cannot reach a daemon"
    _version, state, control = (info.stdout.split() + ["", "", ""])[:3]
    if state not in ("inactive", "active") or (state == "active" and control != "true"):
        return f"this engine is in a swarm as a worker or in transition ({state}): not ours to change"
    if subprocess.run(["docker", "stack", "--help"], capture_output=True).returncode != 0:
        return "no `docker stack` in this Docker CLI"
    return None


WHY_NO_SWARM = _why_no_swarm()
needs_swarm = pytest.mark.skipif(WHY_NO_SWARM is not None, reason=WHY_NO_SWARM or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mmn_command() -> list[str]:
    script = Path(sys.executable).with_name("mmn")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from mmn.cli import main; sys.exit(main())"]


def wait_for(what: str, predicate: Any, timeout: float = 60, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except (AssertionError, subprocess.TimeoutExpired) as exc:  # a loaded machine: ask again
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


@dataclass
class Stack:
    name: str
    prefix: str
    env: dict[str, str]
    #: timings of the module, printed at the end
    took: dict[str, float] = field(default_factory=dict)

    def service(self, kind: str) -> str:
        return f"{self.name}_{kind}"

    def containers(self, kind: str) -> list[str]:
        """Running containers of a service (its tasks on this machine)."""
        out = _run(["docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={self.service(kind)}",
                    "--filter", "status=running"]).stdout
        return out.split()

    def host(self) -> str:
        hosts = self.containers("host")
        assert len(hosts) == 1, f"host containers: {hosts}"
        return hosts[0]

    def mmn(self, *args: str, timeout: float = 60) -> Any:
        """``mmn ARGS --json`` in the host task: the parsed document."""
        proc = _run(["docker", "exec", self.host(), "mmn", *args, "--json"], timeout=timeout, check=False)
        assert proc.returncode == 0, f"mmn {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
        return json.loads(proc.stdout)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.mmn("status")["nodes"]}

    def live(self) -> set[str]:
        return {name for name, n in self.nodes().items() if n["state"] == "live"}

    def inspect(self, fmt: str, *objects: str, kind: str = "container") -> str:
        return _run(["docker", kind, "inspect", "--format", fmt, *objects]).stdout.strip()

    def health(self, container: str) -> str:
        return self.inspect("{{.State.Health.Status}}", container)


def _image() -> str:
    name = os.environ.get("MMN_TEST_IMAGE")
    if not name:
        name = "mmnotify:latest"
        proc = _run(["bash", str(ROOT / "scripts" / "build-images.sh")], timeout=BUILD_TIMEOUT, check=False,
                    env={**os.environ, "MMN_IMAGE": name})
        if proc.returncode != 0:
            pytest.fail(f"scripts/build-images.sh failed ({proc.returncode}); to test an image built otherwise, "
                        f"set MMN_TEST_IMAGE=name:tag:\n{proc.stderr[-4000:]}")
    # By id: the tasks use exactly this image and no machine asks a registry for it.
    return _run(["docker", "image", "inspect", "--format", "{{.Id}}", name]).stdout.strip()


def _stack_gone(name: str) -> bool:
    left = _run(["docker", "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={name}"], check=False)
    nets = _run(["docker", "network", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={name}"],
                check=False)
    return not left.stdout.split() and not nets.stdout.split()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    started = time.monotonic()
    image = _image()
    built = time.monotonic()
    state = _run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"]).stdout.strip()
    made_swarm = state == "inactive"
    tag = f"mmntest{os.getpid()}{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMN_")}
    env.update(MMN_IMAGE=image, MMN_SECRETS=tag, MMN_HEARTBEAT_MS="500", MMN_LIVENESS="6", MMN_FRAMES="4096",
               MMN_HEALTH_INTERVAL="5s")
    s = Stack(tag, tag, env)
    try:
        if made_swarm:
            _run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1",
                  "--listen-addr", f"127.0.0.1:{_free_port()}"], timeout=60)
        secrets = json.loads(_run([*_mmn_command(), "swarm-secrets", "--prefix", tag, "--json"], env=env).stdout)
        assert sorted(secrets["created"]) == sorted(swarm.secret_names(tag)), secrets
        _run(["docker", "stack", "deploy", "--resolve-image", "never", "-c", str(STACK_FILE), tag], env=env,
             timeout=120)
        wait_for("kvm-1, gru-1, xpmem-1 and hmm-1 live at the host",
                 lambda: s.containers("host") and s.live() == {f"{k}-1" for k in KINDS}, timeout=120)
        s.took["up"] = time.monotonic() - built
        yield s
    finally:
        logs = []
        for kind in ("host", *KINDS):
            out = _run(["docker", "service", "logs", "--no-trunc", "--tail", "30", s.service(kind)], check=False,
                       timeout=60)
            logs.append(f"-- {kind}\n{out.stdout}{out.stderr}")
        tasks = _run(["docker", "stack", "ps", "--no-trunc", "--format",
                      "{{.Name}} {{.DesiredState}} {{.CurrentState}} {{.Error}}", tag], check=False)
        print(f"---- stack {tag}: tasks\n{tasks.stdout}{tasks.stderr}\n---- logs\n" + "\n".join(logs))
        _run(["docker", "stack", "rm", tag], check=False)
        try:
            wait_for("the stack's containers and network gone", lambda: _stack_gone(tag), timeout=90)
        except AssertionError as exc:
            print(exc)
        removed = _run([*_mmn_command(), "swarm-secrets", "--prefix", tag, "--remove"], env=env, check=False)
        if removed.returncode != 0:
            print(f"secrets not removed: {removed.stderr}")
        if made_swarm:
            left = _run(["docker", "swarm", "leave", "--force"], check=False, timeout=60)
            if left.returncode != 0:
                print(f"swarm leave failed: {left.stderr}")
            try:
                wait_for("docker_gwbridge removed", lambda: _run(
                    ["docker", "network", "rm", "docker_gwbridge"], check=False).returncode == 0 or not _run(
                    ["docker", "network", "ls", "-q", "--filter", "name=^docker_gwbridge$"]).stdout.strip(),
                    timeout=30)
            except AssertionError as exc:
                print(exc)
        total = time.monotonic() - started
        sys.stderr.write(f"\nswarm tests: image {built - started:.0f}s, stack up {s.took.get('up', 0):.0f}s, "
                         f"all {total:.0f}s\n")


@pytest.mark.docker
@needs_swarm
def test_stack_is_up_healthy_and_publishes_nothing(stack: Stack) -> None:
    s = stack
    nodes = s.nodes()
    assert {name: n["kind"] for name, n in nodes.items()} == {f"{k}-1": k for k in KINDS}
    containers = [cid for kind in ("host", *KINDS) for cid in s.containers(kind)]
    assert len(containers) == 1 + len(KINDS)  # the host and one task per kind
    wait_for("every task healthy", lambda: all(s.health(cid) == "healthy" for cid in containers), timeout=180)
    services = [s.service(kind) for kind in ("host", *KINDS)]
    # nothing published, neither through the routing mesh nor on the machine
    ports = s.inspect("{{json .Endpoint.Ports}}", *services, kind="service").split()
    assert ports == ["null"] * len(services), ports
    for cid in containers:
        bindings = json.loads(s.inspect("{{json .NetworkSettings.Ports}}", cid))
        assert all(b is None for b in bindings.values()), (cid, bindings)
    assert s.inspect("{{json .Spec.TaskTemplate.Placement.Constraints}}", s.service("host"),
                     kind="service") == '["node.role == manager"]'
    assert s.inspect("{{.Spec.TaskTemplate.RestartPolicy.Condition}}", *services, kind="service").split() == \
        ["any"] * len(services)
    assert s.inspect("{{.Driver}}", f"{s.name}_mmn", kind="network") == "overlay"


@pytest.mark.docker
@needs_swarm
def test_each_task_holds_only_its_own_keys(stack: Stack) -> None:
    s = stack

    def files(cid: str) -> set[str]:
        return set(_run(["docker", "exec", cid, "find", "/keys", "-type", "f"]).stdout.split())

    assert files(s.host()) == {"/keys/host/host.key_secret", "/keys/host/host.key", "/keys/admin/admin.key_secret",
                               "/keys/admin/admin.key", *(f"/keys/nodes/{k}.key" for k in KINDS)}
    owner = _run(["docker", "exec", s.host(), "stat", "-c", "%U %a", "/keys/host/host.key_secret",
                  "/keys/admin/admin.key_secret"]).stdout.split("\n")
    assert owner[:2] == ["mmn 400", "mmn 400"], owner
    for kind in KINDS:
        (cid,) = s.containers(kind)
        assert files(cid) == {f"/keys/nodes/{kind}.key_secret", "/keys/host/host.key"}
        # and so no CLI there: it has no admin key
        proc = _run(["docker", "exec", cid, "mmn", "--host", "tcp://host:7782", "--timeout", "2", "status"],
                    check=False, timeout=90)
        assert proc.returncode != 0 and "admin" in proc.stderr, proc


@pytest.mark.docker
@needs_swarm
def test_memory_operations_through_the_host_task(stack: Stack) -> None:
    s = stack
    mm = s.mmn("spawn")["mm"]
    addr = s.mmn("mmap", "--mm", str(mm), "--pages", "8", "--fill", "7")["addr"]
    pages = s.mmn("fault", "kvm-1", "--mm", str(mm), hex(addr), "--pages", "8")["pages"]
    assert [p[0] for p in pages] == [addr + i * PAGE for i in range(8)]
    s.mmn("fault", "gru-1", "--mm", str(mm), hex(addr), "--pages", "4")
    s.mmn("write", "--mm", str(mm), hex(addr + PAGE), "c0ffee")
    assert s.mmn("access", "kvm-1", "--mm", str(mm), hex(addr + PAGE), "--len", "4")["data"] == "c0ffee07"
    s.mmn("munmap", "--mm", str(mm), hex(addr), str(4 * PAGE))
    status = s.mmn("status")
    assert {n["name"]: n["mapped_pages"] for n in status["nodes"]}["kvm-1"] == 4
    assert status["stale_accesses"] == 0
    s.mmn("exit", "--mm", str(mm))


@pytest.mark.docker
@needs_swarm
def test_scaled_replicas_get_distinct_names(stack: Stack) -> None:
    s = stack
    _run(["docker", "service", "scale", "--detach", f"{s.service('xpmem')}=3"])
    wait_for("xpmem-1..3 live", lambda: {"xpmem-1", "xpmem-2", "xpmem-3"} <= s.live(), timeout=90)
    names = []
    for cid in s.containers("xpmem"):
        env = s.inspect("{{range .Config.Env}}{{println .}}{{end}}", cid).split()
        names += [e.split("=", 1)[1] for e in env if e.startswith("MMN_NAME=")]
    assert sorted(names) == ["xpmem-1", "xpmem-2", "xpmem-3"]
    # and back down: Swarm removes one task (which slot is its choice), whose node is fenced
    _run(["docker", "service", "scale", "--detach", f"{s.service('xpmem')}=2"])

    def two_left() -> set[str]:
        live = {n for n in s.live() if n.startswith("xpmem-")}
        return live if len(live) == 2 and len(s.containers("xpmem")) == 2 else set()

    left = wait_for("two xpmem nodes live", two_left, timeout=60)
    (gone,) = {"xpmem-1", "xpmem-2", "xpmem-3"} - left
    assert s.nodes()[gone]["state"] != "live"
    assert {"kvm-1", "gru-1"} <= s.live()


@pytest.mark.docker
@needs_swarm
def test_a_killed_task_returns_under_its_name(stack: Stack) -> None:
    """``docker kill`` a node's task: the restart policy starts a new task in
    the same slot, a new container whose node registers as kvm-1 again."""
    s = stack
    (old,) = s.containers("kvm")
    epoch = s.nodes()["kvm-1"]["epoch"]
    _run(["docker", "kill", old])

    def back() -> bool:
        now = s.containers("kvm")
        node = s.nodes().get("kvm-1")
        return now not in ([], [old]) and node is not None and node["state"] == "live" and node["epoch"] > epoch

    wait_for("a new kvm task, live as kvm-1", back, timeout=60)
    (new,) = s.containers("kvm")
    assert new != old
    tasks = _run(["docker", "service", "ps", "--format", "{{.Name}} {{.CurrentState}} {{.Error}}",
                  s.service("kvm")]).stdout
    assert "non-zero exit (137)" in tasks, tasks
    wait_for("the new kvm task healthy", lambda: s.health(new) == "healthy", timeout=60)


@pytest.mark.docker
@needs_swarm
def test_nodes_find_a_replaced_host(stack: Stack) -> None:
    """The host task killed: a new one (a new container, a new address on
    the overlay) and every node registers with it by itself."""
    s = stack
    old = s.host()
    incarnation = s.mmn("status")["host"]["incarnation"]
    expected = s.live()
    assert {"kvm-1", "gru-1", "xpmem-1"} <= expected
    _run(["docker", "kill", old])

    def all_back() -> bool:
        hosts = s.containers("host")
        if hosts in ([], [old]) or len(hosts) != 1:
            return False
        status = s.mmn("status")
        live = {n["name"] for n in status["nodes"] if n["state"] == "live"}
        return status["host"]["incarnation"] != incarnation and live == expected

    wait_for("every node registered with the new host", all_back, timeout=90)
    assert s.mmn("status")["stale_accesses"] == 0
