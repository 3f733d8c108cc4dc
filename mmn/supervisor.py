"""Child processes: the one supervisor of ``mmn up``, the soak and the bench.

Lifetimes::

    parent ──┬── child  (pgid = its pid; $MMN_PARENT_PID = parent)
             │     └── whatever it starts (same group)
             └── ...
    stop_all: SIGTERM to every group -> grace -> SIGKILL to every group -> reaped
    parent SIGKILLed: each child sees getppid() change and stops (die_with_parent)

Rules:

1. :func:`spawn` starts every child in a process group of its own, so a
   signal to the group reaches what the child started too, also after the
   child itself has exited (Linux does not reuse a pid while a process group
   of that id exists).
2. A child dies with its parent: it gets ``$MMN_PARENT_PID`` and calls
   :func:`die_with_parent` (``mmn host`` and ``mmn node`` do).  Not
   ``PR_SET_PDEATHSIG``: that fires when the *thread* that forked the child
   exits, and trio's ``open_process`` forks from a worker thread that trio
   retires after 10 s idle.  Only :func:`fork_child`, which forks from the
   main thread of a single-threaded parent, may use it.
3. Stopping is graceful, then forced, then reaped: :func:`stop_all`; outside
   trio, :func:`kill_leftovers` is the last resort.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

__all__ = [
    "Child", "child_env", "die_with_parent", "fork_child", "free_ports", "kill_leftovers", "signal_group", "spawn",
    "stop_all",
]

#: The directory holding the project's packages: children import the same code.
SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)
#: Set in a child's environment: the pid of the process it must not outlive.
PARENT_ENV = "MMN_PARENT_PID"
_WILDCARDS = ("0.0.0.0", "*", "::", "[::]", "")


def child_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment for a child: ``$MMN_PARENT_PID`` (this
    process), the project's packages on ``$PYTHONPATH``, unbuffered output;
    then ``overrides`` (None removes a variable)."""
    env = dict(os.environ)
    env[PARENT_ENV] = str(os.getpid())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SOURCE_ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@dataclass
class Child:
    """One supervised child process.

    ``log_path``: its stdout and stderr are appended there (None: inherited
    from this process).  ``env``: overrides of :func:`child_env`.
    """

    name: str
    argv: list[str]
    log_path: Path | None
    process: trio.Process | None = None
    exits: list[int] = field(default_factory=list)
    env: dict[str, str | None] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def describe(self) -> str:
        if self.process is None:
            return f"{self.name}: not started"
        if self.alive:
            return f"{self.name}: pid {self.process.pid}"
        return f"{self.name}: exited {self.process.returncode}"

    def tail(self, lines: int = 5) -> str:
        """The last ``lines`` lines of its log ("" without one)."""
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


async def spawn(child: Child, *, stdin: int = subprocess.DEVNULL, stdout: int | None = None) -> None:
    """Start ``child`` (again, if it ran before) in its own process group,
    its output to its log file; ``child.process`` is the new process.

    Args:
        stdin: ``subprocess.DEVNULL`` (the default) or ``subprocess.PIPE``
            (then ``child.process.stdin`` is a trio stream).
        stdout: ``subprocess.PIPE`` to read its stdout (``child.process.stdout``);
            by default it goes to the log with stderr.

    Raises:
        OSError: the program could not be started.
    Concurrency: awaits the fork (trio runs it in a worker thread).
    """
    with contextlib.ExitStack() as files:
        out: Any = stdout
        err: Any = None  # inherited, without a log
        if child.log_path is not None:
            log_file = files.enter_context(open(child.log_path, "ab"))  # noqa: ASYNC230 - a local log, opened once per spawn
            out, err = (log_file, subprocess.STDOUT) if stdout is None else (stdout, log_file)
        child.process = await trio.lowlevel.open_process(
            child.argv, stdin=stdin, stdout=out, stderr=err, env=child_env(child.env), process_group=0,
        )


def signal_group(child: Child, signum: int) -> None:
    """Signal the child's whole process group -- also after the leader has
    exited, so a grandchild it left behind goes too.  (Linux does not reuse a
    pid while a process group of that id exists.)"""
    proc = child.process
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


async def stop_all(children: Sequence[Child], grace: float) -> None:
    """SIGTERM every live child's process group, SIGKILL what is left after
    ``grace`` seconds, reap them all.

    Concurrency: awaits at most ``grace`` + 2 seconds; call it shielded.
    """
    for child in children:
        if child.alive:
            signal_group(child, signal.SIGTERM)
    with trio.move_on_after(grace):
        for child in children:
            if child.process is not None:
                await child.process.wait()
    for child in children:
        signal_group(child, signal.SIGKILL)
    with trio.move_on_after(2):
        for child in children:
            if child.process is not None:
                await child.process.wait()


def kill_leftovers(children: Sequence[Child]) -> None:
    """Last resort, outside trio: SIGKILL any group still alive."""
    for child in children:
        signal_group(child, signal.SIGKILL)
        if child.process is not None:
            with contextlib.suppress(Exception):
                child.process.poll()


def free_ports(n: int, bind: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports the OS reports free right now (racy by nature:
    another process may take one before the child binds it)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((bind if bind not in _WILDCARDS else "127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


# --------------------------------------------------------------------------
# the child's side


def die_with_parent() -> None:
    """In a child started by :func:`spawn` (``$MMN_PARENT_PID``): stop when the
    parent is gone, so a SIGKILLed parent leaves no orphan behind.

    A daemon thread watches ``getppid()`` (we are reparented when the parent
    dies) and sends us SIGTERM: a service stops as on Ctrl-C.  Exits at once
    if the parent died before we looked.  Does nothing without
    ``$MMN_PARENT_PID``.
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not parent.isdigit():
        return
    parent_pid = int(parent)
    if os.getppid() != parent_pid:  # the parent died before we looked
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def fork_child(job: Callable[[], None]) -> int:
    """Fork a child that runs ``job`` and exits (0 when it returns, 1 if it
    raised), stdin and stdout on ``/dev/null``; returns its pid.

    For a fork server (the bench's launcher, which has imported everything
    once): call it from the main thread of a single-threaded process.  The
    child dies with it by ``PR_SET_PDEATHSIG`` (SIGKILL), which is sound here
    because the forking thread is the parent's main thread (rule 2 above).
    The child stays in the parent's process group: stopping the parent's
    group stops it too.
    """
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _pdeathsig(signal.SIGKILL)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        job()
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _pdeathsig(sig: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except Exception:  # best effort: the parent also kills its group
        pass
