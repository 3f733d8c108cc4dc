"""Paging of ``status`` replies: no reply may exceed the frame limit.

A host with 100,000 mms, or a node mapping 500,000 pages, cannot describe
itself in one frame (``Limits.max_frame``, and the decoder's ``max_values``
bound the reply the CLI can read).  So ``status`` gives bounded summaries by
default and the detail in pages, on the admin channel and the node channel
alike, in the style of a list API with a continue token:

* ``status``: the host, every node's summary with at most
  :data:`NODE_PREVIEW` of its translations, and the first
  :data:`MMS_PAGE` mms; ``mms_next`` / a node's ``mms_next`` is the cursor
  of the rest (``None`` when nothing is left out);
* ``status --mm M``: mm ``M`` only, and each node's translations of ``M``;
* ``status --node N [--cursor C]``: node ``N`` only, its translations
  :data:`PAGES_PAGE` at a time;
* ``status --cursor C``: the next page of mms.

A cursor is opaque to the user: ``m<id>`` continues the mm list after mm
``id``; ``p<mm>:<addr hex>`` continues a node's translations after that page.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from typing import Any

from .types import Errno, KernelError

#: mms described in one status reply.
MMS_PAGE = 256
#: translations of one node shown in the summary of ``status``.
NODE_PREVIEW = 256
#: translations of one node in one page of ``status --node``.
PAGES_PAGE = 4096
#: the most a caller may ask for in one page (``limit``).
MAX_PAGE = 8192
#: vmas of one mm shown (``vmas_total`` says how many there are).
VMAS_SHOWN = 64
#: per-mm or per-object lists of a node (permits, attachments, per-mm state).
LIST_SHOWN = 256


def mm_cursor(mm: int) -> str:
    return f"m{mm}"


def page_cursor(mm: int, addr: int) -> str:
    return f"p{mm}:{addr:x}"


def parse_mm_cursor(cursor: str | None) -> int:
    """The mm id a ``m<id>`` cursor continues after (0: from the start).

    Raises:
        KernelError(EINVAL): not a cursor of the mm list.
    """
    if cursor is None:
        return 0
    if cursor[:1] == "m" and cursor[1:].isdigit():
        return int(cursor[1:])
    raise KernelError(Errno.EINVAL, f"bad cursor {cursor[:40]!r}: not one this host gave for the mm list")


def parse_page_cursor(cursor: str | None) -> tuple[int, int] | None:
    """The (mm, page address) a ``p<mm>:<addr>`` cursor continues after.

    Raises:
        KernelError(EINVAL): not a cursor of a node's translations.
    """
    if cursor is None:
        return None
    if cursor[:1] == "p" and ":" in cursor:
        mm, _, addr = cursor[1:].partition(":")
        if mm.isdigit() and addr and all(c in "0123456789abcdef" for c in addr):
            return int(mm), int(addr, 16)
    raise KernelError(Errno.EINVAL, f"bad cursor {cursor[:40]!r}: not one a node gave for its translations")


def page_translations(
    translations: Mapping[int, Mapping[int, int]], *, mm: int | None = None,
    after: tuple[int, int] | None = None, limit: int = NODE_PREVIEW,
) -> tuple[dict[str, dict[str, int]], str | None]:
    """One page of ``{mm: {page address: pfn}}``, in (mm, address) order.

    Returns:
        ``({str(mm): {hex(addr): pfn}}, cursor of the rest or None)``.
    """
    out: dict[str, dict[str, int]] = {}
    left = limit
    mms = sorted(translations) if mm is None else ([mm] if mm in translations else [])
    for m in mms:
        if after is not None and m < after[0]:
            continue
        pages = translations[m]
        if not pages:
            continue
        addrs = sorted(pages)
        first = bisect_right(addrs, after[1]) if after is not None and m == after[0] else 0
        if first >= len(addrs):
            continue
        if left == 0:
            return out, page_cursor(*_last(out))
        take = addrs[first:first + left]
        out[str(m)] = {hex(a): pages[a] for a in take}
        left -= len(take)
        if first + len(take) < len(addrs):
            return out, page_cursor(m, take[-1])
    return out, None


def _last(page: dict[str, dict[str, int]]) -> tuple[int, int]:
    mm = next(reversed(page))
    return int(mm), int(next(reversed(page[mm])), 16)


def check_limit(limit: Any, default: int) -> int:
    if limit is None:
        return default
    if type(limit) is not int or not 1 <= limit <= MAX_PAGE:
        raise KernelError(Errno.EINVAL, f"limit must be 1..{MAX_PAGE}")
    return limit
