"""Which address spaces each node may reach: the memory it was granted.

In the kernel a secondary MMU mirrors the mm it was created for: KVM
registers ``current->mm`` of the VM's process (``kvm_create_vm`` ->
``kvm_init_mmu_notifier``), GRU the mm of the process that opened the
context (``gru_register_mmu_notifier(current->mm)``), and it reaches other
memory only through a permit (XPMEM's segments and apids).  A node of this
model is a separate process holding a key, so the host keeps that binding
itself: a node may subscribe to, fault and access an mm only after an
operator pointed it there.

* Any admin command that directs a node at an mm grants it (``fault``,
  ``access``, ``subscribe``, ``xpmem make``), read-write, unless an explicit
  grant already says otherwise; ``grant`` / ``revoke`` do it explicitly.
* An XPMEM permit (``broker/xpmem.py``) reaches the segment's mm without a
  grant: that is what a permit is.
* A grant ends when its mm exits, or on ``revoke``.

Sans-I/O, no clock.  Grants belong to the node's name, not to one session:
a node that restarts (same name, same key) is still the node the operator
pointed at that mm.
"""

from __future__ import annotations


class Grants:
    """node name -> {mm: writable}."""

    def __init__(self) -> None:
        self.by_node: dict[str, dict[int, bool]] = {}

    def point(self, node: str, mm: int) -> None:
        """An admin command directed ``node`` at ``mm``: read-write, unless
        an explicit grant (``--read-only``) is already there."""
        self.by_node.setdefault(node, {}).setdefault(mm, True)

    def grant(self, node: str, mm: int, write: bool) -> None:
        self.by_node.setdefault(node, {})[mm] = write

    def revoke(self, node: str, mm: int) -> bool:
        """Returns whether ``node`` held a grant of ``mm``."""
        held = self.by_node.get(node)
        if held is None or mm not in held:
            return False
        del held[mm]
        if not held:
            del self.by_node[node]
        return True

    def may(self, node: str, mm: int, write: bool = False) -> bool:
        writable = self.by_node.get(node, {}).get(mm)
        return writable is not None and (writable or not write)

    def forget_mm(self, mm: int) -> None:
        """``mm`` exited: every grant of it ends."""
        for node in [n for n, held in self.by_node.items() if mm in held]:
            self.revoke(node, mm)

    def of(self, node: str) -> dict[int, bool]:
        return dict(self.by_node.get(node, {}))
