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


def test_link_healthcheck_finds_established_connections_to_the_port() -> None:
    from mmn.health import established

    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    tcp = header + (
        "   0: 0B00007F:A1B2 0200120A:1E65 01 00000000:00000000 00:00000000 00000000   999        0 4242 1\n"
        "   1: 0B00007F:A1B3 0200120A:1E65 02 00000000:00000000 00:00000000 00000000   999        0 4243 1\n"
        "   2: 0B00007F:A1B4 0200120A:1E66 01 00000000:00000000 00:00000000 00000000   999        0 4244 1\n"
    )
    tcp6 = header + (
        "   0: 00000000000000000000000001000000:C000 00000000000000000000000001000000:1E65 01 "
        "00000000:00000000 00:00000000 00000000   999        0 5151 1\n"
    )
    assert established(7781, [tcp, tcp6]) == {"4242", "5151"}  # 0x1E65 = 7781; SYN_SENT (02) is not
    assert established(7782, [tcp]) == {"4244"}
    assert established(7783, [tcp, tcp6]) == set()


def test_link_healthcheck_without_a_connection_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    from mmn.health import main

    assert main(["--link", "--endpoint", "tcp://127.0.0.1:1"]) == 1
    assert capsys.readouterr().err.startswith("unhealthy: no lasting connection")
