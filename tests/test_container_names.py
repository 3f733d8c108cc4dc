"""Node names in containers (``MMN_NAME_FROM_HOSTNAME``, set by the image) and
the containers' healthcheck (``python -m mmn.health``).

The containers themselves are in ``test_docker.py``."""

from __future__ import annotations

import socket

import pytest

from node.runtime import NodeConfig, default_name


def test_default_name_from_hostname() -> None:
    name = default_name("xpmem", {"MMN_NAME_FROM_HOSTNAME": "1"})
    assert name == f"xpmem-{socket.gethostname().split('.')[0]}"
    assert NodeConfig.from_env({"MMN_NAME_FROM_HOSTNAME": "1"}, kind="gru").name.startswith("gru-")


def test_default_name_random_without_the_variable() -> None:
    a, b = (NodeConfig.from_env({}, kind="kvm").name for _ in range(2))
    assert a != b and a.startswith("kvm-")
    assert NodeConfig.from_env({"MMN_NAME_FROM_HOSTNAME": "0"}, kind="kvm").name != socket.gethostname()


def test_explicit_name_wins() -> None:
    env = {"MMN_NAME_FROM_HOSTNAME": "1", "MMN_NAME": "n1"}
    assert NodeConfig.from_env(env, kind="kvm").name == "n1"


def test_healthcheck_reads_a_node_state_from_status() -> None:
    from mmn.health import node_state

    status = {"nodes": [{"name": "kvm-a", "state": "live"}, {"name": "gru-b", "state": "fenced"}]}
    assert node_state(status, "kvm-a") == "live"
    assert node_state(status, "gru-b") == "fenced"
    assert node_state(status, "xpmem-c") is None
    assert node_state({"nodes": []}, "kvm-a") is None


def test_healthcheck_without_a_host_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    from mmn.health import main

    # a loopback port nothing listens on
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["--host", f"tcp://127.0.0.1:{port}", "--timeout", "0.3"]) == 1
    assert capsys.readouterr().err.startswith("unhealthy: host at tcp://127.0.0.1:")
