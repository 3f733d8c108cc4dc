"""``mmn up``: a host and a default set of nodes on this machine, in the foreground.

Each service is a child process (``sys.executable -m mmn host|node ...``) in
its own process group, its output in a log file.  ``up`` waits until the host
answers ``status`` and every node is registered, then shows a live status view
(redrawn in place on a terminal, a line per change otherwise) until Ctrl-C or
SIGTERM.  Then every child gets SIGTERM, and SIGKILL after ``--grace`` seconds:
none is left behind.  If the host dies, ``up`` stops the nodes and exits 1.

Process lifetimes::

    up ──┬── host  (pgid = its pid)   dies  -> up stops the rest, exit 1; restarted with --restart
         ├── kvm0  (pgid = its pid)   dies  -> shown; restarted with --restart
         ├── gru0
         └── xpmem0
    Ctrl-C / SIGTERM -> SIGTERM to every node's group, then the host's -> grace -> SIGKILL -> reaped

Children get ``MMN_PARENT_PID`` and stop when ``up`` is gone, even if it is
SIGKILLed (they watch ``getppid()``, see :mod:`mmn.supervisor`).

Security: every socket is CURVE by default.  ``up`` writes the key pairs
(``mmn keygen``: the host's, an operator's, one per node) to ``LOGS/keys``, or
adds the missing ones to ``--keys DIR`` / ``$MMN_KEYS_DIR``, and hands the
directory to every service; ``mmn --keys LOGS/keys status`` reaches the host
from another terminal.  ``--insecure`` (or ``$MMN_INSECURE=1``) runs plain TCP.

Before anything is made or started, ``--port-base P`` checks that P, P+1, P+2
are free: if not, one line names the ``mmn up`` holding them (from its note)
and says ``try --port-base 0``.  The note (``$XDG_RUNTIME_DIR`` or the temp
dir, ``mmnotify-UID-up-ADMINPORT.json``: pid, keys directory, ports) is
written only when no other live ``mmn up`` owns it, and removed at exit only
if it is this process's own.

For scripts: ``--json`` prints one ready line once every node is live
(``{"ready": true, "pid", "admin", "node", "events", "keys", "logs",
"nodes": [{"name", "pid"}], "host": {"pid", "incarnation"}}``) and no live
view; ``--detach`` runs that in the background (its own session, stderr in
``LOGS/up.log``), prints the line and exits; ``mmn down`` stops it.  A
foreground ``up`` stops (as on SIGTERM) when the process that started it dies,
and on SIGHUP.  Ctrl-C at any moment of start-up stops what was started, with
no traceback.

Exit status: 0 stopped on request (or ``--once`` with every node live), 1 the
host died, a node did not come up, or the ports are taken, 2 usage, 3 the host
never answered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from transport.curve import KeyError_, keygen

from . import render
from .args import number, seconds
from .client import (
    DEFAULT_NODE_PORT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    Failed,
    Unreachable,
    UsageError,
    admin_call,
    client_security,
    live_up_records,
    read_up_record,
    remove_up_record,
    write_up_record,
)
from .render import PROG
from .services import HOST_OPTIONS
from .supervisor import Child, child_env, free_ports, kill_leftovers, signal_group, spawn, stop_all

KINDS = ("kvm", "gru", "xpmem", "hmm")

#: How services are started: ``SERVICE_COMMAND + ["host", ...]``.  Tests point
#: it at a stand-in to check the process lifecycle without the real host.
SERVICE_COMMAND: list[str] = [sys.executable, "-m", "mmn"]
#: How ``--detach`` starts the background ``mmn up`` (tests: with a stand-in host).
UP_COMMAND: list[str] = [sys.executable, "-m", "mmn"]
_WILDCARDS = ("0.0.0.0", "*", "::", "[::]", "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmn up`` options (the host options are added by the caller)."""
    for kind in KINDS:
        default = 0 if kind == "hmm" else 1  # the hmm kind joins when asked for
        p.add_argument(f"--{kind}", type=number(0, 64), default=default, metavar="N",
                       help=f"{kind} nodes (default {default})")
    p.add_argument(
        "--port-base",
        type=number(0, 65533),
        default=DEFAULT_NODE_PORT,
        metavar="P",
        help=f"node, admin, events ports are P, P+1, P+2 (default {DEFAULT_NODE_PORT}); 0 = free ports the OS picks",
    )
    p.add_argument("--once", action="store_true", help="print one status when everything is up, then stop")
    p.add_argument("--timeout", type=seconds, default=20.0, metavar="S", help="startup deadline in seconds (default 20)")
    p.add_argument("--grace", type=seconds, default=3.0, metavar="S", help="seconds from SIGTERM to SIGKILL at the end (default 3)")
    p.add_argument("--interval", type=seconds, default=1.0, metavar="S", help="seconds between two status refreshes (default 1)")
    p.add_argument("--restart", action="store_true",
                   help="restart the host or a node whose process exits (default: a node is shown as exited, "
                        "and the host's exit stops everything)")
    p.add_argument("--logs", type=Path, default=None, metavar="DIR", help="log directory (default: a fresh temp dir)")
    p.add_argument("--log-level", default=os.environ.get("MMN_LOG_LEVEL", "INFO"),
                   help="of every service: DEBUG, INFO, WARNING or ERROR (default $MMN_LOG_LEVEL, else INFO)")
    p.add_argument("--detach", action="store_true",
                   help="start in the background, print the ready line, exit 0; `mmn down` stops it")
    p.add_argument("--detached-child", action="store_true", help=argparse.SUPPRESS)


