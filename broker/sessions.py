"""Node sessions on the host: registration epochs, liveness, fencing.

Sans-I/O: the shell passes ``now`` (a monotonic clock reading) in.

A node's life on the host::

    (unknown) --register--> live(epoch e) --register again (restart)--> live(e') ; e retired
                               |  \\
                               |   +--missed ack deadline / heartbeats--> fenced (e retired)
                               |                                             |
                               |                                             +--register--> live(e'')
                               +--transport says the peer is gone--> fenced

A retired epoch never comes back: every later message carrying it is refused
with ``Error(code="fenced")`` and the node must drop every translation and
register anew (DESIGN §5).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from protocol.messages import Register
from protocol.types import kind_of_key


class Refused(Exception):
    """A node message that must be refused: ``code`` is ``fenced`` or ``unregistered``."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class SessionState(StrEnum):
    """A session's state; the values are what ``status`` shows."""

    LIVE = "live"
    FENCED = "fenced"


@dataclass(slots=True)
class Session:
    name: str
    kind: str
    ops: frozenset[str]
    sleepable: bool
    epoch: int
    identity: bytes
    incarnation: str
    last_seen: float
    state: SessionState = SessionState.LIVE
    fence_reason: str = ""
    injected: dict[str, Any] = field(default_factory=dict)
    fenced_count: int = 0
    #: the CURVE key that registered it (None without CURVE)
    key: str | None = None


#: Names one node key may hold sessions under (a per-kind key shared by
#: scaled containers registers ``KIND-<container>`` names).
MAX_SESSIONS_PER_KEY = 64
#: Fenced sessions kept for ``status`` (the oldest are forgotten beyond it).
MAX_FENCED = 1024


