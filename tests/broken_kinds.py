"""Deliberately broken node kinds (kvm, xpmem, hmm), for the tests that must catch them.

They live with the tests, not in the shipped ``node`` package.  In-process
tests use the classes directly (``LocalCluster.add_node(node=NeverZaps("bad"))``);
a test that needs them in node *processes* starts those with
``tests/broken_site`` on ``PYTHONPATH`` and ``MMN_TEST_BROKEN`` set, and that
directory's ``sitecustomize`` calls :func:`install` in each process.
"""

from __future__ import annotations

from typing import Any

from node.base import MmState, Output
from node.hmm import HmmMMU
from node.kinds import KINDS
from node.kvm import KvmMMU
from node.xpmem import XpmemMMU
from protocol.messages import Ack
from protocol.types import Errno, KernelError


class AcksBeforeZapping(KvmMMU):
    """Acks a start at once and zaps only when its end arrives: between the
    ack and the end it still reaches the old pages."""

    def invalidate_range_start(self, state: MmState, msg: Any) -> list[Output]:
        self._open_start(state, msg)
        state.mmu_invalidate_in_progress += 1  # type: ignore[attr-defined]
        state.mmu_invalidate_range_start, state.mmu_invalidate_range_end = msg.start, msg.end  # type: ignore[attr-defined]
        return [self._ack(msg.id)]

    def invalidate_range_end(self, state: MmState, start_id: int, rng: tuple[int, int]) -> list[Output]:
        out = super().invalidate_range_end(state, start_id, rng)
        self._zap(state.mm, *rng)
        return out


class NeverZaps(KvmMMU):
    """Acks every start and keeps its sptes."""

    def _zap(self, mm: int, start: int, end: int) -> list[Output]:
        return []


class SaysWritesFailed(KvmMMU):
    """Does every write it is asked to, then says it was refused (EPERM), as
    if nothing had landed: a denial on a page mapped for it, and bytes the
    page may not hold as far as anyone told."""

    def _complete(self, token: int, result: dict[str, Any] | None = None, *,
                  error: KernelError | None = None) -> list[Output]:
        if error is None and result is not None and "written" in result:
            error = KernelError(Errno.EPERM, "write refused (it landed)")
        return super()._complete(token, result, error=error)


class KeepsAttachmentsOnRemove(XpmemMMU):
    """On ``XpmemRemoved`` acks, unpins (or, ``keep_pins``, not even that),
    and goes on mapping its attachments of the removed segment: its later
    accesses use the old pfns."""

    keep_pins = False

    def _receive_removed(self, msg: Any) -> list[Output]:
        outputs: list[Output] = []
        if not self.keep_pins:
            apids = {a for a, p in self.permits.items() if p.segid == msg.segid}
            for att in self.attachments.values():
                if att.apid in apids:
                    outputs += self._unpin(att.mm, [pfn for pfn, _ in att.ptes.values()])
        return [*outputs, self._ack(msg.id)]


class KeepsPinsOnRemove(KeepsAttachmentsOnRemove):
    keep_pins = True


class KeepsDevicePagesItGaveBack(HmmMMU):
    """Gives the host a device page's contents when it takes the page back
    (``dmirror_devmem_fault``), and keeps its copy and its mirror of it: its
    later accesses copy the device's old bytes, whatever the CPU wrote to
    the page since -- no DMA, nothing the host's oracle sees; only the
    soak's shadow of the contents can tell."""

    def _devmem_fault(self, msg: Any) -> Ack:
        data = self.device_pages.get(msg.handle)
        self.counters["migrated_out"] += 1
        ack = Ack(ref=msg.id, data=bytes(data) if data is not None else b"")
        self._answered[msg.id] = ack
        return ack

    def _free(self, handles: list[int]) -> None:
        return None  # (and nothing it holds ever goes)


class KeepsDevicePagesOverAFence(HmmMMU):
    """Fenced, keeps its device memory and its mirror of it into its next
    session, as if the host still counted on them: the host poisoned those
    pages (it cannot know the device kept them), and the node's accesses to
    them copy its old bytes -- no DMA, nothing the host's oracle sees; only
    the soak's shadow of where the pages are (lost: EIO) can tell."""

    def _drop_kind_state(self) -> None:
        self._access_stats.clear()


BROKEN: dict[str, type[KvmMMU] | type[XpmemMMU] | type[HmmMMU]] = {
    "acks-before-zap": AcksBeforeZapping,
    "never-zaps": NeverZaps,
    "keeps-attachments-on-remove": KeepsAttachmentsOnRemove,
    "keeps-pins-on-remove": KeepsPinsOnRemove,
    "says-writes-failed": SaysWritesFailed,
    "keeps-device-pages": KeepsDevicePagesItGaveBack,
    "keeps-device-pages-over-a-fence": KeepsDevicePagesOverAFence,
}


def install(broken: str) -> None:
    """Make ``broken`` the class of every node of its kind this process
    starts (``node.kinds.KINDS["kvm"]``, ``["xpmem"]`` or ``["hmm"]``); the other kinds
    stay correct.

    Raises:
        ValueError: ``broken`` is not a name of :data:`BROKEN`.
    """
    try:
        cls = BROKEN[broken]
        KINDS[cls.kind] = cls
    except KeyError:
        raise ValueError(f"MMN_TEST_BROKEN must be one of {', '.join(BROKEN)}, not {broken!r}") from None