# --------------------------------------------------------------------------
# the plan: what to start, where


@dataclass
class Plan:
    bind: str
    ports: tuple[int, int, int]  # node, admin, events
    host_args: list[str]
    nodes: list[tuple[str, str]]  # (name, kind)
    logs: Path
    #: CURVE key directory every service uses; None = plain TCP (--insecure)
    keys: str | None = None
    #: the CURVE hook of up's own admin calls
    security: Any = None

    @property
    def connect_host(self) -> str:
        return "127.0.0.1" if self.bind in _WILDCARDS else self.bind

    @property
    def admin(self) -> str:
        return f"tcp://{self.connect_host}:{self.ports[1]}"

    @property
    def node_endpoint(self) -> str:
        return f"tcp://{self.connect_host}:{self.ports[0]}"


def make_plan(ns: argparse.Namespace) -> Plan:
    bind = ns.bind or os.environ.get("MMN_BIND") or "127.0.0.1"
    if ns.port_base == 0:
        node_port, admin_port, events_port = free_ports(3, bind)
    else:
        node_port, admin_port, events_port = ns.port_base, ns.port_base + 1, ns.port_base + 2
    host_args = ["--bind", bind, "--node-port", str(node_port), "--admin-port", str(admin_port)]
    host_args += ["--events-port", str(events_port), "--log-level", ns.log_level]
    for flag, dest, _env, _kind, _help in HOST_OPTIONS:
        value = getattr(ns, dest, None)
        if value is not None and dest not in ("bind", "node_port", "admin_port", "events_port", "keys_dir"):
            host_args += [flag, str(value)]
    if getattr(ns, "wrap_change_pte", None):
        host_args.append("--wrap-change-pte")
    nodes = [(f"{kind}{i}", kind) for kind in KINDS for i in range(getattr(ns, kind))]
    logs = ns.logs if ns.logs is not None else Path(tempfile.mkdtemp(prefix="mmn-up-"))
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--logs {logs}: {exc.strerror}") from None
    keys = _keys(ns, nodes, logs)
    host_args += ["--insecure"] if keys is None else ["--keys", keys]
    security = None if keys is None else client_security(keys, env={})
    return Plan(bind, (node_port, admin_port, events_port), host_args, nodes, logs, keys, security)


def _keys(ns: argparse.Namespace, nodes: list[tuple[str, str]], logs: Path) -> str | None:
    """CURVE by default: ``--keys DIR`` (or ``$MMN_KEYS_DIR``) if given, else
    a fresh ``LOGS/keys``; the pairs of nodes that have none are added.
    None with ``--insecure`` (or ``$MMN_INSECURE=1``): plain TCP."""
    if getattr(ns, "insecure", None) or os.environ.get("MMN_INSECURE", "") not in ("", "0"):
        return None
    keys = getattr(ns, "keys_dir", None) or os.environ.get("MMN_KEYS_DIR") or str(logs / "keys")
    try:
        keygen(keys, nodes=[name for name, _ in nodes])
    except (KeyError_, OSError) as exc:
        raise UsageError(f"keys {keys}: {exc}") from None
    return keys


