"""Plain-text rendering for people: tables, key/value blocks, hex dumps, status.

No third-party dependency (``mmn up`` colours the live view with rich when it
is installed, the ``bench`` extra; see :mod:`mmn.up`).  Everything returns a
string; the caller prints it.  ``--json`` output does not come through here
except :func:`jsonable`, which turns a result into something ``json`` can
write (bytes become hex strings).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Counters of ``/sys/kernel/mm/ksm`` in the order the kernel documents them,
#: then the knobs.  Anything else the host reports is shown after these.
KSM_ORDER = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "ksm_zero_pages",
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "max_page_sharing",
    "use_zero_pages",
)


def jsonable(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps`` accepts: bytes -> hex string,
    tuples -> lists, map keys -> strings."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def cell(value: Any) -> str:
    """One value as table text: None -> ``-``, bools as yes/no, bytes as hex."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex() or "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v) for v in value) or "-"
    return str(value)


def _numeric(text: str) -> bool:
    return text.lstrip("-").replace(".", "", 1).isdigit() or text.startswith("0x")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain table: upper-case headers, columns padded, numbers right-aligned.

    An empty ``rows`` renders the header line and ``(none)``.
    """
    text_rows = [[cell(v) for v in row] for row in rows]
    heads = [h.upper() for h in headers]
    widths = [len(h) for h in heads]
    for row in text_rows:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    right = [bool(text_rows) and all(_numeric(r[i]) or r[i] == "-" for r in text_rows) for i in range(len(heads))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=False)]
        return "  ".join(parts).rstrip()

    out = [line(heads)]
    out.extend(line(r) for r in text_rows)
    if not text_rows:
        out.append("(none)")
    return "\n".join(out)


def keyvalues(pairs: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> str:
    """``key  value`` lines, keys padded to one column."""
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    if not items:
        return "ok"
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k.ljust(width)}  {cell(v)}" for k, v in items)


def hexdump(data: bytes, base: int = 0) -> str:
    """``xxd``-style dump, 16 bytes a line, addresses starting at ``base``."""
    if not data:
        return "(no data)"
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{base + off:#014x}  {hexes:<47}  |{text}|")
    return "\n".join(lines)


def ksm_pairs(ksm: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """KSM counters and knobs in the kernel's order, unknown names last."""
    known = [(k, ksm[k]) for k in KSM_ORDER if k in ksm]
    rest = [(k, v) for k, v in ksm.items() if k not in KSM_ORDER]
    return known + rest


def _vma(vma: Any) -> str:
    if isinstance(vma, Mapping) and isinstance(vma.get("start"), int) and isinstance(vma.get("end"), int):
        # the host's form: {"start", "end", "prot", "shared", "mergeable"}
        flags = ("shared" if vma.get("shared") else "private") + (",mergeable" if vma.get("mergeable") else "")
        return f"{vma['start']:#x}-{vma['end']:#x} {cell(vma.get('prot'))} {flags}"
    if isinstance(vma, (list, tuple)) and len(vma) >= 2:
        start, end, *rest = vma
        extra = " ".join(cell(x) for x in rest)
        span = f"{start:#x}-{end:#x}" if isinstance(start, int) and isinstance(end, int) else f"{start}-{end}"
        return f"{span} {extra}".rstrip()
    return cell(vma)


def injected(value: Any) -> str:
    """What is injected on a node, e.g. ``delay-acks(delay_ms=50)``, or ``-``."""
    if not value:
        return "-"
    if isinstance(value, Mapping):
        parts = []
        for kind, params in value.items():
            if isinstance(params, Mapping) and params:
                inner = ",".join(f"{k}={cell(v)}" for k, v in params.items())
                parts.append(f"{kind}({inner})")
            elif params in (True, None, {}) or params == kind:
                parts.append(str(kind))
            else:
                parts.append(f"{kind}({cell(params)})")
        return " ".join(parts)
    return cell(value)


