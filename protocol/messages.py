"""Every message of the wire contract (DESIGN §4), one frozen dataclass each.

A message is a MessagePack map ``{"v": PROTOCOL_VERSION, "t": TYPE, **fields}``.
Field annotations are the schema: ``protocol.codec`` validates every field of a
decoded frame against them.  Rules for changing this file: append only; a new
field gets a default; never reuse a tag.

Direction and pairing:

================================  =========  ===============================
message                           direction  answered by
================================  =========  ===============================
register                          node→host  registered | error
subscribe / unsubscribe           node→host  ok | error
heartbeat                         both       (any traffic counts)
gup                               node→host  gup_reply | error
unpin                             node→host  ok | error
dma_read / dma_write              node→host  dma_reply | error
xpmem_make/get/release/remove     node→host  xpmem_reply | error
invalidate_range_start            host→node  ack (status ok | EAGAIN)
invalidate_range_end              host→node  (none: always succeeds)
change_pte                        host→node  ack
clear_flush_young/clear_young/
test_young                        host→node  ack (young)
release                           host→node  ack
xpmem_removed                     host→node  ack (after its unpins)
fenced                            host→node  (none: node must re-register)
command                           host→node  command_result
admin_request                     cli→host   admin_reply
event                             host→pub   (none)
================================  =========  ===============================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

PROTOCOL_VERSION = 1

#: tag -> class, filled by :func:`message`.
REGISTRY: dict[str, type[Message]] = {}


def message(cls: type[Message]) -> type[Message]:
    """Class decorator: register ``cls`` under its ``TYPE`` tag."""
    tag = cls.TYPE
    if tag in REGISTRY:
        raise RuntimeError(f"duplicate message tag {tag!r}")
    REGISTRY[tag] = cls
    return cls


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[str] = ""
    #: Fields whose string value must be one of a fixed set.
    CHOICES: ClassVar[dict[str, frozenset[str]]] = {}
    #: Integer fields that are user addresses (checked against ADDRESS_LIMIT).
    ADDRESSES: ClassVar[tuple[str, ...]] = ()


_EVENTS = frozenset(
    {"UNMAP", "CLEAR", "PROTECTION_VMA", "PROTECTION_PAGE", "SOFT_DIRTY", "RELEASE", "MIGRATE"}
)
_KINDS = frozenset({"kvm", "gru", "xpmem"})
_ACK_STATUS = frozenset({"ok", "EAGAIN"})
#: protocol.types.Origin: whose context raised an invalidation
_ORIGINS = frozenset({"owner", "ksmd", "kswapd", "migration"})


# --------------------------------------------------------------------------
# node -> host: session


@message
@dataclass(frozen=True, slots=True)
class Register(Message):
    """``mmu_notifier_register`` of a node as a whole: a new session.

    ``ops`` names the callbacks of ``struct mmu_notifier_ops`` the node
    implements; ``sleepable`` marks nodes whose invalidate_range_start may
    block (xpmem).  ``incarnation`` is fresh each time the node process starts.
    """

    TYPE: ClassVar[str] = "register"
    CHOICES: ClassVar[dict[str, frozenset[str]]] = {"kind": _KINDS}
    id: int
    name: str
    kind: str
    ops: list[str]
    sleepable: bool
    incarnation: str


@message
@dataclass(frozen=True, slots=True)
class Registered(Message):
    TYPE: ClassVar[str] = "registered"
    ref: int
    epoch: int
    host_incarnation: str
    heartbeat_ms: int
    ack_deadline_ms: int
    page_size: int


@message
@dataclass(frozen=True, slots=True)
class Subscribe(Message):
    """Subscribe this node to one mm (``mmu_notifier_register(mn, mm)``)."""

    TYPE: ClassVar[str] = "subscribe"
    id: int
    epoch: int
    mm: int


@message
@dataclass(frozen=True, slots=True)
class Unsubscribe(Message):
    """``mmu_notifier_unregister``: once answered, nothing more is delivered."""

    TYPE: ClassVar[str] = "unsubscribe"
    id: int
    epoch: int
    mm: int


@message
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Either direction.  From the host, ``incarnation`` is the host's."""

    TYPE: ClassVar[str] = "heartbeat"
    id: int
    epoch: int
    incarnation: str = ""


@message
@dataclass(frozen=True, slots=True)
class Ok(Message):
    TYPE: ClassVar[str] = "ok"
    ref: int


@message
@dataclass(frozen=True, slots=True)
class Error(Message):
    """A typed error reply.

    ``code`` is an errno name (``EFAULT``...) for kernel-style failures, or one
    of ``bad_message``, ``fenced``, ``unregistered``, ``rate_limited``,
    ``forbidden``, ``internal``.
    """

    TYPE: ClassVar[str] = "error"
    ref: int
    code: str
    message: str = ""


