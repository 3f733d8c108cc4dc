"""Node names in containers: ``MMN_NAME_FROM_HOSTNAME`` (set by the image).

The containers themselves are in ``test_docker.py``."""

from __future__ import annotations

import socket

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
