"""The only trio + ZeroMQ code, shared by the host, the nodes and the CLI.

See :mod:`transport.zsock` for the rules (one owner per socket, NOBLOCK I/O,
edge-triggered FD, typed errors).
"""

from .zsock import (
    AdminClient,
    DirectIncoming,
    Frames,
    PeerBusy,
    PeerGone,
    Received,
    Security,
    SocketChannels,
    SocketOptions,
    SyncAdminClient,
    TransportError,
    ZSocket,
    bind,
    connect,
    serve_socket,
    user_id_of,
)

__all__ = [
    "AdminClient",
    "DirectIncoming",
    "Frames",
    "PeerBusy",
    "PeerGone",
    "Received",
    "Security",
    "SocketChannels",
    "SocketOptions",
    "SyncAdminClient",
    "TransportError",
    "ZSocket",
    "bind",
    "connect",
    "serve_socket",
    "user_id_of",
]
