"""Scale of the primary-MMU model: metadata bytes per mapped page, and munmap
cost against populated pages rather than range size.

    python benchmarks/mm_scale.py [--pages 1048576] [--json]

Prints, for one mm with ``--pages`` pages of address space all populated:
the host metadata per mapped page (page-table chunks + per-frame arrays;
the kernel spends about 72 bytes: an 8-byte pte and a 64-byte struct page),
and the time of munmap of a 1 GiB range with 1, 1,000 and 100,000 pages
populated, each next to the time of a plain Python loop over the same number
of pages (the floor measured in the same run), so the ratio is what to compare.
No node is subscribed (the notifier fan-out is measured by ``mmn bench``).

With ``--ksm-pages N`` it also measures the KSM scan as ``mmn bench`` does:
two full passes of ksmd over N mergeable pages of 64 distinct contents
(the first takes checksums, the second merges), in pages per second, against
plain BLAKE2b of the same pages (the floor); the ratio is the figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.mm import Model, run_op  # noqa: E402

PS = 4096
GIB_PAGES = (1 << 30) // PS


def metadata_per_page(npages: int) -> dict[str, Any]:
    """Populate ``npages`` pages of one mm; measure the Python heap the page
    table takes (tracemalloc) plus the per-frame arrays."""
    model = Model(frames=npages + 1, page_size=PS, swap_slots=2)
    mm = model.spawn()
    addr = run_op(model.mmap(mm, npages))
    m = model.mms[mm]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    # populate by write faults without touching the contents (one zero-fill per frame)
    for i in range(npages):
        run_op(model.handle_mm_fault(mm, addr + i * PS, True))
    populate_s = time.perf_counter() - t0
    gc.collect()
    table_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    frame_bytes = model.memory.metadata_bytes()
    present, _ = m.rss()
    out = {
        "pages": npages,
        "present": present,
        "page_table_bytes": table_bytes,
        "frame_metadata_bytes": frame_bytes,
        "bytes_per_page": round((table_bytes + frame_bytes) / npages, 2),
        "kernel_bytes_per_page": 72,
        "populate_s": round(populate_s, 3),
        "populate_us_per_page": round(populate_s / npages * 1e6, 2),
    }
    model.close()
    return out


def _floor(n: int) -> float:
    """A plain Python loop over ``n`` items with a dict lookup and an array
    store each: what touching n ptes costs at the least, in this interpreter."""
    from array import array

    a = array("Q", bytes(8 * max(n, 1)))
    d = {i: i for i in range(n)}
    t0 = time.perf_counter()
    for i in range(n):
        a[i] = d[i] & 0
    return time.perf_counter() - t0


def munmap_1gib(populated: int, repeat: int = 3) -> dict[str, Any]:
    """munmap of a 1 GiB vma with ``populated`` pages spread over it."""
    best = float("inf")
    floor = min(_floor(populated) for _ in range(repeat))
    for _ in range(repeat):
        model = Model(frames=populated + 1, page_size=PS, swap_slots=2)
        mm = model.spawn()
        addr = run_op(model.mmap(mm, GIB_PAGES))
        stride = max(GIB_PAGES // populated, 1)
        for i in range(populated):
            run_op(model.handle_mm_fault(mm, addr + i * stride * PS, True))
        gc.collect()
        t0 = time.perf_counter()
        run_op(model.munmap(mm, addr, GIB_PAGES * PS))
        best = min(best, time.perf_counter() - t0)
        assert model.memory.in_use == 0
        model.close()
    return {
        "populated": populated,
        "range_pages": GIB_PAGES,
        "munmap_s": round(best, 6),
        "us_per_populated_page": round(best / populated * 1e6, 2),
        "floor_s": round(floor, 6),
        "ratio_to_floor": round(best / floor, 1) if floor > 0 else None,
    }


def ksm_scan(pages: int) -> dict[str, Any]:
    """Two full KSM passes over ``pages`` pages against BLAKE2b of them: the
    bench's own measurement (``benchmarks.suite.measure_ksm``), standalone."""
    from benchmarks.suite import measure_ksm

    return measure_ksm(pages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=1 << 20, help="pages populated for the memory figure")
    parser.add_argument("--populated", type=int, nargs="*", default=[1, 1000, 100_000])
    parser.add_argument("--ksm-pages", type=int, default=0, help="also measure the KSM scan over this many pages")
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args(argv)
    result: dict[str, Any] = {"memory": metadata_per_page(ns.pages),
                              "munmap_1gib": [munmap_1gib(n) for n in ns.populated]}
    if ns.ksm_pages:
        result["ksm"] = ksm_scan(ns.ksm_pages)
    if ns.json:
        print(json.dumps(result))
        return 0
    mem = result["memory"]
    print(f"{mem['pages']:,} pages populated in one mm in {mem['populate_s']} s "
          f"({mem['populate_us_per_page']} us/page)")
    print(f"  page table {mem['page_table_bytes']:,} B + frame metadata {mem['frame_metadata_bytes']:,} B "
          f"= {mem['bytes_per_page']} B per mapped page (kernel: about 72)")
    print("munmap of a 1 GiB range:")
    print(f"  {'populated':>10} {'time':>10} {'us/page':>9} {'floor':>10} {'ratio':>6}")
    for row in result["munmap_1gib"]:
        print(f"  {row['populated']:>10,} {row['munmap_s']:>10.6f} {row['us_per_populated_page']:>9} "
              f"{row['floor_s']:>10.6f} {row['ratio_to_floor']:>6}")
    if "ksm" in result:
        k = result["ksm"]
        print(f"KSM: {k['pages_scanned']:,} pages scanned in two passes over {k['pages']:,}, "
              f"{k['scanned_per_s']:,}/s against BLAKE2b {k['hash_per_s']:,}/s: {k['ratio']}x "
              f"({k['pages_shared']} shared, {k['pages_sharing']:,} sharing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
