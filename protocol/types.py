"""Kernel-named value types shared by the host, the nodes and the wire.

Pure data: no trio, no zmq.  Names follow ``include/linux/mmu_notifier.h``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: Highest user address + 1 (x86-64 4-level paging, 47 bits).  Addresses at or
#: above it are "impossible" and rejected by the decoder.
ADDRESS_LIMIT = 1 << 47


class NotifyEvent(str, enum.Enum):
    """``enum mmu_notifier_event`` (include/linux/mmu_notifier.h).

    UNMAP: the range is going away (munmap, exit).  CLEAR: the pages are being
    cleared but the range stays valid (madvise DONTNEED, reclaim, KSM).
    PROTECTION_VMA / PROTECTION_PAGE: protection narrowed for a whole vma
    (mprotect) or for pages (fork's COW write protect).  SOFT_DIRTY: soft-dirty
    tracking.  RELEASE: the mm is being torn down.  MIGRATE: pages are moving to
    new frames.  EXCLUSIVE: a device takes (or gives back) exclusive access.
    """

    UNMAP = "UNMAP"
    CLEAR = "CLEAR"
    PROTECTION_VMA = "PROTECTION_VMA"
    PROTECTION_PAGE = "PROTECTION_PAGE"
    SOFT_DIRTY = "SOFT_DIRTY"
    RELEASE = "RELEASE"
    MIGRATE = "MIGRATE"
    #: ``make_device_exclusive`` and the restore of a device-exclusive entry
    EXCLUSIVE = "EXCLUSIVE"


class Origin(str, enum.Enum):
    """Whose context raised an invalidation (the kernel's ``current`` when
    the notifier is called).

    hpc/xpmem acts only on invalidations of the segment owner's own context
    (kernel/xpmem_mmu_notifier.c: ``if (seg_tg->tgid != current->tgid)
    return;``): the owner's munmap, mprotect, madvise, COW faults and exit.
    Those of the kernel threads -- ksmd (mm/ksm.c ``write_protect_page``,
    ``replace_page``), kswapd (mm/vmscan.c -> mm/rmap.c ``try_to_unmap``),
    migration (mm/migrate.c -> ``try_to_migrate``) -- are ignored and its pins
    stay, so those find the page pinned and leave it.
    """

    OWNER = "owner"
    KSMD = "ksmd"
    KSWAPD = "kswapd"
    MIGRATION = "migration"

    @property
    def background(self) -> bool:
        """Raised by a kernel thread, not by the address space's own task."""
        return self is not Origin.OWNER


#: The optional callbacks of ``struct mmu_notifier_ops`` a subscriber may
#: implement.  ``invalidate_range_start`` and ``invalidate_range_end`` go
#: together (a subscriber implementing one implements both).
NOTIFIER_OPS = (
    "release",
    "clear_flush_young",
    "clear_young",
    "test_young",
    "change_pte",
    "invalidate_range_start",
    "invalidate_range_end",
)


@dataclass(frozen=True, slots=True)
class Range:
    """``struct mmu_notifier_range``: ``[start, end)`` of one mm.

    ``blockable`` is false for invalidations issued where the caller may not
    sleep (the OOM reaper, ``MMU_NOTIFIER_RANGE_BLOCKABLE`` clear): sleepable
    subscribers must answer EAGAIN instead of waiting.  ``origin``: whose
    context raised it (:class:`Origin`).
    """

    mm: int
    start: int
    end: int
    event: NotifyEvent
    blockable: bool = True
    #: ``range->owner`` of a MIGRATE: the device (hmm node) that migrates
    owner: str = ""
    origin: Origin = Origin.OWNER

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end <= ADDRESS_LIMIT):
            raise ValueError(f"impossible range [{self.start:#x}, {self.end:#x})")

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and start < self.end


class Errno(str, enum.Enum):
    """The kernel error numbers the model returns, by name."""

    EPERM = "EPERM"
    ENOENT = "ENOENT"
    ESRCH = "ESRCH"
    EINTR = "EINTR"
    ENOMEM = "ENOMEM"
    EACCES = "EACCES"
    EFAULT = "EFAULT"
    EBUSY = "EBUSY"
    EEXIST = "EEXIST"
    EINVAL = "EINVAL"
    ENOSPC = "ENOSPC"
    EAGAIN = "EAGAIN"
    ESTALE = "ESTALE"
    ETIMEDOUT = "ETIMEDOUT"
    #: an internal error of the host (a bug caught before it took the host down)
    EIO = "EIO"


class KernelError(Exception):
    """An operation failed the way the kernel would fail it.

    Carries the errno name; the host turns it into an error reply, the CLI
    into a message and a non-zero exit.
    """

    def __init__(self, errno: Errno | str, message: str = "") -> None:
        self.errno = Errno(errno)
        self.message = message or self.errno.value
        super().__init__(f"{self.errno.value}: {self.message}")


def name_matches_key(name: str, key_id: str) -> bool:
    """May a node holding CURVE key ``key_id`` register as ``name``?

    Its own name, or ``KEYID-anything`` (a per-kind key ``xpmem`` covers the
    ``xpmem-<container>`` names of ``--scale``d containers, which share it
    and so are one principal).
    """
    return name == key_id or (name.startswith(key_id + "-") and len(name) > len(key_id) + 1)


#: The node kinds a key's name can say (``kind_of_key``).
NODE_KINDS = ("kvm", "gru", "xpmem", "hmm")


def kind_of_key(key_id: str) -> str | None:
    """The kind a node key serves, by its name: ``kvm``, ``kvm0``, ``kvm-a``
    are kvm keys (as ``mmn keygen --node kvm0`` and the per-kind keys of
    scaled containers name them).  None: the name says no kind."""
    for kind in sorted(NODE_KINDS, key=len, reverse=True):
        rest = key_id[len(kind):] if key_id.startswith(kind) else None
        if rest is not None and (rest == "" or rest[0].isdigit() or rest[0] == "-"):
            return kind
    return None