# --------------------------------------------------------------------------
# node -> host: secondary faults and accesses


@message
@dataclass(frozen=True, slots=True)
class Gup(Message):
    """``get_user_pages_remote`` of ``npages`` pages from ``addr``.

    ``pin`` asks for FOLL_PIN (xpmem): the frames stay pinned until ``unpin``.
    """

    TYPE: ClassVar[str] = "gup"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("addr",)
    id: int
    epoch: int
    mm: int
    addr: int
    npages: int
    write: bool
    pin: bool = False


@message
@dataclass(frozen=True, slots=True)
class GupReply(Message):
    """Pages as ``[addr, pfn, writable]`` triples, in address order.

    Like the kernel, a GUP that fails on its first page returns ``errno``; one
    that fails later returns the pages it got.
    """

    TYPE: ClassVar[str] = "gup_reply"
    ref: int
    mm: int
    pages: list[list[int]]
    errno: str = ""


@message
@dataclass(frozen=True, slots=True)
class Unpin(Message):
    """``unpin_user_pages``: drop pins this node took by ``gup(pin=True)``."""

    TYPE: ClassVar[str] = "unpin"
    id: int
    epoch: int
    mm: int
    pfns: list[int]


@message
@dataclass(frozen=True, slots=True)
class DmaRead(Message):
    """A node reads ``length`` bytes at ``offset`` in frame ``pfn``, which it
    believes backs ``addr`` of ``mm``.  The host's oracle checks the belief."""

    TYPE: ClassVar[str] = "dma_read"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("addr",)
    id: int
    epoch: int
    mm: int
    addr: int
    pfn: int
    offset: int
    length: int


@message
@dataclass(frozen=True, slots=True)
class DmaWrite(Message):
    TYPE: ClassVar[str] = "dma_write"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("addr",)
    id: int
    epoch: int
    mm: int
    addr: int
    pfn: int
    offset: int
    data: bytes


@message
@dataclass(frozen=True, slots=True)
class DmaReply(Message):
    """``errno`` is ``ESTALE`` when the oracle refused a stale access."""

    TYPE: ClassVar[str] = "dma_reply"
    ref: int
    data: bytes = b""
    errno: str = ""


# --------------------------------------------------------------------------
# node -> host: XPMEM (kernel/xpmem_make.c, xpmem_get.c, xpmem_attach.c)


@message
@dataclass(frozen=True, slots=True)
class XpmemMake(Message):
    """``xpmem_make``: export ``[addr, addr+length)`` of ``mm`` with ``mode``
    (octal permission bits: owner = the exporting node, others = any node)."""

    TYPE: ClassVar[str] = "xpmem_make"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("addr",)
    id: int
    epoch: int
    mm: int
    addr: int
    length: int
    mode: int


@message
@dataclass(frozen=True, slots=True)
class XpmemGet(Message):
    """``xpmem_get``: ask for access to ``segid``, read-write or read-only."""

    TYPE: ClassVar[str] = "xpmem_get"
    id: int
    epoch: int
    segid: int
    write: bool


@message
@dataclass(frozen=True, slots=True)
class XpmemRelease(Message):
    TYPE: ClassVar[str] = "xpmem_release"
    id: int
    epoch: int
    apid: int


@message
@dataclass(frozen=True, slots=True)
class XpmemRemove(Message):
    TYPE: ClassVar[str] = "xpmem_remove"
    id: int
    epoch: int
    segid: int


@message
@dataclass(frozen=True, slots=True)
class XpmemReply(Message):
    """``value`` is the segid (make) or apid (get); ``mm``/``addr``/``length``
    describe the segment for get, so the node can attach it."""

    TYPE: ClassVar[str] = "xpmem_reply"
    ref: int
    value: int = 0
    mm: int = 0
    addr: int = 0
    length: int = 0
    write: bool = False
    errno: str = ""


# --------------------------------------------------------------------------
# host -> node: the notifier callbacks (include/linux/mmu_notifier.h)


@message
@dataclass(frozen=True, slots=True)
class InvalidateRangeStart(Message):
    """``origin``: whose context raised it (``owner``, or the kernel threads
    ``ksmd``, ``kswapd``, ``migration``; protocol.types.Origin)."""

    TYPE: ClassVar[str] = "invalidate_range_start"
    CHOICES: ClassVar[dict[str, frozenset[str]]] = {"event": _EVENTS, "origin": _ORIGINS}
    ADDRESSES: ClassVar[tuple[str, ...]] = ("start", "end")
    id: int
    mm: int
    start: int
    end: int
    event: str
    blockable: bool = True
    origin: str = "owner"


