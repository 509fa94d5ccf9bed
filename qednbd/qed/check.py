"""Consistency check of a QED image: reads only, and reports what it found as data.

Theory of operation
-------------------
A QED file is a bump-allocated sequence of clusters: the header clusters, the L1 table,
then data clusters and L2 tables in allocation order. Every cluster after the header
should be referenced exactly once: by the header (the L1 table), by an L1 entry (an L2
table's ``table_size`` clusters), or by an L2 entry (one data cluster). A crash during an
allocating write can leave entries that point past the end of the file, or clusters that
nothing points to. :func:`check` counts what ``qemu-img check`` counts, the same way:

1. Mark the L1 table's clusters used.
2. For each non-zero entry of the **whole** L1 table (all ``table_entries``, not only the
   prefix an image of this size can address): an offset that is not a valid table
   offset (aligned, after the header, whole table before the end of the file) is one
   corruption and is not followed. Otherwise mark the table's clusters; each one already
   marked is a corruption (a table shared with another table, or with L1), and such a
   table is not read. Otherwise read the table; a read error is a *check error*.
3. For each L2 entry other than 0 (unallocated) and 1 (zero cluster): count it
   allocated (invalid entries too, as QEMU does); count it fragmented when it is not the
   previous such entry of the same table plus one cluster; an invalid cluster offset is
   a corruption; otherwise mark the cluster, and a cluster already marked is a
   corruption (referenced twice, or an entry pointing into L1 or an L2 table).
4. Only if every table could be read: every cluster from ``header_size`` up to the end
   of the file (its length rounded down to a cluster) that is not marked is a leak. A
   partial cluster at the end of the file is ignored, as it is by QEMU (the next
   allocation overwrites it).

Validity is judged against the image's allocation pointer (``QedImage.file_size``: the
file length rounded down to a cluster when the image was opened), as QEMU does.

Where we differ from QEMU, on purpose:

* QEMU converts a byte offset to a cluster index by dividing by ``cluster_size - 1``
  (``qed_bytes_to_clusters``), so once a file holds more than ``cluster_size - 1``
  clusters (16 MiB at 4 KiB clusters, 4 GiB at 64 KiB) its bitmap has indices that no
  cluster maps to, and it reports them as leaks on a clean image. We divide by
  ``cluster_size``.
* A table_size 1 image is checked (QEMU's table-offset rule rejects every table then,
  so it cannot open such an image at all); see :func:`qednbd.qed.format.table_offset_valid`.
* An I/O error is counted and the check goes on with the next table, so the report
  still says what could be read; QEMU's QED check then fails as a whole.

Memory: one bit per cluster of the file (refused beyond :data:`MAX_BITMAP_BYTES`), one
bounded read of table entries at a time (:data:`MAX_READ_BYTES`) and at most
:data:`MAX_FINDINGS` findings; the counters stay exact when findings are dropped. The
check never reads a data cluster and never writes.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from itertools import compress

from qednbd.errors import ImageError
from qednbd.qed import format as fmt
from qednbd.qed.geometry import ENTRY_BYTES
from qednbd.qed.image import QedImage
from qednbd.qed.tables import ZERO_CLUSTER, decode_entries

# One pread of table entries: the default table (64 KiB x 4) in one go, larger ones paged.
MAX_READ_BYTES = 256 * 1024
# Enough to locate the damage; a hostile image could otherwise yield one per entry.
MAX_FINDINGS = 4096
# One bit per cluster: 1 GiB covers a 512 TiB file of 64 KiB clusters; a sparse file
# claiming more would make the bitmap alone exhaust memory.
MAX_BITMAP_BYTES = 1 << 30
_PROGRESS_EVERY_TABLES = 64  # L2 tables between two progress reports
_POPCOUNT_CHUNK = 1 << 16  # bitmap bytes turned into one int at a time when counting
_SCAN_BLOCK_BYTES = 4096  # table bytes compared with zeros, then decoded, at a time
_ZERO_BLOCK = bytes(_SCAN_BLOCK_BYTES)
_NOT_ALL_USED = re.compile(rb"[^\xff]+")
_ZERO_BYTES_OR_ONE = re.compile(rb"\x00+|.", re.DOTALL)


class FindingKind(StrEnum):
    L1_INVALID = "l1-invalid"  # an L1 entry that is not a valid L2 table offset
    L2_INVALID = "l2-invalid"  # an L2 entry that is not a valid data cluster offset
    DUPLICATE = "duplicate"  # an entry whose cluster(s) something else already references
    LEAK = "leak"  # a run of clusters that nothing references
    IO_ERROR = "io-error"  # a table that could not be read


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the check found, and where.

    ``table_offset``/``index`` locate the entry (in the L1 table or in the L2 table at
    that offset) and ``value`` is what it holds; ``guest_offset`` is the first guest
    byte the entry serves. For a leak, ``value`` is the first leaked cluster's byte
    offset and the location fields are None. ``count`` is how many corruptions (for a
    shared table: the clusters already referenced) or leaked clusters this finding is.
    """

    kind: FindingKind
    table_offset: int | None
    index: int | None
    value: int
    guest_offset: int | None = None
    count: int = 1
    detail: str = ""


