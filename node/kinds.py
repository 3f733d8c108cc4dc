"""The node kinds by name: the one module that imports every kind.

``node.base`` is what the kinds share and imports none of them; this module
sits above them, so the package has no import circle::

    node.kinds ──▶ node.kvm, node.gru, node.xpmem, node.hmm ──▶ node.base

``KINDS`` is the registry: ``kind`` name -> class.  A test that needs a kind
the project does not ship (a deliberately broken one) puts it here, in its
own process; nothing shipped does.
"""

from __future__ import annotations

from protocol.types import Errno, KernelError

from .base import SecondaryMMU
from .gru import GruMMU
from .hmm import HmmMMU
from .kvm import KvmMMU
from .xpmem import XpmemMMU

#: ``kind`` -> class, in the order ``mmn node --kind`` lists them.
KINDS: dict[str, type[SecondaryMMU]] = {cls.kind: cls for cls in (KvmMMU, GruMMU, XpmemMMU, HmmMMU)}


def node_class(kind: str) -> type[SecondaryMMU]:
    """The class of a node kind: ``"kvm"``, ``"gru"``, ``"xpmem"`` or ``"hmm"``.

    Raises:
        KernelError(EINVAL) for an unknown kind.
    """
    try:
        return KINDS[kind]
    except KeyError:
        raise KernelError(Errno.EINVAL, f"unknown node kind {kind!r}") from None
