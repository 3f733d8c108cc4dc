"""The whole system under hypothesis: a RuleBasedStateMachine over LocalCluster.

Rules interleave address-space operations (spawn, mmap private -- sometimes
MERGEABLE --, munmap, mprotect, madvise DONTNEED, fork, exit), host reads and
writes, node faults and accesses of all four kinds (xpmem through
make/get/attach on a segment; hmm through its interval notifier, with
device-private migration and device-exclusive entries), KSM scans, reclaim,
migration (also aimed at a page an xpmem attachment pins: the pin holds, the
page stays), fencing, and invalidations held open (``begin``/``finish``) while
a node access races them (for hmm: its read_begin/read_retry against them).

Device-private pages of a fenced hmm node are lost with it: such a page
must fail every access with EIO (``poisoned``), never serve bytes; a page
that serves bytes must serve the shadow's.

After every step: zero stale accesses, the model's invariants, and, when the
cluster is quiet, no live node holding a translation the primary does not back
and the pins the xpmem node holds equal to the frames' pin counts.  Every byte
read by the host or a node equals a shadow model (bytes per (mm, page); fork
copies the parent's shadow, DONTNEED zeroes, munmap and exit forget).  At
teardown every mm exits and every node is fenced: no frame, swap slot or pin
is left.

Kernel errors are expected only where the kernel gives them (see
:func:`expected_host_error` and :func:`expected_node_error`).

Reproducible: derandomized, no example database.  Budget: 1,000 examples of up
to 40 steps; ``HYPOTHESIS_PROFILE=long`` runs 20,000, ``MMN_STATEFUL_EXAMPLES`` any number.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker.pagetable import PTE_DEVICE, PTE_SHIFT
from mmnotify.local import LocalCluster
from protocol.types import Errno, KernelError

PS = 4096
FRAMES = 512
SWAP_SLOTS = 512
MAX_MMS = 4
MAX_PAGES_PER_MM = 12
#: CI's budget; ``HYPOTHESIS_PROFILE=long`` for a nightly-style run; MMN_STATEFUL_EXAMPLES overrides both.
PROFILES = {"ci": 1000, "long": 20_000}
EXAMPLES = int(os.environ.get("MMN_STATEFUL_EXAMPLES",
                              PROFILES.get(os.environ.get("HYPOTHESIS_PROFILE", "ci"), PROFILES["ci"])))

#: Few distinct patterns at few offsets, so identical pages (KSM) are common.
PATTERNS = [b"\x00" * 8, b"AAAAAAAA", b"BBBBBBBB", b"ksm-same", b"\xff\x01\xff\x01"]
OFFSETS = [0, 8, 1000, PS - 8]
LENGTHS = [1, 8, 64]

picks = st.integers(0, 1 << 16)


def expected_host_error(prot: str | None, write: bool) -> Errno | None:
    """A host CPU access: unmapped or PROT_NONE or a write to read-only
    memory faults (SIGSEGV), which the model reports as EFAULT."""
    if prot is None or prot == "none":
        return Errno.EFAULT
    if write and prot != "rw":
        return Errno.EFAULT
    return None


def expected_node_error(prot: str | None, write: bool) -> Errno | None:
    """get_user_pages for a kvm/gru node: EFAULT for no vma or no access,
    EPERM for a write to a read-only vma (mm/gup.c check_vma_flags)."""
    if prot is None or prot == "none":
        return Errno.EFAULT
    if write and prot != "rw":
        return Errno.EPERM
    return None


def xp_maps(c: LocalCluster, att: dict) -> bool:
    """Does the xpmem node still map a page of attachment ``att``?"""
    return any(a.ptes for a in c.node("xpmem").attachments.values() if a.user_vaddr == att["vaddr"])


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.c: LocalCluster | None = None
        self.mms: list[int] = []
        #: (mm, page) -> prot of every mapped page; (mm, page) -> contents when not zero
        self.prot: dict[tuple[int, int], str] = {}
        self.data: dict[tuple[int, int], bytes] = {}
        #: xpmem attachments: dicts with vaddr, mm, addr (exporter), npages, write
        self.atts: list[dict] = []
        self.segids: list[int] = []
        #: an hmm node was fenced (only then may device-private pages be poisoned)
        self.hmm_fenced = False

    # -- helpers ----------------------------------------------------------------

    def pages_of(self, mm: int) -> list[int]:
        return sorted(p for (m, p) in self.prot if m == mm)

    def pick_mm(self, pick: int) -> int:
        return self.mms[pick % len(self.mms)]

    def pick_addr(self, mm: int, pick: int) -> int:
        """A mapped page of ``mm``, or (one pick in eight) one that is not mapped."""
        pages = self.pages_of(mm)
        if not pages or pick % 8 == 7:
            every = [p for (_, p) in self.prot] or [1 << 30]
            return max(every) + 64 * PS
        return pages[pick % len(pages)]

    def pick_range(self, mm: int, pick: int, npages: int) -> tuple[int, int]:
        pages = self.pages_of(mm)
        if not pages:
            return (1 << 30), PS
        first = pages[pick % len(pages)]
        return first, npages * PS

    def poisoned(self, mm: int, page: int) -> bool:
        """Is the page a device-private page its device took with it?"""
        m = self.c.model.mms.get(mm) if self.c is not None else None
        pte = m.get(page) if m is not None else 0
        if not pte & PTE_DEVICE:
            return False
        dev = self.c.model.device.pages.get(pte >> PTE_SHIFT)
        poisoned = dev is None or dev.poisoned
        assert not poisoned or self.hmm_fenced, f"mm {mm} {page:#x} poisoned though no hmm node was fenced"
        return poisoned

    def content(self, mm: int, page: int) -> bytes:
        return self.data.get((mm, page), bytes(PS))

    def shadow_write(self, mm: int, addr: int, data: bytes) -> None:
        page = addr - addr % PS
        off = addr - page
        cur = bytearray(self.content(mm, page))
        cur[off : off + len(data)] = data
        self.data[(mm, page)] = bytes(cur)

    def forget(self, mm: int, addr: int, length: int) -> None:
        for p in range(addr, addr + length, PS):
            self.prot.pop((mm, p), None)
            self.data.pop((mm, p), None)

    def mapped_pages(self) -> int:
        return len(self.prot)

    # -- setup ------------------------------------------------------------------

    @initialize(seed=st.none() | st.integers(0, 1 << 16), wrap=st.booleans())
    def setup(self, seed: int | None, wrap: bool) -> None:
        self.c = LocalCluster(
            frames=FRAMES, swap_slots=SWAP_SLOTS, wrap_change_pte=wrap, nodes=["kvm", "gru", "xpmem", "hmm"], seed=seed
        )
        self.mms.append(self.c.spawn())

    # -- address spaces -----------------------------------------------------------

    @precondition(lambda self: len(self.mms) < MAX_MMS)
    @rule()
    def spawn(self) -> None:
        self.mms.append(self.c.spawn())

    @precondition(lambda self: self.mms)
    @rule(pick=picks, pages=st.integers(1, 4), prot=st.sampled_from(["rw", "rw", "r"]), mergeable=st.booleans())
    def mmap(self, pick: int, pages: int, prot: str, mergeable: bool) -> None:
        mm = self.pick_mm(pick)
        if len(self.pages_of(mm)) + pages > MAX_PAGES_PER_MM:
            return
        addr = self.c.mmap(mm, pages, prot, mergeable=mergeable)
        for p in range(addr, addr + pages * PS, PS):
            assert (mm, p) not in self.prot, f"mmap returned mapped address {p:#x}"
            self.prot[(mm, p)] = prot

    @precondition(lambda self: self.mms)
    @rule(pick=picks, page=picks, npages=st.integers(1, 3))
    def munmap(self, pick: int, page: int, npages: int) -> None:
        mm = self.pick_mm(pick)
        addr, length = self.pick_range(mm, page, npages)
        self.c.munmap(mm, addr, length)
        self.forget(mm, addr, length)

    @precondition(lambda self: self.mms)
    @rule(pick=picks, page=picks, npages=st.integers(1, 3), prot=st.sampled_from(["none", "r", "rw"]))
    def mprotect(self, pick: int, page: int, npages: int, prot: str) -> None:
        mm = self.pick_mm(pick)
        addr, length = self.pick_range(mm, page, npages)
        pages = [p for p in range(addr, addr + length, PS) if (mm, p) in self.prot]
        try:
            self.c.mprotect(mm, addr, length, prot)
        except KernelError as exc:
            # mprotect of a range with holes: ENOMEM, as the kernel says
            assert exc.errno is Errno.ENOMEM and len(pages) < length // PS, exc
            # the kernel changes the vmas before the first hole
            for p in range(addr, addr + length, PS):
                if (mm, p) not in self.prot:
                    break
                self.prot[(mm, p)] = prot
            return
        for p in pages:
            self.prot[(mm, p)] = prot

    @precondition(lambda self: self.mms)
    @rule(pick=picks, page=picks, npages=st.integers(1, 3))
    def dontneed(self, pick: int, page: int, npages: int) -> None:
        mm = self.pick_mm(pick)
        addr, length = self.pick_range(mm, page, npages)
        try:
            self.c.madvise(mm, addr, length, "dontneed")
        except KernelError as exc:
            assert exc.errno is Errno.ENOMEM, exc
            assert any((mm, p) not in self.prot for p in range(addr, addr + length, PS))
        for p in range(addr, addr + length, PS):
            self.data.pop((mm, p), None)

    @precondition(lambda self: self.mms)
    @rule(pick=picks, page=picks, npages=st.integers(1, 3), on=st.booleans())
    def mergeable(self, pick: int, page: int, npages: int, on: bool) -> None:
        mm = self.pick_mm(pick)
        addr, length = self.pick_range(mm, page, npages)
        try:
            self.c.madvise(mm, addr, length, "mergeable" if on else "unmergeable")
        except KernelError as exc:
            assert exc.errno is Errno.ENOMEM, exc

    @precondition(lambda self: self.mms and len(self.mms) < MAX_MMS)
    @rule(pick=picks)
    def fork(self, pick: int) -> None:
        mm = self.pick_mm(pick)
        child = self.c.fork(mm)
        assert child not in self.mms
        self.mms.append(child)
        for (m, p), prot in list(self.prot.items()):
            if m == mm:
                self.prot[(child, p)] = prot
                if (m, p) in self.data:
                    self.data[(child, p)] = self.data[(m, p)]

    @precondition(lambda self: self.mms)
    @rule(pick=picks)
    def exit(self, pick: int) -> None:
        mm = self.pick_mm(pick)
        self.c.exit(mm)
        self.mms.remove(mm)
        for key in [k for k in self.prot if k[0] == mm]:
            del self.prot[key]
            self.data.pop(key, None)
        # the mm's segments are gone; attachments of them stay but cannot fault
        for att in self.atts:
            if att["mm"] == mm:
                att["dead"] = True

    # -- host accesses --------------------------------------------------------------

    @precondition(lambda self: self.mms)
    @rule(pick=picks, page=picks, off=st.sampled_from(OFFSETS), n=st.sampled_from(LENGTHS))
    def host_read(self, pick: int, page: int, off: int, n: int) -> None:
        mm = self.pick_mm(pick)
        addr = self.pick_addr(mm, page)
        n = min(n, PS - off)
        expected = expected_host_error(self.prot.get((mm, addr)), False)
        if expected is None and self.poisoned(mm, addr):
            expected = Errno.EIO
        try:
            got = self.c.read(mm, addr + off, n)
        except KernelError as exc:
            assert exc.errno is expected, (exc, expected)
            return
        assert expected is None, f"read of {addr:#x} gave data, expected {expected}"
        assert got == self.content(mm, addr)[off : off + n]

    @precondition(lambda self: self.mms)
    @rule(pick=picks, page=picks, off=st.sampled_from(OFFSETS), data=st.sampled_from(PATTERNS))
    def host_write(self, pick: int, page: int, off: int, data: bytes) -> None:
        mm = self.pick_mm(pick)
        addr = self.pick_addr(mm, page)
        data = data[: PS - off]
        expected = expected_host_error(self.prot.get((mm, addr)), True)
        if expected is None and self.poisoned(mm, addr):
            expected = Errno.EIO
        try:
            self.c.write(mm, addr + off, data)
        except KernelError as exc:
            assert exc.errno is expected, (exc, expected)
            return
        assert expected is None, f"write to {addr:#x} succeeded, expected {expected}"
        self.shadow_write(mm, addr + off, data)

    # -- node accesses ----------------------------------------------------------------

    def check_node_access(self, kind: str, mm: int, addr: int, off: int, n: int, data: bytes | None,
                          outcome, *, before: bytes | None = None, racing: bool = False) -> None:
        """Judge one kvm/gru/hmm access's outcome (a value or a KernelError)."""
        expected = expected_node_error(self.prot.get((mm, addr)), data is not None)
        if expected is None and self.poisoned(mm, addr):
            expected = Errno.EIO
        if isinstance(outcome, KernelError):
            allowed = {expected} | ({Errno.EAGAIN} if racing else set())
            if racing and self.hmm_fenced:
                allowed.add(Errno.EIO)  # its page may have been poisoned by the fence, then zapped
            if racing and before is not None:
                allowed.add(None)
            assert outcome.errno in allowed, (kind, hex(addr), outcome, expected)
            return
        if data is None:
            now = self.content(mm, addr)[off : off + n] if (mm, addr) in self.prot else None
            ok = [x for x in (now, before) if x is not None]
            assert outcome in ok, (kind, hex(addr), outcome, ok)
        else:
            assert outcome == len(data)
            if (mm, addr) in self.prot:
                self.shadow_write(mm, addr + off, data)
        if not racing:
            assert expected is None, (kind, hex(addr), "succeeded, expected", expected)

    @precondition(lambda self: self.mms)
    @rule(kind=st.sampled_from(["kvm", "gru", "hmm"]), pick=picks, page=picks, off=st.sampled_from(OFFSETS),
          n=st.sampled_from(LENGTHS), write=st.booleans(), data=st.sampled_from(PATTERNS))
    def node_access(self, kind: str, pick: int, page: int, off: int, n: int, write: bool, data: bytes) -> None:
        mm = self.pick_mm(pick)
        addr = self.pick_addr(mm, page)
        payload = data[: PS - off] if write else None
        n = min(n, PS - off)
        try:
            outcome = self.c.access(kind, mm, addr + off, n, payload)
        except KernelError as exc:
            outcome = exc
        self.check_node_access(kind, mm, addr, off, n, payload, outcome)

    @precondition(lambda self: self.mms)
    @rule(kind=st.sampled_from(["kvm", "gru", "hmm"]), pick=picks, page=picks, npages=st.integers(1, 3),
          write=st.booleans())
    def node_fault(self, kind: str, pick: int, page: int, npages: int, write: bool) -> None:
        mm = self.pick_mm(pick)
        addr = self.pick_addr(mm, page)
        # GUP stops at the first page it cannot have; hmm_range_fault fails
        # the whole range if any page cannot be had
        judged = [addr + i * PS for i in range(npages if kind == "hmm" else 1)]
        expected = next((e for e in (
            expected_node_error(self.prot.get((mm, a)), write) or (Errno.EIO if self.poisoned(mm, a) else None)
            for a in judged) if e is not None), None)
        try:
            result = self.c.fault(kind, mm, addr, npages, write)
        except KernelError as exc:
            assert exc.errno is expected, (kind, hex(addr), exc, expected)
            return
        assert expected is None, (kind, hex(addr), "faulted, expected", expected)
        pages = result["pages"]
        assert pages and pages[0][0] == addr
        for a, _pfn, writable in pages:
            prot = self.prot.get((mm, a))
            assert prot in ("r", "rw"), (hex(a), prot)
            assert not writable or prot == "rw"

    # -- xpmem ------------------------------------------------------------------------

    @precondition(lambda self: self.mms and len(self.atts) < 6)
    @rule(pick=picks, page=picks, npages=st.integers(1, 3), write=st.booleans(),
          mode=st.sampled_from([0o666, 0o644, 0o600]))
    def xpmem_attach(self, pick: int, page: int, npages: int, write: bool, mode: int) -> None:
        mm = self.pick_mm(pick)
        addr, length = self.pick_range(mm, page, npages)
        npages = length // PS
        segid = self.c.xpmem_make("xpmem", mm, addr, length, mode)
        self.segids.append(segid)
        # the exporter is the owner: mode's owner bits decide
        try:
            apid = self.c.xpmem_get("xpmem", segid, write)
        except KernelError as exc:
            assert exc.errno is Errno.EACCES and write and not mode & 0o200, (exc, oct(mode))
            return
        assert (mode >> 6) & (0o6 if write else 0o4) == (0o6 if write else 0o4)
        try:
            vaddr = self.c.xpmem_attach("xpmem", apid)
        except KernelError as exc:
            # xpmem_attach validates for XPMEM_RDWR: a read-only permit is refused
            assert exc.errno is Errno.EACCES and not write, exc
            return
        assert write
        self.atts.append({"vaddr": vaddr, "mm": mm, "addr": addr, "npages": npages, "write": write,
                          "apid": apid, "segid": segid, "dead": False, "removed": False})

    @precondition(lambda self: self.atts)
    @rule(which=picks, page=picks, off=st.sampled_from(OFFSETS), n=st.sampled_from(LENGTHS),
          write=st.booleans(), data=st.sampled_from(PATTERNS))
    def xpmem_access(self, which: int, page: int, off: int, n: int, write: bool, data: bytes) -> None:
        att = self.atts[which % len(self.atts)]
        i = page % att["npages"]
        addr = att["addr"] + i * PS
        payload = data[: PS - off] if write else None
        n = min(n, PS - off)
        try:
            outcome = self.c.access("xpmem", 0, att["vaddr"] + i * PS + off, n, payload)
        except KernelError as exc:
            outcome = exc
        self.check_xpmem_access(att, addr, off, n, payload, outcome)

    def expected_xpmem_error(self, att: dict, addr: int, write: bool) -> Errno | None:
        if write and not att["write"]:
            return Errno.EACCES  # xpmem_validate_access: a read-only attachment
        if att["removed"]:
            return Errno.ENOENT  # xpmem_remove_seg zapped it: SIGBUS in the kernel
        if att["dead"]:
            return Errno.ESRCH  # the exporting mm is gone (its segments with it)
        # xpmem_pin_page: FOLL_WRITE follows the exporter's vma, so reads of a
        # read-only vma succeed and only writes fail
        return expected_node_error(self.prot.get((att["mm"], addr)), write)

    def check_xpmem_access(self, att: dict, addr: int, off: int, n: int, data: bytes | None, outcome,
                           *, before: bytes | None = None, racing: bool = False) -> None:
        expected = self.expected_xpmem_error(att, addr, data is not None)
        mm = att["mm"]
        if isinstance(outcome, KernelError):
            allowed = {expected} | ({Errno.EAGAIN} if racing else set())
            if racing and before is not None:
                allowed.add(None)
            assert outcome.errno in allowed, ("xpmem", hex(addr), outcome, expected)
            return
        if data is None:
            now = self.content(mm, addr)[off : off + n] if (mm, addr) in self.prot else None
            ok = [x for x in (now, before) if x is not None]
            assert outcome in ok, ("xpmem", hex(addr), outcome, ok)
        else:
            assert outcome == len(data)
            if (mm, addr) in self.prot:
                self.shadow_write(mm, addr + off, data)
        if not racing:
            assert expected is None, ("xpmem", hex(addr), "succeeded, expected", expected)

    @precondition(lambda self: self.atts)
    @rule(which=picks)
    def xpmem_remove(self, which: int) -> None:
        """The exporter removes an attached segment: every attachment of it
        is zapped and unpinned before the remove returns."""
        att = self.atts[which % len(self.atts)]
        if att["removed"] or att["dead"]:
            return
        self.c.xpmem_remove("xpmem", att["segid"])
        for a in self.atts:
            if a["segid"] == att["segid"]:
                a["removed"] = True
        self.c.pump()
        assert not any(a["removed"] and xp_maps(self.c, a) for a in self.atts)

    @precondition(lambda self: self.atts)
    @rule(which=picks)
    def xpmem_detach(self, which: int) -> None:
        att = self.atts.pop(which % len(self.atts))
        self.c.xpmem_detach("xpmem", att["vaddr"])

    def xpmem_pinned(self) -> list[tuple[int, int, int]]:
        """(mm, page, pfn) of every page the xpmem node maps, so pins."""
        xp = self.c.node("xpmem")
        return sorted((att.mm, page, pfn) for att in xp.attachments.values() for page, (pfn, _) in att.ptes.items())

    @precondition(lambda self: self.mms and len(self.atts) < 6)
    @rule(pick=picks, page=picks, op=st.sampled_from(["ksm", "migrate", "reclaim"]))
    def background_vs_xpmem_pin(self, pick: int, page: int, op: str) -> None:
        """Background invalidations vs xpmem pins: the node attaches a page
        and reads it (so pins it), then ksmd, migration or kswapd go for the
        page.  Their invalidations reach the node, which acks them keeping
        its pin (hpc/xpmem ignores what the segment owner did not raise), and
        the page stays where it is -- unmerged, unmigrated, not reclaimed --
        still mapped by the node.  The attachment stays for the other rules."""
        c = self.c
        mm = self.pick_mm(pick)
        addr = self.pick_addr(mm, page)
        if self.prot.get((mm, addr)) not in ("r", "rw"):
            return
        segid = c.xpmem_make("xpmem", mm, addr, PS, 0o600)
        self.segids.append(segid)
        apid = c.xpmem_get("xpmem", segid, True)
        vaddr = c.xpmem_attach("xpmem", apid)
        self.atts.append({"vaddr": vaddr, "mm": mm, "addr": addr, "npages": 1, "write": True,
                          "apid": apid, "segid": segid, "dead": False, "removed": False})
        assert c.access("xpmem", 0, vaddr, 8) == self.content(mm, addr)[:8]
        (pfn,) = {p for m, a, p in self.xpmem_pinned() if (m, a) == (mm, addr)}  # maybe attached twice
        xp = c.node("xpmem")
        kept = xp.counters["background_kept"]
        if op == "ksm":
            c.merge(2)
        else:
            try:
                moved = c.migrate(mm, addr, PS) if op == "migrate" else c.reclaim(mm, addr, PS)
            except KernelError as exc:
                assert exc.errno is Errno.ENOMEM, exc  # no frame to migrate to
            else:
                assert moved == 0, (op, hex(addr))
                if op == "migrate":  # try_to_migrate_one invalidates before it finds the pin
                    assert xp.counters["background_kept"] > kept
        assert c.model.pte(mm, addr)[0] == pfn, (op, hex(addr))
        assert c.model.memory.pincount[pfn] >= 1
        assert (mm, addr, pfn) in self.xpmem_pinned()

    # -- primary-MMU background work ------------------------------------------------

    @rule(scans=st.integers(1, 2))
    def ksm(self, scans: int) -> None:
        self.c.merge(scans)

    @precondition(lambda self: self.mms)
    @rule(pick=picks, page=picks, npages=st.integers(1, 3))
    def reclaim(self, pick: int, page: int, npages: int) -> None:
        mm = self.pick_mm(pick)
        addr, length = self.pick_range(mm, page, npages)
        try:
            self.c.reclaim(mm, addr, length)
        except KernelError as exc:
            assert exc.errno in (Errno.ENOMEM, Errno.EFAULT), exc

    @precondition(lambda self: self.mms)
    @rule(pick=picks, page=picks, npages=st.integers(1, 3))
    def migrate(self, pick: int, page: int, npages: int) -> None:
        mm = self.pick_mm(pick)
        addr, length = self.pick_range(mm, page, npages)
        try:
            self.c.migrate(mm, addr, length)
        except KernelError as exc:
            assert exc.errno in (Errno.ENOMEM, Errno.EFAULT), exc

    @precondition(lambda self: self.mms)
    @rule(pick=picks, page=picks, npages=st.integers(1, 3))
    def page_idle(self, pick: int, page: int, npages: int) -> None:
        """Idle page tracking through the admin API (mm/page_idle.c): marking
        walks every mapping with ``clear_young`` at every yield of node
        traffic; a read right after, with no access in between, finds every
        marked page still idle."""
        mm = self.pick_mm(pick)
        addr, length = self.pick_range(mm, page, npages)
        try:
            marked = self.c.admin("idle", mm=mm, addr=addr, length=length, op="mark")
        except KernelError as exc:
            assert exc.errno in (Errno.ENOMEM, Errno.EFAULT, Errno.EINVAL), exc
            return
        back = self.c.admin("idle", mm=mm, addr=addr, length=length, op="read")
        assert back["pages"] == marked["pages"] and back["idle"] == len(back["pages"]), (marked, back)

    @rule(kind=st.sampled_from(["kvm", "gru", "xpmem", "hmm"]))
    def fence_and_register(self, kind: str) -> None:
        if kind == "hmm":
            self.hmm_fenced = True
        self.c.fence(kind, "test")
        self.c.pump()
        self.c.register(kind)
        if kind == "xpmem":
            self.atts.clear()  # the node dropped its permits and attachments

    # -- allocation failures ----------------------------------------------------------

    @precondition(lambda self: self.mms)
    @rule(op=st.sampled_from(["write", "node_write", "migrate", "ksm", "reclaim", "race_migrate"]),
          pick=picks, page=picks, npages=st.integers(1, 3), after=st.integers(0, 3),
          who=st.sampled_from(["kvm", "gru"]), data=st.sampled_from(PATTERNS))
    def memory_pressure(self, op: str, pick: int, page: int, npages: int, after: int, who: str,
                        data: bytes) -> None:
        """Every allocation after the first ``after`` fails with ENOMEM, in the
        middle of whatever the operation is doing (a COW break, a swap-in, a
        migration, a KSM merge's unsharing, a node's write fault): the
        operation fails or not, but every start it opened is ended, and no
        frame is freed while a node maps it (the cluster checks each free).
        The contents of the mm are then re-read from the host: what a failed
        write left half done is not the point here."""
        c = self.c
        mm = self.pick_mm(pick)
        addr, length = self.pick_range(mm, page, npages)
        memory = c.model.memory
        memory.fail_allocs_after(after)
        try:
            try:
                if op == "write":
                    c.write(mm, addr, data * (length // len(data)))
                elif op == "node_write":
                    c.access(who, mm, addr, data=data)
                elif op == "migrate":
                    c.migrate(mm, addr, length)
                elif op == "ksm":
                    c.merge(1)
                elif op == "reclaim":
                    c.reclaim(mm, addr, length)
                else:  # a migration held open while a node faults the range for write
                    handle = c.begin(c.model.migrate(mm, addr, length))
                    token = c.submit_fault(who, mm, addr, 1, True)
                    c.pump()
                    try:
                        c.finish(handle)
                    finally:
                        c.wait(who, token)
            except KernelError as exc:
                assert exc.errno in (Errno.ENOMEM, Errno.EFAULT, Errno.EPERM, Errno.ENOSPC), exc
        finally:
            memory.fail_allocs_after(None)
        c.pump()
        for (m, p), prot in list(self.prot.items()):
            if m == mm and prot != "none" and not self.poisoned(m, p):
                self.data[(m, p)] = bytes(c.read(m, p, PS))

    # -- races: an invalidation held open while a node access runs ------------------

    @precondition(lambda self: self.mms)
    @rule(op=st.sampled_from(["munmap", "dontneed", "dontneed_nb", "mprotect_r", "mprotect_none", "reclaim",
                              "migrate", "ksm"]),
          pick=picks, page=picks, npages=st.integers(1, 2), who=st.sampled_from(["kvm", "gru", "xpmem", "hmm"]),
          nth=st.integers(0, 1), off=st.sampled_from(OFFSETS), write=st.booleans(),
          data=st.sampled_from(PATTERNS), prefault=st.booleans(),
          twist=st.sampled_from(["none", "none", "duplicate", "fence"]),
          victim=st.sampled_from(["kvm", "gru", "xpmem", "hmm"]))
    def race(self, op: str, pick: int, page: int, npages: int, who: str, nth: int, off: int,
             write: bool, data: bytes, prefault: bool, twist: str, victim: str) -> None:
        """An operation held open (``begin``) while a node access races it;
        ``twist``: the racing node's messages arrive twice, or a node is fenced
        in the middle (its acks still owed are answered None, its late ones
        refused), then registers anew."""
        c = self.c
        mm = self.pick_mm(pick)
        addr, length = self.pick_range(mm, page, npages)
        if op.startswith("dontneed") or (twist == "fence" and victim == who):
            # a write racing DONTNEED may land before or after the zap; one
            # cut short by a fence may or may not have landed
            write = False
        taddr = addr + (nth % npages) * PS
        att = None
        if who == "xpmem":
            cands = [a for a in self.atts if a["mm"] == mm and not a["dead"] and not a["removed"]
                     and a["addr"] <= taddr < a["addr"] + a["npages"] * PS]
            if not cands:
                who = "kvm"
            else:
                att = cands[0]
        payload = data[: PS - off] if write else None
        n = 8 if not write else None
        if prefault and att is None:
            try:
                c.fault(who, mm, taddr, 1, False)
            except KernelError:
                pass
        before = self.content(mm, taddr)[off : off + 8] if (mm, taddr) in self.prot else None
        gen = {
            "munmap": lambda: c.model.munmap(mm, addr, length),
            "dontneed": lambda: c.model.madvise(mm, addr, length, "dontneed"),
            # the OOM reaper's zap: a sleepable node may refuse it (EAGAIN, compensated)
            "dontneed_nb": lambda: c.model.madvise(mm, addr, length, "dontneed", blockable=False),
            "mprotect_r": lambda: c.model.mprotect(mm, addr, length, "r"),
            "mprotect_none": lambda: c.model.mprotect(mm, addr, length, "none"),
            "reclaim": lambda: c.model.reclaim(mm, addr, length),
            "migrate": lambda: c.model.migrate(mm, addr, length),
            "ksm": lambda: c.model.ksm.full_scan(),
        }[op]()
        if twist == "duplicate":
            c.duplicate(who)
        handle = c.begin(gen)
        if att is not None:
            vaddr = att["vaddr"] + (taddr - att["addr"]) + off
            token = c.submit_access("xpmem", 0, vaddr, n, payload)
        else:
            token = c.submit_access(who, mm, taddr + off, n, payload)
        c.pump()
        if twist == "fence":
            self.hmm_fenced |= victim == "hmm"
            c.fence(victim, "fenced in the middle of an operation")
            c.pump()  # its late ack, if any, is refused; it reads Fenced and drops everything
        error = None
        try:
            c.finish(handle)
        except KernelError as exc:
            error = exc
        c.heal(who)
        # apply the operation to the shadow
        self.apply_op(op, mm, addr, length, error)
        done = c.wait(who, token)
        outcome = done.error if done.error is not None else (
            done.result["data"] if payload is None else done.result["written"])
        if twist == "fence":
            c.register(victim)
            if victim == "xpmem":
                self.atts.clear()  # the node dropped its permits and attachments
            if victim == who and isinstance(outcome, KernelError):
                return  # cut short by the fence: any error (EINTR, ...); a read served before it is judged below
        if att is not None:
            self.check_xpmem_access(att, taddr, off, 8, payload, outcome, before=before, racing=True)
        else:
            self.check_node_access(who, mm, taddr, off, 8, payload, outcome, before=before, racing=True)

    def apply_op(self, op: str, mm: int, addr: int, length: int, error: KernelError | None) -> None:
        pages = [p for p in range(addr, addr + length, PS) if (mm, p) in self.prot]
        if op == "munmap":
            assert error is None, error
            self.forget(mm, addr, length)
        elif op.startswith("dontneed"):
            if error is not None and error.errno is Errno.EAGAIN:
                assert op == "dontneed_nb", error  # refused by a sleepable node: nothing changed
                return
            if error is not None:
                assert error.errno is Errno.ENOMEM and len(pages) < length // PS, error
            for p in range(addr, addr + length, PS):
                self.data.pop((mm, p), None)
        elif op.startswith("mprotect"):
            prot = op.split("_")[1]
            if error is not None:
                assert error.errno is Errno.ENOMEM and len(pages) < length // PS, error
                for p in range(addr, addr + length, PS):
                    if (mm, p) not in self.prot:
                        break
                    self.prot[(mm, p)] = prot
            else:
                for p in pages:
                    self.prot[(mm, p)] = prot
        else:
            assert error is None or error.errno in (Errno.ENOMEM, Errno.EFAULT), error

    # -- hmm: device-private migration and device-exclusive entries ---------------------

    @precondition(lambda self: self.mms)
    @rule(pick=picks, page=picks, npages=st.integers(1, 3), to=st.sampled_from(["dev", "dev", "sys", "exclusive"]))
    def hmm_device(self, pick: int, page: int, npages: int, to: str) -> None:
        """``mmn hmm migrate [--to sys]`` / ``exclusive``: the contents stay
        what the shadow says, wherever they live."""
        c = self.c
        mapped = [m for m in self.mms if self.pages_of(m)]
        if not mapped:
            return
        mm = mapped[pick % len(mapped)]
        addr, length = self.pick_range(mm, page, npages)
        c.core.grants.point("hmm", mm)
        node = c.node("hmm")
        call = {
            "dev": lambda n: n.migrate(mm, addr, npages),
            "sys": lambda n: n.migrate(mm, addr, npages, True),
            "exclusive": lambda n: n.exclusive(mm, addr, npages),
        }[to]
        done = c.wait("hmm", c._start("hmm", call))
        pages = [addr + i * PS for i in range(npages)]
        if done.error is not None:
            errno = done.error.errno
            if to == "exclusive":
                wanted = {expected_node_error(self.prot.get((mm, p)), True) for p in pages} - {None}
                poisoned = any(self.poisoned(mm, p) for p in pages)
                assert errno in wanted | ({Errno.EIO} if poisoned else set()), (to, done.error, wanted)
            else:
                # a range with nothing migratable is not an error; these are
                assert errno is Errno.ENOMEM and to == "sys", (to, done.error)
            return
        assert done.result["cpages"] <= npages
        if to == "dev":
            assert node.device_pages or done.result["cpages"] == 0

    # -- whole-state checks -------------------------------------------------------------

    @rule()
    def verify_all(self) -> None:
        """Every mapped, readable page reads as the shadow says, through the
        host (a poisoned one fails with EIO and serves nothing)."""
        for (mm, page), prot in sorted(self.prot.items()):
            if prot != "none":
                if self.poisoned(mm, page):
                    try:
                        self.c.read(mm, page, PS)
                    except KernelError as exc:
                        assert exc.errno is Errno.EIO, exc
                    else:
                        raise AssertionError(f"poisoned {mm} {page:#x} served bytes")
                    continue
                assert self.c.read(mm, page, PS) == self.content(mm, page), (mm, hex(page))

    @invariant()
    def no_stale_access_and_invariants_hold(self) -> None:
        if self.c is None:
            return
        assert self.c.check() == 0
        if self.c.quiescent():
            model = self.c.model
            pins = sum(model.memory.pincount)
            xp = self.c.node("xpmem")
            held = xp.pinned_pages() if self.c.ports["xpmem"].state == "live" else 0
            assert pins == held, (pins, held)

    def teardown(self) -> None:
        c = self.c
        if c is None:
            return
        try:
            self.verify_all()
            for mm in list(self.mms):
                c.exit(mm)
            self.mms.clear()
            for name in list(c.ports):
                c.fence(name, "teardown")
            c.pump()
            assert c.check() == 0
            memory = c.model.memory
            assert memory.in_use == 0, f"{memory.in_use} frames leaked"
            assert sum(memory.pincount) == 0, "pins left"
            assert c.model.swap.in_use == 0, f"{c.model.swap.in_use} swap slots leaked"
        finally:
            c.model.close()


ClusterMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCluster = ClusterMachine.TestCase
