"""Configurable limits on what a peer may send."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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
    max_range: bytes in one range a peer asks for (admin ``length`` and
        ``pages``, ``xpmem_make``); enforced by the host.
    max_rate: frames a second one peer (connection) may send the host, on
        the node and on the admin channel; more are dropped and counted.
        0 = unlimited.  Checked before decoding, so a flood costs little.
    rate_burst: frames a peer may send at once before ``max_rate`` bites
        (0: one second's worth).
    """

    max_frame: int = 4 << 20
    max_items: int = 70_000
    max_string: int = 4096
    max_depth: int = 8
    max_pages: int = 512
    max_containers: int = 65_536
    max_values: int = 65_536
    max_range: int = 1 << 30
    max_rate: int = 20_000
    rate_burst: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> Limits:
        """Defaults, then ``MMN_MAX_FRAME``, ``MMN_MAX_PAGES``,
        ``MMN_MAX_RANGE``, ``MMN_RATE_LIMIT``, ``MMN_RATE_BURST``, then
        ``overrides`` (field names; None = not given).

        Raises:
            ValueError: a variable that is not a non-negative integer.
        """
        values: dict[str, int] = {}
        for name, var in ENV_VARS.items():
            text = env.get(var, "")
            if text == "":
                continue
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"{var} must be an integer, not {text!r}") from None
            if value < 0:
                raise ValueError(f"{var} must not be negative")
            values[name] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        limits = dataclasses.replace(cls(), **values)
        if limits.max_frame < 1024 or limits.max_pages < 1 or limits.max_range < 1:
            raise ValueError("max_frame must be at least 1024, max_pages and max_range at least 1")
        return limits


#: Limits field -> environment variable (``mmn host``; the node reads max_frame).
ENV_VARS: dict[str, str] = {
    "max_frame": "MMN_MAX_FRAME",
    "max_pages": "MMN_MAX_PAGES",
    "max_range": "MMN_MAX_RANGE",
    "max_rate": "MMN_RATE_LIMIT",
    "rate_burst": "MMN_RATE_BURST",
}
