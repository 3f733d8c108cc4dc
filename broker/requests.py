"""What the host answers to a node's requests: sans-I/O, shared by the trio
host (:mod:`broker.host`) and the in-process cluster (:mod:`mmn.local`).

The shells own sessions, duplicates, deadlines and sockets; this module owns
the answers: subscriptions (``mmu_notifier_register``), unpinning, XPMEM
segments and permits, the DMA oracle and GUP (the permit checks, GUP-fast, and
the slow path as an operation the shell runs under its lock).

=================  ============================  ===============================
request            answer                        errors (``Error.code``)
=================  ============================  ===============================
Subscribe          Ok                            ESRCH (no mm), EINTR (exiting)
Unpin              Ok                            EINVAL (not pinned by it)
XpmemMake/Get/...  XpmemReply                    ENOENT, EACCES, ESRCH, EINVAL
DmaRead/DmaWrite   DmaReply (errno ESTALE: the   EINVAL (outside the page)
                   oracle refused it)
Gup                GupReply (errno on failure)   EACCES (no permit; xpmem
                                                 without a pin)
=================  ============================  ===============================
"""

from __future__ import annotations

from typing import Any

from protocol.messages import (
    DmaRead,
    DmaReply,
    DmaWrite,
    Error,
    Gup,
    GupReply,
    Message,
    Ok,
    Subscribe,
    Unpin,
    XpmemGet,
    XpmemMake,
    XpmemRelease,
    XpmemRemove,
    XpmemReply,
)
from protocol.types import Errno, KernelError

from .effects import Op
from .xpmem import Segments


def page_triples(pages: list[tuple[int, int, bool]]) -> list[list[int]]:
    """GUP results as the wire carries them: ``[addr, pfn, writable 0/1]``
    (the codec takes ints only, not bools)."""
    return [[int(addr), int(pfn), int(writable)] for addr, pfn, writable in pages]


class NodeRequests:
    """Answers for the requests of registered nodes.

    Args:
        model: the :class:`broker.mm.Model`.
        segments: the XPMEM :class:`broker.xpmem.Segments`.
    Concurrency: synchronous; :meth:`gup_slow` is an operation (generator) the
        shell runs under its lock, everything else runs between two yields of
        whatever operation holds it.
    """

    def __init__(self, model: Any, segments: Segments) -> None:
        self.model = model
        self.segments = segments

    def answer(self, name: str, msg: Message) -> Message:
        """The reply to Subscribe, Unpin or an XPMEM request from node ``name``;
        an Error reply for anything else.  Never raises KernelError."""
        try:
            if isinstance(msg, Subscribe):
                self.model.check_mm(msg.mm)
                self.model.notifier.register(name, msg.mm)
                return Ok(ref=msg.id)
            if isinstance(msg, Unpin):
                self.model.unpin(name, msg.mm, msg.pfns)
                return Ok(ref=msg.id)
            if isinstance(msg, XpmemMake):
                self.model.check_mm(msg.mm)
                seg = self.segments.make(name, msg.mm, msg.addr, msg.length, msg.mode)
                return XpmemReply(ref=msg.id, value=seg.segid, mm=seg.mm, addr=seg.addr, length=seg.length)
            if isinstance(msg, XpmemGet):
                permit, seg = self.segments.get(name, msg.segid, msg.write)
                return XpmemReply(
                    ref=msg.id, value=permit.apid, mm=seg.mm, addr=seg.addr, length=seg.length, write=permit.write
                )
            if isinstance(msg, XpmemRelease):
                self.segments.release(name, msg.apid)
                return XpmemReply(ref=msg.id)
            if isinstance(msg, XpmemRemove):
                self.segments.remove(name, msg.segid)
                return XpmemReply(ref=msg.id)
        except KernelError as exc:
            return Error(ref=getattr(msg, "id", 0), code=exc.errno.value, message=exc.message)
        return Error(ref=getattr(msg, "id", 0), code="bad_message", message=f"{msg.TYPE} is not for the host")

    def dma(self, name: str, msg: DmaRead | DmaWrite) -> DmaReply:
        """A node's access through its translation, checked by the oracle
        (``DmaReply.errno`` is ESTALE when refused; the model counts it)."""
        try:
            if isinstance(msg, DmaRead):
                data = self.model.dma_read(name, msg.mm, msg.addr, msg.pfn, msg.offset, msg.length)
                return DmaReply(ref=msg.id, data=bytes(data))
            self.model.dma_write(name, msg.mm, msg.addr, msg.pfn, msg.offset, msg.data)
            return DmaReply(ref=msg.id)
        except KernelError as exc:
            return DmaReply(ref=msg.id, errno=exc.errno.value)

    def gup_fast(self, name: str, kind: str, msg: Gup) -> Message | None:
        """The permit checks, then GUP-fast.

        Returns:
            The reply (a GupReply, or an Error for a missing permit), or None:
            take the slow path (:meth:`gup_slow` under the lock).
        """
        end = msg.addr + msg.npages * self.model.page_size
        if msg.pin and not self.segments.may_pin(name, msg.mm, msg.addr, end, msg.write):
            return Error(ref=msg.id, code=Errno.EACCES.value, message="no xpmem permit covers this")
        if kind == "xpmem" and not msg.pin:
            return Error(ref=msg.id, code=Errno.EACCES.value, message="xpmem maps through permits")
        try:
            pages = self.model.gup_fast(msg.mm, msg.addr, msg.npages, msg.write, pin=msg.pin, node=name)
        except KernelError as exc:
            return GupReply(ref=msg.id, mm=msg.mm, pages=[], errno=exc.errno.value)
        if pages is None:
            return None
        return GupReply(ref=msg.id, mm=msg.mm, pages=page_triples(pages))

    def gup_slow(self, name: str, msg: Gup) -> Op[GupReply]:
        """``get_user_pages`` with faults: an operation for the shell's lock."""
        try:
            pages = yield from self.model.gup(msg.mm, msg.addr, msg.npages, msg.write, pin=msg.pin, node=name)
        except KernelError as exc:
            return GupReply(ref=msg.id, mm=msg.mm, pages=[], errno=exc.errno.value)
        return GupReply(ref=msg.id, mm=msg.mm, pages=page_triples(pages))

    def undeliverable(self, name: str, msg: Gup, reply: GupReply) -> None:
        """The node was fenced while its slow GUP ran: the fence dropped its
        pins, drop the ones this reply took too."""
        if msg.pin and reply.pages:
            self.model.unpin(name, msg.mm, [p[1] for p in reply.pages])
