"""The ``hmm_pfns`` flag bits of :class:`protocol.messages.HmmRangeFaultReply`
and the page states of ``mmn hmm snapshot``.

Pure data.  Bits after ``enum hmm_pfn_flags`` (include/linux/hmm.h); the
states are ``lib/test_hmm.c``'s ``HMM_DMIRROR_PROT_*`` (``dmirror_mkentry``).
"""

from __future__ import annotations

#: the entry is valid: ``pfn`` backs the page (else nothing is mapped there)
HMM_PFN_VALID = 0x01
#: the primary pte is writable
HMM_PFN_WRITE = 0x02
#: the page can never be had (no vma, PROT_NONE): ``HMM_PFN_ERROR``
HMM_PFN_ERROR = 0x04
#: the shared zero page
HMM_PFN_ZERO = 0x08
#: a device-private entry; ``pfn`` is meaningless (the device holds the data)
HMM_PFN_DEVICE_PRIVATE = 0x10
#: a device-private entry owned by the asking node (else another hmm node's)
HMM_PFN_DEVICE_OWNER = 0x20
#: a device-exclusive entry (``make_device_exclusive``)
HMM_PFN_EXCLUSIVE = 0x40

#: ``mmn hmm snapshot`` page states, in ``HMM_DMIRROR_PROT_*`` order, and
#: ``exclusive`` (the model's: a device-exclusive entry this node holds; for
#: any other walker it is not present, ``none``).
STATES = ("none", "error", "read", "write", "zero", "device-private", "device-private-remote", "exclusive")


def state_of(flags: int) -> str:
    """The snapshot state of one entry (``dmirror_mkentry``)."""
    if flags & HMM_PFN_ERROR:
        return "error"
    if not flags & HMM_PFN_VALID:
        return "none"
    if flags & HMM_PFN_DEVICE_PRIVATE:
        return "device-private" if flags & HMM_PFN_DEVICE_OWNER else "device-private-remote"
    if flags & HMM_PFN_EXCLUSIVE:
        return "exclusive"
    if flags & HMM_PFN_ZERO:
        return "zero"
    return "write" if flags & HMM_PFN_WRITE else "read"