@dataclass(frozen=True, slots=True)
class CheckReport:
    """Counters with ``qemu-img check``'s meaning, plus the findings behind them."""

    corruptions: int
    leaks: int
    check_errors: int
    image_end_offset: int  # the file's length in bytes
    total_clusters: int  # guest clusters: ceil(image_size / cluster_size)
    allocated_clusters: int  # L2 entries holding an offset (valid or not)
    fragmented_clusters: int  # ... not following the previous one of their table
    findings: tuple[Finding, ...]
    findings_truncated: bool = False  # more than MAX_FINDINGS (the counters count them all)
    need_check: bool = False  # the header's NEED_CHECK bit (not counted as an error)
    corruptions_fixed: int = 0
    leaks_fixed: int = 0

    @property
    def exit_code(self) -> int:
        """``qemu-img check``'s: 1 incomplete, 2 corruptions, 3 leaks only, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


class ClusterBitmap:
    """One bit per cluster of the file: set when something references the cluster."""

    def __init__(self, n_clusters: int, first_checked: int) -> None:
        n_bytes = -(-n_clusters // 8)
        if n_bytes > MAX_BITMAP_BYTES:
            raise ImageError(
                errno.ENOMEM,
                f"the file has {n_clusters} clusters; checking it needs a {n_bytes}-byte bitmap, "
                f"more than the limit of {MAX_BITMAP_BYTES}",
            )
        self.bits = bytearray(n_bytes)
        self.n_clusters = n_clusters
        # The header clusters and the padding after the last cluster count as used, so
        # that every clear bit is a leak; no valid offset can point at either.
        for i in (*range(min(first_checked, n_clusters)), *range(n_clusters, n_bytes * 8)):
            self.bits[i >> 3] |= 1 << (i & 7)

    def mark(self, first: int, n: int) -> int:
        """Mark clusters [first, first+n); return how many were already marked."""
        bits = self.bits
        already = 0
        for i in range(first, first + n):
            byte = bits[i >> 3]
            bit = 1 << (i & 7)
            if byte & bit:
                already += 1
            else:
                bits[i >> 3] = byte | bit
        return already

    def any_marked(self, first: int, n: int) -> bool:
        bits = self.bits
        return any(bits[i >> 3] & (1 << (i & 7)) for i in range(first, first + n))

    def last_marked(self) -> int:
        """Index of the highest marked cluster below ``n_clusters`` (-1 if none)."""
        n = self.n_clusters
        for i in range(n - 1, (n & ~7) - 1, -1):  # the last, partly used byte
            if self.bits[i >> 3] & (1 << (i & 7)):
                return i
        whole = bytes(self.bits[: n >> 3]).rstrip(b"\0")
        if not whole:
            return -1
        return (len(whole) - 1) * 8 + whole[-1].bit_length() - 1

    def count_clear(self) -> int:
        view = memoryview(self.bits)
        used = 0
        for start in range(0, len(view), _POPCOUNT_CHUNK):
            used += int.from_bytes(view[start : start + _POPCOUNT_CHUNK], "little").bit_count()
        return len(view) * 8 - used

    def clear_runs(self) -> Iterator[tuple[int, int]]:
        """(first cluster, count) of each maximal run of clear bits, in order.

        Whole zero bytes are taken eight clusters at a time, so a long leaked stretch costs
        one step; only bytes with both used and unused clusters are looked at bit by bit.
        """
        bits = self.bits
        run_start = run_end = -1
        for span in _NOT_ALL_USED.finditer(bits):
            for piece in _ZERO_BYTES_OR_ONE.finditer(bits, span.start(), span.end()):
                first = piece.start() * 8
                if bits[piece.start()] == 0:
                    clear = [(first, piece.end() * 8)]
                else:
                    byte = bits[piece.start()]
                    clear = [(first + b, first + b + 1) for b in range(8) if not byte & (1 << b)]
                for lo, hi in clear:
                    if lo == run_end:
                        run_end = hi
                        continue
                    if run_start >= 0:
                        yield run_start, run_end - run_start
                    run_start, run_end = lo, hi
        if run_start >= 0:
            yield run_start, run_end - run_start


def nonzero_entries(raw: bytes, first: int) -> Iterator[tuple[int, int]]:
    """(index, value) of each non-zero entry in ``raw``, entries numbered from ``first``.

    Tables are mostly zeros: all-zero blocks are skipped by a C-level comparison, and only
    the entries of the other blocks are decoded and walked.
    """
    block = _SCAN_BLOCK_BYTES
    for lo in range(0, len(raw), block):
        hi = min(lo + block, len(raw))
        if raw.startswith(_ZERO_BLOCK[: hi - lo], lo):
            continue
        entries = decode_entries(raw[lo:hi])
        base = first + lo // ENTRY_BYTES
        for i in compress(range(len(entries)), entries):
            yield base + i, entries[i]


def table_chunks(table_offset: int, n_entries: int) -> Iterator[tuple[int, int, int]]:
    """(first entry, entry count, byte offset) of each bounded read covering a table."""
    chunk_entries = MAX_READ_BYTES // ENTRY_BYTES
    for first in range(0, n_entries, chunk_entries):
        yield first, min(chunk_entries, n_entries - first), table_offset + first * ENTRY_BYTES


class _Checker:
    """One pass over an image's tables; the counters accumulate here."""

    def __init__(self, image: QedImage, progress: Callable[[float], None] | None = None) -> None:
        self.progress = progress
        self.header = image.header
        self.geometry = image.geometry
        self.storage = image.storage
        self.file_size = image.file_size
        self.used = ClusterBitmap(self.file_size // self.geometry.cluster_size, self.header.header_size)
        self.corruptions = 0
        self.check_errors = 0
        self.allocated = 0
        self.fragmented = 0
        self.findings: list[Finding] = []
        self.truncated = False

    def note(self, finding: Finding) -> bool:
        """Keep a finding; False once MAX_FINDINGS are kept (the counters go on)."""
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(finding)
            return True
        self.truncated = True
        return False

    def io_error(self, exc: ImageError, table_offset: int, index: int | None, value: int) -> None:
        self.check_errors += 1
        self.note(Finding(FindingKind.IO_ERROR, table_offset, index, value, detail=exc.message))

    def run(self) -> CheckReport:
        g = self.geometry
        addressable = max(1, g.l1_entries_for(self.header.image_size))
        l1_offset = self.header.l1_table_offset
        # Open validated the L1 offset against a file no longer than the allocation
        # pointer, so these clusters are in the bitmap, and nothing has marked them yet.
        self.used.mark(l1_offset // g.cluster_size, g.table_size)
        for first, n, offset in table_chunks(l1_offset, g.table_entries):
            try:
                raw = self.storage.pread(n * ENTRY_BYTES, offset)
            except ImageError as exc:
                self.io_error(exc, l1_offset, first, offset)
                continue
            for index, l2_offset in nonzero_entries(raw, first):
                self.l1_entry(index, l2_offset)
                if self.progress is not None and index % _PROGRESS_EVERY_TABLES == 0:
                    self.progress(min(1.0, index / addressable))
        leaks = 0
        if not self.check_errors:  # an unread table would make its clusters look leaked
            leaks = self.used.count_clear()
            if leaks:
                self.note_leaks()
        h = self.header
        return CheckReport(
            corruptions=self.corruptions,
            leaks=leaks,
            check_errors=self.check_errors,
            image_end_offset=self.storage.length(),
            total_clusters=-(-h.image_size // h.cluster_size),
            allocated_clusters=self.allocated,
            fragmented_clusters=self.fragmented,
            findings=tuple(self.findings),
            findings_truncated=self.truncated,
            need_check=h.need_check,
        )

    def l1_entry(self, index: int, l2_offset: int) -> None:
        g = self.geometry
        l1_offset = self.header.l1_table_offset
        guest = index << g.l1_shift
        if not fmt.table_offset_valid(l2_offset, self.header, self.file_size):
            self.corruptions += 1
            self.note(Finding(FindingKind.L1_INVALID, l1_offset, index, l2_offset, guest))
            return
        shared = self.used.mark(l2_offset // g.cluster_size, g.table_size)
        if shared:
            self.corruptions += shared
            self.note(Finding(FindingKind.DUPLICATE, l1_offset, index, l2_offset, guest, shared))
            return
        last = 0  # the previous offset in this table, for fragmentation
        for first, n, offset in table_chunks(l2_offset, g.table_entries):
            try:
                raw = self.storage.pread(n * ENTRY_BYTES, offset)
            except ImageError as exc:
                self.io_error(exc, l1_offset, index, l2_offset)
                return  # the rest of this table is unknown
            last = self.l2_entries(l2_offset, guest, nonzero_entries(raw, first), last)

    def l2_entries(self, l2_offset: int, guest: int, entries: Iterator[tuple[int, int]], last: int) -> int:
        """Count and mark one chunk of an L2 table; return the last offset seen."""
        cs = self.geometry.cluster_size
        bits = self.geometry.cluster_bits
        lowest = self.header.header_size * cs
        limit = self.file_size
        used = self.used.bits
        for index, value in entries:
            if value == ZERO_CLUSTER:
                continue
            self.allocated += 1
            if last and last + cs != value:
                self.fragmented += 1
            last = value
            if value & (cs - 1) or not lowest <= value < limit:  # fmt.cluster_offset_valid, inlined
                self.corruptions += 1
                self.note(Finding(FindingKind.L2_INVALID, l2_offset, index, value, guest + (index << bits)))
                continue
            cluster = value >> bits
            byte = used[cluster >> 3]
            bit = 1 << (cluster & 7)
            if byte & bit:
                self.corruptions += 1
                self.note(Finding(FindingKind.DUPLICATE, l2_offset, index, value, guest + (index << bits)))
            else:
                used[cluster >> 3] = byte | bit
        return last

    def note_leaks(self) -> None:
        cs = self.geometry.cluster_size
        for first, n in self.used.clear_runs():
            if not self.note(Finding(FindingKind.LEAK, None, None, first * cs, count=n)):
                return  # the leak counter is exact without the rest of the runs


def check(image: QedImage, progress: Callable[[float], None] | None = None) -> CheckReport:
    """Check ``image``'s tables against its file; reads tables only, never writes.

    ``progress`` is called now and then with the fraction of the L1 table walked.
    """
    report = _Checker(image, progress).run()
    if progress is not None:
        progress(1.0)
    return report


# -- qemu-img check's output ---------------------------------------------------------------

# qemu-img prints its JSON from a hash table (QDict), so keys come out in the order of
# their buckets; this is that order for every key ImageCheck can hold.
_JSON_KEY_ORDER = (
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
)


def report_fields(report: CheckReport, filename: str) -> dict[str, object]:
    """``qemu-img check --output=json``'s object: counters that are 0 are left out.

    ``check-errors`` is always present. ``image-end-offset`` is left out as QEMU's QED
    driver leaves it out (it never sets it).
    """
    values: dict[str, object] = {
        "total-clusters": report.total_clusters,
        "corruptions": report.corruptions,
        "corruptions-fixed": report.corruptions_fixed,
        "check-errors": report.check_errors,
        "leaks": report.leaks,
        "leaks-fixed": report.leaks_fixed,
        "allocated-clusters": report.allocated_clusters,
        "filename": filename,
        "format": "qed",
        "fragmented-clusters": report.fragmented_clusters,
    }
    return {k: values[k] for k in _JSON_KEY_ORDER if k in values and (values[k] or k == "check-errors")}


def report_json(report: CheckReport, filename: str) -> str:
    return json.dumps(report_fields(report, filename), indent=4)


def report_human(report: CheckReport) -> str:
    """``qemu-img check``'s human output, without the final newline."""
    lines: list[str] = []
    if not (report.corruptions or report.leaks or report.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if report.corruptions:
            lines += [
                "",
                f"{report.corruptions} errors were found on the image.",
                "Data may be corrupted, or further writes to the image may corrupt it.",
            ]
        if report.leaks:
            lines += [
                "",
                f"{report.leaks} leaked clusters were found on the image.",
                "This means waste of disk space, but no harm to data.",
            ]
        if report.check_errors:
            lines += ["", f"{report.check_errors} internal errors have occurred during the check."]
    if report.total_clusters and report.allocated_clusters:
        allocated = report.allocated_clusters * 100.0 / report.total_clusters
        fragmented = report.fragmented_clusters * 100.0 / report.allocated_clusters
        lines.append(
            f"{report.allocated_clusters}/{report.total_clusters} = {allocated:0.2f}% allocated, "
            f"{fragmented:0.2f}% fragmented, {0.0:0.2f}% compressed clusters"
        )
    return "\n".join(lines)
