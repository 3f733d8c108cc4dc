"""The DMA oracle checks an xpmem access against the node's permits
(broker/xpmem.py ``Segments.covers``), not only "some pin exists": an access
through a removed, revoked or released attachment, beyond the permit's
segment, or a write through a read-only permit is a stale access, counted in
``stale_accesses``.  Accesses a correct node sent before it acked the zap
(``XpmemRemoved``, ``->release``) are answered: the permit is retiring.

A deliberately broken xpmem kind (tests/broken_kinds.py) in the in-process
cluster, and the host core driven by hand as a node would drive it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from broken_kinds import KeepsAttachmentsOnRemove, KeepsPinsOnRemove
from test_core import admin_replies, sends

from broker.core import CoreConfig, HostCore
from broker.mm import Model
from mmnotify.local import LocalCluster
from protocol.messages import (
    Ack,
    DmaRead,
    DmaReply,
    DmaWrite,
    Gup,
    GupReply,
    Register,
    Release,
    Subscribe,
    Unpin,
    XpmemGet,
    XpmemMake,
    XpmemRelease,
    XpmemRemove,
    XpmemRemoved,
    XpmemReply,
)
from protocol.types import Errno, KernelError

PS = 4096
ID = b"x1"


@pytest.mark.parametrize("broken", [KeepsAttachmentsOnRemove, KeepsPinsOnRemove])
def test_a_node_that_keeps_its_attachment_after_remove_is_caught_by_the_oracle(broken: type) -> None:
    c = LocalCluster(frames=64, nodes={"xpmem": "xpmem"})
    c.add_node(node=broken("bad"))
    mm = c.spawn()
    base = c.mmap(mm, 1)
    c.write(mm, base, b"secret")
    segid = c.xpmem_make("xpmem", mm, base, PS)
    vaddr = c.xpmem_attach("bad", c.xpmem_get("bad", segid))
    assert c.access("bad", 0, vaddr, 6) == b"secret"
    c.xpmem_remove("xpmem", segid)
    assert c.model.stale_accesses == 0
    for data in (None, b"evil"):
        with pytest.raises(KernelError) as err:
            c.access("bad", 0, vaddr, 6 if data is None else None, data)
        assert err.value.errno is Errno.ESTALE
    assert c.model.stale_accesses == 2 and c.read(mm, base, 6) == b"secret"


class Node:
    """An xpmem node's side of the wire, by hand."""

    def __init__(self) -> None:
        self.core = HostCore(Model(frames=32, page_size=PS, swap_slots=8), CoreConfig(page_size=PS))
        out = self.core.receive_node(ID, Register(id=1, name="xp", kind="xpmem", sleepable=True, incarnation="i",
                                                  ops=["invalidate_range_start", "invalidate_range_end", "release"]),
                                     None, 0.0)
        self.epoch = sends(out, ID)[0].epoch  # type: ignore[attr-defined]
        self.ids = iter(range(10, 10_000))
        self.admin_ref = 100

    def admin(self, command: str, **args: Any) -> Any:
        self.admin_ref += 1
        return admin_replies(self.core.submit_admin("cli", self.admin_ref, command, args, 0.0))

    def send(self, msg: Any) -> list[Any]:
        return sends(self.core.receive_node(ID, msg, None, 0.0), ID)

    def ask(self, cls: type, **fields: Any) -> Any:
        (reply,) = self.send(cls(id=next(self.ids), epoch=self.epoch, **fields))
        return reply

    def read(self, mm: int, addr: int, pfn: int) -> DmaReply:
        return self.ask(DmaRead, mm=mm, addr=addr, pfn=pfn, offset=0, length=2)

    def write(self, mm: int, addr: int, pfn: int) -> DmaReply:
        return self.ask(DmaWrite, mm=mm, addr=addr, pfn=pfn, offset=0, data=b"!!")

    @property
    def stale(self) -> int:
        return int(self.core.model.stale_accesses)


def exported(n: Node, pages: int = 2) -> tuple[int, int, list[int]]:
    """mm, its base and the pfns of ``pages`` pages, each exported as its own
    segment by the node, which holds a read-write permit and a pin of each."""
    (spawn,) = n.admin("spawn")
    mm = spawn.result["mm"]
    (mmap,) = n.admin("mmap", mm=mm, pages=pages, fill=0x58)
    base = mmap.result["addr"]
    assert n.admin("grant", node="xp", mm=mm)[0].ok
    assert n.ask(Subscribe, mm=mm).TYPE == "ok"
    pfns = []
    for i in range(pages):
        seg = n.ask(XpmemMake, mm=mm, addr=base + i * PS, length=PS, mode=0o600)
        permit = n.ask(XpmemGet, segid=seg.value, write=True)
        assert isinstance(permit, XpmemReply) and not permit.errno
        gup = n.ask(Gup, mm=mm, addr=base + i * PS, npages=1, write=True, pin=True)
        assert isinstance(gup, GupReply) and not gup.errno
        pfns.append(gup.pages[0][1])
    return mm, base, pfns