# --------------------------------------------------------------------------
# the foreground


class _Stop(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        self.code = code
        self.message = message


def _say(message: str) -> None:
    sys.stderr.write(f"{PROG} up: {message}\n")
    sys.stderr.flush()


async def _wait_for_host(plan: Plan, host: Child, deadline: float) -> dict[str, Any]:
    """Poll ``status`` until the host answers (or dies, or the deadline)."""
    while True:
        if not host.alive:
            raise _Stop(EXIT_FAILED, f"the host exited with status {host.process.returncode if host.process else '?'}")
        left = deadline - trio.current_time()
        if left <= 0:
            raise _Stop(EXIT_UNREACHABLE, f"the host did not answer at {plan.admin}")
        try:
            return await admin_call(plan.admin, "status", {}, timeout=min(1.0, left), security=plan.security)
        except Unreachable:
            continue


def _live(status: dict[str, Any]) -> set[str]:
    return {n.get("name") for n in status.get("nodes") or [] if n.get("state") == "live"}


def _rich_console(stream: Any) -> Any:
    """A rich ``Console`` on ``stream`` if rich is installed (the ``bench``
    extra), else None: the live view is the same text either way, rich only
    colours it."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=stream, force_terminal=True, highlight=False, soft_wrap=True)


#: How rich colours the live view (a word in a line -> style).
_STYLES = (("live", "green"), ("fenced", "bold red"), ("dead", "red"), ("exited", "red"))


class View:
    """The live status view: redraw on a TTY (fitted to the terminal's size),
    a line per change otherwise."""

    def __init__(self, plan: Plan, children: list[Child], stream: Any = None,
                 size: Any = None) -> None:
        self.plan = plan
        self.children = children
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last = ""
        #: () -> os.terminal_size; the real terminal's by default
        self.size = size or (lambda: shutil.get_terminal_size((80, 24)))
        self.console = _rich_console(self.stream) if self.tty else None

    def show(self, status: dict[str, Any] | None, note: str = "") -> None:
        if self.tty:
            cols, rows = self.size()
            procs = "  ".join(c.describe() for c in self.children)
            footer = [*render.fold("processes", procs.split("  "), cols, "  "), f"logs {self.plan.logs}"]
            if note:
                footer.append(note)
            title = f"{PROG} up  {time.strftime('%H:%M:%S')}  admin {self.plan.admin}  Ctrl-C stops"
            lines = render.live_view(status, cols, rows - 1, title=title, footer=footer)
            self.stream.write("\x1b[H\x1b[2J")
            if self.console is not None:
                from rich.text import Text

                text = Text("\n".join(lines) + "\n")
                for word, style in _STYLES:
                    text.highlight_words([f" {word} "], style)
                if status is not None and status.get("stale_accesses"):
                    text.highlight_words(["stale_accesses"], "bold red")
                self.console.print(text, end="")
            else:
                self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
            return
        line = render.status_line(status) if status is not None else "the host is not answering"
        if note:
            line += f"  ({note})"
        if line != self.last:
            self.last = line
            self.stream.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            self.stream.flush()


async def _watch_children(
    plan: Plan, host: Child, nodes: list[Child], restart: bool, notes: list[str], stop: trio.CancelScope
) -> None:
    async def watch_host() -> None:
        while True:
            assert host.process is not None
            code = await host.process.wait()
            signal_group(host, signal.SIGKILL)
            host.exits.append(code)
            notes.append(f"the host exited with status {code}")
            if not restart:
                stop.cancel()
                return
            # A new incarnation on the same ports: every mm is gone with the old
            # one (a host crash is a machine crash); the nodes see the new
            # incarnation, drop everything and register again by themselves.
            await trio.sleep(1.0)
            await spawn(host)
            notes.append(f"the host restarted (pid {host.process.pid})")

    async def watch_node(child: Child) -> None:
        while True:
            assert child.process is not None
            code = await child.process.wait()
            signal_group(child, signal.SIGKILL)  # whatever it left in its group goes with it
            child.exits.append(code)
            notes.append(f"{child.name} exited with status {code}")
            if not restart:
                return
            await trio.sleep(1.0)  # do not spin on a node that dies at once
            await spawn(child)
            notes.append(f"{child.name} restarted (pid {child.process.pid})")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_host)
        for child in nodes:
            nursery.start_soon(watch_node, child)


async def _signals(scope: trio.CancelScope, caught: list[int]) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # tests drive `up --once` from a worker thread
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as received:
        async for signum in received:
            caught.append(signum)
            scope.cancel()
            return


async def _up(ns: argparse.Namespace, plan: Plan, children: list[Child]) -> int:
    exe = list(SERVICE_COMMAND)
    host = Child("host", [*exe, "host", *plan.host_args], plan.logs / "host.log")
    nodes = [
        Child(
            name,
            [*exe, "node", "--kind", kind, "--name", name, "--host", plan.node_endpoint, "--log-level", ns.log_level,
             *(["--insecure"] if plan.keys is None else ["--keys", plan.keys])],
            plan.logs / f"{name}.log",
        )
        for name, kind in plan.nodes
    ]
    children += [host, *nodes]
    caught: list[int] = []
    notes: list[str] = []
    outcome: _Stop | None = None
    try:
        with trio.CancelScope() as everything:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_signals, everything, caught)
                try:
                    await _start_and_show(ns, plan, host, nodes, children, notes, nursery, everything)
                except _Stop as stop:
                    outcome = stop
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            # the nodes first: an hmm node hands its device pages back to a
            # host that is still there (README "HMM device mirrors")
            await stop_all([c for c in children if c is not host], ns.grace)
            await stop_all(children, ns.grace)
    if outcome is None and not caught and not host.alive:
        code = host.process.returncode if host.process else "?"
        outcome = _Stop(EXIT_FAILED, f"the host exited with status {code}; nodes stopped")
    if outcome is None:
        return EXIT_OK
    if outcome.message:
        _say(outcome.message)
    if outcome.code != EXIT_OK and host.process is not None and host.process.returncode is not None:
        tail = host.tail()
        if tail:
            _say(f"last lines of {host.log_path}:\n{tail}")
        if "address already in use" in tail.lower():  # taken between our check and its bind
            _say(f"ports {plan.ports[0]}, {plan.ports[1]}, {plan.ports[2]}: one is taken; try --port-base 0")
    return outcome.code


async def _start_and_show(
    ns: argparse.Namespace,
    plan: Plan,
    host: Child,
    nodes: list[Child],
    children: list[Child],
    notes: list[str],
    nursery: trio.Nursery,
    everything: trio.CancelScope,
) -> None:
    """Start the host, then the nodes; then ``--once`` or the live view.

    Raises:
        _Stop: with the exit status, when ``up`` should end by itself.
    """
    as_json = getattr(ns, "json", False)
    if not as_json:
        _say(f"starting host ({plan.admin}) and {len(nodes)} nodes; logs in {plan.logs}")
    await spawn(host)
    deadline = trio.current_time() + ns.timeout
    await _wait_for_host(plan, host, deadline)
    for child in nodes:
        await spawn(child)
    nursery.start_soon(_watch_children, plan, host, nodes, ns.restart, notes, everything)
    want = {c.name for c in nodes}
    status = await _wait_for_nodes(plan, host, want, deadline)
    missing = want - _live(status)
    if as_json and not ns.once:
        if missing:
            raise _Stop(EXIT_FAILED, f"nodes not registered in time: {', '.join(sorted(missing))}")
        _emit_ready(plan, host, nodes, status)
    if ns.once:
        if as_json:
            sys.stdout.write(json.dumps(render.jsonable(status), separators=(",", ":")) + "\n")
        else:
            sys.stdout.write(render.status(status) + "\n")
        sys.stdout.flush()
        if missing:
            raise _Stop(EXIT_FAILED, f"nodes not registered in time: {', '.join(sorted(missing))}")
        raise _Stop(EXIT_OK)
    if missing:
        notes.append(f"not registered yet: {', '.join(sorted(missing))}")
    await _live_view(ns, plan, children, notes)


def ready_doc(plan: Plan, host: Child, nodes: list[Child], status: dict[str, Any]) -> dict[str, Any]:
    """The ready line of ``mmn up --json``: everything a script needs to use
    the cluster and to stop it."""
    info = status.get("host") or {}
    return {
        "ready": True,
        "pid": os.getpid(),
        "admin": plan.admin,
        "node": plan.node_endpoint,
        "events": f"tcp://{plan.connect_host}:{plan.ports[2]}",
        "keys": None if plan.keys is None else str(Path(plan.keys).resolve()),
        "logs": str(plan.logs),
        "nodes": [{"name": c.name, "pid": c.process.pid if c.process else None} for c in nodes],
        "host": {"pid": host.process.pid if host.process else None, "incarnation": info.get("incarnation")},
    }


def _emit_ready(plan: Plan, host: Child, nodes: list[Child], status: dict[str, Any]) -> None:
    doc = ready_doc(plan, host, nodes, status)
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    if os.environ.get(_DETACHED_ENV):  # the parent read it and left: nothing more goes to its pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)


async def _wait_for_nodes(plan: Plan, host: Child, want: set[str], deadline: float) -> dict[str, Any]:
    """Poll ``status`` until every node in ``want`` is live or the deadline."""
    while True:
        status = await _wait_for_host(plan, host, max(deadline, trio.current_time() + 2))
        if want <= _live(status) or trio.current_time() >= deadline:
            return status
        await trio.sleep(0.1)


async def _live_view(ns: argparse.Namespace, plan: Plan, children: list[Child], notes: list[str]) -> None:
    if getattr(ns, "json", False):  # scripts: the ready line was all; notes on stderr, until stopped
        shown = 0
        while True:
            for note in notes[shown:]:
                _say(note)
            shown = len(notes)
            await trio.sleep(ns.interval)
    view = View(plan, children)
    shown = 0
    while True:
        try:
            status: dict[str, Any] | None = await admin_call(
                plan.admin, "status", {}, timeout=max(2.0, ns.interval), security=plan.security
            )
        except (Unreachable, Failed):
            status = None
        new_notes = notes[shown:]
        shown = len(notes)
        if not view.tty:
            for note in new_notes:
                _say(note)
            view.show(status)
        else:
            view.show(status, "  ".join(notes[-3:]))
        await trio.sleep(ns.interval)


#: Set in the environment of the background ``mmn up`` that ``--detach`` starts.
_DETACHED_ENV = "MMN_UP_DETACHED"


class PortsBusy(Exception):
    """A port ``mmn up`` would bind is taken: nothing was started."""


def check_ports(bind: str, ports: Sequence[int]) -> None:
    """Fail before touching anything if one of ``ports`` is taken.

    Raises:
        PortsBusy: with the one-line message for people (the ``mmn up``
            holding them, from its note, and the fix).
    """
    host = "127.0.0.1" if bind in _WILDCARDS else bind
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq binds: TIME_WAIT is no conflict
            try:
                s.bind((host.strip("[]"), port))
            except OSError:
                busy.append(port)
    if not busy:
        return
    span = f"{ports[0]}-{ports[-1]}"
    for port in ports:
        record = read_up_record(port)
        if record is not None:
            raise PortsBusy(f"ports {span} are in use by mmn up pid {record['pid']}; try --port-base 0")
    raise PortsBusy(f"port{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} of {span} "
                    f"{'are' if len(busy) > 1 else 'is'} in use; try --port-base 0")


def run(ns: argparse.Namespace) -> int:
    """``mmn up``: returns the exit status."""
    if ns.detach:
        return _detach(ns)
    if ns.port_base != 0:
        bind = ns.bind or os.environ.get("MMN_BIND") or "127.0.0.1"
        try:
            check_ports(bind, [ns.port_base, ns.port_base + 1, ns.port_base + 2])
        except PortsBusy as exc:
            _say(str(exc))
            return EXIT_FAILED
    plan = make_plan(ns)
    children: list[Child] = []
    record = _leave_keys_for_the_cli(plan)
    orphaned = threading.Event() if ns.detached_child else _stop_with_parent()
    try:
        return trio.run(_up, ns, plan, children)
    except KeyboardInterrupt:
        return EXIT_OK
    except BaseExceptionGroup as group:  # Ctrl-C inside a nursery, before the signal watcher ran
        rest = group.split(KeyboardInterrupt)[1]
        if rest is not None and rest.split(trio.Cancelled)[1] is not None:
            raise
        return EXIT_OK
    finally:
        orphaned.set()
        kill_leftovers(children)
        if record is not None:
            remove_up_record(record)


def _stop_with_parent() -> threading.Event:
    """Stop (as on SIGTERM) when the process that started ``up`` dies -- a
    test runner that is killed leaves no cluster behind.  Not for a process
    started by init (there is no parent to lose), nor off the main thread
    (no signal handler there: tests call ``main(["up", ...])`` in threads).

    Returns:
        Set it to stop watching (``up`` is over).
    Concurrency: a daemon thread polls ``getppid()`` (no event exists for
    "my parent died" short of ``PR_SET_PDEATHSIG``, which fires when the
    parent's forking *thread* exits).
    """
    done = threading.Event()
    parent = os.getppid()
    if parent == 1 or threading.current_thread() is not threading.main_thread():
        return done

    def watch() -> None:
        while not done.wait(0.2):
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()
    return done


def _leave_keys_for_the_cli(plan: Plan) -> Path | None:
    """Tell the CLI of a second terminal where this cluster is and where its
    keys are, so ``mmn status`` against this admin port works with no flag
    (:func:`mmn.client.up_keys_for`), and ``mmn down`` finds it.  Never replaces
    the note of another live ``mmn up``."""
    return write_up_record(plan.ports[1], {
        "keys": None if plan.keys is None else str(Path(plan.keys).resolve()),
        "admin": plan.admin,
        "ports": {"node": plan.ports[0], "admin": plan.ports[1], "events": plan.ports[2]},
        "logs": str(plan.logs),
    })


# --------------------------------------------------------------------------
# in the background: mmn up --detach, mmn down


def _detach(ns: argparse.Namespace) -> int:
    """Start ``mmn up --json`` in a session of its own (it outlives us), wait
    for its ready line and print it (``--json``) or say where it is; exit 0.
    Its stderr goes to ``LOGS/up.log``."""
    logs = ns.logs if ns.logs is not None else Path(tempfile.mkdtemp(prefix="mmn-up-"))
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--logs {logs}: {exc.strerror}") from None
    argv = [a for a in getattr(ns, "argv", None) or sys.argv[1:] if a != "--detach"]
    argv = [*argv, "--json", "--detached-child", "--logs", str(logs)]
    env = child_env({"MMN_PARENT_PID": None})
    env[_DETACHED_ENV] = "1"
    log_path = logs / "up.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([*UP_COMMAND, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=log_file, env=env, start_new_session=True)
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + ns.timeout + 10
    try:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    line += chunk
    except KeyboardInterrupt:
        proc.terminate()
        return EXIT_OK
    finally:
        proc.stdout.close()
    try:
        doc = json.loads(line)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not doc.get("ready"):
        if proc.poll() is None:
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=ns.grace + 3)
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:]) if log_path.exists() else ""
        _say(f"the background mmn up did not get ready (see {log_path}){':' + chr(10) + tail if tail else ''}")
        return EXIT_FAILED if proc.returncode in (None, 0) else proc.returncode
    if getattr(ns, "json", False):
        sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    else:
        sys.stdout.write(f"mmn up running in the background: pid {doc['pid']}, admin {doc['admin']}, "
                         f"events {doc['events']}, keys {doc['keys']}, logs {doc['logs']}\n"
                         f"stop it with: mmn down --host {doc['admin']}\n")
    sys.stdout.flush()
    return EXIT_OK


def run_down(ns: argparse.Namespace) -> int:
    """``mmn down``: SIGTERM the ``mmn up`` serving ``--host`` (or the only
    one running), wait until it has stopped everything."""
    addr = ns.host or os.environ.get("MMN_HOST")
    if addr:
        port = addr.rpartition(":")[2]
        record = read_up_record(int(port)) if port.isdigit() else None
        if record is None:
            raise Failed("ESRCH", f"no mmn up of yours serves {addr} on this machine")
    else:
        records = live_up_records()
        if not records:
            raise Failed("ESRCH", "no mmn up of yours is running on this machine")
        if len(records) > 1:
            raise UsageError("several mmn up are running; name one with --host: "
                             + ", ".join(str(r.get("admin")) for r in records))
        record = records[0]
    pid = int(record["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + ns.wait
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            raise Failed("ETIMEDOUT", f"mmn up pid {pid} is still running after {ns.wait:g}s")
        time.sleep(0.05)
    if getattr(ns, "json", False):
        sys.stdout.write(json.dumps({"stopped": pid, "admin": record.get("admin")}) + "\n")
    else:
        sys.stdout.write(f"stopped mmn up pid {pid} ({record.get('admin')})\n")
    sys.stdout.flush()
    return EXIT_OK


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a zombie has stopped: its parent will reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
