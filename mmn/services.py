"""``mmn host`` and ``mmn node``: the two services, one process each (what
containers run, and what ``mmn up`` and the soak start as children).

Each takes its configuration from defaults, then ``MMN_*`` variables, then
flags (:data:`HOST_OPTIONS`, :data:`NODE_OPTIONS`), runs until SIGTERM or
SIGINT, and stops with its parent under a supervisor
(:func:`mmn.supervisor.die_with_parent`).  Exit status: 0 stopped, 1 the
service crashed (one line on stderr, the traceback in the log), 2 a usage
error.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import trio

from protocol.types import NODE_KINDS

from . import render
from .args import endpoint, env_value, node_name, number
from .client import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_EVENTS_PORT,
    DEFAULT_NODE_ENDPOINT,
    DEFAULT_NODE_PORT,
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    env_endpoint,
)
from .supervisor import die_with_parent

log = logging.getLogger(__name__)

_LOG_HELP = "DEBUG, INFO, WARNING or ERROR (default $MMN_LOG_LEVEL, else INFO)"


#: ``mmn host`` options: (flag, HostConfig field, environment variable,
#: argparse type, help).  ``HostConfig.from_env`` reads the variables; the
#: flags override them.
HOST_OPTIONS: tuple[tuple[str, str, str, Callable[[str], Any], str], ...] = (
    ("--bind", "bind", "MMN_BIND", str, "interface to bind (default 127.0.0.1; 0.0.0.0 in containers)"),
    ("--node-port", "node_port", "MMN_NODE_PORT", number(0, 65535), f"node ROUTER port (default {DEFAULT_NODE_PORT})"),
    ("--admin-port", "admin_port", "MMN_ADMIN_PORT", number(0, 65535), f"admin ROUTER port (default {DEFAULT_ADMIN_PORT})"),
    ("--events-port", "events_port", "MMN_EVENTS_PORT", number(0, 65535), f"event PUB port (default {DEFAULT_EVENTS_PORT})"),
    ("--frames", "frames", "MMN_FRAMES", number(1), "physical page frames, in pages (default 65536)"),
    ("--page-size", "page_size", "MMN_PAGE_SIZE", number(1), "page size in bytes (default 4096)"),
    ("--heartbeat-ms", "heartbeat_ms", "MMN_HEARTBEAT_MS", number(1), "heartbeat interval in ms (default 500)"),
    ("--liveness", "liveness", "MMN_LIVENESS", number(1), "heartbeats a node may miss before it is fenced (default 6)"),
    ("--ack-deadline-ms", "ack_deadline_ms", "MMN_ACK_DEADLINE_MS", number(1), "fence a node that acks later than this many ms (default 2000)"),
    ("--command-timeout-ms", "command_timeout_ms", "MMN_COMMAND_TIMEOUT_MS", number(1), "deadline of a relayed node command in ms (default 10000)"),
    ("--swap-path", "swap_path", "MMN_SWAP_PATH", str,
     "swap file, truncated at start, mode 0600; a restart never reuses what is in it "
     "(default: an unlinked temporary file)"),
    ("--swap-slots", "swap_slots", "MMN_SWAP_SLOTS", number(1), "swap slots, in pages (default 65536)"),
    ("--ksm-run", "ksm_run", "MMN_KSM_RUN", number(0, 2), "KSM run at start: 0 stop, 1 run, 2 unmerge (default 0)"),
    ("--keys", "keys_dir", "MMN_KEYS_DIR", str, "CURVE on every socket, keys from `mmn keygen DIR` (default: none, plain TCP)"),
    ("--server-key", "server_key", "MMN_SERVER_KEY", str, "CURVE: the host's secret key file (default DIR/host/host.key_secret of --keys)"),
    ("--node-keys", "node_keys", "MMN_NODE_KEYS", str, "CURVE: directory of allowed node public keys (default DIR/nodes of --keys)"),
    ("--admin-keys", "admin_keys", "MMN_ADMIN_KEYS", str, "CURVE: directory of allowed admin public keys (default DIR/admin of --keys)"),
    ("--max-frame", "max_frame", "MMN_MAX_FRAME", number(1024), "bytes in one frame (default 4194304, 4 MiB)"),
    ("--max-pages", "max_pages", "MMN_MAX_PAGES", number(1), "pages in one GUP request (default 512)"),
    ("--max-range", "max_range", "MMN_MAX_RANGE", number(1), "bytes in one requested range (default 1073741824, 1 GiB)"),
    ("--rate-limit", "max_rate", "MMN_RATE_LIMIT", number(0), "frames a second per peer, 0 = unlimited (default 20000)"),
    ("--rate-burst", "rate_burst", "MMN_RATE_BURST", number(0), "frames of burst before the rate limit bites (default 0: one second's worth)"),
)

#: Host options ``mmn up`` does not take (it chooses ports from --port-base).
_UP_SKIPS = ("node_port", "admin_port", "events_port")


def add_host_arguments(p: argparse.ArgumentParser, *, service: bool = True) -> None:
    """The ``mmn host`` options (``service=False``: those ``mmn up`` passes on to its host)."""
    for flag, dest, env, kind, help in HOST_OPTIONS:
        if not service and dest in _UP_SKIPS:
            continue
        p.add_argument(flag, dest=dest, type=kind, default=None, help=f"{help} (${env})")
    p.add_argument(
        "--wrap-change-pte",
        action="store_true",
        default=None,
        help="wrap change_pte in start/end as kernels 3.7-6.9 did ($MMN_WRAP_CHANGE_PTE=1)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plain TCP, no CURVE, even if keys are configured ($MMN_INSECURE=1)",
    )
    if service:
        p.add_argument("--log-level", default=os.environ.get("MMN_LOG_LEVEL", "INFO"), help=_LOG_HELP)


def _check_env(options: Sequence[tuple[str, str, str, Callable[[str], Any], str]]) -> None:
    """Reject a malformed ``MMN_*`` variable as a usage error, before
    ``from_env`` reads it."""
    for _flag, _dest, env, kind, _help in options:
        env_value(env, kind)


def host_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """HostConfig fields given as flags (already checked); None = not given."""
    out = {dest: getattr(ns, dest, None) for _f, dest, _e, _k, _h in HOST_OPTIONS}
    out["wrap_change_pte"] = getattr(ns, "wrap_change_pte", None)
    out["insecure"] = getattr(ns, "insecure", None)
    return {k: v for k, v in out.items() if v is not None}


def host_config(ns: argparse.Namespace) -> Any:
    """``broker.host.HostConfig.from_env(**flags)``: defaults, then ``MMN_*``
    variables, then the command line.

    Raises:
        UsageError: a malformed variable.
    """
    from broker.host import HostConfig

    _check_env(HOST_OPTIONS)
    try:
        config = HostConfig.from_env(**host_overrides(ns))
        config.key_paths()  # all three CURVE paths or none
        return config
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


#: ``mmn node`` options besides --kind/--name/--host.
NODE_OPTIONS: tuple[tuple[str, str, str, Callable[[str], Any], str], ...] = (
    ("--heartbeat-ms", "heartbeat_ms", "MMN_HEARTBEAT_MS", number(1), "heartbeat interval in ms until registered (default 500)"),
    ("--liveness", "liveness", "MMN_LIVENESS", number(1), "host heartbeats missed before reconnecting (default 6)"),
    ("--evict-timeout-ms", "evict_timeout_ms", "MMN_EVICT_TIMEOUT_MS", number(1),
     "on SIGTERM, ms to wait for the host to take back an hmm node's device pages (default 2000)"),
)


def add_node_arguments(p: argparse.ArgumentParser) -> None:
    """The ``mmn node`` options."""
    p.add_argument("--kind", choices=NODE_KINDS, default=os.environ.get("MMN_KIND"),
                   help="secondary MMU kind (default $MMN_KIND; required)")
    p.add_argument("--name", type=node_name, default=None, help="unique node name (default $MMN_NAME, else KIND-6 random hex digits)")
    p.add_argument("--host", type=endpoint, default=None, metavar="ADDR", help=f"the host's node endpoint (default $MMN_HOST_ENDPOINT, else {DEFAULT_NODE_ENDPOINT})")
    for flag, dest, env, kind, help in NODE_OPTIONS:
        p.add_argument(flag, dest=dest, type=kind, default=None, help=f"{help} (${env})")
    p.add_argument("--seed", type=number(0), default=None, help="seed of the injected failures' randomness (default: random)")
    p.add_argument("--keys", dest="keys_dir", default=None, metavar="DIR",
                   help="CURVE: nodes/NAME.key_secret (or nodes/KIND.key_secret) and host/host.key "
                        "(default $MMN_KEYS_DIR; none: plain TCP)")
    p.add_argument("--key", default=None, metavar="FILE", help="CURVE: this node's secret key file (default $MMN_NODE_KEY, else from --keys)")
    p.add_argument("--host-key", default=None, metavar="FILE", help="CURVE: the host's public key file (default $MMN_HOST_KEY, else from --keys)")
    p.add_argument("--insecure", action="store_true", default=None, help="plain TCP even with keys ($MMN_INSECURE=1)")
    p.add_argument("--log-level", default=os.environ.get("MMN_LOG_LEVEL", "INFO"), help=_LOG_HELP)


def node_config(ns: argparse.Namespace) -> Any:
    """``node.runtime.NodeConfig.from_env(**flags)``.

    Raises:
        UsageError: no kind, or a malformed variable.
    """
    from node.runtime import NodeConfig

    kind = ns.kind or env_value("MMN_KIND", str)
    if kind not in NODE_KINDS:
        raise UsageError(f"node: --kind {'|'.join(NODE_KINDS)} is required (or $MMN_KIND)")
    env_value("MMN_NAME", node_name)
    _check_env(NODE_OPTIONS)
    overrides: dict[str, Any] = {
        "kind": kind,
        "name": ns.name,
        "host": ns.host or env_endpoint("MMN_HOST_ENDPOINT", DEFAULT_NODE_ENDPOINT),
        "seed": ns.seed,
        "keys_dir": getattr(ns, "keys_dir", None),
        "key": getattr(ns, "key", None),
        "host_key": getattr(ns, "host_key", None),
        "insecure": getattr(ns, "insecure", None),
    }
    for _flag, dest, _env_name, _kind, _help in NODE_OPTIONS:
        overrides[dest] = getattr(ns, dest, None)
    try:
        return NodeConfig.from_env(**overrides)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


async def _cancel_on_signals(scope: trio.CancelScope, what: str, stop: trio.Event | None = None,
                             grace: float = 0.0, started: list[bool] | None = None) -> None:
    """Cancel ``scope`` at the first SIGTERM or SIGINT (main thread only).

    With ``stop``, a started service is asked to stop cleanly first (``stop``
    is set: a node hands back what it holds) and cancelled only after
    ``grace`` seconds, or at a second signal.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # tests run services in worker threads: no signal handling there
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        async for signum in received:
            log.info("%s: %s, stopping", what, signal.Signals(signum).name)
            if stop is None or stop.is_set() or not started:
                scope.cancel()
                return
            stop.set()
            scope.deadline = min(scope.deadline, trio.current_time() + grace)


