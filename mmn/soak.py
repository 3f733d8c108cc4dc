"""``mmn soak``: a seeded, reproducible workload with injected failures,
checked against a shadow model.

What it does::

    schedule = plan(seed, ops, nodes, faults)      pure: random.Random(seed) only
    cluster  = start host + nodes (or --host ADDR)  real processes, loopback
    for group in schedule:                          1-3 ops at once, some injections
        run them concurrently over the admin API    (one mmn.client.AdminClient per lane)
        check every result against the shadow      bytes per (mm, page)
    heal everything, wait for every node, read every page back
    report                                          non-zero exit on any violation

The schedule -- which operations, on which (symbolic) mm, region, page and
node, with which data, and which failure is injected where -- is drawn from
``random.Random(seed)`` over a symbolic model of the address spaces (regions
and page indices, not addresses), before anything runs.  So the same seed
replays the same schedule whatever the timing; ``schedule_digest`` in the
report is its hash.  Only outcomes may differ from run to run (an access to a
node that is hung at that moment fails, another time it succeeds).

The shadow keeps, per (mm, region, page), the set of contents the page may
have: one, except after a write that failed in a way that may or may not have
landed (a node fenced mid-write), until a read tells.  Within a group at most
one operation per mm changes contents or mappings; a read that races it may
see the page before or after, nothing else.  Violations:

* ``stale_accesses``: the host's oracle refused a node's DMA (ESTALE),
* ``wrong_reads``: a read returned bytes the page never legitimately held,
* ``lost_writes``: a read (or the final read-back) returned what a page held
  before an acknowledged write,
* ``unexpected``: a host operation failed that must succeed, an access that
  must fail succeeded, an internal error (EIO of anything but an access:
  that is ``wrong_poison``'s), or a reply never came,
* ``wrong_errors``: a node access (read, write, fault; kvm, gru, hmm or xpmem)
  was denied (EFAULT, EPERM, EACCES) where the shadow says it may not be: a
  page mapped with the protection it needs, no other operation of its
  group changing that (a write's own pages do not excuse it), and for xpmem
  an attachment made in the node's current session -- or failed with an
  errno no failure explains,
* ``unrecovered``: at the end, healed, a node not deliberately killed was
  not live again within its liveness window (heartbeat period x the node's
  liveness); or a node whose connection was reset, nothing else injected,
  was not live again within it,
* ``paused_fences``: a node live with nothing injected lost its session
  over a host pause (the host judges silence only over its own running time),
* ``not_restarted``: after a host crash (``--host-crash``) a node did not
  register with the new host, or registered still holding translations,
* ``late``: an operation finished after its deadline,
* ``wrong_poison``: a page lost with its device served bytes, or an EIO came
  where no device page may be lost (hmm nodes, below).

The failures injected: through ``mmn inject`` (drop-acks, delay-acks,
duplicate, hang, partition, slow-drain, crash), and by the runner itself on
its own cluster: ``reset`` (the kernel destroys a node's TCP connection,
``ss -K``: it needs CAP_NET_ADMIN, and is skipped and counted as
``resets_unavailable`` without it) and ``host-pause`` (SIGSTOP the host past
its liveness window, within the nodes' -- the soak's nodes are more patient
than its host, :data:`NODE_LIVENESS` -- then SIGCONT).  ``--host-crash``
kills the host (-9) now and then and starts a new one on the same ports and
keys; the schedule and the shadow start over on new mms, as every mm died
with the host.

Node failures the injected faults explain -- the node fenced, hung,
restarting or not answering (EINTR, ESRCH, ETIMEDOUT, EAGAIN) -- are
counted as ``node_errors``.  A node write that failed widens the contents
the shadow accepts only where the failure says it may have landed: an
outcome unknown (EINTR, ETIMEDOUT, no reply) on any page; a denial or EAGAIN
of a multi-page kvm/gru write only on the pages before the one that failed
(one DMA per page, in order: those before it did land); never when the node
was not reached (ESRCH) or the write could not start.

XPMEM attachments die with the node's session (a fence, a restart): the
runner knows each node's epoch (from ``status`` before every group with an
xpmem operation, after one that attached or was denied), and an access planned on an attachment of an
earlier session first attaches the same span again in the current one, so
the xpmem data path stays exercised after fences; a detach of one is
skipped.  The schedule itself stays a function of the seed.

Pins and removes (issue 12): ``xpmem_share`` -- one xpmem node makes a
segment and two or more attach it (with a single xpmem node, it attaches it
twice) -- and later ``xpmem_remove`` by its owner, with reads through its
attachments in the same group (in flight: bytes or ENOENT/EFAULT/EACCES).
Once the remove completed, ``xpmem_dead`` accesses through those attachments
must fail (ENOENT: hpc/xpmem's ``xpmem_remove_seg`` -> ``xpmem_clear_PTEs``
reaches every importer); success in the session they were attached in is
``unexpected``.  Half the swaps and migrations of an mm with attachments aim
at an attached span: the pinned pages stay, contents kept.  At the end every
attachment the shadow knows is detached, and the host's ``pages_pinned`` must
equal ``pages_unpinned`` (``pins_leaked``; not judged if an attach's outcome
was never known).  Shared attachments a fence dropped are not attached again.

HMM nodes (issue 15; from the fifth node on, :data:`MIX`): they read, write
and fault as kvm and gru nodes do (dmirror's reads and writes), and
``hmm_migrate`` moves a span's pages to the node's memory (``--to sys``:
back) and ``hmm_exclusive`` makes them device-exclusive (lib/test_hmm.c's
ioctls).  Contents never change by a migration.  The shadow also keeps
where each page may be -- system memory or device pages (the host's
handles, from a snapshot of the span by the node after the group, between
two status calls that show it live in one session) -- and which of those
may be lost: a device page whose node's session ended while it held it is
poisoned by the host, every access to it fails EIO until it is zapped.
An access that succeeds on a page lost through its group, an EIO where no
page may be lost, or at the end host device-page counts outside what the
shadow allows, are ``wrong_poison``.  The final read-back finds every page
whose device is still in its session back in system memory with its bytes,
every lost one EIO.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .supervisor import Child, free_ports, signal_group, spawn, stop_all

log = logging.getLogger(__name__)

KINDS = ("kvm", "gru", "xpmem", "hmm")
#: The kinds of :func:`node_names`, cycled: runs of up to four nodes are what
#: they were before the hmm kind joined (their schedules too); the fifth node
#: is an hmm one.
MIX = ("kvm", "gru", "xpmem", "kvm", "hmm", "xpmem")
#: operations of the hmm kind (lib/test_hmm.c's ioctls), drawn only when the
#: run has an hmm node, with their weights
HMM_OPS = (("hmm_migrate", 4.0), ("hmm_exclusive", 1.0))
#: recent spans migrated to a device, which later operations aim at now and then
HMM_SPANS = 8
#: failure kinds the soak injects, with their weights
INJECTIONS = (
    ("drop-acks", 3),
    ("delay-acks", 3),
    ("duplicate", 3),
    ("hang", 2),
    ("partition", 3),
    ("slow-drain", 2),
    ("crash", 1),
    ("reset", 3),
    ("host-pause", 1),
)
#: Injections only the soak's own cluster can make (it owns the processes):
#: a node's crash, a reset of its TCP connection (``ss -K``), a host pause
#: (SIGSTOP ... SIGCONT).  ``--host`` runs without them.
PROCESS_INJECTIONS = frozenset({"crash", "reset", "host-pause"})
#: A host pause lasts this long (seconds): past the host's liveness window
#: (heartbeat x liveness, 0.8 s), within the nodes' (:data:`NODE_LIVENESS`).
PAUSE_S = (0.85, 1.8)
#: Heartbeats the soak's nodes may miss (their own liveness; the host's is
#: SOAK_HOST's).  Longer than any host pause: a node that drops its session on
#: a host that was merely stopped would lose its xpmem attachments, and the
#: pause would test the nodes' patience instead of the host's judgement.
NODE_LIVENESS = 25
#: With ``--host-crash``: the share of the failure rate (per operation) that
#: kills the host (-9) after the group and starts a new one on the same ports
#: and keys (at ``--faults 0.05``, one operation in a thousand).
HOST_CRASH_SHARE = 0.02
#: host timing for a soak cluster (milliseconds)
SOAK_HOST = {"heartbeat_ms": 100, "liveness": 8, "ack_deadline_ms": 400, "command_timeout_ms": 2000}
SOAK_FRAMES = 16384
MAX_MMS = 5
MAX_PAGES_PER_MM = 48
#: xpmem make/get/attach/detach may fail in these ways under the failures
BENIGN_NODE_ERRNOS = {"ESRCH", "ETIMEDOUT", "EINTR", "EAGAIN", "EFAULT", "EACCES", "EPERM", "EINVAL", "ENOMEM",
                      "EBUSY", "ENOENT"}
#: A node access may fail in these ways whatever the shadow says: the node
#: fenced or restarting meanwhile (EINTR), not live (ESRCH), not answering in
#: time (ETIMEDOUT), invalidations racing its fault past the retries (EAGAIN).
SESSION_ERRNOS = {"EINTR", "ESRCH", "ETIMEDOUT", "EAGAIN"}
#: Denials: only where the shadow says the access cannot succeed.
DENIAL_ERRNOS = {"EFAULT", "EPERM", "EACCES"}
#: A write that failed in one of these ways may have landed anywhere.
UNKNOWN_OUTCOME = {"EINTR", "ETIMEDOUT", "TIMEOUT"}
#: Seconds a node the soak crashed has, after the final heal, to be live again
#: (its supervisor starts a new process: imports, connect, register).
RESTART_S = 30.0
#: The admin client of the runner's own status calls (lanes below it: ops of a group).
STATUS_LANE = 8
#: Node accesses: their failures are checked against the shadow.
ACCESS_OPS = ("node_read", "node_write", "node_fault", "xpmem_read", "xpmem_write")
#: Operations that change contents or mappings: at most one per mm in a group.
MUTATORS = frozenset({"host_write", "node_write", "xpmem_write", "mmap", "munmap", "mprotect", "madvise", "fork",
                      "exit", "hmm_migrate", "hmm_exclusive"})


# --------------------------------------------------------------------------
# the schedule (pure)


@dataclass
class _GRegion:
    npages: int
    mapped: list[bool]
    prot: list[str]
    mergeable: bool


@dataclass
class _GMm:
    regions: dict[int, _GRegion] = field(default_factory=dict)

    def pages(self, fresh: set[int] = frozenset()) -> list[tuple[int, int]]:  # type: ignore[assignment]
        return [(rid, i) for rid, r in self.regions.items() if rid not in fresh for i in range(r.npages)
                if r.mapped[i]]

    def size(self) -> int:
        return sum(r.npages for r in self.regions.values())


@dataclass
class _Attach:
    node: str
    mm: int
    rid: int
    first: int
    npages: int
    write: bool
    #: the shared segment (``xpmem_share``) it imports, None for one made by its own node
    seg: int | None = None


class Planner:
    """Draws the schedule from ``random.Random(seed)`` over symbolic state."""

    def __init__(self, seed: int, nodes: list[tuple[str, str]], faults: float, page_size: int,
                 crash: bool = True, host_crash: bool = False) -> None:
        self.rng = random.Random(seed)
        self.nodes = nodes
        self.faults = faults
        self.ps = page_size
        #: the processes are the soak's own: :data:`PROCESS_INJECTIONS` too
        self.crash = crash
        self.host_crash = host_crash
        self.mms: dict[int, _GMm] = {}
        self.fresh: set[int] = set()  # mms and regions made in the group being drawn
        self.used: set[int] = set()  # mms the group being drawn touches
        self.next_mm = 1
        self.next_rid = 1
        self.next_att = 1
        self.attachments: dict[int, _Attach] = {}
        #: shared segments (``xpmem_share``): seg -> (owner node, its importers' attachment ids)
        self.shares: dict[int, tuple[str, list[int]]] = {}
        self.next_seg = 1
        #: attachments of removed segments: accesses through them must fail
        self.dead: dict[int, _Attach] = {}
        #: spans recently migrated to a device (sid, rid, first, npages): accesses,
        #: migrations back and exclusive access aim at them now and then
        self.hmm_spans: list[tuple[int, int, int, int]] = []

    # -- helpers
    def _new_mm(self) -> int:
        sid = self.next_mm
        self.next_mm += 1
        self.fresh.add(-sid)
        self.mms[sid] = _GMm()
        return sid

    def _mmap(self, sid: int) -> dict[str, Any]:
        rng = self.rng
        n = rng.randint(2, 8)
        rid = self.next_rid
        self.next_rid += 1
        self.fresh.add(rid)
        mergeable = rng.random() < 0.5
        fill = rng.choice([None, 0, 0x41, 0x42, 0x43])
        self.mms[sid].regions[rid] = _GRegion(n, [True] * n, ["rw"] * n, mergeable)
        return {"op": "mmap", "mm": sid, "rid": rid, "pages": n, "fill": fill, "mergeable": mergeable}

    def _page(self, sid: int | None = None) -> tuple[int, int, int] | None:
        choices = [s for s in self.mms if self.mms[s].pages(self.fresh)] if sid is None else [sid]
        if not choices:
            return None
        sid = self.rng.choice(choices)
        pages = self.mms[sid].pages(self.fresh)
        if not pages:
            return None
        rid, i = self.rng.choice(pages)
        return sid, rid, i

    def _span(self, sid: int) -> tuple[int, int, int] | None:
        """A (rid, first, npages) within one region of ``sid``."""
        regions = [rid for rid, r in self.mms[sid].regions.items() if any(r.mapped) and rid not in self.fresh]
        if not regions:
            return None
        rid = self.rng.choice(regions)
        r = self.mms[sid].regions[rid]
        first = self.rng.randrange(r.npages)
        n = self.rng.randint(1, r.npages - first)
        return rid, first, n

    def _reachable(self, at: _Attach) -> list[int]:
        """Indices of the pages of ``at`` an access through it can map."""
        r = self.mms[at.mm].regions[at.rid]
        prots = ("rw",) if at.write else ("r", "rw")
        return [j for j in range(at.npages) if r.mapped[at.first + j] and r.prot[at.first + j] in prots]

    def _window(self) -> tuple[int, int]:
        n = self.rng.randint(1, 48)
        return self.rng.randrange(0, self.ps - n + 1), n

    def _node(self, kinds: tuple[str, ...]) -> str | None:
        names = [n for n, k in self.nodes if k in kinds]
        return self.rng.choice(names) if names else None

    # -- one op
    def op(self, busy: set[int]) -> dict[str, Any] | None:
        """One operation; ``busy``: mms already mutated in this group (an op
        that would mutate one of them is not drawn)."""
        rng = self.rng
        live = [s for s in self.mms if -s not in self.fresh]
        if not live:
            return {"op": "spawn", "mm": self._new_mm()}
        kinds = ["host_write", "host_read", "node_read", "node_write", "node_fault", "xpmem_read", "xpmem_write",
                 "mmap", "munmap", "mprotect", "madvise", "fork", "exit", "merge", "swap", "migrate",
                 "xpmem_attach", "xpmem_detach", "spawn", "xpmem_share", "xpmem_remove", "xpmem_dead"]
        weights = [10, 8, 12, 10, 6, 6, 4, 3, 2, 3, 3, 1.2, 0.6, 1.5, 2, 2, 2.5, 1, 0.5, 1.2, 0.8, 1.0]
        if any(k == "hmm" for _, k in self.nodes):  # (without one, the draws are what they always were)
            kinds += [k for k, _ in HMM_OPS]
            weights += [w for _, w in HMM_OPS]
        kind = rng.choices(kinds, weights)[0]
        mutators = MUTATORS
        if kind == "spawn":
            if len(self.mms) >= MAX_MMS:
                return None
            return {"op": "spawn", "mm": self._new_mm()}
        if kind in ("merge",):
            return {"op": "merge"}
        if kind == "xpmem_remove":
            return self._remove()
        if kind == "xpmem_dead":
            dead = [a for a, at in self.dead.items() if at.mm in self.mms]
            if not dead:
                return None
            aid = rng.choice(dead)
            at = self.dead[aid]
            i = rng.randrange(at.npages)
            off, n = self._window()
            return {"op": "xpmem_dead", "att": aid, "node": at.node, "mm": at.mm, "rid": at.rid,
                    "page": at.first + i, "index": i, "offset": off, "length": n}
        if kind in ("xpmem_read", "xpmem_write", "xpmem_detach"):
            atts = [a for a, at in self.attachments.items() if at.mm in self.mms and -1000000 - a not in self.fresh]
            if not atts:
                return None
            if kind == "xpmem_detach":
                aid = rng.choice(atts)
                at = self.attachments.pop(aid)
                return {"op": "xpmem_detach", "att": aid, "node": at.node}
            # Mostly a page an attachment can reach: mapped, and protected no
            # more than its permit needs (a read-write permit pins writable,
            # even to read).  Now and then any page of any attachment, so the
            # denials the shadow predicts are exercised too.
            reach = {a: self._reachable(self.attachments[a]) for a in atts}
            if kind == "xpmem_write":
                reach = {a: pages for a, pages in reach.items() if self.attachments[a].write}
            reach = {a: pages for a, pages in reach.items() if pages}
            if reach and rng.random() < 0.9:
                aid = rng.choice(sorted(reach))
                i = rng.choice(reach[aid])
            else:
                aid = rng.choice(atts)
                i = rng.randrange(self.attachments[aid].npages)
            at = self.attachments[aid]
            if kind == "xpmem_write" and (at.mm in busy or not at.write):
                return None
            off, n = self._window()
            out = {"op": kind, "att": aid, "node": at.node, "mm": at.mm, "rid": at.rid, "page": at.first + i,
                   "index": i, "offset": off, "length": n}
            if kind == "xpmem_write":
                out["data"] = rng.randbytes(n)
            return out
        sid = rng.choice(live)
        if kind in mutators and sid in busy:
            return None
        m = self.mms[sid]
        if kind == "mmap" or (not m.pages() and kind not in ("exit", "fork")):
            if m.size() >= MAX_PAGES_PER_MM or sid in busy:
                return None
            return self._mmap(sid)
        if kind in ("host_write", "host_read", "node_read", "node_write", "node_fault"):
            pick = self._page(sid)
            if pick is None:
                return None
            _, rid, i = pick
            aimed_page = self._on_device(sid)
            if aimed_page is not None:  # a page a device may hold: it comes back (or is lost)
                rid, i = aimed_page
            off, n = self._window()
            r = m.regions[rid]
            if kind != "node_fault" and rng.random() < 0.4:
                # across pages: a node's access goes page by page, one DMA
                # each, so an invalidation can land in the middle of it
                more = 0
                while more < 3 and i + more + 1 < r.npages and r.mapped[i + more + 1]:
                    more += 1
                more = rng.randint(0, more)
                if more:
                    n = (self.ps - off) + (more - 1) * self.ps + rng.randint(1, self.ps)
            out = {"op": kind, "mm": sid, "rid": rid, "page": i, "offset": off, "length": n}
            if kind in ("node_read", "node_write", "node_fault"):
                out["node"] = self._node(("kvm", "gru", "hmm"))
                if out["node"] is None:
                    return None
            if kind in ("host_write", "node_write"):
                out["data"] = rng.randbytes(n)
            if kind == "node_fault":
                out["pages"] = rng.randint(1, r.npages - i)
                out["write"] = rng.random() < 0.5
            return out
        if kind in ("hmm_migrate", "hmm_exclusive"):
            return self._hmm(kind, sid)
        if kind in ("munmap", "mprotect", "madvise", "swap", "migrate"):
            span = self._span(sid)
            if span is None:
                return None
            rid, first, n = span
            aimed = [at for a, at in self.attachments.items() if at.mm == sid and -1000000 - a not in self.fresh]
            if kind in ("swap", "migrate") and aimed and rng.random() < 0.5:
                # at pages an xpmem attachment pins: they stay where they are
                # (migrate_failed, reclaim_failed), contents and attachment kept
                at = rng.choice(aimed)
                rid, first, n = at.rid, at.first, at.npages
            r = m.regions[rid]
            out = {"op": kind, "mm": sid, "rid": rid, "page": first, "npages": n}
            if kind == "munmap":
                for j in range(first, first + n):
                    r.mapped[j] = False
            elif kind == "mprotect":
                if not all(r.mapped[first:first + n]):
                    return None  # ENOMEM with holes: keep the shadow exact
                prot = rng.choice(["none", "r", "rw", "rw"])
                out["prot"] = prot
                for j in range(first, first + n):
                    r.prot[j] = prot
            elif kind == "madvise":
                if not all(r.mapped[first:first + n]):
                    return None
                out["block"] = rng.random() < 0.7
            return out
        if kind == "fork":
            if len(self.mms) >= MAX_MMS:
                return None
            child = self._new_mm()
            for rid, r in m.regions.items():
                self.mms[child].regions[rid] = _GRegion(r.npages, list(r.mapped), list(r.prot), r.mergeable)
            return {"op": "fork", "mm": sid, "child": child}
        if kind == "exit":
            if len(self.mms) <= 2 or sid in self.used:  # an op of this group on it: keep it
                return None
            del self.mms[sid]
            for aid in [a for a, at in self.attachments.items() if at.mm == sid]:
                del self.attachments[aid]
            for aid in [a for a, at in self.dead.items() if at.mm == sid]:
                del self.dead[aid]
            for seg in [g for g, (_, atts) in self.shares.items() if not any(a in self.attachments for a in atts)]:
                del self.shares[seg]
            return {"op": "exit", "mm": sid}
        if kind == "xpmem_share":
            return self._share(sid)
        if kind == "xpmem_attach":
            node = self._node(("xpmem",))
            span = self._span(sid)
            if node is None or span is None:
                return None
            rid, first, n = span
            write = rng.random() < 0.9
            aid = self.next_att
            self.next_att += 1
            if write:
                self.fresh.add(-1000000 - aid)
                self.attachments[aid] = _Attach(node, sid, rid, first, n, write)
            # else a read-only permit, which xpmem_attach refuses (it always
            # validates for XPMEM_RDWR: EACCES): a denial the shadow predicts,
            # and no attachment for later operations to waste themselves on
            return {"op": "xpmem_attach", "att": aid, "node": node, "mm": sid, "rid": rid, "page": first,
                    "npages": n, "write": write}
        return None

    def _on_device(self, sid: int) -> tuple[int, int] | None:
        """Now and then (a third of the time) a mapped page of a span of
        ``sid`` recently migrated to a device: (rid, page); else None.  No
        draw at all while no span was migrated (a run without hmm nodes)."""
        spans = [(rid, first, n) for s, rid, first, n in self.hmm_spans if s == sid and rid in self.mms[sid].regions]
        if not spans or self.rng.random() >= 1 / 3:
            return None
        rid, first, n = self.rng.choice(spans)
        r = self.mms[sid].regions[rid]
        pages = [j for j in range(first, first + n) if r.mapped[j]]
        return (rid, self.rng.choice(pages)) if pages else None

    def _hmm(self, kind: str, sid: int) -> dict[str, Any] | None:
        """``hmm_migrate`` (to the device, or ``--to sys`` back) or
        ``hmm_exclusive`` of a span of ``sid`` on an hmm node.  Half the
        migrations back and the exclusive accesses aim at a span migrated
        to a device before (any node's)."""
        rng = self.rng
        node = self._node(("hmm",))
        span = self._span(sid)
        if node is None or span is None:
            return None
        rid, first, n = span
        to = "dev" if kind == "hmm_exclusive" else rng.choice(["dev", "dev", "dev", "sys"])
        mine = [(r, f, k) for s, r, f, k in self.hmm_spans if s == sid and r in self.mms[sid].regions]
        if (to == "sys" or kind == "hmm_exclusive") and mine and rng.random() < 0.5:
            rid, first, n = rng.choice(mine)
        out: dict[str, Any] = {"op": kind, "node": node, "mm": sid, "rid": rid, "page": first, "npages": n}
        if kind == "hmm_migrate":
            out["to"] = to
            if to == "dev":
                self.hmm_spans = [*self.hmm_spans, (sid, rid, first, n)][-HMM_SPANS:]
        return out

    def _share(self, sid: int) -> dict[str, Any] | None:
        """A segment one xpmem node makes and two or more get and attach
        (the owner may import its own; with one xpmem node, it attaches it
        twice), so that its remove has several importers
        (``xpmem_remove_seg`` -> ``xpmem_clear_PTEs`` of each)."""
        rng = self.rng
        xp = [n for n, k in self.nodes if k == "xpmem"]
        span = self._span(sid)
        if not xp or span is None:
            return None
        rid, first, n = span
        owner = rng.choice(xp)
        # two nodes or more import it; with one xpmem node, it twice
        importers = rng.sample(xp, rng.randint(2, len(xp))) if len(xp) > 1 else xp * 2
        seg = self.next_seg
        self.next_seg += 1
        atts: list[list[Any]] = []
        for node in importers:
            aid = self.next_att
            self.next_att += 1
            self.fresh.add(-1000000 - aid)
            self.attachments[aid] = _Attach(node, sid, rid, first, n, True, seg)
            atts.append([aid, node])
        self.shares[seg] = (owner, [a for a, _ in atts])
        return {"op": "xpmem_share", "seg": seg, "node": owner, "atts": atts, "mm": sid, "rid": rid, "page": first,
                "npages": n}

    def _remove(self) -> dict[str, Any] | None:
        """Remove of a shared segment; reads through its attachments go with
        it in the group (in flight while it reaches every importer)."""
        segs = [g for g, (_, atts) in self.shares.items() if all(-1000000 - a not in self.fresh for a in atts)
                and any(a in self.attachments for a in atts)]
        if not segs:
            return None
        seg = self.rng.choice(segs)
        owner, atts = self.shares.pop(seg)
        gone = {a: self.attachments.pop(a) for a in atts if a in self.attachments}
        self.dead.update(gone)
        while len(self.dead) > 24:
            del self.dead[min(self.dead)]
        at = next(iter(gone.values()))
        flight = []
        for aid, a in gone.items():
            if self.rng.random() < 0.7:
                i = self.rng.randrange(a.npages)
                off, n = self._window()
                flight.append({"op": "xpmem_read", "att": aid, "node": a.node, "mm": a.mm, "rid": a.rid,
                               "page": a.first + i, "index": i, "offset": off, "length": n, "removing": seg})
        return {"op": "xpmem_remove", "seg": seg, "node": owner, "mm": at.mm, "atts": sorted(gone),
                "flight": flight}

    def race(self, access: dict[str, Any], busy: set[int]) -> dict[str, Any] | None:
        """An operation that invalidates pages ``access`` touches."""
        sid, rid = access["mm"], access["rid"]
        m = self.mms.get(sid)  # (exited later in this group?)
        r = m.regions.get(rid) if m is not None else None
        if r is None:
            return None
        first = access["page"]
        last = first + (access["offset"] + access["length"] - 1) // self.ps
        page = self.rng.randint(first, last)
        if not r.mapped[page]:
            return None
        kind = self.rng.choice(["swap", "migrate", "migrate", "madvise", "mprotect", "munmap"])
        if kind in ("madvise", "mprotect", "munmap"):
            if sid in busy:
                return None
            busy.add(sid)
        out: dict[str, Any] = {"op": kind, "mm": sid, "rid": rid, "page": page, "npages": 1}
        if kind == "munmap":
            r.mapped[page] = False
        elif kind == "mprotect":
            out["prot"] = self.rng.choice(["r", "rw"])
            r.prot[page] = out["prot"]
        elif kind == "madvise":
            out["block"] = True
        return out

    def injection(self) -> dict[str, Any]:
        rng = self.rng
        kinds = [(k, w) for k, w in INJECTIONS if self.crash or k not in PROCESS_INJECTIONS]
        kind = rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        if kind == "host-pause":
            return {"op": "inject", "node": None, "kind": kind, "for_s": round(rng.uniform(*PAUSE_S), 2)}
        want = ("xpmem",) if kind == "slow-drain" else KINDS
        node = self._node(want)
        out: dict[str, Any] = {"op": "inject", "node": node, "kind": kind, "for_s": round(rng.uniform(0.2, 1.2), 2)}
        if kind in ("drop-acks", "delay-acks", "duplicate"):
            out["rate"] = rng.choice([0.3, 1.0])
        if kind in ("delay-acks", "slow-drain"):
            out["delay_ms"] = rng.choice([30, 100, 400])  # 400 > the ack deadline: fenced
        return out

    def groups(self, nops: int) -> Iterator[list[dict[str, Any]]]:
        """The schedule: groups of operations run together; ``nops`` ops in all."""
        rng = self.rng
        yield from self._begin()
        done = 4
        while done < nops:
            size = min(rng.choice([1, 2, 2, 3, 3]), nops - done)
            group: list[dict[str, Any]] = []
            busy: set[int] = set()
            self.fresh = set()
            self.used = set()
            tries = 0
            while len(group) < size and tries < 20:
                tries += 1
                op = self.op(busy)
                if op is None:
                    continue
                if "mm" in op:
                    self.used.add(op["mm"])
                if op["op"] in MUTATORS:
                    busy.add(op["mm"])
                group.append(op)
                group.extend(op.pop("flight", []))
            race = next((o for o in group if o["op"] in ("node_read", "node_write")), None)
            if race is not None and rng.random() < 0.5:
                # an invalidation of the very pages a node is accessing
                twin = self.race(race, busy)
                if twin is not None:
                    group.append(twin)
            for _ in range(len(group)):
                if rng.random() < self.faults:
                    group.append(self.injection())
            done += sum(1 for o in group if o["op"] != "inject")
            if group:
                yield group
            if self.host_crash and done < nops and rng.random() < self.faults * HOST_CRASH_SHARE * len(group):
                # The host is killed and a new one started: every mm is gone
                # (a host crash loses every mm, as a machine crash does), so
                # the schedule starts over on new ones.
                yield [{"op": "host-crash"}]
                self.mms.clear()
                self.attachments.clear()
                self.shares.clear()
                self.dead.clear()
                self.hmm_spans = []
                yield from self._begin()
                done += 4

    def _begin(self) -> Iterator[list[dict[str, Any]]]:
        """Two mms, a region in each (a schedule starts so, and again after a host crash)."""
        self.fresh = set()
        a, b = self._new_mm(), self._new_mm()
        yield [{"op": "spawn", "mm": a}, {"op": "spawn", "mm": b}]
        self.fresh = set()
        yield [self._mmap(a), self._mmap(b)]


def plan(seed: int, nops: int, nodes: list[tuple[str, str]], faults: float, page_size: int = 4096,
         crash: bool = True, host_crash: bool = False) -> list[list[dict[str, Any]]]:
    """The whole schedule for ``seed`` (pure).  ``crash``: the soak's own
    processes (:data:`PROCESS_INJECTIONS` in the mix); ``host_crash``: kill
    the host now and then (``--host-crash``)."""
    return list(Planner(seed, nodes, faults, page_size, crash, host_crash).groups(nops))


def digest(schedule: list[list[dict[str, Any]]]) -> str:
    h = hashlib.sha256()
    for group in schedule:
        h.update(repr([sorted((k, v.hex() if isinstance(v, bytes) else v) for k, v in op.items())
                       for op in group]).encode())
    return h.hexdigest()[:16]


def node_names(n: int) -> list[tuple[str, str]]:
    """``n`` nodes of mixed kinds, :data:`MIX` cycled: kvm0, gru0, xpmem0,
    kvm1, hmm0, xpmem1, kvm2, gru1, ..."""
    seen: Counter[str] = Counter()
    out = []
    for i in range(n):
        kind = MIX[i % len(MIX)]
        out.append((f"{kind}{seen[kind]}", kind))
        seen[kind] += 1
    return out


# --------------------------------------------------------------------------
# a cluster of real processes


class Cluster:
    """A host and nodes as child processes on loopback (:mod:`mmn.supervisor`);
    crashed nodes are started again (as ``mmn up --restart`` would)."""

    def __init__(self, nodes: list[tuple[str, str]], *, seed: int = 0, logs: Path | None = None,
                 host_options: dict[str, int] | None = None, node_env: dict[str, str] | None = None,
                 restart: bool = True, host_args: list[str] | None = None, curve: bool = False,
                 node_liveness: int | None = None) -> None:
        self.nodes = nodes
        self.seed = seed
        self.logs = logs or Path(tempfile.mkdtemp(prefix="mmn-soak-"))
        self.logs.mkdir(parents=True, exist_ok=True)
        self.host_options = {**SOAK_HOST, **(host_options or {})}
        self.node_env = node_env or {}
        #: heartbeats a node may miss (the host's liveness unless given)
        self.node_liveness = node_liveness or self.host_options["liveness"]
        #: more ``mmn host`` flags (``--swap-path P``...)
        self.host_args = list(host_args or [])
        self.ports = free_ports(3)
        self.admin = f"tcp://127.0.0.1:{self.ports[1]}"
        self.node_endpoint = f"tcp://127.0.0.1:{self.ports[0]}"
        #: name -> its child process (the host's is "host")
        self.children: dict[str, Child] = {}
        #: name -> trio clock when its current process was started
        self.spawned: dict[str, float] = {}
        self.restarts = 0
        #: nodes the supervisor started again after their process exited
        self.restarted: set[str] = set()
        self.stopping = False
        self.restart = restart
        self._index = {name: (i, kind) for i, (name, kind) in enumerate(nodes)}
        #: CURVE key directory of every process (``--curve``), None for plain TCP
        self.keys: str | None = None
        if curve:
            from transport.curve import ADMIN_KEY_NAME, keygen

            self.keys = str(self.logs / "keys")
            keygen(self.keys, [name for name, _ in nodes], (ADMIN_KEY_NAME,), overwrite=True)

    @property
    def procs(self) -> dict[str, trio.Process]:
        """name -> its current process."""
        return {name: c.process for name, c in self.children.items() if c.process is not None}

    async def _spawn(self, name: str, argv: list[str], extra: dict[str, str] | None = None) -> None:
        self.spawned[name] = trio.current_time()
        child = self.children.setdefault(name, Child(name, [], self.logs / f"{name}.log"))
        child.argv = [sys.executable, "-m", "mmn", *argv]
        # a soak's own cluster runs on loopback: plain, or CURVE with its own keys (--curve)
        child.env = {"MMN_KEYS_DIR": self.keys, "MMN_LOG_LEVEL": os.environ.get("MMN_LOG_LEVEL", "WARNING"),
                     **(extra or {})}
        await spawn(child)

    def host_argv(self) -> list[str]:
        o = self.host_options
        return ["host", "--node-port", str(self.ports[0]), "--admin-port", str(self.ports[1]),
                "--events-port", str(self.ports[2]), "--frames", str(SOAK_FRAMES),
                "--heartbeat-ms", str(o["heartbeat_ms"]), "--liveness", str(o["liveness"]),
                "--ack-deadline-ms", str(o["ack_deadline_ms"]), "--command-timeout-ms", str(o["command_timeout_ms"]),
                "--log-level", "WARNING", *self.host_args]

    def security(self) -> Any:
        """The CURVE hook of the soak's admin clients (None: plain TCP)."""
        if self.keys is None:
            return None
        from .client import client_security

        return client_security(self.keys, env={})

    def node_argv(self, i: int, name: str, kind: str) -> list[str]:
        return ["node", "--kind", kind, "--name", name, "--host", self.node_endpoint, "--seed",
                str(self.seed * 1000 + i), "--heartbeat-ms", str(self.host_options["heartbeat_ms"]),
                "--liveness", str(self.node_liveness), "--log-level", "WARNING"]

    async def start_host(self) -> None:
        await self._spawn("host", self.host_argv())

    async def start(self, nursery: trio.Nursery, timeout: float = 30.0) -> None:
        await self.start_host()
        for i, (name, kind) in enumerate(self.nodes):
            await self._spawn(name, self.node_argv(i, name, kind), self.node_env)
            if self.restart:
                nursery.start_soon(self._supervise, i, name, kind)
        await self.wait_live(timeout)

    async def restart_node(self, name: str) -> None:
        """Start node ``name`` again (after it was killed)."""
        i, kind = self._index[name]
        await self._spawn(name, self.node_argv(i, name, kind), self.node_env)

    async def _supervise(self, i: int, name: str, kind: str) -> None:
        while not self.stopping:
            proc = self.procs[name]
            await proc.wait()
            if self.stopping:
                return
            log.info("%s exited (%s): starting it again", name, proc.returncode)
            self.restarts += 1
            self.restarted.add(name)
            await self._spawn(name, self.node_argv(i, name, kind), self.node_env)

    async def status(self, timeout: float = 3.0) -> dict[str, Any] | None:
        return await _status(self.admin, self.security(), timeout)

    async def wait_live(self, timeout: float) -> dict[str, Any]:
        want = {n for n, _ in self.nodes}
        with trio.fail_after(timeout):
            while True:
                st = await self.status()
                if st is not None and want <= {n["name"] for n in st["nodes"] if n["state"] == "live"}:
                    return st
                await trio.sleep(0.1)

    async def reset_connection(self, name: str) -> int | None:
        """Reset node ``name``'s TCP connection to the host under it: the
        kernel destroys the node's socket (``ss -K``, SOCK_DESTROY), the node's
        libzmq sees ECONNABORTED and the host's a RST, as when a middlebox or
        a peer's kernel resets a connection; libzmq reconnects by itself.

        Returns:
            How many connections were destroyed (0: the node had none, its
            process restarting), or None when ``ss -K`` may not destroy
            sockets here (it needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY).

        Concurrency: awaits ``ss`` (two or three short child processes).
        """
        proc = self.procs.get(name)
        if proc is None or proc.returncode is not None:
            return 0
        port = self.ports[0]
        ports = await _node_connections(proc.pid, port)
        for local in ports:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                await trio.run_process(["ss", "-K", "-tn", "state", "established", "src", f"127.0.0.1:{local}",
                                        "dst", f"127.0.0.1:{port}"], capture_stdout=True, capture_stderr=True,
                                       check=False)
        if not ports:
            return 0
        left = set(ports) & set(await _node_connections(proc.pid, port))
        return None if left == set(ports) else len(ports) - len(left)

    def kill(self, name: str, sig: int = 9) -> None:
        """Signal the process group of ``name``, if its process is alive."""
        child = self.children.get(name)
        if child is not None and child.alive:
            signal_group(child, sig)

    async def stop(self) -> None:
        """Stop every process (SIGTERM, SIGKILL after 3 s), reaped; also when cancelled."""
        self.stopping = True
        with trio.CancelScope(shield=True):
            await stop_all(list(self.children.values()), grace=3)


async def _node_connections(pid: int, port: int) -> list[int]:
    """Local ports of process ``pid``'s established TCP connections to
    ``127.0.0.1:port``."""
    try:
        out = await trio.run_process(["ss", "-tnpH", "state", "established", "dst", f"127.0.0.1:{port}"],
                                     capture_stdout=True, capture_stderr=True, check=False)
    except OSError:
        return []
    return [int(line.split()[2].rsplit(":", 1)[1]) for line in out.stdout.decode().splitlines()
            if f"pid={pid}," in line]


# --------------------------------------------------------------------------
# running it


@dataclass
class Report:
    seed: int
    ops: int = 0
    groups: int = 0
    injected: int = 0
    injected_by_kind: dict[str, int] = field(default_factory=dict)
    nodes_fenced: int = 0
    nodes_recovered: int = 0
    node_restarts: int = 0
    stale_accesses: int = 0
    lost_writes: int = 0
    wrong_reads: int = 0
    unexpected: int = 0
    late: int = 0
    wrong_errors: int = 0
    unrecovered: int = 0
    node_errors: int = 0
    xpmem_reads: int = 0
    xpmem_reads_ok: int = 0
    xpmem_writes: int = 0
    xpmem_writes_ok: int = 0
    #: accesses planned on an attachment a fence dropped, attached again first
    reattached: int = 0
    #: segments made by one xpmem node and attached by several (``xpmem_share``),
    #: removed with importers; accesses through a removed segment's
    #: attachments, and how many were refused (ENOENT/EFAULT) as they must be
    xpmem_shared: int = 0
    xpmem_removed: int = 0
    dead_accesses: int = 0
    dead_refused: int = 0
    #: at the end, every attachment detached: the host's /proc/xpmem pinned
    #: and unpinned page counters (they must be equal: ``pins_leaked`` otherwise)
    pages_pinned: int = 0
    pages_unpinned: int = 0
    pins_leaked: int = 0
    #: node connections reset under them (``ss -K``); resets ``ss`` was not
    #: allowed to make here (no CAP_NET_ADMIN), skipped
    resets: int = 0
    resets_unavailable: int = 0
    #: host pauses (SIGSTOP ... SIGCONT), and nodes the host fenced over one
    host_pauses: int = 0
    paused_fences: int = 0
    #: host crashes (``--host-crash``): killed, started again; the slowest
    #: restart until every node was registered with the new host; nodes that
    #: were not, or still held something
    host_crashes: int = 0
    host_restart_s: float = 0.0
    not_restarted: int = 0
    #: hmm nodes: pages their migrations moved to device memory, brought
    #: back (``--to sys``), made device-exclusive
    hmm_migrated: int = 0
    hmm_returned: int = 0
    hmm_exclusive: int = 0
    #: device-private pages lost with their node (a fence, a crash: the
    #: host's ``poisoned_pages``), accesses refused EIO for one, and
    #: ``wrong_poison``: an access served a page the shadow knows lost, an
    #: EIO no lost page explains, or the host's device-page counts at the end
    #: outside what the shadow allows
    device_lost: int = 0
    lost_refused: int = 0
    wrong_poison: int = 0
    #: after the final heal: seconds until the last node was live again
    recovery_s: float = 0.0
    slowest: dict[str, Any] = field(default_factory=dict)
    runtime_s: float = 0.0
    schedule_digest: str = ""
    violations: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not (self.stale_accesses or self.lost_writes or self.wrong_reads or self.unexpected or self.late
                    or self.wrong_errors or self.unrecovered or self.paused_fences or self.not_restarted
                    or self.pins_leaked or self.wrong_poison)


@dataclass
class _Dev:
    """A device-private page as the shadow knows it: the hmm node holding
    it, the session it was migrated in (None: not known), and whether it is
    known lost (poisoned: its session ended while the device held it)."""

    node: str
    epoch: int | None
    lost: bool = False
    #: the node's process then (the soak's own cluster; 0: not known): the
    #: host learns of a dead process only later, its session looks current
    #: until then, the device memory is gone already
    pid: int = 0


class HostDied(Exception):
    """The soak's own host process is gone: nothing more to run."""


def _zero(ps: int) -> bytes:
    return bytes(ps)


class Soak:
    def __init__(self, admin: str, schedule: list[list[dict[str, Any]]], nodes: list[tuple[str, str]],
                 report: Report, host_timing: dict[str, int], page_size: int = 4096,
                 cluster: Cluster | None = None, security: Any = None) -> None:
        self.cluster = cluster
        self.security = security
        self.admin = admin
        self.schedule = schedule
        self.nodes = nodes
        self.report = report
        self.ps = page_size
        self.timing = host_timing
        #: symbolic mm -> real mm id
        self.mm: dict[int, int] = {}
        #: (sym mm, rid) -> base address
        self.base: dict[tuple[int, int], int] = {}
        #: (sym mm, rid, page) -> (candidates, history) -- only mapped pages
        self.pages: dict[tuple[int, int, int], set[bytes]] = {}
        self.history: dict[tuple[int, int, int], list[bytes]] = {}
        self.prot: dict[tuple[int, int, int], str] = {}
        self.atts: dict[int, tuple[int, int]] = {}  # att -> (vaddr, exporter offset page)
        #: node -> (epoch, live) as the last ``status`` showed it
        self.epochs: dict[str, tuple[int, bool]] = {}
        #: att -> its xpmem_attach op (to attach the span again after a fence)
        self.att_spec: dict[int, dict[str, Any]] = {}
        #: att -> generation (one per attach); generation -> the epoch of the
        #: session it was made in, None while (or if) that is not certain
        self.att_gen: dict[int, int] = {}
        self.gen_epoch: dict[int, int | None] = {}
        self._gens = 0
        #: generations made in the group running: gen -> (node, epoch seen before)
        self._made: dict[int, tuple[str, int | None]] = {}
        #: id(access op) -> the generation it used
        self._op_gen: dict[int, int] = {}
        #: shared segment -> (segid, owner, owner's epoch when made); the attachments
        #: a remove that succeeded took away (accesses through them must fail)
        self.segids: dict[int, tuple[int, str, int | None]] = {}
        self.removed_atts: set[int] = set()
        #: attach calls whose outcome is unknown (no reply): the end's pin count cannot be exact
        self.unknown_attach = 0
        self.clients: list[Any] = []
        self.trace: Any = None  # a file: one line per operation and outcome
        #: attachments a detach of the group running takes away
        self._detaching: set[int] = set()
        #: attachments a remove of the group running takes away
        self._removing: set[int] = set()
        #: nodes the injections of the group running target (how many each)
        self._targets: Counter[str] = Counter()
        #: seconds every node has to register with a host the soak started
        #: again, once it answers
        self.restart_s = RESTART_S
        #: the host's (fences, registrations) when the run (or its incarnation) began
        self.counts0 = (0, 0)
        #: what hosts the soak crashed counted before they died: fences,
        #: registrations, stale accesses
        self.prior = (0, 0, 0)
        #: device-private pages of hmm nodes: id -> what the shadow knows of it.
        #: Ids >= 1 are the host's handles (a snapshot shows them); < 0 a page
        #: a migration may have moved where no snapshot could tell.
        self.dev: dict[int, _Dev] = {}
        self._unknown_devs = 0
        #: (sym mm, rid, page) -> where its contents may be: 0 system memory,
        #: else a device page id of :attr:`dev`; absent: system memory only
        self.loc: dict[tuple[int, int, int], set[int]] = {}
        self.kind_of = dict(nodes)
        #: of the group running: every node's (epoch, live) as known before it
        #: and as seen right after it ({}: not looked); the pages an hmm
        #: migration of it may move to a device -> that node; page moves and
        #: losses its outcomes show (applied once it is checked); its forks
        self._before: dict[str, tuple[int, bool]] = {}
        self._after: dict[str, tuple[int, bool]] = {}
        #: the nodes' processes (pid, 0 when dead) before and right after it
        self._pids_before: dict[str, int] = {}
        self._pids_after: dict[str, int] = {}
        self._hmm_span: dict[tuple[int, int, int], str] = {}
        self._moves: list[tuple[tuple[int, int, int], str, bool]] = []
        self._learned: list[tuple[int, int, int]] = []
        self._forked: list[tuple[int, int]] = []
        #: poisoned_pages of the hosts the soak crashed, before they died
        self.prior_lost = 0

    # -- the admin API
    async def call(self, lane: int, command: str, args: dict[str, Any], timeout: float) -> tuple[bool, Any, str]:
        """(ok, result or errno, error text); ("TIMEOUT") when no reply came."""
        client = self.clients[lane]
        try:
            reply = await client.admin(command, args, timeout)
        except trio.TooSlowError:
            return False, "TIMEOUT", f"no reply to {command} within {timeout:.1f}s"
        if getattr(reply, "ok", None) is True:
            return True, dict(reply.result), ""
        if hasattr(reply, "errno"):
            return False, reply.errno or "EIO", getattr(reply, "error", "")
        return False, getattr(reply, "code", "EIO"), getattr(reply, "message", "")

    def violation(self, what: str, text: str) -> None:
        setattr(self.report, what, getattr(self.report, what) + 1)
        if len(self.report.violations) < 50:
            self.report.violations.append(f"{what}: {text}")
        log.error("%s: %s", what, text)

    # -- deadlines
    def deadline(self, op: dict[str, Any], group_size: int) -> float:
        ack = self.timing["ack_deadline_ms"] / 1000
        rounds = (len(self.nodes) + 2) * group_size
        d = 1.5 + rounds * ack
        kind = op["op"]
        if kind == "host-crash":
            return 2 * RESTART_S + 10.0  # a new host process up, then every node registered with it
        if kind.startswith(("node_", "xpmem_", "hmm_")):
            d += self.timing["command_timeout_ms"] / 1000
        if kind == "xpmem_attach":
            d *= 3
        if kind in ("merge", "fork", "exit"):
            d *= 2
        return d

    # -- running
    async def run(self) -> None:
        from .client import AdminClient

        async with contextlib.AsyncExitStack() as stack:
            for _ in range(STATUS_LANE + 1):
                self.clients.append(await stack.enter_async_context(AdminClient(self.admin, security=self.security)))
            ok, st, _ = await self.call(0, "status", {}, 10.0)
            self.counts0 = (st["counters"].get("fences", 0), st["counters"].get("registrations", 0)) if ok else (0, 0)
            started = self.t_start = time.monotonic()
            died = False
            try:
                for group in self.schedule:
                    await self.run_group(group)
            except* HostDied:
                died = True
            if not died:
                await self.finish()
            self.report.runtime_s = round(time.monotonic() - started, 1)

    async def run_group(self, group: list[dict[str, Any]]) -> None:
        rep = self.report
        rep.groups += 1
        results: list[Any] = [None] * len(group)
        size = sum(1 for o in group if o["op"] != "inject")

        # a host pause stops everything of the group for its length
        paused = max((float(op["for_s"]) for op in group if op["op"] == "inject" and op["kind"] == "host-pause"),
                     default=0.0)
        self._targets = Counter(op["node"] for op in group if op["op"] == "inject" and op["node"])
        self._detaching = {op["att"] for op in group if op["op"] == "xpmem_detach"}
        self._removing = {a for op in group if op["op"] == "xpmem_remove" for a in op["atts"]}

        async def one(i: int, op: dict[str, Any]) -> None:
            t0 = time.monotonic()
            deadline = self.deadline(op, size) + paused
            results[i] = await self.execute(i, op, deadline * 2)
            took = time.monotonic() - t0
            host = self.cluster.procs.get("host") if self.cluster is not None else None
            if results[i][1] == "TIMEOUT" and host is not None and host.returncode is not None:
                self.violation("unexpected", f"the host exited with status {host.returncode}")
                raise HostDied(host.returncode)
            if self.trace is not None:
                ok, res, err = results[i]
                what = {k: (v.hex()[:8] if isinstance(v, bytes) else v) for k, v in res.items()} if ok else res
                print(f"{rep.groups} {t0 - self.t_start:.3f}+{took:.3f} {_short(op)} -> {ok} {what} {err}",
                      file=self.trace)
            ratio = took / deadline
            if ratio > rep.slowest.get("ratio", 0):
                rep.slowest = {"op": op["op"], "took_s": round(took, 3), "deadline_s": round(deadline, 2),
                               "ratio": round(ratio, 3)}
            if took > deadline:
                self.violation("late", f"{op['op']} took {took:.2f}s, deadline {deadline:.2f}s: {_short(op)}")

        # pre-state of every page a mutator in this group touches
        pre = {k: set(v) for k, v in self.pages.items()}
        self._made = {}
        self._op_gen = {}
        hmm_ops = [op for op in group if op["op"] in ("hmm_migrate", "hmm_exclusive")]
        # (a device page of the group's whose device may have lost it since
        # the last look: look now, so that a page lost before the group is
        # known lost through it)
        unsure = any(d and not self.dev[d].lost for op in group for k in self._op_keys(op) for d in self.loc.get(k, ()))
        if hmm_ops or unsure or any(op["op"] in ("xpmem_attach", "xpmem_read", "xpmem_write", "xpmem_detach", "xpmem_share",
                                       "xpmem_remove", "xpmem_dead") for op in group):
            # the session each attach is made in, and which attachments a
            # fence or a restart dropped since (attached again before use);
            # the session an hmm node migrates pages to its device in
            await self.refresh_epochs()
        self._before, self._after = dict(self.epochs), {}
        self._pids_before, self._pids_after = self._pids(), {}
        self._hmm_span = {k: op["node"] for op in hmm_ops if op["op"] == "hmm_migrate" and op["to"] == "dev"
                          for k in self._span_keys(op)}
        self._moves, self._learned, self._forked = [], [], []
        async with trio.open_nursery() as nursery:
            for i, op in enumerate(group):
                nursery.start_soon(one, i, op)
        denied = any(op["op"].startswith("xpmem_") and not res[0] and res[1] in DENIAL_ERRNOS
                     for op, res in zip(group, results, strict=False))
        if self._made or denied or hmm_ops or any(k in self.loc for op in group for k in self._op_keys(op)):
            # (and whether a device holding a page of the group lost it before, during or after it)
            await self.refresh_epochs()
            self._after = dict(self.epochs)
            self._pids_after = self._pids()
            for gen, (node, before) in self._made.items():
                # made in the session seen before it and still current after it
                self.gen_epoch[gen] = before if before is not None and self.epochs.get(node, (None,))[0] == before \
                    else None
        for op, res in zip(group, results, strict=False):
            kind = op["op"]
            if kind == "xpmem_read":
                rep.xpmem_reads += 1
                rep.xpmem_reads_ok += bool(res[0])
            elif kind == "xpmem_write":
                rep.xpmem_writes += 1
                rep.xpmem_writes_ok += bool(res[0])
            elif kind == "xpmem_dead":
                self.check_dead(op, res)
        # mutators first, then the reads against before-or-after
        mutated: set[tuple[int, int, int]] = set()
        touched: list[set[tuple[int, int, int]]] = [set() for _ in group]
        for i, (op, res) in enumerate(zip(group, results, strict=False)):
            if op["op"] not in ("host_read", "node_read", "xpmem_read", "node_fault"):
                touched[i] = self.apply(op, res)
                mutated |= touched[i]
        for i, (op, res) in enumerate(zip(group, results, strict=False)):
            if op["op"] in ("host_read", "node_read", "xpmem_read", "node_fault"):
                self.check_read(op, res, pre, mutated)
            if op["op"] in ACCESS_OPS and not res[0]:
                # what the other operations of the group changed: a write's
                # own pages do not excuse its own denial
                others = set().union(*(t for j, t in enumerate(touched) if j != i))
                self._access_failed(op, res, others)
            if res[0] or res[1] != "SKIPPED":
                self._moved(op, res)
        self._settle()
        for op, res in zip(group, results, strict=False):
            if op["op"] in ("hmm_migrate", "hmm_exclusive") and res[1] not in ("SKIPPED", "ESRCH"):
                await self.locate(op)  # (ESRCH: the node was not reached, nothing moved)
        rep.ops += size

    def key(self, op: dict[str, Any], page: int | None = None) -> tuple[int, int, int]:
        return op["mm"], op["rid"], op["page"] if page is None else page

    def addr(self, op: dict[str, Any], page: int | None = None) -> int | None:
        base = self.base.get((op["mm"], op["rid"]))
        if base is None:
            return None
        return base + (op["page"] if page is None else page) * self.ps

    async def execute(self, lane: int, op: dict[str, Any], timeout: float) -> tuple[bool, Any, str]:
        kind = op["op"]
        mm = self.mm.get(op.get("mm", 0), 0)
        if kind == "spawn":
            return await self.call(lane, "spawn", {}, timeout)
        if kind == "host-crash":
            return await self.crash_host(lane)
        if kind == "inject":
            self.report.injected += 1
            self.report.injected_by_kind[op["kind"]] = self.report.injected_by_kind.get(op["kind"], 0) + 1
            if op["kind"] == "reset":
                return await self.reset(lane, op["node"])
            if op["kind"] == "host-pause":
                return await self.pause_host(lane, float(op["for_s"]))
            args = {"node": op["node"], "kind": op["kind"], "rate": str(op.get("rate", 1.0)),
                    "delay_ms": op.get("delay_ms", 0), "for_s": str(op["for_s"])}
            return await self.call(lane, "inject", args, timeout)
        if kind == "merge":
            return await self.call(lane, "merge", {"full_scans": 1}, timeout)
        if kind == "mmap":
            args = {"mm": mm, "pages": op["pages"], "mergeable": op["mergeable"]}
            if op["fill"] is not None:
                args["fill"] = op["fill"]
            return await self.call(lane, "mmap", args, timeout)
        if kind == "fork":
            return await self.call(lane, "fork", {"mm": mm}, timeout)
        if kind == "exit":
            return await self.call(lane, "exit", {"mm": mm}, timeout)
        if kind == "xpmem_detach":
            att = self.atts.get(op["att"])
            if att is None:
                return False, "SKIPPED", ""
            if not self._current(op["att"]):
                return False, "SKIPPED", "the attachment went with an earlier session"
            return await self.call(lane, "xpmem", {"node": op["node"], "op": "detach", "addr": att[0]}, timeout)
        if kind == "xpmem_share":
            return await self.share(lane, op, mm, timeout)
        if kind == "xpmem_remove":
            made = self.segids.get(op["seg"])
            if made is None:
                return False, "SKIPPED", "never made"
            res = await self.call(lane, "xpmem", {"node": op["node"], "op": "remove", "segid": made[0]}, timeout)
            if res[0]:
                self.removed_atts |= set(op["atts"])
            return res
        if kind == "xpmem_dead":
            att = self.atts.get(op["att"])
            if att is None or op["att"] not in self.removed_atts:
                return False, "SKIPPED", "not attached, or its remove did not succeed"
            self._op_gen[id(op)] = self.att_gen[op["att"]]
            vaddr = att[0] + op["index"] * self.ps + op["offset"]
            return await self.call(lane, "access", {"node": op["node"], "mm": mm, "addr": vaddr,
                                                    "length": op["length"]}, timeout)
        if kind in ("xpmem_read", "xpmem_write"):
            att = self.atts.get(op["att"])
            if att is None and op["att"] not in self.att_spec:
                return False, "SKIPPED", ""
            if (op.get("removing") or self.att_spec[op["att"]].get("shared")) and not self._current(op["att"]):
                return False, "SKIPPED", "a shared segment's attachment of an earlier session (not attached again)"
            if att is None or not self._current(op["att"]):
                # made in a session that ended since, or never made (its node
                # was down): attach the span in the node's current session
                ok, res, err = await self.reattach(lane, op["att"], timeout)
                if not ok:
                    return False, "SKIPPED", f"attaching again: {res} {err}"
                att = self.atts[op["att"]]
            self._op_gen[id(op)] = self.att_gen[op["att"]]
            vaddr = att[0] + op["index"] * self.ps + op["offset"]
            args = {"node": op["node"], "mm": mm, "addr": vaddr, "length": op["length"]}
            if kind == "xpmem_write":
                args["data"] = op["data"]
            return await self.call(lane, "access", args, timeout)
        addr = self.addr(op)
        if addr is None:
            return False, "SKIPPED", ""
        if kind == "xpmem_attach":
            return await self.attach(lane, op, mm, addr, timeout)
        if kind in ("hmm_migrate", "hmm_exclusive"):
            args = {"node": op["node"], "op": kind[4:], "mm": mm, "addr": addr, "pages": op["npages"],
                    "to": op.get("to", "dev")}
            return await self.call(lane, "hmm", args, timeout)
        if kind == "host_write":
            return await self.call(lane, "write", {"mm": mm, "addr": addr + op["offset"], "data": op["data"]},
                                   timeout)
        if kind == "host_read":
            return await self.call(lane, "read", {"mm": mm, "addr": addr + op["offset"], "length": op["length"]},
                                   timeout)
        if kind == "node_read":
            return await self.call(lane, "access", {"node": op["node"], "mm": mm, "addr": addr + op["offset"],
                                                    "length": op["length"]}, timeout)
        if kind == "node_write":
            return await self.call(lane, "access", {"node": op["node"], "mm": mm, "addr": addr + op["offset"],
                                                    "length": op["length"], "data": op["data"]}, timeout)
        if kind == "node_fault":
            return await self.call(lane, "fault", {"node": op["node"], "mm": mm, "addr": addr,
                                                   "pages": op["pages"], "write": op["write"]}, timeout)
        length = op["npages"] * self.ps
        if kind == "munmap":
            return await self.call(lane, "munmap", {"mm": mm, "addr": addr, "length": length}, timeout)
        if kind == "mprotect":
            return await self.call(lane, "mprotect", {"mm": mm, "addr": addr, "length": length,
                                                      "prot": op["prot"]}, timeout)
        if kind == "madvise":
            return await self.call(lane, "madvise", {"mm": mm, "addr": addr, "length": length,
                                                     "advice": "dontneed", "block": op["block"]}, timeout)
        if kind == "swap":
            return await self.call(lane, "swap", {"mm": mm, "addr": addr, "length": length}, timeout)
        if kind == "migrate":
            return await self.call(lane, "migrate", {"mm": mm, "addr": addr, "length": length}, timeout)
        raise AssertionError(kind)

    # -- the injections the runner makes itself (its own cluster)
    async def _clean(self, lane: int, mine: str | None = None) -> dict[str, int]:
        """Nodes live now with nothing injected nor about to be by this
        group (but the injection running, on ``mine``): name -> epoch."""
        ok, st, _ = await self.call(lane, "status", {}, 5.0)
        if not ok:
            return {}
        return {n["name"]: n["epoch"] for n in st["nodes"]
                if n["state"] == "live" and not n.get("injected")
                and self._targets[n["name"]] <= (n["name"] == mine)}

    def node_window(self) -> float:
        """A node's liveness window: the host's heartbeat period times the
        heartbeats the node may miss."""
        liveness = self.cluster.node_liveness if self.cluster is not None else self.timing.get(
            "liveness", SOAK_HOST["liveness"])
        return self.timing["heartbeat_ms"] * liveness / 1000

    async def reset(self, lane: int, name: str) -> tuple[bool, Any, str]:
        """Reset ``name``'s connection under it; a node that had nothing
        else injected must be live again within its liveness window
        (``unrecovered`` otherwise): it learns it is fenced from the refusal
        of its next heartbeat and registers anew, or the host never noticed
        and the session goes on."""
        assert self.cluster is not None
        clean = await self._clean(lane, name)
        destroyed = await self.cluster.reset_connection(name)
        if destroyed is None:
            self.report.resets_unavailable += 1
            return False, "SKIPPED", "ss -K may not destroy sockets here (CAP_NET_ADMIN)"
        if not destroyed:
            return False, "SKIPPED", f"{name} has no connection (restarting)"
        self.report.resets += 1
        t0 = time.monotonic()
        if name not in clean:
            return True, {"reset": destroyed}, ""
        window = self.node_window()
        while True:
            # Live, and its own part of the status came (relayed to it: over a
            # connection made since, the old one is gone) -- in a new session,
            # or in the old one if the host never noticed.
            ok, st, _ = await self.call(lane, "status", {}, 5.0)
            node: dict[str, Any] = next((n for n in st["nodes"] if n["name"] == name), {}) if ok else {}
            if node.get("state") == "live" and node.get("counters"):
                return True, {"reset": destroyed, "epoch": (clean[name], node.get("epoch")),
                              "back_s": round(time.monotonic() - t0, 3)}, ""
            if time.monotonic() - t0 > window:
                self.violation("unrecovered", f"{name} not live {window:.1f}s after its connection was reset "
                                              f"(state {node.get('state')}, {node.get('fence_reason', '')!r})")
                return True, {"reset": destroyed}, ""
            await trio.sleep(0.05)

    async def pause_host(self, lane: int, seconds: float) -> tuple[bool, Any, str]:
        """Stop the host (SIGSTOP) for ``seconds``, longer than its liveness
        window, then let it run on.  It judges a node's silence only over
        time it was itself running to hear it, so a node that was live and
        had nothing injected keeps its session (its epoch; so its xpmem
        attachments): fenced, it is ``paused_fences``."""
        assert self.cluster is not None
        clean = await self._clean(lane)
        host = self.cluster.children["host"]
        self.report.host_pauses += 1
        signal_group(host, signal.SIGSTOP)
        try:
            await trio.sleep(seconds)
        finally:
            signal_group(host, signal.SIGCONT)
        # Five heartbeat periods of its running time: what it would fence for
        # the pause, it fences at its first tick after it.
        await trio.sleep(5 * self.timing["heartbeat_ms"] / 1000)
        ok, st, err = await self.call(lane, "status", {}, 5.0)
        if not ok:
            return ok, st, err
        now = {n["name"]: n for n in st["nodes"]}
        for name, epoch in sorted(clean.items()):
            n = now.get(name, {})
            if n.get("state") != "live" or n.get("epoch") != epoch:
                self.violation("paused_fences", f"{name} fenced over a host pause of {seconds:.2f}s: state "
                                                f"{n.get('state')}, epoch {epoch} -> {n.get('epoch')} "
                                                f"({n.get('fence_reason', '')!r})")
        return True, {"paused_s": seconds, "kept": len(clean)}, ""

    async def crash_host(self, lane: int) -> tuple[bool, Any, str]:
        """Kill the host (-9) and start a new one on the same ports and
        keys.  Every node must register with the new incarnation holding
        nothing (``not_restarted`` otherwise); the shadow forgets every mm
        (a host crash loses them all), as the schedule does."""
        assert self.cluster is not None
        cluster = self.cluster
        ok, st, _ = await self.call(lane, "status", {}, 5.0)
        if ok:  # what this host counted, before it goes
            c = st["counters"]
            f, r, s = self.prior
            self.prior = (f + c.get("fences", 0) - self.counts0[0], r + c.get("registrations", 0) - self.counts0[1],
                          s + st["stale_accesses"])
        old = st["host"]["incarnation"] if ok else None
        if ok:
            self.prior_lost += st.get("device_private", {}).get("poisoned_pages", 0)
        self.report.host_crashes += 1
        cluster.kill("host", signal.SIGKILL)
        await cluster.procs["host"].wait()
        self.mm.clear()
        self.base.clear()
        self.pages.clear()
        self.history.clear()
        self.prot.clear()
        self.atts.clear()
        self.att_spec.clear()
        self.att_gen.clear()
        self.gen_epoch.clear()
        self.epochs.clear()
        self.loc.clear()  # every device page went with the host's mms
        self.dev.clear()
        t0 = time.monotonic()
        await cluster.start_host()
        self.counts0 = (0, 0)
        names = [name for name, _ in self.nodes]
        first: dict[str, dict[str, Any]] = {}  # each node as the new host first showed it live
        up: float | None = None  # when the new host first answered
        while True:
            ok, st, _ = await self.call(lane, "status", {}, 5.0)
            now = time.monotonic()
            if ok and st["host"]["incarnation"] != old:
                up = now if up is None else up
                for n in st["nodes"]:
                    if n["state"] == "live":
                        first.setdefault(n["name"], n)
                if set(first) >= set(names):
                    break
            # the host has RESTART_S to come up (a process start), the nodes
            # restart_s from then to register with it
            if now - t0 > RESTART_S if up is None else now - up > self.restart_s:
                break
            await trio.sleep(0.05)
        took = time.monotonic() - t0
        self.report.host_restart_s = round(max(self.report.host_restart_s, took), 3)
        if up is None:
            self.violation("not_restarted", f"the new host did not answer {RESTART_S:.0f}s after it was started")
            return True, {"restart_s": round(took, 3), "nodes": 0}, ""
        for name in names:
            n = first.get(name)
            if n is None:
                self.violation("not_restarted", f"{name} not registered with the new host {self.restart_s:.0f}s after "
                                                "it answered")
            elif n.get("mapped_pages") or n.get("invalidations_in_progress") or n.get("mms"):
                self.violation("not_restarted", f"{name} registered with the new host still holding something: "
                                                f"{n.get('mapped_pages')} pages, {n.get('mms')}")
        return True, {"restart_s": round(took, 3), "nodes": len(first)}, ""

    async def attach(self, lane: int, op: dict[str, Any], mm: int, addr: int,
                     timeout: float) -> tuple[bool, Any, str]:
        """make, get, attach of ``op``'s span on its node; a new generation of
        ``op["att"]`` on success, in the session :attr:`epochs` shows now."""
        node = op["node"]
        self.att_spec[op["att"]] = op
        seen = self.epochs.get(node)
        before = seen[0] if seen is not None and seen[1] else None
        ok, res, err = await self.call(lane, "xpmem", {"node": node, "op": "make", "mm": mm, "addr": addr,
                                                       "length": op["npages"] * self.ps, "mode": 0o666},
                                       timeout / 3)
        if not ok:
            return ok, res, err
        ok, res, err = await self.call(lane, "xpmem", {"node": node, "op": "get", "segid": res["segid"],
                                                       "write": op["write"]}, timeout / 3)
        if not ok:
            return ok, res, err
        result = await self.call(lane, "xpmem", {"node": node, "op": "attach", "apid": res["apid"],
                                                 "length": op["npages"] * self.ps}, timeout / 3)
        if result[1] == "TIMEOUT":
            self.unknown_attach += 1
        if result[0]:
            self._gens += 1
            self.att_gen[op["att"]] = self._gens
            self.gen_epoch[self._gens] = before
            self._made[self._gens] = (node, before)
            self.atts[op["att"]] = (result[1]["vaddr"], op["page"])
        return result

    async def share(self, lane: int, op: dict[str, Any], mm: int, timeout: float) -> tuple[bool, Any, str]:
        """``xpmem_share``: make on the owner, then get and attach on each importer."""
        addr = self.addr(op)
        if addr is None:
            return False, "SKIPPED", ""
        owner = op["node"]
        seen = self.epochs.get(owner)
        ok, res, err = await self.call(lane, "xpmem", {"node": owner, "op": "make", "mm": mm, "addr": addr,
                                                       "length": op["npages"] * self.ps, "mode": 0o666},
                                       timeout / 3)
        if not ok:
            return ok, res, err
        segid = res["segid"]
        self.segids[op["seg"]] = (segid, owner, seen[0] if seen is not None and seen[1] else None)
        self.report.xpmem_shared += 1
        attached = 0
        for aid, node in op["atts"]:
            spec = {**op, "op": "xpmem_attach", "att": aid, "node": node, "write": True, "shared": op["seg"]}
            seen = self.epochs.get(node)
            before = seen[0] if seen is not None and seen[1] else None
            got = await self.call(lane, "xpmem", {"node": node, "op": "get", "segid": segid, "write": True},
                                  timeout / 3)
            if not got[0]:
                continue
            result = await self.call(lane, "xpmem", {"node": node, "op": "attach", "apid": got[1]["apid"],
                                                     "length": op["npages"] * self.ps}, timeout / 3)
            if result[1] == "TIMEOUT":
                self.unknown_attach += 1
            if result[0]:
                attached += 1
                self.att_spec[aid] = spec
                self._gens += 1
                self.att_gen[aid] = self._gens
                self.gen_epoch[self._gens] = before
                self._made[self._gens] = (node, before)
                self.atts[aid] = (result[1]["vaddr"], op["page"])
        return True, {"segid": segid, "attached": attached}, ""

    def check_dead(self, op: dict[str, Any], res: tuple[bool, Any, str]) -> None:
        """An access through an attachment of a segment whose remove
        completed: it must fail (ENOENT, the kernel's SIGBUS from
        ``xpmem_ensure_valid_PFN``; EFAULT once detached), never succeed --
        in the session it was attached in (a later session may have a new
        attachment at the same address)."""
        ok, errno, err = res
        if errno == "SKIPPED":
            return
        self.report.dead_accesses += 1
        if ok:
            if self._current(op["att"]):
                self.violation("unexpected", f"{_short(op)} read through an attachment of a removed segment")
        elif errno in ("ENOENT", "EFAULT"):
            self.report.dead_refused += 1
        elif errno == "ESTALE":
            self.violation("stale_accesses", f"{_short(op)}: {err}")
        elif errno in SESSION_ERRNOS:
            self.report.node_errors += 1
        else:
            self.violation("unexpected", f"{_short(op)} failed: {errno} {err}")

    async def reattach(self, lane: int, att: int, timeout: float) -> tuple[bool, Any, str]:
        """The attachment ``att`` went with an earlier session of its node:
        attach the same span again in the current one."""
        await self.refresh_epochs()
        spec = self.att_spec[att]
        seen = self.epochs.get(spec["node"])
        if seen is None or not seen[1]:
            return False, "ESRCH", f"{spec['node']} is not live"
        addr = self.addr(spec)
        if addr is None:
            return False, "SKIPPED", ""
        self.report.reattached += 1
        return await self.attach(lane, spec, self.mm.get(spec["mm"], 0), addr, timeout)

    def _current(self, att: int) -> bool:
        """Was ``att`` made in the session its node is in now (as last seen)?"""
        gen = self.att_gen.get(att)
        epoch = self.gen_epoch.get(gen) if gen is not None else None
        seen = self.epochs.get(self.att_spec[att]["node"]) if att in self.att_spec else None
        return epoch is not None and seen is not None and seen == (epoch, True)

    async def refresh_epochs(self) -> None:
        """Learn every node's epoch and state (its own admin client: any op's
        lane may be busy)."""
        ok, st, _ = await self.call(STATUS_LANE, "status", {}, 5.0)
        if ok:
            self.epochs = {n["name"]: (n["epoch"], n["state"] == "live") for n in st["nodes"]}

    # -- device-private pages (hmm nodes)
    #
    # A page an hmm node migrated to its memory lives only there; if that
    # node's session ends (a fence, a crash) with the page on it, the host
    # poisons it: every access fails EIO until it is unmapped (zapped) --
    # never stale bytes.  Where a page's contents are (:attr:`loc`) changes
    # by migrations (known from a snapshot of the span by the node after the
    # group, between two status calls) and by accesses that bring it back
    # (the CPU's, another node's GUP; the owner's own access keeps it).  A
    # device page's session ended before a group (the status before it
    # says so): lost through the group; still current right after it:
    # alive through it (sessions never come back); else either.
    #
    #   page's possible places        access succeeds     access fails EIO
    #   system memory only            bytes checked       wrong_poison
    #   some device page alive        bytes checked       wrong_poison
    #   every one lost                wrong_poison        lost_refused
    #   any other mix                 bytes checked       lost_refused

    def _op_keys(self, op: dict[str, Any]) -> list[tuple[int, int, int]]:
        """The pages operation ``op`` names."""
        kind = op["op"]
        if "rid" not in op or "page" not in op:
            return []
        if kind == "node_fault":  # (its offset and length are not used)
            return [(op["mm"], op["rid"], op["page"] + j) for j in range(op["pages"])]
        if "length" in op and "offset" in op:
            return [self.key(op, page) for page, *_ in segments(op, self.ps)]
        return [(op["mm"], op["rid"], op["page"] + j) for j in range(op.get("npages", 1))]

    def _span_keys(self, op: dict[str, Any]) -> list[tuple[int, int, int]]:
        return [(op["mm"], op["rid"], op["page"] + j) for j in range(op["npages"])]

    def _pids(self) -> dict[str, int]:
        """Each node's current process (0: dead, or not known: ``--host``)."""
        if self.cluster is None:
            return {}
        return {name: proc.pid if proc.returncode is None else 0 for name, proc in self.cluster.procs.items()}

    def _dev_state(self, d: int) -> str:
        """Device page ``d`` during the group running: "lost" (before it
        began), "alive" (through it: its session current and its process
        the same, before and right after it, and nothing injected on its
        node by the group -- a crash ends the process after the answer), or
        "maybe"."""
        dev = self.dev.get(d)
        if dev is None or dev.epoch is None:
            return "lost" if dev is not None and dev.lost else "maybe"
        if dev.lost:
            return "lost"
        seen = self._before.get(dev.node)
        if seen is not None and seen != (dev.epoch, True):
            return "lost"
        alive = self._after.get(dev.node) == (dev.epoch, True) and not self._targets[dev.node]
        if self.cluster is not None:
            alive = alive and self._pids_before.get(dev.node) == self._pids_after.get(dev.node) == dev.pid != 0
        return "alive" if alive else "maybe"

    def _steady(self, node: str) -> bool:
        """Was ``node`` live in one session and process through the group
        running, nothing injected on it by the group?"""
        seen = self._before.get(node)
        steady = seen is not None and seen[1] and self._after.get(node) == seen and not self._targets[node]
        if self.cluster is not None:
            steady = steady and self._pids_before.get(node) == self._pids_after.get(node) != 0
        return steady

    def _may_lose(self, k: tuple[int, int, int]) -> bool:
        """May page ``k`` be lost with its device during the group running?"""
        if any(d and self._dev_state(d) != "alive" for d in self.loc.get(k, ())):
            return True
        node = self._hmm_span.get(k)
        return node is not None and not self._steady(node)

    def _must_lose(self, k: tuple[int, int, int]) -> bool:
        """Is page ``k`` lost (poisoned) through the group running?"""
        where = self.loc.get(k, set())
        return bool(where) and 0 not in where and all(self._dev_state(d) == "lost" for d in where)

    def _eio(self, op: dict[str, Any], keys: list[tuple[int, int, int]], err: str = "") -> bool:
        """``op`` failed EIO: only a page of ``keys`` lost with its device
        explains it (``wrong_poison`` otherwise)."""
        lost = [k for k in keys if self._may_lose(k)]
        if not lost:
            where = {k[2]: sorted(self.loc.get(k, {0})) for k in keys}
            self.violation("wrong_poison", f"{_short(op)} failed EIO ({err}), and no device holding one of its "
                                           f"pages may have lost it (pages {where}; {self._before} -> {self._after})")
            return False
        self.report.lost_refused += 1
        if len(lost) == 1:
            self._learned.append(lost[0])
        return True

    def _served(self, op: dict[str, Any], keys: list[tuple[int, int, int]],
                mutated: set[tuple[int, int, int]] = frozenset()) -> None:  # type: ignore[assignment]
        """``op`` succeeded on ``keys``: none may be a page lost with its device."""
        for k in keys:
            if k not in mutated and self._must_lose(k):
                owners = sorted({self.dev[d].node for d in self.loc[k]})
                self.violation("wrong_poison", f"{_short(op)} succeeded on page {k[2]}, lost with {owners} "
                                               "(poisoned: EIO)")
                return

    def _moved(self, op: dict[str, Any], res: tuple[bool, Any, str]) -> None:
        """The pages ``op`` brought back to system memory (or may have)."""
        kind = op["op"]
        ok = res[0]
        if kind in ("host_read", "host_write", "node_read", "node_write", "xpmem_read", "xpmem_write", "node_fault"):
            node: str = op["node"] if kind.startswith(("node_", "xpmem_")) else ""
            write = kind.endswith("_write") or (kind == "node_fault" and op["write"])
            keys = self._op_keys(op)
            if kind.startswith("xpmem_"):
                keys = [self.key(op)]
            elif kind == "node_fault" and ok and self.kind_of.get(node) != "hmm":
                keys = keys[:len(res[1].get("pages") or [])]  # GUP stopped where it could not go on
            # an hmm node's write of its own device page fork shares brings
            # it back first; a failed access, what it reached before it failed
            maybe = not ok or (write and self.kind_of.get(node) == "hmm")
            self._moves += [(k, node, maybe) for k in keys]

    def _settle(self) -> None:
        """Fold the group's page moves and losses into :attr:`loc`."""
        back: set[tuple[int, int, int]] = set()
        for k, node, maybe in self._moves:
            where = self.loc.get(k)
            if not where or k not in self.pages:
                continue
            if maybe:
                # what it may have reached came back; a lost page stays lost
                new = set(where) | ({0} if any(d and self._dev_state(d) != "lost" for d in where) else set())
            else:
                # it reached every page: the owner's own device pages stay
                # where they are (dmirror copies them), the rest came back
                own = {d for d in where if d and self.kind_of.get(node) == "hmm" and self.dev[d].node == node}
                new = own | ({0} if where - own else set())
            if new == {0}:
                del self.loc[k]
            else:
                self.loc[k] = new
            back.add(k)
        for parent, child in self._forked:
            for k in back:
                ck = (child, k[1], k[2])
                if k[0] == parent and ck in self.loc:
                    self.loc[ck].add(0)  # forked before or after it came back
        for k in self._learned:
            lost = [d for d in self.loc.get(k, ()) if d and self._dev_state(d) != "alive"]
            if len(lost) == 1 and k not in self._hmm_span:
                self.dev[lost[0]].lost = True
                self.loc[k] = {lost[0]}
        self._moves, self._learned, self._forked = [], [], []

    async def locate(self, op: dict[str, Any]) -> None:
        """After a group with an hmm migration or exclusive access: where
        the pages of its span are now, from a snapshot of them by its node
        (``mmn hmm snapshot``) between two status calls that show the node
        live in the same session; what the snapshot cannot tell, the shadow
        widens."""
        node, sid = op["node"], op["mm"]
        keys = [k for k in self._span_keys(op) if k in self.pages]
        addr = self.addr(op)
        if not keys or addr is None or sid not in self.mm:
            return
        await self.refresh_epochs()
        seen, pid = self.epochs.get(node), self._pids().get(node, 0)
        snap: dict[int, dict[str, Any]] | None = None
        if seen is not None and seen[1]:
            ok, res, _ = await self.call(STATUS_LANE, "hmm", {"node": node, "op": "snapshot", "mm": self.mm[sid],
                                                              "addr": addr, "pages": op["npages"]}, 5.0)
            if ok:
                await self.refresh_epochs()
                if self.epochs.get(node) == seen and self._pids().get(node, 0) == pid:
                    snap = {p["addr"]: p for p in res["pages"]}
        self._before = self._after = dict(self.epochs)
        self._pids_before = self._pids_after = self._pids()
        self._targets = Counter()
        self._hmm_span = {}
        to_dev = op["op"] == "hmm_migrate" and op["to"] == "dev"
        for k in keys:
            where = set(self.loc.get(k, {0}))
            entry = snap.get(addr + (k[2] - op["page"]) * self.ps) if snap is not None else None
            state = entry["state"] if entry is not None else None
            if state is None:  # nothing known: it may have moved
                if to_dev and self.prot.get(k) != "none":
                    self._unknown_devs += 1
                    self.dev[-self._unknown_devs] = _Dev(node, None)
                    where.add(-self._unknown_devs)
                else:
                    where.add(0)
            elif state == "device-private":
                assert seen is not None
                handle = int(entry["pfn"])  # type: ignore[index]
                dev = self.dev.setdefault(handle, _Dev(node, seen[0], pid=pid))
                if dev.node != node or dev.lost or dev.epoch not in (None, seen[0]):
                    self.violation("wrong_poison", f"{node}'s snapshot shows page {k[2]} of {_short(op)} as its "
                                                   f"device page {handle}, which the shadow knows as {dev}")
                dev.epoch, dev.pid = seen[0], pid
                where = {handle}
            elif state == "device-private-remote":
                where = {d for d in where if d and self.dev[d].node != node} or where
            elif state == "error" and self.prot.get(k) != "none":
                lost = {d for d in where if d and self._dev_state(d) != "alive"}
                if not lost:
                    self.violation("wrong_poison", f"{node}'s snapshot shows page {k[2]} of {_short(op)} lost "
                                                   "(error), where the shadow has no device page that may be")
                    continue
                where = lost
                if len(lost) == 1:
                    self.dev[next(iter(lost))].lost = True
            elif state == "error":
                where.add(0)  # PROT_NONE: a snapshot cannot tell; --to sys may have brought it back
            else:  # present in system memory (or device-exclusive, which is a present page)
                if self._must_lose(k):
                    self.violation("wrong_poison", f"{node}'s snapshot shows page {k[2]} of {_short(op)} present "
                                                   f"({state}), though it was lost with its device")
                where = {0}
            if where == {0}:
                self.loc.pop(k, None)
            else:
                self.loc[k] = where
        if self.trace is not None:
            print(f"  locate {_short(op)}: {None if snap is None else [p['state'] for p in snap.values()]}",
                  file=self.trace)

    # -- the shadow
    def _host_failed(self, op: dict[str, Any], res: tuple[bool, Any, str], allowed: tuple[str, ...] = ()) -> bool:
        ok, errno, err = res
        if ok:
            return False
        if errno in allowed:
            return True
        self.violation("unexpected", f"{_short(op)} failed: {errno} {err}")
        return True

    def _node_failed(self, op: dict[str, Any], res: tuple[bool, Any, str]) -> bool:
        ok, errno, err = res
        if ok:
            return False
        if errno == "SKIPPED":
            return True
        if errno == "ESTALE":
            self.violation("stale_accesses", f"{_short(op)}: {err}")
        elif errno == "TIMEOUT" or errno not in BENIGN_NODE_ERRNOS:
            self.violation("unexpected", f"{_short(op)} failed: {errno} {err}")
        else:
            self.report.node_errors += 1
        return True

    def _write_landed(self, op: dict[str, Any], errno: str,
                      keys: list[tuple[int, int, int]]) -> tuple[list[Any], list[Any]]:
        """A node's write failed with ``errno``: (pages it did land on, pages
        it may have landed on).  One DMA per page, in order, each all or
        nothing, the next only once the last was answered."""
        if errno in UNKNOWN_OUTCOME or errno not in SESSION_ERRNOS | DENIAL_ERRNOS | {"SKIPPED", "EIO"}:
            return [], keys  # the outcome is unknown (or the failure is itself a violation)
        if errno in ("ESRCH", "SKIPPED") or op["op"] == "xpmem_write" or len(keys) == 1:
            return [], []  # not reached, or failed before its only DMA
        # a denial, or EAGAIN (a fault racing invalidations past its retries),
        # at some page p: the pages before p landed, p and the rest did not
        if errno == "EAGAIN":
            failing = list(range(len(keys)))
        elif errno == "EIO":  # at a page lost with its device
            failing = [j for j, k in enumerate(keys) if self._may_lose(k)]
            if not failing:
                return [], keys  # an EIO the shadow cannot explain: _eio says so
        else:
            failing = [j for j, k in enumerate(keys) if not self._accessible(k, True)]
            if not failing:
                return [], keys  # a denial the shadow cannot explain: _access_failed says so
        if self.kind_of.get(op.get("node", "")) == "hmm":
            # dmirror_fault asks for the rest of the access at once, and
            # hmm_range_fault fails it whole: the page that failed may be
            # any one up to the last that cannot be had
            return [], keys[:failing[-1]]
        return keys[:failing[0]], keys[failing[0]:failing[-1]]

    def _may_deny(self, op: dict[str, Any], mutated: set[tuple[int, int, int]]) -> bool:
        """May node access ``op`` be denied (EFAULT, EPERM, EACCES)?  Only if
        a page it needs is not mapped with the protection it needs, or its
        group changed one, or (xpmem) its attachment may be gone."""
        kind = op["op"]
        if kind in ("xpmem_read", "xpmem_write"):
            gen = self._op_gen.get(id(op))
            epoch = self.gen_epoch.get(gen) if gen is not None else None
            if epoch is None or self.epochs.get(op["node"], (None,))[0] != epoch:
                return True  # made in a session that may have ended (a fence drops attachments)
            if op["att"] in self._detaching:
                return True  # detached by an operation of its group, maybe first
            k = self.key(op)
            spec = self.att_spec.get(op["att"], {})
            if k in mutated or not spec.get("write", False) and kind == "xpmem_write":
                return True
            # a read-write permit pins writable, even to read (xpmem's GUP)
            return not self._accessible(k, bool(spec.get("write")) or kind == "xpmem_write")
        write = op["write"] if kind == "node_fault" else kind == "node_write"
        return any(k in mutated or not self._accessible(k, write) for k in self._needed(op))

    def _needed(self, op: dict[str, Any]) -> list[tuple[int, int, int]]:
        """The pages a node access cannot do without: a kvm or gru fault's
        first (GUP stops at the first page it cannot map), every page of an
        hmm fault (hmm_range_fault has them all or fails), every page an
        access touches."""
        if op["op"].startswith("xpmem_"):
            return [self.key(op)]
        if op["op"] == "node_fault" and self.kind_of.get(op["node"]) != "hmm":
            return [self.key(op)]
        return self._op_keys(op)

    def _access_failed(self, op: dict[str, Any], res: tuple[bool, Any, str],
                       mutated: set[tuple[int, int, int]]) -> None:
        """A node access failed: is that what the shadow says may happen?"""
        ok, errno, err = res
        if errno == "SKIPPED":
            return
        if errno == "ESTALE":
            self.violation("stale_accesses", f"{_short(op)}: {err}")
        elif errno in SESSION_ERRNOS:
            self.report.node_errors += 1
        elif errno == "EIO" and op["op"] != "xpmem_dead":
            self._eio(op, self._needed(op), err)
        elif errno in ("ENOENT", "EFAULT") and self._segment_may_be_gone(op):
            self.report.node_errors += 1
        elif errno == "EACCES" and (op.get("removing") or op.get("att") in self._removing):
            # A fault racing the remove: its GUP reaches the host after the
            # permit went, which refuses the pin (broker/core.py _gup_fast:
            # EACCES; hpc/xpmem would fail it ENOENT, the segment destroying)
            self.report.node_errors += 1
        elif errno in DENIAL_ERRNOS:
            if self._may_deny(op, mutated):
                self.report.node_errors += 1
            else:
                self.violation("wrong_errors", f"{_short(op)} failed {errno} ({err}) on pages the shadow says "
                                               "are mapped for it" + (", attached in the node's current session"
                                                                      if op["op"].startswith("xpmem") else ""))
        else:
            self.violation("unexpected", f"{_short(op)} failed: {errno} {err}")

    def _segment_may_be_gone(self, op: dict[str, Any]) -> bool:
        """An access through a shared segment's attachment may find it
        removed: removed in this group (in flight), or its owner's session
        ended (its segments go with it), or may have."""
        if op.get("removing") or op.get("att") in self._removing:
            return True
        seg = self.att_spec.get(op.get("att", -1), {}).get("shared")
        if seg is None:
            return False
        made = self.segids.get(seg)
        if made is None or made[2] is None:
            return True
        owner = made[1]
        return self.epochs.get(owner) != (made[2], True) or bool(self._targets[owner])

    def _accessible(self, key: tuple[int, int, int], write: bool) -> bool:
        if key not in self.pages:
            return False
        prot = self.prot.get(key, "rw")
        return prot == "rw" if write else prot in ("r", "rw")

    def apply(self, op: dict[str, Any], res: tuple[bool, Any, str]) -> set[tuple[int, int, int]]:
        """Fold a mutator's outcome into the shadow; returns the pages touched."""
        kind = op["op"]
        ps = self.ps
        touched: set[tuple[int, int, int]] = set()
        if kind == "spawn":
            if not self._host_failed(op, res):
                self.mm[op["mm"]] = res[1]["mm"]
            return touched
        if kind in ("inject", "merge", "swap", "migrate", "host-crash"):
            if kind in ("merge", "swap", "migrate"):
                # Contents stay: a page pinned for xpmem may be left where it
                # is (move_pages' EBUSY), a merge skip it; nothing else fails.
                self._host_failed(op, res, ("EBUSY", "EAGAIN"))
            return touched
        if kind == "mmap":
            if not self._host_failed(op, res):
                self.base[(op["mm"], op["rid"])] = res[1]["addr"]
                content = bytes([op["fill"]]) * ps if op["fill"] is not None else _zero(ps)
                for i in range(op["pages"]):
                    k = (op["mm"], op["rid"], i)
                    self.pages[k] = {content}
                    self.history[k] = []
                    self.prot[k] = "rw"
            return touched
        if kind == "fork":
            if not self._host_failed(op, res):
                parent, child = op["mm"], op["child"]
                self.mm[child] = res[1]["mm"]
                for (sid, rid), base in list(self.base.items()):
                    if sid == parent:
                        self.base[(child, rid)] = base
                for k in [k for k in self.pages if k[0] == parent]:
                    ck = (child, k[1], k[2])
                    self.pages[ck] = set(self.pages[k])
                    self.history[ck] = list(self.history[k])
                    self.prot[ck] = self.prot[k]
                    if k in self.loc:  # fork shares a device page (copy_nonpresent_pte)
                        self.loc[ck] = set(self.loc[k])
                self._forked.append((parent, child))
            return touched
        if kind == "exit":
            if not self._host_failed(op, res):
                for k in [k for k in self.pages if k[0] == op["mm"]]:
                    touched.add(k)
                    del self.pages[k]
                    self.loc.pop(k, None)
            return touched
        if kind in ("hmm_migrate", "hmm_exclusive"):
            self._hmm_done(op, res)
            return touched  # contents stay wherever the pages go
        if kind in ("xpmem_share", "xpmem_remove"):
            if not res[0] and res[1] != "SKIPPED":
                self._node_failed(op, res)
            elif kind == "xpmem_remove" and res[0]:
                self.report.xpmem_removed += 1
            return touched
        if kind == "xpmem_dead":
            return touched  # checked by check_dead
        if kind in ("xpmem_attach",):
            if res[0] and not op["write"]:
                self.violation("unexpected", f"{_short(op)} attached a read-only permit (xpmem_attach validates "
                                             "for XPMEM_RDWR: EACCES)")
            elif res[0]:
                self.atts[op["att"]] = (res[1]["vaddr"], op["page"])
            else:
                self._node_failed(op, res)
            return touched
        if kind == "xpmem_detach":
            self.atts.pop(op["att"], None)
            if not res[0] and res[1] not in ("SKIPPED", "EINVAL", "ESRCH", "EINTR", "ETIMEDOUT"):
                self._node_failed(op, res)
            return touched
        if kind in ("host_write", "node_write", "xpmem_write"):
            segs = segments(op, ps)
            keys = [self.key(op, page) for page, *_ in segs]
            touched.update(keys)
            allowed = all(self._accessible(k, True) for k in keys)
            if res[0] and not allowed:
                self.violation("unexpected", f"{_short(op)} succeeded on a page it may not write")
                return touched
            if res[0]:
                self._served(op, keys)
            if kind == "host_write" and not res[0] and res[1] == "EIO":
                if self._eio(op, keys, res[2]):
                    landed, maybe = self._write_landed(op, "EIO", keys)
                    self._fold_write(op, segs, keys, landed, maybe)
                return touched
            if kind == "host_write":
                if not allowed:
                    self._host_failed(op, res, ("EFAULT", "SKIPPED"))
                    return touched
                if self._host_failed(op, res):
                    return touched
            landed, maybe = (keys, []) if res[0] else self._write_landed(op, res[1], keys)
            self._fold_write(op, segs, keys, landed, maybe)
            return touched
        # range operations
        keys = [(op["mm"], op["rid"], op["page"] + j) for j in range(op["npages"])]
        touched.update(keys)
        if kind == "munmap":
            if not self._host_failed(op, res):
                for k in keys:
                    self.pages.pop(k, None)
                    self.loc.pop(k, None)
        elif kind == "mprotect":
            if not self._host_failed(op, res):
                for k in keys:
                    self.prot[k] = op["prot"]
        elif kind == "madvise":
            if not self._host_failed(op, res, () if op["block"] else ("EAGAIN",)) and res[0]:
                for k in keys:
                    if k in self.pages:
                        self.history[k] = (self.history[k] + list(self.pages[k]))[-6:]
                        self.pages[k] = {_zero(ps)}
                        self.loc.pop(k, None)  # zapped: a device page's reference goes, lost or not
        return touched

    def _fold_write(self, op: dict[str, Any], segs: list[tuple[int, int, int, int]], keys: list[Any],
                    landed: list[Any], maybe: list[Any]) -> None:
        """The contents a write leaves: ``landed`` pages have its bytes,
        ``maybe`` pages may."""
        data = op["data"]
        for (_page, off, n, pos), k in zip(segs, keys, strict=True):
            if k not in self.pages or (k not in landed and k not in maybe):
                continue
            new = {c[:off] + data[pos:pos + n] + c[off + n:] for c in self.pages[k]}
            if k in landed:
                self.history[k] = (self.history[k] + list(self.pages[k]))[-6:]
                self.pages[k] = new
            else:
                self.pages[k] |= new

    def _hmm_done(self, op: dict[str, Any], res: tuple[bool, Any, str]) -> None:
        """The outcome of an hmm migration or exclusive access.  Migrations
        never deny (what cannot move stays: ``migrate_vma_collect_pmd``
        skips it); EIO only if the node's session may have ended meanwhile
        (the device did not take the pages, or could not give one back) or
        (exclusive: it faults each page in for write) a page may be lost;
        an exclusive access is denied only where a page is not mapped
        writable (EFAULT, EPERM: those before it were made exclusive)."""
        ok, errno, err = res
        keys = self._span_keys(op)
        exclusive = op["op"] == "hmm_exclusive"
        if ok:
            if exclusive:
                self.report.hmm_exclusive += int(res[1].get("cpages", 0))
                self._served(op, keys)
            elif op["to"] == "sys":
                self.report.hmm_returned += int(res[1].get("cpages", 0))
            else:
                self.report.hmm_migrated += int(res[1].get("cpages", 0))
            return
        if errno == "SKIPPED":
            return
        if errno in SESSION_ERRNOS:
            self.report.node_errors += 1
        elif errno == "EIO" and not self._steady(op["node"]):
            self.report.node_errors += 1
        elif errno == "EIO" and exclusive:
            self._eio(op, keys, err)
        elif errno in DENIAL_ERRNOS and exclusive:
            if any(not self._accessible(k, True) for k in keys):
                self.report.node_errors += 1
            else:
                self.violation("wrong_errors", f"{_short(op)} failed {errno} ({err}) on pages the shadow says are "
                                               "mapped writable")
        else:
            self.violation("unexpected", f"{_short(op)} failed: {errno} {err}")

    def check_read(self, op: dict[str, Any], res: tuple[bool, Any, str], pre: dict[Any, set[bytes]],
                   mutated: set[tuple[int, int, int]]) -> None:
        kind = op["op"]
        if kind == "node_fault":
            k = self.key(op)
            if not res[0]:
                return  # checked by _access_failed
            if (k not in mutated and not self._accessible(k, op["write"]) and not res[1].get("errno")
                  and res[1].get("pages")):
                self.violation("unexpected", f"{_short(op)} mapped a page it may not: {res[1]}")
            mapped = len(res[1].get("pages") or [])
            keys = self._op_keys(op)
            # hmm_range_fault has every page of the range or fails; GUP stops
            # at the first page it cannot have (a lost one: EIO)
            self._served(op, keys if self.kind_of.get(op["node"]) == "hmm" else keys[:mapped], mutated)
            if res[1].get("errno") == "EIO" and mapped < len(keys):
                self._eio(op, [keys[mapped]])
            return
        segs = segments(op, self.ps)
        keys = [self.key(op, page) for page, *_ in segs]
        racing = any(k in mutated for k in keys)
        if not res[0]:
            if kind == "host_read" and res[1] == "EIO":
                self._eio(op, keys, res[2])
            elif kind == "host_read":
                if not racing and all(self._accessible(k, False) for k in keys):
                    self._host_failed(op, res)
            return  # a node's: checked by _access_failed
        if not all(self._accessible(k, False) or (k in mutated and k in pre) for k in keys):
            self.violation("unexpected", f"{_short(op)} read a page it may not")
            return
        self._served(op, keys, mutated)
        data = res[1].get("data", b"")
        if len(data) != op["length"]:
            self.violation("wrong_reads", f"{_short(op)} read {len(data)} bytes")
            return
        for (page, off, n, pos), k in zip(segs, keys, strict=False):
            got = data[pos:pos + n]
            cands = set(self.pages.get(k, set()))
            if k in mutated:
                cands |= pre.get(k, set())
            if any(c[off:off + n] == got for c in cands):
                if k in self.pages and k not in mutated:
                    self.pages[k] = {c for c in self.pages[k] if c[off:off + n] == got}
                continue
            if any(c[off:off + n] == got for c in self.history.get(k, [])):
                self.violation("lost_writes", f"{_short(op)} page {page} read an overwritten {got[:16].hex()}")
            else:
                self.violation("wrong_reads", f"{_short(op)} page {page} read {got[:16].hex()}, "
                                              f"expected one of {[c[off:off + 16].hex() for c in cands]}")


    async def heal_all(self, names: list[str], timeout: float) -> None:
        async with trio.open_nursery() as nursery:
            for lane, name in enumerate(names):
                nursery.start_soon(self.call, lane % STATUS_LANE, "heal", {"node": name}, timeout)

    async def finish(self) -> None:
        """Heal every node, check each is live again in time, read every page back.

        A node not deliberately killed has its liveness window after the heal
        (a hung or partitioned one finds its Fenced among what was held, and
        registers anew); one the soak crashed, and its supervisor started
        again, has :data:`RESTART_S` to come up.  Either late is ``unrecovered``.
        """
        names = [name for name, _ in self.nodes]
        await self.heal_all(names, 3.0)
        healed = time.monotonic()
        killed = self.cluster.restarted if self.cluster is not None else set()
        window = self.node_window()
        due = {name: healed + (RESTART_S if name in killed else window) for name in names}
        back: dict[str, float] = {}
        last: dict[str, dict[str, Any]] = {}
        while True:
            ok, st, _ = await self.call(STATUS_LANE, "status", {}, 5.0)
            now = time.monotonic()
            if ok:
                last = {n["name"]: n for n in st["nodes"]}
                live = {name for name in names
                        if last.get(name, {}).get("state") == "live" and not last[name].get("injected")}
                for name in live:
                    back.setdefault(name, now)
                if live == set(names):
                    break
                if now > max(due.values()):
                    break
                stuck = [name for name in names if name not in live and last.get(name, {}).get("injected")]
                if stuck:  # a restarted node, or a heal that did not reach it
                    await self.heal_all(stuck, 2.0)
            elif now > max(due.values()):
                break
            await trio.sleep(0.05)
        for name in names:
            if back.get(name, math.inf) > due[name]:
                n = last.get(name, {})
                self.violation("unrecovered", f"{name} not live {due[name] - healed:.1f}s after the heal "
                                              f"(state {n.get('state')}, epoch {n.get('epoch')}, "
                                              f"{n.get('fence_reason', '')!r})")
        if back:
            self.report.recovery_s = round(max(back.values()) - healed, 3)
        # Every node is live now: a device page whose session is the node's
        # current one must read back, one whose session ended must fail EIO.
        await self.refresh_epochs()
        self._before = self._after = dict(self.epochs)
        self._pids_before = self._pids_after = self._pids()
        self._targets = Counter()
        self._hmm_span = {}
        for k in sorted(self.pages):
            sid, rid, page = k
            if self.prot.get(k) not in ("r", "rw"):
                continue
            op = {"op": "host_read", "mm": sid, "rid": rid, "page": page, "offset": 0, "length": self.ps}
            res = await self.execute(0, op, 10.0)
            self.check_read(op, res, {}, set())
            self._moved(op, res)
            self._settle()
        await self.detach_all()
        ok, st, _ = await self.call(0, "status", {}, 10.0)
        if ok:
            c = st["counters"]
            self.report.pages_pinned, self.report.pages_unpinned = c.get("pages_pinned", 0), c.get("pages_unpinned", 0)
            if self.report.pages_pinned != self.report.pages_unpinned and not self.unknown_attach:
                self.violation("pins_leaked", f"every attachment detached, the host counts {self.report.pages_pinned}"
                                              f" pages pinned, {self.report.pages_unpinned} unpinned")
            f, r, s = self.prior  # of the hosts the soak crashed
            self.report.stale_accesses = max(self.report.stale_accesses, s + st["stale_accesses"])
            c = st["counters"]
            # registrations after a fence or a restart (deltas: --host may attach to a used host)
            self.report.nodes_fenced = f + c.get("fences", 0) - self.counts0[0]
            self.report.nodes_recovered = r + c.get("registrations", 0) - self.counts0[1]
            self.final_status = st
            self.check_device_pages(st.get("device_private", {}))

    def check_device_pages(self, device: dict[str, Any]) -> None:
        """At the end, every page read back: the host's device-private
        pages still referenced (``pages``: lost ones, and pages under
        PROT_NONE still on a device) must be what the shadow allows, and it
        must have poisoned (``poisoned_pages``, this host's) at least those
        the shadow knows lost and still mapped."""
        self._before = self._after = dict(self.epochs)
        sure = {next(iter(w)) for k, w in self.loc.items() if k in self.pages and len(w) == 1 and 0 not in w}
        maybe = {d for k, w in self.loc.items() if k in self.pages for d in w if d}
        lost = {d for d in sure if self._dev_state(d) == "lost"}
        held, poisoned = device.get("pages", 0), device.get("poisoned_pages", 0)
        self.report.device_lost = self.prior_lost + poisoned
        if not len(sure) <= held <= len(maybe):
            self.violation("wrong_poison", f"the host holds {held} device-private pages at the end; the shadow "
                                           f"{len(sure)} for sure, {len(maybe)} at most")
        if poisoned < len(lost):
            self.violation("wrong_poison", f"the host poisoned {poisoned} device-private pages, and the shadow "
                                           f"knows {len(lost)} still mapped that were lost")


    async def detach_all(self) -> None:
        """Detach every attachment the shadow says is there (made in the
        node's current session), and release nothing more: a detach unpins
        what it mapped (``xpmem_detach_att``), so afterwards the host's
        pinned and unpinned page counts must agree."""
        await self.refresh_epochs()
        for aid, (vaddr, _) in sorted(self.atts.items()):
            if aid in self.att_spec and self._current(aid):
                node = self.att_spec[aid]["node"]
                res = await self.call(0, "xpmem", {"node": node, "op": "detach", "addr": vaddr}, 10.0)
                if not res[0]:
                    self.violation("unexpected", f"detach of att {aid} on {node} at the end: {res[1]} {res[2]}")
        self.atts.clear()


def segments(op: dict[str, Any], ps: int) -> list[tuple[int, int, int, int]]:
    """``(page, offset in page, length, offset in data)`` of a read or write."""
    out = []
    page, off, left, pos = op["page"], op["offset"], op["length"], 0
    while left > 0:
        n = min(left, ps - off)
        out.append((page, off, n, pos))
        page, off, left, pos = page + 1, 0, left - n, pos + n
    return out


async def _status(admin: str, security: Any, timeout: float) -> dict[str, Any] | None:
    from .client import AdminClient

    try:
        async with AdminClient(admin, security=security) as c:
            reply = await c.admin("status", {}, timeout)
    except (trio.TooSlowError, OSError):
        return None
    return dict(reply.result) if getattr(reply, "ok", False) else None


def _short(op: dict[str, Any]) -> str:
    return " ".join(f"{k}={v.hex()[:16] if isinstance(v, bytes) else v}" for k, v in op.items())


async def soak(seed: int, nops: int, nnodes: int, faults: float, *, host: str | None = None,
               logs: Path | None = None, node_env: dict[str, str] | None = None, keys: str | None = None,
               curve: bool = False, host_crash: bool = False) -> Report:
    """Run one soak; returns its report (``report.ok()``).  ``host_crash``:
    kill the host now and then and start a new one (its own cluster only)."""
    if host_crash and host is not None:
        raise ValueError("--host-crash needs the soak's own cluster, not --host")
    report = Report(seed=seed)
    timing = dict(SOAK_HOST)
    security = None
    async with trio.open_nursery() as nursery:
        cluster = None
        if host is None:
            nodes = node_names(nnodes)
            cluster = Cluster(nodes, seed=seed, logs=logs, node_env=node_env, curve=curve,
                              node_liveness=NODE_LIVENESS)
            security = cluster.security()
            try:
                await cluster.start(nursery)
                admin = cluster.admin
            except BaseException:
                await cluster.stop()
                raise
        else:
            from .client import client_security

            admin = host
            security = client_security(keys)
            st = await _status(host, security, 10.0)
            if st is None:
                raise RuntimeError(f"no host answers at {host}")
            nodes = [(n["name"], n["kind"]) for n in st["nodes"] if n["state"] == "live"][:nnodes]
            timing.update({k: st["host"][k] for k in ("ack_deadline_ms", "heartbeat_ms") if k in st["host"]})
            timing.setdefault("command_timeout_ms", 10_000)
        schedule = plan(seed, nops, nodes, faults, crash=host is None, host_crash=host_crash)
        report.schedule_digest = digest(schedule)
        runner = Soak(admin, schedule, nodes, report, timing, cluster=cluster, security=security)
        trace_dir = logs or (cluster.logs if cluster is not None else None)
        try:
            with contextlib.ExitStack() as files:
                if trace_dir is not None:
                    runner.trace = files.enter_context(open(Path(trace_dir) / "soak.trace", "w"))  # noqa: ASYNC230 - once, before the run
                await runner.run()
        finally:
            if cluster is not None:
                report.node_restarts = cluster.restarts
                await cluster.stop()
            nursery.cancel_scope.cancel()
    return report


# --------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, required=True, help="the schedule's seed (replay it with the same seed)")
    p.add_argument("--ops", type=int, default=1000, metavar="N", help="operations to run (1000)")
    p.add_argument("--nodes", type=int, default=4, metavar="K", help="nodes of mixed kinds (4)")
    p.add_argument("--faults", type=float, default=0.02, metavar="RATE",
                   help="probability per operation of injecting a failure (0.02)")
    p.add_argument("--host", default=None, metavar="ADDR",
                   help="attach to this admin endpoint instead of starting a cluster (no crash injection)")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="with --host: CURVE keys from `mmn keygen` ($MMN_KEYS_DIR), as for every command")
    p.add_argument("--logs", type=Path, default=None, metavar="DIR", help="process logs (a fresh temp dir)")
    p.add_argument("--curve", action="store_true",
                   help="its own cluster on CURVE, keys made in LOGS/keys (default: plain TCP on loopback)")
    p.add_argument("--host-crash", action="store_true",
                   help="now and then kill the host (-9) and start a new one on the same ports and keys: every "
                        "node must register with it holding nothing (not with --host)")
    p.add_argument("--json", action="store_true", help="one JSON document")


