"""Repair of a QED image, in a stated and flushed order.

Theory of operation
-------------------
:func:`repair` makes its own two walks over the tables (it does not trust a report that
may have been truncated) and changes the image in phases, each ended by a flush, so that
a crash at any point leaves an image that the next repair finishes:

1. **Mark dirty.** NEED_CHECK is set and flushed first, so an interrupted repair is
   repaired again at the next read-write open.
2. **Clear** (what ``qemu-img check -r`` does, plus more with ``mode="all"``). L1 entries
   that are not valid table offsets, and L2 entries that are not valid cluster offsets,
   become 0. With ``mode="all"`` also: an L1 entry whose table overlaps the header, the
   L1 table or another table (but is not the very same table), and an L2 entry pointing
   into metadata (header, L1, an L2 table). Only changed sectors are rewritten. This
   phase comes before any allocation, so no cleared past-the-end entry can ever come to
   point at a newly allocated cluster.
3. **Truncate** the leaked clusters at the end of the file (and any partial cluster).
4. **Split duplicates** (``mode="all"``). Walking the tables in order, the first
   referrer of a data cluster keeps it; each later referrer gets a copy at the end of
   the file, written and flushed *before* its entry is redirected, so every guest offset
   reads what it read before. An L1 entry naming the very same L2 table as an earlier
   one gets a copy of the table, whose data entries point at copies of their clusters.
   Until an entry is redirected its copy is merely leaked; the next repair removes it.
5. **Punch** host holes over interior leaked clusters (nothing references them).
6. **Mark clean.** If a fresh check finds no corruption and no I/O error: flush, clear
   NEED_CHECK, flush.

``mode="leaks"`` does phases 1, 2 (QEMU's part only), 3, 5 and 6: everything
``qemu-img check -r leaks`` does (QEMU clears invalid offsets in both modes) and gives
leaked space back, but never copies or drops a reference that might be valid.
A repair of a consistent image changes nothing.
"""

from __future__ import annotations

import errno
import logging
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from qednbd.errors import ImageError
from qednbd.qed import format as fmt
from qednbd.qed.check import CheckReport, ClusterBitmap, check, nonzero_entries, table_chunks
from qednbd.qed.geometry import ENTRY_BYTES
from qednbd.qed.image import QedImage
from qednbd.qed.tables import ENTRIES_PER_SECTOR, ZERO_CLUSTER, decode_entries, encode_entries

log = logging.getLogger("qednbd.qed.repair")

Mode = Literal["leaks", "all"]


@dataclass(frozen=True, slots=True)
class RepairResult:
    """What a repair did, and the check before and after it."""

    before: CheckReport
    after: CheckReport
    entries_cleared: int
    entries_redirected: int
    tables_copied: int
    clusters_truncated: int
    clusters_punched: int

    @property
    def corruptions_fixed(self) -> int:
        return max(0, self.before.corruptions - self.after.corruptions)

    @property
    def leaks_fixed(self) -> int:
        return max(0, self.before.leaks - self.after.leaks)

    @property
    def changed(self) -> bool:
        return bool(
            self.entries_cleared
            or self.entries_redirected
            or self.tables_copied
            or self.clusters_truncated
            or self.clusters_punched
        )

    def summary(self) -> str:
        return (
            f"cleared {self.entries_cleared} entries, redirected {self.entries_redirected} to copies, "
            f"copied {self.tables_copied} tables, truncated {self.clusters_truncated} and punched "
            f"{self.clusters_punched} leaked clusters; corruptions {self.before.corruptions} -> "
            f"{self.after.corruptions}, leaks {self.before.leaks} -> {self.after.leaks}"
        )


def _in_tables(cluster: int, tables: set[int], cluster_size: int, table_size: int) -> bool:
    return any((cluster - k) * cluster_size in tables for k in range(table_size))


