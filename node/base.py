"""What every secondary MMU shares: the sans-I/O machine around one kind.

A secondary MMU is a plain synchronous state machine (DESIGN §1, "sans-I/O cores").
Two kinds of input drive it:

* :meth:`SecondaryMMU.receive` -- every host->node message (notifier callbacks,
  replies to the node's own requests, ``fenced``, ``registered``);
* local commands -- :meth:`SecondaryMMU.fault`, :meth:`SecondaryMMU.access` and,
  for xpmem, ``make/get/attach/detach/xpmem_release/remove``.  Each returns
  ``(token, outputs)``; the command finishes later with a :class:`Completion`
  carrying that token (possibly among these very outputs).

Every call returns a list of :data:`Output`: protocol messages to send to the
host, in order, and :class:`Completion` objects for local callers.  Nothing
here awaits, sleeps, reads a clock or touches a socket, so ``node.runtime`` (trio
over ZeroMQ) and the in-process harness run exactly this code.

Faults (``get_user_pages`` on behalf of the node) are one state machine,
:mod:`node.fault` (its states, events and transition table); a kind supplies
only the read side the kernel gives it::

    fault begins ──▶ not subscribed?        ──▶ SUBSCRIBING: Subscribe, wait for Ok
                 ──▶ read_begin() is None?  ──▶ PARKED on the mm until an end wakes it
                 ──▶ seq = read_begin()     ──▶ GUP_SENT: send Gup
    GupReply     ──▶ read_retry(seq)?       ──▶ RETRYING: discard (+Unpin if pinned),
                                                begin again (bounded: FAILED, EAGAIN)
                 ──▶ _fault_install(pages)  ──▶ DONE

That is ``mmu_interval_read_begin`` / ``mmu_interval_read_retry`` of
mm/mmu_notifier.c and KVM's ``mmu_invalidate_seq`` (virt/kvm/kvm_main.c) in
message form: the reply of a GUP is only as good as the invalidations that did
not happen between the request and the reply, and the channel is ordered, so
"happened before the reply" is "received before the reply".

Invariant (checked by tests/test_node_kinds.py for every kind): a translation
never outlives a start that overlaps it and that was received after the GUP
that produced it was sent -- except a pinned translation through a background
invalidation (xpmem, ``Ack.kept``): the pin keeps the page where it is.

Concurrency: none.  One caller at a time (the runtime's node task, or a test).
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

from protocol.messages import (
    Ack,
    ChangePte,
    ClearFlushYoung,
    ClearYoung,
    DmaRead,
    DmaReply,
    DmaWrite,
    Error,
    Fenced,
    Gup,
    GupReply,
    Heartbeat,
    InvalidateRangeEnd,
    InvalidateRangeStart,
    Message,
    Ok,
    Register,
    Registered,
    Release,
    Subscribe,
    TestYoung,
    Unpin,
    Unsubscribe,
    XpmemReply,
)
from protocol.status import LIST_SHOWN, NODE_PREVIEW, check_limit, page_translations, parse_page_cursor
from protocol.types import NOTIFIER_OPS, Errno, KernelError

from .fault import Fault, FaultEvent, FaultState

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 4096
#: ``get_user_pages`` batch limit, as ``protocol.limits.Limits.max_pages``.
MAX_GUP_PAGES = 512
#: Discarded GUP replies tolerated per fault before it fails with EAGAIN.
MAX_FAULT_RETRIES = 8
#: Acks remembered to answer a duplicated notifier message idempotently.
ANSWERED_CACHE = 4096
#: pfns per Unpin message.
UNPIN_BATCH = 4096
#: ``Error.code`` of a host refusal that means "I hold no session of yours on
#: this connection" (broker/sessions.py ``Refused``): a retired epoch, a fenced
#: session, or a connection the host does not know (it lost the one we
#: registered on, e.g. after a TCP reset, and libzmq reconnected by itself).
SESSION_REFUSALS = frozenset({"fenced", "unregistered"})


@dataclass(frozen=True, slots=True)
class Completion:
    """A local command finished.

    ``token`` is what the command returned; exactly one of ``result`` (a
    JSON/msgpack-friendly dict; read data is ``bytes``) and ``error`` is set.
    """

    token: int
    result: dict[str, Any] | None = None
    error: KernelError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


#: What a node call returns, in order: messages for the host, completions for callers.
Output: TypeAlias = Message | Completion



def kernel_error(code: str, message: str = "") -> KernelError:
    """Turn an ``errno`` / ``Error.code`` string from the host into a KernelError.

    Session-level codes map to the errno a caller would see: ``fenced`` and
    ``unregistered`` -> EINTR (re-register and retry), ``forbidden`` -> EPERM,
    ``rate_limited`` -> EAGAIN, anything else -> EINVAL.
    """
    try:
        return KernelError(Errno(code), message)
    except ValueError:
        errno = {
            "fenced": Errno.EINTR,
            "unregistered": Errno.EINTR,
            "forbidden": Errno.EPERM,
            "rate_limited": Errno.EAGAIN,
        }.get(code, Errno.EINVAL)
        return KernelError(errno, f"{code}: {message}" if message else code)


class Session(enum.Enum):
    """The node's session with the host, as the node sees it.

    ::

        UNREGISTERED ──Registered──▶ REGISTERED ──Fenced / a refusal of this
             ▲                           │        session (ends_session)──▶ ENDED
             └───────── (the runtime registers anew: Registered) ◀─────────┘
    """

    UNREGISTERED = "unregistered"
    REGISTERED = "registered"
    ENDED = "ended"


class Subscription(enum.Enum):
    """An mm's ``mmu_notifier_register`` as the node sees it::

        NONE ──Subscribe sent──▶ SUBSCRIBING ──Ok──▶ SUBSCRIBED ──release / Unsubscribe's Ok──▶ NONE
                                      └──Error──▶ NONE
    """

    NONE = "none"
    SUBSCRIBING = "subscribing"
    SUBSCRIBED = "subscribed"


# A fault's common path names its events and states through these: Python
# 3.11's EnumType.__getattr__ makes each ``FaultEvent.REPLY`` in an
# expression a slow attribute lookup (~0.1 us).
_SEND_GUP, _REPLY, _INSTALL = FaultEvent.SEND_GUP, FaultEvent.REPLY, FaultEvent.INSTALL
_FAILED = FaultState.FAILED
_SUBSCRIBED = Subscription.SUBSCRIBED


@dataclass(eq=False, slots=True)
class MmState:
    """What a node keeps per subscribed mm, whatever its kind.

    ``open_starts``: start id -> ``[start, end)`` of invalidations begun and not
    yet ended (nesting: several at once).  ``subscribing``: faults waiting for
    the Subscribe's Ok (``FaultState.SUBSCRIBING``); ``subscribe_commands``: the
    tokens of explicit ``subscribe`` commands waiting for the same Ok;
    ``parked``: faults ``read_begin`` parked (``FaultState.PARKED``), woken
    when an end closes a range.
    """

    mm: int
    subscription: Subscription = Subscription.NONE
    #: id of the Subscribe in flight (0: none); a reply to another is superseded
    subscribe_id: int = 0
    subscribing: list[Fault] = field(default_factory=list)
    subscribe_commands: list[int] = field(default_factory=list)
    parked: list[Fault] = field(default_factory=list)
    open_starts: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def subscribed(self) -> bool:
        return self.subscription is _SUBSCRIBED


@dataclass(frozen=True, slots=True)
class Translation:
    """Where a node access goes: ``pfn`` backs page ``addr`` of ``mm``."""

    mm: int
    addr: int
    pfn: int
    writable: bool


@dataclass(eq=False, slots=True)
class _Access:
    token: int
    mm: int
    addr: int
    length: int
    data: bytes | None  # None: a read
    pos: int = 0
    read: bytearray = field(default_factory=bytearray)
    faults_here: int = 0  # faults taken for the current page


# What a request in flight waits for, by the id of the message that asked
# (``SecondaryMMU._pending``): the reply goes to the record's handler.  A Gup
# waits as its Fault; the kinds may add their own records (xpmem's calls).


@dataclass(eq=False, slots=True)
class _SubscribeRequest:
    state: MmState
    sid: int


@dataclass(eq=False, slots=True)
class _UnsubscribeRequest:
    state: MmState
    token: int


@dataclass(eq=False, slots=True)
class _DmaRequest:
    access: _Access
    dma_id: int
    length: int


def pages_in(table: dict[int, Any], start: int, end: int, page_size: int) -> list[int]:
    """Keys of ``table`` (page addresses) in ``[start, end)``.

    Costs the smaller of the range's pages and the table's size, so zapping a
    huge, sparsely mapped range follows the mapped pages, not the range.
    """
    first = start - start % page_size
    if (end - first) // page_size <= len(table):
        return [a for a in range(first, end, page_size) if a in table]
    return [a for a in table if start <= a + page_size - 1 and a < end]


def zap_range(table: dict[int, Any], start: int, end: int, page_size: int) -> int:
    """Remove the keys of ``table`` (page addresses) in ``[start, end)``;
    returns how many went.

    A range that holds the whole table (munmap or exit of the mapping, the
    common zap of a populated table) empties it in one ``dict.clear`` after
    ``min``/``max`` over the keys, both in C: 100,000 entries in ~3 ms
    instead of ~25 ms for the per-key list and ``del`` loop of the general
    case, which stays for a range that cuts the table.
    """
    if not table:
        return 0
    first = start - start % page_size
    if (end - first) // page_size > len(table) and first <= min(table) and max(table) < end:
        count = len(table)
        table.clear()
        return count
    pages = pages_in(table, start, end, page_size)
    for page in pages:
        del table[page]
    return len(pages)


#: :meth:`SecondaryMMU.receive`: a host -> node message's exact type -> the
#: method handling it (the codec builds exactly the registered classes).
RECEIVERS: dict[type[Message], str] = {
    InvalidateRangeStart: "_receive_start",
    InvalidateRangeEnd: "_receive_end",
    ChangePte: "_receive_callback",
    ClearFlushYoung: "_receive_callback",
    ClearYoung: "_receive_callback",
    TestYoung: "_receive_callback",
    Release: "_receive_callback",
    GupReply: "_receive_reply",
    DmaReply: "_receive_reply",
    XpmemReply: "_receive_reply",
    Ok: "_receive_reply",
    Error: "_receive_error",
    Fenced: "_receive_fenced",
    Registered: "_receive_registered",
    Heartbeat: "_receive_heartbeat",
}
#: The acked callbacks of :meth:`SecondaryMMU._receive_callback`, answered once.
CALLBACKS: dict[type[Message], str] = {
    ChangePte: "change_pte",
    ClearFlushYoung: "clear_flush_young",
    ClearYoung: "clear_young",
    TestYoung: "test_young",
    Release: "_receive_release",
}


class SecondaryMMU:
    """Base of the kvm, gru and xpmem kinds (``struct mmu_notifier`` + its device).

    The ops table (``struct mmu_notifier_ops``): a kind implements a callback
    by overriding the public method of the same name (``invalidate_range_start``,
    ``invalidate_range_end``, ``change_pte``, ``clear_flush_young``,
    ``clear_young``, ``test_young``, ``release``).  ``ops`` -- what ``Register``
    announces and the only callbacks the host sends -- is derived from the
    overrides when the class is created, never listed by hand.

    Class attributes:
        kind: ``"kvm"``, ``"gru"`` or ``"xpmem"``.
        ops: the callbacks this kind overrides (derived; a subset of
            ``protocol.types.NOTIFIER_OPS``).
        sleepable: whether ``invalidate_range_start`` may block (xpmem).

    Args:
        name: the node's name (unique in the cluster).
        page_size: until ``Registered`` says otherwise.
        max_fault_retries: discarded GUP replies tolerated per fault; one more
            and the fault fails with EAGAIN.
        max_gup_pages: largest ``npages`` of one Gup (``Limits.max_pages``).

    Attributes set by the runtime (or by ``receive(Registered)``):
        epoch: the registration epoch stamped on every request.

    Concurrency: synchronous, not thread-safe; one owner drives it.
    """

    kind: ClassVar[str] = ""
    ops: ClassVar[frozenset[str]] = frozenset()
    sleepable: ClassVar[bool] = False
    _receivers: ClassVar[dict[type[Message], Callable[[Any, Any], list[Output]]]] = {}
    _callbacks: ClassVar[dict[type[Message], Callable[[Any, Any], list[Output]]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Derive ``cls.ops`` from the callbacks ``cls`` overrides (once, at
        class creation, as trio's instrumentation finds the hooks an
        instrument defines).

        Raises:
            TypeError: a kind overrides only one of ``invalidate_range_start``
                and ``invalidate_range_end`` (the host pairs every start with
                an end: ``mn_hlist_invalidate_range_start`` in mm/mmu_notifier.c).
        """
        super().__init_subclass__(**kwargs)
        cls.ops = frozenset(op for op in NOTIFIER_OPS if getattr(cls, op) is not getattr(SecondaryMMU, op))
        if ("invalidate_range_start" in cls.ops) != ("invalidate_range_end" in cls.ops):
            raise TypeError(f"{cls.__name__}: invalidate_range_start and invalidate_range_end go together")
        cls._bind_receivers()

    @classmethod
    def _bind_receivers(cls) -> None:
        """:meth:`receive`'s table, type -> this class's method (overrides
        included), built once per class: :data:`RECEIVERS`, :data:`CALLBACKS`."""
        cls._receivers = {kind: getattr(cls, name) for kind, name in RECEIVERS.items()}
        cls._callbacks = {kind: getattr(cls, name) for kind, name in CALLBACKS.items()}

    def __init__(
        self,
        name: str,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        max_fault_retries: int = MAX_FAULT_RETRIES,
        max_gup_pages: int = MAX_GUP_PAGES,
    ) -> None:
        self.name = name
        self.page_size = page_size
        self.max_fault_retries = max_fault_retries
        self.max_gup_pages = max_gup_pages
        self.epoch = 0
        self.session = Session.UNREGISTERED
        self._next_id = 0
        #: The first message id of the current session (set by Registered):
        #: every id from here on was stamped with ``epoch``.
        self._session_first_id = 0
        self._next_token = 0
        self._mms: dict[int, MmState] = {}
        # request id -> what waits for its reply (GupReply/DmaReply/XpmemReply/Ok/Error):
        # a Fault (its Gup), a _SubscribeRequest, ... (see _reply)
        self._pending: dict[int, Any] = {}
        # Gup id -> a fault failed by a drop while its Gup was on the wire: its
        # reply is the table's FAILED --REPLY--> FAILED (bounded, oldest out)
        self._dropped: OrderedDict[int, Fault] = OrderedDict()
        # DMA id -> (mm, page address): accesses on the wire
        self.dma_in_flight: dict[int, tuple[int, int]] = {}
        self._open_tokens: set[int] = set()
        # notifier message id -> the Ack sent for it (duplicates answered again)
        self._answered: OrderedDict[int, Ack] = OrderedDict()
        self.counters: dict[str, int] = {
            "faults": 0,
            "gups": 0,
            "gup_retries": 0,
            "accesses": 0,
            "dma": 0,
            "stale_replies": 0,
            "invalidations": 0,
            "duplicates": 0,
            "drops": 0,
            "pins_taken": 0,
            "pins_released": 0,
        }

    # ------------------------------------------------------------------ ids

    def next_id(self) -> int:
        """A fresh message id.  The runtime takes its ids (register,
        heartbeat, subscribe...) from here too, so replies never collide."""
        self._next_id += 1
        return self._next_id

    def _new_token(self) -> int:
        self._next_token += 1
        self._open_tokens.add(self._next_token)
        return self._next_token

    def make_register(self, incarnation: str) -> Register:
        """The ``Register`` message announcing this node (id from :meth:`next_id`)."""
        return Register(
            id=self.next_id(),
            name=self.name,
            kind=self.kind,
            ops=sorted(self.ops),
            sleepable=self.sleepable,
            incarnation=incarnation,
        )

    # ------------------------------------------------------------ sessions

    def ends_session(self, msg: Message) -> bool:
        """Does ``msg`` tell this node the host holds no current session of it?

        * ``Fenced`` of the current epoch (or with no epoch, or while not
          registered) does.  A ``Fenced`` naming an earlier epoch does not:
          it is the fence of a previous session (a restarted process reusing
          the routing id gets the host's Fenced for its predecessor).
        * An ``Error`` with a :data:`SESSION_REFUSALS` code refusing a message
          of the current session does: that message carried the current
          epoch, so the host retired it (or lost the connection).  One
          refusing a message sent before this session's ``Registered`` does
          not (it carried an epoch this node already left).

        Whoever gets True hands the message to :meth:`receive`, which drops
        everything, then registers anew.
        """
        if isinstance(msg, Fenced):
            return not (self.epoch and msg.epoch and msg.epoch != self.epoch)
        if isinstance(msg, Error) and msg.code in SESSION_REFUSALS:
            return self.session is Session.REGISTERED and self._session_first_id <= msg.ref <= self._next_id
        return False

    # ------------------------------------------------------------ receive

    def receive(self, msg: Message) -> list[Output]:
        """Handle one host->node message.

        Returns:
            Outputs in order.  Notifier callbacks are acknowledged with
            ``Ack(ref=msg.id)`` (``InvalidateRangeEnd`` never is); a sleepable
            kind may produce a start's Ack later, from the ``receive`` of the
            ``DmaReply`` that drains it.  Replies to unknown ids (a previous
            session, a duplicate) are ignored.
        Raises:
            Nothing for any well-typed message.
        Concurrency: synchronous.
        """
        receiver = self._receivers.get(type(msg))
        if receiver is None:
            logger.warning("%s: unexpected %s ignored", self.name, msg.TYPE)
            return []
        return receiver(self, msg)

    def _receive_callback(self, msg: ChangePte | ClearFlushYoung | ClearYoung | TestYoung | Release) -> list[Output]:
        """A notifier callback the host awaits an Ack for: handled once (a
        duplicate gets the first Ack again)."""
        answered = self._answered.get(msg.id)
        if answered is not None:
            self.counters["duplicates"] += 1
            return [answered]
        return self._callbacks[type(msg)](self, msg)

    def _receive_reply(self, msg: GupReply | DmaReply | XpmemReply | Ok | Error) -> list[Output]:
        request = self._pending.pop(msg.ref, None) or self._dropped.pop(msg.ref, None)
        if request is None:
            logger.debug("%s: reply to unknown request %d ignored", self.name, msg.ref)
            return []
        return self._reply(request, msg)

    def _receive_error(self, msg: Error) -> list[Output]:
        if not self.ends_session(msg):
            return self._receive_reply(msg)
        # Refused for the epoch it carried: the session is over on the
        # host, whatever request this answers (a heartbeat, a DMA...).
        # Every command in flight fails with EINTR, as for Fenced.
        outputs = self.drop_all(f"{msg.code}: {msg.message}" if msg.message else msg.code)
        self._end_session()
        return outputs

    def _receive_fenced(self, msg: Fenced) -> list[Output]:
        if not self.ends_session(msg):
            logger.info("%s: fence of old epoch %d ignored", self.name, msg.epoch)
            return []
        outputs = self.drop_all(f"fenced: {msg.reason}" if msg.reason else "fenced")
        self._end_session()
        return outputs

    def _receive_registered(self, msg: Registered) -> list[Output]:
        # A new session: the host holds no subscription or pin of ours.
        outputs = self.drop_all("registered anew")
        self.epoch = msg.epoch
        self.session = Session.REGISTERED
        self.page_size = msg.page_size
        self._session_first_id = self._next_id + 1
        return outputs

    def _receive_heartbeat(self, msg: Heartbeat) -> list[Output]:
        return []  # the runtime answers the host's heartbeat; nothing changes here

    def _end_session(self) -> None:
        self.epoch = 0
        self.session = Session.ENDED

    def _reply(self, request: Any, reply: Message) -> list[Output]:
        """Hand ``reply`` to what waited for it (a kind with requests of its
        own extends this)."""
        if isinstance(request, Fault):
            return self._gup_reply(request, reply)
        if isinstance(request, _DmaRequest):
            return self._dma_reply(request, reply)
        if isinstance(request, _SubscribeRequest):
            return self._subscribed(request, reply)
        if isinstance(request, _UnsubscribeRequest):
            return self._unsubscribed(request, reply)
        raise TypeError(f"{self.name}: no handler for a reply to {type(request).__name__}")

    def _ack(self, ref: int, status: str = "ok", young: bool = False, kept: bool = False) -> Ack:
        ack = Ack(ref=ref, status=status, young=young, kept=kept)
        self._answered[ref] = ack
        while len(self._answered) > ANSWERED_CACHE:
            self._answered.popitem(last=False)
        return ack

    def _mm(self, mm: int) -> MmState:
        state = self._mms.get(mm)
        if state is None:
            state = self._mms[mm] = self._new_mm_state(mm)
        return state

    def _new_mm_state(self, mm: int) -> MmState:
        return MmState(mm)

    # -- invalidate_range_start / _end

    def _receive_start(self, msg: InvalidateRangeStart) -> list[Output]:
        if msg.id in self._answered:
            self.counters["duplicates"] += 1
            return [self._answered[msg.id]]
        state = self._mm(msg.mm)
        if msg.id in state.open_starts:  # begun, its ack forgotten or still held
            self.counters["duplicates"] += 1
            return self._duplicate_start(state, msg)
        self.counters["invalidations"] += 1
        return self.invalidate_range_start(state, msg)

    def _duplicate_start(self, state: MmState, msg: InvalidateRangeStart) -> list[Output]:
        """A start delivered again while open: answer, change nothing."""
        return [self._ack(msg.id)]

    def _open_start(self, state: MmState, msg: InvalidateRangeStart) -> None:
        """Record a start as begun; its end will find it by ``start_id``."""
        state.open_starts[msg.id] = (msg.start, msg.end)

    def _receive_end(self, msg: InvalidateRangeEnd) -> list[Output]:
        state = self._mms.get(msg.mm)
        if state is None:
            return []
        start_id = msg.start_id
        if not start_id:  # a host that does not name the start: match the range
            start_id = next(
                (sid for sid, rng in state.open_starts.items() if rng == (msg.start, msg.end)), 0
            )
        rng = state.open_starts.pop(start_id, None)
        if rng is None:  # duplicate end, or the end of a start refused with EAGAIN
            logger.debug("%s: end without open start %d ignored", self.name, start_id)
            return []
        outputs = self.invalidate_range_end(state, start_id, rng)
        return outputs + self._wake(state)

    def _receive_release(self, msg: Release) -> list[Output]:
        state = self._mm(msg.mm)
        outputs = self.release(state)
        # ->release ends the subscription (mmu_notifier_release in mm/mmu_notifier.c
        # unhooks every subscriber); a later fault subscribes again.
        state.subscription = Subscription.NONE
        return [*outputs, self._ack(msg.id)]

    # ---------------------------------------------------- subscriptions

    def subscribe(self, mm: int) -> tuple[int, list[Output]]:
        """``mmu_notifier_register`` on demand (a fault does it implicitly).

        Returns:
            ``(token, outputs)``; the Completion's result is
            ``{"mm", "subscribed": True}``.  Errors from the host: ESRCH (no
            such mm), EINTR (the mm is being torn down).
        """
        token = self._new_token()
        state = self._mm(mm)
        if state.subscribed:
            return token, self._complete(token, {"mm": mm, "subscribed": True})
        state.subscribe_commands.append(token)
        return token, self._send_subscribe(state)

    def _send_subscribe(self, state: MmState) -> list[Output]:
        """The mm's Subscribe, unless one is in flight (its Ok serves all)."""
        if state.subscribe_id:
            return []
        sid = state.subscribe_id = self.next_id()
        state.subscription = Subscription.SUBSCRIBING
        self._pending[sid] = _SubscribeRequest(state, sid)
        return [Subscribe(id=sid, epoch=self.epoch, mm=state.mm)]

    def unsubscribe(self, mm: int) -> tuple[int, list[Output]]:
        """``mmu_notifier_unregister``: the host calls ``->release`` (this
        node drops everything of ``mm``), then nothing more is delivered.

        Returns:
            ``(token, outputs)``; the Completion's result is
            ``{"mm", "subscribed": False}``.
        """
        token = self._new_token()
        state = self._mms.get(mm)
        if state is None or not state.subscribed:
            return token, self._complete(token, {"mm": mm, "subscribed": False})
        uid = self.next_id()
        self._pending[uid] = _UnsubscribeRequest(state, token)
        return token, [Unsubscribe(id=uid, epoch=self.epoch, mm=mm)]

    def _unsubscribed(self, request: _UnsubscribeRequest, reply: Message) -> list[Output]:
        state = request.state
        if isinstance(reply, Ok):
            state.subscription = Subscription.NONE
            return self._complete(request.token, {"mm": state.mm, "subscribed": False})
        err = (kernel_error(reply.code, reply.message) if isinstance(reply, Error)
               else KernelError(Errno.EINVAL, f"unexpected {reply.TYPE} to unsubscribe"))
        return self._complete(request.token, error=err)

    def _subscribed(self, request: _SubscribeRequest, reply: Message) -> list[Output]:
        state = request.state
        if state.subscribe_id != request.sid:  # superseded (release, drop_all)
            return []
        faults, state.subscribing = state.subscribing, []
        commands, state.subscribe_commands = state.subscribe_commands, []
        state.subscribe_id = 0
        outputs: list[Output] = []
        if isinstance(reply, Ok):
            state.subscription = Subscription.SUBSCRIBED
            for token in commands:
                outputs += self._complete(token, {"mm": state.mm, "subscribed": True})
            for f in faults:
                outputs += self._fault_begin(f)
            return outputs
        state.subscription = Subscription.NONE
        err = (
            kernel_error(reply.code, reply.message)
            if isinstance(reply, Error)
            else KernelError(Errno.EINVAL, f"unexpected {reply.TYPE} to subscribe")
        )
        for token in commands:
            outputs += self._complete(token, error=err)
        for f in faults:
            outputs += self._fault_failed(f, err)
        return outputs

    # ---------------------------------------------------------- faults
    #
    # The fault path is the state machine of node/fault.py: every transition
    # is a rule of its TRANSITIONS table; the code below decides which event
    # happened and acts on the state the table gives.

    def fault(self, mm: int, addr: int, npages: int = 1, write: bool = False) -> tuple[int, list[Output]]:
        """A secondary page fault: map ``npages`` pages from ``addr``.

        Returns:
            ``(token, outputs)``.  The Completion's result is
            ``{"mm", "addr", "pages": [[addr, pfn, writable], ...]}`` (the pages
            installed, in the GUP'd mm) plus ``"errno"`` when GUP stopped early.
            Errors: EINVAL (npages), EFAULT/EPERM from the host's GUP, EAGAIN
            after too many discarded replies, EINTR if the node is fenced meanwhile.
        Concurrency: synchronous; completes in a later ``receive``.
        """
        token = self._new_token()
        self.counters["faults"] += 1
        if not 1 <= npages <= self.max_gup_pages:
            return token, self._complete(token, error=KernelError(Errno.EINVAL, f"npages {npages}"))
        try:
            f = self._make_fault(mm, addr, npages, write)
        except KernelError as err:
            return token, self._complete(token, error=err)
        f.token = token
        return token, self._fault_begin(f)

    def _make_fault(self, mm: int, addr: int, npages: int, write: bool) -> Fault:
        """Build the GUP for a fault at ``addr`` of ``mm`` (kind may remap: xpmem)."""
        page = addr - addr % self.page_size
        return Fault(mm=mm, addr=page, npages=npages, write=write)

    def _fault_begin(self, f: Fault) -> list[Output]:
        """Begin ``f``, or begin it again: SUBSCRIBE, PARK or SEND_GUP."""
        state = self._mm(f.mm)
        if not state.subscribed:
            f.fire(FaultEvent.SUBSCRIBE)
            state.subscribing.append(f)
            return self._send_subscribe(state)
        seq = self.read_begin(state, f)
        if seq is None:
            f.fire(FaultEvent.PARK)
            state.parked.append(f)
            return []
        f.fire(_SEND_GUP)
        f.seq = seq
        f.request = self.next_id()
        self._pending[f.request] = f
        self.counters["gups"] += 1
        return [self._gup_request(f, state)]

    def _gup_request(self, f: Fault, state: MmState) -> Message:
        """The request a begun fault sends (``f.request`` is its id): a
        ``Gup``; the hmm kind asks ``hmm_range_fault`` (or migrates) instead."""
        return Gup(id=f.request, epoch=self.epoch, mm=f.mm, addr=f.addr, npages=f.npages, write=f.write, pin=f.pin)

    def _gup_reply(self, f: Fault, reply: Message) -> list[Output]:
        if f.fire(_REPLY) is _FAILED:
            # Failed by a drop while the Gup was on the wire: the host retired
            # that session's pins, and the command already failed with EINTR.
            logger.debug("%s: reply to gup %d of a dropped fault ignored", self.name, f.request)
            return []
        if isinstance(reply, Error):
            return self._fault_failed(f, kernel_error(reply.code, reply.message))
        if not isinstance(reply, GupReply):
            return self._fault_failed(f, KernelError(Errno.EINVAL, f"unexpected {reply.TYPE} to gup"))
        if f.pin:
            self.counters["pins_taken"] += len(reply.pages)
        state = self._mm(f.mm)
        start, end = f.addr, f.addr + f.npages * self.page_size
        if self.read_retry(state, f, start, end):
            # The reply may predate an invalidation that reached us first:
            # mmu_invalidate_retry() says so; drop it and fault again.
            f.fire(FaultEvent.STALE)
            self.counters["stale_replies"] += 1
            outputs: list[Output] = self._unpin(f.mm, [p[1] for p in reply.pages]) if f.pin else []
            f.retries += 1
            if f.retries > self.max_fault_retries:
                return outputs + self._fault_failed(f, KernelError(Errno.EAGAIN, "invalidations kept racing the fault"))
            self.counters["gup_retries"] += 1
            return outputs + self._fault_begin(f)
        # Pages beyond the request (the host's fault-around) pass the same rule
        # one by one; those that fail it are dropped, not retried.  One pass
        # (the pages copied as it goes: the reply stays the host's).
        ps = self.page_size
        pages: list[list[int]] = []
        extra: list[list[int]] = []
        for p in reply.pages:
            if start <= p[0] < end or not self.read_retry(state, f, p[0], p[0] + ps):
                pages.append(list(p))
            else:
                extra.append(p)
        outputs = self._unpin(f.mm, [p[1] for p in extra]) if f.pin and extra else []
        if not pages:
            return outputs + self._fault_failed(f, kernel_error(reply.errno or "EFAULT"))
        f.fire(_INSTALL)
        installed, more = self._fault_install(state, f, pages)
        outputs += more
        return outputs + self._fault_finished(f, installed, kernel_error(reply.errno) if reply.errno else None)

    def _fault_failed(self, f: Fault, err: KernelError) -> list[Output]:
        f.fire(FaultEvent.FAIL)
        return self._fault_finished(f, [], err)

    def _fault_finished(self, f: Fault, pages: list[list[int]], err: KernelError | None) -> list[Output]:
        """Give the outcome of a fault (DONE or FAILED) to what it served: the
        ``fault`` command of ``f.token``, or the access it was taken for."""
        if f.access is not None:
            if err is not None and not pages:
                return self._complete(f.access.token, error=err)
            return self._access_step(f.access)
        if err is not None and not pages:
            return self._complete(f.token, error=err)
        result: dict[str, Any] = {"mm": f.mm, "addr": f.addr, "pages": pages}
        if err is not None:
            result["errno"] = err.errno.value
        return self._complete(f.token, result)

    def _wake(self, state: MmState) -> list[Output]:
        """Re-begin the faults parked on ``state`` (an end closed a range)."""
        parked, state.parked = state.parked, []
        outputs: list[Output] = []
        for f in parked:
            outputs += self._fault_begin(f)
        return outputs

    def _unpin(self, mm: int, pfns: list[int]) -> list[Output]:
        """``unpin_user_pages``: one Unpin per batch (a pfn listed twice drops two pins)."""
        self.counters["pins_released"] += len(pfns)
        return [
            Unpin(id=self.next_id(), epoch=self.epoch, mm=mm, pfns=pfns[i : i + UNPIN_BATCH])
            for i in range(0, len(pfns), UNPIN_BATCH)
        ]

    # ---------------------------------------------------------- accesses

    def access(
        self, mm: int, addr: int, length: int | None = None, write_data: bytes | None = None
    ) -> tuple[int, list[Output]]:
        """Read ``length`` bytes at ``addr`` (or write ``write_data`` there)
        through this node's translations, faulting pages in as needed.

        Split per page; each page is a DmaRead/DmaWrite carrying the page
        address, the pfn the node believes backs it and the offset in the
        frame.  Pages go one after another.

        Returns:
            ``(token, outputs)``; the Completion's result is ``{"data": bytes}``
            for a read, ``{"written": n}`` for a write.  Errors: EINVAL (length),
            the fault's errors, ESTALE if the host's oracle refused a DMA (a bug).
        Concurrency: synchronous; completes in a later ``receive``.
        """
        if write_data is not None:
            length = len(write_data)  # a write's length is its data's
        token = self._new_token()
        self.counters["accesses"] += 1
        if not length or length <= 0:
            return token, self._complete(token, error=KernelError(Errno.EINVAL, "empty access"))
        a = _Access(token, mm, addr, length, write_data)
        return token, self._access_step(a)

    def _access_step(self, a: _Access) -> list[Output]:
        if a.pos >= a.length:
            if a.data is None:
                return self._complete(a.token, {"data": bytes(a.read)})
            return self._complete(a.token, {"written": a.length})
        vaddr = a.addr + a.pos
        offset = vaddr % self.page_size
        n = min(a.length - a.pos, self.page_size - offset)
        write = a.data is not None
        try:
            t = self._translate(a.mm, vaddr, write)
        except KernelError as err:
            return self._complete(a.token, error=err)
        if t is None:
            if a.faults_here >= 2:
                return self._complete(a.token, error=KernelError(Errno.EFAULT, f"no translation for {vaddr:#x}"))
            a.faults_here += 1
            try:
                f = self._make_fault(a.mm, vaddr, 1, write)
            except KernelError as err:
                return self._complete(a.token, error=err)
            f.access = a
            return self._fault_begin(f)
        dma_id = self.next_id()
        self.dma_in_flight[dma_id] = (t.mm, t.addr)
        self._pending[dma_id] = _DmaRequest(a, dma_id, n)
        self.counters["dma"] += 1
        if a.data is None:
            return [DmaRead(id=dma_id, epoch=self.epoch, mm=t.mm, addr=t.addr, pfn=t.pfn, offset=offset, length=n)]
        chunk = a.data[a.pos : a.pos + n]
        return [
            DmaWrite(id=dma_id, epoch=self.epoch, mm=t.mm, addr=t.addr, pfn=t.pfn, offset=offset, data=chunk)
        ]

    def _dma_reply(self, request: _DmaRequest, reply: Message) -> list[Output]:
        a, dma_id, n = request.access, request.dma_id, request.length
        self.dma_in_flight.pop(dma_id, None)
        outputs = self._dma_finished(dma_id)
        if isinstance(reply, Error):
            return outputs + self._complete(a.token, error=kernel_error(reply.code, reply.message))
        if not isinstance(reply, DmaReply):
            err = KernelError(Errno.EINVAL, f"unexpected {reply.TYPE} to dma")
            return outputs + self._complete(a.token, error=err)
        if reply.errno:
            if reply.errno == Errno.ESTALE.value:
                logger.error("%s: host refused a stale access (dma %d)", self.name, dma_id)
            return outputs + self._complete(a.token, error=kernel_error(reply.errno, "dma refused"))
        if a.data is None:
            a.read += reply.data[:n]
        a.pos += n
        a.faults_here = 0
        return outputs + self._access_step(a)

    # ------------------------------------------------------- completion

    def _complete(
        self, token: int, result: dict[str, Any] | None = None, *, error: KernelError | None = None
    ) -> list[Output]:
        if token not in self._open_tokens:  # already failed by drop_all
            return []
        self._open_tokens.discard(token)
        return [Completion(token, None if error is not None else (result or {}), error)]

    # -------------------------------------------------------- drop / status

    def drop_all(self, reason: str = "dropped") -> list[Output]:
        """Forget every translation, pin record, fault and request in flight.

        For FENCED, a new host incarnation, or a new registration: the host
        has retired this session's subscriptions and pins, so nothing is
        unpinned or acknowledged.  Every open command fails with EINTR.

        Returns:
            The failing Completions.
        """
        self.counters["drops"] += 1
        for f in self.faults():
            if f.state is FaultState.GUP_SENT:
                self._dropped[f.request] = f
            f.fire(FaultEvent.DROP)
        while len(self._dropped) > ANSWERED_CACHE:
            self._dropped.popitem(last=False)
        self._drop_kind_state()
        self._mms.clear()
        self._pending.clear()
        self.dma_in_flight.clear()
        self._answered.clear()
        tokens, self._open_tokens = sorted(self._open_tokens), set()
        err = KernelError(Errno.EINTR, reason)
        return [Completion(token, None, err) for token in tokens]

    def shutdown(self) -> tuple[int | None, list[Output]]:
        """A clean shutdown (SIGTERM, ``mmn down``): what the kind hands
        back to the host before the node goes.

        Returns:
            ``(token, outputs)``: ``token`` None when there is nothing to
            wait for (every kind but hmm, which migrates its device-private
            pages back: ``node.hmm.HmmMMU.shutdown``), else the token of the
            Completion that says it is done.
        """
        return None, []

    def faults(self) -> list[Fault]:
        """Every fault the node holds: subscribing, parked, or its Gup in flight
        (``FaultState`` SUBSCRIBING, PARKED, GUP_SENT)."""
        faults = [f for state in self._mms.values() for f in (*state.subscribing, *state.parked)]
        return faults + [r for r in self._pending.values() if isinstance(r, Fault)]

    def mapped_pages(self) -> int:
        """How many page translations the node holds now."""
        raise NotImplementedError

    def translations(self) -> dict[int, dict[int, int]]:
        """``{mm: {page address: pfn}}`` of the host pages this node maps."""
        raise NotImplementedError

    def status(self, mm: int | None = None, cursor: str | None = None, limit: int | None = None) -> dict[str, Any]:
        """A JSON-friendly snapshot for ``mmn status``: keys are strings,
        addresses hex.  Bounded whatever the node maps (``protocol.status``):
        the translations come a page at a time (``mm`` filters, ``cursor``
        continues, ``limit`` pages at most), ``mms_next`` is the rest.

        Raises:
            KernelError(EINVAL): a bad cursor or limit.
        """
        page, rest = page_translations(self.translations(), mm=mm, after=parse_page_cursor(cursor),
                                       limit=check_limit(limit, NODE_PREVIEW))
        subscribed = sorted(m for m, s in self._mms.items() if s.subscribed)
        return {
            "name": self.name,
            "kind": self.kind,
            "epoch": self.epoch,
            "mapped_pages": self.mapped_pages(),
            "mms": page,
            "mms_next": rest,
            "subscribed": subscribed[:LIST_SHOWN],
            "subscribed_total": len(subscribed),
            "in_flight": {"requests": len(self._pending), "dma": len(self.dma_in_flight)},
            # starts begun and not ended (kvm's mmu_invalidate_in_progress, gru's range_active)
            "invalidations_in_progress": sum(len(s.open_starts) for s in self._mms.values()),
            "counters": dict(self.counters),
        }

    def shown_mms(self, mm: int | None = None) -> list[int]:
        """The mms whose per-mm state a status shows: ``mm`` alone, or the
        first :data:`protocol.status.LIST_SHOWN`."""
        if mm is not None:
            return [mm] if mm in self._mms else []
        return sorted(self._mms)[:LIST_SHOWN]

    # ------------------------------------------------------------- kind hooks

    # ---------------------------------------------------------- the ops table
    #
    # struct mmu_notifier_ops, one method per callback.  A kind overrides the
    # ones it implements (that is its ``ops``); the host never sends the
    # others, and the defaults below are the safe answer should one arrive.
    # Every op returns its outputs; all but invalidate_range_end answer with
    # an Ack of the message (a sleepable kind may hold a start's Ack).

    def invalidate_range_start(self, state: MmState, msg: InvalidateRangeStart) -> list[Output]:
        """``invalidate_range_start``: the primary MMU is about to change
        ``[msg.start, msg.end)`` of ``state.mm``.

        Kernel contract (include/linux/mmu_notifier.h): before the start
        returns, the secondary MMU must have dropped every translation of the
        range and must not establish new ones until the matching
        ``invalidate_range_end``; the pages may be freed right after the end,
        so no reference may outlive it.  Starts nest (several ranges may be
        open at once) and every start is paired with exactly one end.  If
        ``msg.blockable`` is false the callback must not sleep; a subscriber
        that would have to answers ``EAGAIN`` and the host ends the others.

        Returns the Ack (``status="EAGAIN"`` to refuse a non-blockable start).
        Call :meth:`_open_start` for a start accepted, so its end finds it.
        """
        self._open_start(state, msg)
        return [self._ack(msg.id)]

    def invalidate_range_end(self, state: MmState, start_id: int, rng: tuple[int, int]) -> list[Output]:
        """``invalidate_range_end``: the change begun by start ``start_id``
        (over ``rng``) is done; translations of the range may be rebuilt.

        Kernel contract: called after the primary page tables were updated and
        the pages possibly freed; paired with exactly one
        ``invalidate_range_start``.  It is never acknowledged.  The base wakes
        the faults parked on the mm once it returns.
        """
        return []

    def change_pte(self, msg: ChangePte) -> list[Output]:
        """``change_pte``: the pte of ``msg.addr`` now maps ``msg.pfn``
        (KSM merging a page, or a COW break).

        Kernel contract: a notification that the primary pte was changed
        in place (``set_pte_at_notify``) to point at a new page; the secondary
        MMU may update its own mapping to the new pfn instead of dropping it.
        Since 3.7 (to 6.9) the host wraps it in ``invalidate_range_start`` /
        ``_end``, so the page is already gone and it finds nothing to change.

        Without the op, the safe answer is to drop the page, as a one-page
        invalidation would (the host sends those instead, so this is a bug's
        path).
        """
        logger.warning("%s: change_pte without the op: dropping the page", self.name)
        self._zap(msg.mm, msg.addr, msg.addr + self.page_size)
        return [self._ack(msg.id)]

    def clear_flush_young(self, msg: ClearFlushYoung) -> list[Output]:
        """``clear_flush_young``: was ``[msg.start, msg.end)`` accessed through
        this secondary MMU since the last check?  Clear the accessed bits and
        flush the secondary TLB, so that the next access is seen.

        Kernel contract: called by page aging (``ptep_clear_flush_young_notify``);
        the answer is OR-ed across subscribers, and a young page is kept.
        Returns ``Ack(young=...)``; without the op: not young.
        """
        return self._not_young(msg)

    def clear_young(self, msg: ClearYoung) -> list[Output]:
        """``clear_young``: as ``clear_flush_young`` but without the TLB flush.

        Kernel contract: cheaper and less exact -- accesses through cached
        translations may be missed until the TLB is flushed otherwise.
        Returns ``Ack(young=...)``; without the op: not young.
        """
        return self._not_young(msg)

    def test_young(self, msg: TestYoung) -> list[Output]:
        """``test_young``: is the range young?  Nothing is cleared.

        Kernel contract: a query only, used to decide whether to age a page;
        the first subscriber that says young answers for all.
        Returns ``Ack(young=...)``; without the op: not young.
        """
        return self._not_young(msg)

    def release(self, state: MmState) -> list[Output]:
        """``release``: the mm is going (exit, or ``mmu_notifier_unregister``);
        drop everything of ``state.mm``.

        Kernel contract: called before the pages of the mm are freed; after it
        returns the secondary MMU must not access the mm's memory any more.  It
        may run concurrently with other callbacks of the same mm.  The base
        ends the subscription and sends the Ack after it.
        """
        return []

    def _not_young(self, msg: ClearFlushYoung | ClearYoung | TestYoung) -> list[Output]:
        logger.warning("%s: %s without the op: not young", self.name, msg.TYPE)
        return [self._ack(msg.id, young=False)]

    def _zap(self, mm: int, start: int, end: int) -> list[Output]:
        """Remove translations of ``[start, end)`` of ``mm``; outputs (xpmem: Unpin)."""
        raise NotImplementedError

    # -- the read side (mmu_interval_read_begin / _read_retry, KVM's
    #    mmu_invalidate_seq and mmu_invalidate_retry)

    def read_begin(self, state: MmState, f: Fault) -> int | None:
        """``mmu_interval_read_begin``: the sequence to send ``f``'s Gup under,
        or None while an invalidation in progress covers ``f`` (the kernel
        sleeps there; the node parks the fault until an end wakes it).
        """
        raise NotImplementedError

    def read_retry(self, state: MmState, f: Fault, start: int, end: int) -> bool:
        """``mmu_interval_read_retry``: must the reply to ``f``, covering
        ``[start, end)``, be discarded because an invalidation may have
        changed those pages since ``read_begin`` gave ``f.seq``?
        """
        raise NotImplementedError

    def _fault_install(
        self, state: MmState, f: Fault, pages: list[list[int]]
    ) -> tuple[list[list[int]], list[Output]]:
        """Install GUP'd pages; returns (pages installed, outputs)."""
        raise NotImplementedError

    def _translate(self, mm: int, vaddr: int, write: bool) -> Translation | None:
        """The translation an access at ``vaddr`` uses, None to fault first.

        Raises:
            KernelError for an access that can never succeed (xpmem: EFAULT
            outside attachments, EACCES writing a read-only one).
        """
        raise NotImplementedError

    def _dma_finished(self, dma_id: int) -> list[Output]:
        """A DMA got its answer (sleepable kinds drain here)."""
        return []

    def _drop_kind_state(self) -> None:
        raise NotImplementedError


SecondaryMMU._bind_receivers()
