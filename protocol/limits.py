"""Configurable limits on what a peer may send."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds the decoder enforces.  Every one is configurable on the host and node.

    max_frame: bytes in one frame (also the sockets' ``MAXMSGSIZE``).
    max_items: elements of one array or map.
    max_string: characters in one string field.
    max_depth: nesting of admin argument maps.
    max_pages: pages in one GUP request.
    """

    max_frame: int = 4 << 20
    max_items: int = 70_000
    max_string: int = 4096
    max_depth: int = 8
    max_pages: int = 512