def _write_changed_sectors(
    image: QedImage, table_offset: int, first: int, old: bytes, new: array[int]
) -> None:
    """Rewrite the 512-byte sectors of a table chunk whose bytes changed."""
    raw = encode_entries(new)
    sector = ENTRIES_PER_SECTOR * ENTRY_BYTES
    for lo in range(0, len(raw), sector):
        if raw[lo : lo + sector] != old[lo : lo + sector]:
            image.storage.pwrite(raw[lo : lo + sector], table_offset + first * ENTRY_BYTES + lo)


class _Repairer:
    def __init__(self, image: QedImage, mode: Mode) -> None:
        self.image = image
        self.mode = mode
        self.g = image.geometry
        self.header = image.header
        self.storage = image.storage
        self.n_clusters = image.file_size // self.g.cluster_size
        self.cleared = 0
        self.redirected = 0
        self.tables_copied = 0
        self.truncated = 0
        self.punched = 0
        self.end_clusters = self.n_clusters  # after phase 3: where the copies begin

    # -- phase 2: clear entries ----------------------------------------------------

    def _valid_data(self, value: int) -> bool:
        lowest = self.header.header_size * self.g.cluster_size
        return value % self.g.cluster_size == 0 and lowest <= value < self.image.file_size

    def _entries(self, table: int) -> Iterator[tuple[int, int, bytes, array[int]]]:
        """(first index, byte offset, raw chunk, decoded chunk) of each bounded read of a table."""
        for first, n, offset in table_chunks(table, self.g.table_entries):
            raw = self.storage.pread(n * ENTRY_BYTES, offset)
            yield first, offset, raw, decode_entries(raw)

    def _plausible(self, table: int) -> bool:
        """Whether every entry of a table could be an L2 entry (0, 1 or a valid offset)."""
        return all(
            v <= ZERO_CLUSTER or self._valid_data(v) for _, _, _, chunk in self._entries(table) for v in chunk
        )

    def clear_phase(self) -> tuple[ClusterBitmap, array[int], array[int]]:
        """Clear bad entries; return the referenced-cluster bitmap, kept tables, same-table splits.

        Conflicts are settled in table order, as QEMU's check counts them, with one
        exception: when data entries point into a table whose own entries are not all
        plausible, the table is the bogus one (it sits on guest data), not the entries.
        """
        g, h = self.g, self.header
        cs, ts = g.cluster_size, g.table_size
        all_mode = self.mode == "all"
        meta = ClusterBitmap(self.n_clusters, h.header_size)
        meta.mark(h.l1_table_offset // cs, ts)
        candidates: list[tuple[int, int]] = []
        splits = array("Q")  # (l1 index, table offset) pairs, flattened
        untouchable: list[int] = []  # leaks mode: conflicting tables, read for marking only
        clear_l1: list[int] = []
        seen: set[int] = set()
        for index, value in self._l1_entries():
            if not fmt.table_offset_valid(value, h, self.image.file_size):
                clear_l1.append(index)
            elif value in seen:
                if all_mode:
                    splits.extend((index, value))
            elif meta.any_marked(value // cs, ts):
                if all_mode:
                    clear_l1.append(index)
                else:
                    untouchable.append(value)
            else:
                meta.mark(value // cs, ts)
                seen.add(value)
                candidates.append((index, value))
        # Tables that sit on clusters other tables use as data lose to the data.
        implausible = {t for _, t in candidates if not self._plausible(t)}
        dropped: set[int] = set()
        if implausible:
            starts = {t // cs: t for t in implausible}
            for _, table in candidates:
                if table in implausible:
                    continue
                for _, _, _, chunk in self._entries(table):
                    for v in chunk:
                        if v > ZERO_CLUSTER and self._valid_data(v):
                            for k in range(ts):
                                owner = starts.get(v // cs - k)
                                if owner is not None:
                                    dropped.add(owner)
        kept = array("Q")
        used = ClusterBitmap(self.n_clusters, h.header_size)
        used.mark(h.l1_table_offset // cs, ts)
        for index, table in candidates:
            if table in dropped:
                if all_mode:
                    clear_l1.append(index)
                else:
                    untouchable.append(table)
                continue
            used.mark(table // cs, ts)
            kept.extend((index, table))
        for _, table in candidates:
            if table in dropped:
                continue
            for first, _, raw, entries in self._entries(table):
                for i, value in enumerate(entries):
                    if value <= ZERO_CLUSTER:
                        continue
                    if not self._valid_data(value):
                        entries[i] = 0
                        self.cleared += 1
                        continue
                    cluster = value // cs
                    if meta.any_marked(cluster, 1) and not _in_tables(cluster, dropped, cs, ts):
                        if all_mode:  # an entry into metadata: the guest would read a table
                            entries[i] = 0
                            self.cleared += 1
                        continue
                    used.mark(cluster, 1)
                _write_changed_sectors(self.image, table, first, raw, entries)
        for table in untouchable:  # never written; what they reference is not punched
            used.mark(table // cs, ts)
            for _, _, _, chunk in self._entries(table):
                for v in chunk:
                    if v > ZERO_CLUSTER and self._valid_data(v):
                        used.mark(v // cs, 1)
        self._clear_l1(sorted(clear_l1))
        return used, kept, splits

    def _l1_entries(self) -> Iterator[tuple[int, int]]:
        for first, n, offset in table_chunks(self.header.l1_table_offset, self.g.table_entries):
            yield from nonzero_entries(self.storage.pread(n * ENTRY_BYTES, offset), first)

    def _clear_l1(self, indices: list[int]) -> None:
        l1 = self.header.l1_table_offset
        pos = 0
        for first, _, raw, entries in self._entries(l1):
            end = first + len(entries)
            while pos < len(indices) and indices[pos] < end:
                entries[indices[pos] - first] = 0
                self.cleared += 1
                pos += 1
            _write_changed_sectors(self.image, l1, first, raw, entries)

    # -- phase 3: truncate the leaked tail -------------------------------------------

    def truncate_phase(self, used: ClusterBitmap) -> None:
        cs = self.g.cluster_size
        new_clusters = used.last_marked() + 1
        new_clusters = max(new_clusters, self.header.header_size)
        length = self.storage.length()
        self.end_clusters = min(self.n_clusters, new_clusters)
        if length > new_clusters * cs:
            self.truncated = -(-length // cs) - new_clusters  # a partial cluster counts as one
            self.storage.truncate(new_clusters * cs)
            self.image.file_size = new_clusters * cs
            self.storage.flush()

    # -- phase 4: split duplicates ----------------------------------------------------

    def copy_cluster(self, source: int) -> int:
        target = self.image.alloc_clusters(1)
        self.storage.pwrite(self.storage.pread(self.g.cluster_size, source), target)
        return target

    def split_phase(self, kept: array[int], splits: array[int]) -> None:
        g, h = self.g, self.header
        meta_or_data = ClusterBitmap(self.n_clusters, h.header_size)
        meta_or_data.mark(h.l1_table_offset // g.cluster_size, g.table_size)
        for k in range(0, len(kept), 2):
            meta_or_data.mark(kept[k + 1] // g.cluster_size, g.table_size)
        for k in range(0, len(kept), 2):
            table = kept[k + 1]
            for first, n, offset in table_chunks(table, g.table_entries):
                raw = self.storage.pread(n * ENTRY_BYTES, offset)
                entries = decode_entries(raw)
                copies = 0
                for index, value in nonzero_entries(raw, first):
                    if value == ZERO_CLUSTER:
                        continue
                    if meta_or_data.mark(value // g.cluster_size, 1):
                        entries[index - first] = self.copy_cluster(value)
                        copies += 1
                if copies:
                    self.storage.flush()  # the copies are durable before anything points at them
                    _write_changed_sectors(self.image, table, first, raw, entries)
                    self.storage.flush()
                    self.redirected += copies
        for k in range(0, len(splits), 2):
            index, source = splits[k], splits[k + 1]
            new_table = self.image.alloc_clusters(g.table_size)
            for first, n, offset in table_chunks(source, g.table_entries):
                entries = decode_entries(self.storage.pread(n * ENTRY_BYTES, offset))
                for i, value in enumerate(entries):
                    if value > ZERO_CLUSTER:
                        entries[i] = self.copy_cluster(value)
                self.storage.pwrite(encode_entries(entries), new_table + first * ENTRY_BYTES)
            self.storage.flush()
            lo = index - index % ENTRIES_PER_SECTOR
            sector = decode_entries(
                self.storage.pread(ENTRIES_PER_SECTOR * ENTRY_BYTES, h.l1_table_offset + lo * ENTRY_BYTES)
            )
            sector[index - lo] = new_table
            self.storage.pwrite(encode_entries(sector), h.l1_table_offset + lo * ENTRY_BYTES)
            self.storage.flush()
            self.tables_copied += 1

    # -- phase 5: punch interior leaks ------------------------------------------------

    def punch_phase(self, used: ClusterBitmap) -> None:
        cs = self.g.cluster_size
        end = self.end_clusters  # clusters past it are gone, or are copies made in phase 4
        for first, n in used.clear_runs():
            if first >= end:
                break
            n = min(n, end - first)
            if not self.storage.punch_hole(first * cs, n * cs):
                return
            self.punched += n


def _part(progress: Callable[[float], None] | None, lo: float, hi: float) -> Callable[[float], None] | None:
    """``progress`` for a step that covers [lo, hi] of the whole (check reports 0..1)."""
    if progress is None:
        return None
    report = progress
    return lambda fraction: report(lo + (hi - lo) * min(1.0, fraction))


def repair(
    image: QedImage, mode: Mode = "all", progress: Callable[[float], None] | None = None
) -> RepairResult:
    """Repair ``image`` (opened read-write) in the order the module docstring states.
    ``progress`` gets the fraction done now and then (two checks are most of the work)."""
    if image.read_only:
        raise ImageError(errno.EROFS, "cannot repair an image opened read-only")
    before = check(image, _part(progress, 0.0, 0.45))
    if before.check_errors:  # tables we cannot read: repairing around them could lose data
        return RepairResult(before, before, 0, 0, 0, 0, 0)
    image.set_need_check()  # phase 1
    worker = _Repairer(image, mode)
    used, kept, splits = worker.clear_phase()
    image.storage.flush()
    worker.truncate_phase(used)
    if mode == "all":
        worker.split_phase(kept, splits)
    worker.punch_phase(used)
    image.reload_tables()
    if progress is not None:
        progress(0.55)
    after = check(image, _part(progress, 0.55, 1.0))
    if not after.corruptions and not after.check_errors:
        image.mark_checked()
        image.clear_need_check()
    result = RepairResult(
        before=before,
        after=after,
        entries_cleared=worker.cleared,
        entries_redirected=worker.redirected,
        tables_copied=worker.tables_copied,
        clusters_truncated=worker.truncated,
        clusters_punched=worker.punched,
    )
    return result


def recover_on_open(image: QedImage, progress: Callable[[float], None] | None = None) -> RepairResult:
    """What a read-write open of a dirty image does: check, repair everything, log it.

    Raises if the image cannot be made safe (I/O errors, or damage that remains).
    """
    result = repair(image, "all", progress)
    if result.changed:
        log.warning("%s was not closed cleanly; repaired: %s", image.path, result.summary())
    else:
        log.info("%s was not closed cleanly; the check found nothing to repair", image.path)
    if result.after.corruptions or result.after.check_errors:
        raise ImageError(
            errno.EIO,
            f"image needs repair that could not be completed ({result.after.corruptions} corruptions, "
            f"{result.after.check_errors} I/O errors remain); run 'qednbd check -r all {image.path}'",
        )
    return result