def nodes_table(nodes: Sequence[Mapping[str, Any]]) -> str:
    return table(
        ("node", "kind", "state", "epoch", "mapped", "injected"),
        [
            (n.get("name"), n.get("kind"), n.get("state"), n.get("epoch"), n.get("mapped_pages"), injected(n.get("injected")))
            for n in nodes
        ],
    )


#: Pages of one node and mm shown in full by :func:`mappings_table`.
MAPPINGS_SHOWN = 8


def mappings_table(nodes: Sequence[Mapping[str, Any]]) -> str:
    """What each node maps, as the node itself reports it: one row per node
    and mm, ``page=pfn`` pairs (the first :data:`MAPPINGS_SHOWN`, then a count)."""
    rows = []
    for n in nodes:
        mms = n.get("mms")
        if not isinstance(mms, Mapping):
            continue
        for mm, pages in mms.items():
            if not isinstance(pages, Mapping) or not pages:
                continue
            pairs = [f"{addr}={pfn}" for addr, pfn in list(pages.items())[:MAPPINGS_SHOWN]]
            if len(pages) > MAPPINGS_SHOWN:
                pairs.append(f"(+{len(pages) - MAPPINGS_SHOWN} more)")
            rows.append((cell(n.get("name")), cell(mm), " ".join(pairs)))
    heads = ("NODE", "MM", "PAGE=PFN")
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(2)]
    lines = [f"{r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  {r[2]}".rstrip() for r in [heads, *rows]]
    return "\n".join(lines if rows else [*lines, "(none)"])


