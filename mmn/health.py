"""Container healthchecks: ``python -m mmn.health [--kind KIND]``.

Without ``--kind``: healthy when the host answers ``status`` on its admin
endpoint (``--host`` or ``$MMN_HOST``, default ``tcp://127.0.0.1:7782``).

With ``--kind``: healthy when the host's status lists this node as ``live``.
The node's name is worked out exactly as ``mmn node`` works it out
(``NodeConfig.from_env``: ``$MMN_NAME``, else ``KIND-HOSTNAME`` under
``MMN_NAME_FROM_HOSTNAME=1`` as in the image), so the check needs no name of
its own and works for every container of ``docker compose up --scale``.

With ``--link`` (the nodes of docker-compose.yml, which hold no admin key):
healthy when this container keeps one TCP connection to the port of the
host's node endpoint (``$MMN_HOST_ENDPOINT``) established across a second,
read from ``/proc/net/tcp*`` (the container's own network namespace).  Under
CURVE a connection the host refuses (ZAP) is closed at once, so one that lasts
has passed the handshake with this node's key.  No admin key is needed: it
does not ask the host anything.

Exit 0 healthy, 1 not (one line on stderr saying why), as Docker expects.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import trio

from protocol.types import NODE_KINDS

from .client import DEFAULT_ADMIN, Failed, Unreachable, admin_call


def node_state(status: dict[str, Any], name: str) -> str | None:
    """The state (``live``/``fenced``/``gone``) of node ``name`` in a status
    result, or None when the host does not know it."""
    for node in status.get("nodes") or []:
        if node.get("name") == name:
            return str(node.get("state"))
    return None


#: /proc/net/tcp state of an established connection.
_ESTABLISHED = "01"


def established(port: int, tables: Sequence[str]) -> set[str]:
    """Socket inodes of established TCP connections to remote ``port`` in the
    text of ``/proc/net/tcp`` and ``/proc/net/tcp6`` tables."""
    out: set[str] = set()
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _ESTABLISHED:
                continue
            _addr, _, rport = fields[2].rpartition(":")
            try:
                if int(rport, 16) == port:
                    out.add(fields[9])
            except ValueError:
                continue
    return out


def _tcp_tables() -> list[str]:
    tables = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                tables.append(f.read())
        except OSError:
            pass
    return tables


def check_link(endpoint: str, settle: float = 1.0) -> str:
    """``--link``: one connection to ``endpoint``'s port established now and
    ``settle`` seconds later.  Raises ``RuntimeError`` when there is none."""
    import time

    _, _, port_text = endpoint.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise RuntimeError(f"no port in the host's node endpoint {endpoint!r}") from None
    first = established(port, _tcp_tables())
    if first:
        time.sleep(settle)
        lasting = first & established(port, _tcp_tables())
        if lasting:
            return f"connected to {endpoint}"
    raise RuntimeError(f"no lasting connection to the host at {endpoint}")


def check(host: str, kind: str | None, timeout: float) -> str:
    """One check.  Returns what was seen; raises ``RuntimeError`` when unhealthy."""
    try:
        status = trio.run(lambda: admin_call(host, "status", {}, timeout=timeout))
    except (Unreachable, Failed) as exc:
        raise RuntimeError(f"host at {host}: {exc}") from None
    if kind is None:
        nodes = status.get("nodes") or []
        live = sum(1 for n in nodes if n.get("state") == "live")
        return f"host at {host}: {live} live node(s)"
    from node.runtime import NodeConfig

    name = NodeConfig.from_env(kind=kind).name
    state = node_state(status, name)
    if state != "live":
        raise RuntimeError(f"node {name}: {state or 'not registered'} at {host}")
    return f"node {name}: live"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmn.health", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=os.environ.get("MMN_HOST") or DEFAULT_ADMIN, help="admin endpoint ($MMN_HOST)")
    p.add_argument("--kind", choices=NODE_KINDS, default=None, help="check this node is live")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the host (3)")
    p.add_argument("--link", action="store_true",
                   help="only check the connection to the host's node endpoint ($MMN_HOST_ENDPOINT); no admin key")
    p.add_argument("--endpoint", default=os.environ.get("MMN_HOST_ENDPOINT") or "tcp://127.0.0.1:7781",
                   help="the host's node endpoint, for --link ($MMN_HOST_ENDPOINT)")
    ns = p.parse_args(argv)
    try:
        seen = check_link(ns.endpoint) if ns.link else check(ns.host, ns.kind, ns.timeout)
    except RuntimeError as exc:
        sys.stderr.write(f"unhealthy: {exc}\n")
        return 1
    sys.stdout.write(f"healthy: {seen}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