def run(ns: argparse.Namespace) -> int:
    if ns.ops < 1 or ns.nodes < 1 or not 0 <= ns.faults <= 1:
        print("mmn soak: --ops and --nodes must be positive, --faults in [0, 1]", file=sys.stderr)
        return 2
    host = ns.host or None
    if host is not None and ns.host_crash:
        print("mmn soak: --host-crash needs the soak's own cluster, not --host", file=sys.stderr)
        return 2
    if host is not None and "://" not in host:
        host = f"tcp://{host}"
    report = trio.run(lambda: soak(ns.seed, ns.ops, ns.nodes, ns.faults, host=host, logs=ns.logs, keys=ns.keys,
                                   curve=ns.curve, host_crash=ns.host_crash))
    out = {k: v for k, v in report.__dict__.items()}
    out["ok"] = report.ok()
    if ns.json:
        print(json.dumps(out, indent=1, sort_keys=True))
    else:
        s = report.slowest
        print(f"seed {report.seed}: {report.ops} operations in {report.groups} groups, {report.runtime_s}s")
        print(f"injected {report.injected} {report.injected_by_kind}")
        print(f"nodes fenced {report.nodes_fenced}, recovered {report.nodes_recovered}, "
              f"restarted {report.node_restarts}; node errors (explained by the failures) {report.node_errors}")
        print(f"xpmem reads ok {report.xpmem_reads_ok}/{report.xpmem_reads}, writes ok "
              f"{report.xpmem_writes_ok}/{report.xpmem_writes}; attached again after a fence {report.reattached}; "
              f"all nodes live {report.recovery_s}s after the final heal")
        print(f"xpmem segments shared {report.xpmem_shared}, removed with importers {report.xpmem_removed}; "
              f"accesses after a remove refused {report.dead_refused}/{report.dead_accesses}; pages pinned "
              f"{report.pages_pinned} unpinned {report.pages_unpinned} (all detached)")
        if report.hmm_migrated or report.hmm_exclusive or report.device_lost:
            print(f"hmm pages migrated to device memory {report.hmm_migrated}, back {report.hmm_returned}, made "
                  f"exclusive {report.hmm_exclusive}; device pages lost with their node {report.device_lost}, "
                  f"accesses to them refused (EIO) {report.lost_refused}")
        print(f"connections reset {report.resets}" + (f" ({report.resets_unavailable} not allowed here: ss -K "
                                                       "needs CAP_NET_ADMIN)" if report.resets_unavailable else "")
              + f", host pauses {report.host_pauses}, host crashes {report.host_crashes}"
              + (f" (slowest restart {report.host_restart_s}s)" if report.host_crashes else ""))
        print(f"stale_accesses {report.stale_accesses}  lost_writes {report.lost_writes}  "
              f"wrong_reads {report.wrong_reads}  wrong_errors {report.wrong_errors}  unexpected {report.unexpected}  "
              f"unrecovered {report.unrecovered}  paused_fences {report.paused_fences}  "
              f"not_restarted {report.not_restarted}  late {report.late}  pins_leaked {report.pins_leaked}  "
              f"wrong_poison {report.wrong_poison}")
        if s:
            print(f"slowest: {s['op']} {s['took_s']}s of its {s['deadline_s']}s deadline")
        for v in report.violations[:20]:
            print("  " + v)
        flags = "".join(f" --{f}" for f, on in (("curve", ns.curve), ("host-crash", ns.host_crash)) if on)
        print(f"{'OK' if report.ok() else 'FAILED'}; replay: mmn soak --seed {report.seed} --ops {ns.ops} "
              f"--nodes {ns.nodes} --faults {ns.faults}{flags}  (schedule {report.schedule_digest})")
    return 0 if report.ok() else 1
