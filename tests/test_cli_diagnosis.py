"""What ``mmn`` says when it cannot talk to a host: each key or port mistake
gets its own message, with the fix, and fails fast (libzmq's socket monitor
sees the handshake fail) instead of waiting out the timeout.

Real ``mmn host`` processes on loopback ports the OS picks: one with CURVE
(keys from ``mmn keygen``), one with plain TCP.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mmn import client, up
from mmn.cli import main

ROOT = Path(__file__).resolve().parent.parent
#: A command that fails fast is done well inside the default 10 s timeout.
FAST = 5.0

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("MMN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # no note of any real mmn up


def _start_host(tmp: Path, *security: str) -> Iterator[dict[str, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmn", "host", "--node-port", "0", "--admin-port", "0", "--events-port", "0",
         "--frames", "64", *security],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("MMN_")},
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "mmn host: ready " in line:
                yield ast.literal_eval(line.split("ready ", 1)[1])
                return
            if not line and proc.poll() is not None:
                break
        pytest.fail("mmn host did not start")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    assert main(["keygen", str(root / "ours")]) == 0
    assert main(["keygen", str(root / "theirs")]) == 0  # another cluster's keys
    return root


@pytest.fixture(scope="module")
def curve_host(keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    yield from _start_host(tmp_path_factory.mktemp("curve"), "--keys", str(keys / "ours"))


@pytest.fixture(scope="module")
def plain_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    yield from _start_host(tmp_path_factory.mktemp("plain"), "--insecure")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str, float]:
    """``main(["--json", *argv])``: exit status, the JSON document, stderr, seconds taken."""
    capsys.readouterr()
    started = time.monotonic()
    code = main(["--json", *argv])
    took = time.monotonic() - started
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else {}, err, took


def test_the_right_keys_get_an_answer(curve_host: dict[str, str], keys: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, err, _ = run(capsys, "--keys", str(keys / "ours"), "--host", curve_host["admin"], "status")
    assert code == 0, err
    assert doc["frames"]["total"] == 64


def test_another_clusters_key_is_refused_fast(curve_host: dict[str, str], keys: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, err, took = run(capsys, "--keys", str(keys / "theirs"), "--host", curve_host["admin"], "status")
    assert (code, doc["errno"], doc["reason"]) == (3, "unreachable", "key")
    assert took < FAST
    assert "the host refused this client's key" in err and "--keys DIR" in err
    assert err.count("\n") == 1


def test_the_wrong_host_key_is_refused_fast(curve_host: dict[str, str], keys: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MMN_ADMIN_KEY", str(keys / "ours" / "admin" / "admin.key_secret"))
    monkeypatch.setenv("MMN_HOST_KEY", str(keys / "theirs" / "host" / "host.key"))
    code, doc, err, took = run(capsys, "--host", curve_host["admin"], "status")
    assert (code, doc["reason"]) == (3, "key") and took < FAST
    assert "host key" in err


def test_no_keys_and_no_note_says_so(curve_host: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, err, took = run(capsys, "--host", curve_host["admin"], "status")
    assert (code, doc["reason"]) == (3, "key") and took < FAST
    assert "runs CURVE and this client has no keys" in err and "no note of a local `mmn up`" in err


def test_insecure_client_against_curve_host_names_the_variable(
    curve_host: dict[str, str], keys: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MMN_INSECURE", "1")
    code, doc, err, took = run(capsys, "--keys", str(keys / "ours"), "--host", curve_host["admin"], "status")
    assert (code, doc["reason"]) == (3, "key") and took < FAST
    assert "$MMN_INSECURE is set" in err


def test_curve_client_against_plain_host(plain_host: dict[str, str], keys: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, err, took = run(capsys, "--keys", str(keys / "ours"), "--host", plain_host["admin"], "status")
    assert (code, doc["reason"]) == (3, "insecure") and took < FAST, err
    assert "runs plain TCP" in err and "MMN_INSECURE=1" in err


@pytest.mark.parametrize("port", ["node", "events"])
def test_a_plain_hosts_other_ports_are_not_admin_ports(
    plain_host: dict[str, str], port: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MMN_INSECURE", "1")
    code, doc, err, took = run(capsys, "--host", plain_host[port], "status")
    assert (code, doc["reason"]) == (3, "not_admin") and took < FAST, err
    assert "not the admin port" in err or "not an admin port" in err


@pytest.mark.parametrize(("port", "reason"), [("node", "key"), ("events", "not_admin")])
def test_the_note_of_mmn_up_names_the_admin_port(
    curve_host: dict[str, str], keys: Path, port: str, reason: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """With CURVE the node port refuses the admin key like a stranger's (the
    events port lets a subscriber in, which tells it); the note of the local
    `mmn up` names the port it was and the admin port."""
    ports = {role: int(ep.rsplit(":", 1)[1]) for role, ep in curve_host.items()}
    note = client.up_record_path(ports["admin"])
    note.write_text(json.dumps({"pid": os.getpid(), "keys": str(keys / "ours"), "admin": curve_host["admin"],
                                "ports": ports}))
    code, doc, err, took = run(capsys, "--keys", str(keys / "ours"), "--host", curve_host[port], "status")
    assert (code, doc["reason"]) == (3, reason) and took < FAST, err
    assert f"is the {port} port of `mmn up` (pid {os.getpid()}), its admin port is tcp://127.0.0.1:{ports['admin']}" in err


def test_nothing_listening_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    port = up.free_ports(1)[0]
    code, doc, err, took = run(capsys, "--host", f"127.0.0.1:{port}", "status")
    assert (code, doc["reason"]) == (3, "refused") and took < FAST
    assert err.startswith(f"mmn: unreachable: no answer from the host at tcp://127.0.0.1:{port}: nothing listens")


def test_default_port_numbers_are_explained() -> None:
    assert "7781 is the default node port, the admin port is 7782" in client.port_hint("tcp://10.0.0.1:7781")
    assert client.port_hint("tcp://10.0.0.1:7782") == ""
