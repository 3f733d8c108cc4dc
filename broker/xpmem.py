"""Exported XPMEM segments and access permits, host side.

Sans-I/O.  Modelled on XPMEM's ``kernel/xpmem_make.c`` (segments),
``xpmem_get.c`` (access permits and ``xpmem_check_permit_mode``) and
``xpmem_attach.c`` (faults on an attachment are GUPs with a pin in the
exporter's mm, read-write only through a read-write permit).

Identity is the node's session name as the host knows it (from the
authenticated connection), never what a message claims.

Permission mode (octal, as XPMEM's ``permit_value``): the owner's bits
(0o600) apply to the exporting node, the others' bits (0o006) to every other
node; group bits are not modelled (nodes have no groups).

The DMA oracle asks :meth:`Segments.covers` whether an xpmem node's access
goes through a permit of its own (read-write for a write) on a segment
covering the address.  A permit that ends while its holder may still have
accesses in flight -- a remove (the holder zaps on ``XpmemRemoved``) or a
revoke (on ``->release``) -- is *retiring* until the holder has acked that
zap: no new pin through it, but the accesses it sent before the zap are
answered.  After the ack, an access through it is a stale access::

    live --remove / revoke--> retiring --holder's ack (or fence)--> gone
    live --release (the node unmapped and unpinned first)---------> gone
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from protocol.types import Errno, KernelError


@dataclass(frozen=True, slots=True)
class Segment:
    segid: int
    owner: str
    mm: int
    addr: int
    length: int
    mode: int


@dataclass(frozen=True, slots=True)
class Permit:
    apid: int
    segid: int
    node: str
    write: bool


class Segments:
    """Segments by segid, permits by apid."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.segments: dict[int, Segment] = {}
        self.permits: dict[int, Permit] = {}
        #: node -> apid -> (permit, segment, id of the message whose ack ends it; 0: not sent yet)
        self.retiring: dict[str, dict[int, tuple[Permit, Segment, int]]] = {}
        self._segids = itertools.count(1)
        self._apids = itertools.count(1)

    def make(self, node: str, mm: int, addr: int, length: int, mode: int) -> Segment:
        """``xpmem_make``.  Raises KernelError(EINVAL) for an unaligned or empty range."""
        if length <= 0 or addr % self.page_size or length % self.page_size:
            raise KernelError(Errno.EINVAL, "segment must be whole pages")
        if not 0 <= mode <= 0o777:
            raise KernelError(Errno.EINVAL, "bad permission mode")
        seg = Segment(next(self._segids), node, mm, addr, length, mode)
        self.segments[seg.segid] = seg
        return seg

    def get(self, node: str, segid: int, write: bool) -> tuple[Permit, Segment]:
        """``xpmem_get`` with ``xpmem_check_permit_mode``.

        Raises:
            KernelError(ENOENT): no such segment.
            KernelError(EACCES): the mode does not allow this node this access.
        """
        seg = self.segments.get(segid)
        if seg is None:
            raise KernelError(Errno.ENOENT, f"no segment {segid}")
        bits = (seg.mode >> 6) & 0o7 if node == seg.owner else seg.mode & 0o7
        need = 0o6 if write else 0o4
        if bits & need != need:
            raise KernelError(Errno.EACCES, f"segment {segid} mode {seg.mode:o} denies {'rw' if write else 'r'}")
        permit = Permit(next(self._apids), segid, node, write)
        self.permits[permit.apid] = permit
        return permit, seg

    def release(self, node: str, apid: int) -> None:
        permit = self.permits.get(apid)
        if permit is None or permit.node != node:
            raise KernelError(Errno.ENOENT, f"no permit {apid}")
        del self.permits[apid]

    def remove(self, node: str, segid: int) -> list[Permit]:
        """``xpmem_remove``: only the owner; its permits go with it (returned,
        so the caller can tell their holders)."""
        seg = self.segments.get(segid)
        if seg is None:
            raise KernelError(Errno.ENOENT, f"no segment {segid}")
        if seg.owner != node:
            raise KernelError(Errno.EACCES, "only the exporter may remove a segment")
        del self.segments[segid]
        gone = [p for p in self.permits.values() if p.segid == segid]
        for p in gone:
            del self.permits[p.apid]
            self.retiring.setdefault(p.node, {})[p.apid] = (p, seg, 0)
        return gone

    def zap_sent(self, segid: int, msg_id: int) -> None:
        """The retiring permits of ``segid`` end with their holder's ack of ``msg_id``."""
        for held in self.retiring.values():
            for apid, (p, seg, _) in list(held.items()):
                if seg.segid == segid:
                    held[apid] = (p, seg, msg_id)

    def acked(self, node: str, msg_id: int) -> None:
        """``node`` acked ``msg_id``: the permits retiring until then are gone."""
        held = self.retiring.get(node)
        if held:
            for apid in [a for a, (_, _, until) in held.items() if until == msg_id]:
                del held[apid]
            if not held:
                del self.retiring[node]

    def retired(self, node: str | None = None, *, segid: int | None = None, mm: int | None = None) -> None:
        """The retiring permits of ``node`` (every node: None) on segment
        ``segid`` / of ``mm`` (any: None) are gone: the zap is over."""
        for name in [node] if node is not None else list(self.retiring):
            held = self.retiring.get(name, {})
            for apid in [a for a, (_, seg, _) in held.items()
                         if (segid is None or seg.segid == segid) and (mm is None or seg.mm == mm)]:
                del held[apid]
            if not held:
                self.retiring.pop(name, None)

    def covers(self, node: str, mm: int, addr: int, write: bool) -> bool:
        """Does a permit of ``node``, live or retiring, on a segment of
        ``mm`` cover the page at ``addr`` (read-write for a write)?  An xpmem
        access through anything else is stale: its attachment was removed,
        revoked or released, it is outside the segment, or it writes through
        a read-only permit."""
        for permit in self.permits.values():
            if permit.node == node and (permit.write or not write):
                seg = self.segments.get(permit.segid)
                if seg is not None and seg.mm == mm and seg.addr <= addr < seg.addr + seg.length:
                    return True
        for permit, seg, _ in self.retiring.get(node, {}).values():
            if (permit.write or not write) and seg.mm == mm and seg.addr <= addr < seg.addr + seg.length:
                return True
        return False

    def may_pin(self, node: str, mm: int, addr: int, end: int, write: bool) -> bool:
        """Does ``node`` hold a permit covering ``[addr, end)`` of ``mm``
        (read-write for a write)?  The host checks this before an xpmem GUP."""
        for permit in self.permits.values():
            if permit.node != node or (write and not permit.write):
                continue
            seg = self.segments.get(permit.segid)
            if seg is not None and seg.mm == mm and seg.addr <= addr and end <= seg.addr + seg.length:
                return True
        return False

    def reaches(self, node: str, mm: int, write: bool = False) -> bool:
        """Does ``node`` hold a permit on some segment of ``mm`` (read-write
        for a write)?  A permit is how a node reaches another's memory."""
        for permit in self.permits.values():
            if permit.node == node and (permit.write or not write):
                seg = self.segments.get(permit.segid)
                if seg is not None and seg.mm == mm:
                    return True
        return False

    def forget_node_mm(self, node: str, mm: int) -> None:
        """``revoke``: ``node``'s permits on segments of ``mm`` end (retiring
        until the node has acked its ``->release``: :meth:`retired`)."""
        for apid in [a for a, p in self.permits.items()
                     if p.node == node and (seg := self.segments.get(p.segid)) is not None and seg.mm == mm]:
            permit = self.permits.pop(apid)
            self.retiring.setdefault(node, {})[apid] = (permit, self.segments[permit.segid], 0)

    def forget_node(self, node: str) -> None:
        """A fenced node's permits are gone (its segments stay: the exporting
        mm still exists)."""
        for apid in [a for a, p in self.permits.items() if p.node == node]:
            del self.permits[apid]
        self.retiring.pop(node, None)

    def forget_mm(self, mm: int) -> None:
        for segid in [s for s, seg in self.segments.items() if seg.mm == mm]:
            del self.segments[segid]
            for apid in [a for a, p in self.permits.items() if p.segid == segid]:
                del self.permits[apid]
        self.retired(mm=mm)
