"""The socket adapter (:mod:`transport.zsock`) and CURVE (:mod:`transport.curve`),
shared by the host, the nodes and the clients.

See :mod:`transport.zsock` for the rules (one owner per socket, NOBLOCK I/O,
edge-triggered FD, typed errors).  The admin and event clients are
:mod:`mmn.client`.
"""

from .zsock import (
    DirectIncoming,
    Frames,
    LinkFailed,
    LinkMonitor,
    PeerBusy,
    PeerGone,
    Received,
    Security,
    SocketChannels,
    SocketOptions,
    TransportError,
    ZSocket,
    bind,
    connect,
    connect_monitored,
    connect_raw,
    handshake_probe,
    serve_socket,
    user_id_of,
)

__all__ = [
    "DirectIncoming",
    "Frames",
    "LinkFailed",
    "LinkMonitor",
    "PeerBusy",
    "PeerGone",
    "Received",
    "Security",
    "SocketChannels",
    "SocketOptions",
    "TransportError",
    "ZSocket",
    "bind",
    "connect",
    "connect_monitored",
    "connect_raw",
    "handshake_probe",
    "serve_socket",
    "user_id_of",
]
