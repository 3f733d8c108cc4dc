"""The argument types of ``mmn``'s command line: each parses one value and
raises ``argparse.ArgumentTypeError`` with a message for people (argparse
prints it as a usage error, exit 2).  :func:`env_value` applies one to an
``MMN_*`` variable.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from typing import Any

from protocol.types import ADDRESS_LIMIT

from .client import BadEndpoint, UsageError, parse_endpoint


def _int(text: str) -> int:
    """Decimal or ``0x`` hexadecimal; no sign, no leading-zero octal guessing."""
    t = text.strip().replace("_", "")
    if t.startswith("-"):
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    try:
        if t[:2].lower() == "0x":
            return int(t[2:], 16)
        if t.startswith("+") or not t.isdigit():
            raise ValueError
        return int(t, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (decimal or 0x hex)") from None


def number(minimum: int = 0, maximum: int = (1 << 63) - 1, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        value = _int(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{text!r} out of range {minimum}..{maximum}")
        return value

    parse.__name__ = what or "number"
    return parse


def address(text: str) -> int:
    """A user address: decimal or 0x hex, below ``ADDRESS_LIMIT``."""
    value = _int(text)
    if value >= ADDRESS_LIMIT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a user address (they end below {ADDRESS_LIMIT:#x})")
    return value


address.__name__ = "address"


def hexbytes(text: str) -> bytes:
    """Bytes written as hex (``0x`` prefix, spaces and colons allowed)."""
    t = re.sub(r"[\s:]", "", text)
    if t[:2].lower() == "0x":
        t = t[2:]
    if not t:
        raise argparse.ArgumentTypeError("no bytes given")
    if len(t) % 2:
        raise argparse.ArgumentTypeError(f"odd-length hex {text!r}")
    try:
        return bytes.fromhex(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not hex") from None


hexbytes.__name__ = "hex"


def octal_mode(text: str) -> int:
    """Permission bits in octal: ``0600``, ``600`` or ``0o600``."""
    t = text.strip().lower()
    if t.startswith("0o"):
        t = t[2:]
    if not t or not all(c in "01234567" for c in t):
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0600")
    value = int(t, 8)
    if value > 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} out of range 0..0777")
    return value


octal_mode.__name__ = "mode"


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def probability(text: str) -> float:
    value = _float(text, "rate")
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability in 0..1")
    return value


probability.__name__ = "rate"


def seconds(text: str) -> float:
    value = _float(text, "seconds")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


seconds.__name__ = "seconds"


def node_name(text: str) -> str:
    if not text or len(text) > 256 or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a node name")
    return text


node_name.__name__ = "node"


def endpoint(text: str) -> str:
    """A ZeroMQ endpoint: ``tcp://H:P``, ``ipc://PATH``, ``inproc://N`` or ``H:P`` (:func:`mmn.client.parse_endpoint`)."""
    try:
        return parse_endpoint(text)
    except BadEndpoint as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


endpoint.__name__ = "endpoint"


def env_value(name: str, parse: Callable[[str], Any]) -> Any:
    """``$name`` parsed with an argparse type, or None when unset."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return parse(value)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"${name}: {exc}") from None
