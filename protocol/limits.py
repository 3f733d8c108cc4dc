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
    max_containers: arrays and maps in one frame, all levels together.  A
        one-byte empty array becomes a ~60-byte Python list, so without this
        a frame under ``max_frame`` could cost hundreds of MB and seconds of
        CPU to unpack.  Must exceed ``max_pages`` (a GUP reply is a list of
        page triples).
    max_values: values (scalars and containers) in one free-form map field
        (``args``, ``result``, ``fields``), all levels together: bounds the
        time spent validating one.
    """

    max_frame: int = 4 << 20
    max_items: int = 70_000
    max_string: int = 4096
    max_depth: int = 8
    max_pages: int = 512
    max_containers: int = 65_536
    max_values: int = 65_536
