"""The ``mmn`` CLI: parsing, the requests it sends, rendering, exit codes.

A small admin server runs inside each test (a trio task on a real ROUTER on
loopback, OS-chosen port): it checks every request with
``protocol.admin.check_admin``, records it, and answers canned replies.  It is
not the host: these tests are about the client.  ``main()`` is synchronous and
calls ``trio.run``, so it runs in a worker thread while the server serves.

Integration with the real host and nodes (``mmn up``) is at the end, marked
``integration``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq

from mmn import args, cli, client, render, services, supervisor, up
from mmn.cli import main
from protocol.admin import check_admin
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import AdminReply, AdminRequest, Error, Event
from transport import bind

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MMN_"):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------
# the fake admin server


KSM = {
    "pages_shared": 1,
    "pages_sharing": 3,
    "pages_unshared": 0,
    "pages_volatile": 0,
    "full_scans": 2,
    "ksm_zero_pages": 0,
    "run": 1,
    "pages_to_scan": 100,
}


def status_result(events: str = "tcp://127.0.0.1:1") -> dict[str, Any]:
    return {
        "host": {
            "incarnation": "h-1",
            "page_size": 4096,
            "endpoints": {"node": "tcp://127.0.0.1:7781", "admin": "tcp://127.0.0.1:7782", "events": events},
        },
        "nodes": [
            {"name": "kvm0", "kind": "kvm", "state": "live", "epoch": 1, "mapped_pages": 4, "injected": {}},
            {
                "name": "gru0",
                "kind": "gru",
                "state": "fenced",
                "epoch": 2,
                "mapped_pages": 0,
                "injected": {"drop-acks": {"rate": 0.5, "delay_ms": 0}},
            },
        ],
        "mms": [{"mm": 1, "vmas": [[0x7F0000000000, 0x7F0000004000, "rw", ["private", "mergeable"]]], "present": 4, "swapped": 0}],
        "frames": {"total": 1024, "free": 1000},
        "stale_accesses": 0,
        "ksm": KSM,
        "counters": {"invalidations": 7},
    }


Answer = dict[str, Any] | AdminReply | Error | Callable[[AdminRequest], Any]


@dataclass
class FakeHost:
    """Answers admin requests from ``answers`` (command -> result, a whole
    reply, or a function of the request).  Records every request; refuses
    (and records) what ``check_admin`` refuses."""

    answers: dict[str, Answer] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    silent: bool = False
    noise: bool = False
    endpoint: str = ""
    events_endpoint: str = ""
    events: list[Event] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        async with bind(zmq.ROUTER, "tcp://127.0.0.1:0") as router, bind(zmq.XPUB, "tcp://127.0.0.1:0") as xpub:
            self.endpoint = router.endpoint
            self.events_endpoint = xpub.endpoint
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publish, xpub)
                task_status.started(self.endpoint)
                while True:
                    identity, frame = await router.recv_multipart()
                    request = decode(frame)
                    assert isinstance(request, AdminRequest)
                    try:
                        check_admin(request.command, dict(request.args))
                    except ProtocolError as exc:
                        self.refused.append(exc.message)
                        reply: Any = Error(ref=request.id, code="bad_message", message=exc.message)
                    else:
                        self.requests.append((request.command, dict(request.args)))
                        reply = self._answer(request)
                    if self.silent:
                        continue
                    if self.noise:  # a stray reply to someone else first
                        await router.send_multipart([identity, encode(AdminReply(ref=request.id + 1000, ok=True))])
                        await router.send_multipart([identity, b"\x93garbage"])
                    await router.send_multipart([identity, encode(reply)])

    def _answer(self, request: AdminRequest) -> AdminReply | Error:
        answer = self.answers.get(request.command)
        if answer is None and request.command == "status":
            answer = status_result(self.events_endpoint)
        if callable(answer):
            answer = answer(request)
        if isinstance(answer, AdminReply):
            return AdminReply(ref=request.id, ok=answer.ok, result=answer.result, errno=answer.errno, error=answer.error)
        if isinstance(answer, Error):
            return Error(ref=request.id, code=answer.code, message=answer.message)
        return AdminReply(ref=request.id, ok=True, result=answer or {})

    async def _publish(self, xpub: Any) -> None:
        """Publish ``events`` once a subscriber has joined (XPUB tells us)."""
        while True:
            frames = await xpub.recv_multipart()
            if frames and frames[0][:1] == b"\x01":
                for event in self.events:
                    await xpub.send_multipart([event.kind.encode(), encode(event)])


@pytest.fixture
async def host(nursery: trio.Nursery) -> FakeHost:
    fake = FakeHost()
    await nursery.start(fake.serve)
    return fake


async def mmn(*argv: str, seconds: float = 20) -> int:
    """``main(argv)`` in a worker thread (it runs its own trio.run)."""
    with trio.fail_after(seconds):
        return await trio.to_thread.run_sync(main, list(argv), abandon_on_cancel=True)


# --------------------------------------------------------------------------
# every control command: the request it sends and its --json output

A = 0x7F0000000000

CASES: list[tuple[list[str], str, dict[str, Any], dict[str, Any]]] = [
    (["status"], "status", {}, status_result()),
    (["spawn"], "spawn", {}, {"mm": 3}),
    (["fork", "--mm", "3"], "fork", {"mm": 3}, {"mm": 4}),
    (["exit", "--mm", "3"], "exit", {"mm": 3}, {}),
    (["mmap", "--mm", "1", "--pages", "4"], "mmap", {"mm": 1, "pages": 4}, {"addr": A}),
    (
        ["mmap", "--mm", "1", "--pages", "0x10", "--prot", "r", "--mergeable", "--shared", "--fill", "0xab"],
        "mmap",
        {"mm": 1, "pages": 16, "prot": "r", "mergeable": True, "shared": True, "fill": 0xAB},
        {"addr": A},
    ),
    (["write", "--mm", "1", hex(A), "deadBEEF"], "write", {"mm": 1, "addr": A, "data": b"\xde\xad\xbe\xef"}, {"written": 4}),
    (["read", "--mm", "1", str(A), "4"], "read", {"mm": 1, "addr": A, "length": 4}, {"data": b"\x01\x02\x03\x04"}),
    (["munmap", "--mm", "1", hex(A), "8192"], "munmap", {"mm": 1, "addr": A, "length": 8192}, {}),
    (["mprotect", "--mm", "1", hex(A), "4096", "r"], "mprotect", {"mm": 1, "addr": A, "length": 4096, "prot": "r"}, {}),
    (
        ["madvise", "--mm", "1", hex(A), "4096", "dontneed"],
        "madvise",
        {"mm": 1, "addr": A, "length": 4096, "advice": "dontneed"},
        {},
    ),
    (["swap", "--mm", "2", hex(A), "4096"], "swap", {"mm": 2, "addr": A, "length": 4096}, {"swapped": 1}),
    (["migrate", "--mm", "2", hex(A), "4096"], "migrate", {"mm": 2, "addr": A, "length": 4096}, {"migrated": 1}),
    (
        ["fault", "kvm0", "--mm", "1", hex(A), "--pages", "2", "--write"],
        "fault",
        {"node": "kvm0", "mm": 1, "addr": A, "pages": 2, "write": True},
        {"pages": [[A, 7, True], [A + 4096, 8, True]]},
    ),
    (["fault", "gru0", "--mm", "1", hex(A)], "fault", {"node": "gru0", "mm": 1, "addr": A}, {"pages": [[A, 7, False]]}),
    (
        ["access", "gru0", "--mm", "1", hex(A), "--len", "3"],
        "access",
        {"node": "gru0", "mm": 1, "addr": A, "length": 3},
        {"data": b"abc"},
    ),
    (
        ["access", "xpmem0", "--mm", "1", hex(A), "--write", "0a0b"],
        "access",
        {"node": "xpmem0", "mm": 1, "addr": A, "data": b"\x0a\x0b", "length": 2},
        {"written": 2},
    ),
    (["merge"], "merge", {}, KSM),
    (["merge", "--full-scans", "2"], "merge", {"full_scans": 2}, KSM),
    (["ksm"], "ksm", {}, KSM),
    (
        ["ksm", "--run", "2", "--pages-to-scan", "50", "--sleep-millisecs", "0", "--max-page-sharing", "16", "--use-zero-pages", "1"],
        "ksm",
        {"run": 2, "pages_to_scan": 50, "sleep_millisecs": 0, "max_page_sharing": 16, "use_zero_pages": True},
        KSM,
    ),
    (
        ["xpmem", "make", "xpmem0", "--mm", "1", hex(A), "8192", "--mode", "0640"],
        "xpmem",
        {"node": "xpmem0", "op": "make", "mm": 1, "addr": A, "length": 8192, "mode": 0o640},
        {"segid": 5},
    ),
    (["xpmem", "make", "xpmem0", "--mm", "1", hex(A), "8192"], "xpmem", {"node": "xpmem0", "op": "make", "mm": 1, "addr": A, "length": 8192}, {"segid": 5}),
    (["xpmem", "get", "xpmem0", "--segid", "5", "--write"], "xpmem", {"node": "xpmem0", "op": "get", "segid": 5, "write": True}, {"apid": 9}),
    (["xpmem", "get", "xpmem0", "--segid", "5"], "xpmem", {"node": "xpmem0", "op": "get", "segid": 5}, {"apid": 9}),
    (
        ["xpmem", "attach", "xpmem0", "--apid", "9", "--offset", "4096", "--len", "4096"],
        "xpmem",
        {"node": "xpmem0", "op": "attach", "apid": 9, "offset": 4096, "length": 4096},
        {"vaddr": 0x600000000000},
    ),
    (["xpmem", "detach", "xpmem0", "0x600000000000"], "xpmem", {"node": "xpmem0", "op": "detach", "addr": 0x600000000000}, {}),
    (["xpmem", "release", "xpmem0", "--apid", "9"], "xpmem", {"node": "xpmem0", "op": "release", "apid": 9}, {}),
    (["xpmem", "remove", "xpmem0", "--segid", "5"], "xpmem", {"node": "xpmem0", "op": "remove", "segid": 5}, {}),
    (
        ["inject", "kvm0", "delay-acks", "--rate", "0.5", "--delay-ms", "50", "--for", "2.5"],
        "inject",
        {"node": "kvm0", "kind": "delay-acks", "rate": "0.5", "delay_ms": 50, "for_s": "2.5"},
        {"node": "kvm0", "injected": {"delay-acks": {"rate": 0.5, "delay_ms": 50}}},
    ),
    (["inject", "gru0", "crash"], "inject", {"node": "gru0", "kind": "crash"}, {"node": "gru0", "injected": {"crash": {}}}),
    (["heal", "kvm0"], "heal", {"node": "kvm0"}, {"node": "kvm0", "injected": {}}),
    (["subscribe", "kvm0", "--mm", "2"], "subscribe", {"node": "kvm0", "mm": 2}, {}),
    (["unsubscribe", "kvm0", "--mm", "2"], "unsubscribe", {"node": "kvm0", "mm": 2}, {}),
]


def _case_id(case: tuple[list[str], str, dict[str, Any], dict[str, Any]]) -> str:
    return " ".join(case[0])[:60]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
async def test_command_sends_request_and_prints_one_json_document(
    host: FakeHost, capsys: pytest.CaptureFixture[str], case: tuple[list[str], str, dict[str, Any], dict[str, Any]]
) -> None:
    argv, command, args, result = case
    host.answers[command] = result
    rc = await mmn(*argv, "--json", "--host", host.endpoint)
    out, err = capsys.readouterr()
    assert (rc, err) == (0, "")
    assert host.requests == [(command, args)]
    assert host.refused == []
    assert json.loads(out) == render.jsonable(result)  # exactly one document
    assert out.count("\n") == 1


@pytest.mark.parametrize("case", CASES, ids=_case_id)
async def test_command_prints_a_table_for_people(
    host: FakeHost, capsys: pytest.CaptureFixture[str], case: tuple[list[str], str, dict[str, Any], dict[str, Any]]
) -> None:
    argv, command, _args, result = case
    host.answers[command] = result
    rc = await mmn("--host", host.endpoint, *argv)
    out, err = capsys.readouterr()
    assert (rc, err) == (0, "")
    assert out.strip()
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


async def test_status_table_shows_nodes_mms_frames_and_ksm(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    assert await mmn("status", "--host", host.endpoint) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("NODE"))
    assert header.split() == ["NODE", "KIND", "STATE", "EPOCH", "MAPPED", "INJECTED"]
    assert any(line.split()[:5] == ["kvm0", "kvm", "live", "1", "4"] for line in lines)
    assert any("gru0" in line and "fenced" in line and "drop-acks(rate=0.5" in line for line in lines)
    assert "0x7f0000000000-0x7f0000004000 rw private,mergeable" in out
    assert "1000 free of 1024" in out
    assert "stale_accesses  0" in out
    assert "pages_shared=1" in out and "pages_sharing=3" in out


async def test_read_prints_a_hexdump_at_the_address(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.answers["read"] = {"data": b"AB\x00\x7f"}
    assert await mmn("read", "--mm", "1", "0x1000", "4", "--host", host.endpoint) == 0
    assert capsys.readouterr().out == "0x000000001000  41 42 00 7f" + " " * 36 + "  |AB..|\n"


async def test_fault_prints_pages_table(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.answers["fault"] = {"pages": [[0x1000, 7, True], [0x2000, 12, False]]}
    assert await mmn("fault", "kvm0", "--mm", "1", "0x1000", "--pages", "2", "--host", host.endpoint) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ADDR", "PFN", "WRITABLE"]
    assert lines[1].split() == ["0x1000", "7", "yes"]
    assert lines[2].split() == ["0x2000", "12", "no"]


async def test_mmap_prints_address_in_hex(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.answers["mmap"] = {"addr": A}
    assert await mmn("mmap", "--mm", "1", "--pages", "1", "--host", host.endpoint) == 0
    assert capsys.readouterr().out == "addr  0x7f0000000000\n"


async def test_json_flag_before_or_after_the_command(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.answers["spawn"] = {"mm": 1}
    assert await mmn("--json", "--host", host.endpoint, "spawn") == 0
    assert json.loads(capsys.readouterr().out) == {"mm": 1}
    assert await mmn("spawn", "--host", host.endpoint, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"mm": 1}


async def test_host_from_environment_in_host_port_form(
    host: FakeHost, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMN_HOST", host.endpoint.removeprefix("tcp://"))
    host.answers["spawn"] = {"mm": 9}
    assert await mmn("spawn", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"mm": 9}
    # --host wins over the environment, also as HOST:PORT
    monkeypatch.setenv("MMN_HOST", "127.0.0.1:1")
    assert await mmn("spawn", "--json", "--host", host.endpoint.removeprefix("tcp://")) == 0


async def test_stray_and_garbage_replies_are_ignored(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.noise = True
    host.answers["spawn"] = {"mm": 5}
    assert await mmn("spawn", "--json", "--host", host.endpoint) == 0
    assert json.loads(capsys.readouterr().out) == {"mm": 5}


# --------------------------------------------------------------------------
# failures: exit 1 with one line on stderr


async def test_kernel_error_exits_1_with_one_line(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.answers["read"] = AdminReply(ref=0, ok=False, errno="EFAULT", error="no vma at 0x1000")
    assert await mmn("read", "--mm", "1", "0x1000", "4", "--host", host.endpoint) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "mmn: EFAULT: no vma at 0x1000\n"


async def test_kernel_error_with_json_is_still_one_document(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.answers["fault"] = AdminReply(ref=0, ok=False, errno="ESRCH", error="no node kvm9")
    assert await mmn("fault", "kvm9", "--mm", "1", "0", "--json", "--host", host.endpoint) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"ok": False, "errno": "ESRCH", "error": "no node kvm9"}
    assert err == "mmn: ESRCH: no node kvm9\n"


async def test_typed_error_reply_exits_1(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.answers["spawn"] = Error(ref=0, code="forbidden", message="admin key required")
    assert await mmn("spawn", "--host", host.endpoint) == 1
    assert capsys.readouterr().err == "mmn: forbidden: admin key required\n"


async def test_unreachable_host_exits_3_within_the_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    port = up.free_ports(1)[0]  # nothing listens there
    started = time.monotonic()
    assert await mmn("status", "--host", f"127.0.0.1:{port}", "--timeout", "0.5") == 3
    assert time.monotonic() - started < 3
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("mmn: unreachable: no answer from the host at tcp://127.0.0.1:")
    assert err.count("\n") == 1


async def test_silent_host_exits_3_and_json_says_so(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.silent = True
    started = time.monotonic()
    assert await mmn("spawn", "--json", "--timeout", "0.3", "--host", host.endpoint) == 3
    assert time.monotonic() - started < 3
    assert json.loads(capsys.readouterr().out)["errno"] == "unreachable"
    assert host.requests == [("spawn", {})]  # it did arrive; no answer came


async def test_timeout_from_environment(
    host: FakeHost, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    host.silent = True
    monkeypatch.setenv("MMN_TIMEOUT", "0.2")
    started = time.monotonic()
    assert await mmn("spawn", "--host", host.endpoint) == 3
    assert time.monotonic() - started < 3


# --------------------------------------------------------------------------
# usage errors: exit 2, one line, nothing sent

USAGE_ERRORS = [
    [],
    ["frobnicate"],
    ["write", "--mm", "1", "0x1000", "abc"],  # odd-length hex
    ["write", "--mm", "1", "0x1000", "zz"],  # not hex
    ["write", "--mm", "1", "0x1000", "0x"],  # no bytes
    ["read", "--mm", "1", "-4096", "4"],  # negative address
    ["read", "--mm", "1", "0x1000", "-4"],  # negative length
    ["read", "--mm", "1", "0x1000", "0"],  # zero length
    ["read", "--mm", "one", "0x1000", "4"],  # not a number
    ["read", "--mm", "0", "0x1000", "4"],  # mm ids start at 1
    ["read", "--mm", "1", "0x1000"],  # missing LEN
    ["read", "0x1000", "4"],  # missing --mm
    ["read", "--mm", "1", "0x800000000000", "4"],  # ADDRESS_LIMIT: not a user address
    ["read", "--mm", "1", "1e3", "4"],
    ["read", "--mm", "1", "0x1g", "4"],
    ["mmap", "--mm", "1"],  # missing --pages
    ["mmap", "--mm", "1", "--pages", "1", "--prot", "rwx"],
    ["mmap", "--mm", "1", "--pages", "1", "--fill", "256"],
    ["mprotect", "--mm", "1", "0", "4096", "x"],
    ["madvise", "--mm", "1", "0", "4096", "willneed"],
    ["fault", "--mm", "1", "0"],  # missing NODE
    ["fault", "kvm0", "--mm", "1", "0", "--pages", "513"],
    ["access", "kvm0", "--mm", "1", "0", "--write", "abc"],
    ["access", "kvm0", "--mm", "1", "0", "--len", "3", "--write", "0102"],  # length mismatch
    ["merge", "--full-scans", "1001"],
    ["ksm", "--run", "3"],
    ["ksm", "--max-page-sharing", "1"],
    ["ksm", "--use-zero-pages", "2"],
    ["inject", "kvm0", "explode"],
    ["inject", "kvm0", "drop-acks", "--rate", "1.5"],
    ["inject", "kvm0", "drop-acks", "--rate", "nan"],
    ["inject", "kvm0", "delay-acks", "--delay-ms", "-1"],
    ["inject", "kvm0", "hang", "--for", "0"],
    ["heal"],
    ["xpmem", "make", "xpmem0", "0", "4096"],  # missing --mm
    ["xpmem", "make", "xpmem0", "--mm", "1", "0", "4096", "--mode", "0800"],
    ["xpmem", "attach", "xpmem0", "--apid", "1"],  # missing --len
    ["xpmem", "get", "xpmem0"],
    ["xpmem", "frob", "xpmem0"],
    ["status", "--host", "nowhere"],
    ["status", "--host", "udp://1.2.3.4:5"],
    ["status", "--timeout", "0"],
    ["status", "--timeout", "-1"],
    ["watch", "--count", "0"],
    ["down", "--wait", "0"],
    ["up", "--kvm", "-1"],
]


@pytest.fixture
def no_client(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the admin client: any attempt to reach a host is recorded."""
    attempts: list[str] = []

    class Refuse:
        def __init__(self, endpoint: str, **kw: Any) -> None:
            attempts.append(endpoint)
            raise AssertionError("a usage error must not reach the host")

    monkeypatch.setattr(client, "AdminClient", Refuse)
    monkeypatch.setattr(up, "make_plan", lambda ns: pytest.fail("up must not start"))
    return attempts


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=lambda a: " ".join(a) or "(nothing)")
def test_usage_error_exits_2_and_sends_nothing(
    argv: list[str], no_client: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("mmn: usage: ")
    assert err.count("\n") == 1
    assert no_client == []


def test_bad_host_in_environment_is_a_usage_error(
    no_client: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMN_HOST", "not an endpoint")
    assert main(["status"]) == 2
    assert capsys.readouterr().err.startswith("mmn: usage: $MMN_HOST:")
    assert no_client == []


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "mmap" in capsys.readouterr().out
    assert main(["xpmem", "make", "--help"]) == 0


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("4096", 4096), ("0x1000", 4096), ("0X1000", 4096), ("1_000", 1000), ("0x7fff_ffff_f000", 0x7FFFFFFFF000)]
)
def test_addresses_accept_decimal_and_hex(text: str, value: int) -> None:
    assert args.address(text) == value


