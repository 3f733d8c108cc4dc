"""``status`` stays within the frame limit at any scale (issue 13).

The summary is bounded by default; mms and a node's translations come a page
at a time behind a cursor.  The host's handler runs here through the host
core (:class:`mmnotify.local.LocalCluster`, the same handler ``mmn host``
runs); every reply is checked the way the CLI's decoder checks it.  The
real-process test at 500,000 mapped pages is in tests/test_integration.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from mmnotify.local import LocalCluster
from protocol import Limits
from protocol.codec import encode_within
from protocol.errors import ProtocolError
from protocol.messages import AdminReply
from protocol.status import MMS_PAGE, NODE_PREVIEW, page_translations, parse_page_cursor
from protocol.types import Errno, KernelError

PS = 4096


def fits(result: dict[str, Any]) -> int:
    """The reply's size on the wire; fails if a client could not take it."""
    return len(encode_within(AdminReply(ref=1, ok=True, result=result), Limits()))


def test_a_hundred_thousand_mms_page_through_a_bounded_status() -> None:
    c = LocalCluster(frames=64)
    model = c.core.model
    ids = [model.spawn() for _ in range(100_000)]
    first = c.admin("status")
    assert fits(first) < 256 << 10
    assert len(first["mms"]) == MMS_PAGE and first["mms_total"] == 100_000 and first["mms_next"]
    seen, cursor = [], None
    while True:
        page = c.admin("status", cursor=cursor, limit=8192)
        fits(page)
        seen += [m["mm"] for m in page["mms"]]
        cursor = page["mms_next"]
        if cursor is None:
            break
    assert seen == ids  # every mm once, in order
    one = c.admin("status", mm=ids[500])
    assert [m["mm"] for m in one["mms"]] == [ids[500]] and one["mms_next"] is None


def test_the_old_unbounded_reply_would_not_have_fit() -> None:
    """The net under the paging: a reply a client could not decode is refused
    before it is sent (here: the whole mm list in one reply, as before)."""
    c = LocalCluster(frames=64)
    model = c.core.model
    for _ in range(70_000):
        model.spawn()
    everything = [model.describe_mm(i) for i in model.mms]
    with pytest.raises(ProtocolError) as err:
        fits({"mms": everything})
    assert err.value.code == "too_large"


def test_bad_cursors_limits_mms_and_nodes_are_refused_and_change_nothing() -> None:
    c = LocalCluster(frames=64, nodes={"kvm0": "kvm"})
    mm = c.core.model.spawn()
    before = c.admin("status")
    for args, errno in [
        ({"cursor": "p1:10"}, Errno.EINVAL),  # a node cursor for the mm list
        ({"cursor": "m1x"}, Errno.EINVAL),
        ({"node": "kvm0", "cursor": "m3"}, Errno.EINVAL),  # an mm cursor for a node's pages
        ({"node": "nosuch"}, Errno.ESRCH),
        ({"mm": mm + 10}, Errno.ESRCH),
    ]:
        with pytest.raises(KernelError) as err:
            c.admin("status", **args)
        assert err.value.errno is errno, args
    with pytest.raises(KernelError) as err:
        c.admin("status", limit=0)
    assert err.value.errno is Errno.EINVAL
    after = c.admin("status")
    assert after["mms"] == before["mms"] and after["frames"] == before["frames"]


def test_page_translations_walks_every_page_once_whatever_the_page_size() -> None:
    table = {1: {a * PS: a for a in range(1, 40)}, 2: {}, 5: {a * PS: 100 + a for a in range(7)}}
    everything = [(mm, a) for mm in sorted(table) for a in sorted(table[mm])]
    for limit in (1, 2, 7, 38, 39, 40, 46, 100):
        seen, after = [], None
        while True:
            page, rest = page_translations(table, after=after, limit=limit)
            assert sum(len(p) for p in page.values()) <= limit
            seen += [(int(mm), int(a, 16)) for mm, pages in page.items() for a in pages]
            if rest is None:
                break
            after = parse_page_cursor(rest)
        assert seen == everything, limit
    page, rest = page_translations(table, mm=5, limit=100)
    assert list(page) == ["5"] and len(page["5"]) == 7 and rest is None


