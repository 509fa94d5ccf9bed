"""L1 and L2 tables: entries, a bounded L2 cache, sector-granular writes.

Entry values (both levels): 0 = unallocated; for L2 only, 1 = zero cluster; anything
else is a byte offset that must be validated before it is followed.

Tables are cached in *pages* of at most :data:`MAX_PAGE_BYTES` so that the cache is
bounded in bytes whatever the geometry (one L2 table is 1 GiB at 64 MiB clusters and
table_size 16). The cache is write-through: an update changes the cached page and
rewrites only the 512-byte sectors that hold the changed entries, as QEMU does, so a
torn write can only damage the sector being written. Only the addressable prefix of
L1 (rounded up to whole sectors, so sector rewrites reproduce what is on disk) is held.
"""

from __future__ import annotations

import contextlib
import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from qednbd.errors import ImageError
from qednbd.qed.geometry import ENTRY_BYTES
from qednbd.qed.storage import Storage

UNALLOCATED = 0
ZERO_CLUSTER = 1
SECTOR_BYTES = 512
ENTRIES_PER_SECTOR = SECTOR_BYTES // ENTRY_BYTES
# One cache page: the default table (64 KiB x 4) fits whole; larger tables are paged.
MAX_PAGE_BYTES = 256 * 1024
_BIG_ENDIAN_HOST = sys.byteorder == "big"
_ZERO_CHUNK = bytes(1 << 20)


def decode_entries(raw: bytes) -> array[int]:
    entries = array("Q")
    entries.frombytes(raw)
    if _BIG_ENDIAN_HOST:
        entries.byteswap()
    return entries


def encode_entries(entries: array[int]) -> bytes:
    if _BIG_ENDIAN_HOST:
        swapped = array("Q", entries)
        swapped.byteswap()
        return swapped.tobytes()
    return entries.tobytes()


def _sector_span(first: int, count: int) -> tuple[int, int]:
    """Entry range [lo, hi) of the whole sectors that hold entries [first, first+count)."""
    lo = first - first % ENTRIES_PER_SECTOR
    hi = -(-(first + count) // ENTRIES_PER_SECTOR) * ENTRIES_PER_SECTOR
    return lo, hi


class L1Table:
    """The addressable prefix of the L1 table, held in memory."""

    def __init__(self, storage: Storage, offset: int, n_entries: int) -> None:
        self.storage = storage
        self.offset = offset
        n_held = -(-n_entries // ENTRIES_PER_SECTOR) * ENTRIES_PER_SECTOR
        self.entries = decode_entries(storage.pread(n_held * ENTRY_BYTES, offset))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> int:
        return self.entries[index]

    def set(self, index: int, value: int) -> None:
        """Set one entry and write the sector holding it (no flush).

        Memory changes only once the write succeeded: a failed write must not leave an
        entry that later sector writes would make durable behind the caller's back.
        """
        lo, hi = _sector_span(index, 1)
        sector = self.entries[lo:hi]
        sector[index - lo] = value
        try:
            self.storage.pwrite(encode_entries(sector), self.offset + lo * ENTRY_BYTES)
        except BaseException:
            # A short write may have changed part of the sector: believe the file.
            with contextlib.suppress(ImageError):
                on_disk = self.storage.pread((hi - lo) * ENTRY_BYTES, self.offset + lo * ENTRY_BYTES)
                self.entries[lo:hi] = decode_entries(on_disk)
            raise
        self.entries[index] = value

    def reload(self) -> None:
        self.entries = decode_entries(self.storage.pread(len(self.entries) * ENTRY_BYTES, self.offset))


class L2Cache:
    """Bounded write-through cache of L2 table pages, least recently used evicted first."""

    def __init__(self, storage: Storage, table_bytes: int, capacity_bytes: int) -> None:
        self.storage = storage
        self.table_bytes = table_bytes
        self.page_bytes = min(table_bytes, MAX_PAGE_BYTES)
        self.page_entries = self.page_bytes // ENTRY_BYTES
        self.capacity = max(1, capacity_bytes // self.page_bytes)
        self._pages: OrderedDict[tuple[int, int], array[int]] = OrderedDict()

    def page(self, table_offset: int, page_no: int) -> array[int]:
        """Entries [page_no*page_entries, +page_entries) of the table at ``table_offset``."""
        key = (table_offset, page_no)
        pages = self._pages
        cached = pages.get(key)
        if cached is not None:
            pages.move_to_end(key)
            return cached
        raw = self.storage.pread(self.page_bytes, table_offset + page_no * self.page_bytes)
        entries = decode_entries(raw)
        pages[key] = entries
        if len(pages) > self.capacity:
            pages.popitem(last=False)
        return entries

    def entry(self, table_offset: int, index: int) -> int:
        page_no, within = divmod(index, self.page_entries)
        return self.page(table_offset, page_no)[within]

    def update(self, table_offset: int, first: int, values: Sequence[int]) -> None:
        """Set entries [first, first+len(values)) and write only the sectors that hold them."""
        done = 0
        while done < len(values):
            index = first + done
            page_no, within = divmod(index, self.page_entries)
            page = self.page(table_offset, page_no)
            n = min(len(values) - done, self.page_entries - within)
            lo, hi = _sector_span(within, n)
            sectors = page[lo:hi]
            sectors[within - lo : within - lo + n] = array("Q", values[done : done + n])
            try:
                self.storage.pwrite(
                    encode_entries(sectors),
                    table_offset + page_no * self.page_bytes + lo * ENTRY_BYTES,
                )
            except BaseException:
                # A short write may have changed some sectors: the next lookup rereads the file.
                self._pages.pop((table_offset, page_no), None)
                raise
            page[lo:hi] = sectors  # only after the write succeeded (see L1Table.set)
            done += n

    def write_new(self, table_offset: int, first: int, values: Sequence[int]) -> None:
        """Write a whole new table: zeros except entries [first, first+len(values))."""
        last = first + len(values)
        for page_no in range(self.table_bytes // self.page_bytes):
            lo = page_no * self.page_entries
            hi = lo + self.page_entries
            page_offset = table_offset + page_no * self.page_bytes
            if hi <= first or lo >= last:
                write_zeros(self.storage, page_offset, self.page_bytes)
                self._pages.pop((table_offset, page_no), None)
                continue
            page = array("Q", bytes(self.page_bytes))
            a, b = max(lo, first), min(hi, last)
            page[a - lo : b - lo] = array("Q", values[a - first : b - first])
            self.storage.pwrite(encode_entries(page), page_offset)
            self._pages[(table_offset, page_no)] = page
            self._pages.move_to_end((table_offset, page_no))
            if len(self._pages) > self.capacity:
                self._pages.popitem(last=False)

    def clear(self) -> None:
        self._pages.clear()


def write_zeros(storage: Storage, offset: int, length: int) -> None:
    """Write ``length`` zero bytes at ``offset`` in bounded chunks."""
    while length > 0:
        n = min(length, len(_ZERO_CHUNK))
        storage.pwrite(memoryview(_ZERO_CHUNK)[:n], offset)
        offset += n
        length -= n