async def _serve(service: Callable[..., Any], config: Any, what: str, *, stop: trio.Event | None = None,
                 grace: float = 0.0) -> None:
    """Run one service (``service(config, task_status=...)``) until it returns
    or SIGTERM/SIGINT arrives, then cancel it: structured shutdown, each socket
    closed by its owning task.  ``stop``: the service takes it (``stop=``) and
    returns by itself once it is set, within ``grace`` seconds (else cancelled).

    Concurrency: the service runs in an inner nursery; the signal watcher in
    the outer one, cancelled once the service is over.
    """
    started: list[bool] = []
    async with trio.open_nursery() as outer:
        outer.start_soon(_cancel_on_signals, outer.cancel_scope, what, stop, grace, started)
        async with trio.open_nursery() as inner:
            if stop is None:
                started.append(await inner.start(service, config))
            else:
                started.append(await inner.start(partial(service, config, stop=stop)))
            started_as = started[0]
            suffix = "" if started_as is None else f" {started_as}"
            sys.stderr.write(f"{render.PROG} {what}: ready{suffix}\n")
            sys.stderr.flush()
        outer.cancel_scope.cancel()


def _first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside ``exc`` (trio nurseries wrap)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _run_service(service: Callable[..., Any], config: Any, what: str, *, graceful: float | None = None) -> int:
    """``graceful``: the service takes a ``stop`` event and stops cleanly
    within that many seconds of the first SIGTERM/SIGINT."""
    try:
        if graceful is None:
            trio.run(_serve, service, config, what)
        else:
            trio.run(partial(_serve, service, config, what, stop=trio.Event(), grace=graceful))
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # the service crashed: one line, a log record, exit 1
        log.exception("%s crashed", what)
        leaf = _first_leaf(exc)
        render.error(f"{what}: {type(leaf).__name__}: {leaf}")
        return EXIT_FAILED
    return EXIT_OK


def run_host(ns: argparse.Namespace) -> int:
    config = host_config(ns)
    _configure_logging(ns.log_level)
    die_with_parent()
    from broker.host import run_host

    return _run_service(run_host, config, "host")


def run_node(ns: argparse.Namespace) -> int:
    config = node_config(ns)
    _configure_logging(ns.log_level)
    die_with_parent()
    from node.runtime import run_node

    # a clean stop hands back what the node holds, within its evict deadline
    return _run_service(run_node, config, f"node {config.name}", graceful=config.evict_timeout_ms / 1000 + 1.0)


