"""The pytest plugin of mmnotify (entry point ``pytest11``: ``mmnotify``).

Fixtures:

* ``mmn_cluster``: a real cluster for one test -- ``mmn up`` with a host and
  one node of each kind (real processes, OS-chosen ports, CURVE keys in a
  temporary directory) -- as a :class:`Cluster`; ``cluster.client`` is a
  connected :class:`mmnotify.Client`.  Everything is torn down after the
  test, whether it passed, failed or was interrupted (``mmn up`` also stops
  by itself when the test process dies).  Choose the nodes with the marker
  ``@pytest.mark.mmn_cluster(kvm=2, gru=0, xpmem=1, args=[...])``.
* ``mmn_cluster_factory``: ``start(kvm=1, gru=1, xpmem=1, *, curve=True,
  args=(), inject=())`` for tests that want several clusters or other
  options; ``inject`` is ``[(node, kind, {"rate": .., "delay_ms": ..}), ...]``,
  applied before the test gets the cluster.
* ``mmn_local``: the in-process cluster (:class:`mmnotify.LocalCluster`,
  the same host core), for logic tests that need no processes.

Options: ``--mmn-host ENDPOINT`` (and ``--mmn-keys DIR``) attach
``mmn_cluster`` to a cluster that is already running instead of starting
one (nothing is torn down then); ``--mmn-timeout S`` bounds start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from .client import Client, SyncClient


@dataclass
class Cluster:
    """A running cluster: its endpoints, keys, node names and a client."""

    admin: str
    keys: str | None
    nodes: list[str]
    client: Client
    logs: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    ready: dict[str, Any] = field(default_factory=dict)

    def sync(self) -> SyncClient:
        """The synchronous twin of :attr:`client` (outside trio)."""
        return SyncClient(self.admin, keys=self.keys)

    def stop(self, grace: float = 5.0) -> None:
        """Stop ``mmn up`` and everything it started (SIGTERM, then SIGKILL)."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def start_cluster(logs: Path, *, kvm: int = 1, gru: int = 1, xpmem: int = 1, curve: bool = True,
                  args: Sequence[str] = (), timeout: float = 60.0) -> Cluster:
    """``mmn up --port-base 0 --json`` in its own process group; returns once
    every node is live (its ready line).

    Raises:
        RuntimeError: it did not get ready within ``timeout`` seconds (the
            message carries the end of its log).
    """
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mmn", "up", "--port-base", "0", "--json", "--logs", str(logs),
           "--kvm", str(kvm), "--gru", str(gru), "--xpmem", str(xpmem), "--timeout", str(timeout), *args]
    if not curve:
        cmd.append("--insecure")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMN_")}
    err = open(logs / "mmn-up.stderr", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    err.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout + 5
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            break
        if select.select([proc.stdout], [], [], min(left, 0.5))[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            line += chunk
    try:
        ready = json.loads(line.split(b"\n", 1)[0]) if line.endswith(b"\n") else {}
    except ValueError:
        ready = {}
    if not ready.get("ready"):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        tail = (logs / "mmn-up.stderr").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"mmn up did not get ready within {timeout:g}s: {tail}")
    keys = ready.get("keys") or None
    client = Client.at(ready["admin"], keys=keys if curve else None)
    admin = client.admin
    names = [n["name"] for n in ready.get("nodes") or []]
    return Cluster(admin=admin, keys=keys if curve else None, nodes=names, client=client, logs=logs, process=proc,
                   ready=ready)


def attach(host: str, keys: str | None) -> Cluster:
    """A :class:`Cluster` for one already running at ``host`` (not ours to stop)."""
    client = Client.at(host, keys=keys)
    admin = client.admin
    status = trio.run(client.status)
    return Cluster(admin=admin, keys=keys, nodes=[n.name for n in status.nodes], client=client)


def _inject(cluster: Cluster, inject: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
    async def apply() -> None:
        for node, kind, options in inject:
            await cluster.client.inject(node, kind, **options)

    if inject:
        trio.run(apply)


# --------------------------------------------------------------------- hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mmnotify")
    group.addoption("--mmn-host", default=None, metavar="ENDPOINT",
                    help="mmn_cluster attaches to the cluster whose admin endpoint this is (default: start one)")
    group.addoption("--mmn-keys", default=None, metavar="DIR",
                    help="CURVE keys of the --mmn-host cluster (default: found as the mmn CLI finds them)")
    group.addoption("--mmn-timeout", default=60.0, type=float, metavar="S",
                    help="seconds a cluster may take to start (default 60)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mmn_cluster(kvm=1, gru=1, xpmem=1, curve=True, args=(), inject=()): "
                            "the nodes and options of the mmn_cluster fixture")


@pytest.fixture
def mmn_cluster_factory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                        ) -> Iterator[Callable[..., Cluster]]:
    """Start clusters; each is stopped when the test ends."""
    made: list[Cluster] = []
    timeout = float(request.config.getoption("--mmn-timeout"))

    def start(kvm: int = 1, gru: int = 1, xpmem: int = 1, *, curve: bool = True, args: Sequence[str] = (),
              inject: Sequence[tuple[str, str, dict[str, Any]]] = ()) -> Cluster:
        logs = tmp_path_factory.mktemp("mmn-cluster")
        cluster = start_cluster(logs, kvm=kvm, gru=gru, xpmem=xpmem, curve=curve, args=args, timeout=timeout)
        made.append(cluster)
        _inject(cluster, inject)
        return cluster

    try:
        yield start
    finally:
        for cluster in made:
            cluster.stop()


@pytest.fixture
def mmn_cluster(request: pytest.FixtureRequest, mmn_cluster_factory: Callable[..., Cluster]) -> Cluster:
    """A cluster for this test (or the ``--mmn-host`` one)."""
    host = request.config.getoption("--mmn-host")
    if host:
        return attach(host, request.config.getoption("--mmn-keys"))
    marker = request.node.get_closest_marker("mmn_cluster")
    return mmn_cluster_factory(**(marker.kwargs if marker else {}))


@pytest.fixture
def mmn_local() -> Any:
    """The whole system in this process (no sockets), one node of each kind:
    a :class:`mmnotify.LocalCluster`; ``mmn_local.client()`` is a
    :class:`mmnotify.Client` of it, the interface ``mmn_cluster.client`` has."""
    from .local import LocalCluster

    return LocalCluster(nodes={"kvm0": "kvm", "gru0": "gru", "xpmem0": "xpmem"})