def mms_table(mms: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for mm in mms:
        vmas = mm.get("vmas") or []
        first = _vma(vmas[0]) if vmas else "-"
        rows.append((mm.get("mm"), first, mm.get("present"), mm.get("swapped")))
        rows.extend(("", _vma(v), "", "") for v in vmas[1:])
    return table(("mm", "vmas", "present", "swapped"), rows)


def more_hints(result: Mapping[str, Any]) -> list[str]:
    """Where a paged status left things out, the command that shows the rest."""
    hints = []
    mms = result.get("mms") or []
    if result.get("mms_next"):
        hints.append(f"(mms: {len(mms)} of {result.get('mms_total', '?')} shown; "
                     f"next: mmn status --cursor {result['mms_next']})")
    for n in result.get("nodes") or []:
        if n.get("mms_next"):
            hints.append(f"({n.get('name')}: {n.get('mapped_pages', '?')} pages mapped, a page shown; "
                         f"next: mmn status --node {n.get('name')} --cursor {n['mms_next']})")
    return ["", *hints] if hints else []


def status(result: Mapping[str, Any]) -> str:
    """The whole ``status`` result for people: host, frames, nodes, mms, KSM."""
    host = result.get("host") or {}
    endpoints = host.get("endpoints") or {}
    frames = result.get("frames") or {}
    head = [
        ("host", host.get("incarnation")),
        ("page_size", host.get("page_size")),
        ("endpoints", " ".join(f"{k}={v}" for k, v in endpoints.items()) or None),
        ("frames", f"{frames.get('free', '?')} free of {frames.get('total', '?')}"),
        ("stale_accesses", result.get("stale_accesses")),
    ]
    nodes = result.get("nodes") or []
    parts = [keyvalues(head), "", nodes_table(nodes)]
    if any(isinstance(n.get("mms"), Mapping) for n in nodes):  # hosts that report the nodes' own views
        parts += ["", mappings_table(nodes)]
    parts += ["", mms_table(result.get("mms") or [])]
    parts += more_hints(result)
    ksm = result.get("ksm") or {}
    if ksm:
        parts += ["", "ksm  " + "  ".join(f"{k}={cell(v)}" for k, v in ksm_pairs(ksm))]
    counters = result.get("counters") or {}
    if counters:
        parts += ["", "counters  " + "  ".join(f"{k}={cell(v)}" for k, v in counters.items())]
    return "\n".join(parts)


def status_line(result: Mapping[str, Any]) -> str:
    """One line summarising a status, for logs (``mmn up`` without a TTY)."""
    frames = result.get("frames") or {}
    ksm = result.get("ksm") or {}
    nodes = " ".join(
        f"{n.get('name')}:{n.get('state')}/e{n.get('epoch')}/{n.get('mapped_pages')}p"
        + ("/" + injected(n.get("injected")) if n.get("injected") else "")
        for n in result.get("nodes") or []
    )
    return (
        f"nodes [{nodes}] frames {frames.get('free', '?')}/{frames.get('total', '?')} free"
        f" stale_accesses {result.get('stale_accesses')}"
        f" ksm shared={ksm.get('pages_shared', '-')} sharing={ksm.get('pages_sharing', '-')}"
        f" full_scans={ksm.get('full_scans', '-')}"
    )


def fold(label: str, items: Iterable[str], width: int, sep: str = " ") -> list[str]:
    """``label  a b c ...`` wrapped at ``width`` columns, continuation lines
    indented under the first item; items joined by ``sep``."""
    indent = len(label) + 2
    lines: list[str] = []
    line = label
    for item in items:
        if line.strip() != label and len(line) + len(sep) + len(item) > width:
            lines.append(line)
            line = " " * indent + item
        elif line == label:
            line = f"{label}  {item}"
        else:
            line = line + (sep if line.strip() else "") + item
    lines.append(line)
    return lines


def clip(line: str, width: int) -> str:
    """``line`` cut to ``width`` columns, an ellipsis marking the cut."""
    return line if len(line) <= width else line[: max(0, width - 1)] + "…"


def live_view(
    result: Mapping[str, Any] | None, width: int, height: int, *, title: str, footer: Sequence[str] = ()
) -> list[str]:
    """The live status of ``mmn up`` in at most ``height`` lines of at most
    ``width`` columns: what matters first (frames, ``stale_accesses``, the
    node table, the processes and notes), then mms, mappings, KSM and the
    counters folded to the width, as far as they fit; a last line says what
    was left out (``mmn status`` shows everything)."""
    width, height = max(width, 20), max(height, 4)
    if result is None:
        first = [title, "", "(the host is not answering)", "", *footer]
        rest: list[str] = []
    else:
        frames = result.get("frames") or {}
        head = (f"frames {frames.get('free', '?')} free of {frames.get('total', '?')}   "
                f"stale_accesses {result.get('stale_accesses')}")
        nodes = result.get("nodes") or []
        first = [title, head, "", *nodes_table(nodes).splitlines(), "", *footer]
        rest = []
        if any(isinstance(n.get("mms"), Mapping) for n in nodes):
            rest += ["", *mappings_table(nodes).splitlines()]
        rest += ["", *mms_table(result.get("mms") or []).splitlines()]
        ksm = result.get("ksm") or {}
        if ksm:
            rest += ["", *fold("ksm", (f"{k}={cell(v)}" for k, v in ksm_pairs(ksm)), width)]
        counters = result.get("counters") or {}
        if counters:
            rest += ["", *fold("counters", (f"{k}={cell(v)}" for k, v in counters.items()), width)]
    lines = [clip(line, width) for line in first]
    if len(lines) > height:  # even the essentials overflow: keep the top, say so
        cut = len(lines) - height + 1
        return [*lines[: height - 1], clip(f"(+{cut} lines: a taller terminal, or mmn status)", width)]
    room = height - len(lines)
    extra = [clip(line, width) for line in rest]
    if len(extra) <= room:
        return lines + extra
    shown = extra[: max(0, room - 1)]
    return [*lines, *shown, clip(f"(+{len(extra) - len(shown)} lines: mmn status shows everything)", width)]


# --------------------------------------------------------------------------
# output: what every command prints goes through these


#: The command's name, at the head of every error line.
PROG = "mmn"


def emit_json(doc: Any) -> None:
    """One JSON document on a line of stdout (bytes as hex)."""
    sys.stdout.write(json.dumps(jsonable(doc), separators=(",", ":")) + "\n")
    sys.stdout.flush()


def emit(text: str) -> None:
    """Text for people on stdout, ending with one newline."""
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    """One line on stderr: ``mmn: MESSAGE`` (whitespace folded)."""
    sys.stderr.write(f"{PROG}: {' '.join(message.split())}\n")
    sys.stderr.flush()