def test_a_node_reports_a_page_of_its_translations_and_the_cursor_of_the_rest() -> None:
    """The node side of the paging, on the node kind that runs in ``mmn node``."""
    c = LocalCluster(frames=64, nodes={"kvm0": "kvm"})
    mm = c.admin("spawn")["mm"]
    addr = c.admin("mmap", mm=mm, pages=NODE_PREVIEW + 40)["addr"]
    c.fault("kvm0", mm, addr, NODE_PREVIEW + 40)
    node = c.node("kvm0")
    summary = node.status()
    assert summary["mapped_pages"] == NODE_PREVIEW + 40
    assert sum(len(p) for p in summary["mms"].values()) == NODE_PREVIEW and summary["mms_next"]
    rest = node.status(cursor=summary["mms_next"], limit=1000)
    assert sum(len(p) for p in rest["mms"].values()) == 40 and rest["mms_next"] is None
    with pytest.raises(KernelError):
        node.status(cursor="m1")


def test_a_page_a_node_did_not_send_in_time_is_an_error_not_the_end_of_its_translations() -> None:
    """A walk of ``status --node N --cursor C`` must not end early because one
    page did not come: the reply is ETIMEDOUT (ask again with the same
    cursor), not an empty page without a cursor.  The summary still answers,
    with the host's own count and ``answered`` False."""
    c = LocalCluster(frames=64, nodes={"kvm0": "kvm"})
    mm = c.admin("spawn")["mm"]
    addr = c.admin("mmap", mm=mm, pages=40)["addr"]
    c.fault("kvm0", mm, addr, 40)
    c.hold("kvm0")  # reads nothing: the relayed status times out
    reply = c.admin_reply(c.admin_begin("status", node="kvm0", limit=16))
    assert not reply.ok and reply.errno == "ETIMEDOUT", reply
    summary = c.admin_reply(c.admin_begin("status"))
    assert summary.ok
    (kvm,) = summary.result["nodes"]
    assert kvm["answered"] is False and kvm["mapped_pages"] == 40 and kvm["mms"] == {}
    c.heal("kvm0")
    c.pump()
    seen, cursor = 0, None
    while True:
        (page,) = c.admin("status", node="kvm0", cursor=cursor, limit=16)["nodes"]
        assert page["answered"] is True
        seen += sum(len(p) for p in page["mms"].values())
        cursor = page["mms_next"]
        if cursor is None:
            break
    assert seen == 40


def test_the_status_says_the_hosts_liveness_rules() -> None:
    c = LocalCluster(frames=16)
    host = c.admin("status")["host"]
    cfg = c.core.config
    assert (host["liveness"], host["command_timeout_ms"], host["heartbeat_ms"]) == \
        (cfg.liveness, cfg.command_timeout_ms, cfg.heartbeat_ms)


def test_a_failed_mmap_fill_through_the_admin_api_leaves_nothing_behind() -> None:
    """``mmn mmap --fill`` with too few frames: ENOMEM, no mapping, every
    frame back, and the next writer is not starved (issue 13)."""
    c = LocalCluster(frames=8)
    mm = c.admin("spawn")["mm"]
    free = c.admin("status")["frames"]["free"]
    with pytest.raises(KernelError) as err:
        c.admin("mmap", mm=mm, pages=16, fill=0x11)
    assert err.value.errno is Errno.ENOMEM
    after = c.admin("status")
    assert after["frames"]["free"] == free and after["mms"][0]["vmas"] == []
    addr = c.admin("mmap", mm=mm, pages=4, fill=0x22)["addr"]
    assert c.admin("read", mm=mm, addr=addr, length=2)["data"] == b"\x22\x22"
    c.check()
