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
interval_insert                   node→host  interval_reply
interval_remove                   node→host  ok (after the invalidations active)
hmm_range_fault                   node→host  hmm_range_fault_reply | error
hmm_migrate                       node→host  hmm_migrate_reply | error
hmm_exclusive                     node→host  hmm_range_fault_reply | error
hmm_migrated / hmm_devmem_fault   host→node  ack (devmem_fault: with the contents)
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
    {"UNMAP", "CLEAR", "PROTECTION_VMA", "PROTECTION_PAGE", "SOFT_DIRTY", "RELEASE", "MIGRATE", "EXCLUSIVE"}
)
_KINDS = frozenset({"kvm", "gru", "xpmem", "hmm"})
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
    #: interval notifiers of the addressee the range overlaps, as
    #: ``[interval, cur_seq]`` (``mmu_interval_set_seq``); empty for others
    seqs: list[list[int]] = field(default_factory=list)
    #: ``range->owner`` of a MIGRATE (the device migrating): its own notifier skips it
    owner: str = ""
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
    #: a device-private page's contents (the answer to ``hmm_devmem_fault``)
    data: bytes = b""
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


# --------------------------------------------------------------------------
# node -> host: interval notifiers and hmm_range_fault (include/linux/
# mmu_notifier.h mmu_interval_notifier_insert/remove, mm/hmm.c), the hmm kind


@message
@dataclass(frozen=True, slots=True)
class IntervalInsert(Message):
    """``mmu_interval_notifier_insert``: invalidations of ``mm`` overlapping
    ``[start, end)`` reach this node, each carrying the interval's sequence.
    Registers the node on the mm too, as the kernel's insert does."""

    TYPE: ClassVar[str] = "interval_insert"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("start", "end")
    id: int
    epoch: int
    mm: int
    start: int
    end: int


@message
@dataclass(frozen=True, slots=True)
class IntervalReply(Message):
    """The inserted interval's id and its first ``invalidate_seq``."""

    TYPE: ClassVar[str] = "interval_reply"
    ref: int
    interval: int = 0
    seq: int = 0
    errno: str = ""


@message
@dataclass(frozen=True, slots=True)
class IntervalRemove(Message):
    """``mmu_interval_notifier_remove``: answered (Ok) once no invalidation
    that may still reach the interval is active (deferred removal)."""

    TYPE: ClassVar[str] = "interval_remove"
    id: int
    epoch: int
    mm: int
    interval: int


@message
@dataclass(frozen=True, slots=True)
class HmmRangeFault(Message):
    """``hmm_range_fault`` of ``npages`` pages from ``addr`` under interval
    ``interval``.  ``fault``: HMM_PFN_REQ_FAULT (fault in what is missing,
    ``write``: HMM_PFN_REQ_WRITE); without it a snapshot of the ptes."""

    TYPE: ClassVar[str] = "hmm_range_fault"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("addr",)
    id: int
    epoch: int
    mm: int
    interval: int
    addr: int
    npages: int
    write: bool = False
    fault: bool = True


@message
@dataclass(frozen=True, slots=True)
class HmmRangeFaultReply(Message):
    """``hmm_pfns`` as ``[addr, pfn, flags]`` (``protocol.hmm`` flag bits)
    and ``seq``, the interval's ``mmu_interval_read_begin`` when they were
    read: the node installs them only if ``read_retry(seq)`` says no
    invalidation reached it since."""

    TYPE: ClassVar[str] = "hmm_range_fault_reply"
    ref: int
    mm: int
    seq: int
    pfns: list[list[int]] = field(default_factory=list)
    errno: str = ""
    #: device pages of this node the host no longer references: drop them
    freed: list[int] = field(default_factory=list)


@message
@dataclass(frozen=True, slots=True)
class HmmMigrate(Message):
    """``HMM_DMIRROR_MIGRATE_TO_DEV`` / ``_TO_SYS``: move the anonymous pages
    of ``npages`` from ``addr`` into this device's memory (device-private
    entries on the host), or (``to_sys``) this device's pages back."""

    TYPE: ClassVar[str] = "hmm_migrate"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("addr",)
    id: int
    epoch: int
    mm: int
    interval: int
    addr: int
    npages: int
    to_sys: bool = False


@message
@dataclass(frozen=True, slots=True)
class HmmMigrateReply(Message):
    """``cpages``: pages migrated (``struct hmm_dmirror_cmd``)."""

    TYPE: ClassVar[str] = "hmm_migrate_reply"
    ref: int
    mm: int
    cpages: int = 0
    errno: str = ""
    freed: list[int] = field(default_factory=list)


@message
@dataclass(frozen=True, slots=True)
class HmmExclusive(Message):
    """``HMM_DMIRROR_EXCLUSIVE`` (``make_device_exclusive``): the pages become
    device-exclusive entries for this node; answered by ``hmm_range_fault_reply``
    (the pages with ``HMM_PFN_EXCLUSIVE`` and the interval's seq)."""

    TYPE: ClassVar[str] = "hmm_exclusive"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("addr",)
    id: int
    epoch: int
    mm: int
    interval: int
    addr: int
    npages: int


@message
@dataclass(frozen=True, slots=True)
class HmmMigrated(Message):
    """host->node, under the migration: the device now holds ``pages``
    (``[addr, handle, writable]``; ``data``: their contents in that order,
    a page each).  Acknowledged once stored (``dmirror_migrate_alloc_and_copy``
    and ``_finalize_and_map``)."""

    TYPE: ClassVar[str] = "hmm_migrated"
    id: int
    mm: int
    pages: list[list[int]]
    data: bytes


@message
@dataclass(frozen=True, slots=True)
class HmmDevmemFault(Message):
    """host->node: ``dev_pagemap_ops.migrate_to_ram`` (``dmirror_devmem_fault``)
    of device page ``handle``: answer with its contents in ``Ack.data``;
    ``free``: the host holds no other reference, drop it."""

    TYPE: ClassVar[str] = "hmm_devmem_fault"
    ADDRESSES: ClassVar[tuple[str, ...]] = ("addr",)
    id: int
    mm: int
    addr: int
    handle: int
    free: bool = True


@message
@dataclass(frozen=True, slots=True)
class HmmEvict(Message):
    """A device going away cleanly (lib/test_hmm.c ``dmirror_fops_release`` /
    ``dmirror_device_remove`` -> ``dmirror_device_evict_chunk``;
    mm/migrate_device.c ``migrate_device_range``): the host brings every
    device-private page this node holds back to system memory (fresh frames,
    the contents asked of the device by ``hmm_devmem_fault``), then answers
    ``hmm_evict_reply``."""

    TYPE: ClassVar[str] = "hmm_evict"
    id: int
    epoch: int


@message
@dataclass(frozen=True, slots=True)
class HmmEvictReply(Message):
    """``cpages``: pages brought back; ``lost``: pages that could not be
    (no frame, no contents: poisoned, as for a dead device)."""

    TYPE: ClassVar[str] = "hmm_evict_reply"
    ref: int
    cpages: int = 0
    lost: int = 0
    freed: list[int] = field(default_factory=list)