@message
@dataclass(frozen=True, slots=True)
class InvalidateRangeEnd(Message):
    """Pairs with the start of the same ``start_id``; never fails, never acked."""

    TYPE: ClassVar[str] = "invalidate_range_end"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("start", "end")
    id: int
    mm: int
    start: int
    end: int
    start_id: int = 0


@message
@dataclass(frozen=True, slots=True)
class ChangePte(Message):
    """``set_pte_at_notify``: the primary pte of ``addr`` now maps ``pfn``.

    Only read-only ptes are passed on as change_pte (a writable new pte makes
    the node drop its entry); the node repoints or downgrades in place.
    ``origin`` as for InvalidateRangeStart (KSM's are ``ksmd``).
    """

    TYPE: ClassVar[str] = "change_pte"
    CHOICES: ClassVar[dict[str, frozenset[str]]] = {"origin": _ORIGINS}
    ADDRESSES: ClassVar[tuple[str, ...]] = ("addr",)
    id: int
    mm: int
    addr: int
    pfn: int
    writable: bool
    origin: str = "owner"


@message
@dataclass(frozen=True, slots=True)
class ClearFlushYoung(Message):
    TYPE: ClassVar[str] = "clear_flush_young"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("start", "end")
    id: int
    mm: int
    start: int
    end: int


@message
@dataclass(frozen=True, slots=True)
class ClearYoung(Message):
    TYPE: ClassVar[str] = "clear_young"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("start", "end")
    id: int
    mm: int
    start: int
    end: int


@message
@dataclass(frozen=True, slots=True)
class TestYoung(Message):
    TYPE: ClassVar[str] = "test_young"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("start", "end")
    id: int
    mm: int
    start: int
    end: int


@message
@dataclass(frozen=True, slots=True)
class Release(Message):
    """``->release``: the mm is being torn down; drop everything of it."""

    TYPE: ClassVar[str] = "release"
    id: int
    mm: int


@message
@dataclass(frozen=True, slots=True)
class Ack(Message):
    """The answer to a notifier callback named by ``ref``.

    ``status`` is ``ok`` or ``EAGAIN`` (non-blockable start refused by a
    sleepable node).  ``young`` answers the aging callbacks.  ``kept``: the
    node acknowledged a start but kept its (pinned) translations of the
    range -- xpmem ignoring a background invalidation -- so the host still
    counts the range as served to it.
    """

    TYPE: ClassVar[str] = "ack"
    CHOICES: ClassVar[dict[str, frozenset[str]]] = {"status": _ACK_STATUS}
    ref: int
    status: str = "ok"
    young: bool = False
    kept: bool = False


@message
@dataclass(frozen=True, slots=True)
class Fenced(Message):
    """The host retired this node's epoch: drop every translation, register anew."""

    TYPE: ClassVar[str] = "fenced"
    epoch: int
    reason: str = ""


# --------------------------------------------------------------------------
# relayed admin commands (host -> node -> host)


@message
@dataclass(frozen=True, slots=True)
class Command(Message):
    """An admin command relayed to a node: ``fault``, ``access``, ``inject``,
    ``heal``, ``xpmem_*``, ``status``.  ``args`` are checked by the node."""

    TYPE: ClassVar[str] = "command"
    id: int
    command: str
    args: dict[str, Any] = field(default_factory=dict)


@message
@dataclass(frozen=True, slots=True)
class CommandResult(Message):
    TYPE: ClassVar[str] = "command_result"
    ref: int
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    errno: str = ""
    error: str = ""


# --------------------------------------------------------------------------
# admin channel and event stream


@message
@dataclass(frozen=True, slots=True)
class AdminRequest(Message):
    TYPE: ClassVar[str] = "admin_request"
    id: int
    command: str
    args: dict[str, Any] = field(default_factory=dict)


@message
@dataclass(frozen=True, slots=True)
class AdminReply(Message):
    TYPE: ClassVar[str] = "admin_reply"
    ref: int
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    errno: str = ""
    error: str = ""


@message
@dataclass(frozen=True, slots=True)
class Event(Message):
    """Published on the event stream for ``mmn watch``; never for correctness."""

    TYPE: ClassVar[str] = "event"
    seq: int
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------
# host -> node: XPMEM (kernel/xpmem_make.c xpmem_remove_seg)


@message
@dataclass(frozen=True, slots=True)
class XpmemRemoved(Message):
    """``xpmem_remove_seg`` -> ``xpmem_clear_PTEs``: segment ``segid`` is
    gone.  The importer zaps and unpins every attachment of its permits of
    it (Unpin before the Ack); later accesses through them fail (ENOENT).
    The remover's reply waits for every importer's Ack, as the kernel's
    remove waits for the zaps."""

    TYPE: ClassVar[str] = "xpmem_removed"
    id: int
    segid: int
