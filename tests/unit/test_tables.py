"""L1/L2 tables against a recording in-memory storage: exactly which bytes get written.

QEMU rewrites only the 512-byte sectors that hold changed entries (qed.md §3, "Table
I/O"); a new L2 table is written whole. The cache is bounded in pages. Every assertion
here is on the recorded ``(offset, length)`` of each ``pwrite`` and on the bytes that
end up in the storage.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qednbd.qed.storage import Storage
from qednbd.qed.tables import (
    MAX_PAGE_BYTES,
    UNALLOCATED,
    ZERO_CLUSTER,
    L1Table,
    L2Cache,
    decode_entries,
    encode_entries,
    write_zeros,
)

SECTOR = 512
PER_SECTOR = SECTOR // 8


@dataclass
class RecordingStorage:
    """A :class:`Storage` over a bytearray that records every write, read and flush."""

    data: bytearray = field(default_factory=bytearray)
    writes: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)
    reads: list[tuple[int, int]] = field(default_factory=list)
    events: list[tuple[str, int, int]] = field(default_factory=list)  # ("pwrite"|"flush", off, len)

    @property
    def read_only(self) -> bool:
        return False

    def pread(self, length: int, offset: int) -> bytes:
        self.reads.append((offset, length))
        chunk = bytes(self.data[offset : offset + length])
        return chunk + bytes(length - len(chunk))

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        raw = bytes(data)
        self.writes.append((offset, len(raw)))
        self.events.append(("pwrite", offset, len(raw)))
        if offset + len(raw) > len(self.data):
            self.data.extend(bytes(offset + len(raw) - len(self.data)))
        self.data[offset : offset + len(raw)] = raw

    def flush(self) -> None:
        self.events.append(("flush", 0, 0))

    def punch_hole(self, offset: int, length: int) -> bool:
        end = min(offset + length, len(self.data))
        if end > offset:
            self.data[offset:end] = bytes(end - offset)
        return True

    def length(self) -> int:
        return len(self.data)

    def truncate(self, length: int) -> None:
        if length < len(self.data):
            del self.data[length:]
        else:
            self.data.extend(bytes(length - len(self.data)))

    def close(self) -> None:
        pass

    def forget(self) -> None:
        self.writes.clear()
        self.reads.clear()
        self.events.clear()

    def entries(self, offset: int, n: int) -> list[int]:
        return list(struct.unpack_from(f"<{n}Q", self.data, offset))


def _as_storage(s: RecordingStorage) -> Storage:
    return s  # type-checks that the recorder satisfies the protocol


def _covering_sectors(first: int, count: int) -> set[int]:
    """Sector numbers (within the table) holding entries [first, first+count)."""
    return set(range(first // PER_SECTOR, (first + count - 1) // PER_SECTOR + 1))


def _written_sectors(writes: list[tuple[int, int]], table_offset: int) -> list[int]:
    sectors: list[int] = []
    for off, length in writes:
        assert (off - table_offset) % SECTOR == 0, f"write at {off:#x} is not sector aligned"
        assert length % SECTOR == 0, f"write of {length} bytes is not whole sectors"
        start = (off - table_offset) // SECTOR
        sectors.extend(range(start, start + length // SECTOR))
    return sectors


TABLE_OFFSET = 0x10000
SMALL_TABLE = 4096 * 2  # 4K clusters x 2: 1024 entries, one page
BIG_TABLE = 65536 * 16  # 1 MiB: four pages of MAX_PAGE_BYTES


@functools.cache
def _table_image(table_bytes: int) -> bytes:
    """An existing table on disk at TABLE_OFFSET, with recognisable entries."""
    n = table_bytes // 8
    return bytes(TABLE_OFFSET) + struct.pack(f"<{n}Q", *(0x100000 + i * 0x1000 for i in range(n)))


def _fresh_table(table_bytes: int, capacity: int = 1 << 24) -> tuple[RecordingStorage, L2Cache]:
    """A storage holding one table, and a cold cache over it."""
    store = RecordingStorage(data=bytearray(_table_image(table_bytes)))
    cache = L2Cache(_as_storage(store), table_bytes, capacity)
    return store, cache


def test_recording_storage_is_a_storage() -> None:
    s = RecordingStorage()
    s.pwrite(b"abc", 10)
    assert s.pread(5, 9) == b"\0abc\0"
    assert s.writes == [(10, 3)]
    s.flush()
    assert s.events == [("pwrite", 10, 3), ("flush", 0, 0)]


# --------------------------------------------------------------------------------------
# L2Cache.update


def test_update_one_entry_writes_its_sector_only() -> None:
    store, cache = _fresh_table(SMALL_TABLE)
    before = bytes(store.data)
    cache.update(TABLE_OFFSET, 70, [0xABC000])
    assert store.writes == [(TABLE_OFFSET + SECTOR, SECTOR)]
    assert store.entries(TABLE_OFFSET + 70 * 8, 1) == [0xABC000]
    # Nothing else changed on disk.
    changed = [i for i, (a, b) in enumerate(zip(before, store.data, strict=True)) if a != b]
    assert changed and all(TABLE_OFFSET + 70 * 8 <= i < TABLE_OFFSET + 71 * 8 for i in changed)


def test_update_across_a_sector_boundary_writes_both_sectors() -> None:
    store, cache = _fresh_table(SMALL_TABLE)
    cache.update(TABLE_OFFSET, 63, [ZERO_CLUSTER, ZERO_CLUSTER])
    assert store.writes == [(TABLE_OFFSET, 2 * SECTOR)]
    assert store.entries(TABLE_OFFSET + 62 * 8, 4) == [0x100000 + 62 * 0x1000, 1, 1, 0x100000 + 65 * 0x1000]


def test_update_of_the_last_entry() -> None:
    store, cache = _fresh_table(SMALL_TABLE)
    last = SMALL_TABLE // 8 - 1
    cache.update(TABLE_OFFSET, last, [UNALLOCATED])
    assert store.writes == [(TABLE_OFFSET + SMALL_TABLE - SECTOR, SECTOR)]
    assert store.entries(TABLE_OFFSET + last * 8, 1) == [0]


def test_update_across_a_cache_page_boundary() -> None:
    store, cache = _fresh_table(BIG_TABLE)
    assert cache.page_bytes == MAX_PAGE_BYTES < BIG_TABLE
    per_page = MAX_PAGE_BYTES // 8
    cache.update(TABLE_OFFSET, per_page - 1, [0x5000, 0x6000])
    assert sorted(store.writes) == [
        (TABLE_OFFSET + MAX_PAGE_BYTES - SECTOR, SECTOR),
        (TABLE_OFFSET + MAX_PAGE_BYTES, SECTOR),
    ]
    assert store.entries(TABLE_OFFSET + (per_page - 1) * 8, 2) == [0x5000, 0x6000]


@settings(max_examples=300)
@given(st.sampled_from([SMALL_TABLE, BIG_TABLE]), st.data())
def test_update_writes_exactly_the_covering_sectors(table_bytes: int, data: st.DataObject) -> None:
    store, cache = _fresh_table(table_bytes)
    n_entries = table_bytes // 8
    # Sometimes warm the cache first, so both the cold and the cached path are covered.
    if data.draw(st.booleans(), label="warm"):
        cache.entry(TABLE_OFFSET, data.draw(st.integers(0, n_entries - 1), label="warm_index"))
        store.forget()
    first = data.draw(st.integers(0, n_entries - 1), label="first")
    count = data.draw(st.integers(1, min(n_entries - first, 3 * PER_SECTOR + 5)), label="count")
    values = data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=count, max_size=count), label="values")
    before = bytes(store.data)

    cache.update(TABLE_OFFSET, first, values)

    written = _written_sectors(store.writes, TABLE_OFFSET)
    assert len(written) == len(set(written)), "a sector was written twice"
    assert set(written) == _covering_sectors(first, count)
    assert store.entries(TABLE_OFFSET + first * 8, count) == values
    # Outside the changed entries the table is byte-for-byte what it was.
    lo, hi = TABLE_OFFSET + first * 8, TABLE_OFFSET + (first + count) * 8
    assert store.data[:lo] == before[:lo]
    assert store.data[hi:] == before[hi:]
    # And the cache agrees with the disk without reading it again.
    store.forget()
    for i in (first, first + count - 1):
        assert cache.entry(TABLE_OFFSET, i) == store.entries(TABLE_OFFSET + i * 8, 1)[0]
    assert store.reads == []
    assert not any(kind == "flush" for kind, _, _ in store.events)


def test_update_never_flushes() -> None:
    store, cache = _fresh_table(SMALL_TABLE)
    cache.update(TABLE_OFFSET, 0, [1] * 200)
    assert [e for e in store.events if e[0] == "flush"] == []


# --------------------------------------------------------------------------------------
# L2Cache capacity


@pytest.mark.parametrize("table_bytes", [SMALL_TABLE, BIG_TABLE])
def test_cache_stays_within_capacity(table_bytes: int) -> None:
    page = min(table_bytes, MAX_PAGE_BYTES)
    store = RecordingStorage()
    cache = L2Cache(_as_storage(store), table_bytes, capacity_bytes=3 * page + page // 2)
    assert cache.capacity == 3
    tables = [0x100000 + i * table_bytes for i in range(8)]
    pages_per_table = table_bytes // page
    for t in tables:
        for p in range(pages_per_table):
            cache.entry(t, p * cache.page_entries)
            assert len(cache._pages) <= cache.capacity
    # Least recently used first: the last three pages are cached, the first one is not.
    store.forget()
    last = tables[-1]
    cache.entry(last, (pages_per_table - 1) * cache.page_entries)
    assert store.reads == []
    cache.entry(tables[0], 0)
    assert store.reads == [(tables[0], page)]
    assert len(cache._pages) == 3


def test_capacity_is_at_least_one_page() -> None:
    cache = L2Cache(_as_storage(RecordingStorage()), BIG_TABLE, capacity_bytes=0)
    assert cache.capacity == 1
    cache.entry(0x100000, 0)
    cache.entry(0x100000, BIG_TABLE // 8 - 1)
    assert len(cache._pages) == 1


def test_update_and_write_new_respect_capacity() -> None:
    store = RecordingStorage()
    cache = L2Cache(_as_storage(store), SMALL_TABLE, capacity_bytes=2 * SMALL_TABLE)
    for i in range(6):
        cache.write_new(0x100000 + i * SMALL_TABLE, 0, [1])
        assert len(cache._pages) <= 2
        cache.update(0x100000 + (i // 2) * SMALL_TABLE, 5, [1])
        assert len(cache._pages) <= 2


def test_recently_used_page_survives_eviction() -> None:
    store = RecordingStorage()
    cache = L2Cache(_as_storage(store), SMALL_TABLE, capacity_bytes=2 * SMALL_TABLE)
    a, b, c = 0x100000, 0x200000, 0x300000
    cache.entry(a, 0)
    cache.entry(b, 0)
    cache.entry(a, 1)  # a is now the most recently used
    cache.entry(c, 0)  # evicts b
    store.forget()
    cache.entry(a, 2)
    assert store.reads == []
    cache.entry(b, 0)
    assert store.reads == [(b, SMALL_TABLE)]


# --------------------------------------------------------------------------------------
# L2Cache.write_new


@pytest.mark.parametrize("table_bytes", [SMALL_TABLE, BIG_TABLE])
@pytest.mark.parametrize(("first", "count"), [(0, 1), (100, 3), (-1, 1)])
def test_write_new_writes_the_whole_table(table_bytes: int, first: int, count: int) -> None:
    n_entries = table_bytes // 8
    first %= n_entries
    store = RecordingStorage(data=bytearray(b"\xee" * (TABLE_OFFSET + table_bytes + 4096)))
    cache = L2Cache(_as_storage(store), table_bytes, 1 << 24)
    values = [0x700000 + i * 0x1000 for i in range(count)]

    cache.write_new(TABLE_OFFSET, first, values)

    # The recorded writes tile [TABLE_OFFSET, TABLE_OFFSET + table_bytes) exactly once.
    spans = sorted(store.writes)
    pos = TABLE_OFFSET
    for off, length in spans:
        assert off == pos, f"gap or overlap at {pos:#x}"
        pos += length
    assert pos == TABLE_OFFSET + table_bytes
    expected = [0] * n_entries
    expected[first : first + count] = values
    assert store.entries(TABLE_OFFSET, n_entries) == expected
    assert store.data[TABLE_OFFSET + table_bytes :] == b"\xee" * 4096
    assert store.data[:TABLE_OFFSET] == b"\xee" * TABLE_OFFSET
    assert not any(kind == "flush" for kind, _, _ in store.events)
    # The cache holds the new table: no stale read of what was there before.
    assert cache.entry(TABLE_OFFSET, first) == values[0]
    assert cache.entry(TABLE_OFFSET, (first + count) % n_entries) == expected[(first + count) % n_entries]


def test_write_new_replaces_a_stale_cached_page() -> None:
    _store, cache = _fresh_table(BIG_TABLE)
    last = BIG_TABLE // 8 - 1
    assert cache.entry(TABLE_OFFSET, last) != 0  # cached, holds the old entry
    cache.write_new(TABLE_OFFSET, 0, [0x9000])
    assert cache.entry(TABLE_OFFSET, last) == 0
    assert cache.entry(TABLE_OFFSET, 0) == 0x9000


# --------------------------------------------------------------------------------------
# L1Table


def _l1(n_entries: int, table_bytes: int = SMALL_TABLE) -> tuple[RecordingStorage, L1Table]:
    store = RecordingStorage()
    store.data.extend(bytes(TABLE_OFFSET))
    store.data.extend(struct.pack(f"<{table_bytes // 8}Q", *(i * 0x10000 for i in range(table_bytes // 8))))
    l1 = L1Table(_as_storage(store), TABLE_OFFSET, n_entries)
    store.forget()
    return store, l1


@pytest.mark.parametrize("index", [0, 1, 63, 64, 200, 1023])
def test_l1_set_writes_one_sector(index: int) -> None:
    store, l1 = _l1(1024)
    before = bytes(store.data)
    l1.set(index, 0xDEAD0000)
    sector = index // PER_SECTOR
    assert store.writes == [(TABLE_OFFSET + sector * SECTOR, SECTOR)]
    assert store.entries(TABLE_OFFSET + index * 8, 1) == [0xDEAD0000]
    assert l1[index] == 0xDEAD0000
    mask = slice(TABLE_OFFSET + index * 8, TABLE_OFFSET + index * 8 + 8)
    after = bytearray(store.data)
    after[mask] = before[mask]
    assert bytes(after) == before  # only that entry changed
    assert not any(kind == "flush" for kind, _, _ in store.events)


def test_l1_holds_the_addressable_prefix_in_whole_sectors() -> None:
    store = RecordingStorage()
    store.data.extend(bytes(TABLE_OFFSET))
    store.data.extend(struct.pack("<1024Q", *range(1024)))
    l1 = L1Table(_as_storage(store), TABLE_OFFSET, 3)
    assert len(l1) == PER_SECTOR
    assert store.reads == [(TABLE_OFFSET, SECTOR)]
    assert [l1[i] for i in range(5)] == [0, 1, 2, 3, 4]
    # Setting an entry rewrites the sector with the on-disk neighbours intact.
    l1.set(2, 0x40000)
    assert store.entries(TABLE_OFFSET, PER_SECTOR + 1) == [0, 1, 0x40000, *range(3, PER_SECTOR + 1)]


def test_l1_reload_sees_the_disk() -> None:
    store, l1 = _l1(128)
    store.data[TABLE_OFFSET + 8 * 100 : TABLE_OFFSET + 8 * 101] = struct.pack("<Q", 0x1230000)
    assert l1[100] == 100 * 0x10000
    l1.reload()
    assert l1[100] == 0x1230000


# --------------------------------------------------------------------------------------
# helpers


@given(st.lists(st.integers(0, 2**64 - 1), max_size=200))
def test_entries_encode_little_endian(values: list[int]) -> None:
    raw = encode_entries(decode_entries(struct.pack(f"<{len(values)}Q", *values)))
    assert raw == struct.pack(f"<{len(values)}Q", *values)
    assert list(decode_entries(raw)) == values


def test_write_zeros_is_bounded_and_exact() -> None:
    store = RecordingStorage(data=bytearray(b"\xff" * (5 << 20)))
    write_zeros(store, 1000, (3 << 20) + 17)
    assert store.data[:1000] == b"\xff" * 1000
    assert store.data[1000 : 1000 + (3 << 20) + 17] == bytes((3 << 20) + 17)
    assert store.data[1000 + (3 << 20) + 17 :] == b"\xff" * ((2 << 20) - 1017)
    assert max(length for _, length in store.writes) <= 1 << 20
    assert sum(length for _, length in store.writes) == (3 << 20) + 17
