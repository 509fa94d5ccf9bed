"""Fixtures for the image tests.

* ``recorder(path, read_only=False)`` opens a real :class:`FileStorage` wrapped in a
  :class:`RecordingStorage` that records every call that changes the file.
* ``ondisk`` reads (and pokes) the header and tables straight from the file, without the
  engine, so tests check what is really on disk.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qednbd.qed.storage import FileStorage, Storage


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "pwrite", "flush", "punch_hole", "truncate"
    offset: int = 0
    data: bytes = b""
    length: int = 0


@dataclass
class RecordingStorage:
    """Passes every call to a real :class:`FileStorage` and records the ones that change it."""

    inner: FileStorage
    events: list[Event] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path, read_only: bool = False) -> RecordingStorage:
        return cls(FileStorage(str(path), read_only=read_only))

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    def pread(self, length: int, offset: int) -> bytes:
        return self.inner.pread(length, offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        raw = bytes(data)
        self.events.append(Event("pwrite", offset, raw, len(raw)))
        self.inner.pwrite(raw, offset)

    def flush(self) -> None:
        self.events.append(Event("flush"))
        self.inner.flush()

    def punch_hole(self, offset: int, length: int) -> bool:
        self.events.append(Event("punch_hole", offset, b"", length))
        return self.inner.punch_hole(offset, length)

    def length(self) -> int:
        return self.inner.length()

    def truncate(self, length: int) -> None:
        self.events.append(Event("truncate", length, b"", length))
        self.inner.truncate(length)

    def close(self) -> None:
        self.inner.close()

    # -- queries ------------------------------------------------------------------------

    def as_storage(self) -> Storage:
        return self

    def writes(self) -> list[Event]:
        return [e for e in self.events if e.kind == "pwrite"]

    def flushes(self) -> list[Event]:
        return [e for e in self.events if e.kind == "flush"]

    def forget(self) -> None:
        self.events.clear()


HEADER = struct.Struct("<IIIIQQQQQII")


@dataclass(frozen=True)
class RawHeader:
    magic: int
    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int
    backing_filename_size: int


class OnDisk:
    """Readers of the raw file, independent of the engine."""

    @staticmethod
    def header(path: str | Path) -> RawHeader:
        with open(path, "rb") as f:
            return RawHeader(*HEADER.unpack(f.read(HEADER.size)))

    @staticmethod
    def u64(path: str | Path, offset: int) -> int:
        with open(path, "rb") as f:
            f.seek(offset)
            return int(struct.unpack("<Q", f.read(8))[0])

    @staticmethod
    def poke_u64(path: str | Path, offset: int, value: int) -> None:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(struct.pack("<Q", value))

    def l1_entry(self, path: str | Path, guest_pos: int) -> int:
        h = self.header(path)
        l2_span = h.cluster_size * (h.cluster_size * h.table_size // 8)
        return self.u64(path, h.l1_table_offset + 8 * (guest_pos // l2_span))

    def l2_entry(self, path: str | Path, guest_pos: int) -> int | None:
        """The L2 entry for ``guest_pos``; None when L1 has no table for it."""
        h = self.header(path)
        entries = h.cluster_size * h.table_size // 8
        l2_offset = self.l1_entry(path, guest_pos)
        if l2_offset == 0:
            return None
        return self.u64(path, l2_offset + 8 * (guest_pos // h.cluster_size % entries))


@pytest.fixture
def ondisk() -> OnDisk:
    return OnDisk()


@pytest.fixture
def recorder() -> Iterator[Callable[..., RecordingStorage]]:
    """A factory of recording storages; any still open at the end are closed."""
    made: list[RecordingStorage] = []

    def make(path: str | Path, read_only: bool = False) -> RecordingStorage:
        rec = RecordingStorage.open(path, read_only=read_only)
        made.append(rec)
        return rec

    yield make
    for rec in made:
        rec.close()
