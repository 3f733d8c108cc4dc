"""Typed protocol errors."""

from __future__ import annotations


class ProtocolError(Exception):
    """A frame that does not decode to a valid message.

    ``code``: ``bad_message``, ``too_large``, ``bad_version`` or
    ``unknown_type``.  ``ref`` is the request id the frame carried, if any, so
    the receiver can address its error reply.
    """

    def __init__(self, code: str, message: str, ref: int | None = None) -> None:
        self.code = code
        self.message = message
        self.ref = ref
        super().__init__(f"{code}: {message}")