def test_every_admin_command_has_a_cli_command() -> None:
    from protocol.admin import COMMANDS

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(COMMANDS) <= set(subs.choices)


# --------------------------------------------------------------------------
# watch


async def test_watch_prints_events_until_count(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.events = [
        Event(seq=1, kind="invalidate_range_start", fields={"node": "kvm0", "mm": 1, "start": 0x1000, "end": 0x2000}),
        Event(seq=2, kind="ack", fields={"node": "kvm0"}),
        Event(seq=3, kind="never_read", fields={}),
    ]
    assert await mmn("watch", "--count", "2", "--host", host.endpoint) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].split() == ["1", "invalidate_range_start", "node=kvm0", "mm=1", "start=0x1000", "end=0x2000"]
    assert lines[1].split() == ["2", "ack", "node=kvm0"]
    assert f"watching {host.events_endpoint}" in err


async def test_watch_json_is_one_document_per_event(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.events = [Event(seq=i, kind="change_pte", fields={"addr": 4096 * i}) for i in range(1, 4)]
    assert await mmn("watch", "--json", "--count", "3", "--host", host.endpoint) == 0
    out, err = capsys.readouterr()
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs == [{"seq": i, "kind": "change_pte", "fields": {"addr": 4096 * i}} for i in range(1, 4)]
    assert err == ""


async def test_watch_stops_after_seconds_without_events(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    assert await mmn("watch", "--seconds", "0.3", "--host", host.endpoint) == 0
    assert time.monotonic() - started < 5
    assert capsys.readouterr().out == ""


async def test_watch_unreachable_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    port = up.free_ports(1)[0]
    assert await mmn("watch", "--host", f"127.0.0.1:{port}", "--timeout", "0.3") == 3


async def test_watch_finds_the_events_endpoint_in_the_environment(
    host: FakeHost, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """$MMN_EVENTS (e.g. compose's published port) as --events: the host's
    status is not asked (--host points where nothing listens)."""
    host.events = [Event(seq=1, kind="ack", fields={"node": "kvm0"})]
    monkeypatch.setenv("MMN_EVENTS", host.events_endpoint.removeprefix("tcp://"))  # HOST:PORT works too
    dead = up.free_ports(1)[0]
    assert await mmn("watch", "--count", "1", "--host", f"127.0.0.1:{dead}") == 0
    assert capsys.readouterr().out.split() == ["1", "ack", "node=kvm0"]
    assert host.requests == []


async def test_watching_a_dead_port_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    dead = up.free_ports(1)[0]
    started = time.monotonic()
    assert await mmn("watch", "--seconds", "30", "--events", f"127.0.0.1:{dead}") == 3
    assert time.monotonic() - started < 5
    out, err = capsys.readouterr()
    assert out == "" and f"tcp://127.0.0.1:{dead}: nothing listens there" in err


async def test_watch_ends_with_an_error_when_the_stream_goes_away(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    subscribed = trio.Event()
    endpoint: list[str] = []

    async def publisher(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with bind(zmq.XPUB, "tcp://127.0.0.1:0") as xpub:
            endpoint.append(xpub.endpoint)
            task_status.started()
            await xpub.recv_multipart()  # the watcher subscribed
            subscribed.set()
        # closed: the "host" is gone

    await nursery.start(publisher)
    started = time.monotonic()
    assert await mmn("watch", "--seconds", "30", "--events", endpoint[0]) == 3
    assert subscribed.is_set() and time.monotonic() - started < 10
    assert "went away" in capsys.readouterr().err


def test_events_endpoint_replaces_wildcard_bind() -> None:
    assert client.events_endpoint("tcp://0.0.0.0:7783", "tcp://10.0.0.5:7782") == "tcp://10.0.0.5:7783"
    assert client.events_endpoint("tcp://*:7783", "tcp://h:7782") == "tcp://h:7783"
    assert client.events_endpoint("tcp://127.0.0.1:7783", "tcp://h:7782") == "tcp://127.0.0.1:7783"


# --------------------------------------------------------------------------
# mmn host / mmn node: configuration and service wiring


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_host_config_from_flags_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMN_PAGE_SIZE", "8192")
    monkeypatch.setenv("MMN_FRAMES", "64")
    monkeypatch.setenv("MMN_WRAP_CHANGE_PTE", "1")
    config = services.host_config(_parse("host", "--frames", "128", "--ack-deadline-ms", "50", "--admin-port", "0"))
    assert (config.frames, config.page_size, config.ack_deadline_ms, config.admin_port) == (128, 8192, 50, 0)
    assert config.wrap_change_pte is True
    assert config.node_port == 7781  # the host's own default


def test_node_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMN_KIND", "gru")
    monkeypatch.setenv("MMN_NAME", "g1")
    monkeypatch.setenv("MMN_HOST_ENDPOINT", "hostbox:7781")
    monkeypatch.setenv("MMN_HEARTBEAT_MS", "250")
    config = services.node_config(_parse("node"))
    assert (config.kind, config.name, config.host, config.heartbeat_ms) == ("gru", "g1", "tcp://hostbox:7781", 250)
    config = services.node_config(_parse("node", "--kind", "xpmem", "--name", "x9", "--host", "tcp://h:1"))
    assert (config.kind, config.name, config.host) == ("xpmem", "x9", "tcp://h:1")


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["host"], {"MMN_FRAMES": "abc"}),
        (["host"], {"MMN_NODE_PORT": "70000"}),
        (["host", "--frames", "0"], {}),
        (["node"], {}),  # no kind
        (["node", "--kind", "kvm"], {"MMN_HEARTBEAT_MS": "-5"}),
        (["node", "--kind", "kvm"], {"MMN_HOST_ENDPOINT": "bad endpoint"}),
        (["node", "--kind", "arm"], {}),
    ],
)
def test_service_config_errors_exit_2(
    argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("mmn: usage: ")


async def test_mmn_host_runs_run_host_with_the_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import broker.host

    seen: list[Any] = []

    async def fake_run_host(config: Any, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        seen.append(config)
        task_status.started({"admin": "tcp://127.0.0.1:9"})

    monkeypatch.setattr(broker.host, "run_host", fake_run_host)
    assert await mmn("host", "--frames", "32", "--log-level", "WARNING") == 0
    assert isinstance(seen[0], broker.host.HostConfig) and seen[0].frames == 32
    assert "mmn host: ready {'admin': 'tcp://127.0.0.1:9'}" in capsys.readouterr().err


async def test_mmn_node_crash_exits_1_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import node.runtime

    async def crashing(config: Any, *, stop: trio.Event | None = None,
                       task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(config.name)
        raise OSError("boom")

    monkeypatch.setattr(node.runtime, "run_node", crashing)
    assert await mmn("node", "--kind", "kvm", "--name", "k1", "--log-level", "CRITICAL") == 1
    err = capsys.readouterr().err
    assert "mmn: node k1: OSError: boom\n" in err


# --------------------------------------------------------------------------
# rendering


def test_table_aligns_numbers_right_and_text_left() -> None:
    text = render.table(("name", "pages"), [("a", 1), ("bbbb", 100)])
    assert text.splitlines() == ["NAME  PAGES", "a         1", "bbbb    100"]
    assert render.table(("x",), []) == "X\n(none)"


def test_jsonable_turns_bytes_into_hex() -> None:
    assert render.jsonable({"data": b"\x00\xff", "pages": ((1, 2),), 3: None}) == {"data": "00ff", "pages": [[1, 2]], "3": None}


def test_hexdump_lines_of_16() -> None:
    lines = render.hexdump(bytes(range(0x41, 0x41 + 20)), 0x1000).splitlines()
    assert lines[0].startswith("0x000000001000  41 42 43")
    assert lines[0].endswith("|ABCDEFGHIJKLMNOP|")
    assert lines[1].startswith("0x000000001010  51 52 53 54")


def test_status_line_summarises_for_logs() -> None:
    line = render.status_line(status_result())
    assert "kvm0:live/e1/4p" in line and "gru0:fenced/e2/0p/drop-acks" in line
    assert "stale_accesses 0" in line and "frames 1000/1024 free" in line


# --------------------------------------------------------------------------
# mmn up: plan and process lifecycle (no host needed)


def test_up_plan_ports_and_nodes(tmp_path: Path) -> None:
    ns = _parse("up", "--kvm", "2", "--gru", "0", "--port-base", "9000", "--frames", "64", "--logs", str(tmp_path))
    plan = up.make_plan(ns)
    assert plan.ports == (9000, 9001, 9002)
    assert plan.admin == "tcp://127.0.0.1:9001" and plan.node_endpoint == "tcp://127.0.0.1:9000"
    assert plan.nodes == [("kvm0", "kvm"), ("kvm1", "kvm"), ("xpmem0", "xpmem")]
    assert plan.host_args[plan.host_args.index("--frames") + 1] == "64"
    free = up.make_plan(_parse("up", "--port-base", "0", "--logs", str(tmp_path)))
    assert len(set(free.ports)) == 3 and all(p > 0 for p in free.ports)
    anywhere = up.make_plan(_parse("up", "--bind", "0.0.0.0", "--logs", str(tmp_path)))
    assert anywhere.admin == "tcp://127.0.0.1:7782"


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_up_view_redraws_on_a_tty_and_prints_changes_otherwise(tmp_path: Path) -> None:
    plan = up.make_plan(_parse("up", "--port-base", "9000", "--logs", str(tmp_path)))
    children = [supervisor.Child("host", ["true"], tmp_path / "host.log")]
    tty = _Stream(tty=True)
    view = up.View(plan, children, tty)
    view.show(status_result())
    view.show(status_result())
    frames = tty.getvalue().split("\x1b[H\x1b[2J")
    assert len(frames) == 3 and frames[0] == ""  # two full redraws
    assert "kvm0" in frames[1] and "admin tcp://127.0.0.1:9001" in frames[1] and "host: not started" in frames[1]
    pipe = _Stream(tty=False)
    view = up.View(plan, children, pipe)
    changed = status_result()
    changed["stale_accesses"] = 1
    for status in (status_result(), status_result(), changed, None):
        view.show(status)
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 3  # the repeat is not printed
    assert "stale_accesses 0" in lines[0] and "stale_accesses 1" in lines[1]
    assert "\x1b" not in pipe.getvalue()
    assert lines[2].endswith("the host is not answering")


def _busy_status() -> dict[str, Any]:
    """A status far taller and wider than 80x24: mappings, many mms, 60 counters."""
    status = status_result()
    status["nodes"].append({"name": "xpmem0", "kind": "xpmem", "state": "live", "epoch": 3, "mapped_pages": 12,
                            "injected": {}, "mms": {"1": {hex(0x10000000 + i * 4096): i for i in range(12)}}})
    status["mms"] = [{"mm": i, "vmas": [[0x10000000, 0x10010000, "rw", []]] * 3, "present": 16, "swapped": 0}
                     for i in range(1, 11)]
    status["counters"] = {f"counter_number_{i}": i * 1000 for i in range(60)}
    status["stale_accesses"] = 2
    return status


def _visible(text: str) -> list[str]:
    import re

    frame = text.split("\x1b[H\x1b[2J")[-1]
    return re.sub(r"\x1b\[[0-9;]*m", "", frame).splitlines()


@pytest.mark.parametrize("rich", [True, False], ids=["rich-if-installed", "no-rich"])
def test_up_view_fits_80x24_with_the_essentials_first(
    tmp_path: Path, rich: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not rich:
        monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ImportError: the plain fallback
        monkeypatch.setitem(sys.modules, "rich.console", None)
    plan = up.make_plan(_parse("up", "--port-base", "9000", "--logs", str(tmp_path)))
    children = [supervisor.Child(n, ["true"], tmp_path / f"{n}.log") for n in ("host", "kvm0", "gru0", "xpmem0")]
    tty = _Stream(tty=True)
    view = up.View(plan, children, tty, size=lambda: os.terminal_size((80, 24)))
    if not rich:
        assert view.console is None
    view.show(_busy_status(), "kvm0 exited with status 1")
    lines = _visible(tty.getvalue())
    assert len(lines) <= 23 and all(len(line) <= 80 for line in lines), lines
    assert "admin tcp://127.0.0.1:9001" in lines[0]
    assert lines[1] == "frames 1000 free of 1024   stale_accesses 2"
    table = lines.index(next(line for line in lines if line.startswith("NODE ")))
    assert [line.split()[0] for line in lines[table + 1: table + 4]] == ["kvm0", "gru0", "xpmem0"]
    assert any("kvm0 exited with status 1" in line for line in lines)
    assert lines[-1].startswith("(+") and "mmn status" in lines[-1]  # what did not fit, said once


def test_live_view_folds_counters_to_the_width() -> None:
    status = _busy_status()
    status["mms"] = []
    status["nodes"] = status["nodes"][:1]
    lines = render.live_view(status, 100, 200, title="t")
    counters = [line for line in lines if line.startswith("counters") or line.startswith("          counter")]
    assert len(counters) > 5 and all(len(line) <= 100 for line in counters)
    assert sum(line.count("counter_number_") for line in counters) == 60  # folded, none dropped


def _stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _group_alive(pgid: int) -> bool:
    """Any live (not zombie) process in group ``pgid``?  Zombies count as gone:
    in a container PID 1 may never reap the orphans."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if fields and int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


async def test_stop_all_kills_every_process_group(tmp_path: Path) -> None:
    polite = supervisor.Child("polite", ["sh", "-c", "sleep 60 & wait"], tmp_path / "polite.log")
    stubborn = supervisor.Child("stubborn", ["sh", "-c", "trap '' TERM; sleep 60 & wait; sleep 60"], tmp_path / "stubborn.log")
    children = [polite, stubborn]
    for child in children:
        await supervisor.spawn(child)
        assert child.process is not None
        assert os.getpgid(child.process.pid) == child.process.pid  # its own group
    await trio.sleep(0.2)  # let the shells start their sleeps
    started = time.monotonic()
    with trio.fail_after(10):
        await supervisor.stop_all(children, grace=0.5)
    assert time.monotonic() - started < 5
    for child in children:
        assert child.process is not None and child.process.returncode is not None
        assert not _group_alive(child.process.pid)  # the sleeps went too


# --------------------------------------------------------------------------
# mmn up's process lifecycle, with stand-in services
#
# The stand-in "host" answers status on the admin port with every default
# node live; a stand-in "node" leaves a grandchild (sleep) in its process
# group and sleeps.  Each prints its pids to its log, so the test can check
# that nothing is left behind.

STANDIN = r"""
import os, subprocess, sys, time
sys.path.insert(0, {root!r})
role, argv = sys.argv[1], sys.argv[2:]
registry = os.environ["STANDIN_DIR"]
if role == "node":
    grandchild = subprocess.Popen(["sleep", "60"])
    print("pids", os.getpid(), grandchild.pid, flush=True)
    name = argv[argv.index("--name") + 1]
    open(os.path.join(registry, name), "w").close()  # "registered"
    while True:
        time.sleep(1)
if os.environ.get("STANDIN_HOST_FAILS"):
    print("standin host: address already in use", flush=True)
    sys.exit(7)
import trio, zmq
from protocol.codec import decode, encode
from protocol.messages import AdminReply
from transport import bind
port = int(argv[argv.index("--admin-port") + 1])
print("pids", os.getpid(), flush=True)
def status():
    nodes = [dict(name=n, kind=n[:-1], state="live", epoch=1, mapped_pages=0, injected={{}})
             for n in ("kvm0", "gru0", "xpmem0") if os.path.exists(os.path.join(registry, n))]
    return dict(host=dict(incarnation="standin", page_size=4096, endpoints={{}}), nodes=nodes, mms=[],
                frames=dict(total=8, free=8), stale_accesses=0, ksm={{}})
async def serve():
    async with bind(zmq.ROUTER, f"tcp://127.0.0.1:{{port}}") as router:
        while True:
            identity, frame = await router.recv_multipart()
            request = decode(frame)
            result = status()
            await router.send_multipart([identity, encode(AdminReply(ref=request.id, ok=True, result=result))])
trio.run(serve)
"""


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    script = tmp_path / "standin.py"
    script.write_text(STANDIN.format(root=str(ROOT)))
    command = [sys.executable, str(script)]
    monkeypatch.setattr(up, "SERVICE_COMMAND", command)
    registry = tmp_path / "registry"
    registry.mkdir()
    monkeypatch.setenv("STANDIN_DIR", str(registry))  # inherited by the subprocesses
    monkeypatch.setenv("MMN_INSECURE", "1")  # the stand-in host speaks plain TCP
    return command


def _logged_pids(logs: Path) -> list[int]:
    pids = []
    for log in logs.glob("*.log"):
        for line in log.read_text().splitlines():
            if line.startswith("pids "):
                pids += [int(p) for p in line.split()[1:]]
    return pids


def _up_subprocess(standin: list[str], *args: str) -> subprocess.Popen[str]:
    code = (
        "import sys; import mmn.up as up; up.SERVICE_COMMAND = sys.argv[1:3]; "
        "from mmn.cli import main; sys.exit(main(sys.argv[3:]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *standin, "up", "--port-base", "0", "--interval", "0.1", "--grace", "1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _wait_for_line(proc: subprocess.Popen[str], needle: str, seconds: float = 30) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if needle in line:
            return
        if not line and proc.poll() is not None:
            break
    pytest.fail(f"no {needle!r} from mmn up")


async def test_up_once_prints_status_and_stops_everything(
    standin: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "logs"
    assert await mmn("up", "--once", "--json", "--port-base", "0", "--logs", str(logs), seconds=60) == 0
    out, err = capsys.readouterr()
    assert [n["name"] for n in json.loads(out)["nodes"]] == ["kvm0", "gru0", "xpmem0"]
    assert err == ""
    pids = _logged_pids(logs)
    assert len(pids) == 1 + 2 * 3  # host; each node and its grandchild
    assert [pid for pid in pids if _alive(pid)] == []
    assert sorted(p.name for p in logs.glob("*.log")) == ["gru0.log", "host.log", "kvm0.log", "xpmem0.log"]


async def test_up_reports_a_host_that_fails_to_start(
    standin: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STANDIN_HOST_FAILS", "1")
    started = time.monotonic()
    assert await mmn("up", "--once", "--port-base", "0", "--logs", str(tmp_path / "l"), seconds=60) == 1
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "mmn up: the host exited with status 7" in err
    assert "address already in use" in err  # the tail of its log
    assert err.rstrip().endswith("one is taken; try --port-base 0")  # and what to do


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_signal_stops_every_child(standin: list[str], tmp_path: Path, signum: int) -> None:
    proc = _up_subprocess(standin, "--logs", str(tmp_path))
    try:
        _wait_for_line(proc, "xpmem0:live")
        pids = _logged_pids(tmp_path)
        assert len(pids) == 7 and all(_alive(pid) for pid in pids)
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0
        assert [pid for pid in pids if _alive(pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_exits_1_and_stops_nodes_when_the_host_dies(standin: list[str], tmp_path: Path) -> None:
    proc = _up_subprocess(standin, "--logs", str(tmp_path))
    try:
        _wait_for_line(proc, "xpmem0:live")
        pids = _logged_pids(tmp_path)
        host_pid = int((tmp_path / "host.log").read_text().split()[1])
        os.kill(host_pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == 1
        assert proc.stderr is not None and "the host exited with status -9" in proc.stderr.read()
        assert [pid for pid in pids if _alive(pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_restart_brings_a_dead_node_back(standin: list[str], tmp_path: Path) -> None:
    proc = _up_subprocess(standin, "--logs", str(tmp_path), "--restart")
    try:
        _wait_for_line(proc, "xpmem0:live")
        first = int((tmp_path / "kvm0.log").read_text().split()[1])
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (tmp_path / "kvm0.log").read_text().count("pids") < 2:
            time.sleep(0.05)
        pids = _logged_pids(tmp_path)
        assert (tmp_path / "kvm0.log").read_text().count("pids") == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "kvm0 exited with status -9" in err and "kvm0 restarted" in err
        assert [pid for pid in pids if _alive(pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------
# mmn up against the real host and nodes


def _start_up(tmp_path: Path) -> subprocess.Popen[str]:
    """The real ``mmn up`` (host and three nodes) on ports the OS picks."""
    return subprocess.Popen(
        [sys.executable, "-m", "mmn", "up", "--port-base", "0", "--logs", str(tmp_path), "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if fields and int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


@pytest.mark.integration
def test_up_once_json_with_every_node_live(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mmn", "up", "--once", "--json", "--port-base", "0", "--logs", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert {(n["name"], n["kind"], n["state"]) for n in status["nodes"]} == {
        ("kvm0", "kvm", "live"),
        ("gru0", "gru", "live"),
        ("xpmem0", "xpmem", "live"),
    }
    assert status["stale_accesses"] == 0


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_up_stops_every_child_on_signal(tmp_path: Path, signum: int) -> None:
    proc = _start_up(tmp_path)
    try:
        _wait_for_line(proc, "xpmem0:live")  # the first status line means everything is up
        children = _children_of(proc.pid)
        assert len(children) == 4
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0
        time.sleep(0.2)
        assert [pid for pid in children if _alive(pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_up_exits_non_zero_when_the_host_dies(tmp_path: Path) -> None:
    proc = _start_up(tmp_path)
    try:
        _wait_for_line(proc, "xpmem0:live")  # the first status line means everything is up
        children = _children_of(proc.pid)
        host_pid = next(pid for pid in children if " host " in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "))
        os.kill(host_pid, signal.SIGKILL)
        assert proc.wait(timeout=15) == 1
        assert "the host exited" in proc.stderr.read()
        time.sleep(0.2)
        assert [pid for pid in children if _alive(pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_a_second_terminal_reaches_mmn_up_with_curve_and_no_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """mmn up runs CURVE by default and leaves where its keys are for the CLI
    (per admin port, removed at exit): `mmn --host ADDR status` in another
    terminal needs no key flag; a client without the keys gets no answer."""
    for var in ("MMN_KEYS_DIR", "MMN_INSECURE", "MMN_ADMIN_KEY", "MMN_HOST_KEY", "MMN_HOST"):
        monkeypatch.delenv(var, raising=False)
    proc = _start_up(tmp_path)
    try:
        _wait_for_line(proc, "xpmem0:live")  # the first status line means everything is up
        records = [p for p in client.up_record_path(0).parent.glob(f"mmnotify-{os.getuid()}-up-*.json")
                   if json.loads(p.read_text()).get("pid") == proc.pid]
        assert len(records) == 1, records
        record = records[0]
        admin = json.loads(record.read_text())["admin"]
        capsys.readouterr()
        assert main(["--host", admin, "--json", "status"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert {n["name"] for n in status["nodes"]} == {"kvm0", "gru0", "xpmem0"}
        monkeypatch.setenv("MMN_INSECURE", "1")  # a plain client: the host never answers it
        monkeypatch.setenv("MMN_TIMEOUT", "1")
        assert main(["--host", admin, "status"]) == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert not record.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------
# mmn up for scripts and second terminals


def _free_port_triple() -> int:
    """A base P with P, P+1, P+2 free right now (high ports the OS hands out)."""

    for _ in range(50):
        base = up.free_ports(1)[0]
        if base + 2 > 65535:
            continue
        try:
            up.check_ports("127.0.0.1", [base, base + 1, base + 2])
        except up.PortsBusy:
            continue
        return base
    pytest.fail("no three free consecutive ports")


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Notes of `mmn up` in a directory of this test's own (inherited by subprocesses)."""
    d = tmp_path / "run"
    d.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    return d


def _ready_line(proc: subprocess.Popen[str], seconds: float = 60) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("{"):
            return json.loads(line)
        if not line and proc.poll() is not None:
            break
    pytest.fail(f"no ready line from mmn up: {proc.stderr.read() if proc.stderr else ''}")


def test_busy_ports_fail_fast_in_one_line_naming_the_mmn_up(
    runtime_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Ports held by another mmn up (its note says which): one line, exit 1,
    nothing started, no logs or keys made, and its note left alone."""
    import socket

    base = _free_port_triple()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", base + 1))
        held.listen()
        note = client.up_record_path(base + 1)
        note.write_text(json.dumps({"pid": holder.pid, "keys": None, "admin": f"tcp://127.0.0.1:{base + 1}"}))
        started = time.monotonic()
        logs = tmp_path / "logs"
        assert main(["up", "--port-base", str(base), "--logs", str(logs)]) == 1
        assert time.monotonic() - started < 3
        out, err = capsys.readouterr()
        assert (out, err) == ("", f"mmn up: ports {base}-{base + 2} are in use by mmn up pid {holder.pid}; "
                                  "try --port-base 0\n")
        assert json.loads(note.read_text())["pid"] == holder.pid
        assert not logs.exists()
        note.unlink()  # a port taken by anything else
        assert main(["up", "--port-base", str(base)]) == 1
        assert capsys.readouterr().err == f"mmn up: port {base + 1} of {base}-{base + 2} is in use; try --port-base 0\n"
    finally:
        held.close()
        holder.kill()
        holder.wait()


def test_a_note_is_removed_only_by_its_own_mmn_up(runtime_dir: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        note = client.up_record_path(12345)
        note.write_text(json.dumps({"pid": other.pid, "keys": "/elsewhere"}))
        client.remove_up_record(note)
        assert note.exists()
        note.write_text(json.dumps({"pid": os.getpid(), "keys": "/ours"}))
        client.remove_up_record(note)
        assert not note.exists()
    finally:
        other.kill()
        other.wait()


def test_up_json_prints_one_ready_line_once_every_node_is_live(
    standin: list[str], tmp_path: Path, runtime_dir: Path
) -> None:
    proc = _up_subprocess(standin, "--json", "--logs", str(tmp_path))
    try:
        doc = _ready_line(proc)
        assert doc["ready"] is True and doc["pid"] == proc.pid
        assert [n["name"] for n in doc["nodes"]] == ["kvm0", "gru0", "xpmem0"]
        assert all(_alive(n["pid"]) for n in doc["nodes"]) and _alive(doc["host"]["pid"])
        assert doc["admin"].startswith("tcp://127.0.0.1:") and doc["events"].startswith("tcp://127.0.0.1:")
        assert doc["keys"] is None and doc["logs"] == str(tmp_path)  # the stand-in runs plain TCP
        note = json.loads(client.up_record_path(int(doc["admin"].rsplit(":", 1)[1])).read_text())
        assert note["pid"] == proc.pid and note["ports"]["events"] == int(doc["events"].rsplit(":", 1)[1])
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0 and out == ""  # the ready line was all; no view on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_stops_when_the_process_that_started_it_dies(standin: list[str], tmp_path: Path) -> None:
    """A test runner killed with -9 leaves no cluster: mmn up watches its parent."""
    code = (
        "import subprocess, sys, time\n"
        f"up = subprocess.Popen({[sys.executable, '-c', 'import sys; import mmn.up as up; up.SERVICE_COMMAND = sys.argv[1:3]; from mmn.cli import main; sys.exit(main(sys.argv[3:]))', *standin, 'up', '--port-base', '0', '--interval', '0.1', '--grace', '1', '--json', '--logs', str(tmp_path)]!r},\n"
        "                      stdout=subprocess.PIPE, cwd=sys.argv[1])\n"
        "print(up.pid, up.stdout.readline().decode().strip(), flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code, str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid_text, ready = parent.stdout.readline().split(" ", 1)
        assert json.loads(ready)["ready"]
        up_pid, pids = int(pid_text), _logged_pids(tmp_path)
        assert _alive(up_pid) and len(pids) == 7
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (_alive(up_pid) or any(_alive(p) for p in pids)):
            time.sleep(0.1)
        assert not _alive(up_pid)
        assert [p for p in pids if _alive(p)] == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


async def test_ctrl_c_inside_startup_is_no_traceback(
    standin: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C that lands in a trio task while up starts (before its signal
    watcher runs) comes out of the nursery wrapped in a group: still no
    traceback, and the host already started is stopped."""
    spawned: list[supervisor.Child] = []
    real_spawn = up.spawn

    async def spawn_then_interrupt(child: supervisor.Child) -> None:
        await real_spawn(child)
        spawned.append(child)
        raise KeyboardInterrupt

    monkeypatch.setattr(up, "spawn", spawn_then_interrupt)
    assert await mmn("up", "--port-base", "0", "--logs", str(tmp_path), seconds=60) == 0
    assert capsys.readouterr().out == ""
    assert spawned and all(c.process is not None and c.process.returncode is not None for c in spawned)


@pytest.mark.integration
def test_ctrl_c_at_any_moment_of_startup_prints_no_traceback(tmp_path: Path) -> None:
    """SIGINT at several moments after our code starts (imports, keys, the
    host starting, nodes registering): exit 0 or 130, no traceback, nothing
    left running."""
    code = ("import sys; sys.stderr.write('go\\n'); sys.stderr.flush(); "
            "from mmn.cli import main; sys.exit(main(sys.argv[1:]))")
    for i, delay in enumerate((0.3, 0.6, 1.0, 1.5, 2.5, 4.0)):
        logs = tmp_path / f"run{i}"
        proc = subprocess.Popen([sys.executable, "-c", code, "up", "--port-base", "0", "--logs", str(logs)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert proc.stderr is not None and proc.stderr.readline() == "go\n"
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            err = proc.communicate(timeout=30)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode in (0, 130), (delay, proc.returncode, err)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (delay, err)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _processes_mentioning(str(logs)):
            time.sleep(0.1)
        assert _processes_mentioning(str(logs)) == [], delay


def _processes_mentioning(text: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and _alive(int(entry.name)):
                out.append(int(entry.name))
    return out


@pytest.mark.integration
def test_up_detach_then_down(tmp_path: Path, runtime_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`mmn up --detach --json` returns once the cluster is ready, the cluster
    keeps running (a second terminal reaches it with no flags), `mmn down`
    stops it and everything it started."""
    proc = subprocess.run(
        [sys.executable, "-m", "mmn", "up", "--detach", "--json", "--port-base", "0", "--logs", str(tmp_path)],
        capture_output=True, text=True, timeout=90, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    pids = [doc["pid"], doc["host"]["pid"], *(n["pid"] for n in doc["nodes"])]
    try:
        assert all(_alive(p) for p in pids)
        assert Path(doc["keys"], "admin", "admin.key_secret").exists()
        capsys.readouterr()
        assert main(["--host", doc["admin"], "--json", "status"]) == 0
        assert {n["name"] for n in json.loads(capsys.readouterr().out)["nodes"]} == {"kvm0", "gru0", "xpmem0"}
        assert main(["down", "--host", doc["admin"]]) == 0
        assert capsys.readouterr().out == f"stopped mmn up pid {doc['pid']} ({doc['admin']})\n"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        assert [p for p in pids if _alive(p)] == []
        assert main(["down"]) == 1  # none left
        assert "no mmn up of yours is running" in capsys.readouterr().err
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


@pytest.mark.integration
def test_a_second_mmn_up_on_the_same_ports_leaves_the_first_reachable(
    tmp_path: Path, runtime_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _free_port_triple()
    first = subprocess.Popen(
        [sys.executable, "-m", "mmn", "up", "--json", "--port-base", str(base), "--logs", str(tmp_path / "first")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        doc = _ready_line(first)
        note = client.up_record_path(base + 1)
        assert json.loads(note.read_text())["pid"] == first.pid
        capsys.readouterr()
        started = time.monotonic()
        assert main(["up", "--port-base", str(base), "--logs", str(tmp_path / "second")]) == 1
        assert time.monotonic() - started < 3
        err = capsys.readouterr().err
        assert err == f"mmn up: ports {base}-{base + 2} are in use by mmn up pid {first.pid}; try --port-base 0\n"
        assert json.loads(note.read_text())["pid"] == first.pid
        assert main(["--host", doc["admin"], "status"]) == 0  # with no flag: the note still leads to the keys
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0
        assert not note.exists()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


# --------------------------------------------------------------------------
# help: units, defaults, an example per command, --version

#: `mmn soak`'s options belong to mmn/soak.py (another change).
HELP_EXEMPT = ("soak",)


def _value_options() -> list[tuple[str, str, str]]:
    p = cli.build_parser()
    out = []
    for name, sub in [("", p), *cli._subparsers(p)]:
        if name.split(" ")[0] in HELP_EXEMPT:
            continue
        for a in sub._actions:
            if a.option_strings and a.nargs != 0 and a.help != argparse.SUPPRESS and not a.required:
                out.append((name or "mmn", a.option_strings[0], a.help or ""))
    return out


def test_every_option_with_a_value_says_its_default() -> None:
    missing = [(cmd, opt, text) for cmd, opt, text in _value_options() if "default" not in text]
    assert missing == []


def test_options_in_time_or_size_name_their_unit() -> None:
    for cmd, opt, text in _value_options():
        if opt.endswith("-ms") or opt in ("--delay-ms",):
            assert "ms" in text, (cmd, opt, text)
        if opt in ("--timeout", "--grace", "--interval", "--seconds", "--for", "--wait"):
            assert "second" in text, (cmd, opt, text)
        if opt in ("--page-size", "--max-frame", "--max-range", "--len", "--offset"):
            assert "bytes" in text, (cmd, opt, text)


def test_every_command_help_shows_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    names = [name for name, _ in cli._subparsers(cli.build_parser())]
    assert "down" in names and "xpmem get" in names
    for name in names:
        assert main([*name.split(), "--help"]) == 0
        out = capsys.readouterr().out
        example = out.split("example:\n", 1)[1].strip()
        assert example.startswith(f"mmn {name}") or (name == "xpmem" and example.startswith("mmn xpmem ")), name


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"mmn {version('mmnotify')}\n"
