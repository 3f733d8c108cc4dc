"""The wire contract of mmnotify: messages, codec, limits, errors.

Imports neither trio nor zmq.
"""

from .codec import decode, encode
from .errors import ProtocolError
from .limits import Limits
from .messages import PROTOCOL_VERSION, REGISTRY, Message
from .types import ADDRESS_LIMIT, Errno, KernelError, NotifyEvent, Range

__all__ = [
    "ADDRESS_LIMIT",
    "PROTOCOL_VERSION",
    "REGISTRY",
    "Errno",
    "KernelError",
    "Limits",
    "Message",
    "NotifyEvent",
    "ProtocolError",
    "Range",
    "decode",
    "encode",
]