def test_an_access_in_flight_during_remove_is_answered_and_one_after_the_ack_is_stale() -> None:
    n = Node()
    mm, base, (pfn, _) = exported(n)
    assert n.read(mm, base, pfn).data == b"XX"
    (removed,) = n.send(XpmemRemove(id=50, epoch=n.epoch, segid=1))
    assert isinstance(removed, XpmemRemoved)
    # sent before the node received XpmemRemoved: the permit is retiring
    reply = n.read(mm, base, pfn)
    assert not reply.errno and reply.data == b"XX" and n.stale == 0
    assert n.send(Unpin(id=51, epoch=n.epoch, mm=mm, pfns=[pfn]))[0].TYPE == "ok"
    assert n.send(Ack(ref=removed.id)) == [XpmemReply(ref=50)]
    assert n.read(mm, base, pfn).errno == "ESTALE" and n.stale == 1
    # the other segment's permit is untouched
    assert not n.read(mm, base + PS, n.core.model.pte(mm, base + PS)[0]).errno


def test_a_write_through_a_read_only_permit_and_an_access_beyond_the_permits_are_stale() -> None:
    n = Node()
    mm, base, (p0, p1) = exported(n)
    ro = n.ask(XpmemGet, segid=1, write=False)
    assert not ro.errno and not ro.write
    # the read-write permit of segment 1 given back (a broken node: no Unpin
    # of its pin, no detach); the read-only one stays
    released = n.ask(XpmemRelease, apid=1)
    assert isinstance(released, XpmemReply) and not released.errno
    assert not n.read(mm, base, p0).errno and n.stale == 0  # a read through the read-only permit
    assert n.write(mm, base, p0).errno == "ESTALE" and n.stale == 1
    # segment 2's permit given back too: page 1 is beyond every permit
    assert not n.ask(XpmemRelease, apid=2).errno
    assert n.read(mm, base + PS, p1).errno == "ESTALE" and n.stale == 2
    assert n.core.model.memory.read(p0, 0, 2) == b"XX"
    # a frame never handed to it is still a forgery, not a stale access
    (other,) = n.admin("spawn")
    (page,) = n.admin("mmap", mm=other.result["mm"], pages=1, fill=1)
    guess = n.core.model.pte(other.result["mm"], page.result["addr"])[0]
    assert n.read(other.result["mm"], page.result["addr"], guess).errno == "EACCES" and n.stale == 2


def test_an_access_through_a_revoked_attachment_is_stale() -> None:
    n = Node()
    mm, base, (pfn, _) = exported(n)
    out = n.core.submit_admin("cli", 500, "revoke", {"node": "xp", "mm": mm}, 0.0)
    (release,) = sends(out, ID)
    assert isinstance(release, Release)
    assert not n.read(mm, base, pfn).errno  # in flight before the ->release: answered
    (reply,) = admin_replies(n.core.receive_node(ID, Ack(ref=release.id), None, 0.0))
    assert reply.ok and n.stale == 0
    assert n.read(mm, base, pfn).errno == "ESTALE" and n.stale == 1
    assert n.write(mm, base, pfn).errno == "ESTALE" and n.stale == 2


def test_real_processes_an_xpmem_node_that_keeps_its_attachment_after_remove_is_counted_stale(
        tmp_path: Path) -> None:
    """``mmn up`` whose xpmem nodes keep their attachments of a removed
    segment (tests/broken_site puts the broken kind in every process): the
    importer's later read is refused (ESTALE) and ``mmn status`` counts it."""
    import mmnotify

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMN_")}
    env.update(MMN_TEST_BROKEN="keeps-attachments-on-remove",
               PYTHONPATH=os.pathsep.join((str(root / "tests" / "broken_site"), str(root))))
    up = subprocess.run([sys.executable, "-m", "mmn", "up", "--kvm", "0", "--gru", "0", "--xpmem", "2",
                         "--port-base", "0", "--detach", "--json", "--logs", str(tmp_path)],
                        capture_output=True, text=True, env=env, cwd=root, timeout=90)
    assert up.returncode == 0, up.stderr[-2000:]
    ready = json.loads(up.stdout.splitlines()[0])
    try:
        c = mmnotify.SyncClient(ready["admin"], keys=ready.get("keys"))
        mm = c.spawn()
        addr = c.mmap(mm, pages=1, fill=0x53)
        segid = c.xpmem_make("xpmem0", mm=mm, addr=addr, length=PS, mode=0o666)
        vaddr = c.xpmem_attach("xpmem1", apid=c.xpmem_get("xpmem1", segid=segid, write=True), length=PS)
        assert c.access("xpmem1", mm=mm, addr=vaddr, length=2).data == b"SS"
        c.xpmem_remove("xpmem0", segid=segid)
        assert c.status().stale_accesses == 0
        with pytest.raises(mmnotify.KernelError) as err:
            c.access("xpmem1", mm=mm, addr=vaddr, length=2)
        assert err.value.errno is mmnotify.Errno.ESTALE
        assert c.status().stale_accesses == 1
    finally:
        subprocess.run([sys.executable, "-m", "mmn", "down", "--host", ready["admin"]], env=env, cwd=root,
                       capture_output=True, timeout=30)