class Sessions:
    """All node sessions, by name, routing identity and epoch."""

    def __init__(self) -> None:
        self.by_name: dict[str, Session] = {}
        self.by_identity: dict[bytes, str] = {}
        self._epochs = itertools.count(1)
        self.retired: set[int] = set()
        self.fences = 0
        self.registrations = 0
        #: CURVE key -> the node kind it registered first (a key serves one kind)
        self.key_kinds: dict[str, str] = {}

    def admit(self, msg: Register, key: str | None) -> tuple[str, list[str]]:
        """May ``key`` register ``msg``?  Without CURVE (``key`` None) anyone may.

        * A key serves one kind: the kind its name says (``kvm0``, ``kvm``,
          ``kvm-a`` are kvm keys), else the kind it first registered.
        * A live session is replaced (a restart) only by the key that
          registered it.
        * A key holds at most :data:`MAX_SESSIONS_PER_KEY` names: beyond
          that its oldest fenced ones are forgotten, and if all are live the
          registration is refused.

        Returns:
            ``(problem, forget)``: why it is refused ("" if it is not), and
            the fenced sessions to forget first to make room.
        """
        if key is None:
            return "", self._overflow(msg.name)
        kind = kind_of_key(key) or self.key_kinds.get(key)
        if kind is not None and kind != msg.kind:
            return f"key {key!r} is a {kind} key, not a {msg.kind} one", []
        old = self.by_name.get(msg.name)
        if old is not None and old.state == SessionState.LIVE and old.key != key:
            return f"{msg.name} is live under another key", []
        mine = [s for s in self.by_name.values() if s.key == key and s.name != msg.name]
        forget: list[str] = []
        if len(mine) >= MAX_SESSIONS_PER_KEY:
            fenced = sorted((s for s in mine if s.state != SessionState.LIVE), key=lambda s: s.last_seen)
            need = len(mine) - MAX_SESSIONS_PER_KEY + 1
            if len(fenced) < need:
                return f"key {key!r} already holds {len(mine)} live sessions", []
            forget = [s.name for s in fenced[:need]]
        return "", forget + [n for n in self._overflow(msg.name) if n not in forget]

    def _overflow(self, name: str) -> list[str]:
        """The oldest fenced sessions beyond :data:`MAX_FENCED`."""
        fenced = [s for s in self.by_name.values() if s.state != SessionState.LIVE and s.name != name]
        if len(fenced) < MAX_FENCED:
            return []
        fenced.sort(key=lambda s: s.last_seen)
        return [s.name for s in fenced[: len(fenced) - MAX_FENCED + 1]]

    def forget(self, name: str) -> None:
        """Drop a fenced session from the table (its epoch stays retired)."""
        session = self.by_name.pop(name, None)
        if session is not None and self.by_identity.get(session.identity) == name:
            del self.by_identity[session.identity]

    def register(self, identity: bytes, msg: Register, now: float, key: str | None = None
                 ) -> tuple[Session, Session | None]:
        """A node (re)registers.

        Returns:
            The new live session, and the old one of the same name if it was
            still live (the caller fences it: a restarted node's previous
            incarnation must not keep anything).
        """
        old = self.by_name.get(msg.name)
        previous = old if old is not None and old.state == SessionState.LIVE else None
        if old is not None:
            self.retired.add(old.epoch)
            self.by_identity.pop(old.identity, None)
        # Another name on this identity (a node renamed itself): retire it too.
        other = self.by_identity.get(identity)
        if other is not None and other != msg.name:
            stale = self.by_name.get(other)
            if stale is not None and stale.state == SessionState.LIVE:
                stale.state = SessionState.FENCED
                stale.fence_reason = "identity re-registered under another name"
                self.retired.add(stale.epoch)
        session = Session(
            name=msg.name,
            kind=msg.kind,
            ops=frozenset(msg.ops),
            sleepable=msg.sleepable,
            epoch=next(self._epochs),
            identity=identity,
            incarnation=msg.incarnation,
            last_seen=now,
            injected=dict(old.injected) if old is not None else {},
            fenced_count=old.fenced_count if old is not None else 0,
            key=key,
        )
        if key is not None:
            self.key_kinds.setdefault(key, msg.kind)
        self.by_name[msg.name] = session
        self.by_identity[identity] = msg.name
        self.registrations += 1
        return session, previous

    def lookup(self, identity: bytes, epoch: int | None = None) -> Session:
        """The live session behind ``identity`` (and ``epoch``, if given).

        Raises:
            Refused: ``fenced`` for a retired epoch or a fenced session,
                ``unregistered`` for an identity that never registered.
        """
        if epoch is not None and epoch in self.retired:
            raise Refused("fenced", f"epoch {epoch} was retired; register again")
        name = self.by_identity.get(identity)
        if name is None:
            raise Refused("unregistered", "register first")
        session = self.by_name[name]
        if session.state != SessionState.LIVE:
            raise Refused("fenced", f"{name} was fenced ({session.fence_reason}); register again")
        if epoch is not None and epoch != session.epoch:
            raise Refused("fenced", f"epoch {epoch} is not the current one")
        return session

    def touch(self, identity: bytes, now: float) -> None:
        """Any traffic counts as a heartbeat."""
        name = self.by_identity.get(identity)
        if name is not None:
            self.by_name[name].last_seen = now

    def fence(self, name: str, reason: str) -> Session | None:
        """Retire ``name``'s epoch.  Returns the session if it was live."""
        session = self.by_name.get(name)
        if session is None or session.state != SessionState.LIVE:
            return None
        session.state = SessionState.FENCED
        session.fence_reason = reason
        session.fenced_count += 1
        self.retired.add(session.epoch)
        self.fences += 1
        return session

    def live(self) -> list[Session]:
        return [s for s in self.by_name.values() if s.state == SessionState.LIVE]

    def silent(self, now: float, liveness: float) -> list[Session]:
        """Live sessions not heard from for more than ``liveness`` seconds."""
        return [s for s in self.live() if now - s.last_seen > liveness]
