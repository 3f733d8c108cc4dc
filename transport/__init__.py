"""The only trio + ZeroMQ code, shared by the host, the nodes and the CLI.

See :mod:`transport.zsock` for the rules (one owner per socket, NOBLOCK I/O,
edge-triggered FD, typed errors).
"""

from .zsock import (
    AdminClient,
    Frames,
    PeerBusy,
    PeerGone,
    Security,
    SocketChannels,
    SocketOptions,
    SyncAdminClient,
    TransportError,
    ZSocket,
    bind,
    connect,
    serve_socket,
)

__all__ = [
    "AdminClient",
    "Frames",
    "PeerBusy",
    "PeerGone",
    "Security",
    "SocketChannels",
    "SocketOptions",
    "SyncAdminClient",
    "TransportError",
    "ZSocket",
    "bind",
    "connect",
    "serve_socket",
]
